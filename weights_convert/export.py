"""A trained eqjax checkpoint as a committable file: a timm-named ``.safetensors`` state_dict plus a JSON.

    python -m weights_convert.export --checkpoint=runs/weights/vit_tiny_cifar10 \\
        --out=weights/vit_tiny_cifar10/vit_tiny_cifar10.safetensors \\
        --train_results=runs/vit_gpu/train/results.json --check_results=runs/vit_check/ptq/results.json

Writes FILE.safetensors (float32, or float16 with --float16; at most --max_mb) and FILE.json: the
model, its preprocessing at the top level (what ``--weights=FILE.safetensors`` reads beside the
file), and how it was made: the training command, hardware, epochs and accuracy from
experiments.train's results.json, and the FP32 top-1 of an experiments.ptq run on a fixed
subset (``check``: dataset, image count, seed, top-1), which tests/test_convert.py reproduces.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from eqjax import checkpoint, storage
from weights_convert.core import _flat_targets, convert, state_dict_of

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An eqjax checkpoint directory (weights_convert, "
                                  "experiments.train's WORKDIR/train/final).")
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write (FILE.json goes beside it).")
_TRAIN = flags.DEFINE_string("train_results", None, "experiments.train's results.json of the run that made it.")
_CHECK = flags.DEFINE_string("check_results", None, "An experiments.ptq results.json of these weights: its FP32 "
                             "top-1 on its evaluation images becomes the JSON's check.")
_FLOAT16 = flags.DEFINE_bool("float16", False, "Store float16 (half the bytes; the check is then of float16).")
_MAX_MB = flags.DEFINE_float("max_mb", 25.0, "Refuse to write a larger file.")


def _read(path: str | None, flag: str) -> dict | None:
    if path is None:
        return None
    return storage.read_json_object(path, where=f"{flag}={path}", what="a results.json")


def made_by(train: dict | None, check: dict | None) -> dict:
    """The provenance fields of FILE.json from the two results files (absent ones omitted)."""
    about = {}
    if train:
        env = train.get("environment", {})
        about["training"] = {"command": " ".join(["python -m experiments.train", *env.get("argv", [])[1:]]),
                             "device": env.get("device_kind"), "platform": env.get("platform"),
                             "epochs": len(train.get("curve", [])), "top1": train.get("top1"),
                             "top5": train.get("top5"), "git_commit": env.get("git_commit")}
    if check:
        config = check["config"]
        about["check"] = {"dataset": config["dataset"], "calib_dataset": config["calib_dataset"],
                          "eval_images": check["num_eval_images"],
                          "seed": config["seed"], "batch_size": config["batch_size"],
                          "fp32_top1": check["fp32_top1"], "fp32_top5": check["fp32_top5"]}
    return about


def export(checkpoint_dir: str, out: str, *, train: dict | None = None, check: dict | None = None,
           float16: bool = False, max_mb: float = 25.0) -> tuple[str, int]:
    """Writes ``out`` and ``out`` with ``.json``; returns (the JSON's path, bytes of the state_dict).

    Raises:
      ValueError: ``out`` does not end in .safetensors, the file would exceed ``max_mb``, or the
        written state_dict does not convert back to the checkpoint's variables exactly.
    """
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out={out} must end in .safetensors")
    from safetensors.numpy import save_file

    loaded = checkpoint.load(checkpoint_dir)
    state = state_dict_of(loaded.model, loaded.variables)
    state = {k: np.ascontiguousarray(v.astype(np.float16) if float16 and v.dtype == np.float32 else v)
             for k, v in state.items()}
    size = sum(v.nbytes for v in state.values())
    if size > max_mb * 1e6:
        raise ValueError(f"{checkpoint_dir} is {size / 1e6:.1f} MB as a state_dict, over --max_mb={max_mb}"
                         + ("" if float16 else "; --float16 halves it"))
    back = convert(loaded.model, {k: v.astype(np.float32) for k, v in state.items()},
                   num_classes=loaded.num_classes)
    expected = _flat_targets(loaded.variables)
    for path, value in _flat_targets(back).items():
        want = np.asarray(expected[path], np.float16 if float16 else None).astype(np.float32)
        if not np.array_equal(np.asarray(value), want):
            raise ValueError(f"{'/'.join(path)} does not convert back exactly")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    storage.write_atomic(out, lambda tmp: save_file(state, tmp))
    meta = {"model": loaded.model, "num_classes": loaded.num_classes, **loaded.preprocessing.to_dict(),
            "dtype": "float16" if float16 else "float32", **made_by(train, check)}
    json_path = out[: -len(".safetensors")] + ".json"

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    storage.write_atomic(json_path, write)
    return json_path, size


def main(argv):
    del argv
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    json_path, size = export(_CHECKPOINT.value, _OUT.value, train=_read(_TRAIN.value, "--train_results"),
                             check=_read(_CHECK.value, "--check_results"), float16=_FLOAT16.value,
                             max_mb=_MAX_MB.value)
    print(f"wrote {_OUT.value} ({size / 1e6:.1f} MB) and {json_path}")


if __name__ == "__main__":
    app.run(main)
