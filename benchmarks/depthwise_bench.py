"""Depthwise convolution: lax.conv_general_dilated against eqjax's shift-and-add path.

    python -m benchmarks.depthwise_bench

Shapes are EfficientNet-Lite0 depthwise layers at batch 32 (NHWC, 'SAME' padding).
Prints the median time of each, their ratio and the largest difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.common import median_seconds
from eqjax.models import ops

# (spatial size, channels, kernel, stride)
SHAPES = ((112, 96, 3, 2), (56, 144, 3, 1), (28, 240, 5, 1), (14, 672, 5, 1), (7, 1152, 3, 1))


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}, batch 32, float32")
    for size, channels, kernel, stride in SHAPES:
        x = jax.random.normal(jax.random.key(0), (32, size, size, channels), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, channels), jnp.float32)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        reference = jax.jit(lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=dn, feature_group_count=channels))
        fast = jax.jit(lambda x, w: ops.depthwise_shift_add(x, w, (stride, stride), "SAME"))
        diff = float(jnp.max(jnp.abs(reference(x, w) - fast(x, w))))
        t_ref = median_seconds(lambda: reference(x, w), repeats=5)
        t_fast = median_seconds(lambda: fast(x, w), repeats=5)
        print(f"{size:3d}x{size:<3d} C={channels:4d} k={kernel} s={stride}: lax {t_ref * 1e3:8.1f} ms, "
              f"shift-add {t_fast * 1e3:7.1f} ms, speed-up {t_ref / t_fast:5.1f}x, max diff {diff:.1e}")


if __name__ == "__main__":
    main()
