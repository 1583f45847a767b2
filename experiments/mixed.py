"""Mixed precision by sensitivity percentiles (the study's eq. 6, Table 3) or under an energy budget (eq. 2).

    python -m experiments.mixed --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --strategy=budget --budget=percentile

--strategy=percentile: S_l (--metric at --sensitivity_bits) >= P75 -> 8 bits, P25..P75 -> 6,
< P25 -> 4. --strategy=budget: bits from --bit_set minimising the summed --cost_metric
(each layer's score at its own bits) subject to relative energy <= --budget; --budget=percentile
uses the percentile policy's energy, so the two compare at equal energy. Sensitivities come
from one sweep on the calibration images (or --sensitivity_json from experiments.sensitivity).
Evaluates like experiments.ptq; writes WORKDIR/mixed/results.json and mixed.png.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from eqjax import energy, mixed_precision as mp, policy as policy_lib, sensitivity
from experiments import common, setup as setup_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("strategy", "percentile", ["percentile", "budget"], "Allocation rule.")
flags.DEFINE_string("budget", "0.15", "Relative energy budget (E/E_FP32), or 'percentile'.")
flags.DEFINE_list("bit_set", ["4", "6", "8"], "Candidate bit widths.")
flags.DEFINE_enum("metric", "l2", list(sensitivity.METRICS), "Sensitivity ranking of the percentile rule.")
flags.DEFINE_integer("sensitivity_bits", 4, "Bit width at which the percentile rule ranks layers.")
flags.DEFINE_enum("cost_metric", "kl", ["l2", "rel_l2", "kl", "delta_loss"], "Cost minimised under a budget.")
flags.DEFINE_integer("matmul_bits", 8, "Bits of the attention matmul operands (not allocated).")
flags.DEFINE_string("sensitivity_json", None, "Reuse a results.json of experiments.sensitivity.")
flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/mixed/.")


def _load_sensitivity(path, model, layers):
    with open(path) as f:
        payload = json.load(f)
    if payload.get("model") != model:
        raise ValueError(f"--sensitivity_json={path} is for model {payload.get('model')!r}, not {model!r}")
    s = payload["sensitivity"]
    missing = [n for n in layers if n not in s["layers"]]
    if missing:
        raise ValueError(f"--sensitivity_json={path} lacks layers: {', '.join(missing[:10])}")
    import numpy as np

    return sensitivity.SensitivityResult(tuple(s["layers"]), tuple(s["bits"]),
                                         {m: np.asarray(v) for m, v in s["scores"].items()}, s["num_images"])


def _plot(path, bits, title):
    plt = common.pyplot()
    names = list(bits)
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(names)), 3.5))
    ax.bar(range(len(names)), [bits[n]["w"] or 0 for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_title(title)
    common.save_figure(fig, path)


def main(argv):
    del argv
    started = time.perf_counter()
    bit_set = setup_lib.parse_bits(FLAGS.bit_set, "bit_set")
    setup_lib.check_bits_flag(FLAGS.matmul_bits, "matmul_bits")
    if FLAGS.sensitivity_bits not in bit_set:
        raise ValueError(f"--sensitivity_bits={FLAGS.sensitivity_bits} is not in --bit_set")
    budget = None
    if FLAGS.strategy == "budget" and FLAGS.budget != "percentile":
        try:
            budget = float(FLAGS.budget)
        except ValueError:
            raise ValueError(f"--budget must be a number or 'percentile', got {FLAGS.budget!r}") from None
        if not 0 < budget <= 1:
            raise ValueError(f"--budget must be in (0, 1], got {budget}")
    setup = setup_lib.prepare()
    layers = list(dict.fromkeys(c.name for c in setup.calls if c.kind != "matmul"))
    matmuls = {c.name: {"w": None, "a": FLAGS.matmul_bits} for c in setup.calls if c.kind == "matmul"}
    counts = energy.count_layers(setup.model, setup.spec.example_input(1))
    energy_model = energy.get_preset(FLAGS.energy_preset)
    if budget is not None:  # fail before long work
        smallest = mp.minimum_budget(counts, matmuls, layers, bit_set, energy_model)
        if budget < smallest:
            raise ValueError(f"--budget={budget} is below the smallest feasible relative energy "
                             f"{smallest:.4f} (every layer at {min(bit_set)} bits)")

    stats, calibration_s = setup_lib.collect_stats(setup)
    if FLAGS.sensitivity_json:
        sens = _load_sensitivity(FLAGS.sensitivity_json, setup.spec.name, layers)
    else:
        sens = setup_lib.run_sweep(setup, stats, bit_set)
    percentile = mp.percentile_bits({n: v for n, v in sens.table(FLAGS.metric, FLAGS.sensitivity_bits).items()
                                     if n in layers}, thresholds=mp.percentile_thresholds(bit_set))
    to_table = lambda allocation: {**{n: {"w": b, "a": b} for n, b in allocation.items()}, **matmuls}
    if FLAGS.strategy == "percentile":
        allocation = percentile
    else:
        if budget is None:
            budget = energy.energy_report(counts, to_table(percentile), energy_model)["relative"]
            common.log(f"budget = the percentile policy's relative energy {budget:.4f}")
        cost = {n: [sens.table(FLAGS.cost_metric, b)[n] for b in bit_set] for n in layers}
        allocation = mp.budget_bits(cost, counts, budget=budget, bit_set=bit_set, fixed_bits=matmuls,
                                    model=energy_model)["bits"]
    rules = [(f"^{n.replace('.', '[.]')}$", b) for n, b in allocation.items()]
    policy = setup_lib.calibrated(setup, stats, policy_lib.build(
        setup.calls, w_bits=8, keep_first_last_bits=None, rules=rules + [(".*matmul", FLAGS.matmul_bits)],
        quantize_matmuls=FLAGS.quantize_matmuls))
    fp32 = setup_lib.evaluate_fp32(setup)
    quant = setup_lib.evaluate_policy(setup, policy, f"mixed-{FLAGS.strategy}")
    bits = policy_lib.bits_table(policy)
    counts_by_bits = {str(b): sum(1 for n in layers if allocation[n] == b) for b in sorted(set(allocation.values()))}
    result = setup_lib.base_result(setup, "mixed", ("strategy", "budget", "bit_set", "metric", "sensitivity_bits",
                                                    "cost_metric", "matmul_bits", "sensitivity_json", "workdir"))
    result.update({
        "bits": bits, "layer_counts_by_bits": counts_by_bits, "budget": budget,
        "w_bits": "mixed", "a_bits": "mixed",
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "energy": setup_lib.energy_of(setup, bits), "sensitivity": sens.to_dict(),
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "quantized_eval": quant["seconds"], "total": time.perf_counter() - started},
    })
    if budget is not None and result["energy"]["relative"] > budget + 1e-9:
        raise AssertionError(f"allocation exceeds the budget: {result['energy']['relative']} > {budget}")
    out = common.output_dir(FLAGS.workdir, "mixed")
    _plot(f"{out}/mixed.png", {n: bits[n] for n in layers}, f"{setup.spec.name}: mixed precision ({FLAGS.strategy})")
    path = common.write_json_atomic(f"{out}/results.json", result)
    print(f"{setup.spec.name} mixed ({FLAGS.strategy}): bits {counts_by_bits}, top-1 {quant['top1']:.2f}% "
          f"(FP32 {fp32['top1']:.2f}%), energy {result['energy']['relative']:.4f} of FP32"
          + (f" (budget {budget:.4f})" if budget is not None else "") + f" -> {path}")


if __name__ == "__main__":
    app.run(main)
