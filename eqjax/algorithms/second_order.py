"""Layer sensitivity from one backward pass: a second-order estimate of the loss increase for
every layer and every candidate width of its weights and of its activation inputs.

For layer l with weights w (per-channel absmax grid at b_w bits, as ``apply.quantize_weights``)
and inputs x (per-tensor grid of its calibrated clip at b_a bits), with the quantization errors
δw(b_w) = Q(w) − w and δx(b_a) = Q(x) − x, the Taylor expansion of the loss at a trained
minimum (gradient term ≈ 0) gives

    Δloss_l(b_w, b_a) ≈ ½ Σ_i h_i δw_i²  +  ½ E_n Σ_j h_nj δx_nj²                          (*)

with a diagonal curvature h, estimated by one of

* ``fisher``: the diagonal empirical Fisher, h = E[g²] of per-image gradients g of the
  cross-entropy (labels, or the model's own prediction where a label is < 0). Activation
  gradients are exact per image (images do not interact in inference mode). Weight gradients
  come per micro-batch of m images, G = Σ_n g_n, and E[G²]/m = E[g²] + (m − 1)·E[g]² ≈ E[g²]
  near a minimum (m = 1 is exact).
* ``hessian``: Hutchinson's estimate of each layer's Hessian trace, E_v[vᵀHv] with Rademacher
  v (HAWQ-V2), spread evenly over the layer: h_i = Tr(H_l) / n_l.

Gradients to the activations go through the one interception point: each layer's input gets
a zero perturbation ε_l, and ∂loss/∂ε_l is ∂loss/∂x_l. Q(x) − x for every candidate width is
elementwise work on the recorded inputs, so all layers × all widths cost one forward and one
backward pass per micro-batch (plus a Hessian-vector product for ``hessian``), in one
compiled function for every batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqjax.quant import apply, intercept, nnx_model, numerics, policy as policy_lib
from eqjax.algorithms import sensitivity
from eqjax.algorithms.metrics import data_mesh
from eqjax.quant.policy import LayerQuant, Policy

METHODS = ("fisher", "hessian")


@dataclasses.dataclass(frozen=True)
class SecondOrderResult:
    """Estimated loss increases (nats per image, eq. (*) of the module docstring).

    Attributes:
      layers: the layers estimated.
      bits: candidate widths (the same set for weights and activations).
      weight: float64 [layers, bits]: the weight term at each weight width (0 for a layer
        without quantized weights, e.g. an attention matmul).
      activation: float64 [layers, bits]: the input term at each activation width (0 for a
        layer whose inputs are not quantized).
      method: ``fisher`` or ``hessian``.
      num_images: images the estimate averages over.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    weight: np.ndarray
    activation: np.ndarray
    method: str
    num_images: int

    def delta_loss(self, w_bits: int, a_bits: int | None = None) -> dict[str, float]:
        """``{layer: estimated Δloss}`` with weights at ``w_bits`` and inputs at ``a_bits``
        (default the same)."""
        a_bits = w_bits if a_bits is None else a_bits
        for b in (w_bits, a_bits):
            if b not in self.bits:
                raise ValueError(f"bits {b} were not estimated; estimated: {self.bits}")
        i, j = self.bits.index(w_bits), self.bits.index(a_bits)
        return {name: float(self.weight[k, i] + self.activation[k, j]) for k, name in enumerate(self.layers)}

    def same_width_table(self) -> np.ndarray:
        """[layers, bits]: weights and inputs at the same width (comparable with the sweep)."""
        return self.weight + self.activation

    def as_sensitivity(self) -> sensitivity.SensitivityResult:
        """The same-width table as a sensitivity result with one metric, ``delta_loss``, so the
        percentile rule, the budgeted knapsack and the Table 5 ranking take it as they take
        the sweep's."""
        return sensitivity.SensitivityResult(self.layers, self.bits, {"delta_loss": self.same_width_table()},
                                             self.num_images)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "bits": list(self.bits),
                "num_images": self.num_images, "weight": self.weight.tolist(),
                "activation": self.activation.tolist()}


def _check_layers(calls: Sequence[intercept.LayerCall], policy: Mapping[str, LayerQuant],
                  layers: Sequence[str]) -> None:
    names = [c.name for c in calls]
    twice = sorted({n for n in names if names.count(n) > 1} & set(layers))
    if twice:
        raise ValueError(f"layers called more than once per forward: {', '.join(twice)}; a "
                         "one-pass estimate needs one input per layer (use the direct sweep)")
    for where, known in (("the model", names), ("the policy", list(policy))):
        unknown = [n for n in layers if n not in set(known)]
        if unknown:
            described = [n + (f" (closest: {', '.join(close)})" if (close := intercept.closest_names(n, known))
                              else "") for n in unknown]
            raise ValueError(f"layers to estimate that are not in {where}: {', '.join(described)}")
    policy_lib.check_calibrated({n: policy[n] for n in layers})


def _weight_error_squares(variables: Mapping, policy: Policy, layers: Sequence[str],
                          bits: Sequence[int]) -> dict[str, jax.Array]:
    """``{layer: [bits, *kernel.shape]}`` squared weight quantization errors δw² at each width."""
    out = {}
    for b in bits:
        at_b = {n: policy[n]._replace(w_bits=jnp.int32(b)) for n in layers}
        quantized = apply.quantize_weights(variables, at_b)
        for n in layers:
            module = intercept.module_variables(variables, n)
            if module is None or "kernel" not in module or not bool(policy[n].w_enabled):
                continue
            kernel = module["kernel"].astype(jnp.float32)
            delta = intercept.module_variables(quantized, n)["kernel"].astype(jnp.float32) - kernel
            out.setdefault(n, []).append(jnp.square(delta))
    return {n: jnp.stack(v) for n, v in out.items()}


def _input_error_squares(lq: LayerQuant, inputs: Sequence[jax.Array], bits: Sequence[int]) -> list:
    """Per input, [bits, *x.shape] squared activation quantization errors δx² at each width."""
    out = []
    for i, x in enumerate(inputs[:lq.a_clip.shape[0]]):
        x = x.astype(jnp.float32)
        out.append(jnp.stack([jnp.square(apply.quantize_input(lq, i, x, jnp.int32(b)) - x) for b in bits]))
    return out


def _kernels(params, policy: Policy, layers: Sequence[str]) -> dict:
    """``{layer: kernel}`` of the ``layers`` whose weights are quantized, from a params tree."""
    out = {}
    for n in layers:
        module = intercept.module_variables({"params": params}, n)
        if bool(policy[n].w_enabled) and module is not None and "kernel" in module:
            out[n] = module["kernel"]
    return out


def make_estimator(model: nn.Module, policy: Policy, layers: Sequence[str], bits: Sequence[int], *,
                   method: str = "fisher", micro_batch: int = 8):
    """A jitted ``step(variables, images, labels, mask, key) -> (weight_curv, act_terms, act_traces)``.

    For one chunk ``[B, ...]`` of images (B a multiple of ``micro_batch``; ``mask`` [B] is 1 for
    real images and 0 for padding, which then adds nothing), its micro-batches under ``vmap``:
      weight_curv: fisher: the params tree of Σ G² over the batch's micro-batches, every
        parameter (:func:`_kernels` picks the layers' kernels outside the compiled step:
        returning the kernels alone lets XLA fuse the backward pass differently, 2.3× slower on
        Lite0 on CPU, BUILD_NOTES); hessian: ``{layer: Σ v⊙Hv}``, a scalar, broadcast later;
      act_terms: ``{layer: [bits]}`` Σ_n Σ_j h_nj δx_nj² (fisher) or Σ_n ||δx_n||² (hessian);
      act_traces: ``{layer: []}`` Σ v⊙Hv over the layer's inputs (hessian; 0 for fisher).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    layers = tuple(layers)
    bits = tuple(int(b) for b in bits)
    for b in bits:
        numerics.check_bits(b, name="second-order bits")
    policy = {n: policy[n] for n in layers}

    def loss_and_inputs(params, eps, variables, images, labels, mask):
        inputs = {}

        def perturb(name, module, call, args, kwargs):
            if name in eps:
                args = tuple(a + e.astype(a.dtype) for a, e in zip(args, eps[name])) + tuple(args[len(eps[name]):])
                inputs[name] = args
            return call(*args, **kwargs)

        with intercept.intercept_calls(perturb):
            logits = model.apply({**variables, "params": params}, images).astype(jnp.float32)
        target = jnp.where(labels >= 0, labels, jnp.argmax(jax.lax.stop_gradient(logits), -1))
        log_p = jax.nn.log_softmax(logits)
        loss = -jnp.sum(mask * jnp.take_along_axis(log_p, target[:, None], axis=-1)[:, 0])
        return loss, inputs

    def micro_step(variables, images, labels, mask, key):
        params = variables["params"]
        shapes = {}

        def shape_probe(name, module, call, args, kwargs):
            if name in policy:
                shapes[name] = [a.shape for a in args[:policy[name].a_clip.shape[0]]]
            return call(*args, **kwargs)

        with intercept.intercept_calls(shape_probe):
            jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
        eps = {n: [jnp.zeros(s, jnp.float32) for s in shapes[n]] for n in layers
               if bool(policy[n].a_enabled) and n in shapes}
        grad_fn = jax.grad(loss_and_inputs, argnums=(0, 1), has_aux=True)
        (g_params, g_eps), inputs = grad_fn(params, eps, variables, images, labels, mask)
        per_image = lambda a: jnp.sum(a, axis=tuple(range(2, a.ndim)))  # [bits, m, ...] -> [bits, m]
        act_terms, act_traces = {}, {}
        if method == "fisher":
            weight_curv = jax.tree_util.tree_map(jnp.square, g_params)
            for n in eps:
                errors = _input_error_squares(policy[n], inputs[n], bits)
                act_terms[n] = sum(per_image(jnp.square(g)[None] * e) @ mask for g, e in zip(g_eps[n], errors))
                act_traces[n] = jnp.zeros((), jnp.float32)
            return weight_curv, act_terms, act_traces
        # hessian: Hutchinson, v ~ Rademacher over the kernels and the input perturbations.
        k_params, k_eps = jax.random.split(key)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        v_params = jax.tree_util.tree_unflatten(treedef, [
            jax.random.rademacher(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(jax.random.split(k_params, len(leaves)), leaves)])
        eps_leaves, eps_def = jax.tree_util.tree_flatten(eps)
        v_eps = jax.tree_util.tree_unflatten(eps_def, [
            jax.random.rademacher(k, leaf.shape, jnp.float32)
            for k, leaf in zip(jax.random.split(k_eps, max(len(eps_leaves), 1)), eps_leaves)])
        grad_only = lambda p, e: grad_fn(p, e, variables, images, labels, mask)[0]
        _, (hv_params, hv_eps) = jax.jvp(grad_only, (params, eps), (v_params, v_eps))
        v_kernels, hv_kernels = _kernels(v_params, policy, layers), _kernels(hv_params, policy, layers)
        weight_curv = {n: jnp.sum(v_kernels[n] * hv_kernels[n]) for n in v_kernels}
        for n in eps:
            errors = _input_error_squares(policy[n], inputs[n], bits)
            act_terms[n] = sum(per_image(e) @ mask for e in errors)
            act_traces[n] = sum(jnp.sum(v * hv) for v, hv in zip(v_eps[n], hv_eps[n]))
        return weight_curv, act_terms, act_traces

    def step(variables, images, labels, mask, key):
        b = images.shape[0]
        if b % micro_batch:
            raise ValueError(f"batch of {b} images is not a multiple of micro_batch={micro_batch}")
        split = lambda a: a.reshape((b // micro_batch, micro_batch) + a.shape[1:])
        keys = jax.random.split(key, b // micro_batch)
        per_micro = jax.vmap(micro_step, in_axes=(None, 0, 0, 0, 0))(
            variables, split(images), split(labels), split(mask), keys)
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), per_micro)

    return jax.jit(step)


def estimate(model: nn.Module, variables: Mapping, policy: Policy, batches: Iterable[tuple], *,
             layers: Sequence[str] | None = None, bits: Sequence[int] = (4, 6, 8),
             method: str = "fisher", micro_batch: int = 8, seed: int = 0, mesh: Mesh | None = None,
             on_batch=None) -> SecondOrderResult:
    """Estimated Δloss (eq. (*)) of every layer at every width of weights and of inputs.

    Args:
      model, variables: the full-precision Flax model.
      policy: a calibrated policy (its activation clips, grids and enabled flags are used;
        its bits are replaced by each candidate width).
      batches: ``(images, labels)`` pairs; a label < 0 uses the model's own prediction.
      layers: layers to estimate (default: every layer of the policy with quantized weights
        or inputs).
      bits: candidate widths, for weights and activations alike.
      method: ``fisher`` (diagonal empirical Fisher) or ``hessian`` (Hutchinson trace).
      micro_batch: images per weight-gradient sample (fisher) or per Hutchinson probe.
      seed: Hutchinson probes' seed.
      mesh: devices to shard the micro-batches over (default all local devices; batches are
        padded with masked images to a multiple of ``micro_batch`` × devices).
      on_batch: called with the number of images seen after each batch.

    Returns:
      :class:`SecondOrderResult`.

    Raises:
      ValueError: unknown method, bits outside [2, 16], a layer the model or policy lacks or
        calls twice, a policy without clips, no images, a batch not divisible by micro_batch.
    """
    model, variables = nnx_model.as_functional(model, variables)
    if layers is None:
        layers = [n for n, lq in policy.items() if bool(lq.w_enabled) or bool(lq.a_enabled)]
    layers = tuple(layers)
    if not layers:
        raise ValueError("no layers to estimate")
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("batches is empty: the estimate needs at least one batch of images")
    calls = intercept.trace_layers(model, jnp.asarray(first[0][:1]), variables=variables)
    _check_layers(calls, policy, layers)
    step = make_estimator(model, policy, layers, bits, method=method, micro_batch=micro_batch)
    key = jax.random.key(seed)
    mesh = mesh or data_mesh()
    multiple = micro_batch * mesh.devices.size
    size = -(-len(first[0]) // multiple) * multiple  # every batch padded to this: one compilation
    # Micro-batches vmapped over a whole batch would make XLA:CPU's convolutions grouped ones,
    # several times slower (as in the sweep): on CPU each call takes one micro-batch per device.
    chunk = multiple if jax.default_backend() == "cpu" else size
    shard = NamedSharding(mesh, PartitionSpec("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    totals, num_images, num_calls = None, 0, 0
    for images, labels in itertools.chain([first], iterator):
        images, labels, mask = _padded(np.asarray(images), np.asarray(labels), max(size, len(images)), chunk)
        for start in range(0, len(images), chunk):
            part = slice(start, start + chunk)
            out = step(variables, *jax.device_put((images[part], labels[part].astype(np.int32), mask[part]), shard),
                       jax.random.fold_in(key, num_calls))
            totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
            num_calls += 1
        num_images += int(mask.sum())
        if on_batch is not None:
            on_batch(num_images)
    weight_curv, act_terms, act_traces = jax.device_get(totals)
    if method == "fisher":
        weight_curv = _kernels(weight_curv, policy, layers)
    errors = jax.device_get(_weight_error_squares(variables, policy, layers, bits))
    bits = tuple(int(b) for b in bits)
    weight = np.zeros((len(layers), len(bits)))
    activation = np.zeros((len(layers), len(bits)))
    for k, name in enumerate(layers):
        if name in weight_curv:
            sq = np.asarray(errors[name], np.float64)  # [bits, *kernel]
            if method == "fisher":
                h = np.asarray(weight_curv[name], np.float64) / num_images
                weight[k] = 0.5 * np.sum(h[None] * sq, axis=tuple(range(1, sq.ndim)))
            else:
                h = float(weight_curv[name]) / num_images / sq[0].size
                weight[k] = 0.5 * h * np.sum(sq, axis=tuple(range(1, sq.ndim)))
        if name in act_terms:
            terms = np.asarray(act_terms[name], np.float64)
            if method == "fisher":
                activation[k] = 0.5 * terms / num_images
            else:
                elements = sum(int(np.prod(s)) for s in _input_sizes(calls, name, policy[name]))
                h = float(act_traces[name]) / num_images / elements
                activation[k] = 0.5 * h * terms / num_images
    return SecondOrderResult(layers, bits, weight, activation, method, num_images)


def _input_sizes(calls: Sequence[intercept.LayerCall], name: str, lq: LayerQuant) -> list[tuple[int, ...]]:
    """Per-image shapes of a layer's quantized activation inputs."""
    call = next(c for c in calls if c.name == name)
    return [tuple(s[1:]) for s in call.input_shapes[:lq.a_clip.shape[0]]]


def _padded(images: np.ndarray, labels: np.ndarray, size: int, multiple: int):
    """Images and labels padded with zeros to ``size`` rounded up to ``multiple``, and the mask."""
    size = -(-size // multiple) * multiple
    pad = size - len(images)
    mask = np.concatenate([np.ones(len(images), np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    return images, np.concatenate([labels, np.zeros(pad, labels.dtype)]), mask
