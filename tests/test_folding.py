"""BatchNorm folding and bias correction (eqjax.quant.folding)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models, ptq
from eqjax.quant import apply, folding
from tests.random_init import random_batch_norms

TINY = dict(stage_sizes=(1, 1), widths=(8, 16))


@pytest.fixture(scope="module")
def tiny_resnet():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, **TINY)
    variables = random_batch_norms(spec.init(jax.random.key(0), num_classes=10, **TINY), jax.random.key(2))
    images = np.asarray(jax.random.normal(jax.random.key(1), (16, 32, 32, 3), jnp.float32))
    return model, variables, images


def test_folding_keeps_fp32_logits_and_pairs_every_batchnorm(tiny_resnet):
    model, variables, images = tiny_resnet
    folded, pairs = folding.fold_batchnorm(model, variables, images[:1])
    batchnorms = {".".join(str(k.key) for k in path[:-1])
                  for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]}
    assert {p.batchnorm for p in pairs} == batchnorms and len(pairs) == 6  # stem, 2 per block, shortcut
    before = model.apply(variables, images)
    after = model.apply(folded, images)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5, rtol=1e-5)
    assert not np.allclose(folded["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])


def test_per_channel_quantization_commutes_with_folding(tiny_resnet):
    """Q(W·f) = f·Q(W) per output channel: the folded model quantizes to the same logits."""
    model, variables, images = tiny_resnet
    folded, _ = folding.fold_batchnorm(model, variables, images[:1])
    config = ptq.PTQConfig(w_bits=4, keep_first_last_bits=None)
    logits = []
    for v in (variables, folded):
        policy = ptq.calibrate(model, v, [images], config)
        apply_fn, state = ptq.quantize(model, v, policy)
        logits.append(np.asarray(apply_fn(state, images)))
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    fp = np.asarray(model.apply(variables, images))
    assert np.abs(logits[0] - fp).max() > 1e-2  # 4 bits does change the logits


class ConvBnDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(6, (3, 3), use_bias=False, name="conv")(x))
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


def test_bias_correction_restores_each_layer_output_mean():
    model = ConvBnDense()
    images = np.asarray(jax.random.normal(jax.random.key(0), (32, 6, 6, 3)) + 0.7)  # non-zero input mean
    variables = random_batch_norms(model.init(jax.random.key(1), images[:1]), jax.random.key(3))
    config = ptq.PTQConfig(w_bits=3, keep_first_last_bits=None)
    policy = ptq.calibrate(model, variables, [images], config)
    qvars = apply.quantize_weights(variables, policy)
    corrected, where = folding.correct_bias(model, variables, qvars, policy, [images[:16], images[16:]],
                                            example=images[:1])
    assert where == {"conv": "batchnorm", "fc": "bias"}

    def conv_bn_output(v):
        return np.asarray(nn.BatchNorm(use_running_average=True).apply(
            {"params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]},
            nn.Conv(6, (3, 3), use_bias=False).apply({"params": v["params"]["conv"]}, images))).mean(axis=(0, 1, 2))

    fp_mean, q_mean, c_mean = (conv_bn_output(v) for v in (variables, qvars, corrected))
    assert np.abs(q_mean - fp_mean).max() > 1e-3  # 3-bit weights do shift the mean
    np.testing.assert_allclose(c_mean, fp_mean, atol=1e-5)
    # The dense layer, on the full-precision input of the model: its mean output is restored too.
    fp_features = np.asarray(model.apply(variables, images, capture_intermediates=True,
                                         mutable=["intermediates"])[1]["intermediates"]["bn"]["__call__"][0])
    x = fp_features.reshape(len(images), -1)
    dense = lambda v: x @ np.asarray(v["params"]["fc"]["kernel"]) + np.asarray(v["params"]["fc"]["bias"])
    np.testing.assert_allclose(dense(corrected).mean(0), dense(variables).mean(0), atol=1e-4)
    assert np.abs(dense(qvars).mean(0) - dense(variables).mean(0)).max() > 1e-3


def test_folding_without_batchnorm_bias_is_an_error():
    class NoBias(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True, use_bias=False)(nn.Conv(2, (1, 1))(x))

    x = jnp.ones((1, 4, 4, 3))
    variables = NoBias().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot fold BatchNorm BatchNorm_0"):
        folding.fold_batchnorm(NoBias(), variables, x)
