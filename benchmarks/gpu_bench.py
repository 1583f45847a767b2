"""Evaluation throughput, calibration and sensitivity times on an accelerator (or the CPU).

    python -m benchmarks.gpu_bench [--models=resnet18_cifar,deit_tiny,resnet18,efficientnet_lite0]
                                   [--batch=256] [--dtypes=float32,bfloat16]

Random weights and random images: the timings do not depend on the values. Per model and
compute dtype, img/s of the full-precision forward and of the quantized forward that
``experiments.ptq`` runs (weights quantized once, activations fake-quantized at every layer
input; W8A8 — other widths run the same compiled code, bits are data). Then, in float32:
calibration (256 images: statistics + clips) and the sensitivity sweep (every weighted layer
× {4, 6, 8}, 64 images), each first call (compile included) and a second call.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import eqjax
from benchmarks.common import median_seconds
from eqjax import models


def _images(spec, n: int, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), spec.example_input(n).shape, jnp.float32))


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def throughput(name: str, batch: int, dtype_name: str, repeats: int) -> None:
    """Prints img/s of the FP forward and of the W8A8 quantized forward in ``dtype_name``."""
    spec = models.get(name)
    dtype = jnp.dtype(dtype_name)
    model = spec.build(dtype=dtype)
    variables = spec.init(jax.random.key(0))
    x = _images(spec, batch)
    calib = [x[i:i + 64] for i in range(0, min(batch, 256), 64)]
    policy = eqjax.calibrate(spec.build(), variables, calib, eqjax.PTQConfig(w_bits=8, a_bits=8))
    apply_fn, state = eqjax.quantize_model(model, variables, policy)
    x_dev = jnp.asarray(x, dtype)
    fp = jax.jit(lambda v, x: model.apply(v, x))
    quant = jax.jit(apply_fn)
    t_fp = median_seconds(lambda: fp(variables, x_dev), repeats=repeats)
    t_q = median_seconds(lambda: quant(state, x_dev), repeats=repeats)
    print(f"{name:18s} {dtype_name:8s} batch {batch:4d}: FP {batch / t_fp:9.0f} img/s, "
          f"W8A8 quantized {batch / t_q:9.0f} img/s (time ratio {t_q / t_fp:.2f})", flush=True)


def calibration_and_sweep(name: str) -> None:
    """Prints calibration (256 images) and sensitivity-sweep (64 images) times, first and second call."""
    spec = models.get(name)
    model = spec.build()
    variables = spec.init(jax.random.key(0))
    x = _images(spec, 256)
    batches = [x[i:i + 64] for i in range(0, 256, 64)]
    config = eqjax.PTQConfig(w_bits=8, a_bits=8)
    times = [_timed(lambda: eqjax.calibrate(model, variables, batches, config)) for _ in range(2)]
    print(f"{name:18s} calibration, 256 images: first {times[0]:6.2f} s, second {times[1]:6.2f} s", flush=True)
    policy = eqjax.calibrate(model, variables, batches, config)
    labelled = [(x[:64], np.zeros(64, np.int64))]
    layers = [n for n, lq in policy.items() if bool(lq.w_enabled)]
    times = [_timed(lambda: eqjax.sweep(model, variables, policy, labelled, batch_size=64).scores["l2"])
             for _ in range(2)]
    print(f"{name:18s} sensitivity sweep, {len(layers)} layers x 3 widths, 64 images: "
          f"first {times[0]:6.2f} s, second {times[1]:6.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18_cifar,deit_tiny,resnet18,efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sweep_models", default="resnet18_cifar,deit_tiny")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}", flush=True)
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            batch = args.batch * 4 if name == "resnet18_cifar" else args.batch
            throughput(name, batch, dtype_name, args.repeats)
    for name in filter(None, args.sweep_models.split(",")):
        calibration_and_sweep(name)


if __name__ == "__main__":
    main()
