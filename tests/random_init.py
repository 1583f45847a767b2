"""Random values for parameters that initialisers leave constant (tests would not see them)."""

import jax


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def random_batch_norms(variables, key):
    """Every BatchNorm scale, bias, mean and variance random (init leaves them 1, 0, 0, 1):
    scales and variances uniform in [0.3, 2], biases and means normal with std 0.5."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    norms = {_path_keys(path)[1:-1] for path, _ in leaves if _path_keys(path)[0] == "batch_stats"}
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        names = _path_keys(path)
        if names[1:-1] in norms:
            if names[-1] in ("scale", "var"):
                leaf = jax.random.uniform(k, leaf.shape, minval=0.3, maxval=2.0)
            else:
                leaf = 0.5 * jax.random.normal(k, leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)
