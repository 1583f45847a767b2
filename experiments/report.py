"""The study reproduced by one command: REPORT.md with its tables beside the study's, and its figures.

    python -m experiments.report                  # quick: small image counts (about 12 min on 2 CPU cores)
    python -m experiments.report --mode=full      # every test image, 256 calibration images (hours on CPU)
    python -m experiments.report --run=false      # only write the report from the results that exist

Runs every experiment the report needs (``experiments.report_plan``: FP32 and W8A8/W6A6/W4A4
PTQ, the sensitivity sweep, the percentile rule, the energy breakdown, standard vs
ranking-aware PTQ for ViTs, and beyond the study: energy budgets from the sweep and from the
one-pass estimate, BRECQ, the ViT quantizers) as its own command into WORKDIR/SETTING/RUN/,
reusing any results.json that the same command wrote, for every setting that can run here
(ResNet-18 on the shared CIFAR-10 checkpoint, EfficientNet-Lite0 on the shared ImageNet
images, the ViT proxy, DeiT-Tiny and CIFAR-100 where present; the others are listed as
missing with the reason). Then writes REPORT.md and figures/*.png (in --report_dir, default WORKDIR) from those
results.json files only, plus a table of other results it finds (--find: QAT, deployment).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from typing import Callable

from absl import flags

from eqjax import storage
from experiments import common, report_plan, report_tables as tables, study

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    flags.DEFINE_enum("mode", "quick", list(report_plan.MODES), "quick: small image counts, figures marked "
                      "quick; full: every evaluation image and 256 calibration images, the study's setting.")
    flags.DEFINE_string("workdir", None, "Where the runs go (default runs/report-MODE).")
    flags.DEFINE_string("report_dir", None, "Where REPORT.md and figures/ go (default --workdir).")
    flags.DEFINE_bool("run", True, "Run the experiments whose results are missing (false: report what exists).")
    flags.DEFINE_bool("beyond", True, "Also run what goes beyond the study (budgets, one-pass, BRECQ, ViT quantizers).")
    flags.DEFINE_list("settings", None, "Only these settings (default all): "
                      + ", ".join(s.key for s in report_plan.settings()))
    flags.DEFINE_list("only", None, "Only these runs of each setting (default all), e.g. "
                      "sensitivity,mixed_percentile for Tables 3 and 5.")
    flags.DEFINE_string("cifar100_weights", None, "A CIFAR-100 ResNet-18 checkpoint (experiments.train) for the "
                        "study's own data through TFDS.")
    flags.DEFINE_list("find", ["runs/*/qat/results.json", "runs/*/deploy/results.json"],
                      "Globs of more results.json files to list (QAT, deployment).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    mode: str = "quick"
    workdir: str | None = None
    report_dir: str | None = None  # default: workdir
    run: bool = True
    beyond: bool = True
    settings: tuple[str, ...] | None = None
    only: tuple[str, ...] | None = None  # just these runs of each setting (report_plan.plan)
    cifar100_weights: str | None = None
    find: tuple[str, ...] = ()
    sizes: report_plan.Sizes | None = None  # default: the mode's

    def __post_init__(self):
        if self.mode not in report_plan.MODES:
            raise ValueError(f"--mode must be one of {', '.join(report_plan.MODES)}, got {self.mode!r}")
        known = [s.key for s in report_plan.settings()]
        unknown = [k for k in self.settings or () if k not in known]
        if unknown:
            raise ValueError(f"--settings: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        if self.workdir is None:
            object.__setattr__(self, "workdir", f"runs/report-{self.mode}")
        if self.report_dir is None:
            object.__setattr__(self, "report_dir", self.workdir)
        if self.sizes is None:
            object.__setattr__(self, "sizes", report_plan.MODES[self.mode])


def config_from_flags() -> ReportConfig:
    return ReportConfig(mode=FLAGS.mode, workdir=FLAGS.workdir, report_dir=FLAGS.report_dir, run=FLAGS.run,
                        beyond=FLAGS.beyond,
                        settings=tuple(FLAGS.settings) if FLAGS.settings else None,
                        only=tuple(FLAGS.only) if FLAGS.only else None,
                        cifar100_weights=FLAGS.cifar100_weights, find=tuple(FLAGS.find))


def _found(patterns, planned: set[str]) -> list[tuple[str, dict]]:
    found = []
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern)}):
        if os.path.abspath(path) in planned:
            continue
        try:
            found.append((path, common.read_results_json(path, flag="--find")))
        except ValueError as e:
            common.log(f"[report] skipped {path}: {e}")
    return found


def _machine(outcomes) -> str:
    for outcome in outcomes.values():
        env = (outcome.results or {}).get("environment")
        if env:
            return (f"{env.get('platform')} ({env.get('device_kind')}, {len(env.get('devices', []))} device(s)), "
                    f"jax {env.get('jax')}, commit {str(env.get('git_commit'))[:10]}")
    return "no results"


def render(config: ReportConfig, all_settings, outcomes, found) -> str:
    """REPORT.md's text; writes its figures into REPORT_DIR/figures/."""
    results = tables.Results(outcomes)
    figures = os.path.join(config.report_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    quick = config.mode == "quick"
    suffix = " (quick: small image counts)" if quick else ""
    resnets = [s for s in all_settings if s.study_model == "resnet18"]
    deits = [s for s in all_settings if s.study_model == "deit_tiny"]
    vits = [s for s in all_settings if s.vit]
    out = [f"# The study reproduced: {config.mode} report", "",
           f"Made by `{command_line(config)}` from the "
           f"results.json files under `{config.workdir}` ({status_summary(o.status for o in outcomes.values())} "
           f"runs). Machine: {_machine(outcomes)}.",
           ""]
    if quick:
        out += ["**Quick mode**: small evaluation and calibration sets and short schedules, to check that "
                "everything reproduces; the numbers move by a point or more against the full mode "
                "(`--mode=full`). Compare rows with each other, not with published figures.", ""]
    out += ["Settings here:", ""]
    for s in all_settings:
        why = s.missing()
        out.append(f"- `{s.key}`: {s.title}" + (f" — **missing**: {why}" if why else ""))
    out += ["", "The study's figures are from its Tables 1-5 and Figure 1; `—` marks a result that does not "
            "exist here, with the reason. Why our figures differ:", ""]
    out += [f"- {name}: {text}." for name, text in study.CAVEATS.items()]

    out += ["", "## Table 1: ResNet-18 (study: CIFAR-100, ImageNet stem)", ""]
    for s in resnets:
        out += tables.accuracy_energy_table(results, s, study.TABLE1_RESNET18) + [""]
    out += ["## Table 2: DeiT-Tiny (study: ImageNet) and its stand-ins", ""]
    for s in deits:
        out += tables.accuracy_energy_table(results, s, study.TABLE2_DEIT_TINY) + [""]
    out += ["## Table 3: bit distribution of the percentile rule", ""]
    out += tables.bit_distribution_table(results, all_settings)
    out += ["", "## Table 4: standard vs ranking-aware PTQ (ViTs)", ""]
    out += tables.ranking_table(results, vits) if vits else ["No ViT setting selected."]
    out += [""] + [line for s in vits for line in results.command_lines(s, ["ranking"])]
    out += ["", "## Table 5: most sensitive and most robust layers", ""]
    out += tables.sensitivity_table(results, all_settings)
    out += [""] + [line for s in all_settings for line in results.command_lines(s, ["sensitivity"])]
    out += ["", "## Figure 1: MAC vs memory energy", "", "Memory share of the total energy (paper preset):", ""]
    out += tables.memory_share_table(results, all_settings) + [""]
    out += _figure(tables.energy_figure(results, all_settings, f"{figures}/energy.png", suffix), "energy.png",
                   "MAC vs memory energy")
    out += ["", "## Figure 2: accuracy-energy fronts", "",
            "Every accuracy result of a setting (top-1 change from its own FP32) against its relative energy, "
            "with the study's points; lines join each Pareto front.", ""]
    out += _figure(tables.pareto_figure(results, all_settings, f"{figures}/pareto.png", suffix), "pareto.png",
                   "accuracy-energy fronts")
    out += ["", "## Figure 3: per-layer sensitivity", ""]
    out += _figure(tables.sensitivity_figure(results, all_settings, f"{figures}/sensitivity.png", suffix),
                   "sensitivity.png", "per-layer sensitivity")
    out += ["", "## Beyond the study", "",
            "The same axes for what eqjax adds: exact energy budgets (at the percentile rule's energy, so the two "
            "compare at equal energy) from the sweep and from one backward pass, reconstruction PTQ, the ViT "
            "quantizers." + (" Quick mode reconstructs for 100 iterations of 16 images per block, too short to "
                             "show what reconstruction gains (BUILD_NOTES has the full schedules)." if quick else ""),
            ""]
    out += tables.beyond_table(results, all_settings)
    out += ["", "### Other results found", "", f"Files matching `{','.join(config.find) or '(none)'}`:", ""]
    out += tables.found_table(found)
    failed = [o for o in outcomes.values() if o.status == "failed"]
    if failed:
        out += ["", "## Runs that failed", ""]
        out += [f"- `{o.run.key}`: {o.reason} (log `{o.log}`)" for o in failed]
    return "\n".join(out) + "\n"


def command_line(config: ReportConfig) -> str:
    """The command that makes this report (its non-default flags)."""
    parts = ["python -m experiments.report", f"--mode={config.mode}", f"--workdir={config.workdir}"]
    if config.report_dir != config.workdir:
        parts.append(f"--report_dir={config.report_dir}")
    if not config.beyond:
        parts.append("--beyond=false")
    for name in ("settings", "only"):
        if getattr(config, name):
            parts.append(f"--{name}={','.join(getattr(config, name))}")
    if config.cifar100_weights:
        parts.append(f"--cifar100_weights={config.cifar100_weights}")
    return " ".join(parts)


def status_summary(statuses) -> str:
    """``'3 ran, 18 reused'``: how many runs ended in each status."""
    return ", ".join(f"{n} {k}" for k, n in sorted(collections.Counter(statuses).items()))


def _figure(made: bool, name: str, what: str) -> list[str]:
    return [f"![{what}](figures/{name})"] if made else [f"No {what}: no results."]


def run(config: ReportConfig, *, all_settings=None, log: Callable[[str], None] = common.log) -> dict:
    """Runs the missing experiments (when ``config.run``) and writes WORKDIR/REPORT.md; returns
    {"report": path, "outcomes": {key: status}}. ``all_settings`` replaces the known settings
    (:func:`experiments.report_plan.settings`), e.g. a model on data of your own."""
    if all_settings is None:
        all_settings = [s for s in report_plan.settings(cifar100_weights=config.cifar100_weights)
                        if not config.settings or s.key in config.settings]
    os.makedirs(config.workdir, exist_ok=True)
    os.makedirs(config.report_dir, exist_ok=True)
    runs = report_plan.plan(all_settings, config.sizes, config.workdir, beyond=config.beyond, only=config.only)
    for s in all_settings:
        if s.missing():
            log(f"[report] {s.key}: missing ({s.missing()}); only its energy model runs")
    outcomes = report_plan.execute(runs, all_settings, run_missing=config.run, log=log)
    planned = {os.path.abspath(r.results) for r in runs if r.results}
    text = render(config, all_settings, outcomes, _found(config.find, planned))
    path = os.path.join(config.report_dir, "REPORT.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    storage.write_atomic(path, write)
    return {"report": path, "outcomes": {k: o.status for k, o in outcomes.items()}}


def main(argv):
    del argv
    r = run(config_from_flags())
    print(f"wrote {r['report']} ({status_summary(r['outcomes'].values())} runs)")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
