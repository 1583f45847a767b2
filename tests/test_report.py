"""experiments.report: every table from results files, missing rows marked, reuse by command, one table end to end."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from experiments import common, report, report_plan, study
from tests.image_tar import write_image_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = report_plan.Sizes("quick", eval_images={}, calib_images=16, sensitivity_images={}, recon_iterations=2,
                         recon_batch_size=8, ranking_steps=2)


def _settings(data="tar:/nowhere.tar"):
    cnn = report_plan.Setting("cnn", "a CNN on toy data", "resnet18_cifar", "resnet18",
                              ("--model=resnet18_cifar", "--weights=random", f"--dataset={data}",
                               f"--calib_dataset={data}", "--batch_size=8"))
    vit = report_plan.Setting("vit", "a ViT on toy data", "vit_tiny_cifar", "deit_tiny",
                              ("--model=vit_tiny_cifar", "--weights=random", f"--dataset={data}",
                               f"--calib_dataset={data}"), vit=True)
    gone = report_plan.Setting("gone", "a setting without its weights", "deit_tiny", "deit_tiny", (),
                               requires=(("/nowhere/weights", "the weights"),), vit=True)
    return cnn, vit, gone


def _write(run, payload):
    """A results.json as the run's own command writes it (its argv recorded)."""
    argv = [os.path.join(ROOT, *run.module.split(".")) + ".py", *run.flags]
    common.write_json_atomic(run.results, {**payload, "environment": {"argv": argv, "platform": "cpu"}})


def _ptq(top1, fp32, relative, **more):
    return {"experiment": "ptq", "model": "m", "top1": top1, "top5": top1 + 10, "fp32_top1": fp32,
            "fp32_top5": fp32 + 10, "energy": {"relative": relative}, "num_eval_images": 1000,
            "num_calib_images": 128, **more}


def _energy():
    conf = {k: {"total": 100.0 * r, "mac": 5.0 * r, "memory": 95.0 * r, "relative": r}
            for k, r in (("FP32", 1.0), ("W8A8", 0.2111), ("W6A6", 0.1611), ("W4A4", 0.1011))}
    return {"experiment": "energy", "model": "m", "configurations": conf}


def _fixture(tmp_path, skip=("ptq_w6",)):
    settings = _settings()
    runs = report_plan.plan(settings, TINY, str(tmp_path))
    layers = [f"layer{i}" for i in range(8)]
    payloads = {
        "ptq_w8": _ptq(73.21, 74.08, 0.2161), "ptq_w6": _ptq(72.5, 74.08, 0.16),
        "ptq_w4": _ptq(69.87, 74.08, 0.1057),
        "sensitivity": {"experiment": "sensitivity", "sensitivity": {
            "layers": layers, "bits": [4, 6, 8],
            "scores": {"l2": [[float(i + 1) * 11.0, 1.0, 0.5] for i in range(8)]}}},
        "mixed_percentile": _ptq(72.77, 74.08, 0.1395, layer_counts_by_bits={"4": 5, "6": 10, "8": 6}),
        "mixed_budget": _ptq(72.91, 74.08, 0.1389, layer_counts_by_bits={"4": 3, "6": 6, "8": 12}),
        "energy": _energy(),
        "ranking": {"experiment": "ranking", "fp32_top1": 77.09, "rows": [
            {"bits": b, "method": m, "top1": 70.0 + b + (m == "ranking"), "top5": 90.0 + b,
             "kept_order": 0.8 + 0.01 * b} for b in (8, 6, 4) for m in ("standard", "ranking")]},
    }
    for run in runs:
        if run.setting != "gone" and run.name in payloads and run.name not in skip:
            if run.setting == "vit" and run.name.startswith("mixed"):
                continue  # the ViT has no mixed results in this fixture
            _write(run, payloads[run.name])
    return settings, runs


def test_report_writes_every_table_from_results_files_and_marks_what_is_missing(tmp_path):
    settings, runs = _fixture(tmp_path)
    config = report.ReportConfig(workdir=str(tmp_path), run=False, sizes=TINY)
    out = report.run(config, all_settings=settings, log=lambda line: None)
    text = open(out["report"]).read()
    for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Figure 1", "Figure 2", "Figure 3",
                    "Beyond the study", "Other results found"):
        assert f"## {heading}" in text
    assert out["outcomes"]["cnn/ptq_w8"] == "reused" and out["outcomes"]["cnn/ptq_w6"] == "skipped"
    assert out["outcomes"]["gone/ptq_w8"] == "missing" and out["outcomes"]["vit/mixed_budget"] == "skipped"
    # our figures come from the files; the study's from experiments.study
    row = lambda label: next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    w8 = row("W8A8")
    assert "73.21" in w8 and "-0.87" in w8 and "0.216" in w8 and "78.4%" in w8 and "61.32" in w8
    # W6A6 has no results file: no accuracy, the energy model's figure marked as such, and the reason
    w6 = row("W6A6")
    assert "72.5" not in w6 and "energy model only" in w6 and "0.161" in w6
    assert "| cnn | 5 | 10 | 6 | 6 / 9 / 6 (resnet18) |" in text
    assert "| vit | 8 | 85.10 | 85.18 / 97.22 | 77.09 | 78.00 / 98.00 | 79.00 / 98.00 | 88.0% → 88.0% |" in text
    assert "layer7 (88)" in text.split("## Table 5")[1].split("##")[0]
    assert "| gone | — | — | — (setting missing here) | 13 / 24 / 13 (deit_tiny) |" in text
    assert "**missing**: the weights not found at /nowhere/weights" in text
    beyond = text.split("## Beyond the study")[1]
    assert "| cnn | energy budget = percentile's energy, sweep scores (KL cost) | 72.91 | -1.17 | 0.1389 | 3 / 6 / 12 |" in beyond
    for name in ("energy.png", "pareto.png", "sensitivity.png"):
        assert os.path.getsize(tmp_path / "figures" / name) > 1000
    # every number in our columns of Table 1 is one of the fixture's or follows from them
    ours = {m.group(0) for m in re.finditer(r"[+-]?\d+\.\d+", text.split("## Table 1")[1].split("## Table 2")[0])}
    allowed = {"73.21", "69.87", "72.77", "74.08", "0.216", "0.106", "0.140", "0.161", "1.000", "-0.87", "-4.21",
               "-1.31", "+0.00", "0.0", "78.4", "89.4", "86.1", "83.9"}
    allowed |= {f"{v:.2f}" for v, _ in study.TABLE1_RESNET18.values()} | {
        f"{e:.3f}" for _, e in study.TABLE1_RESNET18.values()} | {"-0.12", "-1.02", "-23.40", "-0.64"}
    assert ours <= allowed, ours - allowed


def test_a_results_file_is_reused_only_for_the_same_command(tmp_path):
    settings, runs = _fixture(tmp_path, skip=())
    run = next(r for r in runs if r.key == "cnn/ptq_w8")
    assert report_plan.read_if_same(run)["top1"] == 73.21
    changed = report_plan.Run(run.setting, run.name, run.module, (*run.flags, "--seed=1"), run.results, run.workdir)
    assert report_plan.read_if_same(changed) is None
    with open(run.results, "r+") as f:  # a damaged file is not reused either
        payload = json.load(f)
        payload["top1"] = 99.0
        f.seek(0)
        json.dump(payload, f)
        f.truncate()
    assert report_plan.read_if_same(run) is None


def test_bad_report_flags_name_the_value():
    with pytest.raises(ValueError, match="--settings: unknown nope"):
        report.ReportConfig(settings=("nope",))
    with pytest.raises(ValueError, match="--mode must be one of quick, full, got 'fast'"):
        report.ReportConfig(mode="fast")


def test_one_table_end_to_end(tmp_path):
    """Tables 3 and 5 on a random ResNet-18 and toy images: the sweep and the percentile rule run as commands."""
    rng = np.random.default_rng(0)
    data = write_image_tar(tmp_path / "toy.tar", {f"c{c}": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                                                           for _ in range(4)] for c in range(4)})
    cnn = _settings(f"tar:{data}")[0]
    sizes = dataclasses.replace(TINY, eval_images={"cnn": 8}, calib_images=8)  # 16 images: 8 + 8, disjoint
    config = report.ReportConfig(workdir=str(tmp_path / "report"), sizes=sizes, beyond=False,
                                 only=("sensitivity", "mixed_percentile"))
    lines = []
    out = report.run(config, all_settings=[cnn], log=lines.append)
    assert out["outcomes"] == {"cnn/sensitivity": "ran", "cnn/mixed_percentile": "ran"}, open(
        tmp_path / "report" / "cnn" / "mixed_percentile" / "log.txt").read()[-2000:]
    assert any("1/2 cnn/sensitivity" in line for line in lines) and any("about" in line for line in lines)
    text = open(out["report"]).read()
    mixed = json.load(open(tmp_path / "report" / "cnn" / "mixed_percentile" / "mixed" / "results.json"))
    counts = mixed["layer_counts_by_bits"]
    assert f"| cnn | {counts.get('4', 0)} | {counts.get('6', 0)} | {counts.get('8', 0)} | 6 / 9 / 6 (resnet18) |" in text
    assert "python -m experiments.sensitivity --model=resnet18_cifar" in text
    again = report.run(config, all_settings=[cnn], log=lines.append)  # the same commands: nothing reruns
    assert set(again["outcomes"].values()) == {"reused"}
