#!/usr/bin/env bash
# Issue 13 measurements (BUILD_NOTES.md): reconstruction PTQ against round-to-nearest, ResNet-18
# (CIFAR stem) with the shared CIFAR-10 checkpoint: 256 calibration images of train.tar, all
# 10,000 test images. Repo root. ITERATIONS (default 500) per unit; METHODS (default qdrop brecq);
# RECON_BATCH (default 32) images per step; SETTINGS (default 4:4 4:8 2:4, as w_bits:a_bits).
set -eu
ITERATIONS=${ITERATIONS:-500}
RECON_BATCH=${RECON_BATCH:-32}
. benchmarks/workloads.sh
for method in ${METHODS:-qdrop brecq}; do
  for setting in ${SETTINGS:-4:4 4:8 2:4}; do
    w=${setting%:*}; a=${setting#*:}
    $PY -m experiments.ptq $R18 --w_bits=$w --a_bits=$a --reconstruct=$method --recon_iterations=$ITERATIONS \
      --recon_batch_size=$RECON_BATCH --workdir=runs/r18c10_w${w}a${a}_${method}_${ITERATIONS}_b${RECON_BATCH}
  done
done
