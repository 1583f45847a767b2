"""eqjax's experiment scripts (``python -m experiments.<name>``).

Importing the package sets the XLA:CPU defaults of :mod:`experiments.xla_cpu` before any script
module imports JAX.
"""

from experiments import xla_cpu

xla_cpu.apply_defaults()
