"""Every weighted Linen layer kind, Flax attention, NNX models, and matrix products eqjax cannot see."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eqjax
from eqjax import models, ptq
from eqjax.algorithms import energy, reconstruction, second_order
from eqjax.quant import apply, intercept, nnx_model

CONFIG_2BIT = ptq.PTQConfig(w_bits=2, a_bits=2, keep_first_last_bits=None)


def hand_fake_quant(x, bits, reduce_axes):
    """The study's eqs. (3)-(4) written out in NumPy: symmetric, absmax scale over ``reduce_axes``."""
    x = np.asarray(x, np.float32)
    q_max = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(x), axis=reduce_axes, keepdims=True) / np.float32(q_max)
    return (np.clip(np.round(x / scale), -q_max - 1, q_max) * scale).astype(np.float32)


class OneLayer(nn.Module):
    """A single Linen layer, named ``layer``."""

    make: object

    @nn.compact
    def __call__(self, x):
        return self.make(name="layer")(x)


# (layer factory, input shape, kernel axes that are NOT output channels, hand MAC count of a batch of 2)
LAYER_KINDS = {
    "dense": (lambda name: nn.Dense(6, name=name), (2, 5, 4), (0,), 2 * 5 * 6 * 4),
    "dense_general": (lambda name: nn.DenseGeneral((3, 2), name=name), (2, 5, 4), (0,), 2 * 5 * 6 * 4),
    "dense_general_two_inputs": (lambda name: nn.DenseGeneral(6, axis=(-2, -1), name=name), (2, 5, 3, 4),
                                 (0, 1), 2 * 5 * 6 * 12),
    "conv": (lambda name: nn.Conv(6, (3, 3), name=name), (2, 6, 6, 4), (0, 1, 2), 2 * 36 * 6 * 9 * 4),
    "conv_grouped": (lambda name: nn.Conv(6, (3, 3), feature_group_count=2, name=name), (2, 6, 6, 4),
                     (0, 1, 2), 2 * 36 * 6 * 9 * 2),
    "conv_depthwise": (lambda name: nn.Conv(4, (3, 3), feature_group_count=4, name=name), (2, 6, 6, 4),
                       (0, 1, 2), 2 * 36 * 4 * 9),
    "conv_transpose": (lambda name: nn.ConvTranspose(6, (2, 2), strides=(2, 2), name=name), (2, 3, 3, 4),
                       (0, 1, 2), 2 * 9 * 4 * 6 * 4),
    "conv_transpose_transposed_kernel": (
        lambda name: nn.ConvTranspose(6, (2, 2), strides=(2, 2), transpose_kernel=True, name=name),
        (2, 3, 3, 4), (0, 1, 3), 2 * 9 * 4 * 6 * 4),
    "einsum": (lambda name: nn.Einsum((6, 4), "btd,hd->bth", name=name), (2, 5, 4), (1,), 2 * 5 * 6 * 4),
}


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_each_linen_layer_kind_is_quantized_by_hand_and_counted(kind):
    make, shape, reduce_axes, macs = LAYER_KINDS[kind]
    model = OneLayer(make)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    variables = model.init(jax.random.key(1), x)
    policy = ptq.calibrate(model, variables, [x], CONFIG_2BIT)
    assert list(policy) == ["layer"] and bool(policy["layer"].w_enabled)

    quantized = np.asarray(apply.quantized_apply(model, variables, policy, x))
    assert not np.allclose(quantized, model.apply(variables, x), atol=1e-3)  # 2 bits change the output
    kernel = variables["params"]["layer"]["kernel"]
    by_hand = {"params": {**variables["params"]["layer"], "kernel": hand_fake_quant(kernel, 2, reduce_axes)}}
    reference = model.apply({"params": {"layer": by_hand["params"]}}, hand_fake_quant(x, 2, None))
    np.testing.assert_allclose(quantized, reference, rtol=1e-5, atol=1e-5)

    (count,) = energy.count_layers(model, x, variables=variables)
    assert (count.name, count.macs, count.weight_elements) == ("layer", macs, kernel.size)


class LinenTransformer(nn.Module):
    """The issue's small transformer: Flax's own layers only."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (4, 4), strides=4, padding="VALID", name="patch")(x)
        x = x.reshape(x.shape[0], -1, 16)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)
        x = x + nn.Dense(16, name="mlp_out")(nn.gelu(nn.DenseGeneral(32, name="mlp_in")(x)))
        return nn.Dense(10, name="head")(x.mean(axis=1))


class NnxTransformer(nnx.Module):
    """The same transformer in Flax NNX, attribute for attribute."""

    def __init__(self, rngs):
        self.patch = nnx.Conv(3, 16, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
        self.mlp_in = nnx.LinearGeneral(16, 32, rngs=rngs)
        self.mlp_out = nnx.Linear(32, 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.patch(x)
        x = x.reshape(x.shape[0], -1, 16)
        x = x + self.attn(x)
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(x)))
        return self.head(x.mean(axis=1))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(8, (3, 3), name="conv1")(x)))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x))
        return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv1(x)))
        x = nnx.relu(self.dw(x))
        return self.head(x.mean(axis=(1, 2)))


IMAGES = jax.random.normal(jax.random.key(3), (8, 16, 16, 3), jnp.float32)


def test_linen_transformer_every_layer_and_both_attention_matmuls():
    model = LinenTransformer()
    variables = model.init(jax.random.key(0), IMAGES[:1])
    policy = ptq.calibrate(model, variables, [IMAGES], ptq.PTQConfig(w_bits=4))
    weighted = ["patch", "attn.query", "attn.key", "attn.value", "attn.out", "mlp_in", "mlp_out", "head"]
    assert [n for n, lq in policy.items() if bool(lq.w_enabled)] == weighted
    assert [n for n, lq in policy.items() if not bool(lq.w_enabled)] == ["attn.qk_matmul", "attn.av_matmul"]
    assert all(bool(lq.a_enabled) for lq in policy.values())
    # Per output channel of the (heads, head_dim) projections, not per head_dim alone.
    assert policy["attn.query"].w_channel_axes.axes == (1, 2) and policy["attn.out"].w_channel_axes is None

    counts = {c.name: c for c in energy.count_layers(model, IMAGES, variables=variables)}
    b, t, d, heads, hd = 8, 16, 16, 2, 8
    by_hand = {"patch": b * t * d * 4 * 4 * 3, "attn.query": b * t * d * d, "attn.key": b * t * d * d,
               "attn.value": b * t * d * d, "attn.qk_matmul": b * heads * t * t * hd,
               "attn.av_matmul": b * heads * t * t * hd, "attn.out": b * t * d * d,
               "mlp_in": b * t * d * 32, "mlp_out": b * t * 32 * d, "head": b * d * 10}
    assert {n: c.macs for n, c in counts.items()} == by_hand
    report = energy.energy_report(list(counts.values()), eqjax.bits_table(policy), energy.get_preset("paper"))
    assert report["macs"] == sum(by_hand.values())
    assert report["operations"] == {"conv": 1, "dense": 7, "matmul": 2}

    # Quantizing only the QK^T matmul changes the logits.
    only_qk = {n: lq._replace(w_enabled=jnp.asarray(False), a_enabled=jnp.asarray(n == "attn.qk_matmul"))
               for n, lq in policy.items()}
    assert not np.allclose(apply.quantized_apply(model, variables, eqjax.policy.set_bits(
        only_qk, {"attn.qk_matmul": 2}), IMAGES), model.apply(variables, IMAGES), atol=1e-4)


class SelfAttentionNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.SelfAttention(num_heads=2, name="attn")(x)


def test_self_attention_projections_and_matmuls_are_layers_and_registered_models_have_no_blind_spot():
    found = intercept.trace(SelfAttentionNet(), jax.ShapeDtypeStruct((2, 5, 8), jnp.float32))
    assert [c.name for c in found.calls] == ["attn.query", "attn.key", "attn.value", "attn.qk_matmul",
                                             "attn.av_matmul", "attn.out"]
    assert found.calls[3].macs == 2 * 2 * 5 * 5 * 4 and not found.unattributed
    for name in ("resnet18_cifar", "efficientnet_lite0", "deit_tiny"):  # eqjax's own: nothing left out
        spec = models.get(name)
        assert not intercept.trace(spec.build(), spec.example_input(1)).unattributed


def _same_model_in_nnx(linen_model, linen_variables, nnx_model_instance):
    """The NNX model with the Linen model's weights (same attribute paths, same kernel layouts)."""
    functional_model, nnx_variables = nnx_model.functional(nnx_model_instance)
    assert jax.tree.map(jnp.shape, nnx_variables) == jax.tree.map(jnp.shape, dict(linen_variables))
    return functional_model.merge(linen_variables)


@pytest.mark.parametrize("linen_cls, nnx_cls", [(LinenCNN, NnxCNN), (LinenTransformer, NnxTransformer)],
                         ids=["cnn", "vit"])
def test_linen_and_nnx_versions_agree(linen_cls, nnx_cls):
    linen = linen_cls()
    variables = linen.init(jax.random.key(0), IMAGES[:1])
    if "batch_stats" in variables:
        variables = {**variables, "batch_stats": jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])}
    net = _same_model_in_nnx(linen, variables, nnx_cls(nnx.Rngs(1)))
    config = ptq.PTQConfig(w_bits=4, a_bits=4)

    linen_policy = ptq.calibrate(linen, variables, [IMAGES], config)
    nnx_policy = ptq.calibrate(net, None, [IMAGES], config)
    assert list(linen_policy) == list(nnx_policy)
    assert jax.tree.structure(linen_policy) == jax.tree.structure(nnx_policy)
    for a, b in zip(jax.tree.leaves(linen_policy), jax.tree.leaves(nnx_policy)):
        np.testing.assert_array_equal(a, b)

    linen_fn, linen_state = ptq.quantize(linen, variables, linen_policy)
    nnx_fn, nnx_state = ptq.quantize(net, None, nnx_policy)
    np.testing.assert_array_equal(linen_fn(linen_state, IMAGES), nnx_fn(nnx_state, IMAGES))

    labels = np.zeros(len(IMAGES), np.int32)
    linen_sweep = ptq.sweep(linen, variables, linen_policy, [(IMAGES, labels)], bits=(2, 8), batch_size=8)
    nnx_sweep = ptq.sweep(net, None, nnx_policy, [(IMAGES, labels)], bits=(2, 8), batch_size=8)
    assert linen_sweep.layers == nnx_sweep.layers
    for metric in linen_sweep.scores:
        np.testing.assert_allclose(linen_sweep.scores[metric], nnx_sweep.scores[metric], rtol=1e-6)

    bits = eqjax.bits_table(linen_policy)
    preset = energy.get_preset("paper")
    assert (energy.energy_report(energy.count_layers(linen, IMAGES, variables=variables), bits, preset)
            == energy.energy_report(energy.count_layers(net, IMAGES), bits, preset))


def test_nnx_one_pass_sensitivity_and_reconstruction_equal_linen():
    linen = LinenTransformer()
    variables = linen.init(jax.random.key(0), IMAGES[:1])
    net = _same_model_in_nnx(linen, variables, NnxTransformer(nnx.Rngs(1)))
    config = ptq.PTQConfig(w_bits=4, a_bits=8)
    policies = ptq.calibrate(linen, variables, [IMAGES], config), ptq.calibrate(net, None, [IMAGES], config)
    labels = np.zeros(len(IMAGES), np.int32)
    linen_estimate, nnx_estimate = (second_order.estimate(m, v, p, [(IMAGES, labels)], bits=(2, 4), micro_batch=4)
                                    for m, v, p in ((linen, variables, policies[0]), (net, None, policies[1])))
    assert linen_estimate.layers == nnx_estimate.layers and "attn.qk_matmul" in nnx_estimate.layers
    np.testing.assert_allclose(nnx_estimate.weight, linen_estimate.weight, rtol=1e-6)
    np.testing.assert_allclose(nnx_estimate.activation, linen_estimate.activation, rtol=1e-6)

    settings = reconstruction.ReconstructionConfig(method="brecq", iterations=20, batch_size=4)
    linen_result, nnx_result = (reconstruction.reconstruct(m, v, p, np.asarray(IMAGES), settings, blocks=["attn"])
                                for m, v, p in ((linen, variables, policies[0]), (net, None, policies[1])))
    assert [u["unit"] for u in nnx_result.units] == ["patch", "attn", "mlp_in", "mlp_out", "head"]
    assert sorted(nnx_result.rounding) == sorted(linen_result.rounding)
    for name, rounding in linen_result.rounding.items():
        np.testing.assert_array_equal(nnx_result.rounding[name], rounding)


def test_quantized_nnx_model_stays_nnx_and_compiles_once():
    net = _same_model_in_nnx(LinenTransformer(), LinenTransformer().init(jax.random.key(0), IMAGES[:1]),
                             NnxTransformer(nnx.Rngs(0)))
    policy = ptq.calibrate(net, None, [IMAGES], ptq.PTQConfig(w_bits=4))
    quantized = nnx_model.QuantizedModule(net, policy)
    apply_fn, state = ptq.quantize(net, None, policy)
    expected = apply_fn(state, IMAGES)
    np.testing.assert_array_equal(quantized(IMAGES), expected)

    graphdef, nnx_state = nnx.split(quantized)
    traces = []

    @nnx.jit
    def forward(module, x):
        traces.append(1)
        return module(x)

    np.testing.assert_array_equal(forward(nnx.merge(graphdef, nnx_state), IMAGES), expected)
    quantized.policy.set_value(eqjax.policy.set_bits(policy, {"mlp_in": 2, "attn.qk_matmul": 3}))
    changed = forward(quantized, IMAGES)
    assert len(traces) == 1 and not np.allclose(changed, expected)


def test_nnx_names_in_errors_and_the_variables_argument():
    net = NnxTransformer(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attn\.atn\.query \(closest layers: attn\.query"):
        ptq.calibrate(net, None, [IMAGES], ptq.PTQConfig(w_bits=4, rules=(("attn.atn.query", 4),)))
    with pytest.raises(ValueError, match="an NNX model carries its own state: pass variables=None"):
        ptq.calibrate(net, {"params": {}}, [IMAGES])
    model, variables = nnx_model.functional(net)
    with pytest.raises(ValueError, match=r"do not match the model at 'attn': missing \['key'"):
        model.apply({"params": {**variables["params"], "attn": {}}}, IMAGES)


class RawMatmul(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (3, 4))
        return nn.Dense(2, name="head")(jnp.dot(x, w))


def test_a_matrix_product_outside_every_layer_is_reported_where_it_is():
    model, x = RawMatmul(), jnp.ones((1, 3))
    variables = model.init(jax.random.key(0), x)
    found = intercept.trace(model, x, variables=variables)
    assert [c.name for c in found.calls] == ["head"]
    (op,) = found.unattributed
    assert (op.primitive, op.operand_shapes, op.module) == ("dot_general", ((1, 3), (3, 4)), "")
    assert "test_any_flax_model.py" in op.source
    with pytest.warns(intercept.UnattributedOpWarning, match=r"dot_general \[1, 3\] x \[3, 4\] in module '<top>'"):
        energy.count_layers(model, x, variables=variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the models of eqjax and Flax's own layers: nothing unattributed
        intercept.trace_layers(LinenTransformer(), IMAGES[:1])
