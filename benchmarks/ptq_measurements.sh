#!/usr/bin/env bash
# Issue 4 measurements (BUILD_NOTES.md). Run from the repo root.
set -eu
PY=.venv/bin/python
[ -d runs/weights/resnet18_cifar10 ] || $PY -m weights_convert --model=resnet18_cifar \
  --checkpoint=../shared/data/weights/resnet18_cifar10/resnet18_cifar10.safetensors \
  --mean=0.4914,0.4822,0.4465 --std=0.2470,0.2435,0.2616 --out=runs/weights/resnet18_cifar10
for b in 8 6 4; do
  $PY -m experiments.ptq --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
    --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar \
    --bits=$b --batch_size=250 --workdir=runs/r18c10_w${b}a${b}
done
for m in absmax percentile mse; do for b in 8 6 4; do
  $PY -m experiments.ptq --model=efficientnet_lite0 --weights=package \
    --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val \
    --bits=$b --calib_method=$m --batch_size=64 --workdir=runs/lite0_w${b}a${b}_$m
done; done
$PY -m experiments.ptq --model=efficientnet_lite0 --weights=package \
  --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val \
  --bits=4 --calib_method=mse --weight_method=mse --batch_size=64 --workdir=runs/lite0_w4a4_mse_wmse
