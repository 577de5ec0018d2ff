"""The command line never answers a user error with a traceback: every wrong ``matrix`` path or budget is one
line naming it, exit 2; a harness bug is one line plus a file with the traceback, exit 128."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import harness.cli
import harness.matrix
from harness.cli import INTERNAL_ERROR_EXIT
from harness.report import SummaryError

REPO = Path(__file__).resolve().parents[2]


def _matrix(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "matrix",
            "--device",
            "cpu",
            "--ops",
            "fp8_linear",
            "--classes",
            "contiguous",
            "--quiet",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        ("file:taken", ("--out", "{t}/taken"), "--out {t}/taken is an existing file"),
        ("run:old", ("--out", "{t}/old"), "--out {t}/old is not empty (an earlier run?)"),
        ("file:f", ("--out", "{t}/f/sub"), "--out {t}/f/sub: {t}/f is a file, not a folder"),
        (None, ("--out", "{t}/o", "--corpus", "{t}/no-corpus"), "--corpus {t}/no-corpus does not exist"),
        (None, ("--out", "{t}/o", "--time-budget", "0"), "--time-budget 0.0 must be > 0 seconds"),
        (None, ("--out", "{t}/o", "--time-budget", "-5"), "--time-budget -5.0 must be > 0 seconds"),
    ],
)
def test_wrong_matrix_arguments_are_one_line_exit_2(tmp_path, setup, args, expected) -> None:
    if setup:
        kind, name = setup.split(":")
        if kind == "file":
            (tmp_path / name).write_text("mine")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "summary.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = _matrix(*(a.format(t=tmp_path) for a in args))
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = r.stderr.splitlines()
    assert expected.format(t=tmp_path) in line and r.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created or removed


def test_a_harness_bug_is_one_line_and_a_traceback_file_exit_128(tmp_path, monkeypatch, capsys) -> None:
    def broken(args):
        raise ZeroDivisionError("division by zero in the harness")

    monkeypatch.setattr(harness.matrix, "_cmd", broken)
    monkeypatch.setenv("HARNESS_CRASH_DIR", str(tmp_path / "crashes"))
    rc = harness.cli.main(["matrix", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == INTERNAL_ERROR_EXIT == 128
    [line] = err.splitlines()
    assert "internal error" in line and "ZeroDivisionError: division by zero in the harness" in line
    [crash] = (tmp_path / "crashes").iterdir()
    assert str(crash) in line
    text = crash.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text


def test_a_user_error_type_escaping_a_subcommand_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    def bad_input(args):
        raise SummaryError("summary.json: field 'cells' must be list\nsecond line")

    monkeypatch.setattr(harness.matrix, "_cmd", bad_input)
    monkeypatch.setenv("HARNESS_CRASH_DIR", str(tmp_path / "crashes"))
    rc = harness.cli.main(["matrix"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "harness: summary.json: field 'cells' must be list\n"
    assert not (tmp_path / "crashes").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_bisect_run_stops_on_the_internal_error_exit_code(tmp_path) -> None:
    """The claim behind 128: `git bisect run` aborts on it instead of marking the commit bad (or skipping it)."""

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    git("init", "-q")
    for i in range(3):
        (tmp_path / "f").write_text(str(i))
        git("add", "f")
        git("commit", "-qm", f"c{i}")
    git("bisect", "start", "HEAD", "HEAD~2")
    r = git("bisect", "run", sys.executable, "-c", f"raise SystemExit({INTERNAL_ERROR_EXIT})")
    assert r.returncode != 0 and "is the first bad commit" not in r.stdout
    assert "bisect run failed" in (r.stdout + r.stderr)
