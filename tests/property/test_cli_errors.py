"""The command line never answers a user error with a traceback: every wrong ``matrix`` path or budget is one
line naming it, exit 2; a harness bug is one line plus a file with the traceback, exit 128."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import harness_argv, run_at_once

import harness.cli
import harness.matrix
from harness.cli import INTERNAL_ERROR_EXIT
from harness.report import SummaryError

REPO = Path(__file__).resolve().parents[2]


def _matrix_argv(*args: str) -> list[str]:
    return harness_argv(
        "matrix",
        "--device",
        "cpu",
        "--ops",
        "fp8_linear",
        "--classes",
        "contiguous",
        "--quiet",
        *args,
    )


WRONG = [
    ("file:taken", ("--out", "{t}/taken"), "--out {t}/taken is an existing file"),
    ("run:old", ("--out", "{t}/old"), "--out {t}/old is not empty (an earlier run?)"),
    ("file:f", ("--out", "{t}/f/sub"), "--out {t}/f/sub: {t}/f is a file, not a folder"),
    (None, ("--out", "{t}/o", "--corpus", "{t}/no-corpus"), "--corpus {t}/no-corpus does not exist"),
    (None, ("--out", "{t}/o", "--time-budget", "0"), "--time-budget 0.0 must be > 0 seconds"),
    (None, ("--out", "{t}/o", "--time-budget", "-5"), "--time-budget -5.0 must be > 0 seconds"),
]


def _tree(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def wrong_runs(tmp_path_factory) -> list[tuple[Path, list[Path], subprocess.CompletedProcess]]:
    """Each WRONG entry run in a folder of its own, all at once: (folder, its tree before, the result)."""
    dirs = []
    for setup, _, _ in WRONG:
        t = tmp_path_factory.mktemp("wrong")
        if setup:
            kind, name = setup.split(":")
            if kind == "file":
                (t / name).write_text("mine")
            else:
                (t / name).mkdir()
                (t / name / "summary.json").write_text("{}")
        dirs.append((t, _tree(t)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    results = run_at_once(
        *(_matrix_argv(*(a.format(t=t) for a in args)) for (t, _), (_, args, _) in zip(dirs, WRONG)),
        timeout=300,
        cwd=REPO,
        env=env,
    )
    return [(t, before, r) for (t, before), r in zip(dirs, results)]


@pytest.mark.parametrize("index", range(len(WRONG)), ids=[" ".join(args[-2:]) for _, args, _ in WRONG])
def test_wrong_matrix_arguments_are_one_line_exit_2(wrong_runs, index) -> None:
    t, before, r = wrong_runs[index]
    expected = WRONG[index][2]
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = r.stderr.splitlines()
    assert expected.format(t=t) in line and r.stdout == ""
    assert _tree(t) == before  # nothing created or removed


def test_a_wrong_path_or_budget_is_answered_before_torch_is_imported(tmp_path) -> None:
    """The checks that need no op run first, so a typo is answered at once, not after ~2.5 s of importing torch."""
    (tmp_path / "taken").write_text("mine")
    code = (
        "import sys, harness.cli\n"
        "rcs = [harness.cli.main(a) for a in ("
        f"['matrix', '--out', {str(tmp_path / 'taken')!r}], "
        f"['matrix', '--out', {str(tmp_path / 'o')!r}, '--time-budget', '0'], "
        f"['matrix', '--out', {str(tmp_path / 'o')!r}, '--corpus', {str(tmp_path / 'none')!r}])]\n"
        "print(rcs, 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.stdout.strip() == "[2, 2, 2] False", r.stdout + r.stderr[-2000:]
    assert len(r.stderr.splitlines()) == 3  # one line each
    assert (tmp_path / "taken").read_text() == "mine" and not (tmp_path / "o").exists()


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


def test_a_bad_worker_start_method_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_WORKER_START", "fork")
    out = tmp_path / "o"
    code = harness.cli.main(["matrix", "--device", "cpu", "--ops", "fp8_linear", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["harness matrix: $HARNESS_WORKER_START='fork': use 'forkserver' or 'spawn'"], err
    assert not out.exists()  # nothing was started or written
