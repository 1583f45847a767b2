"""Policies, quantized inference of Flax models, activation calibration, sharded evaluation."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax import models
from eqjax.quant import apply, intercept, policy as policy_lib
from eqjax.algorithms import metrics
from jax.sharding import NamedSharding, PartitionSpec
from tests.random_init import random_batch_norms

TINY = dict(stage_sizes=(1, 1), widths=(8, 16))


@pytest.fixture(scope="module")
def tiny_resnet():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, **TINY)
    variables = spec.init(jax.random.key(0), num_classes=10, **TINY)
    variables = random_batch_norms(variables, jax.random.key(2))  # init leaves them 1, 0, 0, 1
    calls = spec.trace(num_classes=10, **TINY)
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3), jnp.float32)
    stats = apply.collect_activation_stats(model, variables, [images[:8], images[8:]],
                                           apply.init_activation_stats(calls))
    return model, variables, calls, images, stats


def _policy(calls, stats, bits, **kw):
    return policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=bits, **kw), stats)


def test_policy_uniform_first_last_and_rules(tiny_resnet):
    _, _, calls, _, _ = tiny_resnet
    p = policy_lib.build(calls, w_bits=4, a_bits=6)
    table = policy_lib.bits_table(p)
    assert table["conv1"] == {"w": 8, "a": 8} and table["fc"] == {"w": 8, "a": 8}
    assert table["layer1.0.conv1"] == {"w": 4, "a": 6}
    p = policy_lib.build(calls, w_bits=4, keep_first_last_bits=None,
                         rules=[(r"layer2\..*\.conv2", 8), (r"fc", (6, 5))])
    table = policy_lib.bits_table(p)
    assert table["conv1"] == {"w": 4, "a": 4} and table["layer2.0.conv2"] == {"w": 8, "a": 8}
    assert table["fc"] == {"w": 6, "a": 5}
    assert list(p) == [c.name for c in calls]


def test_policy_errors(tiny_resnet):
    _, _, calls, _, _ = tiny_resnet
    with pytest.raises(ValueError, match="uniform weight bits must be in"):
        policy_lib.build(calls, w_bits=1)
    with pytest.raises(ValueError, match="rule 'fc' activation bits"):
        policy_lib.build(calls, w_bits=4, rules=[("fc", (8, 20))])
    p = policy_lib.build(calls, w_bits=4)
    extra = dict(p, **{"layer9.conv": p["fc"]})
    del extra["conv1"]
    with pytest.raises(ValueError, match=r"not in the model \(1\): layer9.conv.*missing from the policy \(1\): conv1"):
        policy_lib.validate(extra, [c.name for c in calls])
    with pytest.raises(ValueError, match="no activation statistics"):
        policy_lib.with_activation_clips(p, {})


def test_calibration_sees_layer_inputs(tiny_resnet):
    _, _, _, images, stats = tiny_resnet
    first = stats["conv1"][0]
    np.testing.assert_allclose(first.absmax, jnp.max(jnp.abs(images)), rtol=1e-6)
    assert float(first.count) == images.size
    assert not bool(first.nonnegative)
    assert bool(stats["layer1.0.conv2"][0].nonnegative)  # after ReLU


def test_unsigned_grid_for_post_relu_inputs(tiny_resnet):
    _, _, calls, _, stats = tiny_resnet
    p = _policy(calls, stats, 8)
    assert not bool(p["layer1.0.conv2"].a_signed[0]) and bool(p["conv1"].a_signed[0])
    signed = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=8), stats,
                                              unsigned_if_nonnegative=False)
    assert bool(signed["layer1.0.conv2"].a_signed[0])


def test_weights_are_quantized_per_output_channel(tiny_resnet):
    _, variables, calls, _, stats = tiny_resnet
    p = _policy(calls, stats, 4, keep_first_last_bits=None)
    q = apply.quantize_weights(variables, p)
    kernel = variables["params"]["layer1"]["0"]["conv1"]["kernel"]
    np.testing.assert_array_equal(q["params"]["layer1"]["0"]["conv1"]["kernel"],
                                  eqjax.quantize(kernel, 4, axis=-1))
    np.testing.assert_array_equal(q["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_disabled_policy_is_exactly_full_precision_and_16_bits_close(tiny_resnet):
    model, variables, calls, images, stats = tiny_resnet
    full = model.apply(variables, images)
    off = {n: lq._replace(w_enabled=jnp.asarray(False), a_enabled=jnp.asarray(False))
           for n, lq in _policy(calls, stats, 8).items()}
    np.testing.assert_array_equal(apply.quantized_apply(model, variables, off, images), full)
    out16 = apply.quantized_apply(model, variables, _policy(calls, stats, 16, keep_first_last_bits=16), images)
    np.testing.assert_allclose(out16, full, atol=1e-3 * float(jnp.max(jnp.abs(full))))


def test_error_grows_as_bits_shrink(tiny_resnet):
    model, variables, calls, images, stats = tiny_resnet
    full = model.apply(variables, images)
    errors = [float(jnp.linalg.norm(apply.quantized_apply(model, variables, _policy(calls, stats, b),
                                                          images) - full)) for b in (8, 6, 4)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_changing_bits_does_not_recompile(tiny_resnet):
    model, variables, calls, images, stats = tiny_resnet

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, policy, x):
        return apply.quantized_apply(model, variables, policy, x)

    outs = [forward(variables, _policy(calls, stats, b), images) for b in (8, 6, 4, 2)]
    mixed = policy_lib.set_bits(_policy(calls, stats, 8), {"layer1.0.conv1": (4, 6)})
    outs.append(forward(variables, mixed, images))
    assert len({float(jnp.sum(o)) for o in outs}) == 5


def test_vmap_over_stacked_policies(tiny_resnet):
    model, variables, calls, images, stats = tiny_resnet
    policies = [_policy(calls, stats, b) for b in (8, 4)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *policies)
    swept = jax.vmap(lambda p: apply.quantized_apply(model, variables, p, images[:2]))(stacked)
    for i, p in enumerate(policies):
        np.testing.assert_allclose(swept[i], apply.quantized_apply(model, variables, p, images[:2]),
                                   rtol=1e-5, atol=1e-5)


def test_vit_attention_matmul_operands_are_quantized():
    spec = models.get("vit_tiny_cifar")
    overrides = dict(depth=1, embed_dim=32, num_heads=2)
    model = spec.build(num_classes=10, **overrides)
    variables = spec.init(jax.random.key(0), num_classes=10, **overrides)
    calls = spec.trace(num_classes=10, **overrides)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
    stats = apply.collect_activation_stats(model, variables, [x], apply.init_activation_stats(calls))
    assert bool(stats["blocks.0.attn.av_matmul"][0].nonnegative)  # softmax weights
    full = _policy(calls, stats, 4)
    no_matmul = _policy(calls, stats, 4, quantize_matmuls=False)
    assert not bool(no_matmul["blocks.0.attn.qk_matmul"].a_enabled)
    assert not np.allclose(apply.quantized_apply(model, variables, full, x),
                           apply.quantized_apply(model, variables, no_matmul, x))


def test_any_flax_model_without_eqjax_names():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    net = Net()
    x = jax.random.normal(jax.random.key(0), (8, 5), jnp.float32)
    variables = net.init(jax.random.key(1), x)
    calls = intercept.trace_layers(net, x)
    # Dense(3) is constructed (named Dense_0) before its argument Dense(16) runs.
    assert [c.name for c in calls] == ["Dense_1", "Dense_0"]
    stats = apply.collect_activation_stats(net, variables, [x], apply.init_activation_stats(calls))
    p = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=4, keep_first_last_bits=None), stats)
    out = apply.quantized_apply(net, variables, p, x)
    assert out.shape == (8, 3) and not np.allclose(out, net.apply(variables, x))


def test_sharded_evaluation_equals_single_device(tiny_resnet):
    model, variables, calls, images, stats = tiny_resnet
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    labels = np.array(jnp.argmax(model.apply(variables, images), -1))
    labels[::3] = (labels[::3] + 1) % 10
    labels[0] = 9
    batches = lambda: [(np.asarray(images[i:i + 6]), labels[i:i + 6]) for i in range(0, 16, 6)]
    policy = _policy(calls, stats, 4)
    fn = lambda state, x: apply.quantized_apply(model, state[0], state[1], x)
    sharded = metrics.evaluate(fn, (variables, policy), batches(), batch_size=6)
    single = metrics.evaluate(fn, (variables, policy), batches(), batch_size=6,
                              mesh=metrics.single_device_mesh())
    assert sharded["num_images"] == single["num_images"] == 16
    assert sharded["top1"] == single["top1"] and sharded["top5"] == single["top5"]
    # The claim behind it: each image's logits are the same on 8 devices (2 images each) and on one
    # device computing the same 2-image batches (XLA:CPU's kernels may sum in another order for
    # another batch size, so the single-device side runs the shards' shapes).
    mesh = metrics.data_mesh()
    on_8 = jax.jit(fn)(jax.device_put((variables, policy), NamedSharding(mesh, PartitionSpec())),
                       jax.device_put(images, NamedSharding(mesh, PartitionSpec("data"))))
    state_1 = jax.device_put((variables, policy), jax.devices()[0])
    on_1 = np.concatenate([np.asarray(jax.jit(fn)(state_1, jax.device_put(images[i:i + 2], jax.devices()[0])))
                           for i in range(0, len(images), 2)])
    assert len(on_8.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(on_8), on_1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        metrics.evaluate(fn, (variables, policy), batches(), batch_size=6, num_classes=5)


def test_topk_correct_by_hand():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], jnp.float32)
    labels = jnp.array([1, 2], jnp.int32)
    np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 1), [True, False])
    np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 2), [True, True])
