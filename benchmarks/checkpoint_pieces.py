"""Split an eqjax checkpoint into small .npz pieces and join them again (exact, float32 kept).

The device machine returns files of at most 16 MB, and a DeiT-width ViT's variables are 22 MB:

    python -m benchmarks.checkpoint_pieces split runs/vit/train/final $OUT/vit   # vit.json, vit.0.npz, ...
    python -m benchmarks.checkpoint_pieces join /work/.device/.../vit runs/weights/vit_tiny_cifar10

``split`` also takes an experiments.train output folder (``WORKDIR/train``) whose run was stopped
before it wrote ``final/``: then the parameters of its newest checkpoint are split.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
from flax import traverse_util

from eqjax import checkpoint, models

PIECE_BYTES = 12 * 2 ** 20


def _newest_training_state(train_dir: str) -> checkpoint.Checkpoint:
    """The parameters of the newest checkpoint of an experiments.train run (no ``final/`` yet)."""
    import orbax.checkpoint as ocp

    steps = sorted(int(d) for d in os.listdir(os.path.join(train_dir, "checkpoints")) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {train_dir}/checkpoints")
    state = ocp.StandardCheckpointer().restore(os.path.join(train_dir, "checkpoints", str(steps[-1]), "state"))
    with open(os.path.join(train_dir, "results.json")) as f:
        run = json.load(f)
    return checkpoint.Checkpoint(run["model"], run["num_classes"], models.Preprocessing.from_dict(run["preprocessing"]),
                                 {"params": state["params"]}, f"{train_dir} step {steps[-1]}")


def split(source: str, prefix: str) -> list[str]:
    final = os.path.join(source, "final")
    if os.path.isdir(os.path.join(source, "checkpoints")):
        ck = checkpoint.load(final) if checkpoint.is_checkpoint(final) else _newest_training_state(source)
    else:
        ck = checkpoint.load(source)
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(ck.variables).items()}
    pieces, current, size = [], {}, 0
    for key, value in flat.items():
        if current and size + value.nbytes > PIECE_BYTES:
            pieces.append(current)
            current, size = {}, 0
        current[key] = value
        size += value.nbytes
    pieces.append(current)
    paths = []
    for i, piece in enumerate(pieces):
        paths.append(f"{prefix}.{i}.npz")
        np.savez(paths[-1], **piece)
    with open(f"{prefix}.json", "w") as f:
        json.dump({"model": ck.model, "num_classes": ck.num_classes, "preprocessing": ck.preprocessing.to_dict(),
                   "pieces": len(pieces)}, f, indent=1)
    return paths


def join(prefix: str, destination: str) -> str:
    with open(f"{prefix}.json") as f:
        meta = json.load(f)
    paths = sorted(glob.glob(f"{prefix}.*.npz"))
    if len(paths) != meta["pieces"]:
        raise ValueError(f"{prefix}.json names {meta['pieces']} pieces, found {len(paths)}: {paths}")
    flat = {}
    for path in paths:
        with np.load(path) as piece:
            flat.update({tuple(k.split("/")): piece[k] for k in piece.files})
    return checkpoint.save(destination, traverse_util.unflatten_dict(flat), model=meta["model"],
                           num_classes=meta["num_classes"],
                           preprocessing=models.Preprocessing.from_dict(meta["preprocessing"]),
                           source=f"benchmarks.checkpoint_pieces:{prefix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["split", "join"])
    parser.add_argument("source")
    parser.add_argument("destination")
    args = parser.parse_args()
    print(split(args.source, args.destination) if args.command == "split" else join(args.source, args.destination))


if __name__ == "__main__":
    main()
