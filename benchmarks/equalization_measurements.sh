#!/usr/bin/env bash
# Cross-layer equalization on EfficientNet-Lite0 (BUILD_NOTES, "Reconstruction PTQ"): each setting
# with and without --equalize, 256 calibration images, all 1,790 shared val images; finished runs
# are skipped (rerun to fill in). 2 CPU cores: about 20 min.
#   bash benchmarks/equalization_measurements.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/equalization}
PY=${PYTHON:-.venv/bin/python}
DATA=../shared/data
LITE0="--model=efficientnet_lite0 --calib_dataset=folder:$DATA/imagenet/calib --dataset=folder:$DATA/imagenet/val
  --batch_size=50"
ptq() {  # NAME FLAGS...
  local name=$1; shift
  [ -f "$RUNS/$name/ptq/results.json" ] && return
  $PY -m experiments.ptq "$@" --workdir="$RUNS/$name" > "$RUNS/$name.log" 2>&1 || echo "$name failed (see $RUNS/$name.log)"
}
mkdir -p "$RUNS"
for cle in "" --equalize; do
  tag=${cle:+_cle}
  ptq w4a8_mse_bc$tag $LITE0 --w_bits=4 --a_bits=8 --weight_method=mse --bias_correction $cle
  ptq w4a4_mse_bc$tag $LITE0 --bits=4 --calib_method=mse --weight_method=mse --bias_correction $cle
  ptq w6a6_bc$tag $LITE0 --bits=6 --bias_correction $cle
done
for run in "$RUNS"/*/ptq/results.json; do
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-3], r['fp32_top1'], r['top1'])" "$run"
done
