"""The QAT step and the width-search step against the FP32 training step of the same model and
batch, side by side in one run.

    python -m benchmarks.qat_step_bench --model=resnet18_cifar --batch_size=128 --steps=10

Every step is jitted once and timed over ``--steps`` calls after a warm-up call (median of the
per-step times); the QAT step quantizes every layer (W4A4, first/last at 8, BatchNorm folded: the
default of experiments.qat) with LSQ step sizes and no distillation; the width-search step
(``experiments.qat --learn_bits``) mixes ``--candidate_bits`` widths in every other layer under a
relative-energy budget. A search epoch and a QAT epoch take the same steps, so the ratio of their
step times is that of their epochs. Prints and writes ``--out`` (JSON): ms per step, the ratios
and img/s.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from eqjax import models, ptq, training
from eqjax.algorithms import qat, width_search
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18_cifar", "Registry model.")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_integer("steps", 10, "Timed steps of each kind.")
flags.DEFINE_list("candidate_bits", ["2", "3", "4", "6", "8"], "Widths the search mixes.")
flags.DEFINE_string("out", None, "Write the figures here as JSON.")


def _median_ms(step, state, *args) -> float:
    state, metrics = step(state, *args)  # compile and warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, metrics = step(state, *args)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv):
    del argv
    spec = models.get(FLAGS.model)
    model = spec.build(num_classes=10)
    variables = spec.init(jax.random.key(0), num_classes=10)
    rng = np.random.default_rng(0)
    size = spec.input_size
    images = jnp.asarray(rng.integers(0, 256, (FLAGS.batch_size, size, size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, FLAGS.batch_size).astype(np.int32))
    mean, std = (0.5,) * 3, (0.25,) * 3
    x = training.normalize(images, jnp.asarray(mean), jnp.asarray(std))

    optimizer = training.make_optimizer("sgd", 0.01, weight_decay=5e-5)
    fp32_step = training.make_train_step(model, optimizer, seed=0, mean=mean, std=std)
    fp32_ms = _median_ms(fp32_step, training.init_state(variables, optimizer), images, labels)

    calls = ptq.layer_calls(model, x[:1], variables=variables)
    config = ptq.PTQConfig(w_bits=4, a_bits=4)
    policy = ptq.calibrate(model, variables, [x], config)
    start = qat.prepare(model, variables, policy, calls, example=x[:1])
    qat_optimizer = qat.make_optimizer(optimizer, training.make_optimizer("sgd", 0.01, weight_decay=0.0))
    qat_step = qat.make_step(model, qat_optimizer, qat.QatConfig(), seed=0, mean=mean, std=std)
    state = qat.init_state(start, qat_optimizer)
    qat_ms = _median_ms(lambda s, *a: qat_step(s, start.setup, variables, *a), state, images, labels)

    statistics = ptq.collect_statistics(model, variables, [x], calls=calls)
    search_config = width_search.SearchConfig(budgets=(("relative_energy", 0.1),),
                                              candidate_bits=tuple(int(b) for b in FLAGS.candidate_bits))
    search = width_search.prepare(model, variables, policy, calls, example=x[:1], config=search_config,
                                  calibrate=lambda p: ptq.with_clips(p, statistics, config),
                                  keep=spec.first_and_last_layers(num_classes=10))
    search_optimizer = qat.make_optimizer(optimizer, training.make_optimizer("sgd", 0.01, weight_decay=0.0),
                                          optax.adam(0.1))
    search_step = qat.make_step(model, search_optimizer, qat.QatConfig(), seed=0, mean=mean, std=std, forward_fn=(
        functools.partial(width_search.forward, model, qat_config=qat.QatConfig(), config=search_config)))
    search_state = training.TrainState(jnp.zeros((), jnp.int32), search.trainables, variables.get("batch_stats", {}),
                                       search_optimizer.init(search.trainables))
    search_ms = _median_ms(lambda s, *a: search_step(s, search.setup, variables, *a), search_state, images, labels)

    result = {"model": FLAGS.model, "batch_size": FLAGS.batch_size, "steps": FLAGS.steps,
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "fp32_step_ms": fp32_ms, "qat_step_ms": qat_ms, "qat_over_fp32": qat_ms / fp32_ms,
              "candidate_bits": [int(b) for b in FLAGS.candidate_bits], "search_step_ms": search_ms,
              "search_over_qat": search_ms / qat_ms,
              "fp32_img_per_s": 1000 * FLAGS.batch_size / fp32_ms, "qat_img_per_s": 1000 * FLAGS.batch_size / qat_ms,
              "environment": common.environment()}
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    if FLAGS.out:
        common.write_json_atomic(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
