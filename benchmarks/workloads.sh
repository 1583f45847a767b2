# Sourced by the measurement scripts: the Python of the venv, and the flags of the two real
# workloads (the shared CIFAR-10 ResNet-18 checkpoint, converted on first use, and
# EfficientNet-Lite0 with the package weights on the shared ImageNet images).
PY=${PYTHON:-.venv/bin/python}
R18_WEIGHTS=runs/weights/resnet18_cifar10
[ -d $R18_WEIGHTS ] || $PY -m weights_convert --model=resnet18_cifar \
  --checkpoint=../shared/data/weights/resnet18_cifar10/resnet18_cifar10.safetensors \
  --mean=0.4914,0.4822,0.4465 --std=0.2470,0.2435,0.2616 --out=$R18_WEIGHTS
R18="--model=resnet18_cifar --weights=$R18_WEIGHTS --batch_size=250
  --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar"
LITE0="--model=efficientnet_lite0 --weights=package --batch_size=64
  --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val"
