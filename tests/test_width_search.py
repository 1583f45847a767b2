"""Bit widths learned under a budget: the relaxed usage is the energy model's at one-hot
probabilities, the fixed widths hold every budget (brute force on a 3-layer problem), the hard
mixture is the deployed quantized model, one compilation across budgets, QAT continues from the
search as it ended, and bad inputs fail before any training."""

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqjax import ptq, training
from eqjax.algorithms import allocation, energy, qat, width_search
from eqjax.quant import apply
from experiments import pareto, qat as qat_script
from tests import test_qat
from tests.test_experiments import run as run_module
from tests.test_qat import MEAN, STD, _run_config

PAPER = energy.PRESETS["paper"]
CANDIDATES = (2, 4, 8)


@pytest.fixture(scope="module")
def small():
    """tests.test_qat's three-layer CNN with BatchNorm statistics, its images and a W2A2 policy."""
    return test_qat.small.__wrapped__()


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """tests.test_qat's tiny training and test tars."""
    return test_qat.tars.__wrapped__(tmp_path_factory)


def _calibrate(small):
    config = ptq.PTQConfig(w_bits=2, a_bits=2, keep_first_last_bits=None)
    return lambda p: ptq.with_clips(p, small["statistics"], config)


def _counts(small):
    return energy.count_layers(small["model"], small["x"][:1], variables=small["variables"])


def _uniform_energy(small, bits):
    return energy.relative_energy(_counts(small), {c.name: {"w": bits, "a": bits} for c in _counts(small)}, PAPER)


def _start(small, budgets, **config):
    search = width_search.SearchConfig(budgets=budgets, candidate_bits=CANDIDATES, **config)
    return width_search.prepare(small["model"], small["variables"], small["policy"], small["calls"],
                                example=small["x"][:1], config=search, calibrate=_calibrate(small))


def test_relaxed_usage_at_one_hot_probabilities_is_the_energy_model_figure(small):
    counts = _counts(small)
    layers = [c.name for c in counts]
    opts = list(itertools.product(CANDIDATES, CANDIDATES))
    tables, fixed = allocation.usage_tables(counts, layers, opts, {}, allocation.BUDGET_KINDS, PAPER)
    k = len(CANDIDATES)
    rng = np.random.default_rng(0)
    for _ in range(10):
        w, a = rng.integers(0, k, len(layers)), rng.integers(0, k, len(layers))
        p_w, p_a = np.eye(k)[w], np.eye(k)[a]
        bits = {n: {"w": CANDIDATES[i], "a": CANDIDATES[j]} for n, i, j in zip(layers, w, a)}
        relaxed = width_search.relaxed_usage({kind: t.reshape(len(layers), k, k) for kind, t in tables.items()},
                                             fixed, p_w, p_a)
        assert relaxed["relative_energy"] == pytest.approx(energy.relative_energy(counts, bits, PAPER), rel=1e-12)
        for kind in allocation.BUDGET_KINDS:
            assert relaxed[kind] == pytest.approx(allocation.measured_usage(counts, bits, kind, PAPER), rel=1e-12)
    # The setup's float32 tables over the budget give the same figure in the jitted step.
    budget = _uniform_energy(small, 4)
    start = _start(small, (("relative_energy", budget),))
    p = jnp.asarray(np.eye(k)[[0, 1, 2]], jnp.float32)
    got = width_search.relaxed_usage(start.setup.usage, start.setup.fixed_usage, p, p)["relative_energy"] * budget
    bits = {n: {"w": b, "a": b} for n, b in zip(start.setup.searched, CANDIDATES)}
    assert float(got) == pytest.approx(energy.relative_energy(counts, bits, PAPER), rel=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_fixed_widths_hold_the_budget_and_are_the_most_probable_feasible_ones(small, fraction):
    counts = _counts(small)
    low, high = _uniform_energy(small, min(CANDIDATES)), _uniform_energy(small, max(CANDIDATES))
    budget = low + fraction * (high - low)
    gbops = allocation.measured_usage(counts, {c.name: {"w": 8, "a": 4} for c in counts}, "gbops", PAPER)
    start = _start(small, (("relative_energy", budget), ("gbops", gbops)))
    rng = np.random.default_rng(int(100 * fraction))
    logits = {"w": rng.normal(0, 2, (3, 3)).astype(np.float32), "a": rng.normal(0, 2, (3, 3)).astype(np.float32)}
    widths = width_search.fix_widths(start, logits)
    written = {n: {"w": b["w"], "a": b["a"]} for n, b in widths["bits"].items()}
    assert energy.relative_energy(counts, written, PAPER) <= budget
    assert allocation.measured_usage(counts, written, "gbops", PAPER) <= gbops
    # Brute force over all 9^3 choices: the most probable one within both budgets.
    p = {k: np.asarray(jax.nn.softmax(v, axis=-1), np.float64) for k, v in logits.items()}
    best, best_score = None, -np.inf
    for choice in itertools.product(itertools.product(range(3), range(3)), repeat=3):
        bits = {n: {"w": CANDIDATES[i], "a": CANDIDATES[j]} for n, (i, j) in zip(start.setup.searched, choice)}
        if (energy.relative_energy(counts, bits, PAPER) <= budget
                and allocation.measured_usage(counts, bits, "gbops", PAPER) <= gbops):
            score = sum(np.log(p["w"][l, i]) + np.log(p["a"][l, j]) for l, (i, j) in enumerate(choice))
            if score > best_score:
                best, best_score = bits, score
    assert written == best
    most_probable = {n: widths["most_probable"][n] for n in start.setup.searched}
    assert widths["repaired"] == (most_probable != best)


def test_the_narrowest_budget_returns_the_narrowest_policy_and_the_widest_the_preferred_one(small):
    start = _start(small, (("relative_energy", _uniform_energy(small, 2)),))
    wide = {"w": np.tile([0.0, 0.0, 5.0], (3, 1)), "a": np.tile([0.0, 0.0, 5.0], (3, 1))}
    narrowest = width_search.fix_widths(start, wide)
    assert narrowest["repaired"] and all(b == {"w": 2, "a": 2} for b in narrowest["bits"].values())
    start = _start(small, (("relative_energy", _uniform_energy(small, 8)),))
    widest = width_search.fix_widths(start, wide)
    assert not widest["repaired"] and all(b == {"w": 8, "a": 8} for b in widest["bits"].values())


def test_warm_start_makes_the_budget_milp_widths_the_most_probable(small):
    budget = _uniform_energy(small, 4)
    start = _start(small, (("relative_energy", budget),))
    rng = np.random.default_rng(5)
    cost = {n: rng.uniform(0, 1, (3, 3)) for n in start.setup.searched}
    warm, report = width_search.warm_start(start, cost)
    widths = width_search.fix_widths(warm, warm.trainables["logits"])
    assert not widths["repaired"] and {n: widths["bits"][n] for n in warm.setup.searched} == report["bits"]
    assert widths["usage"]["relative_energy"] <= budget
    p = jax.nn.softmax(warm.trainables["logits"]["w"], axis=-1)
    np.testing.assert_allclose(np.max(np.asarray(p), axis=-1), np.exp(2.0) / (np.exp(2.0) + 2), rtol=1e-6)
    with pytest.raises(ValueError, match="cost lacks searched layers: conv0"):
        width_search.warm_start(start, {n: c for n, c in cost.items() if n != "conv0"})


def test_hard_mixture_is_the_quantized_model_of_the_most_probable_widths(small):
    start = _start(small, (("relative_energy", 1.0),), relaxation="hard")
    rng = np.random.default_rng(3)
    trainables = {**start.trainables, "logits": {"w": jnp.asarray(rng.normal(0, 1, (3, 3)), jnp.float32),
                                                 "a": jnp.asarray(rng.normal(0, 1, (3, 3)), jnp.float32)}}
    logits, _, penalty, metrics = width_search.forward(small["model"], start.setup, trainables,
                                                       small["variables"]["batch_stats"], small["x"],
                                                       qat_config=qat.QatConfig(), config=start.config)
    widths = width_search.fix_widths(start, trainables["logits"])
    assert not widths["repaired"]
    assert float(metrics["most_probable_relative_energy"]) == pytest.approx(widths["usage"]["relative_energy"], rel=1e-5)
    # The penalty reads the most probable widths' usage (budget 1: the usage itself), zero within δ below.
    below = 1 - start.config.fill_tolerance - widths["usage"]["relative_energy"]
    assert float(penalty) == pytest.approx(start.config.penalty * below, rel=1e-5)
    config = dataclasses.replace(start.config, budgets=(("relative_energy", widths["usage"]["relative_energy"] * 1.01),))
    at_budget = width_search.prepare(small["model"], small["variables"], small["policy"], small["calls"],
                                     example=small["x"][:1], config=config, calibrate=_calibrate(small))
    _, _, penalty, _ = width_search.forward(small["model"], at_budget.setup, {**at_budget.trainables, "logits":
                                            trainables["logits"]}, small["variables"]["batch_stats"], small["x"],
                                            qat_config=qat.QatConfig(), config=config)
    assert float(penalty) == 0.0
    # QAT starts from the search as it ended: its forward is the hard mixture's.
    qat_start = width_search.qat_start(start, trainables, small["variables"]["batch_stats"], widths)
    expected, _ = qat.forward(small["model"], qat_start.setup, qat_start.trainables, qat_start.variables["batch_stats"],
                              small["x"], config=qat.QatConfig())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # And it is the plain quantized model of those widths and steps.
    variables, policy = qat.quantized_model(qat_start.setup, qat_start.variables, qat_start.trainables,
                                            qat_start.variables["batch_stats"])
    plain = apply.quantized_apply(small["model"], variables, policy, small["x"], quantize_kernels=False)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert {n: (int(lq.w_bits), int(lq.a_bits)) for n, lq in qat_start.setup.policy.items()} == {
        n: (b["w"], b["a"]) for n, b in widths["bits"].items()}


def test_search_meets_a_tight_budget_with_one_compilation_across_budgets(small):
    tight, loose = _uniform_energy(small, 3), _uniform_energy(small, 6)
    starts = [_start(small, (("relative_energy", b),)) for b in (tight, loose)]
    config = qat.QatConfig()
    forward = functools.partial(width_search.forward, small["model"], qat_config=config, config=starts[0].config)
    optimizer = qat.make_optimizer(optax.sgd(1e-2), optax.sgd(1e-3), optax.adam(0.05))
    step = qat.make_step(small["model"], optimizer, config, seed=0, mean=MEAN, std=STD, augmentation=False,
                         forward_fn=forward)
    images, labels = jnp.asarray(small["images"]), jnp.asarray(small["labels"])
    ends = []
    for start in starts:
        state = training.TrainState(jnp.zeros((), jnp.int32), start.trainables, small["variables"]["batch_stats"],
                                    optimizer.init(start.trainables))
        for _ in range(40):
            state, metrics = step(state, start.setup, small["variables"], images, labels)
        ends.append((start, state, metrics))
    assert step._cache_size() == 1
    (tight_start, tight_state, tight_metrics), (_, loose_state, _) = ends
    # From 1.6x over the budget to the options around it (3 layers: none lands on it exactly).
    assert 0.8 <= float(tight_metrics["most_probable_relative_energy"]) <= 1.1
    widths = width_search.fix_widths(tight_start, tight_state.params["logits"])
    assert 0.8 * tight <= widths["usage"]["relative_energy"] <= tight
    # The looser budget leaves wider layers.
    mean_bits = lambda state: float(np.mean(np.asarray(CANDIDATES)[np.argmax(np.asarray(state.params["logits"]["w"]), -1)]))
    assert mean_bits(loose_state) >= mean_bits(tight_state)


@pytest.mark.parametrize("config, message", [
    (dict(budgets=()), "budgets is empty"),
    (dict(budgets=(("relative_energy", 0.1), ("relative_energy", 0.2))), "gives a kind twice"),
    (dict(budgets=(("joules", 0.1),)), "unknown kinds \\['joules'\\]"),
    (dict(budgets=(("gbops", -1.0),)), "budgets must be positive numbers"),
    (dict(budgets=(("gbops", 1.0),), candidate_bits=()), "candidate_bits is empty"),
    (dict(budgets=(("gbops", 1.0),), candidate_bits=(1, 4)), "candidate_bits .*1"),
    (dict(budgets=(("gbops", 1.0),), candidate_bits=(4, 4)), "must be distinct"),
    (dict(budgets=(("gbops", 1.0),), relaxation="gumbel"), "relaxation must be one of"),
    (dict(budgets=(("gbops", 1.0),), fill_tolerance=1.0), "fill_tolerance must be in"),
])
def test_search_config_refuses_bad_settings(config, message):
    with pytest.raises(ValueError, match=message):
        width_search.SearchConfig(**config)


def test_prepare_refuses_budgets_below_the_narrowest_and_bad_layers(small):
    smallest = _uniform_energy(small, 2)
    with pytest.raises(ValueError, match=f"below the smallest feasible value {smallest:.6g}"):
        _start(small, (("relative_energy", smallest * 0.99),))
    search = width_search.SearchConfig(budgets=(("relative_energy", 0.5),), candidate_bits=CANDIDATES)
    common = dict(example=small["x"][:1], config=search, calibrate=_calibrate(small))
    with pytest.raises(ValueError, match="keep names layers the policy lacks: conv9"):
        width_search.prepare(small["model"], small["variables"], small["policy"], small["calls"], keep=["conv9"], **common)
    with pytest.raises(ValueError, match="no layer to search"):
        width_search.prepare(small["model"], small["variables"], small["policy"], small["calls"],
                             keep=["conv0", "conv1", "head"], **common)
    with pytest.raises(ValueError, match="asymmetric"):
        width_search.prepare(small["model"], small["variables"], small["policy"], small["calls"],
                             qat_config=qat.QatConfig(asymmetric=True), **common)


# ---------------------------------------------------------------------------------------------
# experiments.qat --learn_bits
# ---------------------------------------------------------------------------------------------


def _search_config(budget):
    return width_search.SearchConfig(budgets=(("relative_energy", budget),), candidate_bits=(2, 4, 8))


def test_learned_widths_run_holds_its_budget_and_resumes_a_killed_search_exactly(tars, tmp_path):
    budget = 0.09
    overrides = dict(search=_search_config(budget), epochs=1, ptq=ptq.PTQConfig(w_bits=4, a_bits=4))
    reference = qat_script.run(_run_config(tars, tmp_path / "a", **overrides))
    search = reference["width_search"]
    assert search["usage"]["relative_energy"] <= budget
    assert reference["energy"]["relative"] == pytest.approx(search["usage"]["relative_energy"], rel=1e-12)
    assert reference["bits"]["conv1"] == {"w": 8, "a": 8} and reference["bits"]["fc"] == {"w": 8, "a": 8}  # kept
    assert len(search["probabilities"]) == 19 and len(search["curve"]) == 2 and reference["method"] == "learned widths + QAT"

    def kill_at_search_step_2(step):  # after the checkpoint of step 1
        if step == 2 and not (tmp_path / "b" / "qat" / "search" / "result").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat_script.run(_run_config(tars, tmp_path / "b", **overrides), on_step=kill_at_search_step_2)
    with pytest.raises(FileExistsError, match="--resume"):
        qat_script.run(_run_config(tars, tmp_path / "b", **overrides))
    resumed = qat_script.run(_run_config(tars, tmp_path / "b", resume=True, **overrides))
    assert resumed["bits"] == reference["bits"] and resumed["top1"] == reference["top1"]
    a, b = qat.load(reference["final_state"]), qat.load(resumed["final_state"])
    for x, y in zip(jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(tmp_path / "a" / "qat" / "results.json") as f:
        assert json.load(f)["width_search"]["budgets"] == {"relative_energy": budget}
    # experiments.pareto draws it apart from uniform QAT, beside its round-to-nearest start.
    points = pareto.load_points([str(tmp_path / "a" / "qat" / "results.json")])
    assert [p["method"] for p in points] == ["learned", "nearest", "nearest"]
    assert points[0]["label"].startswith("learned widths + QAT") and points[1]["label"].startswith("learned round")


def test_learned_widths_runs_fail_before_training(tars, tmp_path):
    steps = []
    with pytest.raises(ValueError, match="--budget 0.01 is below the smallest feasible value"):
        qat_script.run(_run_config(tars, tmp_path, search=_search_config(0.01)), on_step=steps.append)
    with pytest.raises(ValueError, match="--learn_bits chooses the widths itself .*--control"):
        _run_config(tars, tmp_path, search=_search_config(0.1), control=True)
    assert not steps


def test_learn_bits_cli_gives_one_line_errors(tmp_path):
    cases = [(["--budget=0.1"], "--budget needs --learn_bits"),
             (["--learn_bits"], "--learn_bits needs a budget"),
             (["--learn_bits", "--budget=0.1", "--candidate_bits=1,4"], "--candidate_bits must be in [2, 16]"),
             (["--learn_bits", "--budget=0.1", "--control"], "--learn_bits chooses the widths itself")]
    for flags, message in cases:
        out = run_module("experiments.qat", *flags, f"--workdir={tmp_path}", check=False)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), out.stderr[-2000:]
