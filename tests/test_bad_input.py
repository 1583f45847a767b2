"""Bad input gives one clear error before long work, never a traceback or a believable wrong result.

Library calls raise a specific exception whose message names the argument or file; scripts
turn expected errors into one ``error: ...`` line on stderr and exit status 2, leaving no
partial output. Cases run in-process where the library API allows, plus a few real CLI runs.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import eqjax
from eqjax import checkpoint, data, ptq
from eqjax.quant import calibration, numerics
from eqjax.algorithms import reconstruction
from tests.image_tar import write_image_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
PRE = eqjax.models.Preprocessing(32, (0.5,) * 3, (0.25,) * 3)


def _image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def good_tar(tmp_path_factory):
    return write_image_tar(tmp_path_factory.mktemp("tar") / "good.tar",
                           {f"c{c}": [_image(c * 10 + i) for i in range(4)] for c in range(3)})


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG")
    return buf.getvalue()


def _folder(root, files: dict[str, bytes]):
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    return str(root)


# ---------------------------------------------------------------------------------------------
# Numerics: NaN, Inf and empty tensors never turn into a stand-in scale
# ---------------------------------------------------------------------------------------------

NON_FINITE = [np.array([1.0, np.nan, -2.0], np.float32), np.array([1.0, np.inf], np.float32),
              np.array([[1.0, -np.inf]], np.float32)]


@pytest.mark.parametrize("x", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_quantize_of_non_finite_concrete_values_raises(x):
    with pytest.raises(ValueError, match=r"x holds 1 non-finite values of"):
        eqjax.quantize(x, 8)


def test_quantize_of_nan_under_jit_is_nan_not_clipped():
    out = jax.jit(lambda x: eqjax.quantize(x, 8))(jnp.array([1.0, jnp.nan, -2.0, 100.0]))
    assert np.isnan(np.asarray(out)).all()  # a NaN scale: every output NaN, nothing clipped to ±1


@pytest.mark.parametrize("estimator", [
    lambda x: numerics.absmax_scale(x, 8), lambda x: calibration.percentile_scale(x, 8),
    lambda x: calibration.mse_scale(x, 8), lambda x: calibration.estimate_scale(x, 8, method="mse"),
    lambda x: eqjax.quantize(x, 4, axis=0)], ids=["absmax", "percentile", "mse", "estimate", "quantize"])
def test_empty_tensors_are_named(estimator):
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0, 3\)\)"):
        estimator(np.zeros((0, 3), np.float32))


@pytest.mark.parametrize("estimator", ["percentile", "mse"])
def test_estimators_refuse_nan(estimator):
    with pytest.raises(ValueError, match="non-finite"):
        calibration.estimate_scale(np.array([np.nan, 1.0], np.float32), 8, method=estimator)


def test_statistics_that_saw_nothing_raise_or_give_nan_under_jit():
    with pytest.raises(ValueError, match=r"saw no values \(init_stats\(\) never updated\)"):
        calibration.scale_from_stats(calibration.init_stats(), 8)
    scale = jax.jit(lambda s: calibration.scale_from_stats(s, 8))(calibration.init_stats())
    assert np.isnan(float(scale))


@pytest.mark.parametrize("call, message", [
    (lambda: eqjax.quantize(np.ones(3, np.float32), 1), "bits must be in [2, 16], got 1"),
    (lambda: eqjax.quantize(np.ones(3, np.float32), 17), "bits must be in [2, 16], got 17"),
    (lambda: eqjax.quantize(np.ones(3, np.float32), 8, scale=-1.0), "scale must be positive and finite"),
    (lambda: eqjax.quantize(np.ones((2, 3), np.float32), 8, scale=np.ones(2, np.float32), axis=1),
     "scale must have shape [] or [3]"),
    (lambda: eqjax.PTQConfig(w_bits=1), "w_bits must be in [2, 16], got 1"),
    (lambda: eqjax.PTQConfig(a_bits=40), "a_bits must be in [2, 16], got 40"),
    (lambda: eqjax.PTQConfig(calib_method="minmax"), "calib_method must be one of"),
    (lambda: eqjax.PTQConfig(percentile=0.0), "percentile must be in (0, 100], got 0.0"),
    (lambda: reconstruction.ReconstructionConfig(iterations=0), "iterations must be >= 1, got 0"),
    (lambda: reconstruction.ReconstructionConfig(drop_prob=1.0), "drop_prob must be in [0, 1), got 1.0"),
    (lambda: reconstruction.ReconstructionConfig(method="gptq"), "method must be one of"),
    (lambda: eqjax.quantize(np.ones(3, np.float32), 8, signed="yes"), "signed must be a bool or a boolean array, got 'yes'"),
    (lambda: eqjax.quantize(np.ones(3, np.float32), 8, signed=np.int32(1)), "signed must be a bool"),
    (lambda: calibration.update_stats(calibration.init_stats(), np.zeros((0, 3))),
     "update_stats needs at least one value, got an empty array of shape (0, 3)"),
], ids=["bits1", "bits17", "negative-scale", "scale-shape", "w_bits", "a_bits", "calib_method",
        "percentile", "iterations", "drop_prob", "method", "signed-str", "signed-int", "empty-stats"])
def test_bad_arguments_name_the_argument_and_value(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Library API: empty or mismatched inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_net():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(4, name="fc1")(x)))

    net = Net()
    return net, net.init(jax.random.key(0), jnp.ones((1, 5)))


def test_calibrate_on_no_batches(dense_net):
    with pytest.raises(ValueError, match="batches is empty: calibration needs at least one batch"):
        eqjax.calibrate(*dense_net, [], eqjax.PTQConfig())


def test_rule_that_matches_no_layer_names_the_closest(dense_net):
    with pytest.raises(ValueError, match=r"^bits rules that match no layer of the model: fc3 \(closest layers: fc2, fc1\)$"):
        eqjax.calibrate(*dense_net, [jnp.ones((2, 5))], eqjax.PTQConfig(rules=[("fc3", 4)]))


def test_quantize_an_uncalibrated_policy(dense_net):
    net, variables = dense_net
    policy = ptq.build_policy(ptq.layer_calls(net, jnp.ones((1, 5))), eqjax.PTQConfig())
    with pytest.raises(ValueError, match="not calibrated"):
        eqjax.quantize_model(net, variables, policy)


def test_reconstruct_with_no_images_or_unknown_blocks(dense_net):
    net, variables = dense_net
    policy = eqjax.calibrate(net, variables, [jnp.ones((2, 5))], eqjax.PTQConfig())
    with pytest.raises(ValueError, match="no calibration images"):
        reconstruction.reconstruct(net, variables, policy, np.zeros((0, 5), np.float32))
    with pytest.raises(ValueError, match="blocks that name no module of the model: head"):
        reconstruction.reconstruct(net, variables, policy, np.ones((4, 5), np.float32), blocks=["head"])


# ---------------------------------------------------------------------------------------------
# Datasets: archives that end early, unreadable images, labels that do not match
# ---------------------------------------------------------------------------------------------


def test_tar_cut_inside_a_member(good_tar, tmp_path):
    cut = tmp_path / "cut.tar"
    content = open(good_tar, "rb").read()
    with tarfile.open(good_tar) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(content[:last.offset_data + last.size // 2])
    with pytest.raises(ValueError, match=r"cut.tar ends early: unexpected end of data inside a member"):
        data.open_dataset(f"tar:{cut}")


def test_tar_cut_at_a_member_boundary(good_tar, tmp_path):
    with tarfile.open(good_tar) as tar:
        members = tar.getmembers()
    end = members[6].offset  # the header of the 7th member: 6 whole members before it
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(good_tar, "rb").read()[:end])
    with pytest.raises(ValueError, match=r"ends early: no end-of-archive block after member train/c1/0001.png "
                                         r"\(6 members read"):
        data.open_dataset(f"tar:{cut}")


def test_not_a_tar(tmp_path):
    path = tmp_path / "noise.tar"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ValueError, match="noise.tar is not a readable tar archive"):
        data.open_dataset(f"tar:{path}")


def test_intact_tar_opens(good_tar):
    source = data.open_dataset(f"tar:{good_tar}")
    assert len(source) == 12 and source.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.fixture
def folder_with_bad_images(tmp_path):
    good = _jpeg(_image(1))
    return _folder(tmp_path / "ds", {"a/1.jpg": good, "a/2.jpg": good[:len(good) // 2],  # truncated JPEG
                                     "b/3.jpg": good, "b/4.png": b"not an image at all"})


def test_unreadable_image_is_named(folder_with_bad_images):
    source = data.open_dataset(f"folder:{folder_with_bad_images}")
    with pytest.raises(data.BadImageError, match=r"cannot decode image a/2.jpg"):
        list(data.iterate_batches(source, range(len(source)), PRE, batch_size=2))
    with pytest.raises(data.BadImageError, match=r"cannot decode image b/4.png"):
        data.load_uint8(source, [3], PRE)


def test_unreadable_images_skipped_on_request(folder_with_bad_images):
    source = data.open_dataset(f"folder:{folder_with_bad_images}")
    skipped = []
    batches = list(data.iterate_batches(source, range(len(source)), PRE, batch_size=2, skipped=skipped))
    assert [len(labels) for _, labels in batches] == [1, 1]
    assert [b[1].tolist() for b in batches] == [[0], [1]]
    assert len(skipped) == 2 and "a/2.jpg" in skipped[0] and "b/4.png" in skipped[1]


def test_class_names_file_sets_the_labels(tmp_path):
    root = _folder(tmp_path / "ds" / "val", {"n02/1.png": _png(_image(1)), "n07/2.png": _png(_image(2))})
    (tmp_path / "ds" / "synset_words.txt").write_text("n00 zero\nn01 one\nn02 two, 2\nn03\nn04\nn05\nn06\nn07 x\n")
    source = data.open_dataset(f"folder:{root}")
    assert source.labels.tolist() == [2, 7] and source.class_names_file.endswith("synset_words.txt")
    (tmp_path / "ds" / "val" / "classes.txt").write_text("n07\n")  # nearer file wins, lacks n02
    with pytest.raises(ValueError, match=r"1 class folders are not listed in .*classes.txt \(e.g. n02\)"):
        data.open_dataset(f"folder:{root}")


@pytest.mark.parametrize("files, message", [
    ({"labels.txt": b"a.png\n"}, r"labels.txt:1: expected '<file> <class index>', got 'a.png'"),
    ({"labels.txt": b"a.png 1\nb.png 2\n", "a.png": _png(_image())}, r"lists 1 missing files, e.g. \['b.png'\]"),
    ({"notes.md": b"x"}, r"is empty: no labels.txt entries or images"),
], ids=["labels-line", "labels-missing-file", "empty"])
def test_folder_layout_errors(tmp_path, files, message):
    root = _folder(tmp_path / "ds", files)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.open_dataset(f"folder:{root}")


@pytest.mark.parametrize("spec, error, message", [
    ("cifar100", ValueError, r"--dataset='cifar100' does not parse"),
    ("pkg:mnist", ValueError, r"unknown package dataset 'mnist'"),
    ("folder:/nonexistent/dir", FileNotFoundError, r"dataset directory not found: /nonexistent/dir"),
    ("tar:/nonexistent.tar", FileNotFoundError, r"dataset archive not found: /nonexistent.tar"),
], ids=["no-kind", "pkg", "folder", "tar"])
def test_dataset_specs(spec, error, message):
    with pytest.raises(error, match=message):
        data.open_dataset(spec, name="--dataset")


# ---------------------------------------------------------------------------------------------
# Scripts in-process: checked before long work, no partial output
# ---------------------------------------------------------------------------------------------


def _ptq_config(tmp_path, **workload):
    from experiments import ptq as ptq_script, workload as workload_lib

    fields = dict(model="resnet18_cifar", weights="random", eval_images=4, calib_images=4, batch_size=4) | workload
    return ptq_script, ptq_script.PtqRunConfig(workload=workload_lib.WorkloadConfig(**fields),
                                               ptq=eqjax.PTQConfig(w_bits=8), workdir=str(tmp_path / "work"))


def _assert_failed_early(script, config, tmp_path, error, message):
    logged = []
    with pytest.raises(error) as e:
        script.run(config, log=logged.append)
    assert message in str(e.value), str(e.value)
    assert not any("calibrating on" in line for line in logged), logged
    assert not os.path.exists(os.path.join(config.workdir, "ptq", "results.json"))


def test_class_folders_that_are_not_the_models_classes(tmp_path, good_tar):
    weights = tmp_path / "weights"
    spec = eqjax.models.get("resnet18_cifar")
    checkpoint.save(weights, spec.init(jax.random.key(0), num_classes=10, stage_sizes=(1, 1), widths=(8, 16)),
                          model="resnet18_cifar", num_classes=10, preprocessing=spec.preprocessing)
    script, config = _ptq_config(tmp_path, weights=str(weights), dataset=f"tar:{good_tar}",
                                 calib_dataset=f"tar:{good_tar}")
    _assert_failed_early(script, config, tmp_path, ValueError,
                         "has 3 class folders (c0, c1, c2) but the model has 10 classes")


@pytest.mark.parametrize("workload, error, message", [
    (dict(weights="/nonexistent/weights"), (ValueError, OSError), "/nonexistent/weights"),
    (dict(eval_images=100), ValueError, "--eval_images=100 but the dataset has 12 images"),
    (dict(calib_images=100), ValueError, "--calib_images=100 but only"),
    (dict(dataset="tar:/nonexistent.tar"), FileNotFoundError, "dataset archive not found"),
], ids=["weights", "eval_images", "calib_images", "dataset"])
def test_ptq_checks_before_long_work(tmp_path, good_tar, workload, error, message):
    script, config = _ptq_config(tmp_path, **(dict(dataset=f"tar:{good_tar}", calib_dataset=f"tar:{good_tar}")
                                              | workload))
    _assert_failed_early(script, config, tmp_path, error, message)


def test_workdir_that_is_a_file(tmp_path, good_tar):
    script, config = _ptq_config(tmp_path, dataset=f"tar:{good_tar}", calib_dataset=f"tar:{good_tar}")
    (tmp_path / "work").write_text("not a folder")
    _assert_failed_early(script, config, tmp_path, OSError, "cannot write results to")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_workdir_not_writable(tmp_path, good_tar):
    script, config = _ptq_config(tmp_path, dataset=f"tar:{good_tar}", calib_dataset=f"tar:{good_tar}")
    (tmp_path / "work").mkdir(mode=0o500)
    _assert_failed_early(script, config, tmp_path, OSError, "cannot write results to")


def test_bad_images_stop_the_run_or_are_skipped_and_recorded(tmp_path, folder_with_bad_images, good_tar):
    import dataclasses

    # Calibrating on the bad images stops at the first one (before anything is compiled).
    script, config = _ptq_config(tmp_path, dataset=f"tar:{good_tar}", calib_dataset=f"folder:{folder_with_bad_images}")
    with pytest.raises(data.BadImageError, match="cannot decode image a/2.jpg"):
        script.run(config, log=lambda line: None)
    assert not os.path.exists(os.path.join(config.workdir, "ptq", "results.json"))
    script, config = _ptq_config(tmp_path, dataset=f"folder:{folder_with_bad_images}",
                                 calib_dataset=f"tar:{good_tar}")
    skip = dataclasses.replace(config, workload=dataclasses.replace(config.workload, skip_bad_images=True))
    logged = []
    result = script.run(skip, log=logged.append)
    assert result["num_eval_images"] == 2 and len(result["skipped_images"]) == 2
    assert sum("WARNING: skipped:" in line for line in logged) == 2
    mode = os.stat(result["results_path"]).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the usual file mode, not 0600


def test_mixed_budget_without_budget_strategy(tmp_path):
    from experiments import mixed, workload as workload_lib

    with pytest.raises(ValueError, match=r"--budget=0.5 is used by --strategy=budget only"):
        mixed.MixedRunConfig(workload=workload_lib.WorkloadConfig(model="resnet18_cifar", weights="random"),
                             ptq=eqjax.PTQConfig(), budget=0.5)


def test_mixed_infeasible_budget_names_the_smallest_feasible_one(tmp_path, good_tar):
    from experiments import mixed, workload as workload_lib

    config = mixed.MixedRunConfig(
        workload=workload_lib.WorkloadConfig(model="resnet18_cifar", weights="random", dataset=f"tar:{good_tar}",
                                             calib_dataset=f"tar:{good_tar}", eval_images=4, calib_images=4),
        ptq=eqjax.PTQConfig(), strategy="budget", budget=0.01, workdir=str(tmp_path / "work"))
    logged = []
    with pytest.raises(ValueError, match=r"--budget=0.01 is below the smallest feasible relative energy 0\.1051 \(every layer at 4 bits\)"):
        mixed.run(config, log=logged.append)
    assert not any("calibrating on" in line for line in logged)
    assert not os.path.exists(tmp_path / "work" / "mixed" / "results.json")


# ---------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["experiments.ptq", "--bits=0"], "error: --bits must be in [2, 16], got 0"),
    (["experiments.ptq", "--model=resnet18_cifar", "--weights=random", "--dataset=tar:{cut}"], "ends early"),
    (["experiments.mixed", "--model=resnet18_cifar", "--weights=random", "--budget=0.5"],
     "error: --budget=0.5 is used by --strategy=budget only"),
    (["experiments.train", "--model=vit_tiny_cifar", "--dataset=tar:{good}", "--eval_dataset=tar:{good}",
      "--workdir={file}"], "error: --workdir={file}: cannot write results to"),
    (["experiments.sensitivity", "--model=resnet18_cifar", "--weights=/nonexistent/w.safetensors"],
     "/nonexistent/w.safetensors"),
    (["experiments.energy", "--model=resnet18_cifar", "--energy_json={energy}"],
     "error: --energy_json={energy}: energy model file {energy} is not JSON"),
    (["experiments.ptq", "--model=resnet18_cifar", "--weights={notes}", "--dataset=tar:{good}",
      "--calib_dataset=tar:{good}", "--eval_images=2", "--calib_images=2"],
     "error: {notes} is not a readable safetensors file"),
], ids=["ptq-bits", "ptq-truncated-tar", "mixed-budget", "train-workdir", "sensitivity-weights", "energy-json",
        "text-safetensors"])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, good_tar, args, message):
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(good_tar, "rb").read()[:3000])
    (tmp_path / "file").write_text("x")
    (tmp_path / "energy.json").write_text("{mac_product: 1}")
    (tmp_path / "notes.safetensors").write_text("notes")
    fill = dict(cut=cut, good=good_tar, file=tmp_path / "file", energy=tmp_path / "energy.json",
                notes=tmp_path / "notes.safetensors")
    args = [a.format(**fill) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={tmp_path / 'work'}")
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert not (tmp_path / "work").exists() or not any(
        name.endswith(".json") for _, _, files in os.walk(tmp_path / "work") for name in files)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    spec = eqjax.models.get("resnet18_cifar")
    return checkpoint.save(tmp_path_factory.mktemp("ck") / "ck",
                           spec.init(jax.random.key(0), num_classes=4, stage_sizes=(1, 1), widths=(8, 16)),
                           model="resnet18_cifar", num_classes=4, preprocessing=spec.preprocessing)


@pytest.mark.parametrize("fields, message", [
    ([1, 2], "must hold a JSON object of EnergyModel fields, got a list"),
    ({"name": "x", "unit": "pJ"}, "energy model fields ['mac_product'] are missing"),
    ({"name": "x", "unit": "pJ", "mac_product": "cheap"}, "field 'mac_product' must be float, got 'cheap'"),
    ({"name": "x", "unit": "pJ", "mac_product": 1, "count_inputs": "yes"}, "field 'count_inputs' must be bool"),
    ({"name": "x", "unit": "pJ", "mac_product": 1, "joules": 2}, "unknown energy model fields ['joules']"),
], ids=["list", "missing", "string-energy", "string-switch", "unknown"])
def test_energy_model_files_are_checked_field_by_field(tmp_path, fields, message):
    from eqjax.algorithms import energy

    path = tmp_path / "model.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        energy.load_energy_model(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="no energy model file at"):
        energy.load_energy_model(str(tmp_path / "absent.json"))


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: open(os.path.join(d, "eqjax_checkpoint.json"), "w").write("{not json"), r"is corrupt: not JSON"),
    (lambda d: open(os.path.join(d, "eqjax_checkpoint.json"), "w").write('{"format_version": 1}'),
     r"eqjax_checkpoint.json is corrupt: no model, num_classes, preprocessing"),
    (lambda d: shutil.rmtree(os.path.join(d, "variables")), r"cannot read the arrays in .*variables"),
], ids=["json", "fields", "variables"])
def test_corrupt_checkpoint_names_the_file(tmp_path, saved_checkpoint, corrupt, message):
    directory = shutil.copytree(saved_checkpoint, tmp_path / "ck")
    corrupt(directory)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(directory)
