"""Integer deployment of a quantized model: the artifact, the integer JAX forward, ONNX Runtime.

Quantizes the model as ``experiments.ptq`` does (``--bits`` / ``--w_bits`` / ``--a_bits``, the
first/last-layer rule, estimators, ``--reconstruct`` or ``--recon_state``), with a mixed
allocation's per-layer bits (``--bits_json``, a ptq/mixed results.json), or takes a trained
model of ``experiments.qat`` (``--qat_state``); then

* builds the integer artifact (:mod:`eqjax.deploy.artifact`: BatchNorm folded, int8 / packed
  int4 / int2 weights, scales, manifest) and writes it to WORKDIR/deploy/model.safetensors;
* exports it to ONNX in QDQ form (WORKDIR/deploy/model.onnx) and the FP32 model the same way
  (fp32.onnx); with ``--quantize_residuals`` also the full-integer graph whose residual adds
  take 8-bit operands (model_residual.onnx, scales calibrated on the calibration images), which
  ONNX Runtime runs with integer kernels throughout;
* evaluates, image by image on the same batches: FP32 (XLA), the fake-quant forward (what every
  other script reports), the integer JAX forward (int8 operands, int32 accumulators), ONNX
  Runtime on the QDQ graph and on the FP32 graph: top-1 / top-5, agreement of top-1 predictions
  with the fake-quant forward, seconds;
* with ``--qwix``, runs the artifact through Qwix too (:mod:`eqjax.deploy.qwix_export`: Qwix
  rules plus its pre-quantized params, Qwix's integer kernels) and records its rules;
* times each path at ``--latency_batch_sizes`` (median of ``--latency_repeats``), and records
  bytes on disk against FP32 and against the energy model's weight-memory term, and the CPU's
  integer instructions.

The shared CIFAR-10 ResNet-18 at W8A8 on all 10,000 test images (checkpoint converted as the
README says):

    python -m experiments.deploy --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \\
        --calib_dataset=tar:../shared/data/cifar10/train.tar --dataset=tar:../shared/data/cifar10/test.tar \\
        --bits=8 --batch_size=250 --workdir=runs/deploy_r18_w8a8

BUILD_NOTES.md has the measured figures. Writes WORKDIR/deploy/results.json and deploy.png.
Needs the ``deploy`` extra (onnx, onnxruntime, qwix) unless ``--noonnx`` and without ``--qwix``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from eqjax import ptq
from eqjax.algorithms import energy, metrics, reconstruction as reconstruction_lib
from eqjax.deploy import artifact as artifact_lib, integer, onnx_export, qwix_export
from eqjax.quant import intercept, policy as policy_lib
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS
INTEGER_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    workload_lib.define_reconstruction_flags()
    workload_lib.define_bits_flags(8, bits_json=True)
    flags.DEFINE_string("qat_state", None, "Deploy the trained quantized model of experiments.qat (WORKDIR/qat/final).")
    flags.DEFINE_enum("weight_type", "uint8", list(onnx_export.WEIGHT_TYPES),
                      "ONNX weight storage: uint8 (exact in ONNX Runtime on every x86 CPU), int8 (faster with "
                      "AVX-VNNI, saturates on AVX2-only CPUs), int4 (weights of <= 4 bits packed).")
    flags.DEFINE_bool("onnx", True, "Export to ONNX and evaluate in ONNX Runtime.")
    flags.DEFINE_bool("quantize_residuals", False, "Also export and run the full-integer ONNX graph: both operands "
                      "of every residual add on 8-bit grids (onnx_export.residual_scales), every conv a QLinearConv.")
    flags.DEFINE_bool("qwix", False, "Also run the artifact through Qwix's PTQ kernels (eqjax.deploy.qwix_export).")
    flags.DEFINE_list("latency_batch_sizes", ["1", "32"], "Batch sizes of the latency measurement (empty: none).")
    flags.DEFINE_integer("latency_repeats", 20, "Timed runs per path and batch size (the median is reported).")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/deploy/.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeployRunConfig:
    """One deployment run. Checked on construction; errors name the flag."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig
    bits_json: str | None = None
    reconstruction: reconstruction_lib.ReconstructionConfig | None = None
    recon_state: str | None = None
    qat_state: str | None = None
    weight_type: str = "uint8"
    onnx: bool = True
    quantize_residuals: bool = False
    qwix: bool = False
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_repeats: int = 20
    workdir: str = "runs/default"

    def __post_init__(self):
        if self.weight_type not in onnx_export.WEIGHT_TYPES:
            raise ValueError(f"--weight_type must be one of {onnx_export.WEIGHT_TYPES}, got {self.weight_type!r}")
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"--latency_batch_sizes must be positive, got {list(self.latency_batch_sizes)}")
        if self.latency_repeats < 1:
            raise ValueError(f"--latency_repeats must be >= 1, got {self.latency_repeats}")
        if self.quantize_residuals and not self.onnx:
            raise ValueError("--quantize_residuals is an ONNX export: leave out --noonnx")
        if self.qat_state and (self.reconstruction or self.bits_json):
            raise ValueError("--qat_state deploys a trained model as it is: leave out --reconstruct and --bits_json")


def config_from_flags() -> DeployRunConfig:
    if FLAGS.bits_json and any(FLAGS[n].present for n in ("bits", "w_bits", "a_bits", "keep_first_last_bits")):
        raise ValueError("--bits_json gives every layer's bits: leave out --bits, --w_bits, --a_bits and "
                         "--keep_first_last_bits")
    names = {"w_bits": "w_bits" if FLAGS.w_bits is not None else "bits",
             "a_bits": "a_bits" if FLAGS.a_bits is not None else "bits"}
    try:
        batch_sizes = tuple(int(b) for b in FLAGS.latency_batch_sizes)
    except ValueError:
        raise ValueError(f"--latency_batch_sizes must be integers, got {FLAGS.latency_batch_sizes}") from None
    return DeployRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(w_bits=FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits,
                                               a_bits=FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits,
                                               keep_first_last_bits=FLAGS.keep_first_last_bits or None,
                                               flag_names=names),
        bits_json=FLAGS.bits_json, reconstruction=workload_lib.reconstruction_config_from_flags(),
        recon_state=FLAGS.recon_state, qat_state=FLAGS.qat_state, weight_type=FLAGS.weight_type, onnx=FLAGS.onnx,
        qwix=FLAGS.qwix, quantize_residuals=FLAGS.quantize_residuals,
        latency_batch_sizes=batch_sizes, latency_repeats=FLAGS.latency_repeats, workdir=FLAGS.workdir)


def quantized_source(config: DeployRunConfig, work: workload_lib.Workload, out: str,
                     check: Callable[[dict], Any] = lambda policy: None) -> tuple[dict, dict, dict, dict]:
    """``(variables, policy, integer weights, info)`` of the model to deploy: a QAT result, a
    reconstruction, or round-to-nearest under the calibrated policy; ``check(policy)`` runs on
    the calibrated policy before any reconstruction."""
    if config.qat_state:
        loaded = work.load_qat_state(config.qat_state)
        check(loaded.policy)
        weights = artifact_lib.integer_weights(loaded.variables, loaded.policy, weight_scales=loaded.weight_scales)
        return loaded.variables, loaded.policy, weights, {"method": "qat", "state": os.path.abspath(config.qat_state)}
    bits = workload_lib.read_bits_json(config.bits_json) if config.bits_json else None
    stats, _ = work.collect_stats()
    policy = work.calibrated_with_bits(stats, config.ptq, bits, flag=f"--bits_json={config.bits_json}")
    check(policy)
    if config.reconstruction is None:
        weights = artifact_lib.integer_weights(work.variables, policy, weight_method=config.ptq.weight_method)
        return work.variables, policy, weights, {"method": "round-to-nearest", "bits_json": config.bits_json}
    result, info = work.reconstruction_result(policy, config.ptq, config.reconstruction,
                                              save_to=os.path.join(out, "reconstruction"), load_from=config.recon_state)
    weights = artifact_lib.integer_weights(work.variables, result.policy, weight_scales=result.weight_scales,
                                           rounding=result.rounding)
    return work.variables, result.policy, weights, {"method": info["method"], "state": info["state"]}


def fake_quant_variables(variables: dict, weights: dict) -> dict:
    """``variables`` with each kernel replaced by ``s · q`` of ``weights`` (the fake-quant kernel)."""
    out = variables
    for name, (q, scale) in weights.items():
        kernel = intercept.module_variables(variables, name)["kernel"]
        scale = jnp.reshape(jnp.asarray(scale), (1,) * (np.ndim(q) - 1) + (-1,))
        out = intercept.replace_module_variable(out, name, "kernel", (jnp.asarray(q, jnp.float32) * scale).astype(kernel.dtype))
    return out


def cpu_integer_instructions() -> list[str]:
    """The integer SIMD extensions of this CPU (from /proc/cpuinfo; empty where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(" ".join(line for line in f if line.startswith(("flags", "Features"))).split())
    except OSError:
        return []
    return [name for name in INTEGER_FLAGS if name in words]


def weight_memory_bytes(work: workload_lib.Workload, bits: dict) -> dict:
    """The energy model's weight-memory term in bytes: Σ weights · w_bits / 8 + biases in FP32."""
    counts = energy.count_layers(work.model, work.spec.example_input(1))
    quantized = sum(c.weight_elements * (bits[c.name]["w"] or 32) / 8 + c.bias_elements * 4 for c in counts)
    fp32 = sum((c.weight_elements + c.bias_elements) * 4 for c in counts)
    return {"quantized": quantized, "fp32": fp32, "ratio": quantized / fp32}


def _padded_runner(session, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session of a fixed batch size run on any batch (the last one padded)."""

    def run(images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
        return session.run(None, {"images": np.ascontiguousarray(images, np.float32)})[0][:n]

    return run


def _evaluate(paths: dict[str, Callable], work: workload_lib.Workload, reference: str) -> dict[str, dict]:
    """Top-1 / top-5, seconds, and top-1 agreement with ``reference`` of every path, on the same batches."""
    totals = {name: {"top1": 0, "top5": 0, "agree": 0, "seconds": 0.0} for name in paths}
    seen = 0
    report = common.progress_logger("deploy evaluation", len(work.eval_indices))
    k = min(5, work.num_classes)
    for images, labels in work.eval_batches():
        predictions = {}
        for name, fn in paths.items():
            start = time.perf_counter()
            logits = np.asarray(fn(images))
            totals[name]["seconds"] += time.perf_counter() - start
            predictions[name] = np.argmax(logits, axis=-1)
            totals[name]["top1"] += int(np.sum(metrics.topk_correct(jnp.asarray(logits), jnp.asarray(labels), 1)))
            totals[name]["top5"] += int(np.sum(metrics.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)))
        for name in paths:
            totals[name]["agree"] += int(np.sum(predictions[name] == predictions[reference]))
        seen += len(images)
        report({"images": seen})
    return {name: {"top1": 100.0 * t["top1"] / seen, "top5": 100.0 * t["top5"] / seen,
                   "top1_agreement_with_fake_quant": 100.0 * t["agree"] / seen,
                   "disagreeing_images": seen - t["agree"], "seconds": t["seconds"]} for name, t in totals.items()}


def _median_ms(fn: Callable[[np.ndarray], Any], images: np.ndarray, repeats: int) -> float:
    for _ in range(2):
        np.asarray(fn(images))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn(images))
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _plot(path: str, result: dict) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    sizes = result["bytes"]
    labels = [k for k in ("fp32_artifact", "artifact", "fp32_onnx", "model_onnx") if sizes.get(k)]
    ax1.bar(labels, [sizes[k] / 1e6 for k in labels], color="tab:blue")
    ax1.set_ylabel("MB on disk")
    ax1.set_title(f"{result['model']} W{result['w_bits']}A{result['a_bits']}")
    latency = result["latency_ms"]
    names = list(next(iter(latency.values()), {}))
    width = 0.8 / max(len(latency), 1)
    for i, (batch, row) in enumerate(latency.items()):
        ax2.bar([j + i * width for j in range(len(names))], [row[n] for n in names], width=width, label=f"batch {batch}")
    ax2.set_xticks([j + width * (len(latency) - 1) / 2 for j in range(len(names))], names, rotation=20)
    ax2.set_ylabel("ms per batch (median)")
    ax2.set_yscale("log")
    ax2.legend()
    common.save_figure(fig, path)


def run(config: DeployRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Builds, exports, evaluates and times; writes WORKDIR/deploy/results.json and deploy.png."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "deploy")
    work = workload_lib.open_workload(config.workload, log=log)
    if config.onnx:
        onnx_export._require_onnx()  # before any long work
    example = work.spec.example_input(1)
    if config.qwix:
        qwix_export.require_qwix()
    check = (lambda p: qwix_export.check_policy(work.model, p, example=example)) if config.qwix else (lambda p: None)
    variables, policy, weights, source = quantized_source(config, work, out, check)
    bits = policy_lib.bits_table(policy)
    manifest = {"model": work.spec.name, "weights": work.weights_source, "num_classes": work.num_classes,
                "preprocessing": work.preprocessing.to_dict(), "bits": bits, "source": source}
    art = artifact_lib.build(work.model, variables, policy, example=example, weights=weights, manifest=manifest)
    fp32_art = artifact_lib.float_artifact(work.model, work.variables, example=example, manifest=manifest)
    sizes = {"artifact": artifact_lib.save(os.path.join(out, "model.safetensors"), art),
             "fp32_artifact": artifact_lib.save(os.path.join(out, "fp32.safetensors"), fp32_art)}
    log(f"integer artifact {sizes['artifact'] / 1e6:.2f} MB ({sizes['artifact'] / sizes['fp32_artifact']:.3f} "
        f"of FP32 {sizes['fp32_artifact'] / 1e6:.2f} MB)")
    art = artifact_lib.load(os.path.join(out, "model.safetensors"))  # evaluate what was written

    fp32_fn = jax.jit(work.model.apply)
    fake_state = ptq.QuantizedState(fake_quant_variables(variables, weights), policy)
    fake_fn = jax.jit(ptq.quantized_logits_fn(work.model))
    int_fn = integer.integer_jit(work.model)
    paths = {"fp32": lambda x: fp32_fn(work.variables, x), "fake_quant": lambda x: fake_fn(fake_state, x),
             "integer": lambda x: int_fn(art.layers, art.variables, x)}
    if config.qwix:
        qwix_model = qwix_export.export(work.model, art, example=example)
        qwix_fn = integer.cpu_integer_jit(qwix_model.apply)
        paths["qwix"] = lambda x: qwix_fn(qwix_model.variables, x)
    threads = os.cpu_count()
    # ONNX graphs have a fixed batch size: one export per batch size (evaluation, then latency).
    exports = {"ort_int": (art, config.weight_type, "model", None),
               "ort_fp32": (fp32_art, "uint8", "fp32", None)} if config.onnx else {}
    residuals = None
    if config.quantize_residuals:
        calibration = np.concatenate([np.asarray(images) for images, _ in work.calib_batches()])
        size = min(64, len(calibration))
        residuals = onnx_export.residual_scales(work.model, art, [calibration[i:i + size] for i in
                                                                  range(0, len(calibration) - size + 1, size)],
                                                threads=os.cpu_count())
        exports["ort_int_residual"] = (art, config.weight_type, "model_residual", residuals)
        log(f"residual adds: {len(residuals)} operands calibrated to 8 bits on {len(calibration)} images")
    for name, (a, weight_type, file, scales) in exports.items():
        path = os.path.join(out, f"{file}.onnx")
        onnx_export.export(work.model, a, batch_size=config.workload.batch_size, weight_type=weight_type,
                           residual_scales=scales, path=path)
        sizes[f"{file}_onnx"] = os.path.getsize(path)
        paths[name] = _padded_runner(onnx_export.session(path, threads=threads), config.workload.batch_size)
    if config.onnx:
        log(f"ONNX {sizes['model_onnx'] / 1e6:.2f} MB ({sizes['model_onnx'] / sizes['fp32_onnx']:.3f} of the FP32 graph)")
    evaluation = _evaluate(paths, work, reference="fake_quant")
    for name, row in evaluation.items():
        log(f"{name}: top-1 {row['top1']:.2f}% top-5 {row['top5']:.2f}%, top-1 agrees with fake-quant on "
            f"{row['top1_agreement_with_fake_quant']:.2f}% ({row['seconds']:.1f} s)")

    latency: dict[str, dict[str, float]] = {}
    shape = tuple(example.shape[1:])
    for b in config.latency_batch_sizes:
        images = np.asarray(jax.random.normal(jax.random.key(0), (b, *shape)), np.float32)
        row = {"fp32": _median_ms(paths["fp32"], images, config.latency_repeats),
               "fake_quant": _median_ms(paths["fake_quant"], images, config.latency_repeats),
               "integer": _median_ms(paths["integer"], images, config.latency_repeats)}
        if config.qwix:
            row["qwix"] = _median_ms(paths["qwix"], images, config.latency_repeats)
        for name, (a, weight_type, _, scales) in exports.items():
            session = onnx_export.session(onnx_export.export(work.model, a, batch_size=b, weight_type=weight_type,
                                                             residual_scales=scales), threads=threads)
            row[name] = _median_ms(lambda x, s=session: s.run(None, {"images": x})[0], images, config.latency_repeats)
        latency[str(b)] = row
        log(f"latency at batch {b} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))

    w_bits = config.ptq.w_bits if not (config.qat_state or config.bits_json) else None
    a_bits = config.ptq.activation_bits if not (config.qat_state or config.bits_json) else None
    result = work.base_result("deploy", {**dataclasses.asdict(config.ptq), "workdir": config.workdir,
                                         "bits_json": config.bits_json, "qat_state": config.qat_state,
                                         "reconstruct": config.reconstruction.method if config.reconstruction else "none",
                                         "recon_state": config.recon_state, "weight_type": config.weight_type,
                                         "onnx": config.onnx, "qwix": config.qwix,
                                         "quantize_residuals": config.quantize_residuals,
                                         "latency_batch_sizes": list(config.latency_batch_sizes),
                                         "latency_repeats": config.latency_repeats})
    result.update({
        "w_bits": w_bits, "a_bits": a_bits, "bits": bits, "source": source,
        "top1": evaluation["integer"]["top1"], "top5": evaluation["integer"]["top5"],
        "fp32_top1": evaluation["fp32"]["top1"], "fp32_top5": evaluation["fp32"]["top5"],
        "evaluation": evaluation, "latency_ms": latency, "bytes": sizes,
        "bytes_ratio": {"artifact_over_fp32": sizes["artifact"] / sizes["fp32_artifact"],
                        **({"onnx_over_fp32_onnx": sizes["model_onnx"] / sizes["fp32_onnx"]} if config.onnx else {})},
        "energy_weight_memory_bytes": weight_memory_bytes(work, bits),
        "energy": work.energy_of(bits),
        **({"qwix_rules": qwix_model.describe()} if config.qwix else {}),
        **({"residual_scales": residuals} if residuals is not None else {}),
        "cpu": {"integer_instructions": cpu_integer_instructions(), "cores": os.cpu_count()},
        "versions": _versions(),
        "wall_times_s": {"total": time.perf_counter() - started},
    })
    _plot(os.path.join(out, "deploy.png"), result)
    result["results_path"] = common.write_json_atomic(os.path.join(out, "results.json"), result)
    return result


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    found = {}
    for package in ("jax", "onnx", "onnxruntime", "qwix"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def main(argv):
    del argv
    r = run(config_from_flags())
    e = r["evaluation"]
    line = (f"{r['model']}: integer top-1 {e['integer']['top1']:.2f}% (fake-quant {e['fake_quant']['top1']:.2f}%, "
            f"FP32 {r['fp32_top1']:.2f}%)")
    if "ort_int" in e:
        line += f", ONNX Runtime {e['ort_int']['top1']:.2f}%"
    if "ort_int_residual" in e:
        line += f" (full-integer graph {e['ort_int_residual']['top1']:.2f}%)"
    if "qwix" in e:
        line += f", Qwix {e['qwix']['top1']:.2f}%"
    print(f"{line}; artifact {r['bytes_ratio']['artifact_over_fp32']:.3f} of FP32 -> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
