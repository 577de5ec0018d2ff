"""The pool's life cycle under faults around the cases (issue 11, items 4, 5, 10, 11), on CPU with real processes.

- failed worker starts are retried with back-off and the pool recovers when the cause goes away;
  while starts keep failing a case waits its timeout, then gets the harness's ``error`` with the reason;
- a worker that dies between cases never has its death charged to the next case;
- ``close()`` stops workers (exit 0) and removes its temp folder; SIGTERM of the parent ends the workers
  and removes the temp folders; after SIGKILL of the parent the workers exit and the next pool removes
  the stale folders;
- a fresh worker's first case does not pay for warm-up imports inside its timeout;
- every failing result gets its own case file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness.cases import load_case
from harness.runner.pool import WorkerPool, remove_stale_tmp, save_failure
from harness.runner.worker import FAIL_STARTS_ENV
from harness.verdicts import Result, Verdict

from helpers import case, wait_exited

REPO = Path(__file__).resolve().parents[2]


def start_failures(pool: WorkerPool) -> int:
    return sum(1 for _, reason in pool.replaced if reason.startswith("start failed"))


# ------------------------------------------------------------------------------ item 4: worker starts


def test_failed_worker_starts_are_retried_and_the_pool_recovers(tmp_path, monkeypatch):
    counter = tmp_path / "fail-starts"
    counter.write_text("3")  # the next 3 worker starts fail, then the cause is gone
    monkeypatch.setenv(FAIL_STARTS_ENV, str(counter))
    with WorkerPool("cpu", 1, spares=0, attribute=False, case_timeout=60) as p:
        first = p.run([case("cpu.scale", seed=s) for s in range(3)])
        later = p.run([case("cpu.scale", seed=s) for s in range(3, 6)])
        failures = start_failures(p)
        log = [e for e in p.recovery_log if e["reason"].startswith("start failed")]
    assert [r.verdict for r in first + later] == [Verdict.PASS] * 6, [r.format() for r in first + later]
    assert failures == 3 and counter.read_text() == "0"
    assert len(log) == 3 and all(e["seconds"] > 0 for e in log)


def test_worker_starts_that_keep_failing_answer_with_the_reason_then_recover(tmp_path, monkeypatch):
    counter = tmp_path / "fail-starts"
    counter.write_text("1000000")
    monkeypatch.setenv(FAIL_STARTS_ENV, str(counter))
    with WorkerPool("cpu", 1, spares=0, attribute=False) as p:
        t0 = time.monotonic()
        r = p.run_one(case("cpu.scale"), timeout=3)
        waited = time.monotonic() - t0
        assert r.verdict is Verdict.ERROR, r.format()  # the harness could not run it: not the kernel's fault
        assert r.message.startswith(
            f"worker start failed: cpu: RuntimeError: start failure injected by ${FAIL_STARTS_ENV}"
        ), r.message
        assert waited >= 3  # it waited its timeout for a worker instead of failing at once
        assert start_failures(p) >= 2  # retried
        counter.unlink()  # the cause goes away: the next case runs
        again = p.run_one(case("cpu.scale"), timeout=120)
    assert again.verdict is Verdict.PASS, again.format()


# ------------------------------------------------------------------------------ item 5: deaths between cases


def test_death_between_cases_is_not_charged_to_the_next_case():
    with WorkerPool("cpu", 1, spares=0, attribute=False, case_timeout=60) as p:
        for _ in range(2):
            # passes, and leaves its worker to die when the next case reaches it, before starting it
            armed = p.run_one(case("fault.exit_between_cases", code=0))
            assert armed.verdict is Verdict.PASS, armed.format()
            innocent = p.run_one(case("cpu.scale"))
            assert innocent.verdict is Verdict.PASS, innocent.format()
        reasons = [reason for _, reason in p.replaced]
    assert reasons == ["died between cases (exited with status 0)"] * 2


def test_worker_stuck_between_cases_is_replaced_and_the_next_case_is_not_blamed():
    with WorkerPool("cpu", 1, spares=0, attribute=False, case_timeout=60) as p:
        assert p.run_one(case("fault.stall_between_cases")).verdict is Verdict.PASS
        # its worker sleeps instead of taking this case: after the case's timeout it is replaced, the case resent
        r = p.run_one(case("cpu.scale"), timeout=2)
        reasons = [reason for _, reason in p.replaced]
    assert r.verdict is Verdict.PASS, r.format()
    assert reasons == ["did not take the case it was sent within 2 s"]


def test_a_case_prefetched_behind_a_long_one_has_its_own_timeout_from_when_it_starts():
    with WorkerPool("cpu", 1, spares=0, attribute=False, prefetch=2) as p:
        # passes after 2 s, then its worker takes 0.5 s to take the next case
        slow = p.submit(case("fault.stall_between_cases", run_seconds=2, seconds=0.5), timeout=60)
        quick = p.submit(case("cpu.scale"), timeout=1)  # sent at once, behind it; takes milliseconds itself
        assert slow.result(120).verdict is Verdict.PASS
        assert quick.result(120).verdict is Verdict.PASS, quick.result().format()
        assert p.replaced == []  # the queued case's 1 s did not run while the slow one did


def test_idle_worker_killed_then_a_case_submitted_at_once_is_not_blamed():
    with WorkerPool("cpu", 1, spares=0, attribute=False, case_timeout=60) as p:
        for _ in range(2):
            assert p.wait_ready(120)
            pid = p.workers()[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            assert wait_exited(pid, 30)
            r = p.run_one(case("cpu.scale"))  # submitted right after the death
            assert r.verdict is Verdict.PASS, r.format()
            assert r.worker and p.workers()[0]["pid"] != pid


# ------------------------------------------------------------------------------ item 11: warm-up


def test_first_case_of_a_fresh_worker_gets_its_real_verdict_under_a_tight_timeout():
    # its first dispatch-mode error imports torch._dynamo (1-4 s); that belongs to the warm-up, not the case
    with WorkerPool("cpu", 1, spares=0, attribute=False) as p:
        r = p.run_one(case("fault.sticky"), timeout=1.0)
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()


# ------------------------------------------------------------------------------ item 10: stopping


def test_close_asks_workers_to_exit_and_removes_its_temp_folder():
    p = WorkerPool("cpu", 2, spares=0, attribute=False)
    assert [r.verdict for r in p.run([case("cpu.scale", seed=s) for s in range(4)])] == [Verdict.PASS] * 4
    assert p.wait_ready(120)  # both started: a worker still starting is ended instead (the test below)
    tmp = Path(p.tmp_dir)
    assert tmp.is_dir()
    p.close()
    assert len(p.exits) == 2 and all(code == 0 for _, code in p.exits), (p.exits, p.replaced, p.start_fallback)
    assert not tmp.exists()


_PARENT = textwrap.dedent("""
    import json, sys
    from harness.cases import Case
    from harness.layouts import LayoutSpec
    from harness.runner.pool import WorkerPool

    if __name__ == "__main__":
        pool = WorkerPool("cpu", 2, spares=0, attribute=False)
        c = Case(op="cpu.scale", layouts={"x": LayoutSpec((2, 2), "float32")})
        assert pool.run([c, c])[0].verdict.value == "pass"
        hang = pool.submit(Case(op="fault.hang", layouts={"x": LayoutSpec((2, 2), "float32")}))
        print(json.dumps({"tmp": pool.tmp_dir, "pids": [w["pid"] for w in pool.workers()]}), flush=True)
        hang.result()
""")


def _parent_with_a_pool(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    line = proc.stdout.readline()
    assert line, f"the parent exited {proc.wait(60)} before starting its pool"
    return proc, json.loads(line)


def test_sigterm_of_the_parent_ends_its_workers_and_removes_its_temp_folders(tmp_path):
    proc, info = _parent_with_a_pool(tmp_path)
    assert Path(info["tmp"]).is_dir() and len(info["pids"]) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM  # it still dies of SIGTERM, as it would have
    assert all(wait_exited(pid, 30) for pid in info["pids"])
    assert not Path(info["tmp"]).exists()


def test_sigkill_of_the_parent_workers_exit_and_the_next_pool_removes_the_stale_folder(tmp_path):
    proc, info = _parent_with_a_pool(tmp_path)
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    assert all(wait_exited(pid, 30) for pid in info["pids"])  # they noticed the parent is gone
    assert Path(info["tmp"]).is_dir()  # nobody could clean up ...
    with WorkerPool("cpu", 1, spares=0, attribute=False):
        assert not Path(info["tmp"]).exists()  # ... until the next pool started


def test_stale_temp_folders_are_removed_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        "gone": f"harness-pool-{dead.pid}-abc",
        "fresh_gone": f"harness-fresh-{dead.pid}-abc",
        "mine": f"harness-pool-{os.getpid()}-abc",
        "alive": f"harness-pool-{os.getppid()}-abc",
        "other": "harness-cases-123-abc",
        "huge": f"harness-pool-{10**30}-abc",  # no pid can be this: left alone, and no OverflowError from os.kill
    }
    for n in names.values():
        (tmp_path / n).mkdir()
    removed = remove_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ("gone", "fresh_gone"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("mine", "alive", "other", "huge"))


# ------------------------------------------------------------------------------ one case file per result


def test_every_failing_result_gets_its_own_case_file(tmp_path):
    c = case("fault.nan")
    first = save_failure(c, Result(Verdict.NONFINITE, "NaN"), tmp_path)
    second = save_failure(c, Result(Verdict.NONFINITE, "NaN"), tmp_path)
    assert first != second and first.exists() and second.exists()
    with WorkerPool("cpu", 2, spares=0, attribute=False, cases_dir=tmp_path / "pool") as p:
        results = p.run([c] * 4)  # the same case four times, finished by two writer threads
    paths = [r.case_path for r in results]
    assert [r.verdict for r in results] == [Verdict.NONFINITE] * 4 and None not in paths
    assert len(set(paths)) == 4
    assert all(load_case(path)[0].verdict["verdict"] == "nonfinite" for path in paths)


def test_a_given_case_file_name_is_still_overwritten(tmp_path):
    name = "fixed-stem"
    c = case("fault.nan")
    first = save_failure(c, Result(Verdict.NONFINITE, "NaN"), tmp_path, name=name)
    second = save_failure(c, Result(Verdict.NONFINITE, "NaN"), tmp_path, name=name)
    assert first == second == tmp_path / f"{name}.json"


_SLOW_PRELOAD = """
import sys, time
import harness.runner.pool as P
from harness.runner.pool import WorkerPool
from harness.verdicts import Verdict
sys.path.insert(0, {tests!r})
from helpers import case

P.PRELOAD_MODULE = "slow_preload_for_test"  # the fork server's imports take {slow} s
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the fork server, as from a launcher that ignores it
t = time.monotonic()
p = WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver")
fut = p.submit(case("cpu.scale"))
submitted = time.monotonic() - t
p.close(cancel_pending=True)
closed = time.monotonic() - t
r = fut.result(timeout=1)
with open({result!r}, "w") as f:
    f.write(f"{{submitted:.2f}} {{closed:.2f}} {{r.verdict.value}} {{[code for _, code in p.exits]}}")
"""


def test_a_pool_closed_while_its_fork_server_still_imports_answers_at_once(tmp_path):
    """The first fork through a fork server waits for its imports (seconds on a loaded machine). That wait must not
    hold the pool: a case submitted meanwhile is queued at once, and a close answers it and ends the worker still
    starting, without waiting for the imports (a run's wrap-up took 5-6 s here under load while it did). Nor may
    the server outlive the process in its imports: it holds the process's stdout and stderr, so a pipe reading
    them (``python -m harness matrix | tee``, or this test) would wait for it."""
    slow = 40
    (tmp_path / "slow_preload_for_test.py").write_text(f"import time\ntime.sleep({slow})\n")
    result = tmp_path / "result.txt"
    code = _SLOW_PRELOAD.format(tests=str(Path(__file__).resolve().parents[1]), slow=slow, result=str(result))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    wall = time.monotonic() - t
    assert r.returncode == 0, r.stderr[-2000:]
    submitted, closed, verdict, exits = result.read_text().split(maxsplit=3)
    assert float(closed) < slow / 4 and wall < slow / 2, (result.read_text(), wall)  # nothing waited for the imports
    assert verdict == "error" and exits in ("[]", "[-15]"), result.read_text()  # answered as not run; nothing ran
