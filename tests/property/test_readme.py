"""The README's runnable example stays true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_layout_engine_example_runs() -> None:
    text = README.read_text()
    block = re.search(r"## The layout engine in one example\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its layout engine example"
    exec(compile(block.group(1), "README.md", "exec"), {})


def _setup_commands() -> list[str]:
    """The README's set-up block, one command per line, comments stripped."""
    text = README.read_text()
    block = re.search(r"## Set up and run the tests\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README lost its set-up block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_setup_is_a_new_venv_then_install_then_test() -> None:
    venv, install, test = _setup_commands()
    assert venv.startswith("python3 -m venv ") and "activate" in venv
    assert (
        install == "python3 -m pip install torch==2.13.0 -e '.[test]'"
        and test == "python3 -m pytest -n auto --dist loadfile"
    )


def test_ci_runs_the_readme_commands_inside_a_fresh_venv() -> None:
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    _, install, test = _setup_commands()
    assert install in ci and test in ci  # the same commands, character for character
    venv_at = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv "))
    assert ci[venv_at - 1].startswith("rm -rf ")  # created anew each run
    activate = next(i for i, line in enumerate(ci) if "/bin/activate" in line and line.startswith("."))
    assert venv_at < activate < ci.index(install) < ci.index(test)
    gitignore = (README.parent / ".gitignore").read_text().splitlines()
    assert "/.venv-ci/" in gitignore and "VENV=.venv-ci" in ci


def test_readme_states_the_matrix_wrapup_bound_and_exit_codes() -> None:
    from harness.cli import INTERNAL_ERROR_EXIT
    from harness.matrix import WRAPUP_BOUND_S

    text = README.read_text()
    assert f"`harness.matrix.WRAPUP_BOUND_S` ({WRAPUP_BOUND_S:g} s)" in text
    assert f"exits {INTERNAL_ERROR_EXIT}, which makes `git bisect run` stop" in text
