"""XLA:CPU settings that the scripts and the tests start with (no JAX import: set before JAX starts).

jaxlib 0.10 hands matrix products and convolutions to YNNPACK and fuses their elementwise and
reduction producers (LayerNorm, BatchNorm + ReLU, the softmax normalisation) into the same
YNNPACK call. On the 2-core CPUs here that made every FP32 forward about twice as slow
(DeiT-Tiny 1390 → 705 ms, ResNet-18 CIFAR 4246 → 1998 ms at the batch sizes of
``python -m benchmarks.cpu_fusion_bench``), and it is why DeiT-Tiny's FP32 forward was slower
than its own W8A8 one: fake quantization puts rounding between a LayerNorm and its product,
which YNNPACK does not fuse. :func:`apply_defaults` turns that fusion off.

A ``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as it is, and
``EQJAX_XLA_CPU_DEFAULTS=0`` leaves XLA's own defaults. Other jaxlib versions are left alone:
XLA stops at start-up on a flag it does not know.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib versions measured with the flag (benchmarks.cpu_fusion_bench).
KNOWN_JAXLIB = ("0.10.",)


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Adds ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusion) to ``XLA_FLAGS``.

    Call before JAX's first computation (XLA reads its flags once). Returns whether it did.
    """
    if environ.get("EQJAX_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        return False
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    if not version.startswith(KNOWN_JAXLIB):
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}=".strip()
    return True
