"""One reconstruction step against its floor, per unit, side by side in one run.

    python -m benchmarks.reconstruction_speed                       # resnet18_cifar, CPU
    python -m benchmarks.reconstruction_speed --model=efficientnet_lite0 --images=1024 --batch=32

For each unit (``--units``, default a spread over the network) of a W4A4 BRECQ reconstruction,
on ``--images`` random calibration images (timing does not depend on the values) with random
weights, times in milliseconds per step, after a warm-up call of each:

  floor   the unit's jitted step (forward + backward + Adam) on one fixed mini-batch already on
          the device, called ``--steps`` times;
  host    the loop eqjax ran before: mini-batch indices drawn with NumPy, host arrays sliced and
          copied, one jitted call per step;
  call    eqjax's loop with one step per call (the CPU default): activations on the device,
          mini-batches drawn with ``jax.random`` inside the call;
  chunk   ``--chunk_steps`` steps in one call (``lax.fori_loop``, the default off the CPU; XLA:CPU runs
          the weight-gradient convolutions inside a loop without its fast kernels, so on CPU
          it is timed on a few steps only).

Prints one row per unit and the sums. Targets: the default loop (call on CPU, chunk elsewhere)
within 1.3x of the floor on 2 CPU cores, 2x on a GPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from eqjax import models, ptq
from eqjax.algorithms import reconstruction

_MODEL = flags.DEFINE_string("model", "resnet18_cifar", "Registry name.")
_IMAGES = flags.DEFINE_integer("images", 256, "Calibration images.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps timed per loop.")
_CHUNK_STEPS = flags.DEFINE_integer("chunk_steps", 5, "Steps of the chunk loop (slow on CPU, see its docstring).")
_UNITS = flags.DEFINE_list("units", None, "Unit paths (default: first, middle and last units and two blocks).")
_DTYPE = flags.DEFINE_enum("activation_dtype", "float32", list(reconstruction.ACTIVATION_DTYPES), "Device storage.")


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv):
    del argv
    spec = models.get(_MODEL.value)
    num_classes = 10 if spec.input_size == 32 else 1000
    model = spec.build(num_classes=num_classes)
    variables = spec.init(jax.random.key(0), num_classes=num_classes)
    images = np.asarray(jax.random.normal(jax.random.key(1), (_IMAGES.value, spec.input_size, spec.input_size, 3)))
    policy = ptq.calibrate(model, variables, [images[i:i + 64] for i in range(0, len(images), 64)],
                           ptq.PTQConfig(w_bits=4, a_bits=4))
    config = reconstruction.ReconstructionConfig(method="brecq", iterations=_STEPS.value, batch_size=_BATCH.value,
                                                 activation_dtype=_DTYPE.value, chunk_steps=_STEPS.value)
    units = reconstruction.find_units(model, images[:1], policy, is_block=spec.is_block)
    chosen = _UNITS.value or sorted({u.path for u in (units[0], units[1], units[len(units) // 2], units[-2], units[-1])},
                                    key=[u.path for u in units].index)
    hyper = reconstruction.hyperparameters(config)
    batch, steps = _BATCH.value, _STEPS.value
    print(f"{spec.name}, {_IMAGES.value} images, batch {batch}, {steps} steps per loop ({_CHUNK_STEPS.value} in "
          f"the chunk), {jax.devices()[0].platform}, "
          f"activations {_DTYPE.value}")
    print(f"{'unit':<16} {'floor ms':>9} {'host ms':>9} {'call ms':>9} {'chunk ms':>9} {'call/floor':>11} "
          f"{'chunk/floor':>12} {'host/call':>10}")
    totals = np.zeros(4)
    for unit in (u for u in units if u.path in chosen):
        problem = reconstruction.unit_problem(model, variables, policy, {}, {}, unit, images, config)
        fns = problem.functions
        args = (problem.sub_vars, problem.policy, problem.scales)
        opt = reconstruction._optimizer(config.rounding_lr, config.clip_lr).init(problem.state)
        key = jax.random.key(0)
        fixed = [jnp.asarray(a[:batch]) for a in (problem.x_q, problem.x_fp, problem.target)]
        data = reconstruction.device_activations((problem.x_q, problem.x_fp, problem.target, None), _DTYPE.value)
        zero = jnp.zeros((), jnp.float32)
        carry = (problem.state, opt, key, zero, zero, jnp.asarray(False))

        def floor():
            state, opt_state = problem.state, opt
            for i in range(steps):
                state, opt_state, loss, _ = fns.step(state, opt_state, *args, *fixed, None, key, jnp.float32(i), hyper)
            loss.block_until_ready()

        rng = np.random.default_rng(0)

        def host():
            state, opt_state, k = problem.state, opt, key
            for i in range(steps):
                idx = np.sort(rng.choice(len(problem.x_q), batch, replace=False))
                k, sub = jax.random.split(k)
                state, opt_state, loss, _ = fns.step(state, opt_state, *args, problem.x_q[idx], problem.x_fp[idx],
                                                     problem.target[idx], None, sub, jnp.float32(i), hyper)
            loss.block_until_ready()

        def call():
            c = carry
            for i in range(steps):
                c = fns.sampled_step(c, jnp.int32(i), *args, data, hyper, batch=batch)
            c[3].block_until_ready()

        def chunk():
            fns.chunk(carry, jnp.int32(0), jnp.int32(_CHUNK_STEPS.value), *args, data, hyper,
                      batch=batch)[3].block_until_ready()

        loops = (floor, host, call, chunk)
        for fn in loops:
            fn()  # compile and warm up
        ms = np.array([_median_ms(fn) for fn in loops]) / [steps, steps, steps, _CHUNK_STEPS.value]
        totals += ms
        print(f"{unit.path:<16} {ms[0]:9.2f} {ms[1]:9.2f} {ms[2]:9.2f} {ms[3]:9.2f} {ms[2] / ms[0]:11.2f} "
              f"{ms[3] / ms[0]:12.2f} {ms[1] / ms[2]:10.2f}")
    t = totals
    print(f"{'all':<16} {t[0]:9.2f} {t[1]:9.2f} {t[2]:9.2f} {t[3]:9.2f} {t[2] / t[0]:11.2f} {t[3] / t[0]:12.2f} "
          f"{t[1] / t[2]:10.2f}")


if __name__ == "__main__":
    app.run(main)
