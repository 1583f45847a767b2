"""The integer JAX forward against Qwix's PTQ, FP32 and fake quantization, side by side in one run.

ResNet-18 (CIFAR stem, shared CIFAR-10 checkpoint) at W8A8, the first IMAGES test images in
batches of BATCH, one process on the CPU. Every path is compiled twice: with the process's
XLA settings (``experiments.xla_cpu``: YNNPACK fusions off, Eigen's float convolutions) and
with YNNPACK's individual convolutions and products (``eqjax.deploy.integer.CPU_COMPILER_OPTIONS``,
which the integer forward uses): XLA:CPU has no fast int8 convolution without YNNPACK. Qwix
(int8 weights, dynamic int8 activations per tensor, its ``PtqProvider``) runs only with YNNPACK,
as it takes minutes per batch without (measured: 428 s for one batch of 250).

    python -m benchmarks.integer_forward_bench [--images=2000] [--batch_size=250] [--conv_probe_only]

It first times one convolution per operand dtype (float32, int8, int16) and setting.

Needs Qwix (the ``deploy`` extra; measured with 0.1.8). Writes
runs/bench/integer_forward.json; BUILD_NOTES "Integer deployment" has the figures.
"""

from __future__ import annotations

import json
import os
import time

from experiments import common, workload as workload_lib  # first: the package sets the XLA:CPU defaults

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import eqjax
from eqjax.algorithms import metrics
from eqjax.deploy import artifact as artifact_lib, integer

flags.DEFINE_integer("images", 2000, "Test images.")
flags.DEFINE_integer("batch_size", 250, "Batch size.")
flags.DEFINE_string("out", "runs/bench/integer_forward.json", "Results file.")
flags.DEFINE_bool("conv_probe_only", False, "Only time one convolution in each dtype and setting.")
FLAGS = flags.FLAGS


def _qwix_forward(model, variables, example):
    import qwix

    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    quantized = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(quantized.init, jax.random.key(0), example)
    params = qwix.quantize_params(jax.tree_util.tree_map(jnp.asarray, variables["params"]), abstract["params"])
    return quantized.apply, {**jax.tree_util.tree_map(jnp.asarray, variables), "params": params}


def conv_probe() -> dict[str, float]:
    """Seconds of one 3x3 convolution (250x16x16x128 by 3x3x128x128, int32 accumulation for
    integers) per operand dtype, with the process's XLA settings and with YNNPACK's."""
    from jax import lax

    rng = np.random.default_rng(0)
    x, w = rng.integers(-100, 100, (250, 16, 16, 128)), rng.integers(-100, 100, (3, 3, 128, 128))
    out = {}
    for dtype, accumulate in ((jnp.float32, None), (jnp.int8, jnp.int32), (jnp.int16, jnp.int32)):
        for setting, options in (("process_defaults", None), ("ynnpack", integer.CPU_COMPILER_OPTIONS)):
            conv = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                         preferred_element_type=accumulate)
            fn = jax.jit(conv) if options is None else jax.jit(conv, compiler_options=options)
            a, b = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
            fn(a, b).block_until_ready()
            start = time.perf_counter()
            for _ in range(3):
                fn(a, b).block_until_ready()
            out[f"{jnp.dtype(dtype).name}/{setting}"] = (time.perf_counter() - start) / 3
            common.log(f"conv {jnp.dtype(dtype).name} ({setting}): {out[f'{jnp.dtype(dtype).name}/{setting}']:.3f} s")
    return out


def main(argv):
    del argv
    probe = conv_probe()
    if FLAGS.conv_probe_only:
        common.write_json_atomic(FLAGS.out, {"conv_probe_s": probe, "environment": common.environment()})
        return
    work = workload_lib.open_workload(workload_lib.WorkloadConfig(
        model="resnet18_cifar", weights="runs/weights/resnet18_cifar10", batch_size=FLAGS.batch_size,
        calib_dataset="tar:../shared/data/cifar10/train.tar", dataset="tar:../shared/data/cifar10/test.tar",
        eval_images=FLAGS.images))
    stats, _ = work.collect_stats()
    config = eqjax.PTQConfig(w_bits=8, a_bits=8)
    policy = work.calibrated(stats, config)
    state = work.quantize(policy, config)
    example = work.spec.example_input(1)
    art = artifact_lib.build(work.model, work.variables, policy, example=example)
    batches = list(work.eval_batches())
    fake = eqjax.ptq.quantized_logits_fn(work.model)
    int_fn = integer.integer_logits_fn(work.model)
    qwix_apply, qwix_vars = _qwix_forward(work.model, work.variables, example)
    paths = {"fp32": (work.model.apply, (work.variables,)), "fake_quant": (fake, (state,)),
             "integer": (int_fn, (art.layers, art.variables)), "qwix_w8a8": (qwix_apply, (qwix_vars,))}
    results = {}
    for setting, options in (("process_defaults", None), ("ynnpack", integer.CPU_COMPILER_OPTIONS)):
        for name, (fn, args) in paths.items():
            if options is None and name in ("integer", "qwix_w8a8"):
                continue  # minutes per batch on XLA's loop-emitted int8 convolution
            jitted = jax.jit(fn) if options is None else jax.jit(fn, compiler_options=options)
            jitted(*args, jnp.asarray(batches[0][0])).block_until_ready()  # compile
            correct, start = 0, time.perf_counter()
            for images, labels in batches:
                logits = jitted(*args, jnp.asarray(images))
                correct += int(jnp.sum(metrics.topk_correct(logits, jnp.asarray(labels), 1)))
            seconds = time.perf_counter() - start
            results[f"{name}/{setting}"] = {"seconds": seconds, "top1": 100.0 * correct / sum(len(b[1]) for b in batches)}
            common.log(f"{name} ({setting}): {seconds:.2f} s, top-1 {results[f'{name}/{setting}']['top1']:.2f}%")
    payload = {"images": sum(len(b[1]) for b in batches), "batch_size": FLAGS.batch_size, "results": results,
               "conv_probe_s": probe,
               "environment": common.environment(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    common.write_json_atomic(FLAGS.out, payload)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
