#!/usr/bin/env bash
# The ViT table (BUILD_NOTES "Vision Transformers"): every experiments.vit method at W4A4, W6A6 and
# W8A8 on the trained ViT proxy (weights/vit_tiny_cifar10, made by benchmarks/vit_gpu.sh), all
# 10,000 CIFAR-10 test images; then DeiT-Tiny with random
# weights at 224x224 (every method end to end, times per method). One run per bit width, so a
# finished width keeps its results.json. Repo root; about 1 h per width on 2 CPU cores with all
# 10,000 test images (EVAL_IMAGES; each evaluation takes about 2 min). CALIB_METHOD=mse picks the
# activation clips by MSE search instead of the study's absmax (the better setting at 4 and 6 bits).
set -eu
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/vit_table}
PARTS=${PARTS:-"4 6 8 deit"}
ALL=standard,log2,adalog,twin,reparam,ranking,qdrop,combined
for part in $PARTS; do
  if [ "$part" = deit ]; then
    $PY -m experiments.vit --model=deit_tiny --weights=random --dataset=folder:../shared/data/imagenet/val \
      --calib_dataset=folder:../shared/data/imagenet/calib --calib_images=32 --eval_images=64 --bits=4 \
      --search_images=32 --recon_iterations=20 --ranking_steps=20 --agreement_images=16 --batch_size=32 \
      --workdir="$OUT/deit_random"
  else
    $PY -m experiments.vit --model=vit_tiny_cifar --weights=weights/vit_tiny_cifar10/vit_tiny_cifar10.safetensors \
      --dataset=tar:../shared/data/cifar10/test.tar --calib_dataset=tar:../shared/data/cifar10/train.tar \
      --bits="$part" --batch_size=250 --eval_images="${EVAL_IMAGES:-10000}" --methods="${METHODS:-$ALL}" \
      --recon_iterations="${RECON_ITERATIONS:-500}" --calib_method="${CALIB_METHOD:-absmax}" \
      --workdir="$OUT/w$part${CALIB_METHOD:+_$CALIB_METHOD}"
  fi
done
