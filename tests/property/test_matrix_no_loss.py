"""Nothing a matrix run found is lost: case files are written as verdicts arrive, the reports are rewritten
atomically as the run goes, SIGTERM / Ctrl-C / a harness exception end in a partial report that says so, one
unwritable case is a warning, a rerun never deletes an earlier run, and the time budget bounds the whole run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

import pytest

from harness.cases import load_case
from harness.matrix import WRAPUP_BOUND_S, MatrixError, run_matrix
from harness.report import load_summary
from harness.verdicts import POOL_CLOSED, Result, Verdict
from helpers import InProcessPool, empty_corpus

REPO = Path(__file__).resolve().parents[2]
CORPUS_CASE = "legacy_comfyui-broadcast-layout_noninvariance"


def _run(tmp_path: Path, out: Path, **kw):
    kw.setdefault("pool_factory", lambda *a, **k: InProcessPool(["cpu"]))
    return run_matrix(
        device="cpu",
        ops=["legacy.comfyui"],
        classes=["contiguous", "broadcast", "values_beyond_448"],
        out=out,
        corpus=empty_corpus(tmp_path),
        progress=None,
        cases_per_cell=1,
        **kw,
    )


def test_a_case_that_cannot_be_written_is_a_one_line_warning_not_the_end_of_the_run(tmp_path, monkeypatch) -> None:
    import harness.runner.pool

    real = harness.runner.pool.save_failure

    tries = []

    def flaky(case, result, cases_dir, **kw):
        if "broadcast" in kw.get("name", ""):
            tries.append(kw["name"])
            raise OSError(28, "No space left on device")
        return real(case, result, cases_dir, **kw)

    monkeypatch.setattr(harness.runner.pool, "save_failure", flaky)
    out = tmp_path / "m"
    s = _run(tmp_path, out)
    assert s["status"] == "completed" and s["completed"] is True
    [warning] = s["warnings"]
    assert len(tries) == 1  # tried when the verdict came in; the report rewrites do not retry it
    assert "\n" not in warning and "layout_noninvariance case of legacy.comfyui x broadcast" in warning
    assert "No space left on device" in warning
    cells = {c["layout_class"]: c for c in s["cells"]}
    assert cells["broadcast"]["examples"] == {} and cells["broadcast"]["status"] == "fail"  # counted, not linked
    rel = cells["values_beyond_448"]["examples"]["input_mutation"]  # the other cell's case was written
    assert load_case(out / rel)[0].verdict["verdict"] == "input_mutation"
    md = (out / "report.md").read_text()
    assert "## Warnings" in md and "No space left on device" in md
    assert "No space left on device" in (out / "report.html").read_text()


def test_a_harness_exception_keeps_the_partial_report_and_is_re_raised(tmp_path) -> None:
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="injected harness bug"):
        _run(tmp_path, out, pool_factory=lambda *a, **k: InProcessPool(["cpu"], fail_after=2))
    s = load_summary(out)
    assert s["status"] == "interrupted" and s["completed"] is False
    assert s["interrupted"] == "harness error: RuntimeError: injected harness bug in submit"
    found = [c for c in s["cells"] if c["cases"]]
    assert len(found) == 2 and {c["status"] for c in s["cells"] if not c["cases"]} == {"not_run"}
    for c in found:
        for rel in c["examples"].values():
            assert (out / rel).is_file()
    assert "INTERRUPTED (harness error: RuntimeError" in (out / "report.md").read_text()


def _earlier_run(out: Path) -> dict[str, bytes]:
    """An earlier run's files plus a corpus case copied in by the user; returns their bytes by relative path."""
    (out / "cases").mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(REPO / "tests" / "cases" / f"{CORPUS_CASE}{suffix}", out / "cases" / f"{CORPUS_CASE}{suffix}")
    (out / "cases" / "mine.json").write_text('{"not": "a matrix file"}\n')
    (out / "notes.txt").write_text("keep me\n")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_non_empty_out_is_refused_without_force(tmp_path) -> None:
    out = tmp_path / "m"
    before = _earlier_run(out)
    with pytest.raises(MatrixError, match=f"--out {out} is not empty .*--force"):
        _run(tmp_path, out)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_force_writes_alongside_and_deletes_nothing_it_did_not_write(tmp_path) -> None:
    out = tmp_path / "m"
    before = _earlier_run(out)
    s = _run(tmp_path, out, force=True)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for rel, data in before.items():  # every file the user had is still there, unchanged
        assert after.get(rel) == data, rel
    written = {rel for c in s["cells"] for rel in c["examples"].values()}
    assert written and all(rel in after for rel in written)
    assert f"cases/{CORPUS_CASE}-2.json" in written  # the taken name got a new one, linked from the report
    assert not [p for p in out.rglob("*.tmp")]  # no temp file left


def test_existing_file_as_out_is_refused(tmp_path) -> None:
    f = tmp_path / "report"
    f.write_text("x")
    with pytest.raises(MatrixError, match=f"--out {f} is an existing file"):
        _run(tmp_path, f)
    assert f.read_text() == "x"


class StallingPool(InProcessPool):
    """Answers the first cell's case; every later case hangs, and its submission moves the driver's clock past
    the budget (so round 0 itself is cut short)."""

    def __init__(self, clock):
        super().__init__(["cpu"])
        self.clock = clock
        self.stalled: list[Future] = []
        self.closed_with_cancel = None

    def submit(self, case):
        if not self.cases:
            return super().submit(case)
        self.cases.append(case)
        f: Future = Future()
        self.stalled.append(f)
        self.clock["t"] += 1000.0
        return f

    def close(self, cancel_pending=False):
        self.closed_with_cancel = cancel_pending
        for f in self.stalled:
            f.done() or f.set_result(Result(Verdict.ERROR, f"{POOL_CLOSED} before this case ran"))


def test_the_budget_cuts_round_zero_short_and_the_report_lists_cells_not_reached(tmp_path, monkeypatch) -> None:
    import harness.matrix

    clock = {"t": 0.0}
    monkeypatch.setattr(harness.matrix, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))
    pool = StallingPool(clock)
    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        time_budget=10.0,
        ops=["fp8_linear"],
        classes=["contiguous", "offset_2", "offset_4"],
        out=out,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: pool,
    )
    by = {c["layout_class"]: c for c in s["cells"]}
    assert by["contiguous"]["status"] == "pass"
    assert by["offset_2"]["status"] == by["offset_4"]["status"] == "not_run"  # not reached, not passing
    assert by["offset_2"]["cases"] == 0 and s["totals"] == {"pass": 1}
    assert s["budget_exhausted"] is True and pool.closed_with_cancel is True and s["status"] == "completed"
    md = (out / "report.md").read_text()
    assert "## Not reached (2 cells; no result, not passing)" in md and "fp8_linear × `offset_4`" in md
    assert "| not reached | 2 of 3 cells (listed below) |" in md


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "matrix", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        **kw,
    )


def _wait_for(cond, timeout: float, proc: subprocess.Popen) -> None:
    """Wait until ``cond()`` holds (checked every 50 ms), failing early if ``proc`` exits."""
    end = time.monotonic() + timeout
    ev = threading.Event()
    while not cond():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"matrix exited {proc.returncode} before the condition held: {err[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("condition not met in time")
        ev.wait(0.05)


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory) -> dict[signal.Signals, tuple[Path, dict, list[Path], str, str, int]]:
    """A long CLI run per signal, started at once; each is sent its signal once it has written a case file.
    Signal -> (its --out, its summary.json just before the signal, the case files then, stdout, stderr, exit code)."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        tmp = tmp_path_factory.mktemp(f"signalled-{sig.name}")
        out = tmp / "m"
        proc = _cli(
            "--device",
            "cpu",
            "--ops",
            "legacy.comfyui",
            "--classes",
            "broadcast,contiguous,values_beyond_448",
            "--time-budget",
            "600",
            "--workers",
            "1",
            "--corpus",
            str(empty_corpus(tmp)),
            "--out",
            str(out),
        )
        procs[sig] = (out, proc)
    try:
        runs = {}
        for sig, (out, proc) in procs.items():
            cases = out / "cases"
            _wait_for(lambda: cases.is_dir() and any(cases.glob("*.json")), 300, proc)
            running = json.loads((out / "summary.json").read_text())  # rewritten atomically: always whole
            first = sorted(cases.glob("*.json"))
            proc.send_signal(sig)
            runs[sig] = (out, running, first, proc)
        return {
            sig: (out, running, first, *proc.communicate(timeout=60), proc.returncode)
            for sig, (out, running, first, proc) in runs.items()
        }
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:  # only when the fixture failed: no run outlives it
                proc.kill()
                proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_keeps_its_cases_and_says_it_was_interrupted(signalled_runs, sig) -> None:
    out, running, first, stdout, stderr, returncode = signalled_runs[sig]
    assert running["status"] == "running" and running["completed"] is False
    assert returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr
    s = load_summary(out)
    assert s["status"] == "interrupted" and s["interrupted"] == sig.name and s["completed"] is False
    linked = {out / rel for c in s["cells"] for rel in c["examples"].values()}
    assert set(first) <= linked and all(p.is_file() for p in linked)  # what was found before the signal is kept
    assert f"INTERRUPTED ({sig.name})" in (out / "report.md").read_text() and "INTERRUPTED" in stdout
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_real_run_ends_within_its_budget_plus_the_wrapup_bound(tmp_path) -> None:
    """Every op on the CPU (rounds without end) under a small budget: the wall time of the whole command, start-up
    included, stays under budget + WRAPUP_BOUND_S; the cells it did not reach are listed as such."""
    budget = 5.0
    out = tmp_path / "m"
    t = time.monotonic()
    proc = _cli(
        "--device",
        "cpu",
        "--time-budget",
        str(budget),
        "--corpus",
        str(empty_corpus(tmp_path)),
        "--out",
        str(out),
        "--quiet",
    )
    stdout, stderr = proc.communicate(timeout=budget + 120)
    wall = time.monotonic() - t
    assert wall < budget + WRAPUP_BOUND_S, (wall, stderr[-2000:])
    assert proc.returncode in (0, 3), stderr[-2000:]
    s = load_summary(out)
    assert s["budget_exhausted"] is True and s["duration_s"] <= wall
    for c in s["cells"]:  # each cell got a result, or is listed as not reached -- never a silent pass
        assert (c["status"] == "not_run") == (c["cases"] == 0 and c["status"] != "unavailable"), c
    missed = [c for c in s["cells"] if c["status"] == "not_run"]
    if missed:  # how far 5 s gets depends on the machine's load
        assert f"## Not reached ({len(missed)} cells" in (out / "report.md").read_text()
        assert f"matrix: {len(missed)} cell(s) not reached" in stdout


class SignalledPool(InProcessPool):
    """The second case's submission delivers SIGTERM to this process and comes back as the worker crash that a
    Ctrl-C reaching the workers causes."""

    def submit(self, case):
        if not self.cases:
            return super().submit(case)
        self.cases.append(case)
        os.kill(os.getpid(), signal.SIGTERM)  # run_matrix's handler turns it into an orderly stop
        f: Future = Future()
        f.set_result(Result(Verdict.WORKER_CRASH, "worker exited with code -2 while running this case", op=case.op))
        return f


def test_sigterm_is_an_orderly_stop_and_a_worker_killed_by_it_is_not_blamed_on_a_case(tmp_path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "m"
    s = _run(tmp_path, out, pool_factory=lambda *a, **k: SignalledPool(["cpu"]))
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is removed again
    assert s["status"] == "interrupted" and s["interrupted"] == "SIGTERM"
    assert "worker_crash" not in s["totals"] and sum(s["totals"].values()) == 1
    assert [c["status"] for c in s["cells"]].count("not_run") == 2
