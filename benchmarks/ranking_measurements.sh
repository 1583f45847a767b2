#!/usr/bin/env bash
# Issue 7 measurements (BUILD_NOTES.md): standard vs ranking-aware PTQ at 8/6/4 bits. Repo root.
# 1. vit_tiny_cifar trained by experiments.train on the shared CIFAR-10 archive (README command).
# 2. deit_tiny with random weights (no DeiT weights are obtainable offline) on the shared ImageNet
#    images: kept-order fraction and logit correlation (its top-1 is chance and meaningless).
set -eu
PY=.venv/bin/python
$PY -m experiments.ranking --model=vit_tiny_cifar --weights=runs/vit_c10/train/final --bits=8,6,4 \
  --dataset=tar:../shared/data/cifar10/test.tar --calib_dataset=tar:../shared/data/cifar10/train.tar \
  --eval_images=2000 --agreement_images=64 --steps=100 --batch_size=128 --workdir=runs/ranking_vit_c10
$PY -m experiments.ranking --model=deit_tiny --weights=random --bits=8,6,4 \
  --dataset=folder:../shared/data/imagenet/val --calib_dataset=folder:../shared/data/imagenet/calib \
  --calib_images=64 --eval_images=64 --agreement_images=32 --steps=30 --rank_batch_size=16 \
  --batch_size=32 --workdir=runs/ranking_deit_random
