"""Kill -9 at random points, and what verification costs on restore.

    python -m benchmarks.fault_injection --out=runs/fault_injection            # both parts
    python -m benchmarks.fault_injection --part=restore --out=runs/fault_injection

``kills``: for each long-running script (experiments.train, experiments.qat, experiments.ptq with
a reconstruction) one uninterrupted reference run, then ``--kills`` runs killed with SIGKILL at
random moments of their long work (uniform over 5-95 % of the reference's time from its first
progress line, a training step or a finished reconstruction unit, to its end; seeded; a run that
finishes first is not counted) and started again with the same flags (plus ``--resume`` where
the script has it). Each outcome is ``identical`` (the final
state's arrays equal the reference's, bit for bit), ``error`` (exit status != 0 with a one-line
error, no traceback) or ``silent`` (a different state, or a traceback). Target: 0 silent.

``restore``: a ResNet-18 (CIFAR stem, SGD momentum) training checkpoint of experiments.train
restored ``--repeats`` times by orbax alone and by ``experiments.loop.Checkpoints.restore``, which
also checks every array's SHA-256; the median of each, side by side. Target: ratio <= 1.2.

Writes OUT/results.json. Data: the shared CIFAR-10 tars (../shared/data/cifar10).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import jax
import numpy as np

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))


def _jobs(data: str, weights: str) -> dict[str, dict]:
    """Per script: its flags (without --workdir), whether it takes --resume, and where its final state is."""
    common = [f"--calib_dataset=tar:{data}/train.tar", f"--dataset=tar:{data}/test.tar", "--eval_images=64",
              "--batch_size=32"]
    return {
        "train": {"argv": ["-m", "experiments.train", "--model=resnet18_cifar", f"--dataset=tar:{data}/train.tar",
                           f"--eval_dataset=tar:{data}/test.tar", "--train_images=256", "--eval_images=64",
                           "--epochs=2", "--batch_size=32", "--checkpoint_every=3", "--log_every=4"],
                  "resume": True, "marker": "step 4/", "state": ("train/final", "eqjax_checkpoint.json", "variables")},
        "qat": {"argv": ["-m", "experiments.qat", "--model=resnet18_cifar", f"--weights={weights}", "--bits=4",
                         *common, "--calib_images=64", "--train_images=256", "--epochs=2", "--train_batch_size=32",
                         "--checkpoint_every=3", "--log_every=4"],
                "resume": True, "marker": "step 4/", "state": ("qat/final", "qat_state.json", "arrays")},
        "ptq_reconstruct": {"argv": ["-m", "experiments.ptq", "--model=resnet18_cifar", f"--weights={weights}",
                                     "--bits=4", *common, "--calib_images=64", "--reconstruct=adaround",
                                     "--recon_iterations=20"],
                            "resume": False, "marker": "unit 1/",
                            "state": ("ptq/reconstruction", "reconstruction.json", "arrays")},
    }


def _run(argv: list[str], workdir: str, *, marker: str, kill_after: float | None = None) -> dict:
    """Runs ``python argv --workdir=workdir``; with ``kill_after``, SIGKILLs it that many seconds
    after its stderr first shows ``marker`` (its long work has begun). Returns the exit status,
    stderr, wall seconds, seconds until ``marker``, and whether the kill landed before the end."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv, f"--workdir={workdir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines, seen = [], threading.Event()
    marked = [None]

    def read():
        for line in proc.stderr:
            lines.append(line)
            if marker in line and not seen.is_set():
                marked[0] = time.perf_counter() - start
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    if kill_after is not None:
        while not seen.wait(0.05) and proc.poll() is None:
            pass
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed = True
    proc.wait()
    reader.join()
    return {"exit": proc.returncode, "stderr": "".join(lines), "seconds": time.perf_counter() - start,
            "marker_s": marked[0], "killed": killed}


def _state(workdir: str, where: tuple[str, str, str]):
    from eqjax import storage

    folder, meta_file, arrays_dir = where
    return storage.load_tree(os.path.join(workdir, folder), meta_file=meta_file, arrays_dir=arrays_dir,
                             what="final state")[0]


def _identical(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def kills(out: str, *, num_kills: int, seed: int, weights: str, only: list[str] | None, save) -> None:
    """Runs the kill trials script by script, calling ``save(name, result)`` after each."""
    for index, (name, job) in enumerate(_jobs(DATA, weights).items()):
        if only and name not in only:
            continue
        rng = np.random.default_rng([seed, index])
        ref_dir = os.path.join(out, name, "reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = _run(job["argv"], ref_dir, marker=job["marker"])
        if ref["exit"] != 0 or ref["marker_s"] is None:
            raise RuntimeError(f"{name}: the reference run failed or never printed {job['marker']!r}:\n"
                               f"{ref['stderr'][-2000:]}")
        reference, seconds = _state(ref_dir, job["state"]), ref["seconds"]
        window = seconds - ref["marker_s"]  # the long work, after start-up and compilation
        print(f"{name}: reference {seconds:.1f} s, long work from {ref['marker_s']:.1f} s", flush=True)
        trials = []
        while len(trials) < num_kills:
            work = os.path.join(out, name, f"kill{len(trials)}")
            shutil.rmtree(work, ignore_errors=True)
            at = float(rng.uniform(0.05, 0.95) * window)
            killed = _run(job["argv"], work, marker=job["marker"], kill_after=at)
            if not killed["killed"]:  # it finished first: not a kill, draw again
                print(f"{name}: finished before the kill at +{at:.1f} s; drawing again", flush=True)
                continue
            again = _run(job["argv"] + (["--resume"] if job["resume"] else []), work, marker=job["marker"])
            err = again["stderr"]
            if again["exit"] == 0:
                outcome = "identical" if _identical(_state(work, job["state"]), reference) else "silent"
            else:
                outcome = "silent" if "Traceback" in err else "error"
            lines = [line for line in err.splitlines() if "resum" in line.lower() or "corrupt" in line.lower()]
            trials.append({"kill_after_marker_s": at, "killed_at_s": killed["seconds"], "outcome": outcome,
                           "rerun_s": again["seconds"], "rerun_exit": again["exit"], "notes": lines[-3:],
                           "error": err.strip().splitlines()[-1:] if again["exit"] else []})
            print(f"{name}: kill {len(trials)}/{num_kills} at {killed['seconds']:.1f} s -> {outcome} "
                  f"(rerun {again['seconds']:.1f} s)", flush=True)
            shutil.rmtree(work, ignore_errors=True)
        save(name, {"reference_s": seconds, "work_window_s": window, "trials": trials,
                    "outcomes": {o: sum(t["outcome"] == o for t in trials) for o in ("identical", "error", "silent")}})


def restore(out: str, *, repeats: int) -> dict:
    import orbax.checkpoint as ocp

    from eqjax import models, training
    from experiments import loop

    spec = models.get("resnet18_cifar")
    variables = spec.init(jax.random.key(0), num_classes=100)
    optimizer = training.make_optimizer("sgd", lambda step: 0.1, weight_decay=5e-4)
    state = training.init_state(variables, optimizer)
    directory = os.path.abspath(os.path.join(out, "restore_checkpoints"))
    shutil.rmtree(directory, ignore_errors=True)
    ckpts = loop.Checkpoints(directory)
    ckpts.save(state.replace(step=state.step + 1), {"config": {}, "curve": []})
    ckpts.close()
    template = jax.tree_util.tree_map(np.asarray, state)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(template))

    def plain():
        manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
        manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(template),
                                                   meta=ocp.args.JsonRestore()))
        manager.close()

    def verified():
        checkpoints = loop.Checkpoints(directory)
        checkpoints.restore(template)
        checkpoints.close()

    times = {"orbax_s": [], "verified_s": []}
    for _ in range(repeats):  # interleaved, so both see the same page cache and machine load
        for key, fn in (("orbax_s", plain), ("verified_s", verified)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"state_mb": nbytes / 1e6, "repeats": repeats, **median, "ratio": median["verified_s"] / median["orbax_s"],
            "all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fault_injection")
    parser.add_argument("--part", choices=["all", "kills", "restore"], default="all")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated scripts of the kills part (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights", default="runs/weights/resnet18_cifar10",
                        help="the converted shared ResNet-18 (python -m weights_convert ..., see README)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    if args.part in ("all", "restore"):
        results["restore"] = restore(args.out, repeats=args.repeats)
        print(json.dumps({k: v for k, v in results["restore"].items() if k != "all"}), flush=True)
    def save(name=None, result=None):
        if name is not None:
            results.setdefault("kills", {})[name] = result
        results["command"] = " ".join(sys.argv)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}", flush=True)

    save()
    if args.part in ("all", "kills"):
        kills(args.out, num_kills=args.kills, seed=args.seed, weights=args.weights,
              only=[s for s in args.only.split(",") if s], save=save)


if __name__ == "__main__":
    main()
