"""Where the one-pass estimate's time goes: a forward, a plain gradient, a micro-batched
gradient and the estimator itself (all layers, and weights only), side by side on one batch.

    python -m benchmarks.second_order_profile --model=efficientnet_lite0 --weights=package \
        --calib_dataset=folder:../shared/data/imagenet/calib --images=16

Steady-state seconds per call (the mean of two calls after a compiling one), and the
compiled estimator's FLOPs and bytes from XLA's cost analysis, against the plain gradient's.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import second_order_bench
from eqjax.algorithms import second_order


def _seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / 2


def _cost(compiled) -> str:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return f"{cost.get('flops', 0):.3g} FLOPs, {cost.get('bytes accessed', 0):.3g} bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    second_order_bench.add_workload_flags(parser, images=16)
    parser.add_argument("--micro_batch", type=int, default=8)
    args = parser.parse_args()
    model, variables, ((images, labels),), policy, layers = second_order_bench.load_workload(
        args, batch_size=args.images)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    m = args.micro_batch
    print(f"{args.model}: {len(layers)} layers, {args.images} images, micro-batch {m}, "
          f"device {jax.devices()[0].device_kind}", flush=True)

    def loss(params, x, y):
        log_p = jax.nn.log_softmax(model.apply({**variables, "params": params}, x))
        return -jnp.sum(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    split = lambda a: a.reshape((args.images // m, m) + a.shape[1:])
    forward = jax.jit(lambda v, x: model.apply(v, x))
    gradient = jax.jit(jax.grad(loss))
    micro_gradient = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
    weights_only = {n: lq._replace(a_enabled=jnp.asarray(False)) for n, lq in policy.items()}
    mask, key = jnp.ones((args.images,), jnp.float32), jax.random.key(0)
    rows = [("forward", forward, (variables, images)),
            ("gradient (one batch)", gradient, (variables["params"], images, labels)),
            (f"gradient per micro-batch of {m}", micro_gradient,
             (variables["params"], split(images), split(labels))),
            ("estimator, weights and inputs", second_order.make_estimator(model, policy, layers, (4, 6, 8), micro_batch=m),
             (variables, images, labels, mask, key)),
            ("estimator, weights only", second_order.make_estimator(model, weights_only, layers, (4, 6, 8), micro_batch=m),
             (variables, images, labels, mask, key))]
    base = None
    for name, fn, fn_args in rows:
        seconds = _seconds(fn, *fn_args)
        base = base or seconds
        print(f"{name:34s} {seconds:7.2f} s ({seconds / base:5.1f} forwards); {_cost(fn.lower(*fn_args).compile())}",
              flush=True)


if __name__ == "__main__":
    main()
