"""REPORT.md's tables and figures from the report's results.json files, beside the study's figures.

Every figure of ours is read from a results.json (an :class:`experiments.report_plan.Outcome`);
a result that is absent shows as ``—`` with the reason, never as a number. The study's figures
come from :mod:`experiments.study`. Nothing here computes an accuracy or an energy.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from eqjax.algorithms.pareto import pareto_front
from experiments import common, study
from experiments.report_plan import Outcome, Setting

DASH = "—"
UNIFORM = ("W8A8", "W6A6", "W4A4")


class Results:
    """The outcomes of one report, looked up by setting and run name."""

    def __init__(self, outcomes: Mapping[str, Outcome]):
        self.outcomes = dict(outcomes)

    def get(self, setting: Setting, name: str) -> dict | None:
        outcome = self.outcomes.get(f"{setting.key}/{name}")
        return outcome.results if outcome else None

    def why_missing(self, setting: Setting, name: str) -> str:
        outcome = self.outcomes.get(f"{setting.key}/{name}")
        if outcome is None:
            return "not planned"
        return outcome.reason or outcome.status

    def command(self, setting: Setting, name: str) -> str | None:
        outcome = self.outcomes.get(f"{setting.key}/{name}")
        return outcome.run.command if outcome else None

    def command_lines(self, setting: Setting, names: Sequence[str], *, indent: str = "",
                      qualified: bool = True) -> list[str]:
        """``- `setting/name`: `command` `` for each of ``names`` whose result exists."""
        return [f"{indent}- `{f'{setting.key}/' if qualified else ''}{name}`: `{self.command(setting, name)}`"
                for name in names if self.command(setting, name) and self.get(setting, name)]

    def fp32(self, setting: Setting) -> tuple[float, float] | None:
        """(top-1, top-5) of FP32, as the first PTQ run of the setting measured it."""
        for name in ("ptq_w8", "ptq_w6", "ptq_w4"):
            r = self.get(setting, name)
            if r:
                return r["fp32_top1"], r["fp32_top5"]
        return None


def _f(value, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _delta(value, base) -> str:
    return DASH if value is None or base is None else f"{value - base:+.2f}"


def _commands(results: Results, setting: Setting, names: Sequence[str]) -> list[str]:
    lines = results.command_lines(setting, names, indent="  ", qualified=False)
    return ["", "- Commands:", *lines] if lines else []


def _uniform_energy(results: Results, setting: Setting, label: str) -> tuple[float | None, str]:
    """Relative energy of a uniform policy: from its PTQ run, else from the energy run (no data needed)."""
    r = results.get(setting, f"ptq_w{label[1]}")
    if r:
        return r["energy"]["relative"], ""
    e = results.get(setting, "energy")
    if e and label in e["configurations"]:
        return e["configurations"][label]["relative"], " (energy model only)"
    return None, ""


def accuracy_energy_table(results: Results, setting: Setting, study_rows: Mapping[str, tuple[float, float]]) -> list[str]:
    """Tables 1-2: FP32, W8A8, W6A6, W4A4 and the percentile rule; top-1, its drop, relative energy."""
    fp32 = results.fp32(setting)
    fp32_top1 = fp32[0] if fp32 else None
    study_fp32 = study_rows["FP32"][0]
    lines = [f"**{setting.title}** (`{setting.model}`)", "",
             "| config | study top-1 | study Δ | ours top-1 | ours Δ | study rel. energy | ours rel. energy | "
             "ours saving | note |", "|---|---|---|---|---|---|---|---|---|"]
    for label in ("FP32", *UNIFORM, "mixed"):
        s_top1, s_energy = study_rows[label]
        note = ""
        if label == "FP32":
            top1, energy = fp32_top1, 1.0 if fp32 else None
            if not fp32:
                note = results.why_missing(setting, "ptq_w8")
        elif label == "mixed":
            r = results.get(setting, "mixed_percentile")
            top1, energy = (r["top1"], r["energy"]["relative"]) if r else (None, None)
            note = "percentile rule (eq. 6)" if r else results.why_missing(setting, "mixed_percentile")
        else:
            r = results.get(setting, f"ptq_w{label[1]}")
            top1 = r["top1"] if r else None
            energy, source = _uniform_energy(results, setting, label)
            note = source.strip(" ()") if source else ("" if r else results.why_missing(setting, f"ptq_w{label[1]}"))
        lines.append(f"| {label} | {_f(s_top1)} | {_delta(s_top1, study_fp32)} | {_f(top1)} | {_delta(top1, fp32_top1)} "
                     f"| {_f(s_energy, 3)} | {_f(energy, 3)} | "
                     f"{DASH if energy is None else f'{100 * (1 - energy):.1f}%'} | {note} |")
    r = results.get(setting, "ptq_w8")
    if r:
        lines += ["", f"- {r['num_eval_images']} evaluation images, {r['num_calib_images']} calibration images."]
    return lines + _commands(results, setting, ("ptq_w8", "ptq_w6", "ptq_w4", "sensitivity", "mixed_percentile",
                                                "energy"))


def bit_distribution_table(results: Results, all_settings: Sequence[Setting]) -> list[str]:
    """Table 3: layers at 4 / 6 / 8 bits under the percentile rule."""
    lines = ["| setting | 4-bit | 6-bit | 8-bit | study (its model) |", "|---|---|---|---|---|"]
    for s in all_settings:
        r = results.get(s, "mixed_percentile")
        theirs = study.TABLE3_BITS[s.study_model]
        ref = f"{theirs[4]} / {theirs[6]} / {theirs[8]} ({s.study_model})"
        if r:
            counts = r["layer_counts_by_bits"]
            cells = " | ".join(str(counts.get(str(b), 0)) for b in (4, 6, 8))
        else:
            cells = f"{DASH} | {DASH} | {DASH} ({results.why_missing(s, 'mixed_percentile')})"
        lines.append(f"| {s.key} | {cells} | {ref} |")
    return lines


def ranking_table(results: Results, vit_settings: Sequence[Setting]) -> list[str]:
    """Table 4: standard vs ranking-aware PTQ (top-1 / top-5 and kept attention order)."""
    lines = ["| setting | bits | study standard top-1 | study ranking top-1 / top-5 | ours FP32 | "
             "ours standard top-1 / top-5 | ours ranking top-1 / top-5 | kept order standard → ranking |",
             "|---|---|---|---|---|---|---|---|"]
    for s in vit_settings:
        r = results.get(s, "ranking")
        for bits in (8, 6, 4):
            theirs = f"{_f(study.TABLE4_RANKING[bits][0])} / {_f(study.TABLE4_RANKING[bits][1])}"
            row = f"| {s.key} | {bits} | {_f(study.TABLE4_STANDARD_TOP1[bits])} | {theirs} | "
            if not r:
                lines.append(row + f"{DASH} | {DASH} | {DASH} | {results.why_missing(s, 'ranking')} |")
                continue
            by = {x["method"]: x for x in r["rows"] if x["bits"] == bits}
            std, rank = by.get("standard"), by.get("ranking")
            cell = lambda x: f"{_f(x['top1'])} / {_f(x['top5'])}" if x else DASH
            kept = (f"{100 * std['kept_order']:.1f}% → {100 * rank['kept_order']:.1f}%"
                    if std and rank and "kept_order" in std else DASH)
            lines.append(row + f"{_f(r['fp32_top1'])} | {cell(std)} | {cell(rank)} | {kept} |")
    return lines


def _l2_at_4(r: dict) -> dict[str, float] | None:
    s = r.get("sensitivity") or {}
    if "l2" not in s.get("scores", {}) or 4 not in s.get("bits", []):
        return None
    j = s["bits"].index(4)
    return {name: row[j] for name, row in zip(s["layers"], s["scores"]["l2"])}


def sensitivity_table(results: Results, all_settings: Sequence[Setting], count: int = 5) -> list[str]:
    """Table 5: the most sensitive and most robust layers by S_l = ||y_full - y_quant||_2 at 4 bits."""
    lines = ["| setting | most sensitive (l2 at 4 bits) | most robust |", "|---|---|---|",
             f"| study (deit_tiny) | {study.TABLE5_SENSITIVE} | {study.TABLE5_ROBUST} |"]
    for s in all_settings:
        r = results.get(s, "sensitivity")
        scores = _l2_at_4(r) if r else None
        if not scores:
            lines.append(f"| {s.key} | {DASH} | {DASH} ({results.why_missing(s, 'sensitivity')}) |")
            continue
        ranked = sorted(scores, key=scores.get, reverse=True)
        show = lambda names: ", ".join(f"{n} ({scores[n]:.3g})" for n in names)
        lines.append(f"| {s.key} | {show(ranked[:count])} | {show(ranked[::-1][:count])} |")
    return lines


def memory_share_table(results: Results, all_settings: Sequence[Setting]) -> list[str]:
    """Figure 1's numbers: the memory term's share of the energy per configuration."""
    low, high = study.FIGURE1_MEMORY_SHARE
    lines = ["| setting | FP32 | W8A8 | W6A6 | W4A4 | study |", "|---|---|---|---|---|---|"]
    for s in all_settings:
        e = results.get(s, "energy")
        if not e:
            lines.append(f"| {s.key} | {DASH} | {DASH} | {DASH} | {DASH} | {results.why_missing(s, 'energy')} |")
            continue
        c = e["configurations"]
        cells = " | ".join(f"{100 * c[k]['memory'] / c[k]['total']:.1f}%" for k in ("FP32", *UNIFORM))
        lines.append(f"| {s.key} | {cells} | {100 * low:.0f}–{100 * high:.0f}% |")
    return lines


BEYOND = (("mixed_percentile", "percentile rule (the study)"),
          ("mixed_budget", "energy budget = percentile's energy, sweep scores (KL cost)"),
          ("mixed_fisher", "one-pass Fisher estimate (Δloss cost), budget = the percentile rule's energy on it"),
          ("ptq_w4", "W4A4 round-to-nearest"),
          ("brecq_w4", "W4A4 BRECQ reconstruction"))


def beyond_table(results: Results, all_settings: Sequence[Setting]) -> list[str]:
    """What goes beyond the study on the same axes: budgets, one-pass sensitivity, reconstruction, ViT quantizers."""
    lines = ["| setting | method | top-1 | Δ vs FP32 | rel. energy | 4/6/8-bit layers |", "|---|---|---|---|---|---|"]
    commands = []
    for s in all_settings:
        if s.missing():
            continue
        fp32 = results.fp32(s)
        for name, label in BEYOND:
            r = results.get(s, name)
            if not r:
                if results.outcomes.get(f"{s.key}/{name}"):
                    lines.append(f"| {s.key} | {label} | {DASH} | {DASH} | {DASH} | {results.why_missing(s, name)} |")
                continue
            counts = r.get("layer_counts_by_bits")
            split = " / ".join(str(counts.get(str(b), 0)) for b in (4, 6, 8)) if counts else DASH
            lines.append(f"| {s.key} | {label} | {_f(r['top1'])} | {_delta(r['top1'], fp32[0] if fp32 else None)} | "
                         f"{_f(r['energy']['relative'], 4)} | {split} |")
        v = results.get(s, "vit_quantizers")
        if v:
            for row in v["rows"]:
                lines.append(f"| {s.key} | W{row['bits']}A{row['bits']} {row['method']} | {_f(row['top1'])} | "
                             f"{_delta(row['top1'], v['fp32_top1'])} | {DASH} | {DASH} |")
        commands += results.command_lines(s, [name for name, _ in BEYOND] + ["vit_quantizers"], indent="  ")
    return lines + ([""] + ["- Commands:", *commands] if commands else [])


def found_table(found: Sequence[tuple[str, dict]]) -> list[str]:
    """Other results.json files the report found (QAT, deployment, ...), each with the command that wrote it."""
    if not found:
        return ["No other results found."]
    lines = ["| experiment | model | bits | top-1 | FP32 top-1 | rel. energy | file | command |",
             "|---|---|---|---|---|---|---|---|"]
    for path, r in found:
        energy = (r.get("energy") or {}).get("relative")
        argv = (r.get("environment") or {}).get("argv") or []
        module = os.path.splitext(os.path.relpath(argv[0]))[0].replace(os.sep, ".") if argv else "?"
        command = " ".join(["python -m", module, *argv[1:]]) if argv else DASH
        bits = f"W{r.get('w_bits')}A{r.get('a_bits')}" if "w_bits" in r else DASH
        top1 = r.get("top1", ((r.get("evaluation") or {}).get("integer") or {}).get("top1"))  # deploy: integer forward
        lines.append(f"| {r.get('experiment', '?')} | {r.get('model', '?')} | {bits} | {_f(top1)} | "
                     f"{_f(r.get('fp32_top1'))} | {_f(energy, 4)} | `{path}` | `{command}` |")
    return lines


# ---------------------------------------------------------------- figures

def _points(results: Results, s: Setting) -> list[tuple[str, float, float]]:
    """(label, relative energy, top-1 drop from FP32) of every accuracy result of a setting."""
    fp32 = results.fp32(s)
    if not fp32:
        return []
    points = [("FP32", 1.0, 0.0)]
    names = [n for n in results.outcomes if n.startswith(f"{s.key}/")]
    for key in names:
        r = results.outcomes[key].results
        if r and "top1" in r and "energy" in r:
            points.append((key.split("/", 1)[1], r["energy"]["relative"], r["top1"] - fp32[0]))
    return points


def pareto_figure(results: Results, all_settings: Sequence[Setting], path: str, title_suffix: str) -> bool:
    """Figure 2: top-1 drop vs relative energy, ours per setting and the study's, with fronts."""
    series = [(s.key, _points(results, s)) for s in all_settings]
    series = [(k, p) for k, p in series if len(p) > 1]
    for name, rows in (("study ResNet-18", study.TABLE1_RESNET18), ("study DeiT-Tiny", study.TABLE2_DEIT_TINY)):
        base = rows["FP32"][0]
        series.append((name, [(k, e, t - base) for k, (t, e) in rows.items()]))
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series:
        energies, drops = [p[1] for p in points], [p[2] for p in points]
        style = "x" if name.startswith("study") else "o"
        line = ax.scatter(energies, drops, marker=style, label=name)
        front = pareto_front(energies, drops)
        ax.plot([energies[i] for i in front], [drops[i] for i in front], color=line.get_facecolor()[0]
                if style == "o" else "grey", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("energy relative to FP32 (log)")
    ax.set_ylabel("top-1 change from own FP32 (points)")
    ax.set_title(f"Accuracy-energy fronts{title_suffix}")
    ax.legend(fontsize=7)
    common.save_figure(fig, path)
    return True


def energy_figure(results: Results, all_settings: Sequence[Setting], path: str, title_suffix: str) -> bool:
    """Figure 1: MAC vs memory energy of FP32 and the uniform policies, per model."""
    rows = [(s.key, results.get(s, "energy")) for s in all_settings]
    rows = [(k, e) for k, e in rows if e]
    if not rows:
        return False
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, (key, e) in zip(axes[0], rows):
        c = e["configurations"]
        labels = ["FP32", *UNIFORM]
        total = c["FP32"]["total"]
        memory = [c[k]["memory"] / total for k in labels]
        mac = [c[k]["mac"] / total for k in labels]
        ax.bar(labels, memory, label="memory", color="tab:orange")
        ax.bar(labels, mac, bottom=memory, label="MAC", color="tab:blue")
        ax.set_title(f"{e['model']}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("energy relative to FP32")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"MAC vs memory energy{title_suffix}", fontsize=10)
    common.save_figure(fig, path)
    return True


def sensitivity_figure(results: Results, all_settings: Sequence[Setting], path: str, title_suffix: str) -> bool:
    """Figure 3: per-layer sensitivity S_l (l2 at 4 bits), one panel per setting."""
    rows = [(s.key, _l2_at_4(results.get(s, "sensitivity") or {})) for s in all_settings]
    rows = [(k, v) for k, v in rows if v]
    if not rows:
        return False
    plt = common.pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 3 * len(rows)), squeeze=False)
    for ax, (key, scores) in zip(axes[:, 0], rows):
        names = list(scores)
        ax.bar(range(len(names)), [scores[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_ylabel("S_l (l2, 4 bits)")
        ax.set_title(key, fontsize=9)
    fig.suptitle(f"Per-layer sensitivity{title_suffix}", fontsize=10)
    common.save_figure(fig, path)
    return True
