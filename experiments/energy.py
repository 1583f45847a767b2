"""Energy table of a model under a bits policy (no data needed): the study's eq. 7 and Figure 1.

    python -m experiments.energy --model=deit_tiny --bits=6

Prints the per-layer table (MACs, weights, MAC and memory energy) and totals relative to
FP32, and writes WORKDIR/energy/results.json and energy.png: MAC vs memory energy of FP32,
W8A8, W6A6, W4A4 and the requested policy (a mixed one via --bits_json, e.g. a ptq or
mixed results.json). Presets: paper, horowitz45nm, horowitz45nm_sram; or --energy_json.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from eqjax import models
from eqjax.quant import numerics, policy as policy_lib
from eqjax.algorithms import energy
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    flags.DEFINE_enum("model", "deit_tiny", list(models.names()), "Registry name of the model.")
    flags.DEFINE_integer("bits", 8, "Weight and activation bits.")
    flags.DEFINE_integer("w_bits", None, "Weight bits (default --bits).")
    flags.DEFINE_integer("a_bits", None, "Activation bits (default --bits).")
    flags.DEFINE_integer("keep_first_last_bits", 8, "Bits of the first and last layer; 0 = no exception.")
    flags.DEFINE_string("bits_json", None, "A results.json (or {name: {w, a}} file) with per-layer bits.")
    flags.DEFINE_enum("preset", "paper", list(energy.PRESETS), "Energy model preset.")
    flags.DEFINE_string("energy_json", None, "A user-defined energy model (EnergyModel fields).")
    flags.DEFINE_integer("num_classes", None, "Classes (default: the model's).")
    flags.DEFINE_integer("batch_size", 1, "Images per inference (weights are read once per batch).")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/energy/.")


def _plot(path, rows, title):
    plt = common.pyplot()
    labels = [r["label"] for r in rows]
    mac = [r["mac"] / rows[0]["total"] for r in rows]
    memory = [r["memory"] / rows[0]["total"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    ax.bar(labels, memory, label="memory", color="tab:orange")
    ax.bar(labels, mac, bottom=memory, label="MAC", color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r["relative"] + 0.01, f"{r['relative']:.3f}", ha="center", fontsize=8)
    ax.set_ylabel("energy relative to FP32")
    ax.set_title(title)
    ax.legend()
    common.save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnergyRunConfig:
    """An energy table: the model, the requested bits (uniform, or a per-layer table), the energy model."""

    model: str = "deit_tiny"
    w_bits: int = 8
    a_bits: int = 8
    keep_first_last_bits: int | None = 8
    bits_json: str | None = None
    energy_model: energy.EnergyModel = energy.PRESETS["paper"]
    num_classes: int | None = None
    batch_size: int = 1
    workdir: str = "runs/default"

    def __post_init__(self):
        numerics.check_bits(self.w_bits, name="--w_bits")
        numerics.check_bits(self.a_bits, name="--a_bits")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        models.get(self.model)


def _energy_model(energy_json: str | None, preset: str) -> energy.EnergyModel:
    if not energy_json:
        return energy.get_preset(preset)
    try:
        return energy.load_energy_model(energy_json)
    except (OSError, ValueError) as e:
        raise ValueError(f"--energy_json={energy_json}: {e}") from None


def config_from_flags() -> EnergyRunConfig:
    return EnergyRunConfig(
        model=FLAGS.model, w_bits=FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits,
        a_bits=FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits,
        keep_first_last_bits=FLAGS.keep_first_last_bits or None, bits_json=FLAGS.bits_json,
        energy_model=_energy_model(FLAGS.energy_json, FLAGS.preset),
        num_classes=FLAGS.num_classes, batch_size=FLAGS.batch_size, workdir=FLAGS.workdir)


def run(config: EnergyRunConfig) -> dict:
    """Energy of FP32, W8A8, W6A6, W4A4 and the requested bits; writes WORKDIR/energy/results.json and energy.png."""
    out = common.output_dir(config.workdir, "energy")
    model_e = config.energy_model
    spec = models.get(config.model)
    num_classes = config.num_classes or spec.num_classes
    counts = energy.count_layers(spec.build(num_classes=num_classes), spec.example_input(config.batch_size))
    calls = spec.trace(num_classes=num_classes)

    def uniform(b_w, b_a):
        return policy_lib.bits_table(policy_lib.build(calls, w_bits=b_w, a_bits=b_a,
                                                      keep_first_last_bits=config.keep_first_last_bits))

    configs = [("FP32", None)] + [(f"W{b}A{b}", uniform(b, b)) for b in (8, 6, 4)]
    w_bits, a_bits = config.w_bits, config.a_bits
    if config.bits_json:
        configs.append(("policy", common.read_bits_table(config.bits_json)))
    elif (w_bits, a_bits) not in {(b, b) for b in (8, 6, 4)}:
        configs.append((f"W{w_bits}A{a_bits}", uniform(w_bits, a_bits)))
    requested = "policy" if config.bits_json else f"W{w_bits}A{a_bits}"
    reports = {label: energy.energy_report(counts, bits, model_e) for label, bits in configs}
    rows = [{"label": label, **{k: r[k] for k in ("total", "mac", "memory", "relative")}}
            for label, r in reports.items()]
    _plot(f"{out}/energy.png", rows, f"{spec.name}: energy by configuration ({model_e.name})")
    result = {"experiment": "energy", "model": spec.name, "num_classes": num_classes,
              "config": {**{k: v for k, v in dataclasses.asdict(config).items() if k != "energy_model"},
                         "bits": None if w_bits != a_bits else w_bits, "preset": model_e.name,
                         "keep_first_last_bits": config.keep_first_last_bits or 0},
              "energy_model": model_e.to_dict(), "environment": common.environment(),
              "requested": requested, "configurations": reports}
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    config = config_from_flags()
    result = run(config)
    requested = result["configurations"][result["requested"]]
    model_e = config.energy_model
    print(f"{result['model']}, {result['requested']}, batch {config.batch_size}, energy model {model_e.name} "
          f"({model_e.unit})")
    print(f"{'layer':28s} {'w':>3s} {'a':>3s} {'MACs':>12s} {'weights':>10s} {'E_MAC':>11s} {'E_mem':>11s}")
    for row in requested["per_layer"]:
        print(f"{row['name']:28s} {row['w_bits'] or 32:3d} {row['a_bits'] or 32:3d} {row['macs']:12,d} "
              f"{row['weight_elements']:10,d} {row['mac']:11.4g} {row['memory']:11.4g}")
    print(f"total MACs {requested['macs']:,}, weights {requested['weight_elements']:,}")
    for label, r in result["configurations"].items():
        print(f"{label:8s} total {r['total']:.4g} {r['unit']} (MAC {100 * r['mac_share']:.1f}%, "
              f"memory {100 * r['memory_share']:.1f}%), relative to FP32 {r['relative']:.4f}")
    print(f"wrote {result['results_path']} and energy.png")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
