"""Fault injection: every file eqjax writes for itself to read back (converted weights, QAT and
reconstruction states, training checkpoints, integer artifacts) is read back exactly or refused
with an error naming it, after truncation at three points, one flipped byte, or a deleted part;
a corrupt newest training checkpoint falls back, bit-identically, to the newest intact one."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import eqjax
from eqjax import checkpoint, storage
from eqjax.algorithms import qat, reconstruction
from eqjax.deploy import artifact
from experiments import loop


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    policy = eqjax.calibrate(model, variables, [x], eqjax.PTQConfig(w_bits=4, a_bits=4, keep_first_last_bits=None))
    return model, variables, policy, x


def _largest_file(path) -> str:
    if os.path.isfile(path):
        return str(path)
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    return max(files, key=os.path.getsize)


def _truncate(fraction):
    def fault(path):
        target = _largest_file(path)
        size = os.path.getsize(target)
        with open(target, "r+b") as f:
            f.truncate(min(int(size * fraction), size - 1))
    return fault


def _flip_byte(path):
    target = _largest_file(path)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _delete_largest(path):
    os.remove(_largest_file(path))


def _flip_meta_digit(meta_file):
    """One digit of a number in the metadata JSON changed: still JSON, different content."""
    def fault(path):
        target = os.path.join(path, meta_file)
        text = open(target).read()
        at = text.index('"num_classes": 4') + len('"num_classes": ') if '"num_classes": 4' in text else \
            next(i for i, ch in enumerate(text) if ch.isdigit())
        open(target, "w").write(text[:at] + ("5" if text[at] != "5" else "6") + text[at + 1:])
    return fault


FAULTS = {"truncate_10pct": _truncate(0.1), "truncate_50pct": _truncate(0.5), "truncate_last_byte": _truncate(1.0),
          "flip_byte": _flip_byte, "delete_data": _delete_largest}


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and
                                      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _read_back_or_refused(load, expected, where):
    """The fault's outcome: the exact content, or an error whose message names ``where``."""
    try:
        got = load()
    except (ValueError, FileNotFoundError) as e:
        assert os.path.basename(str(where)) in str(e), e
        return "refused"
    assert _same(got, expected), "read back something other than what was written"
    return "exact"


def _check_kind(tmp_path, save, load, expected, meta_file):
    outcomes = {}
    for name, fault in {**FAULTS, "meta_digit": _flip_meta_digit(meta_file),
                        "delete_meta": lambda p: os.remove(os.path.join(p, meta_file))}.items():
        where = tmp_path / name
        save(where)
        fault(where)
        outcomes[name] = _read_back_or_refused(lambda: load(where), expected, where)
    assert sum(o == "refused" for o in outcomes.values()) >= 6, outcomes  # the data faults cannot pass
    return outcomes


def test_converted_weights(tmp_path, tiny):
    spec = eqjax.models.get("resnet18_cifar")
    variables = spec.init(jax.random.key(0), num_classes=4, stage_sizes=(1, 1), widths=(8, 16))
    save = lambda d: checkpoint.save(d, variables, model="resnet18_cifar", num_classes=4,
                                     preprocessing=spec.preprocessing)
    save(tmp_path / "intact")
    assert _same(checkpoint.load(tmp_path / "intact").variables, variables)
    _check_kind(tmp_path, save, lambda d: checkpoint.load(d).variables, variables, checkpoint.METADATA_FILE)


def test_qat_state(tmp_path, tiny):
    model, variables, policy, _ = tiny
    scales = {n: np.full((8 if n == "conv" else 4,), 0.01 * (i + 1), np.float32) for i, n in enumerate(policy)}
    result = qat.QatResult(jax.tree_util.tree_map(np.asarray, variables), policy, scales, {"epochs": 1})
    flat = lambda r: (r.variables, r.weight_scales, {n: (lq.a_clip, lq.w_bits) for n, lq in r.policy.items()})
    _check_kind(tmp_path, lambda d: qat.save(str(d), result), lambda d: flat(qat.load(str(d))), flat(result),
                qat.STATE_FILE)


def test_reconstruction_state(tmp_path, tiny):
    _, variables, policy, _ = tiny
    rng = np.random.default_rng(1)
    rounding = {"conv": rng.integers(0, 2, (3, 3, 3, 8)).astype(np.int8), "head": rng.integers(0, 2, (8, 4)).astype(np.int8)}
    scales = {"conv": np.full((8,), 0.02, np.float32), "head": np.full((4,), 0.03, np.float32)}
    result = reconstruction.ReconstructionResult(policy, rounding, scales, [{"unit": "conv", "error_after": 0.5}],
                                                 {"method": "adaround", "iterations": 4})
    flat = lambda r: (r.rounding, r.weight_scales, {n: lq.a_clip for n, lq in r.policy.items()})
    _check_kind(tmp_path, lambda d: reconstruction.save(str(d), result),
                lambda d: flat(reconstruction.load(str(d), policy)), flat(result), reconstruction.STATE_FILE)


def test_integer_artifact(tmp_path, tiny):
    model, variables, policy, x = tiny
    art = artifact.build(model, variables, policy, example=x[:1])
    flat = lambda a: ({n: (l.weight, l.w_scale, l.a_scale) for n, l in a.layers.items()}, a.variables)
    outcomes = {}
    for name, fault in FAULTS.items():
        path = tmp_path / f"{name}.safetensors"
        artifact.save(str(path), art)
        fault(path)
        outcomes[name] = _read_back_or_refused(lambda: flat(artifact.load(str(path))), flat(art), path)
    assert set(outcomes.values()) == {"refused"}, outcomes
    with pytest.raises(FileNotFoundError, match="no integer artifact at"):
        artifact.load(str(tmp_path / "absent.safetensors"))


def _train_state(seed):
    params = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(64, 32)), jnp.float32), "b": jnp.zeros(32)}
    return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9))


def _two_checkpoints(directory):
    ckpts = loop.Checkpoints(str(directory))
    older = _train_state(0).replace(step=1)
    newer = _train_state(1).replace(step=2)
    for state in (older, newer):
        ckpts.save(state, {"config": {"lr": 0.1}, "curve": [{"epoch": int(state.step)}]})
    ckpts.close()
    return older, newer


@pytest.mark.parametrize("fault", [*FAULTS, "meta_digit"])
def test_a_corrupt_newest_training_checkpoint_falls_back_to_the_older_one_exactly(tmp_path, fault):
    older, newer = _two_checkpoints(tmp_path / "checkpoints")
    step_dir = tmp_path / "checkpoints" / "2"
    if fault == "meta_digit":
        meta = step_dir / "meta" / "metadata"
        text = meta.read_text()
        meta.write_text(text.replace('"epoch": 2', '"epoch": 3'))
    else:
        FAULTS[fault](step_dir / "state")
    ckpts = loop.Checkpoints(str(tmp_path / "checkpoints"))
    state, meta = ckpts.restore(_train_state(5))
    ckpts.close()
    if int(state.step) == 2:  # the fault missed every byte orbax reads: the exact newest state
        assert fault == "truncate_last_byte" and _same(state, newer) and meta["curve"] == [{"epoch": 2}]
        return
    assert int(state.step) == 1 and meta["curve"] == [{"epoch": 1}]
    assert _same(state.params, older.params) and _same(state.opt_state, older.opt_state)
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["2"]


def test_an_intact_checkpoint_restores_exactly_and_a_wholly_corrupt_set_is_an_error(tmp_path):
    older, newer = _two_checkpoints(tmp_path / "checkpoints")
    ckpts = loop.Checkpoints(str(tmp_path / "checkpoints"))
    state, meta = ckpts.restore(_train_state(5))
    assert int(state.step) == 2 and _same(state.params, newer.params) and "integrity" not in meta
    ckpts.close()
    for step in ("1", "2"):
        _flip_byte(tmp_path / "checkpoints" / step / "state")
    ckpts = loop.Checkpoints(str(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="no intact checkpoint in"):
        ckpts.restore(_train_state(5))
    ckpts.close()


def test_a_damaged_reconstruction_partial_state_is_set_aside_and_the_run_starts_again(tmp_path, tiny):
    model, variables, policy, x = tiny
    images = np.asarray(jnp.concatenate([x, x]))
    config = reconstruction.ReconstructionConfig(method="adaround", iterations=2, batch_size=4)
    whole = reconstruction.reconstruct(model, variables, policy, images, config)
    partial = tmp_path / "partial"

    def stop_after_first_unit(p):
        if p.get("done") and p["index"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reconstruction.reconstruct(model, variables, policy, images, config, on_progress=stop_after_first_unit,
                                   checkpoint_dir=str(partial))
    _flip_byte(partial / "arrays")
    events = []
    again = reconstruction.reconstruct(model, variables, policy, images, config, on_progress=events.append,
                                       checkpoint_dir=str(partial))
    assert "is damaged" in events[0]["discarded"] or "cannot read" in events[0]["discarded"]
    assert os.path.isdir(events[0]["moved_to"]) and not any(e.get("resumed") for e in events)
    assert _same(again.rounding, whole.rounding)


def test_files_written_without_digests_load_with_a_warning(tmp_path, tiny):
    spec = eqjax.models.get("resnet18_cifar")
    variables = spec.init(jax.random.key(0), num_classes=4, stage_sizes=(1, 1), widths=(8, 16))
    directory = checkpoint.save(tmp_path / "ck", variables, model="resnet18_cifar", num_classes=4,
                                preprocessing=spec.preprocessing)
    meta_path = os.path.join(directory, checkpoint.METADATA_FILE)
    meta = json.load(open(meta_path))
    del meta[storage.INTEGRITY_KEY]
    json.dump(meta, open(meta_path, "w"))
    with pytest.warns(UserWarning, match="written without digests"):
        assert _same(checkpoint.load(directory).variables, variables)


def test_staged_directory_replaces_a_folder_by_renames(tmp_path):
    target = tmp_path / "state"
    for content in ("old", "new"):
        with storage.staged_directory(str(target)) as staging:
            open(os.path.join(staging, "f"), "w").write(content)
    assert open(target / "f").read() == "new"
    assert sorted(os.listdir(tmp_path)) == ["state"]  # no staging or old folder left behind
    with pytest.raises(RuntimeError):
        with storage.staged_directory(str(target)) as staging:
            open(os.path.join(staging, "f"), "w").write("broken")
            raise RuntimeError
    assert open(target / "f").read() == "new" and sorted(os.listdir(tmp_path)) == ["state"]
    shutil.rmtree(target)


def test_results_json_read_back_by_a_flag_is_checked_against_its_digest(tmp_path):
    from experiments import common

    path = str(tmp_path / "results.json")
    common.write_json_atomic(path, {"model": "m", "bits": {"fc": {"w": 4, "a": 8}}, "top1": np.float32(71.5)})
    assert common.read_results_json(path, flag="--bits_json") == {"model": "m", "bits": {"fc": {"w": 4, "a": 8}},
                                                                  "top1": 71.5}
    text = open(path).read()
    open(path, "w").write(text.replace('"w": 4', '"w": 2'))
    with pytest.raises(storage.CorruptFileError, match=r"--bits_json=.*results.json does not match its digest"):
        common.read_results_json(path, flag="--bits_json")
    json.dump({"bits": {"fc": {"w": 2, "a": 8}}}, open(path, "w"))  # written by hand: no digest to check
    assert common.read_results_json(path, flag="--bits_json")["bits"]["fc"]["w"] == 2
    open(path, "w").write('{"bits": ')
    with pytest.raises(ValueError, match=r"--bits_json=.*results.json is not a results.json \(JSONDecodeError"):
        common.read_results_json(path, flag="--bits_json")
