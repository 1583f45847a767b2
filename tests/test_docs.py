"""Every code block of README.md and docs/*.md runs: Python blocks are executed, and every command of a
bash block is checked (its script's flags parsed and its config validated, extras and files exist)."""

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# docs/your-own-model.md's first four blocks run, with their own checks, in tests/test_library_api.py.
CHECKED_ELSEWHERE = {"docs/your-own-model.md": 4}


def blocks(page: str, language: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), re.S)


def commands(page: str) -> list[list[str]]:
    """Each command of the page's bash blocks as argv (continuations joined, comments and ``&&`` split)."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                found.append(argv[:cut])
                argv = argv[cut + 1:]
    return found


def test_every_page_has_its_code_checked():
    assert len(blocks("docs/your-own-model.md", "python")) == 5  # four in test_library_api, one here
    assert [p for p in PAGES if blocks(p, "python") or blocks(p, "bash")], PAGES
    for page in PAGES:
        for language, _ in re.findall(r"```(\w*)\n(.*?)```", open(os.path.join(ROOT, page)).read(), re.S):
            assert language in ("python", "bash"), f"{page}: a ```{language} block is neither run nor checked"


@pytest.mark.parametrize("page", [p for p in PAGES if len(blocks(p, "python")) > CHECKED_ELSEWHERE.get(p, 0)])
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks(page, "python")[CHECKED_ELSEWHERE.get(page, 0):]:
        exec(compile(block, page, "exec"), namespace)
    if page == "README.md":
        assert capsys.readouterr().out.strip() == "True"


def _extras() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def test_bash_blocks_name_real_scripts_extras_and_files():
    """Installs name existing extras, `bash X.sh` existing scripts; every `python -m` is checked below."""
    scripts = {}
    for page in PAGES:
        for argv in commands(page):
            if argv[0] == "python3":
                assert argv[1:3] == ["-m", "venv"], (page, argv)
            elif argv[0].endswith("pip") and "install" in argv:
                for extras in re.findall(r"\.\[([\w,]+)\]", " ".join(argv)):
                    assert set(extras.split(",")) <= _extras(), (page, argv)
            elif argv[0] == "bash":
                assert os.path.exists(os.path.join(ROOT, argv[1])), (page, argv)
            elif argv[:3] == [".venv/bin/python", "-m", "pytest"]:
                assert os.path.isdir(os.path.join(ROOT, "tests")), argv
            elif argv[:2] == [".venv/bin/python", "-m"]:
                scripts.setdefault(argv[2], []).append(argv[3:])
            else:
                assert argv[:2] == [".venv/bin/python", "-c"], (page, argv)  # preparing TFDS data: needs network
    assert {"experiments.ptq", "experiments.report", "weights_convert"} <= set(scripts)
    result = subprocess.run([sys.executable, "-m", "tests.test_docs", json.dumps(scripts)], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == sum(map(len, scripts.values())), result.stdout


def _check_flags(scripts: dict[str, list[list[str]]]) -> int:
    """Parses each command's flags with its script's definitions and builds its config (no run)."""
    from absl import flags

    FLAGS = flags.FLAGS
    failures = 0
    for module_name in sorted(scripts, key=lambda m: m == "weights_convert"):  # defines its flags on import
        before = set(FLAGS)
        module = importlib.import_module("weights_convert.__main__" if module_name == "weights_convert"
                                         else module_name)
        if hasattr(module, "define_flags"):
            module.define_flags()
        for argv in scripts[module_name]:
            try:
                FLAGS([module_name, *argv])
                if hasattr(module, "config_from_flags"):
                    module.config_from_flags()
                print("ok", module_name, *argv)
            except Exception as e:  # noqa: BLE001 (reported, then the test fails)
                failures += 1
                print("FAILED", module_name, *argv, "->", type(e).__name__, e)
            FLAGS.unparse_flags()
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)
    return failures


if __name__ == "__main__":
    sys.exit(1 if _check_flags(json.loads(sys.argv[1])) else 0)
