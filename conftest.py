"""Test configuration (set before JAX starts): strict numerics, several fake CPU devices, the
scripts' XLA:CPU defaults (``experiments.xla_cpu``), and one persistent compilation cache for the
whole test run.

The tests build the same small models in many tests and in the CLI subprocesses they start;
each new closure or process would compile the same XLA program again. A session-wide cache
(shared with the subprocesses through the environment) compiles each program once: one
training test measured 107 s of CPU without it and 61 s with it, cold. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache across runs; otherwise the session's
cache is a temporary folder removed at exit.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
from experiments import xla_cpu  # noqa: E402  (no JAX import; the scripts' XLA:CPU defaults)

xla_cpu.apply_defaults()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="eqjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
