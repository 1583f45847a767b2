"""Mixed precision by sensitivity percentiles (the study's eq. 6, Table 3) or under an energy budget (eq. 2).

    python -m experiments.mixed --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --strategy=budget --budget=percentile

--strategy=percentile: S_l (--metric at --sensitivity_bits) >= P75 -> 8 bits, P25..P75 -> 6,
< P25 -> 4. --strategy=budget: bits from --bit_set minimising the summed --cost_metric
(each layer's score at its own bits) subject to relative energy <= --budget; --budget=percentile
uses the percentile policy's energy, so the two compare at equal energy. Sensitivities come
from one sweep on the calibration images, or from a one-pass estimate
(--sensitivity_method=fisher|hessian), or --sensitivity_json from experiments.sensitivity.
With an estimate, --separate_widths gives weights and activations their own widths per layer
(W4A8 and the like), and --max_gbops, --max_weight_mb, --max_avg_weight_bits add budgets
beside the energy; those allocations are solved exactly as a MILP (eqjax.algorithms.allocation).
Evaluates like experiments.ptq; writes WORKDIR/mixed/results.json and mixed.png.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
from absl import flags

from eqjax import ptq
from eqjax.quant import policy as policy_lib
from eqjax.algorithms import allocation as allocation_lib, energy, mixed_precision as mp
from eqjax.algorithms import second_order, sensitivity
from eqjax.algorithms import reconstruction as reconstruction_lib
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    flags.DEFINE_enum("strategy", "percentile", ["percentile", "budget"], "Allocation rule.")
    flags.DEFINE_string("budget", "0.15", "Relative energy budget (E/E_FP32), or 'percentile' (--strategy=budget only).")
    flags.DEFINE_list("bit_set", ["4", "6", "8"], "Candidate bit widths.")
    flags.DEFINE_enum("sensitivity_method", "sweep", ["sweep", *second_order.METHODS],
                      "sweep (exact), or a one-pass estimate: fisher or hessian (experiments.sensitivity --method).")
    flags.DEFINE_integer("micro_batch", 8, "fisher/hessian: images per weight-gradient sample (8 suits CPU; "
                         "on a GPU 64 is several times faster).")
    flags.DEFINE_bool("separate_widths", False, "Weights and activations get their own widths per layer "
                      "(needs --sensitivity_method=fisher|hessian and --strategy=budget).")
    flags.DEFINE_float("max_gbops", None, "Extra budget: giga bit-operations (MACs x w_bits x a_bits).")
    flags.DEFINE_float("max_weight_mb", None, "Extra budget: weight storage in MB (biases as float32).")
    flags.DEFINE_float("max_avg_weight_bits", None, "Extra budget: average bits per weight.")
    flags.DEFINE_enum("metric", None, list(sensitivity.METRICS), "Sensitivity ranking of the percentile rule "
                      "(default l2 for the sweep, delta_loss for an estimate).")
    flags.DEFINE_integer("sensitivity_bits", 4, "Bit width at which the percentile rule ranks layers.")
    flags.DEFINE_enum("cost_metric", None, ["l2", "rel_l2", "kl", "delta_loss"], "Cost minimised under a "
                      "budget (default kl for the sweep, delta_loss for an estimate).")
    flags.DEFINE_integer("matmul_bits", 8, "Bits of the attention matmul operands (not allocated).")
    flags.DEFINE_string("sensitivity_json", None, "Reuse a results.json of experiments.sensitivity.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/mixed/.")
    workload_lib.define_reconstruction_flags()
    workload_lib.define_bias_correction_flags()


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedRunConfig:
    """A mixed-precision run. ``budget``: a relative energy in (0, 1], ``'percentile'`` (the
    percentile policy's energy) or None; used with ``strategy='budget'`` only."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig  # estimators (bits come from the allocation)
    strategy: str = "percentile"
    budget: float | str | None = None
    bit_set: tuple[int, ...] = (4, 6, 8)
    sensitivity_method: str = "sweep"
    micro_batch: int = 8
    separate_widths: bool = False
    extra_budgets: tuple[tuple[str, float], ...] = ()  # (allocation.BUDGET_KINDS name, bound)
    metric: str | None = None  # default l2 (sweep) / delta_loss (estimate)
    sensitivity_bits: int = 4
    cost_metric: str | None = None  # default kl (sweep) / delta_loss (estimate)
    matmul_bits: int = 8
    sensitivity_json: str | None = None
    workdir: str = "runs/default"
    reconstruction: reconstruction_lib.ReconstructionConfig | None = None
    recon_state: str | None = None
    fold_batchnorm: bool = False
    bias_correction: bool = False

    def __post_init__(self):
        estimate = self.sensitivity_method != "sweep"
        if self.sensitivity_method not in ("sweep", *second_order.METHODS):
            raise ValueError(f"--sensitivity_method must be sweep, fisher or hessian, got {self.sensitivity_method!r}")
        for name, default in (("metric", "l2"), ("cost_metric", "kl")):
            if getattr(self, name) is None:
                if not self.sensitivity_json:  # else: set by what the file holds, in run()
                    object.__setattr__(self, name, "delta_loss" if estimate else default)
            elif estimate and getattr(self, name) != "delta_loss":
                raise ValueError(f"--sensitivity_method={self.sensitivity_method} estimates delta_loss only; "
                                 f"--{name}={getattr(self, name)} needs --sensitivity_method=sweep")
        if self.separate_widths and not (estimate or self.sensitivity_json):
            raise ValueError("--separate_widths needs per-width weight and activation terms: "
                             "--sensitivity_method=fisher or hessian (or their --sensitivity_json)")
        if (self.separate_widths or self.extra_budgets) and self.strategy != "budget":
            raise ValueError("--separate_widths and --max_* budgets need --strategy=budget")
        for kind, bound in self.extra_budgets:
            if kind not in allocation_lib.BUDGET_KINDS or not bound > 0:
                raise ValueError(f"extra budget {kind}={bound}: kind must be one of "
                                 f"{allocation_lib.BUDGET_KINDS} and the bound > 0")
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
        sensitivity_method=FLAGS.sensitivity_method, micro_batch=FLAGS.micro_batch,
        separate_widths=FLAGS.separate_widths,
        extra_budgets=tuple((kind, FLAGS[f"max_{kind}"].value) for kind in ("gbops", "weight_mb", "avg_weight_bits")
                            if FLAGS[f"max_{kind}"].value is not None),
        metric=FLAGS.metric, sensitivity_bits=FLAGS.sensitivity_bits, cost_metric=FLAGS.cost_metric,
        matmul_bits=FLAGS.matmul_bits, sensitivity_json=FLAGS.sensitivity_json, workdir=FLAGS.workdir,
        reconstruction=workload_lib.reconstruction_config_from_flags(), recon_state=FLAGS.recon_state,
        fold_batchnorm=FLAGS.fold_batchnorm, bias_correction=FLAGS.bias_correction)


def _load_sensitivity(path, model, layers, *, need_separate: bool):
    """``(SensitivityResult, SecondOrderResult or None)`` from an experiments.sensitivity results.json."""
    payload = common.read_results_json(path, flag="--sensitivity_json")
    if payload.get("model") != model:
        raise ValueError(f"--sensitivity_json={path} is for model {payload.get('model')!r}, not {model!r}")
    s = payload["sensitivity"]
    missing = [n for n in layers if n not in s["layers"]]
    if missing:
        raise ValueError(f"--sensitivity_json={path} lacks layers: {', '.join(missing[:10])}")
    sens = sensitivity.SensitivityResult(tuple(s["layers"]), tuple(s["bits"]),
                                         {m: np.asarray(v) for m, v in s["scores"].items()}, s["num_images"])
    e = payload.get("second_order")
    if need_separate and not e:
        raise ValueError(f"--separate_widths needs a one-pass estimate, but --sensitivity_json={path} holds a "
                         f"{payload.get('method', 'sweep')} result")
    if not e:
        return sens, None
    return sens, second_order.SecondOrderResult(tuple(e["layers"]), tuple(e["bits"]), np.asarray(e["weight"]),
                                                np.asarray(e["activation"]), e["method"], e["num_images"])


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
             log: Callable[[str], None], estimate: second_order.SecondOrderResult | None = None
             ) -> tuple[dict[str, Any], float | None, dict | None]:
    """``({layer: bits or (w_bits, a_bits)}, budget, MILP report or None)`` by the percentile rule,
    the energy-budgeted knapsack, or (separate widths, several budgets) the MILP."""
    bit_set = config.bit_set
    percentile = mp.percentile_bits({n: v for n, v in sens.table(config.metric, config.sensitivity_bits).items()
                                     if n in layers}, thresholds=mp.percentile_thresholds(bit_set))
    if config.strategy == "percentile":
        return percentile, None, None
    energy_model = energy.get_preset(config.workload.energy_preset)
    budget = config.budget
    if budget == "percentile":
        table = {**{n: {"w": b, "a": b} for n, b in percentile.items()}, **matmuls}
        budget = energy.energy_report(counts, table, energy_model)["relative"]
        log(f"budget = the percentile policy's relative energy {budget:.4f}")
    cost = {n: [sens.table(config.cost_metric, b)[n] for b in bit_set] for n in layers}
    if not (config.separate_widths or config.extra_budgets):
        allocation = mp.budget_bits(cost, counts, budget=budget, bit_set=bit_set, fixed_bits=matmuls,
                                    model=energy_model)["bits"]
        return allocation, budget, None
    if config.separate_widths:
        absent = [b for b in bit_set if b not in estimate.bits]
        if absent:
            raise ValueError(f"--bit_set has widths {absent} that the estimate lacks (it has {list(estimate.bits)})")
        rows = {n: i for i, n in enumerate(estimate.layers)}
        columns = [estimate.bits.index(b) for b in bit_set]
        cost = {n: estimate.weight[rows[n], columns][:, None] + estimate.activation[rows[n], columns][None, :]
                for n in layers}
    else:  # the sweep's same-width cost; only the diagonal is allowed (same_width)
        cost = {n: np.repeat(np.asarray(c, np.float64)[:, None], len(bit_set), axis=1) for n, c in cost.items()}
    report = allocation_lib.allocate(cost, counts, budgets={"relative_energy": budget, **dict(config.extra_budgets)},
                                     w_bits=bit_set, a_bits=bit_set, same_width=not config.separate_widths,
                                     fixed_bits=matmuls, energy_model=energy_model)
    log("allocation: " + ", ".join(f"{k} {v:.4g} of {report['budgets'][k]:.4g}" for k, v in report["usage"].items()))
    return {n: (b["w"], b["a"]) for n, b in report["bits"].items()}, budget, report


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
    if config.extra_budgets:  # the same for the other budgets (a zero cost: only feasibility is checked)
        k = len(config.bit_set)
        allocation_lib.allocate({n: np.zeros((k, k)) for n in layers}, counts, budgets=dict(config.extra_budgets),
                                w_bits=config.bit_set, a_bits=config.bit_set, same_width=not config.separate_widths,
                                fixed_bits=matmuls, energy_model=energy.get_preset(config.workload.energy_preset))

    stats, calibration_s = work.collect_stats()
    estimate = None
    if config.sensitivity_json:
        sens, estimate = _load_sensitivity(config.sensitivity_json, work.spec.name, layers,
                                           need_separate=config.separate_widths)
        # results.json names the method that made the file, not the flag's default
        config = dataclasses.replace(config, sensitivity_method=estimate.method if estimate else "sweep")
    elif config.sensitivity_method == "sweep":
        sens = work.sweep(stats, config.ptq, config.bit_set)
    else:
        estimate = work.second_order(stats, config.ptq, config.bit_set, method=config.sensitivity_method,
                                     micro_batch=config.micro_batch)
        sens = estimate.as_sensitivity()
    for name, default in (("metric", "l2"), ("cost_metric", "kl")):
        chosen = getattr(config, name) or ("delta_loss" if estimate else default)
        if chosen not in sens.scores:
            raise ValueError(f"--{name}={chosen} is not in --sensitivity_json={config.sensitivity_json}, "
                             f"which holds {', '.join(sens.scores)}")
        config = dataclasses.replace(config, **{name: chosen})
    allocation, budget, report = allocate(config, sens, layers, counts, matmuls, log, estimate)
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
    label = lambda b: f"W{b[0]}A{b[1]}" if isinstance(b, tuple) else str(b)
    counts_by_bits = {label(b): sum(1 for n in layers if allocation[n] == b) for b in sorted(set(allocation.values()))}
    result = work.base_result("mixed", {
        **dataclasses.asdict(config.ptq), "strategy": config.strategy, "budget": config.budget,
        "bit_set": list(config.bit_set), "sensitivity_method": config.sensitivity_method,
        "micro_batch": config.micro_batch, "separate_widths": config.separate_widths,
        "extra_budgets": dict(config.extra_budgets), "metric": config.metric, "sensitivity_bits": config.sensitivity_bits,
        "cost_metric": config.cost_metric, "matmul_bits": config.matmul_bits,
        "sensitivity_json": config.sensitivity_json, "workdir": config.workdir,
        "reconstruct": config.reconstruction.method if config.reconstruction else "none",
        "recon_state": config.recon_state, "fold_batchnorm": config.fold_batchnorm,
        "bias_correction": config.bias_correction})
    result.update({
        "bits": bits, "layer_counts_by_bits": counts_by_bits, "budget": budget,
        "w_bits": "mixed", "a_bits": "mixed",
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "energy": work.energy_of(bits), "sensitivity": sens.to_dict(),
        "second_order": estimate.to_dict() if estimate else None, "allocation": report, "reconstruction": recon_info,
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "quantized_eval": quant["seconds"], "total": time.perf_counter() - started},
    })
    if budget is not None and result["energy"]["relative"] > budget:  # the allocators hold it exactly
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
