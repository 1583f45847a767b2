#!/usr/bin/env bash
# Issue 13 measurements (BUILD_NOTES.md): reconstruction PTQ against round-to-nearest, ResNet-18
# (CIFAR stem) with the shared CIFAR-10 checkpoint: 256 calibration images of train.tar, all
# 10,000 test images. Repo root. ITERATIONS (default 500) per unit; METHODS (default qdrop brecq);
# RECON_BATCH (default 32) images per step; SETTINGS (default 4:4 4:8 2:4, as w_bits:a_bits).
set -eu
PY=.venv/bin/python
ITERATIONS=${ITERATIONS:-500}
RECON_BATCH=${RECON_BATCH:-32}
[ -d runs/weights/resnet18_cifar10 ] || $PY -m weights_convert --model=resnet18_cifar \
  --checkpoint=../shared/data/weights/resnet18_cifar10/resnet18_cifar10.safetensors \
  --mean=0.4914,0.4822,0.4465 --std=0.2470,0.2435,0.2616 --out=runs/weights/resnet18_cifar10
R18="--model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 --batch_size=250
  --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar"
for method in ${METHODS:-qdrop brecq}; do
  for setting in ${SETTINGS:-4:4 4:8 2:4}; do
    w=${setting%:*}; a=${setting#*:}
    $PY -m experiments.ptq $R18 --w_bits=$w --a_bits=$a --reconstruct=$method --recon_iterations=$ITERATIONS \
      --recon_batch_size=$RECON_BATCH --workdir=runs/r18c10_w${w}a${a}_${method}_${ITERATIONS}_b${RECON_BATCH}
  done
done
