#!/usr/bin/env bash
# QAT figures of BUILD_NOTES ("Quantization-aware training"), on the shared data, in order of
# priority; each run resumes if killed (rerun this script). 2 CPU cores: about 2 h 20 min in all.
#   [ONLY="lite0_w4a4 lite0_w4a8"] bash benchmarks/qat_measurements.sh [RUNS_DIR]   (ONLY: those runs)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/qat}
. benchmarks/workloads.sh  # PY, the converted ResNet-18 at R18_WEIGHTS
DATA=../shared/data
run() {  # NAME FLAGS...: one experiments.qat run in RUNS/NAME, resumed when it has checkpoints
  local name=$1; shift
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return
  if [ -f "$RUNS/$name/qat/results.json" ] && grep -q '"finished": true' "$RUNS/$name/qat/results.json"; then
    return
  fi
  local resume=""
  [ -d "$RUNS/$name/qat/checkpoints" ] && resume=--resume
  $PY -m experiments.qat "$@" $resume --workdir="$RUNS/$name" > "$RUNS/$name.log" 2>&1 || echo "$name failed (see $RUNS/$name.log)"
}
mkdir -p "$RUNS"
# ResNet-18 (shared CIFAR-10 checkpoint): 10,000 training images, one epoch, all 10,000 test images.
# SGD at 2e-5 (weights) / 2e-4 (step sizes): at 2e-4 on the weights six steps already cost the
# FP32 control 8 points on held-out images (BUILD_NOTES).
R18_FLAGS="--model=resnet18_cifar --weights=$R18_WEIGHTS --train_dataset=tar:$DATA/cifar10/train.tar
  --calib_dataset=tar:$DATA/cifar10/train.tar --dataset=tar:$DATA/cifar10/test.tar --batch_size=250
  --train_batch_size=128 --train_images=10000 --epochs=1 --learning_rate=2e-5 --step_learning_rate=2e-4
  --log_every=10"
# EfficientNet-Lite0: the 256 calibration images for training, with distillation, 1,790 val
# images; MSE estimators and bias correction (its best PTQ start: 67.09 at W4A4, 7.49 without the
# correction); SGD at 1e-4 / 1e-3 (W4A4 72.12; 71.40 at 2e-5 / 2e-4); three epochs (ten over-fit:
# 71.12, training-set top-1 85.55). A Lite0 QAT step at batch 32 takes about 12 s on 2 CPU cores.
LITE0="--model=efficientnet_lite0 --train_dataset=folder:$DATA/imagenet/calib --calib_dataset=folder:$DATA/imagenet/calib
  --dataset=folder:$DATA/imagenet/val --batch_size=50 --train_batch_size=32 --epochs=3 --eval_every=3
  --calib_method=mse --weight_method=mse --bias_correction --learning_rate=1e-4 --step_learning_rate=1e-3
  --weight_decay=0 --log_every=4"
run r18_w4a4 $R18_FLAGS --bits=4
run r18_control $R18_FLAGS --control
run lite0_w4a4 $LITE0 --w_bits=4 --a_bits=4 --distill_weight=1
run lite0_w4a8 $LITE0 --w_bits=4 --a_bits=8 --distill_weight=1
run r18_w2a4 $R18_FLAGS --w_bits=2 --a_bits=4
# Options, measured once each: LSQ+ offsets and no distillation on Lite0 W4A4 (its block inputs
# are signed); BatchNorm statistics updating, folded at the end, on ResNet-18 W4A4.
run lite0_w4a4_lsqplus $LITE0 --w_bits=4 --a_bits=4 --distill_weight=1 --asymmetric
run lite0_w4a4_nodistill $LITE0 --w_bits=4 --a_bits=4
run r18_w4a4_bnupdate $R18_FLAGS --bits=4 --batchnorm=update
run r18_w3a3 $R18_FLAGS --bits=3
run r18_w2a2 $R18_FLAGS --bits=2
# Accuracy-energy fronts of every finished run beside its round-to-nearest start, one panel per model.
$PY -m experiments.pareto --results="$RUNS/*/qat/results.json" --workdir="$RUNS" > "$RUNS/pareto.log" 2>&1
