"""How many epochs of a training recipe fit in a time budget on this machine.

    python -m benchmarks.train_probe --model=vit_tiny_cifar --train_images=40000 --budget_s=240

Times ``--steps`` steps of experiments.train's jitted step (the recipe's optimizer, batch size and
augmentation, the compute dtype experiments.train picks) on random uint8 images after one
compiling step, and prints ``img/s`` and a last line ``EPOCHS=<n>`` (at least 1, at most the
recipe's) for a shell script to read. Evaluation and checkpoints between epochs are not counted.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqjax import models, training
from experiments import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_cifar", choices=list(train.RECIPES))
    parser.add_argument("--train_images", type=int, required=True)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--budget_s", type=float, required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    config = train.TrainConfig.from_recipe(args.model)
    spec = models.get(args.model)
    dtype = train._compute_dtype(config.compute_dtype)
    model = spec.build(num_classes=args.num_classes, dtype=dtype)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(spec.example_input(1).shape))
    optimizer = training.make_optimizer(config.optimizer, lambda step: config.learning_rate,
                                        weight_decay=config.weight_decay, clip_grad_norm=config.clip_grad_norm)
    state = training.init_state(variables, optimizer)
    step = training.make_train_step(model, optimizer, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3,
                                    label_smoothing=config.label_smoothing)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (config.batch_size, spec.input_size, spec.input_size, 3), np.uint8))
    labels = jnp.asarray(rng.integers(0, args.num_classes, (config.batch_size,)))
    state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)
    rate = args.steps * config.batch_size / (time.perf_counter() - start)
    epochs = int(np.clip(args.budget_s * rate // args.train_images, 1, config.epochs))
    print(f"{args.model} ({dtype.name}, batch {config.batch_size}) on {jax.devices()[0].device_kind}: "
          f"{rate:.0f} img/s; {args.budget_s:.0f} s fit {epochs} epochs of {args.train_images} images")
    print(f"EPOCHS={epochs}")


if __name__ == "__main__":
    main()
