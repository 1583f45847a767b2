"""Quantized forward against the FP32 forward, measured side by side (target ratio <= 1.3).

    python -m benchmarks.ptq_eval_bench [--models=resnet18_cifar,efficientnet_lite0,deit_tiny]

Random weights, calibrated on random images (timing does not depend on the values).
"quantized" is what experiments.ptq runs per batch: weights quantized once beforehand,
activations fake-quantized at every layer input; "weights each call" also re-quantizes
every kernel inside the forward.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import median_seconds
from eqjax import models
from eqjax.quant import apply, policy as policy_lib

BATCH = {"resnet18_cifar": 256, "efficientnet_lite0": 32, "deit_tiny": 32, "resnet18": 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18_cifar,efficientnet_lite0,deit_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")
    for name in args.models.split(","):
        spec = models.get(name)
        model, calls = spec.build(), spec.trace()
        variables = spec.init(jax.random.key(0))
        batch = BATCH.get(name, 32)
        x = jax.random.normal(jax.random.key(1), spec.example_input(batch).shape, jnp.float32)
        stats = apply.collect_activation_stats(model, variables, [x], apply.init_activation_stats(calls))
        policy = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=8), stats)
        qvars = jax.jit(apply.quantize_weights)(variables, policy)
        fp32 = jax.jit(model.apply)
        quant = jax.jit(lambda v, p, x: apply.quantized_apply(model, v, p, x, quantize_kernels=False))
        every = jax.jit(lambda v, p, x: apply.quantized_apply(model, v, p, x))
        t_fp = median_seconds(lambda: fp32(variables, x), repeats=args.repeats)
        t_q = median_seconds(lambda: quant(qvars, policy, x), repeats=args.repeats)
        t_e = median_seconds(lambda: every(variables, policy, x), repeats=args.repeats)
        print(f"{name:20s} batch {batch:3d}: fp32 {t_fp * 1e3:8.1f} ms, quantized {t_q * 1e3:8.1f} ms "
              f"(ratio {t_q / t_fp:.2f}), weights each call {t_e * 1e3:8.1f} ms (ratio {t_e / t_fp:.2f})")


if __name__ == "__main__":
    main()
