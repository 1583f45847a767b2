"""The vmapped sensitivity sweep against a per-configuration Python loop, side by side.

    python -m benchmarks.sensitivity_bench [--images=256] [--bits=4,6,8]

resnet18_cifar (random weights; timing does not depend on values), every conv/dense layer at
every bit width. The loop is what one writes without eqjax's "policy is data": each
single-layer configuration baked into its own jitted function (bits and the layer as Python
constants), so every configuration compiles. Prints wall times, compilation counts, the ratio
and the largest difference of the L2 scores.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqjax import models
from eqjax.quant import apply, policy as policy_lib
from eqjax.algorithms import sensitivity


def per_configuration_loop(model, variables, policy, images, layers, bits) -> np.ndarray:
    """L2 scores [layers, bits] the way one writes them without eqjax's "policy is data": each
    single-layer configuration baked into its own jitted function (layer and bits as Python
    constants), so every configuration compiles."""
    out = np.zeros((len(layers), len(bits)))
    for i, name in enumerate(layers):
        for j, b in enumerate(bits):
            lq = policy[name]

            def single(v, xb, name=name, b=b, lq=lq):
                one = {name: lq._replace(w_bits=jnp.int32(b), a_bits=jnp.int32(b))}
                fp = sensitivity._forward_recording(model, v, None, xb, None)[1][name]  # (output, call index)
                qv = apply.quantize_weights(v, one)
                _, diffs = sensitivity._forward_recording(model, qv, one, xb, {name: fp})
                return jnp.sum(diffs[name])

            f = jax.jit(single)
            out[i, j] = np.sqrt(sum(float(f(variables, xb)) for xb in images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--bits", default="4,6,8")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="configurations vmapped together (default: 1 on CPU, 8 else)")
    args = parser.parse_args()
    bits = tuple(int(b) for b in args.bits.split(","))
    spec = models.get("resnet18_cifar")
    model, calls = spec.build(), spec.trace()
    variables = spec.init(jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (args.images, 32, 32, 3), jnp.float32))
    y = np.zeros(args.images, np.int64)
    batches = lambda: [(x[i:i + args.batch_size], y[i:i + args.batch_size])
                       for i in range(0, args.images, args.batch_size)]
    stats = apply.collect_activation_stats(model, variables, [b for b, _ in batches()],
                                           apply.init_activation_stats(calls))
    base = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=8, keep_first_last_bits=None), stats)
    layers = [c.name for c in calls]
    print(f"device: {jax.devices()[0].device_kind}, {len(layers)} layers x {len(bits)} bits, "
          f"{args.images} images")

    start = time.perf_counter()
    swept = sensitivity.sweep_sensitivity(model, variables, base, batches(), layers=layers, bits=bits,
                                          batch_size=args.batch_size, chunk_size=args.chunk_size)
    t_sweep = time.perf_counter() - start

    start = time.perf_counter()
    loop_l2 = per_configuration_loop(model, variables, base, [xb for xb, _ in batches()], layers, bits)
    compilations = loop_l2.size
    t_loop = time.perf_counter() - start
    diff = float(np.max(np.abs(loop_l2 - swept.scores["l2"]) / np.maximum(loop_l2, 1e-12)))
    print(f"vmapped sweep (chunk {args.chunk_size or 'default'}): {t_sweep:7.1f} s, 1 compilation")
    print(f"per-config loop: {t_loop:7.1f} s, {compilations} compilations")
    print(f"speed-up {t_loop / t_sweep:.2f}x, max relative L2 difference {diff:.1e}")


if __name__ == "__main__":
    main()
