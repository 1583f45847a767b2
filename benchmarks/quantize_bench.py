"""Fake-quantization throughput against a plain elementwise op, measured side by side.

    python -m benchmarks.quantize_bench [--size=4096] [--repeats=20]

Prints the median time of each jitted function on a [size, size] float32 array
and the ratio to ``x * 2 + 1`` (one fused elementwise pass, the floor for any
elementwise op). Bits are passed as a traced array, as in every eqjax sweep.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import eqjax
from benchmarks.common import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    bits = jnp.int32(8)
    scale = eqjax.quant.numerics.absmax_scale(x, 8)
    candidates = {
        "elementwise x*2+1": (jax.jit(lambda v: v * 2.0 + 1.0), (x,)),
        "quantize, given scale": (jax.jit(lambda v, b, s: eqjax.quantize(v, b, scale=s)), (x, bits, scale)),
        "quantize, absmax per tensor": (jax.jit(lambda v, b: eqjax.quantize(v, b)), (x, bits)),
        "quantize, absmax per channel": (jax.jit(lambda v, b: eqjax.quantize(v, b, axis=1)), (x, bits)),
        "grad of quantize (STE)": (jax.jit(jax.grad(lambda v, b, s: jnp.sum(eqjax.quantize(v, b, scale=s)))),
                                   (x, bits, scale)),
    }
    print(f"device: {jax.devices()[0].device_kind}, array [{args.size}, {args.size}] float32")
    base = None
    for name, (fn, fn_args) in candidates.items():
        seconds = median_seconds(lambda: fn(*fn_args), repeats=args.repeats)
        base = base or seconds
        gelems = args.size * args.size / seconds / 1e9
        print(f"{name:32s} {seconds * 1e3:8.2f} ms  {gelems:6.2f} Gelem/s  ratio {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
