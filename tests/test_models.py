"""Model registry, layer naming and tracing (no torch needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models
from eqjax.quant import intercept


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="known models: .*deit_tiny.*resnet18_cifar"):
        models.get("resnet50")


@pytest.mark.parametrize("name, count, first, last", [
    ("resnet18_cifar", 21, "conv1", "fc"),
    ("resnet18", 21, "conv1", "fc"),
    ("deit_tiny", 50, "patch_embed.proj", "head"),
    ("efficientnet_lite0", 50, "conv_stem", "classifier"),
])
def test_quantizable_layers_have_timm_names(name, count, first, last):
    spec = models.get(name)
    layers = spec.quantizable_layers()
    assert len(layers) == count
    assert spec.first_and_last_layers() == (first, last)
    assert len(set(layers)) == len(layers)


def test_resnet_names_and_shapes():
    layers = models.get("resnet18_cifar").quantizable_layers()
    assert layers[:3] == ("conv1", "layer1.0.conv1", "layer1.0.conv2")
    assert "layer2.0.downsample.0" in layers and "layer1.0.downsample.0" not in layers
    calls = {c.name: c for c in models.get("resnet18_cifar").trace(batch_size=2)}
    assert calls["conv1"].output_shape == (2, 32, 32, 64)  # CIFAR stem: stride 1, no pool
    assert calls["fc"].input_shapes == ((2, 512),)
    imagenet = {c.name: c for c in models.get("resnet18").trace()}
    assert imagenet["layer1.0.conv1"].input_shapes == ((1, 56, 56, 64),)  # stride 2 + max-pool


def test_deit_attention_matmuls_are_interceptable():
    calls = models.get("deit_tiny").trace()
    matmuls = [c for c in calls if c.kind == "matmul"]
    assert len(matmuls) == 24
    qk = next(c for c in matmuls if c.name == "blocks.0.attn.qk_matmul")
    assert qk.input_shapes == ((1, 197, 3, 64), (1, 197, 3, 64)) and qk.output_shape == (1, 3, 197, 197)
    assert any(c.name == "blocks.8.mlp.fc2" for c in calls)


def test_param_paths_are_timm_names():
    variables = jax.eval_shape(lambda: models.get("efficientnet_lite0").init(jax.random.key(0)))
    assert variables["params"]["blocks"]["1"]["0"]["conv_pwl"]["kernel"].shape == (1, 1, 96, 24)
    assert variables["params"]["blocks"]["0"]["0"]["conv_dw"]["kernel"].shape == (3, 3, 1, 32)
    params = jax.eval_shape(lambda: models.get("deit_tiny").init(jax.random.key(0)))["params"]
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) == 5_717_416


def test_tiny_variants_run_and_num_classes():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, stage_sizes=(1, 1), widths=(8, 16))
    variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.float32))
    assert model.apply(variables, jnp.ones((2, 32, 32, 3), jnp.float32)).shape == (2, 10)
    # conv1, layer1.0.{conv1,conv2}, layer2.0.{conv1,conv2,downsample.0}, fc
    assert len(spec.quantizable_layers(stage_sizes=(1, 1), widths=(8, 16))) == 7
    vit = models.get("vit_tiny_cifar").build(num_classes=10, depth=1, embed_dim=32, num_heads=2)
    v = vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    assert vit.apply(v, jnp.ones((3, 32, 32, 3), jnp.float32)).shape == (3, 10)


def test_vit_rejects_wrong_image_size():
    vit = models.get("vit_tiny_cifar").build(depth=1)
    with pytest.raises(ValueError, match="expected inputs of size 32x32, got 64x64"):
        vit.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def test_trace_any_flax_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), name="stem")(x)
            return nn.Dense(2, name="out")(x.reshape(x.shape[0], -1))

    calls = intercept.trace_layers(Net(), jax.ShapeDtypeStruct((5, 8, 8, 3), jnp.float32))
    assert [(c.name, c.kind, c.kernel_shape) for c in calls] == [
        ("stem", "conv", (3, 3, 3, 4)), ("out", "dense", (256, 2))]


def test_depthwise_and_pointwise_fast_paths_match_lax():
    from jax import lax

    from eqjax.models import ops

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (5, 5, 1, 6), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    for stride in (1, 2):
        for padding in ("SAME", "VALID", ((1, 3), (2, 0))):
            ref = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn,
                                           feature_group_count=6)
            got = ops.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn,
                                           feature_group_count=6)
            np.testing.assert_allclose(got, ref, atol=1e-5)
    # Pointwise (1x1) convs: a matrix product where it applies (stride 1, no padding), lax otherwise;
    # values and gradients as lax's.
    w1 = jax.random.normal(jax.random.key(2), (1, 1, 6, 4), jnp.float32)
    for stride, padding in ((1, "SAME"), (1, ((0, 0), (0, 0))), (2, "SAME"), (1, ((1, 0), (0, 1)))):
        conv = lambda f, x, w: f(x, w, (stride, stride), padding, dimension_numbers=dn)
        ref, got = conv(lax.conv_general_dilated, x, w1), conv(ops.conv_general_dilated, x, w1)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        grads = [jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(f, x, w))), argnums=(0, 1))(x, w1)
                 for f in (lax.conv_general_dilated, ops.conv_general_dilated)]
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), *grads)


def test_preprocessing_validation():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        models.Preprocessing(224, (0.5,) * 3, (0.5,) * 3, 0.9, "lanczos")
    with pytest.raises(ValueError, match="crop_pct"):
        models.Preprocessing(224, (0.5,) * 3, (0.5,) * 3, 1.5)
