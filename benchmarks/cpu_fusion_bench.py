"""FP32 and quantized forwards under XLA:CPU's YNNPACK fusion settings, side by side.

    python -m benchmarks.cpu_fusion_bench [--models=deit_tiny,resnet18_cifar,efficientnet_lite0]

XLA:CPU (jax 0.10) hands matrix products to YNNPACK and, by default, fuses their elementwise
and reduction producers into the same YNNPACK call (``__ynn_fusion`` in the compiled HLO): in
DeiT-Tiny's FP32 forward each LayerNorm goes into the qkv / fc1 product and each softmax
normalisation into softmax·V. A fake-quantized forward has rounding and clamping between them,
which YNNPACK does not take, so its products run alone. Each setting runs
``benchmarks.ptq_eval_bench`` in a fresh process (XLA flags are read at start-up):

* ``default``: no flag;
* ``individual_dot``: ``--xla_cpu_experimental_ynn_fusion_type=individual_dot`` (products alone);
* ``off``: ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusion).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SETTINGS = {"default": None,  # XLA's own default (experiments.xla_cpu not applied)
            "individual_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
            "off": "--xla_cpu_experimental_ynn_fusion_type="}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit_tiny,resnet18_cifar,efficientnet_lite0")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"--settings: unknown {setting!r}; known: {', '.join(SETTINGS)}")
        env = dict(os.environ)
        flags = [f for f in (env.get("XLA_FLAGS"), SETTINGS[setting]) if f]
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # a cached executable would ignore the flag
        env["EQJAX_XLA_CPU_DEFAULTS"] = "0"
        print(f"== {setting}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.ptq_eval_bench", f"--models={args.models}",
                        f"--repeats={args.repeats}"], env=env, check=True)


if __name__ == "__main__":
    main()
