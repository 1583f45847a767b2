#!/usr/bin/env bash
# Integer deployment (BUILD_NOTES.md "Integer deployment"): the integer artifact, the integer JAX
# forward and ONNX Runtime against the fake-quant evaluation. ResNet-18 (CIFAR stem, shared
# CIFAR-10 checkpoint; 256 calibration images of train.tar, all 10,000 test images, batch 250)
# and EfficientNet-Lite0 (package weights; 256 images of imagenet/calib, all 1,790 of
# imagenet/val, batch 64); latency at batch 1 and 32. Every row also runs the artifact through
# Qwix (--qwix); the W8A8 rows also run the full-integer ONNX graph (--quantize_residuals), with
# int8 ONNX weights where the CPU has VNNI (exact there; uint8 elsewhere). Repo root.
# ROWS (default r18_w8a8 r18_w4a4_brecq r18_w4a4_brecq_int4 lite0_w8a8); the int4 row, and the
# BRECQ row with REUSE=1, reuse the BRECQ row's reconstructed state.
set -eu
. benchmarks/workloads.sh
BRECQ="--bits=4 --reconstruct=brecq --recon_iterations=300 --recon_batch_size=16 --qwix"
STATE=runs/deploy_r18_w4a4_brecq/deploy/reconstruction
W8=uint8
grep -qw -E "avx512_vnni|avx_vnni" /proc/cpuinfo && W8=int8
FULL="--bits=8 --qwix --quantize_residuals --weight_type=$W8"
for row in ${ROWS:-r18_w8a8 r18_w4a4_brecq r18_w4a4_brecq_int4 lite0_w8a8}; do
  case $row in
    r18_w8a8) args="$R18 $FULL" ;;
    r18_w4a4_brecq) args="$R18 $BRECQ"; [ "${REUSE:-0}" = 1 ] && args="$args --recon_state=$STATE" ;;
    r18_w4a4_brecq_int4) args="$R18 $BRECQ --recon_state=$STATE --weight_type=int4" ;;
    lite0_w8a8) args="$LITE0 $FULL" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  $PY -m experiments.deploy $args --workdir=runs/deploy_$row
done
