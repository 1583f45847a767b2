"""One-pass sensitivity (Fisher, Hessian) against the direct sweep and a per-configuration loop,
side by side on the same images: wall time and rank agreement.

    python -m benchmarks.second_order_bench --model=resnet18_cifar \
        --weights=runs/weights/resnet18_cifar10 --calib_dataset=tar:../shared/data/cifar10/train.tar
    python -m benchmarks.second_order_bench --model=efficientnet_lite0 --weights=package \
        --calib_dataset=folder:../shared/data/imagenet/calib --loop=false

Every weighted layer × {4, 6, 8} on --images calibration images (labels used). Times include
compilation (what a user waits for). Agreement: Spearman rank correlation, over layers, of the
one-pass Δloss at 4 bits (weights and inputs at 4) with the sweep's measured Δloss and KL at 4
bits. The loop is benchmarks.sensitivity_bench's: one jitted function per configuration.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from scipy import stats as scipy_stats

import eqjax
from benchmarks import sensitivity_bench
from eqjax import data, models
from eqjax.algorithms import second_order
from experiments import common


def add_workload_flags(parser: argparse.ArgumentParser, *, images: int) -> None:
    """The flags of :func:`load_workload` (model, weights, calibration images)."""
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--weights", default="runs/weights/resnet18_cifar10")
    parser.add_argument("--calib_dataset", default="tar:../shared/data/cifar10/train.tar")
    parser.add_argument("--images", type=int, default=images)


def load_workload(args: argparse.Namespace, *, batch_size: int):
    """``(model, variables, batches, policy, layers)``: the model of ``args``, ``args.images``
    calibration images (seed 0) as ``(images, labels)`` NumPy batches, a W8A8 policy calibrated
    on them (every layer, first and last included) and its layers with quantized weights."""
    spec = models.get(args.model)
    variables, num_classes, pre, *_ = common.load_weights(args.model, args.weights)
    model = spec.build(num_classes=num_classes)
    source = data.open_dataset(args.calib_dataset)
    indices = data.calibration_indices(source, args.images, seed=0)
    batches = [(np.asarray(x), np.asarray(y)) for x, y in
               data.iterate_batches(source, indices, pre, batch_size=batch_size)]
    policy = eqjax.calibrate(model, variables, [x for x, _ in batches],
                             eqjax.PTQConfig(w_bits=8, a_bits=8, keep_first_last_bits=None))
    layers = [n for n, lq in policy.items() if bool(lq.w_enabled)]
    return model, variables, batches, policy, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_flags(parser, images=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--micro_batch", default="8", help="images per Fisher sample; a comma list times each")
    parser.add_argument("--methods", default="fisher,hessian")
    parser.add_argument("--loop", default="true", choices=["true", "false"])
    args = parser.parse_args()
    bits = (4, 6, 8)
    model, variables, batches, policy, layers = load_workload(args, batch_size=args.batch_size)
    print(f"{args.model}: {len(layers)} layers x {len(bits)} widths, {args.images} images, "
          f"device {jax.devices()[0].device_kind}", flush=True)

    start = time.perf_counter()
    swept = eqjax.sweep(model, variables, policy, batches, layers=layers, bits=bits, batch_size=args.batch_size)
    t_sweep = time.perf_counter() - start
    print(f"direct sweep: {t_sweep:7.1f} s", flush=True)
    t_loop = None
    if args.loop == "true":
        start = time.perf_counter()
        sensitivity_bench.per_configuration_loop(model, variables, policy, [x for x, _ in batches], layers, bits)
        t_loop = time.perf_counter() - start
    if t_loop:
        print(f"per-configuration loop: {t_loop:7.1f} s ({len(layers) * len(bits)} compilations)", flush=True)
    measured = {m: swept.scores[m][:, 0] for m in ("delta_loss", "kl")}
    runs = [(method, int(m)) for method in args.methods.split(",") for m in args.micro_batch.split(",")]
    for method, micro_batch in runs:
        start = time.perf_counter()
        est = second_order.estimate(model, variables, policy, batches, layers=layers, bits=bits, method=method,
                                    micro_batch=micro_batch)
        t = time.perf_counter() - start
        ours = est.same_width_table()[:, 0]
        rho = {m: scipy_stats.spearmanr(ours, v).statistic for m, v in measured.items()}
        loop = f", {t_loop / t:5.1f}x faster than the loop" if t_loop else ""
        print(f"{method:8s} (micro-batch {micro_batch}) one pass: {t:7.1f} s ({t_sweep / t:5.1f}x faster than the sweep{loop}); "
              f"Spearman at 4 bits vs measured delta_loss {rho['delta_loss']:.3f}, vs KL {rho['kl']:.3f}; "
              f"weight share of the 4-bit estimate {np.sum(est.weight[:, 0]) / np.sum(ours):.2f}", flush=True)


if __name__ == "__main__":
    main()
