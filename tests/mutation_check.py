"""Plants plausible bugs one at a time in a scratch copy of the repo and expects the tests to catch each.

    .venv/bin/python -m tests.mutation_check [--only=NAME,NAME]

Each mutant is one exact text replacement in the library and the tests that must fail on it;
the script copies the checkout (tracked and untracked files, not ignored ones) to a temporary
folder, plants the bug there, runs those tests with the scratch copy first on the path, and
reports ``caught`` or ``MISSED``. Exit status 1 when any mutant is missed (or its text is no
longer in the code: update the mutant with the code). Not part of CI: it runs pytest once per
mutant (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file::-k expr"


MUTANTS = (
    Mutant("fisher weight term times the micro-batch size", "eqjax/algorithms/second_order.py",
           "h = np.asarray(weight_curv[name], np.float64) / num_images",
           "h = np.asarray(weight_curv[name], np.float64) / num_images * micro_batch",
           ("tests/test_second_order.py::test_fisher_weight_term_of_micro_batches_equals_a_hand_computation_under_padding",)),
    Mutant("hutchinson activation term not divided by the element count", "eqjax/algorithms/second_order.py",
           "h = float(act_traces[name]) / num_images / elements", "h = float(act_traces[name]) / num_images",
           ("tests/test_second_order.py::test_hessian_estimates_match_the_exact_traces_of_the_last_layer_over_seeds",)),
    Mutant("padding mask removed from the one-pass loss", "eqjax/algorithms/second_order.py",
           "loss = -jnp.sum(mask * jnp.take_along_axis(", "loss = -jnp.sum(jnp.take_along_axis(",
           ("tests/test_second_order.py::test_fisher_weight_term_of_micro_batches_equals_a_hand_computation_under_padding",)),
    Mutant("BOPs counted as MACs·b_w²", "eqjax/algorithms/allocation.py",
           'return count.macs * (a if count.kind == "matmul" else w) * a / 1e9',
           'return count.macs * (a if count.kind == "matmul" else w) * (a if count.kind == "matmul" else w) / 1e9',
           ("tests/test_second_order.py::test_budget_usage_by_hand_at_non_uniform_widths",)),
    Mutant("quantizer search scores the input error", "eqjax/algorithms/vit_quant.py",
           "diff = _call_again(module, call, quantized, kwargs).astype(jnp.float32) - reference.astype(jnp.float32)",
           "diff = quantized[index].astype(jnp.float32) - args[index].astype(jnp.float32)",
           ("tests/test_vit_quant.py::test_search_picks_the_candidate_with_the_smallest_layer_output_error",)),
    Mutant("ranking term ignored inside reconstruction", "eqjax/algorithms/reconstruction.py",
           "loss = loss + ranking_weight * rank", "loss = loss + 0.0 * ranking_weight * rank",
           ("tests/test_vit_quant.py::test_reconstruction_with_the_ranking_term_learns_clips_of_log_and_twin_policies",)),
    Mutant("QDrop's drop probability forced to 0", "eqjax/algorithms/reconstruction.py",
           'return self.drop_prob if self.method == "qdrop" else 0.0', "return 0.0",
           ("tests/test_reconstruction.py::test_qdrop_drops_at_its_rate_and_fisher_weights_change_the_result",)),
    Mutant("Fisher weights dropped from the reconstruction loss", "eqjax/algorithms/reconstruction.py",
           "error = core.reconstruction_error(out, target, fisher)", "error = core.reconstruction_error(out, target, None)",
           ("tests/test_reconstruction.py::test_qdrop_drops_at_its_rate_and_fisher_weights_change_the_result",)),
    Mutant("TfdsSource.load returns record 0 for every index", "eqjax/data.py",
           'return Image.open(io.BytesIO(self._source[index]["image"]))',
           'return Image.open(io.BytesIO(self._source[0]["image"]))',
           ("tests/test_tfds.py::test_tfds_source_reads_images_and_labels",)),
    Mutant("unmatched bits rule without its closest layer names", "eqjax/quant/policy.py",
           'described = [p + (f" (closest layers: {\', \'.join(close)})"',
           'described = [p + ("" if True else f" (closest layers: {\', \'.join(close)})"',
           ("tests/test_bad_input.py::test_rule_that_matches_no_layer_names_the_closest",)),
    Mutant("reconstructed weights clamped one step past the grid's top", "eqjax/algorithms/reconstruction.py",
           "quantized = jnp.clip(base + jnp.asarray(up, jnp.float32), q_min, q_max) * scale",
           "quantized = jnp.clip(base + jnp.asarray(up, jnp.float32), q_min, q_max + 1) * scale",
           ("tests/test_reconstruction.py::test_adaround_lowers_the_layer_output_error",)),
)


def _copy_checkout(destination: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(destination, name))


def _pytest(scratch: str, tests) -> int:
    env = dict(os.environ, PYTHONPATH=scratch)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=scratch, env=env, capture_output=True, text=True).returncode


def run(mutant: Mutant | None, tests=()) -> str:
    """``caught``, ``MISSED`` or ``STALE`` (the mutant's text is not in the code once); with no
    mutant, ``clean`` when ``tests`` pass on the code as it is."""
    with tempfile.TemporaryDirectory(prefix="eqjax-mutant-") as scratch:
        _copy_checkout(scratch)
        if mutant is None:
            return "clean" if _pytest(scratch, tests) == 0 else "FAILING"
        path = os.path.join(scratch, mutant.path)
        with open(path) as f:
            text = f.read()
        if text.count(mutant.old) != 1:
            return "STALE"
        with open(path, "w") as f:
            f.write(text.replace(mutant.old, mutant.new))
        code = _pytest(scratch, mutant.tests)
        return "caught" if code == 1 else ("MISSED" if code == 0 else f"ERROR (pytest exit {code})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated substrings of mutant names")
    args = parser.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    mutants = [m for m in MUTANTS if not wanted or any(w in m.name for w in wanted)]
    baseline = run(None, sorted({t for m in mutants for t in m.tests}))
    print(f"{baseline:8s} the same tests on the code as it is", flush=True)
    if baseline != "clean":
        sys.exit(1)
    outcomes = {}
    for mutant in mutants:
        outcomes[mutant.name] = run(mutant)
        print(f"{outcomes[mutant.name]:8s} {mutant.name}", flush=True)
    missed = [n for n, o in outcomes.items() if o != "caught"]
    print(f"{len(outcomes) - len(missed)} of {len(outcomes)} mutants caught")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
