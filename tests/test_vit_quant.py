"""ViT quantizers: log and twin-uniform grids, RepQ reparameterization, searches, one compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax import models
from eqjax.quant import apply, numerics
from eqjax.algorithms import reconstruction, vit_quant
from eqjax.quant import policy as policy_lib
from eqjax.quant.policy import LOG, TWIN, UNIFORM

TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)


def log_reference(x, bits, clip, base):
    """NumPy: levels clip * base^-q, q = 0 .. 2^b - 2, and zero."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    positive = x > 0
    q = np.maximum(np.round(-np.log(x[positive] / clip) / np.log(base)), 0)
    out[positive] = np.where(q < 2 ** bits - 1, clip * base ** -q, 0.0)
    return out


def twin_reference(x, bits, clip, fine_clip):
    x = np.asarray(x, np.float64)
    fine_step, coarse_step = fine_clip / 2 ** (bits - 2), clip / (2 ** (bits - 1) - 1)
    fine = np.clip(np.round(x / fine_step), -2 ** (bits - 2), 2 ** (bits - 2) - 1) * fine_step
    coarse = np.clip(np.round(x / coarse_step), 0, 2 ** (bits - 1) - 1) * coarse_step
    return np.where(x < fine_clip, fine, coarse)


@pytest.mark.parametrize("bits, base", [(4, 2.0), (8, 2.0), (4, 2 ** 0.5), (6, 2 ** (1 / 3))])
def test_log_quantizer_matches_numpy_including_zero_and_the_largest_value(bits, base):
    rng = np.random.default_rng(bits)
    below_smallest = max(base ** -(2 ** bits - 1.4), 1e-30)  # rounds past the smallest level (if float32 has it)
    x = np.concatenate([[0.0, 1.0, 0.7, below_smallest, 1.3], rng.uniform(0, 1, 200) ** 4]).astype(np.float32)
    got = np.asarray(numerics.log_quantize_clipped(jnp.asarray(x), bits, 1.0, base))
    np.testing.assert_allclose(got, log_reference(x, bits, 1.0, base), rtol=1e-5, atol=0)  # float32 powers
    assert got[0] == 0 and got[1] == 1.0 and got[4] == 1.0  # zero, the clip, above the clip
    assert got[3] == 0 or bits == 8  # below the smallest level (2^-254 at 8 bits is no float32)
    levels = np.unique(got)
    assert len(levels) <= 2 ** bits and np.all(levels[1:] > 0)
    assert np.isnan(numerics.log_quantize_clipped(jnp.asarray([-0.5]), bits, 1.0, base)).all()


def test_log_quantizer_is_straight_through_and_bits_are_data():
    grad = jax.grad(lambda x: jnp.sum(numerics.log_quantize_clipped(x, 4, 1.0, 2.0)))(jnp.asarray([0.3, 0.0, 0.9]))
    np.testing.assert_array_equal(grad, [1.0, 1.0, 1.0])
    f = jax.jit(numerics.log_quantize_clipped)
    x = jnp.asarray([0.3, 0.02, 0.9])
    for bits in (3, 4, 8):
        np.testing.assert_allclose(f(x, jnp.int32(bits), 1.0, 2.0), log_reference(x, bits, 1.0, 2.0), rtol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_twin_quantizer_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    x = np.concatenate([[-0.17, 0.0, 0.05, 4.0, 9.0, -3.0], rng.gamma(0.3, 0.5, 300) - 0.1]).astype(np.float32)
    got = np.asarray(numerics.twin_quantize_clipped(jnp.asarray(x), bits, 4.0, 0.5))
    np.testing.assert_allclose(got, twin_reference(x, bits, 4.0, 0.5), rtol=1e-6, atol=1e-7)
    assert len(np.unique(got)) <= 2 ** bits
    grads = jax.grad(lambda c, f: jnp.sum(numerics.twin_quantize_clipped(jnp.asarray(x), bits, c, f)),
                     argnums=(0, 1))(4.0, 0.5)
    assert all(np.isfinite(g) and g != 0 for g in grads)


def make_tiny_vit(bits: int):
    """(spec, model, variables, images, WbAb policy calibrated on the images) of a 2-block ViT."""
    spec = models.get("vit_tiny_cifar")
    model = spec.build(num_classes=10, **TINY_VIT)
    variables = spec.init(jax.random.key(0), num_classes=10, **TINY_VIT)
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    policy = eqjax.calibrate(model, variables, [images], eqjax.PTQConfig(w_bits=bits, a_bits=bits))
    return spec, model, variables, images, policy


@pytest.fixture(scope="module")
def tiny_vit():
    """:func:`make_tiny_vit` at W4A4."""
    return make_tiny_vit(4)


def test_with_quantizer_sets_kinds_as_data_and_rejects_bad_settings(tiny_vit):
    _, _, _, _, policy = tiny_vit
    softmax = vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS)
    gelu = vit_quant.matching_layers(policy, vit_quant.GELU_LAYERS)
    assert softmax == ["blocks.0.attn.av_matmul", "blocks.1.attn.av_matmul"] and gelu == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    new = vit_quant.with_quantizer(policy, softmax, "log", log_base=2 ** 0.5)
    new = vit_quant.with_quantizer(new, gelu, "twin", fine_ratio=0.25)
    lq = new["blocks.0.attn.av_matmul"]
    assert lq.a_kind.tolist() == [LOG, UNIFORM] and float(lq.a_log_base[0]) == pytest.approx(2 ** 0.5)
    assert new["blocks.1.mlp.fc2"].a_kind.tolist() == [TWIN] and float(new["blocks.1.mlp.fc2"].a_fine_ratio[0]) == 0.25
    assert policy["blocks.0.attn.av_matmul"].a_kind is None and new["blocks.0.attn.qkv"].a_kind is None
    with pytest.raises(ValueError, match="unknown quantizer 'log10'; known: uniform, log, twin"):
        vit_quant.with_quantizer(policy, softmax, "log10")
    with pytest.raises(ValueError, match="needs a non-negative input.*input 0 of blocks.0.mlp.fc2 \\(signed grid\\)"):
        vit_quant.with_quantizer(policy, gelu, "log")
    with pytest.raises(ValueError, match="log base must be > 1, got 1.0"):
        vit_quant.with_quantizer(policy, softmax, "log", log_base=1.0)
    with pytest.raises(ValueError, match="no layer of the policy matches 'mlp.gelu'"):
        vit_quant.matching_layers(policy, "mlp.gelu")
    two_bit = policy_lib.set_bits(policy, {"blocks.0.mlp.fc2": 2})
    with pytest.raises(ValueError, match="twin quantizer needs at least 3 activation bits, blocks.0.mlp.fc2 has 2"):
        vit_quant.with_quantizer(two_bit, ["blocks.0.mlp.fc2"], "twin")


def test_a_policy_mixing_quantizers_compiles_once_across_kinds_bases_and_bits(tiny_vit):
    _, model, variables, images, policy = tiny_vit
    softmax = vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS)
    gelu = vit_quant.matching_layers(policy, vit_quant.GELU_LAYERS)
    traces = []

    @jax.jit
    def logits(policy, images):
        traces.append(1)
        return apply.quantized_apply(model, variables, policy, images)

    outputs = []
    for kind, base, bits in (("log", 2.0, 4), ("log", 2 ** 0.5, 4), ("uniform", 2.0, 4), ("log", 2.0, 6)):
        p = policy_lib.set_bits(policy, {n: bits for n in softmax})
        p = vit_quant.with_quantizer(vit_quant.with_quantizer(p, gelu, "twin"), softmax, kind, log_base=base)
        outputs.append(np.asarray(logits(p, images)))
    assert len(traces) == 1
    assert all(np.isfinite(o).all() for o in outputs)
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[0], outputs[2])


def test_search_picks_the_candidate_with_the_smallest_layer_output_error(tiny_vit):
    _, model, variables, images, policy = tiny_vit
    softmax = vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS)
    searched, errors = vit_quant.search_quantizer(model, variables, policy, [images], softmax, "log",
                                                  candidates=(2.0, 2 ** 0.5, 1.1))
    for name in softmax:
        best = min(errors[name], key=errors[name].get)
        assert float(searched[name].a_log_base[0]) == pytest.approx(float(best), rel=1e-5)
        assert len(set(errors[name].values())) == 3  # the candidates differ
    # The objective recomputed here: the error of the layer's *output* (softmax·V), not of its input.
    name = softmax[0]
    captured = {}

    def capture(layer, module, call, args, kwargs):
        if layer == name:
            captured.update(args=args, equation=module.equation)
        return call(*args, **kwargs)

    with eqjax.quant.intercept.intercept_calls(capture):
        model.apply(variables, images)
    probs, values = (np.asarray(a, np.float64) for a in captured["args"])
    reference = np.einsum(captured["equation"], probs, values)
    for base in (2.0, 2 ** 0.5, 1.1):
        lq = vit_quant.with_quantizer(policy, [name], "log", log_base=base)[name]
        quantized = np.asarray(apply.quantize_input(lq, 0, captured["args"][0]), np.float64)
        by_hand = np.sum((np.einsum(captured["equation"], quantized, values) - reference) ** 2)
        assert errors[name][f"{base:.6g}"] == pytest.approx(by_hand, rel=1e-3)
    gelu = vit_quant.matching_layers(policy, vit_quant.GELU_LAYERS)
    searched, errors = vit_quant.search_quantizer(model, variables, policy, [images], gelu, "twin")
    assert set(errors[gelu[0]]) == {f"{r:.6g}" for r in vit_quant.FINE_RATIOS}
    with pytest.raises(ValueError, match="searches 'log' bases or 'twin' ratios, not 'uniform'"):
        vit_quant.search_quantizer(model, variables, policy, [images], gelu, "uniform")


def test_reparameterization_leaves_deit_tiny_fp32_logits_unchanged_and_equalizes_channels():
    spec = models.get("deit_tiny")
    model = spec.build(num_classes=10)
    variables = spec.init(jax.random.key(0), num_classes=10)
    # LayerNorm affines whose channel ranges differ by two orders of magnitude, as trained ones do.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: (jnp.asarray(rng.lognormal(0, 0.7, v.shape), v.dtype)
                         if "norm" in jax.tree_util.keystr(path) and "scale" in jax.tree_util.keystr(path) else v),
        variables["params"])
    variables = {"params": params}
    images = jax.random.normal(jax.random.key(1), (2, 224, 224, 3))
    new, ratios = vit_quant.reparameterize_layernorms(model, variables, [images], example=spec.example_input(1))
    assert len(ratios) == 24 and set(vit_quant.layernorm_dense_pairs(model, spec.example_input(1))[0].dense) == {"blocks.0.attn.qkv"}
    before, after = model.apply(variables, images), model.apply(new, images)
    assert float(jnp.max(jnp.abs(after - before))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(before))))
    assert max(float(r.max() / r.min()) for r in ratios.values()) > 10
    # after: every channel of norm1's output spans the same range
    seen = {}

    def record(name, module, call, args, kwargs):
        if name == "blocks.3.attn.qkv":
            seen["x"] = jnp.max(jnp.abs(args[0]).reshape(-1, args[0].shape[-1]), axis=0)
        return call(*args, **kwargs)

    with eqjax.quant.intercept.intercept_calls(record):
        model.apply(new, images)
    np.testing.assert_allclose(seen["x"], np.full(seen["x"].shape, float(jnp.mean(seen["x"]))), rtol=1e-4)


def test_reconstruction_with_the_ranking_term_learns_clips_of_log_and_twin_policies(tiny_vit):
    spec, model, variables, images, policy = tiny_vit
    policy = vit_quant.with_quantizer(policy, vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS), "log")
    policy = vit_quant.with_quantizer(policy, vit_quant.matching_layers(policy, vit_quant.GELU_LAYERS), "twin")
    config = reconstruction.ReconstructionConfig(method="qdrop", iterations=4, batch_size=4, ranking_weight=1.0,
                                                 ranking_rows=8)
    result = reconstruction.reconstruct(model, variables, policy, np.asarray(images), config, is_block=spec.is_block)
    assert not any(u["stopped"] for u in result.units)
    assert [u["unit"] for u in result.units] == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    fc2 = result.policy["blocks.0.mlp.fc2"]
    assert fc2.a_kind.tolist() == [TWIN] and np.isfinite(np.asarray(fc2.a_clip)).all()
    assert float(fc2.a_clip[0]) != float(policy["blocks.0.mlp.fc2"].a_clip[0])  # learned
    # The ranking term is in the objective: without it the same run learns other clips.
    plain = reconstruction.reconstruct(model, variables, policy, np.asarray(images),
                                       dataclasses.replace(config, ranking_weight=0.0), is_block=spec.is_block)
    clips = lambda r: np.concatenate([np.asarray(r.policy[n].a_clip).ravel() for n in sorted(r.policy)])
    assert not np.array_equal(clips(result), clips(plain))


def test_ranking_term_settings_are_checked():
    with pytest.raises(ValueError, match="ranking_weight must be >= 0, got -1"):
        reconstruction.ReconstructionConfig(ranking_weight=-1)
    with pytest.raises(ValueError, match="ranking_rows must be >= 1, got 0"):
        reconstruction.ReconstructionConfig(ranking_rows=0)
