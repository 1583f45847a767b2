#!/usr/bin/env bash
# Issue 16 measurements (BUILD_NOTES.md): budgeted mixed precision from the one-pass Fisher
# estimate against the same from the direct sweep, at equal relative energy, and W/A-separate
# widths against same widths. Repo root. PARTS (default "r18 lite0"); BUDGETS_R18, BUDGETS_LITE0.
# Time and rank agreement: python -m benchmarks.second_order_bench (see its docstring).
set -eu
PY=.venv/bin/python
[ -d runs/weights/resnet18_cifar10 ] || $PY -m weights_convert --model=resnet18_cifar \
  --checkpoint=../shared/data/weights/resnet18_cifar10/resnet18_cifar10.safetensors \
  --mean=0.4914,0.4822,0.4465 --std=0.2470,0.2435,0.2616 --out=runs/weights/resnet18_cifar10
R18="--model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 --batch_size=250
  --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar"
LITE0="--model=efficientnet_lite0 --weights=package --batch_size=64
  --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val"

compare() {  # compare NAME "FLAGS" "BUDGETS": sensitivities by both methods, then a policy per budget
  local name=$1 flags=$2 budgets=$3
  for method in sweep fisher; do
    [ -f runs/so_${name}_$method/sensitivity/results.json ] || \
      $PY -m experiments.sensitivity $flags --method=$method --workdir=runs/so_${name}_$method
  done
  for budget in $budgets; do
    for method in sweep fisher; do
      $PY -m experiments.mixed $flags --strategy=budget --budget=$budget \
        --sensitivity_json=runs/so_${name}_$method/sensitivity/results.json --workdir=runs/so_${name}_${method}_b$budget
    done
  done
}

for part in ${PARTS:-r18 lite0}; do
  case $part in
    r18) compare r18 "$R18" "${BUDGETS_R18:-0.11 0.12}" ;;
    lite0)
      compare lite0 "$LITE0" "${BUDGETS_LITE0:-0.15 0.2}"
      # W/A-separate widths at the relative energy of uniform W6A6 (first/last layers at 8 bits).
      W6A6=$($PY -c "
from eqjax import energy, models
spec = models.get('efficientnet_lite0')
counts = energy.count_layers(spec.build(), spec.example_input(1))
first, last = spec.first_and_last_layers()
bits = {c.name: {'w': 8 if c.name in (first, last) else 6, 'a': 8 if c.name in (first, last) else 6} for c in counts}
print(round(energy.relative_energy(counts, bits, energy.PRESETS['paper']), 5))")
      for separate in --noseparate_widths --separate_widths; do
        $PY -m experiments.mixed $LITE0 --strategy=budget --budget=$W6A6 $separate \
          --sensitivity_json=runs/so_lite0_fisher/sensitivity/results.json --workdir=runs/so_lite0_w6a6_energy$separate
      done ;;
  esac
done
$PY - <<'EOF'
import glob, json
for path in sorted(glob.glob("runs/so_*/mixed/results.json")):
    r = json.load(open(path))
    c = r["config"]
    print(f"{path.split('/')[1]:40s} {c['sensitivity_method'] if not c['sensitivity_json'] else c['sensitivity_json'].split('/')[1]:22s} "
          f"separate {c['separate_widths']!s:5s} budget {r['budget']:.4f} energy {r['energy']['relative']:.4f} "
          f"top-1 {r['top1']:.2f} (FP32 {r['fp32_top1']:.2f}) {r['layer_counts_by_bits']}")
EOF
