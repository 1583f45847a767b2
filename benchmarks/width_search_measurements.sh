#!/usr/bin/env bash
# Learned widths against the budget MILP of the one-pass Fisher estimate and uniform widths, after
# QAT of the same length (BUILD_NOTES, "Learned bit widths"), on the shared data; each run is
# skipped when finished and resumed when killed (rerun this script).
#   MODELS="r18 lite0" bash benchmarks/width_search_measurements.sh [RUNS_DIR]   (default MODELS=r18)
# Budgets = the relative energies of uniform W4A4 and W3A3 (every layer, paper energy model).
# Every layer is free in all methods (--keep_first_last_bits=0; experiments.mixed allocates every
# layer). The learned runs search one epoch, then train the rest at the fixed widths; the others
# train the same number of epochs at theirs (the same steps and images in all);
# --width_init=fisher starts the search from the Fisher MILP's widths.
# r18: ResNet-18 (shared CIFAR-10 checkpoint), 5,000 images of train.tar, batch 128 (39 steps an
#   epoch), two epochs; all 10,000 test images; about 1 h 20 min on 2 CPU cores.
# lite0: EfficientNet-Lite0 trained on the 256 calibration images with distillation (batch 32,
#   8 steps an epoch), three epochs, MSE estimators; all 1,790 val images; about 2 h.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/width_search}
. benchmarks/workloads.sh  # PY, the converted ResNet-18 at R18_WEIGHTS
DATA=../shared/data
qat() {  # NAME FLAGS...: one experiments.qat run in RUNS/NAME, resumed when it has checkpoints
  local name=$1; shift
  grep -qs '"finished": true' "$RUNS/$name/qat/results.json" && return
  local resume=""
  [ -d "$RUNS/$name/qat" ] && resume=--resume
  $PY -m experiments.qat "$@" $resume --workdir="$RUNS/$name" > "$RUNS/$name.log" 2>&1 || echo "$name failed (see $RUNS/$name.log)"
}
compare() {  # PREFIX MODEL BUDGET BITS EPOCHS "WORKLOAD" "TRAIN" NUM_CLASSES: the rows of one budget
  local prefix=$1 model=$2 budget=$3 bits=$4 epochs=$5 workload=$6 train=$7
  if [ ! -f "$RUNS/${prefix}fisher_w$bits/mixed/results.json" ]; then
    $PY -m experiments.mixed $workload --strategy=budget --sensitivity_method=fisher --separate_widths \
      --bit_set=2,3,4,6,8 --budget="$budget" --workdir="$RUNS/${prefix}fisher_w$bits" \
      > "$RUNS/${prefix}fisher_w$bits.log" 2>&1 || echo "${prefix}fisher_w$bits failed"
  fi
  local search="--learn_bits --budget=$budget --keep_first_last_bits=0 --candidate_bits=2,3,4,6,8 --search_epochs=1"
  qat "${prefix}learned_w$bits" $workload $train $search --epochs=$((epochs - 1))
  qat "${prefix}learned_warm_w$bits" $workload $train $search --epochs=$((epochs - 1)) --width_init=fisher
  qat "${prefix}fisher_qat_w$bits" $workload $train --bits_json="$RUNS/${prefix}fisher_w$bits/mixed/results.json" \
    --epochs="$epochs"
  qat "${prefix}uniform_w$bits" $workload $train --bits="$bits" --keep_first_last_bits=0 --epochs="$epochs"
  for run in learned learned_warm fisher_qat uniform; do  # the energy of the written policy, recomputed
    local result="$RUNS/$prefix${run}_w$bits/qat/results.json"
    [ -f "$result" ] && $PY -m experiments.energy --model="$model" --num_classes="$8" --bits_json="$result" \
      --workdir="$RUNS/${prefix}energy_${run}_w$bits" > "$RUNS/${prefix}energy_${run}_w$bits.log" 2>&1
  done
  return 0
}
mkdir -p "$RUNS"
for model in ${MODELS:-r18}; do
  case $model in
    r18)
      WORKLOAD="--model=resnet18_cifar --weights=$R18_WEIGHTS --calib_dataset=tar:$DATA/cifar10/train.tar
        --dataset=tar:$DATA/cifar10/test.tar --batch_size=250"
      TRAIN="--train_dataset=tar:$DATA/cifar10/train.tar --train_batch_size=128 --train_images=5000
        --learning_rate=2e-5 --step_learning_rate=2e-4 --log_every=10"
      compare "" resnet18_cifar 0.10505 4 2 "$WORKLOAD" "$TRAIN" 10
      compare "" resnet18_cifar 0.07825 3 2 "$WORKLOAD" "$TRAIN" 10 ;;
    lite0)
      WORKLOAD="--model=efficientnet_lite0 --calib_dataset=folder:$DATA/imagenet/calib
        --dataset=folder:$DATA/imagenet/val --batch_size=50 --calib_method=mse --weight_method=mse"
      TRAIN="--train_dataset=folder:$DATA/imagenet/calib --train_batch_size=32 --distill_weight=1
        --learning_rate=2e-5 --step_learning_rate=2e-4 --weight_decay=0 --log_every=4"
      compare lite0_ efficientnet_lite0 0.11456 4 3 "$WORKLOAD" "$TRAIN" 1000
      compare lite0_ efficientnet_lite0 0.08565 3 3 "$WORKLOAD" "$TRAIN" 1000 ;;
    *) echo "unknown model $model (r18, lite0)"; exit 2 ;;
  esac
done
$PY -m experiments.pareto --results="$RUNS/*/qat/results.json" --workdir="$RUNS" > "$RUNS/pareto.log" 2>&1
$PY -m benchmarks.width_search_table "$RUNS"
