"""The scripts' XLA:CPU defaults: YNNPACK fusion off, unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

from experiments import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A LayerNorm feeding a Dense: what jaxlib 0.10 fuses into one YNNPACK call by default.
COMPILED_FUSIONS = """
import os, sys
if sys.argv[1] == "scripts":
    import experiments  # the scripts' package applies the defaults on import
import flax.linen as nn, jax, jax.numpy as jnp
net = nn.Sequential([nn.LayerNorm(), nn.Dense(64)])
x = jnp.ones((64, 64))
text = jax.jit(net.apply).lower(net.init(jax.random.key(0), x), x).compile().as_text()
print(text.count("__ynn_fusion"))
"""


def test_apply_defaults_adds_the_flag_once_and_respects_the_user(monkeypatch):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply_defaults(environ)
    assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                    "--xla_cpu_experimental_ynn_fusion_type=")
    assert not xla_cpu.apply_defaults(environ)  # already there
    chosen = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert not xla_cpu.apply_defaults(chosen) and chosen["XLA_FLAGS"].endswith("individual_dot")
    assert not xla_cpu.apply_defaults(opted_out := {"EQJAX_XLA_CPU_DEFAULTS": "0"}) and "XLA_FLAGS" not in opted_out
    monkeypatch.setattr(xla_cpu.metadata, "version", lambda name: "0.11.0")  # a flag XLA may not know
    assert not xla_cpu.apply_defaults(unknown := {}) and unknown == {}


@pytest.mark.skipif(not xla_cpu.apply_defaults({}), reason="this jaxlib is not one the flag was measured on")
def test_the_scripts_compile_without_ynnpack_fusion_and_xla_default_fuses():
    def fusions(mode, **env):
        environ = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_ENABLE_COMPILATION_CACHE="false", **env)
        out = subprocess.run([sys.executable, "-c", COMPILED_FUSIONS, mode], cwd=ROOT, env=environ,
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert fusions("scripts") == 0
    assert fusions("plain", EQJAX_XLA_CPU_DEFAULTS="0") > 0
