#!/usr/bin/env bash
# Issue 16 measurements (BUILD_NOTES.md): budgeted mixed precision from the one-pass Fisher
# estimate against the same from the direct sweep, at equal relative energy, and W/A-separate
# widths against same widths. Repo root. PARTS (default "r18 lite0 lite0_wa"):
#   r18, lite0   sensitivities by sweep and by Fisher, then a budgeted policy from each per budget
#                (BUDGETS_R18, default 0.11 0.12; BUDGETS_LITE0, default 0.15 0.2)
#   lite0_wa     Lite0 at the relative energy of uniform W6A6 (first/last 8 bits), from the
#                Fisher estimate: same widths against separate weight/activation widths
#   r18_figure   ResNet-18 accuracy-energy figure (runs/so_r18_figure/pareto/pareto.png): the
#                study's percentile policy, sweep- and Fisher-budgeted policies at 0.11-0.13,
#                uniform W4A4/W6A6/W8A8 (runs/r18c10_w*, from ptq_measurements.sh)
# Time and rank agreement: python -m benchmarks.second_order_bench (see its docstring).
set -eu
. benchmarks/workloads.sh

sensitivity() {  # sensitivity NAME "FLAGS" METHOD: runs/so_NAME_METHOD/sensitivity/results.json
  [ -f runs/so_$1_$3/sensitivity/results.json ] || \
    $PY -m experiments.sensitivity $2 --method=$3 --workdir=runs/so_$1_$3
}

compare() {  # compare NAME "FLAGS" "BUDGETS": a budgeted policy from each method per budget
  local name=$1 flags=$2 budgets=$3
  for budget in $budgets; do
    for method in sweep fisher; do
      sensitivity $name "$flags" $method
      $PY -m experiments.mixed $flags --strategy=budget --budget=$budget \
        --sensitivity_json=runs/so_${name}_$method/sensitivity/results.json --workdir=runs/so_${name}_${method}_b$budget
    done
  done
}

for part in ${PARTS:-r18 lite0 lite0_wa}; do
  case $part in
    r18) compare r18 "$R18" "${BUDGETS_R18:-0.11 0.12}" ;;
    lite0) compare lite0 "$LITE0" "${BUDGETS_LITE0:-0.15 0.2}" ;;
    lite0_wa)
      sensitivity lite0 "$LITE0" fisher
      W6A6=$($PY -c "
from eqjax import models
from eqjax.algorithms import energy
spec = models.get('efficientnet_lite0')
counts = energy.count_layers(spec.build(), spec.example_input(1))
pinned = spec.first_and_last_layers()
bits = {c.name: {'w': 8 if c.name in pinned else 6, 'a': 8 if c.name in pinned else 6} for c in counts}
print(round(energy.relative_energy(counts, bits, energy.PRESETS['paper']), 5))")
      for separate in --noseparate_widths --separate_widths; do
        $PY -m experiments.mixed $LITE0 --strategy=budget --budget=$W6A6 $separate \
          --sensitivity_json=runs/so_lite0_fisher/sensitivity/results.json --workdir=runs/so_lite0_w6a6_energy$separate
      done ;;
    r18_figure)
      compare r18 "$R18" "0.13"
      [ -f runs/so_r18_percentile/mixed/results.json ] || $PY -m experiments.mixed $R18 --strategy=percentile \
        --sensitivity_json=runs/so_r18_sweep/sensitivity/results.json --workdir=runs/so_r18_percentile
      $PY -m experiments.pareto --workdir=runs/so_r18_figure --results="runs/so_r18_*/mixed/results.json,\
runs/r18c10_w4a4/ptq/results.json,runs/r18c10_w6a6/ptq/results.json,runs/r18c10_w8a8/ptq/results.json" ;;
    *) echo "unknown part $part (known: r18 lite0 lite0_wa r18_figure)" >&2; exit 2 ;;
  esac
done
$PY - <<'PYEOF'
import glob, json
for path in sorted(glob.glob("runs/so_*/mixed/results.json")):
    r = json.load(open(path))
    c = r["config"]
    source = c["sensitivity_json"].split("/")[1] if c["sensitivity_json"] else c["sensitivity_method"]
    print(f"{path.split('/')[1]:40s} {source:16s} separate {c['separate_widths']!s:5s} budget {r['budget'] or float('nan'):.4f} "
          f"energy {r['energy']['relative']:.4f} top-1 {r['top1']:.2f} (FP32 {r['fp32_top1']:.2f}) "
          f"{r['layer_counts_by_bits']}")
PYEOF
