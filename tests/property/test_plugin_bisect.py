"""The README's ``git bisect run`` example, end to end on CPU.

A throwaway git repository holds a user's FP8 linear; one known commit makes it clamp the
caller's activation in place.  The matrix, run from the bad commit, writes a case file (outside
the repository: older commits do not have it); ``git bisect run python -m harness replay --bisect CASE``
then has to name exactly that commit -- from the case file alone (no ``HARNESS_PLUGINS``), with
replay exiting 0 on the good commits and 1 on the bad ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

GOOD = textwrap.dedent("""
    def my_linear(x, w):
        return (x.float().contiguous() @ w.float().T).to(x.dtype)
""")

BAD = textwrap.dedent("""
    def my_linear(x, w):
        x.clamp_(-448.0, 448.0)  # "keep the activation in the FP8 range" -- on the caller's tensor
        return (x.float().contiguous() @ w.float().T).to(x.dtype)
""")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git on PATH")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARNESS_", "GIT_")) and k != "PYTEST_ADDOPTS"}
    env.update(
        PYTHONPATH=str(REPO),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def _git(cwd: Path, *args: str) -> str:
    cp = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=120)
    assert cp.returncode == 0, f"git {' '.join(args)}: {cp.stdout}{cp.stderr}"
    return cp.stdout.strip()


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    _git(repo, "add", *files)
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def test_git_bisect_run_replay_names_the_commit_that_made_the_kernel_clamp_its_input(tmp_path: Path) -> None:
    kernels = tmp_path / "my-kernels"
    kernels.mkdir()
    _git(kernels, "init", "-q")
    good = _commit(kernels, {"bisect_kernel.py": GOOD}, "my_linear")
    _commit(kernels, {"NOTES.md": "FP8 linear notes\n"}, "notes")
    culprit = _commit(kernels, {"bisect_kernel.py": BAD}, "clamp the activation to the FP8 range")
    _commit(kernels, {"NOTES.md": "FP8 linear notes\nclamped now\n"}, "more notes")

    # the case file, produced by the harness at the bad commit, kept outside the bisected repository
    run = tmp_path / "run"
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "matrix",
            "--device",
            "cpu",
            "--plugin",
            "bisect_kernel:my_linear",
            "--ops",
            "plugin.*",
            "--classes",
            "values_beyond_448",
            "--cases-per-cell",
            "1",
            "--workers",
            "1",
            "--quiet",
            "--out",
            str(run),
        ],
        cwd=kernels,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cell = json.loads((run / "summary.json").read_text())["cells"][0]
    assert cell["counts"] == {"input_mutation": 1}, cell
    case = run / cell["examples"]["input_mutation"]
    assert not str(case).startswith(str(kernels))

    _git(kernels, "bisect", "start", "HEAD", good)
    bisect = subprocess.run(
        ["git", "bisect", "run", sys.executable, "-m", "harness", "replay", "--bisect", str(case)],
        cwd=kernels,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    _git(kernels, "bisect", "reset")
    out = bisect.stdout + bisect.stderr
    assert bisect.returncode == 0, out
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit", out, re.M)
    assert found and found.group(1) == culprit, out
    assert "skip" not in out.lower(), out  # every commit ran: none was skipped as "cannot run here"
