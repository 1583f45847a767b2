"""Scale estimators and running statistics on data with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax.quant import calibration


def _mse(x, bits, scale, axis=None):
    return float(jnp.mean((eqjax.quantize(x, bits, scale=scale, axis=axis) - x) ** 2))


def test_absmax_is_eq4():
    x = jnp.array([[1.0, -4.0], [2.0, 0.5]], jnp.float32)
    np.testing.assert_allclose(calibration.estimate_scale(x, 8), 4.0 / 127.0, rtol=1e-7)
    np.testing.assert_allclose(calibration.estimate_scale(x, 8, axis=1), [2.0 / 127, 4.0 / 127],
                               rtol=1e-7)


def test_percentile_ignores_an_outlier():
    x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 10001, dtype=jnp.float32),
                         jnp.array([100.0], jnp.float32)])
    s = calibration.estimate_scale(x, 8, method="percentile", percentile=99.9)
    assert 0.99 / 127 < float(s) < 1.01 / 127


def test_mse_never_worse_than_absmax_and_clips_heavy_tails():
    x = jax.random.laplace(jax.random.key(0), (20000,), jnp.float32)
    absmax = calibration.estimate_scale(x, 4)
    best = calibration.estimate_scale(x, 4, method="mse")
    assert float(best) < float(absmax)
    assert _mse(x, 4, best) < 0.8 * _mse(x, 4, absmax)


def test_mse_per_channel_matches_each_channel_alone():
    x = jax.random.laplace(jax.random.key(1), (4000, 3), jnp.float32) * jnp.array([[1.0, 5.0, 0.1]], jnp.float32)
    per_channel = calibration.mse_scale(x, 4, axis=1)
    for c in range(3):
        np.testing.assert_allclose(per_channel[c], calibration.mse_scale(x[:, c], 4), rtol=1e-6)


def test_running_stats_match_one_big_tensor():
    batches = [jax.random.normal(jax.random.key(i), (1000,), jnp.float32) * (i + 1) for i in range(5)]
    stats = calibration.init_stats(num_bins=4096)
    update = jax.jit(calibration.update_stats)
    for b in batches:
        stats = update(stats, b)
    everything = jnp.concatenate(batches)
    assert float(stats.count) == 5000.0
    np.testing.assert_allclose(float(stats.histogram.sum()), 5000.0, rtol=1e-5)
    np.testing.assert_allclose(calibration.scale_from_stats(stats, 8),
                               calibration.estimate_scale(everything, 8), rtol=1e-6)
    # The histogram resolves the percentile to within a few bins after rebinning.
    p_hist = calibration.scale_from_stats(stats, 8, method="percentile", percentile=99.0)
    p_exact = calibration.estimate_scale(everything, 8, method="percentile", percentile=99.0)
    np.testing.assert_allclose(p_hist, p_exact, rtol=0.02)
    m_hist = calibration.scale_from_stats(stats, 4, method="mse")
    m_exact = calibration.estimate_scale(everything, 4, method="mse")
    assert _mse(everything, 4, m_hist) <= 1.02 * _mse(everything, 4, m_exact)


def test_running_stats_know_nonnegative_data():
    stats = calibration.update_stats(calibration.init_stats(), jax.nn.relu(
        jax.random.normal(jax.random.key(0), (100,), jnp.float32)))
    assert bool(stats.nonnegative)
    np.testing.assert_allclose(calibration.scale_from_stats(stats, 8, signed=False),
                               float(stats.maximum) / 255.0, rtol=1e-6)
    stats = calibration.update_stats(stats, jnp.array([-1.0], jnp.float32))
    assert not bool(stats.nonnegative)


def test_bad_method_and_percentile():
    x = jnp.ones((4,), jnp.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        calibration.estimate_scale(x, 8, method="kl")
    with pytest.raises(ValueError, match="percentile must be in"):
        calibration.estimate_scale(x, 8, method="percentile", percentile=0.0)
    with pytest.raises(ValueError, match="bits must be in"):
        calibration.scale_from_stats(calibration.init_stats(), 20)
