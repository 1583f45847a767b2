"""eqjax.quantize and friends: eqs. (3)-(4), hand-computed cases, gradients, compilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax.quant import numerics


def test_eq4_scale_and_grid_by_hand():
    # max|x| = 14, 4 bits: s = 14/7 = 2; x/s = [3.5, -7, 1.8, 0, -0.5] -> [4, -7, 2, 0, -0]
    # (round half to even).
    x = jnp.array([7.0, -14.0, 3.6, 0.0, -1.0], jnp.float32)
    q, s = eqjax.quantize_int(x, 4)
    np.testing.assert_allclose(s, 2.0, rtol=1e-7)
    np.testing.assert_array_equal(q, [4, -7, 2, 0, 0])
    np.testing.assert_allclose(eqjax.quantize(x, 4), [8.0, -14.0, 4.0, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("value, expected", [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2),
                                             (-2.5, -2), (0.49, 0), (0.51, 1)])
def test_round_half_to_even(value, expected):
    q, _ = eqjax.quantize_int(jnp.array([value], jnp.float32), 8, scale=1.0)
    assert int(q[0]) == expected


def test_both_clamp_ends_signed_and_unsigned():
    x = jnp.array([-1000.0, -128.0, -129.0, 127.0, 128.0, 1000.0], jnp.float32)
    q, _ = eqjax.quantize_int(x, 8, scale=1.0)
    np.testing.assert_array_equal(q, [-128, -128, -128, 127, 127, 127])
    qu, _ = eqjax.quantize_int(jnp.array([-3.0, 0.0, 255.0, 256.0], jnp.float32), 8, scale=1.0,
                               signed=False)
    assert qu.dtype == jnp.uint8
    np.testing.assert_array_equal(qu, [0, 0, 255, 255])


def test_unsigned_grid_uses_all_levels_of_nonnegative_data():
    x = jnp.linspace(0.0, 3.0, 1000, dtype=jnp.float32)
    q, s = eqjax.quantize_int(x, 4, signed=False)
    np.testing.assert_allclose(s, 3.0 / 15.0, rtol=1e-6)
    assert int(q.max()) == 15 and int(q.min()) == 0


def test_all_zero_tensor_has_finite_scale_and_quantizes_to_zero():
    x = jnp.zeros((3, 4), jnp.float32)
    q, s = eqjax.quantize_int(x, 8, axis=0)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    np.testing.assert_array_equal(q, 0)
    np.testing.assert_array_equal(eqjax.quantize(x, 8), x)
    grad = jax.grad(lambda v: eqjax.quantize(v, 8).sum())(x)
    assert np.all(np.isfinite(grad))


def test_fake_quant_equals_integer_arithmetic():
    x = jax.random.normal(jax.random.key(0), (16, 8, 3, 3), jnp.float32)
    for bits in (2, 4, 6, 8, 12, 16):
        q, s = eqjax.quantize_int(x, bits, axis=0)
        np.testing.assert_array_equal(eqjax.quantize(x, bits, axis=0),
                                      eqjax.dequantize(q, s, axis=0))


def _numpy_reference(x, bits, axis, signed):
    """eqs. (3)-(4) in NumPy float64, written from the paper, not from eqjax: (x̂, s, x/s)."""
    x = np.asarray(x, np.float64)
    q_min, q_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    magnitude = np.abs(x) if signed else np.maximum(x, 0)
    reduce = tuple(i for i in range(x.ndim) if i != axis) if axis is not None else None
    peak = magnitude.max(axis=reduce, keepdims=True)
    s = np.where(peak > 0, peak, 1.0) / q_max
    return s * np.clip(np.round(x / s), q_min, q_max), s, x / s, (q_min, q_max)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quant_matches_an_independent_numpy_reference_under_jit(signed, axis):
    x = np.asarray(jax.random.normal(jax.random.key(7), (5, 6, 4), jnp.float32)) * np.arange(1, 7)[None, :, None]
    x = x if signed else np.abs(x) * (np.arange(5) % 2)[:, None, None]  # non-negative, some zeros
    for bits in range(2, 17):
        got = np.asarray(jax.jit(lambda v, b: eqjax.quantize(v, b, axis=axis, signed=signed))(x, jnp.int32(bits)))
        expected, s, _, _ = _numpy_reference(x, bits, axis, signed)
        # float32 computation against float64: one grid step apart at most where x/s sits on a .5 tie.
        off = np.abs(got - expected) > 1e-5 * np.abs(expected).max()
        assert off.mean() < 0.01, (bits, off.sum())
        np.testing.assert_allclose(got[~off], expected[~off], rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradients_match_the_ste_and_lsq_formulas_per_channel(bits):
    """d/dx = 1 inside the grid, 0 outside; d/ds_c = Σ_{i in c} g_i·(round(x/s) − x/s inside, q_min
    below, q_max above) (LSQ, Esser et al. 2020, eq. 3); the clip c = s·q_max gets d/ds / q_max."""
    x = np.asarray(jax.random.normal(jax.random.key(8), (6, 5), jnp.float32)) * np.arange(1, 6)
    g = np.asarray(jax.random.normal(jax.random.key(9), (6, 5), jnp.float32))
    _, s_ref, _, (q_min, q_max) = _numpy_reference(x, bits, 1, True)
    scale = (s_ref[0] * 0.6).astype(np.float32)  # clips the largest values of every channel
    loss = lambda v, s: jnp.sum(eqjax.quantize(v, bits, scale=s, axis=1) * g)
    grad_x, grad_s = jax.grad(loss, argnums=(0, 1))(x, scale)
    ratio = x / scale.astype(np.float64)
    inside = (ratio >= q_min) & (ratio <= q_max)
    assert (~inside).any() and inside.any()
    np.testing.assert_array_equal(np.asarray(grad_x), np.where(inside, g, 0.0))
    d_scale = np.where(ratio < q_min, q_min, np.where(ratio > q_max, q_max, np.round(ratio) - ratio))
    np.testing.assert_allclose(np.asarray(grad_s), (g * d_scale).sum(axis=0), rtol=1e-4, atol=1e-4)
    # Per tensor, through the clip c = s·q_max of calibrated activations: d/dc = d/ds / q_max.
    s0 = jnp.float32(scale[0])
    grad_s0 = jax.grad(lambda s: jnp.sum(eqjax.quantize(x, bits, scale=s) * g))(s0)
    grad_clip = jax.grad(lambda c: jnp.sum(numerics.quantize_clipped(jnp.asarray(x), bits, c) * g))(s0 * q_max)
    np.testing.assert_allclose(float(grad_clip), float(grad_s0) / q_max, rtol=1e-4)


def test_per_channel_equals_each_channel_alone():
    x = jax.random.normal(jax.random.key(1), (5, 7, 6), jnp.float32) * jnp.arange(1, 7, dtype=jnp.float32)[None, None, :]
    per_channel = eqjax.quantize(x, 4, axis=-1)
    for c in range(6):
        np.testing.assert_array_equal(per_channel[..., c], eqjax.quantize(x[..., c], 4))


def test_error_decreases_with_bits():
    x = jax.random.normal(jax.random.key(2), (4096,), jnp.float32)
    errors = [float(jnp.mean((eqjax.quantize(x, b) - x) ** 2)) for b in (8, 6, 4)]
    assert errors[0] < errors[1] < errors[2]


def test_bf16_input_keeps_dtype_and_values():
    x = jax.random.normal(jax.random.key(3), (64,), jnp.bfloat16)
    y = eqjax.quantize(x, 8)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    # Computed in float32 and cast back: the float32 result rounded to bf16.
    expected = eqjax.quantize(x.astype(jnp.float32), 8).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


def test_ste_gradient_identity_inside_zero_outside():
    x = jnp.array([-3.0, -0.4, 0.0, 0.3, 0.7, 2.0], jnp.float32)
    # scale 0.1 at 4 bits: grid [-0.8, 0.7] -> -3.0 and 2.0 are outside.
    grad = jax.grad(lambda v: jnp.sum(eqjax.quantize(v, 4, scale=0.1) * 2.0))(x)
    np.testing.assert_array_equal(grad, [0.0, 2.0, 2.0, 2.0, 2.0, 0.0])


def test_lsq_scale_gradient_by_hand():
    # x/s = [2.4, 9.0, -20.0] at 4 bits, grid [-8, 7]: d/ds = [round(2.4)-2.4, 7, -8].
    x = jnp.array([0.24, 0.9, -2.0], jnp.float32)
    grad = jax.grad(lambda s: jnp.sum(eqjax.quantize(x, 4, scale=s)))(jnp.float32(0.1))
    np.testing.assert_allclose(grad, (2.0 - 2.4) + 7.0 - 8.0, rtol=1e-5)
    assert np.isfinite(grad)


def test_per_channel_scale_gradient_has_scale_shape():
    w = jax.random.normal(jax.random.key(4), (3, 3, 4, 8), jnp.float32)
    scale = numerics.absmax_scale(w, 4, axis=-1) * 0.5
    grad = jax.grad(lambda s: jnp.sum(eqjax.quantize(w, 4, scale=s, axis=-1) ** 2))(scale)
    assert grad.shape == (8,) and np.all(np.isfinite(grad))


def test_one_compilation_serves_all_bit_widths():
    x = jax.random.normal(jax.random.key(5), (128,), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(v, bits):
        return eqjax.quantize(v, bits)

    outputs = [f(x, jnp.int32(b)) for b in range(2, 9)]
    for b, out in zip(range(2, 9), outputs):
        np.testing.assert_array_equal(out, eqjax.quantize(x, b))


def test_vmap_over_bits():
    x = jax.random.normal(jax.random.key(6), (32,), jnp.float32)
    bits = jnp.arange(2, 9, dtype=jnp.int32)
    swept = jax.vmap(lambda b: eqjax.quantize(x, b))(bits)
    for i, b in enumerate(range(2, 9)):
        np.testing.assert_array_equal(swept[i], eqjax.quantize(x, b))


def test_traced_invalid_bits_and_scale_give_nan_not_crash():
    x = jnp.ones((4,), jnp.float32)
    assert np.all(np.isnan(jax.jit(eqjax.quantize)(x, jnp.int32(1))))
    assert np.all(np.isnan(jax.jit(eqjax.quantize)(x, jnp.int32(17))))
    bad_scale = jax.jit(lambda v, s: eqjax.quantize(v, 8, scale=s))(x, jnp.float32(-1.0))
    assert np.all(np.isnan(bad_scale))


def test_nan_stays_nan_and_inf_clamps():
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5], jnp.float32)
    y = eqjax.quantize(x, 8, scale=0.01)
    assert np.isnan(y[0])
    np.testing.assert_allclose(y[1:], [1.27, -1.28, 0.5], rtol=1e-6)


@pytest.mark.parametrize("bits, error", [(1, ValueError), (17, ValueError), (8.0, TypeError),
                                         (True, TypeError), ("8", TypeError),
                                         (np.int32(20), ValueError),
                                         (jnp.array(0, jnp.int32), ValueError),
                                         (jnp.array(8.0), TypeError),
                                         (jnp.array([8, 8], jnp.int32), ValueError)])
def test_bad_bits(bits, error):
    with pytest.raises(error, match="bits"):
        eqjax.quantize(jnp.ones((2,), jnp.float32), bits)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scale_values(scale):
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        eqjax.quantize(jnp.ones((2,), jnp.float32), 8, scale=scale)


def test_bad_scale_shape_and_axis_and_dtype():
    x = jnp.ones((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"scale must have shape .*\[3\]"):
        eqjax.quantize(x, 8, scale=jnp.ones((2,), jnp.float32), axis=1)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        eqjax.quantize(x, 8, axis=2)
    with pytest.raises(TypeError, match="floating-point"):
        eqjax.quantize(jnp.ones((2,), jnp.int32), 8)
    with pytest.raises(TypeError, match="integer array"):
        eqjax.dequantize(jnp.ones((2,), jnp.float32), 1.0)


def test_quantize_clipped_matches_quantize_and_takes_data_grids():
    x = jax.random.normal(jax.random.key(7), (4, 5), jnp.float32)
    clip = jnp.max(jnp.abs(x))
    np.testing.assert_array_equal(numerics.quantize_clipped(x, 6, clip), eqjax.quantize(x, 6))
    relu = jax.nn.relu(x)
    unsigned = numerics.quantize_clipped(relu, jnp.int32(4), jnp.max(relu), signed=jnp.array(False))
    np.testing.assert_array_equal(unsigned, eqjax.quantize(relu, 4, signed=False))
    grad = jax.grad(lambda c: jnp.sum(numerics.quantize_clipped(x, 4, c) ** 2))(clip * 0.5)
    assert grad.shape == () and np.isfinite(grad)
