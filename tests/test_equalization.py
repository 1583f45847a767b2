"""Cross-layer equalization: the FP32 function of a ReLU network is unchanged, each pair's channel
ranges end equal, Lite0's pairs name its layers, and models without pairs are refused by name
(also by experiments.ptq --equalize, before calibrating)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models, ptq
from eqjax.models import efficientnet
from eqjax.quant import equalization
from eqjax.quant.equalization import EqualizationPair
from experiments import ptq as ptq_script, workload as workload_lib
from tests import test_qat

TINY_STAGES = (efficientnet.StageArgs(1, 3, 1, 1, 12), efficientnet.StageArgs(2, 3, 2, 4, 16))  # block 1.1 adds


def _tiny_lite(activation):
    """A two-stage EfficientNet-Lite with BatchNorm statistics and channel ranges far apart."""
    model = efficientnet.EfficientNetLite(num_classes=5, stages=TINY_STAGES, stem_features=8, head_features=32,
                                          activation=activation)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    rng = np.random.default_rng(0)
    spread = lambda leaf: jnp.asarray(np.asarray(leaf) * np.exp(rng.normal(0, 1.5, leaf.shape[-1])), leaf.dtype)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: spread(leaf) if path[-1].key == "kernel" else leaf, variables["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape) if path[-1].key == "var"
                                       else rng.normal(0, 0.2, leaf.shape), leaf.dtype), variables["batch_stats"])
    return model, {"params": params, "batch_stats": stats}, x


def test_equalization_keeps_the_relu_function_and_equalizes_every_pair():
    model, variables, x = _tiny_lite(jax.nn.relu)
    relu_model, pairs = efficientnet.equalization_pairs(model)
    assert [p.first for p in pairs] == ["conv_stem", "blocks.0.0.conv_dw", "blocks.1.0.conv_pw", "blocks.1.0.conv_dw",
                                         "blocks.1.1.conv_pw", "blocks.1.1.conv_dw"]
    equalized, report = equalization.equalize(relu_model, variables, pairs, example=x)
    reference = relu_model.apply(variables, x)
    error = np.max(np.abs(np.asarray(relu_model.apply(equalized, x)) - np.asarray(reference)))
    assert error <= 1e-5 * np.max(np.abs(np.asarray(reference)))  # float32 rounding of the rescaled weights
    assert report["range_ratio_after"] < report["range_ratio_before"] / 2
    for pair in pairs:  # a pair's scales are 1 once equalized
        first = np.asarray(_module(equalized, pair.first)["kernel"])
        second = np.asarray(_module(equalized, pair.second)["kernel"])
        np.testing.assert_allclose(equalization.pair_scales(first, second), 1.0, atol=1e-3)


def _module(variables, name):
    node = variables["params"]
    for part in name.split("."):
        node = node[part]
    return node


def test_pair_scales_equalize_the_ranges_of_a_dense_and_a_depthwise_consumer():
    rng = np.random.default_rng(1)
    first = rng.normal(0, 1, (3, 3, 4, 6)) * np.array([1e-3, 1e-2, 1, 10, 100, 0.5])
    for second in (rng.normal(0, 1, (1, 1, 6, 5)), rng.normal(0, 1, (3, 3, 1, 6))):
        scales = equalization.pair_scales(first, second)
        depthwise = second.shape[2] == 1
        new_first = first / scales
        new_second = second * (scales if depthwise else scales.reshape(1, 1, 6, 1))
        r1 = np.abs(new_first).reshape(-1, 6).max(0)
        r2 = (np.abs(new_second).reshape(-1, 6).max(0) if depthwise
              else np.moveaxis(np.abs(new_second), 2, 0).reshape(6, -1).max(1))
        np.testing.assert_allclose(r1, r2, rtol=1e-12)
    assert np.all(equalization.pair_scales(np.zeros((1, 1, 2, 3)), rng.normal(0, 1, (1, 1, 3, 2))) == 1.0)


def test_pairs_leave_out_a_stem_that_a_residual_add_reads_and_bad_pairs_are_refused():
    model, variables, x = _tiny_lite(jax.nn.relu6)
    assert models.get("efficientnet_lite0").equalization is efficientnet.equalization_pairs
    assert models.get("resnet18_cifar").equalization is None
    with pytest.raises(ValueError, match="'blocks.9.0.conv_dw' has no kernel"):
        equalization.equalize(model, variables, [EqualizationPair("conv_stem", "blocks.9.0.conv_dw")], example=x)
    skip = efficientnet.EfficientNetLite(stages=(efficientnet.StageArgs(1, 3, 1, 1, 32),))
    assert efficientnet.equalization_pairs(skip)[1] == [EqualizationPair("blocks.0.0.conv_dw", "blocks.0.0.conv_pw")]
    with pytest.raises(ValueError, match="8 output channels do not feed kernel"):
        equalization.equalize(model, variables, [EqualizationPair("conv_stem", "blocks.1.0.conv_dw")], example=x)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """tests.test_qat's tiny training and test tars."""
    return test_qat.tars.__wrapped__(tmp_path_factory)


def test_ptq_equalize_refuses_a_model_without_pairs_before_calibrating(tars, tmp_path):
    train, test = tars
    workload = workload_lib.WorkloadConfig(model="resnet18_cifar", weights="random", dataset=f"tar:{test}",
                                           calib_dataset=f"tar:{train}", calib_images=8, eval_images=8, batch_size=8)
    config = ptq_script.PtqRunConfig(workload=workload, ptq=ptq.PTQConfig(w_bits=8), equalize=True,
                                     workdir=str(tmp_path))
    with pytest.raises(ValueError, match="--equalize: no cross-layer equalization pairs are defined for "
                                         "--model=resnet18_cifar"):
        ptq_script.run(config)
    assert not (tmp_path / "ptq" / "results.json").exists()
