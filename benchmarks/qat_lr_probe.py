"""Which learning rates (and options) a QAT fine-tune of the shared CIFAR-10 ResNet-18 survives:
six steps, then held-out accuracy.

    python -m benchmarks.qat_lr_probe --optimizer=sgd --rates=2e-4:2e-4,2e-5:2e-4 [--control]
    python -m benchmarks.qat_lr_probe --rates=2e-5:2e-4 --distill_weight=1 --asymmetric --batchnorm=update

Each ``WEIGHTS:STEPS`` pair trains the W4A4 model (first/last layer at 8 bits, BatchNorm folded
with frozen statistics, calibrated on 128 training images) for six steps of 128 training images
(unaugmented, the same batches for every pair), then evaluates the finished model (BatchNorms
folded, as ``qat.finalize`` leaves it) on 512 other training images; ``--control`` trains the FP32 model the same way. Needs ``runs/weights/
resnet18_cifar10`` (README) and ``../shared/data/cifar10``; about 40 s per pair on 2 CPU cores.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from eqjax import data, ptq, training
from eqjax.algorithms import qat
from eqjax.quant import apply
from experiments import workload as workload_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("optimizer", "sgd", list(training.OPTIMIZERS), "Optimizer of weights and step sizes.")
flags.DEFINE_list("rates", ["2e-4:2e-4", "2e-5:2e-4"], "WEIGHTS:STEP_SIZES learning-rate pairs.")
flags.DEFINE_bool("control", False, "Train the FP32 model (quantizers off) instead.")
flags.DEFINE_float("distill_weight", 0.0, "Distillation from the FP32 model (qat.QatConfig).")
flags.DEFINE_bool("asymmetric", False, "LSQ+ offsets (qat.QatConfig).")
flags.DEFINE_enum("batchnorm", "fold", ["fold", "update"], "BatchNorm mode (qat.QatConfig).")
flags.DEFINE_string("data", "../shared/data/cifar10", "Folder of the CIFAR-10 train.tar and test.tar.")
flags.DEFINE_string("weights", "runs/weights/resnet18_cifar10", "Converted ResNet-18 checkpoint.")

STEPS, BATCH, HELD_OUT = 6, 128, 512


def main(argv):
    del argv
    spec = f"tar:{FLAGS.data}/train.tar"
    work = workload_lib.open_workload(workload_lib.WorkloadConfig(
        model="resnet18_cifar", weights=FLAGS.weights, dataset=f"tar:{FLAGS.data}/test.tar", calib_dataset=spec,
        calib_images=128, eval_images=16, batch_size=128))
    source = data.open_dataset(spec)
    indices = np.arange(STEPS * BATCH + HELD_OUT) * 37  # spread over the classes
    images = data.load_uint8(source, indices, work.preprocessing)
    labels = source.labels[indices].astype(np.int32)
    stats, _ = work.collect_stats()
    policy = work.calibrated(stats, ptq.PTQConfig(w_bits=4, a_bits=4))
    config = qat.QatConfig(distill_weight=FLAGS.distill_weight, asymmetric=FLAGS.asymmetric,
                           batchnorm=FLAGS.batchnorm)
    start = qat.prepare(work.model, work.variables, policy, work.calls, example=work.spec.example_input(1),
                        config=config, statistics=stats)
    setup = qat.control_setup(start.setup) if FLAGS.control else start.setup
    pre = work.preprocessing
    held_out = training.normalize(jnp.asarray(images[-HELD_OUT:]), jnp.asarray(pre.mean), jnp.asarray(pre.std))

    batch_stats = [start.variables["batch_stats"]]

    def accuracy(trainables) -> float:
        result = qat.finalize(work.model, start, trainables, batch_stats[0], config=config,
                              example=work.spec.example_input(1))
        logits = apply.quantized_apply(work.model, qat.quantized_variables(result), result.policy, held_out,
                                       quantize_kernels=False)
        return 100 * float(jnp.mean(logits.argmax(-1) == labels[-HELD_OUT:]))

    label = "control" if FLAGS.control else f"W4A4 {config}"
    print(f"{label} start: held-out top-1 {accuracy(start.trainables):.2f}%")
    for pair in FLAGS.rates:
        weight_rate, step_rate = (float(v) for v in pair.split(":"))
        optimizer = qat.make_optimizer(training.make_optimizer(FLAGS.optimizer, weight_rate, weight_decay=0.0),
                                       training.make_optimizer(FLAGS.optimizer, step_rate, weight_decay=0.0))
        step = qat.make_step(work.model, optimizer, config, seed=0, mean=pre.mean, std=pre.std,
                             augmentation=False)
        state = qat.init_state(start, optimizer)
        for i in range(STEPS):
            batch = slice(i * BATCH, (i + 1) * BATCH)
            state, metrics = step(state, setup, work.variables, images[batch], labels[batch])
        batch_stats[0] = state.batch_stats
        print(f"{FLAGS.optimizer} {weight_rate:g} / {step_rate:g}: last training loss "
              f"{float(metrics['loss']):.3f}, held-out top-1 {accuracy(state.params):.2f}%", flush=True)


if __name__ == "__main__":
    app.run(main)
