"""Depthwise and pointwise convolutions: lax.conv_general_dilated against eqjax's CPU paths.

    python -m benchmarks.depthwise_bench

Shapes are EfficientNet-Lite0 layers (NHWC, 'SAME' padding): depthwise layers at batch 32
(shift-and-add against lax), then the first block's 1x1 expansion at batch 16 (a matrix product
against lax). Prints the median time of the forward and of the gradient (w.r.t. input and
kernel) of each, their ratios and the largest forward difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.common import median_seconds
from eqjax.models import ops

# (spatial size, channels, kernel, stride)
SHAPES = ((112, 96, 3, 2), (56, 144, 3, 1), (28, 240, 5, 1), (14, 672, 5, 1), (7, 1152, 3, 1))


def _compare(name, reference, fast, x, w) -> None:
    diff = float(jnp.max(jnp.abs(reference(x, w) - fast(x, w))))
    grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1)))
    times = [median_seconds(lambda f=f: f(x, w), repeats=5)
             for f in (jax.jit(reference), jax.jit(fast), grad(reference), grad(fast))]
    print(f"{name}: forward lax {times[0] * 1e3:8.1f} ms, eqjax {times[1] * 1e3:7.1f} ms ({times[0] / times[1]:4.1f}x); "
          f"gradient lax {times[2] * 1e3:8.1f} ms, eqjax {times[3] * 1e3:7.1f} ms ({times[2] / times[3]:4.1f}x); "
          f"max diff {diff:.1e}")


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}, float32")
    for size, channels, kernel, stride in SHAPES:
        x = jax.random.normal(jax.random.key(0), (32, size, size, channels), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, channels), jnp.float32)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        _compare(f"depthwise {size:3d}x{size:<3d} C={channels:4d} k={kernel} s={stride}, batch 32",
                 lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn,
                                                       feature_group_count=channels),
                 lambda x, w: ops.depthwise_shift_add(x, w, (stride, stride), "SAME"), x, w)
    x = jax.random.normal(jax.random.key(2), (16, 112, 112, 16), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (1, 1, 16, 96), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    conv = lambda f: (lambda x, w: f(x, w, (1, 1), "SAME", dimension_numbers=dn))
    _compare("pointwise 112x112 16->96, batch 16", conv(lax.conv_general_dilated), conv(ops.conv_general_dilated), x, w)


if __name__ == "__main__":
    main()
