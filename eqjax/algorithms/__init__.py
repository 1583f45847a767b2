"""Algorithms over the quantization layer: pure functions of (params, policy, data), optax where
they optimize.

  ``energy``             the analytical energy model (eq. 7) and its presets
  ``sensitivity``        the direct per-layer sweep (eq. 5)
  ``second_order``       one-pass Fisher / Hutchinson sensitivity
  ``mixed_precision``    percentile (eq. 6) and energy-budget allocation
  ``allocation``         separate weight/activation widths under several budgets
  ``ranking`` / ``ranking_core``               ranking-aware PTQ for ViTs
  ``reconstruction`` / ``reconstruction_core``  AdaRound, BRECQ, QDrop
  ``vit_quant``          log / twin quantizers and RepQ reparameterization for ViTs
  ``qat``                quantization-aware training with learned step sizes (LSQ, LSQ+)
  ``width_search``       bit widths learned under a budget (eq. 2 by gradient descent)
  ``pareto``             accuracy–energy fronts
  ``metrics``            sharded top-1 / top-5 evaluation
"""
