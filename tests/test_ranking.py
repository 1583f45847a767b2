"""Ranking-aware PTQ: the losses, their gradients, and block-wise optimisation on a tiny ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models
from eqjax.quant import apply, policy as policy_lib
from eqjax.algorithms import ranking
from eqjax.models import vit

TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0)
is_block = lambda m: isinstance(m, vit.Block)


def test_ranking_loss_is_zero_for_kept_orders_and_positive_for_a_swap():
    reference = jnp.asarray([[0.1, 0.5, 0.9, 2.0]])
    assert float(ranking.ranking_loss(reference, 3 * reference + 1)) == 0.0
    swapped = jnp.asarray([[0.1, 0.9, 0.5, 2.0]])
    loss = float(ranking.ranking_loss(reference, swapped))
    assert loss == pytest.approx(0.4 / 6)  # one of 6 pairs violated by 0.4
    assert float(ranking.ranking_loss(reference, reference, margin=0.5)) > 0  # a gap below the margin
    assert float(ranking.kept_order_fraction(reference, swapped)) == pytest.approx(5 / 6)
    ties = jnp.asarray([[1.0, 1.0, 2.0]])
    assert float(ranking.kept_order_fraction(ties, jnp.asarray([[5.0, 0.0, 9.0]]))) == 1.0  # tied pair ignored


def _loop_ranking_loss(reference, quantized, margin, mask):
    """The loss written as the paper's double sum, in plain Python over every row and pair."""
    total, count = 0.0, 0
    for row in np.ndindex(reference.shape[:-1]):
        a, q = reference[row], quantized[row]
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                if a[i] == a[j] or not mask[i, j]:
                    continue
                total += max(margin - (q[i] - q[j]) * np.sign(a[i] - a[j]), 0.0)
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_ranking_loss_against_a_loop_over_rows_pairs_ties_and_masks(margin):
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 4, (2, 3, 6)).astype(np.float32)  # small integers: many ties
    quantized = reference + rng.normal(0, 0.6, reference.shape).astype(np.float32)
    mask = rng.random((6, 6)) < 0.7
    for m in (np.ones((6, 6), bool), mask):
        got = float(ranking.ranking_loss(jnp.asarray(reference), jnp.asarray(quantized), margin=margin,
                                         mask=jnp.asarray(m)))
        assert got == pytest.approx(_loop_ranking_loss(reference, quantized, margin, m), rel=1e-5)
    assert float(ranking.ranking_loss(jnp.asarray(reference), jnp.asarray(quantized), margin=margin)) > 0


def test_pearson_away_from_plus_minus_one_against_numpy():
    a = np.asarray(jax.random.normal(jax.random.key(3), (4, 3, 5)))
    b = 0.5 * a + np.asarray(jax.random.normal(jax.random.key(4), (4, 3, 5)))
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    assert all(0.1 < abs(e) < 0.95 for e in expected)
    np.testing.assert_allclose(ranking.pearson_correlation(jnp.asarray(a), jnp.asarray(b)), expected, rtol=1e-5)
    cosine = [x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ranking.cosine_similarity(jnp.asarray(a), jnp.asarray(b)), cosine, rtol=1e-5)


def test_ranking_loss_gradients_are_finite_even_with_every_pair_masked():
    key1, key2 = jax.random.split(jax.random.key(0))
    reference = jax.random.normal(key1, (2, 3, 5, 7))
    quantized = jax.random.normal(key2, (2, 3, 5, 7))
    grad = jax.grad(lambda q: ranking.ranking_loss(reference, q, margin=0.1))(quantized)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    none = jnp.zeros((7, 7), bool)
    value, grad = jax.value_and_grad(lambda q: ranking.ranking_loss(reference, q, mask=none))(quantized)
    assert float(value) == 0.0 and np.all(grad == 0)


def test_similarities():
    a = jax.random.normal(jax.random.key(1), (3, 4, 5))
    np.testing.assert_allclose(ranking.pearson_correlation(a, 2 * a + 3), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ranking.cosine_similarity(a, -a), -1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="similarity must be one of"):
        ranking.similarity(a, a, kind="spearman")


@pytest.fixture(scope="module")
def tiny_vit():
    spec = models.get("vit_tiny_cifar")
    model = spec.build(num_classes=10, **TINY_VIT)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    images = np.asarray(jax.random.normal(jax.random.key(1), (32, 32, 32, 3)))
    calls = spec.trace(num_classes=10, **TINY_VIT)
    stats = apply.collect_activation_stats(model, variables, [images[:16], images[16:]],
                                           apply.init_activation_stats(calls))
    policy = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=4, quantize_matmuls=True), stats)
    return model, variables, policy, images


def test_adam_reduces_the_objective_and_the_order_violations(tiny_vit):
    model, variables, policy, images = tiny_vit
    result = ranking.ranking_ptq(model, variables, policy, images, is_block=is_block, steps=40,
                                 batch_size=16, learning_rate=2e-2, gamma=1.0, num_rows=None)
    assert [b["block"] for b in result.blocks] == ["blocks.0", "blocks.1"] and result.stopped_at is None
    for block in result.blocks:
        assert block["objective_after"] < block["objective_before"], block
    assert sum(b["rank_after"] for b in result.blocks) < sum(b["rank_before"] for b in result.blocks)
    assert set(result.weight_scales) == {f"blocks.{i}.{n}" for i in range(2)
                                         for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert not np.allclose(result.policy["blocks.0.attn.qk_matmul"].a_clip,
                           policy["blocks.0.attn.qk_matmul"].a_clip)
    assert result.policy["head"] is policy["head"]  # outside the blocks: untouched

    standard = ranking.attention_agreement(model, variables, apply.quantize_weights(variables, policy),
                                           policy, images)
    ranked = ranking.attention_agreement(
        model, variables, apply.quantize_weights(variables, result.policy, scales=result.weight_scales),
        result.policy, images)
    assert float(ranked["kept_order"]) > float(standard["kept_order"])


def test_grid_search_does_not_increase_the_objective(tiny_vit):
    model, variables, policy, images = tiny_vit
    result = ranking.ranking_ptq(model, variables, policy, images, is_block=is_block, method="grid",
                                 steps=1, batch_size=16, grid=(0.5, 0.8, 1.0))
    for block in result.blocks:
        assert block["objective_after"] <= block["objective_before"] + 1e-6, block


def test_search_grid_against_brute_force():
    """A separable objective: one round of the alternating search finds the brute-force optimum
    over the whole grid; a coupled one ends where no single multiplier change improves."""
    import itertools

    from eqjax.algorithms import ranking_core

    grid = (0.5, 0.8, 1.0, 1.25)
    init = {"w": {"a": jnp.zeros(2), "b": jnp.zeros(2)}, "a": {"a": jnp.float32(0.0)}}
    targets = {("w", "a"): np.log(0.8), ("w", "b"): np.log(1.25), ("a", "a"): np.log(0.5)}
    coords = list(targets)
    separable = lambda s: (sum(jnp.sum((s[k][n] - targets[(k, n)]) ** 2) for k, n in coords),)
    coupled = lambda s: (separable(s)[0] + 3.0 * jnp.sum(s["w"]["a"] * s["a"]["a"]),)
    value_at = lambda f, choice: float(f({k: {n: init[k][n] + np.log(choice[coords.index((k, n))])
                                             for n in init[k]} for k in init})[0])
    for objective, rounds in ((separable, 1), (coupled, 3)):
        found, stopped = ranking_core.search_grid(objective, init, grid=grid, rounds=rounds)
        assert stopped is None
        chosen = tuple(float(np.exp(np.asarray(found[k][n]).ravel()[0])) for k, n in coords)
        best = min(itertools.product(grid, repeat=3), key=lambda c: value_at(objective, c))
        if objective is separable:
            np.testing.assert_allclose(chosen, best, rtol=1e-6)
        here = value_at(objective, chosen)
        for i, g in itertools.product(range(3), grid):  # coordinate-wise optimal
            assert value_at(objective, chosen[:i] + (g,) + chosen[i + 1:]) >= here - 1e-9


def test_non_finite_loss_stops_and_keeps_calibrated_scales(tiny_vit):
    model, variables, policy, images = tiny_vit
    result = ranking.ranking_ptq(model, variables, policy, images, is_block=is_block, steps=3,
                                 batch_size=16, learning_rate=1e30)
    assert result.stopped_at["block"] == "blocks.0" and result.stopped_at["step"] >= 1
    assert not any(b["optimized"] for b in result.blocks)
    np.testing.assert_array_equal(result.policy["blocks.1.mlp.fc1"].a_clip, policy["blocks.1.mlp.fc1"].a_clip)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=-0.1), "gamma must be >= 0, got -0.1"),
    (dict(steps=0), "steps must be > 0, got 0"),
    (dict(method="sgd"), "method must be one of"),
])
def test_bad_options(tiny_vit, kwargs, message):
    model, variables, policy, images = tiny_vit
    with pytest.raises(ValueError, match=message):
        ranking.ranking_ptq(model, variables, policy, images, is_block=is_block, **kwargs)


def test_a_model_without_attention_is_refused():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, widths=(8, 8, 8, 8), stage_sizes=(1, 1, 1, 1))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    calls = spec.trace(num_classes=10, widths=(8, 8, 8, 8), stage_sizes=(1, 1, 1, 1))
    policy = policy_lib.build(calls, w_bits=8)
    with pytest.raises(ValueError, match="has no attention layers"):
        ranking.ranking_ptq(model, variables, policy, np.zeros((4, 32, 32, 3), np.float32), is_block=is_block)

