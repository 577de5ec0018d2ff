"""Fault injection through the worker pool, on CPU: every fault is survived and answered.

Each injected fault must get the right verdict, no submitted case may be lost, cases after
the fault must pass on the replaced worker, and the pool's worker count must come back.
Select with ``pytest -k "fault or isolat or worker"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cases import load_case
from harness.layouts import LayoutSpec
from harness.runner.pool import PoolClosed, WorkerPool, resolve_devices
from harness.verdicts import Verdict

from helpers import PLAIN, case

ODD = LayoutSpec((4, 8), "float32", offset=3, pad=(0, 2))


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    cases = tmp_path_factory.mktemp("cases")
    with WorkerPool("cpu", 2, case_timeout=30, spares=0, cases_dir=cases, attribute=True) as p:
        assert p.wait_ready(120), "CPU workers did not start"
        yield p


def wait_restored(pool: WorkerPool, timeout: float = 60.0) -> bool:
    """The pool is back to its full count of ready workers (its own condition wait; no spares here)."""
    return pool.wait_ready(timeout) and pool.worker_count() == pool.target_count()


#: fault target -> (layout, params, expected verdict, text the message must contain)
FAULTS = {
    "fault.segfault": (PLAIN, {}, Verdict.WORKER_CRASH, "SIGSEGV"),
    "fault.exit": (PLAIN, {"code": 3}, Verdict.WORKER_CRASH, "exited with status 3"),
    "fault.oom_kill": (PLAIN, {}, Verdict.WORKER_CRASH, "SIGKILL"),
    "fault.sticky": (PLAIN, {}, Verdict.DEVICE_FAULT, "illegal memory access"),
    "fault.oom": (PLAIN, {}, Verdict.OOM, "OutOfMemoryError"),
    "fault.mutate": (PLAIN, {}, Verdict.INPUT_MUTATION, "values changed"),
    "fault.poison_write": (ODD, {}, Verdict.INPUT_MUTATION, "outside the view"),
    "fault.nan": (PLAIN, {}, Verdict.NONFINITE, "NaN/inf"),
    "fault.drift": (PLAIN, {}, Verdict.DRIFT, "allowed"),
    "fault.layout": (ODD, {}, Verdict.LAYOUT_NONINVARIANCE, "contiguous layout"),
    "fault.reject": (ODD, {}, Verdict.REJECTED, "must be contiguous"),
    "fault.reference_error": (PLAIN, {}, Verdict.ERROR, "reference failed"),
}


def test_worker_pool_parent_never_initialises_cuda(worker_pool):
    already = torch.cuda.is_initialized()  # e.g. GPU tests ran earlier in this pytest process
    results = worker_pool.run([case("cpu.scale", seed=i) for i in range(20)])
    assert [r.verdict for r in results] == [Verdict.PASS] * 20
    assert {w["info"]["pid"] for w in worker_pool.workers()}.isdisjoint({os.getpid()})
    if not already:
        assert not torch.cuda.is_initialized()
        return
    # this process's CUDA state proves nothing now: ask a fresh parent
    code = (
        "import torch\n"
        "from harness.cases import Case\n"
        "from harness.layouts import LayoutSpec\n"
        "from harness.runner.pool import WorkerPool\n"
        "from harness.values import ValueSpec\n"
        "c = Case(op='cpu.scale', layouts={'x': LayoutSpec((8, 8), 'float32')}, values={'x': ValueSpec('normal', 1)})\n"
        "with WorkerPool('cpu', workers_per_device=1) as pool:\n"
        "    assert pool.run([c])[0].verdict.value == 'pass'\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("op", sorted(FAULTS))
def test_fault_is_survived_with_the_right_verdict(worker_pool, op):
    spec, params, verdict, text = FAULTS[op]
    r = worker_pool.run_one(case(op, spec, **params))
    assert r.verdict is verdict, r.format()
    assert text in r.message
    assert r.case_path and Path(r.case_path).exists(), "failing cases are written to cases_dir"
    assert r.replay == f"python -m harness replay {r.case_path}"
    # the pool keeps working: the next cases pass, and the worker count comes back
    after = worker_pool.run([case("cpu.scale", ODD, seed=s) for s in range(4)])
    assert [a.verdict for a in after] == [Verdict.PASS] * 4
    assert wait_restored(worker_pool), worker_pool.workers()


def test_fault_hang_times_out_and_the_worker_is_replaced(worker_pool):
    t0 = time.monotonic()
    r = worker_pool.run_one(case("fault.hang"), timeout=1.0)
    assert r.verdict is Verdict.TIMEOUT, r.format()
    assert "1 s case timeout" in r.message
    assert time.monotonic() - t0 < 20
    assert worker_pool.run_one(case("cpu.scale")).verdict is Verdict.PASS
    assert wait_restored(worker_pool)


def test_no_result_is_lost_when_faults_kill_workers_mid_batch(worker_pool):
    # prefetch queues cases behind a killer: they must be re-queued, not lost or blamed
    ops = ["cpu.scale"] * 30
    for i, fault in zip(
        (3, 9, 10, 17, 25), ("fault.segfault", "fault.exit", "fault.sticky", "fault.segfault", "fault.nan")
    ):
        ops[i] = fault
    futures = [worker_pool.submit(case(op, seed=i)) for i, op in enumerate(ops)]
    results = [f.result(timeout=120) for f in futures]
    expected = {
        "cpu.scale": Verdict.PASS,
        "fault.segfault": Verdict.WORKER_CRASH,
        "fault.exit": Verdict.WORKER_CRASH,
        "fault.sticky": Verdict.DEVICE_FAULT,
        "fault.nan": Verdict.NONFINITE,
    }
    assert [r.verdict for r in results] == [expected[op] for op in ops]
    assert [r.op for r in results] == ops
    assert wait_restored(worker_pool)


def test_fault_attribution_names_the_guilty_op_not_where_it_surfaced(worker_pool):
    r = worker_pool.run_one(case("fault.sticky"))
    assert r.verdict is Verdict.DEVICE_FAULT
    att = r.attribution
    # without CUDA_LAUNCH_BLOCKING the error surfaces at the innocent op after the bad kernel ...
    assert "return z + 0" in att["surfaced_at"]
    # ... the blocking rerun in a fresh process names the kernel that caused it
    assert att["launch_blocking"] is True and att["reproduced"] is True
    assert att["op"] == "harness_fault::bad_kernel"
    assert "z = _bad_kernel_op()(y)" in att["frame"]
    assert att["ops_tail"][-1] == "harness_fault::bad_kernel"
    text = r.format()
    assert "faulting op: harness_fault::bad_kernel" in text and f"replay: {r.replay}" in text
    saved, tensors = load_case(r.case_path)
    assert saved.verdict["verdict"] == "device_fault"
    assert saved.verdict["attribution"]["op"] == "harness_fault::bad_kernel"
    assert set(tensors) == {"x"} and saved.env["device_type"] == "cpu"


def test_worker_crash_names_signal_and_python_frame(worker_pool):
    r = worker_pool.run_one(case("fault.segfault"))
    assert r.verdict is Verdict.WORKER_CRASH
    assert r.metrics["exitcode"] == -11
    # the worker's faulthandler dump points at the target's own line, not at ctypes
    assert "doubles.py" in r.attribution["frame"] and "in run" in r.attribution["frame"]


def test_fault_isolation_spare_takes_over_after_a_fault(tmp_path):
    with WorkerPool("cpu", 1, spares=1, case_timeout=30, attribute=False) as p:
        assert p.wait_ready(120)
        spare = next(w["name"] for w in p.workers() if w["spare"])
        assert p.run_one(case("fault.exit")).verdict is Verdict.WORKER_CRASH
        nxt = p.run_one(case("cpu.scale"))
        assert nxt.verdict is Verdict.PASS and nxt.worker == spare
        assert len(p.recoveries) == 1 and p.replaced[0][1].startswith("crash")
        assert p.wait_ready(120)  # a new spare was started behind it


def test_the_spare_count_follows_the_fault_rate_up_to_its_cap():
    def ready_spares(p: WorkerPool) -> int:
        return sum(1 for w in p.workers() if w["spare"] and w["state"] == "ready")

    with WorkerPool("cpu", 1, spares=1, max_spares=2, case_timeout=30, attribute=False) as p:
        assert p.wait_ready(120) and ready_spares(p) == 1 and p.spare_counts() == {"cpu": 1}
        assert p.run_one(case("fault.exit")).verdict is Verdict.WORKER_CRASH
        assert p.spare_counts() == {"cpu": 2}  # one loss in the window: one more spare
        assert p.wait_ready(120) and ready_spares(p) == 2
        assert p.run_one(case("fault.exit")).verdict is Verdict.WORKER_CRASH
        assert p.spare_counts() == {"cpu": 2}  # capped at max_spares
        assert p.wait_ready(120) and ready_spares(p) == 2
    with pytest.raises(ValueError, match="max_spares"):
        WorkerPool("cpu", 1, spares=2, max_spares=1)


def test_worker_start_failure_answers_queued_cases():
    # a CUDA device on a machine without one: the worker cannot start; the case waits its timeout for one,
    # then is answered with the reason, as the harness's failure (error), not the kernel's (worker_crash)
    with WorkerPool(["cuda:0"], 1, spares=0, attribute=False) as p:
        t0 = time.monotonic()
        r = p.run_one(case("cpu.scale"), timeout=2)
        waited = time.monotonic() - t0
    assert r.verdict is Verdict.ERROR, r.format()
    assert r.message.startswith("worker start failed: cuda:0: "), r.message
    assert 2 <= waited < 120


def test_worker_pool_close_answers_every_case():
    p = WorkerPool("cpu", 1, spares=0, attribute=False)
    futures = [p.submit(case("fault.hang", seconds=30))] + [p.submit(case("cpu.scale")) for _ in range(3)]
    t0 = time.monotonic()
    p.close(cancel_pending=True, timeout=10)
    assert time.monotonic() - t0 < 30  # did not wait for the 30 s hang
    results = [f.result(timeout=1) for f in futures]
    # whatever had not finished is answered as cancelled, never lost
    assert [r.verdict for r in results] == [Verdict.ERROR] * 4
    assert all("closed" in r.message for r in results)
    with pytest.raises(PoolClosed):
        p.submit(case("cpu.scale"))


def test_worker_pool_arguments_are_validated():
    with pytest.raises(ValueError, match="workers_per_device=0"):
        WorkerPool("cpu", 0)
    with pytest.raises(ValueError, match="'gpu' is not 'cpu' or 'cuda:N'"):
        resolve_devices(["gpu"])
    with pytest.raises(ValueError, match="case_timeout"):
        WorkerPool("cpu", case_timeout=0)
    assert resolve_devices("cuda:0,cuda:1") == ["cuda:0", "cuda:1"]


def test_worker_pool_rejects_non_case(worker_pool):
    with pytest.raises(TypeError, match="needs a harness.cases.Case"):
        worker_pool.submit({"op": "cpu.scale"})


def _slow_sanitizer(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in ``compute-sanitizer`` on $PATH that marks that it started, then hangs (an attribution
    rerun that would take far longer than the pool's close may wait)."""
    marker = tmp_path / "rerun-started"
    tool = tmp_path / "bin" / "compute-sanitizer"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ntouch '{marker}'\nexec sleep 600\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return marker


def test_fault_attribution_rerun_is_cancelled_not_drained_when_the_pool_closes(tmp_path, monkeypatch):
    from harness.runner.pool import ATTRIBUTION_SKIPPED

    marker = _slow_sanitizer(tmp_path, monkeypatch)
    pool = WorkerPool(
        "cpu",
        1,
        case_timeout=30,
        spares=0,
        cases_dir=tmp_path / "cases",
        attribute=True,
        sanitizer=True,
        attribution_timeout=600,
    )
    try:
        fut = pool.submit(case("fault.sticky"))
        deadline = time.monotonic() + 120
        while not marker.exists():  # the worker answered the fault; its attribution rerun is running
            assert time.monotonic() < deadline and not fut.done(), "the attribution rerun never started"
            time.sleep(0.05)
    finally:
        pool.close(cancel_pending=True)
    r = fut.result(timeout=0)  # answered by close, not after the 600 s rerun
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert r.attribution["skipped"] == ATTRIBUTION_SKIPPED and "rerun_verdict" not in r.attribution
    saved, _ = load_case(next((tmp_path / "cases").glob("*.json")))
    assert saved.verdict["attribution"]["skipped"] == ATTRIBUTION_SKIPPED  # the case file says so too


def test_fresh_process_run_is_killed_by_its_cancel_event(tmp_path):
    import threading

    from harness.cases import save_case
    from harness.runner.pool import Cancelled, run_in_fresh_process

    path = save_case(case("fault.hang"), tmp_path / "hang.json")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="before it started"):
        run_in_fresh_process(path, cancel=stop, timeout=60)
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:  # a hang that only the event can end before the 60 s timeout (which would give a TIMEOUT result)
        with pytest.raises(Cancelled, match="while running"):
            run_in_fresh_process(path, cancel=stop, timeout=60)
    finally:
        timer.cancel()


def test_a_cancelled_rerun_ends_with_the_children_of_its_process(tmp_path):
    """compute-sanitizer runs the case in a child process of its own: a cancel must end that child too, not wait
    for it (it holds the output pipes) until its case is over."""
    import threading

    from harness.runner.fresh import _run_cancellable
    from harness.runner.pool import Cancelled

    ended = tmp_path / "ended-by-itself"
    cmd = ["sh", "-c", f"(sleep 20; touch {ended}) & wait"]  # a wrapper whose child holds stdout for 20 s
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        with pytest.raises(Cancelled, match="while running"):
            _run_cancellable(cmd, dict(os.environ), 600, stop)  # returns once every holder of the pipes is gone
    finally:
        timer.cancel()
    assert not ended.exists(), "the cancel waited for the rerun's child to finish instead of ending it"


def test_fresh_runs_going_on_are_ended_with_their_children_when_this_process_is_terminated(tmp_path):
    """What the SIGTERM hook calls (``kill_live_runs``): the whole group of each fresh run ends, the caller's
    ``_run_cancellable`` returns, and nothing of the run lingers."""
    import threading

    from harness.runner.fresh import _LIVE_GROUPS, _run_cancellable, kill_live_runs

    ended = tmp_path / "ended-by-itself"
    cmd = ["sh", "-c", f"(sleep 20; touch {ended}) & wait"]
    done: list = []
    t = threading.Thread(target=lambda: done.append(_run_cancellable(cmd, dict(os.environ), 600, None)))
    t.start()
    for _ in range(200):  # until the run has registered its group (a condition, polled)
        if _LIVE_GROUPS:
            break
        t.join(0.05)
    assert _LIVE_GROUPS, "the fresh run never registered its process group"
    kill_live_runs()
    t.join(30)
    assert not t.is_alive() and done and done[0].returncode < 0, done
    assert not ended.exists() and not _LIVE_GROUPS


def test_failure_over_the_size_cap_is_saved_without_generating_its_values(tmp_path, monkeypatch):
    import harness.runner.casefiles as casefiles
    from harness.verdicts import Result

    def no_generation(case):
        raise AssertionError("values were generated for a case too large to store them")

    monkeypatch.setattr(casefiles, "MAX_SAVED_BYTES", PLAIN.span_bytes() - 1)
    monkeypatch.setattr(casefiles, "case_values", no_generation)
    path = casefiles.save_failure(case("fault.nan"), Result(Verdict.NONFINITE, "NaN"), tmp_path)
    saved, tensors = load_case(path)
    assert saved.verdict["verdict"] == "nonfinite" and tensors == {}
    monkeypatch.undo()  # under the cap: generated and stored
    _, tensors = load_case(casefiles.save_failure(case("fault.nan"), Result(Verdict.NONFINITE, "NaN"), tmp_path))
    assert set(tensors) == {"x"}


def test_a_case_submitted_without_attribution_is_attributed_later_on_request(worker_pool):
    """The exploration's way: its cases skip the rerun (``attribute=False``); the minimal case it keeps is
    attributed afterwards by ``attribute_result`` -- the same kernel named, by the same fresh-process rerun."""
    r = worker_pool.submit(case("fault.sticky"), attribute=False).result(timeout=120)
    assert r.verdict is Verdict.DEVICE_FAULT
    assert "op" not in (r.attribution or {}) and "reproduced" not in (r.attribution or {})  # no rerun yet
    later = worker_pool.attribute_result(case("fault.sticky"), r)
    assert later.attribution["op"] == "harness_fault::bad_kernel" and later.attribution["reproduced"] is True
    assert "return z + 0" in later.attribution["surfaced_at"]  # what the first run saw is kept
    assert r.attribution is not later.attribution and "op" not in (r.attribution or {})  # the caller's result kept
    assert wait_restored(worker_pool)
