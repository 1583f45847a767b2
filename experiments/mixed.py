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

import dataclasses
import json
import time
from typing import Any, Callable

import numpy as np
from absl import flags

from eqjax import energy, mixed_precision as mp, policy as policy_lib, ptq, sensitivity
from eqjax import reconstruction as reconstruction_lib
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    flags.DEFINE_enum("strategy", "percentile", ["percentile", "budget"], "Allocation rule.")
    flags.DEFINE_string("budget", "0.15", "Relative energy budget (E/E_FP32), or 'percentile' (--strategy=budget only).")
    flags.DEFINE_list("bit_set", ["4", "6", "8"], "Candidate bit widths.")
    flags.DEFINE_enum("metric", "l2", list(sensitivity.METRICS), "Sensitivity ranking of the percentile rule.")
    flags.DEFINE_integer("sensitivity_bits", 4, "Bit width at which the percentile rule ranks layers.")
    flags.DEFINE_enum("cost_metric", "kl", ["l2", "rel_l2", "kl", "delta_loss"], "Cost minimised under a budget.")
    flags.DEFINE_integer("matmul_bits", 8, "Bits of the attention matmul operands (not allocated).")
    flags.DEFINE_string("sensitivity_json", None, "Reuse a results.json of experiments.sensitivity.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/mixed/.")
    workload_lib.define_reconstruction_flags()


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedRunConfig:
    """A mixed-precision run. ``budget``: a relative energy in (0, 1], ``'percentile'`` (the
    percentile policy's energy) or None; used with ``strategy='budget'`` only."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig  # estimators (bits come from the allocation)
    strategy: str = "percentile"
    budget: float | str | None = None
    bit_set: tuple[int, ...] = (4, 6, 8)
    metric: str = "l2"
    sensitivity_bits: int = 4
    cost_metric: str = "kl"
    matmul_bits: int = 8
    sensitivity_json: str | None = None
    workdir: str = "runs/default"
    reconstruction: reconstruction_lib.ReconstructionConfig | None = None
    recon_state: str | None = None
    fold_batchnorm: bool = False
    bias_correction: bool = False

    def __post_init__(self):
        if self.strategy not in ("percentile", "budget"):
            raise ValueError(f"--strategy must be percentile or budget, got {self.strategy!r}")
        if self.strategy == "budget" and self.budget is None:
            raise ValueError("--strategy=budget needs --budget (a relative energy or 'percentile')")
        if self.strategy != "budget" and self.budget is not None:
            raise ValueError(f"--budget={self.budget} is used by --strategy=budget only; "
                             f"--strategy={self.strategy} would ignore it")
        if isinstance(self.budget, float) and not 0 < self.budget <= 1:
            raise ValueError(f"--budget must be in (0, 1], got {self.budget}")
        if isinstance(self.budget, str) and self.budget != "percentile":
            raise ValueError(f"--budget must be a number or 'percentile', got {self.budget!r}")
        if self.sensitivity_bits not in self.bit_set:
            raise ValueError(f"--sensitivity_bits={self.sensitivity_bits} is not in --bit_set")
        workload_lib.parse_bits([str(self.matmul_bits)], "matmul_bits")


def _budget_flag() -> float | str | None:
    if not FLAGS["budget"].present and FLAGS.strategy != "budget":
        return None
    if FLAGS.budget == "percentile":
        return "percentile"
    try:
        return float(FLAGS.budget)
    except ValueError:
        raise ValueError(f"--budget must be a number or 'percentile', got {FLAGS.budget!r}") from None


def config_from_flags() -> MixedRunConfig:
    return MixedRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(w_bits=8, a_bits=8, keep_first_last_bits=None),
        strategy=FLAGS.strategy, budget=_budget_flag(), bit_set=workload_lib.parse_bits(FLAGS.bit_set, "bit_set"),
        metric=FLAGS.metric, sensitivity_bits=FLAGS.sensitivity_bits, cost_metric=FLAGS.cost_metric,
        matmul_bits=FLAGS.matmul_bits, sensitivity_json=FLAGS.sensitivity_json, workdir=FLAGS.workdir,
        reconstruction=workload_lib.reconstruction_config_from_flags(), recon_state=FLAGS.recon_state,
        fold_batchnorm=FLAGS.fold_batchnorm, bias_correction=FLAGS.bias_correction)


def _load_sensitivity(path, model, layers):
    with open(path) as f:
        payload = json.load(f)
    if payload.get("model") != model:
        raise ValueError(f"--sensitivity_json={path} is for model {payload.get('model')!r}, not {model!r}")
    s = payload["sensitivity"]
    missing = [n for n in layers if n not in s["layers"]]
    if missing:
        raise ValueError(f"--sensitivity_json={path} lacks layers: {', '.join(missing[:10])}")
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


def allocate(config: MixedRunConfig, sens: sensitivity.SensitivityResult, layers, counts, matmuls,
             log: Callable[[str], None]) -> tuple[dict[str, int], float | None]:
    """``({layer: bits}, budget)`` by the percentile rule or the energy-budgeted knapsack."""
    bit_set = config.bit_set
    percentile = mp.percentile_bits({n: v for n, v in sens.table(config.metric, config.sensitivity_bits).items()
                                     if n in layers}, thresholds=mp.percentile_thresholds(bit_set))
    if config.strategy == "percentile":
        return percentile, None
    energy_model = energy.get_preset(config.workload.energy_preset)
    budget = config.budget
    if budget == "percentile":
        table = {**{n: {"w": b, "a": b} for n, b in percentile.items()}, **matmuls}
        budget = energy.energy_report(counts, table, energy_model)["relative"]
        log(f"budget = the percentile policy's relative energy {budget:.4f}")
    cost = {n: [sens.table(config.cost_metric, b)[n] for b in bit_set] for n in layers}
    allocation = mp.budget_bits(cost, counts, budget=budget, bit_set=bit_set, fixed_bits=matmuls,
                                model=energy_model)["bits"]
    return allocation, budget


def run(config: MixedRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Allocates bits per layer, evaluates; writes WORKDIR/mixed/results.json and mixed.png."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "mixed")
    work = workload_lib.open_workload(config.workload, log=log)
    if config.fold_batchnorm:
        work.fold_batchnorm()
    layers = work.layers
    matmul_names = [c.name for c in work.calls if c.kind == "matmul"]
    matmuls = {n: {"w": None, "a": config.matmul_bits} for n in matmul_names}
    counts = energy.count_layers(work.model, work.spec.example_input(1))
    if isinstance(config.budget, float):  # fail before long work
        smallest = mp.minimum_budget(counts, matmuls, layers, config.bit_set,
                                     energy.get_preset(config.workload.energy_preset))
        if config.budget < smallest:
            raise ValueError(f"--budget={config.budget} is below the smallest feasible relative energy "
                             f"{smallest:.4f} (every layer at {min(config.bit_set)} bits)")

    stats, calibration_s = work.collect_stats()
    if config.sensitivity_json:
        sens = _load_sensitivity(config.sensitivity_json, work.spec.name, layers)
    else:
        sens = work.sweep(stats, config.ptq, config.bit_set)
    allocation, budget = allocate(config, sens, layers, counts, matmuls, log)
    base = ptq.build_policy(work.calls, dataclasses.replace(config.ptq, w_bits=8, a_bits=8,
                                                             keep_first_last_bits=None, rules=()))
    policy = work.calibrated(stats, config.ptq, policy_lib.set_bits(
        base, {**allocation, **{n: config.matmul_bits for n in matmul_names}}))
    state, recon_info = work.quantized_state(policy, config.ptq, config.reconstruction, out=out,
                                             load_from=config.recon_state, bias_correction=config.bias_correction)
    policy = state.policy
    fp32 = work.evaluate_fp32()
    quant = work.evaluate_quantized(state, f"mixed-{config.strategy}")
    bits = policy_lib.bits_table(policy)
    counts_by_bits = {str(b): sum(1 for n in layers if allocation[n] == b) for b in sorted(set(allocation.values()))}
    result = work.base_result("mixed", {
        **dataclasses.asdict(config.ptq), "strategy": config.strategy, "budget": config.budget,
        "bit_set": list(config.bit_set), "metric": config.metric, "sensitivity_bits": config.sensitivity_bits,
        "cost_metric": config.cost_metric, "matmul_bits": config.matmul_bits,
        "sensitivity_json": config.sensitivity_json, "workdir": config.workdir,
        "reconstruct": config.reconstruction.method if config.reconstruction else "none",
        "recon_state": config.recon_state, "fold_batchnorm": config.fold_batchnorm,
        "bias_correction": config.bias_correction})
    result.update({
        "bits": bits, "layer_counts_by_bits": counts_by_bits, "budget": budget,
        "w_bits": "mixed", "a_bits": "mixed",
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "energy": work.energy_of(bits), "sensitivity": sens.to_dict(), "reconstruction": recon_info,
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "quantized_eval": quant["seconds"], "total": time.perf_counter() - started},
    })
    if budget is not None and result["energy"]["relative"] > budget + 1e-9:
        raise AssertionError(f"allocation exceeds the budget: {result['energy']['relative']} > {budget}")
    _plot(f"{out}/mixed.png", {n: bits[n] for n in layers}, f"{work.spec.name}: mixed precision ({config.strategy})")
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    r = run(config_from_flags())
    budget = r["budget"]
    print(f"{r['model']} mixed ({r['config']['strategy']}): bits {r['layer_counts_by_bits']}, top-1 {r['top1']:.2f}% "
          f"(FP32 {r['fp32_top1']:.2f}%), energy {r['energy']['relative']:.4f} of FP32"
          + (f" (budget {budget:.4f})" if budget is not None else "") + f" -> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
