"""Energy model: hand-counted layers, reference totals, closed forms, properties, errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from eqjax import models
from eqjax.quant import policy as policy_lib
from eqjax.algorithms import energy
from eqjax.algorithms.pareto import pareto_front

PAPER = energy.PRESETS["paper"]


class ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x)   # 8x8x3 -> 4x4x4
        x = nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False, name="dw")(x)
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


def _counts(model, shape):
    return {c.name: c for c in energy.count_layers(model, jax.ShapeDtypeStruct(shape, jnp.float32))}


def test_hand_counted_conv_dense_net():
    counts = _counts(ConvDense(), (2, 8, 8, 3))
    assert counts["conv"].macs == 2 * 4 * 4 * 4 * (3 * 3 * 3)
    assert (counts["conv"].weight_elements, counts["conv"].bias_elements) == (108, 4)
    assert counts["conv"].input_elements == 2 * 8 * 8 * 3 and counts["conv"].output_elements == 2 * 64
    assert counts["dw"].macs == 2 * 4 * 4 * 4 * 9 and counts["dw"].weight_elements == 36
    assert counts["dw"].bias_elements == 0
    assert counts["fc"].macs == 2 * 64 * 5 and counts["fc"].weight_elements == 320


def test_hand_counted_one_block_vit():
    vit = models.get("vit_tiny_cifar").build(num_classes=10, depth=1, embed_dim=8, num_heads=2,
                                               image_size=8, patch_size=4)
    counts = _counts(vit, (1, 8, 8, 3))
    tokens, dim, hidden = 5, 8, 32  # 4 patches + class token
    assert counts["patch_embed.proj"].macs == 4 * dim * (4 * 4 * 3)
    assert counts["blocks.0.attn.qkv"].macs == tokens * dim * 3 * dim  # every token counted
    assert counts["blocks.0.attn.qk_matmul"].macs == 2 * tokens * tokens * (dim // 2)
    assert counts["blocks.0.attn.av_matmul"].macs == 2 * tokens * tokens * (dim // 2)
    assert counts["blocks.0.attn.qk_matmul"].weight_elements == 0
    assert counts["blocks.0.mlp.fc1"].macs == tokens * dim * hidden
    assert counts["head"].macs == dim * 10


def test_reference_totals_resnet18_cifar_and_deit_tiny():
    spec = models.get("resnet18_cifar")
    counts = energy.count_layers(spec.build(num_classes=100), spec.example_input(1))
    assert len(counts) == 21
    assert round(sum(c.macs for c in counts) / 1e6, 2) == 555.47
    assert round(sum(c.weight_elements for c in counts) / 1e6, 2) == 11.21
    spec = models.get("deit_tiny")
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    by_kind = lambda pred: sum(c.macs for c in counts if pred(c))
    assert abs(by_kind(lambda c: c.name.startswith("blocks") and c.kind == "dense") / 1e9 - 1.046) < 0.001
    assert abs(by_kind(lambda c: c.kind == "matmul") / 1e9 - 0.179) < 0.001
    assert abs(by_kind(lambda c: c.name == "patch_embed.proj") / 1e9 - 0.029) < 0.001
    assert by_kind(lambda c: c.name == "head") == 192_000
    assert abs(sum(c.macs for c in counts) / 1e9 - 1.254) < 0.001


def _uniform(spec, b, keep=None, **kw):
    return policy_lib.bits_table(policy_lib.build(spec.trace(**kw), w_bits=b, keep_first_last_bits=keep))


def test_paper_relative_energy_closed_form():
    spec = models.get("resnet18_cifar")
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    macs = sum(c.macs for c in counts)
    weights = sum(c.weight_elements for c in counts)
    biases = sum(c.bias_elements for c in counts)
    acts = sum(c.input_elements + c.output_elements for c in counts)
    per_bit = 200 / 32
    for b in (8, 6, 4):
        expected = ((macs * b * b / 1024 + per_bit * (weights * b + biases * 32 + acts * b))
                    / (macs + per_bit * 32 * (weights + biases + acts)))
        assert energy.relative_energy(counts, _uniform(spec, b), PAPER) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("preset", list(energy.PRESETS))
def test_monotone_in_bits(preset):
    spec = models.get("deit_tiny")
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    rel = [energy.relative_energy(counts, _uniform(spec, b, keep=8), energy.PRESETS[preset]) for b in (8, 6, 4, 2)]
    assert 1.0 > rel[0] > rel[1] > rel[2] > rel[3] > 0


def test_batch_scales_activation_terms_only():
    spec = models.get("resnet18_cifar")
    one = energy.count_layers(spec.build(), spec.example_input(1))
    four = energy.count_layers(spec.build(), spec.example_input(4))
    for a, b in zip(one, four):
        assert b.macs == 4 * a.macs and b.input_elements == 4 * a.input_elements
        assert b.weight_elements == a.weight_elements and b.bias_elements == a.bias_elements
    weights_only = dataclasses.replace(PAPER, count_inputs=False, count_outputs=False, mac_product=0.0)
    bits = _uniform(spec, 8)
    assert energy.energy_report(four, bits, weights_only)["total"] == pytest.approx(
        energy.energy_report(one, bits, weights_only)["total"])


def test_breakdown_adds_up_and_horowitz_units():
    spec = models.get("resnet18_cifar")
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    report = energy.energy_report(counts, _uniform(spec, 8, keep=8), energy.PRESETS["horowitz45nm"])
    assert report["total"] == pytest.approx(report["mac"] + report["memory"])
    assert report["total"] == pytest.approx(sum(r["total"] for r in report["per_layer"]))
    assert energy.PRESETS["horowitz45nm"].mac_energy(8, 8) == pytest.approx(0.2 + 0.1, abs=0.01)
    assert energy.PRESETS["horowitz45nm"].mac_energy(32, 32) == 4.6
    fp32 = energy.energy_report(counts, None, PAPER)
    assert fp32["relative"] == 1.0 and fp32["mac"] == pytest.approx(sum(c.macs for c in counts))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown energy preset 'tpu'; known: paper"):
        energy.get_preset("tpu")
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        energy.EnergyModel("bad", "pJ", mac_product=-1.0)
    spec = models.get("resnet18_cifar")
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    bits = _uniform(spec, 8)
    bits["layer9.conv"] = bits.pop("conv1")
    with pytest.raises(ValueError, match=r"not in the model \(1\): layer9.conv \(closest: layer4.1.conv2.*\); model layers without bits \(1\): conv1"):
        energy.energy_report(counts, bits, PAPER)
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"name": "mine", "unit": "pJ", "mac_product": 1.0, "bogus": 2}))
    with pytest.raises(ValueError, match="unknown energy model fields"):
        energy.load_energy_model(str(path))


def test_pareto_front():
    energies = [1.0, 0.25, 0.2, 0.15, 0.12, 0.3]
    accuracies = [74.0, 74.0, 73.0, 73.5, 60.0, 70.0]
    assert pareto_front(energies, accuracies) == [4, 3, 1]


# BUILD_NOTES "Relative energy, first/last layer at 8 bits": (W8A8, W6A6, W4A4, memory share at W8A8).
ENERGY_TABLE = {
    ("resnet18_cifar", "paper"): (0.216, 0.160, 0.106, 0.947),
    ("resnet18_cifar", "horowitz45nm"): (0.206, 0.154, 0.104, 0.924),
    ("deit_tiny", "paper"): (0.202, 0.150, 0.100, 0.919),
    ("deit_tiny", "horowitz45nm"): (0.189, 0.143, 0.098, 0.885),
    ("efficientnet_lite0", "paper"): (0.232, 0.179, 0.126, 0.974),
}


@pytest.mark.parametrize("model, preset", list(ENERGY_TABLE))
def test_build_notes_energy_table(model, preset):
    spec = models.get(model)
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    *relative, memory_share = ENERGY_TABLE[(model, preset)]
    for b, expected in zip((8, 6, 4), relative):
        bits = _uniform(spec, b, keep=8)
        assert round(energy.relative_energy(counts, bits, energy.PRESETS[preset]), 3) == expected, b
    report = energy.energy_report(counts, _uniform(spec, 8, keep=8), energy.PRESETS[preset])
    assert round(report["memory_share"], 3) == memory_share
