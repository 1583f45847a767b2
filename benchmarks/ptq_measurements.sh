#!/usr/bin/env bash
# Round-to-nearest PTQ figures of BUILD_NOTES ("PTQ and the energy model"). Run from the repo root.
set -eu
. benchmarks/workloads.sh  # PY, R18 and LITE0 (the two workloads' flags)
for b in 8 6 4; do
  $PY -m experiments.ptq $R18 --bits=$b --workdir=runs/r18c10_w${b}a${b}
done
for m in absmax percentile mse; do for b in 8 6 4; do
  $PY -m experiments.ptq $LITE0 --bits=$b --calib_method=$m --workdir=runs/lite0_w${b}a${b}_$m
done; done
$PY -m experiments.ptq $LITE0 --bits=4 --calib_method=mse --weight_method=mse --workdir=runs/lite0_w4a4_mse_wmse
