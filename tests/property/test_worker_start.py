"""How pool workers start: forked from a fork server that imported torch and the harness once (the default on
Linux), in the caller's environment, and fresh interpreters whenever a fork could not stand in for one."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import uuid

import pytest

from harness.runner import pool as pool_mod
from harness.runner import worker as worker_mod
from harness.runner.pool import START_METHOD_ENV, WorkerPool, default_start_method
from harness.runner.worker import FAIL_STARTS_ENV, fork_unfit
from harness.verdicts import Verdict

from helpers import case, wait_exited

needs_forkserver = pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="this platform has no forkserver start"
)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@needs_forkserver
def test_cpu_workers_are_forked_from_a_fork_server_by_default(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert default_start_method(["cpu"]) == "forkserver"
    with WorkerPool("cpu", 2, spares=0, attribute=False) as p:
        results = p.run([case("cpu.scale", seed=s) for s in range(4)])
        workers = p.workers()
        parents = {_ppid(w["pid"]) for w in workers}
    assert [r.verdict for r in results] == [Verdict.PASS] * 4, [r.format() for r in results]
    assert [w["start"] for w in workers] == ["forkserver", "forkserver"]
    # their parent is the fork server, one process for both, not this one
    assert len(parents) == 1 and os.getpid() not in parents
    assert p.start_fallback is None


@needs_forkserver
def test_a_forked_worker_starts_in_the_callers_environment_of_now(tmp_path, monkeypatch):
    """The fork server is already running (started by the first pool) when the variable is set: the next pool's
    workers see it all the same."""
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS
    counter = tmp_path / "fail-starts"
    counter.write_text("1")
    monkeypatch.setenv(FAIL_STARTS_ENV, str(counter))  # read by the worker as it starts
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        r = p.run_one(case("cpu.scale"), timeout=120)
        replaced = list(p.replaced)
        start = p.workers()[0]["start"]
    assert r.verdict is Verdict.PASS, r.format()
    assert counter.read_text() == "0" and [why for _, why in replaced if why.startswith("start failed")]
    assert start == "forkserver"  # a failed start is retried as a fork: the cause was not the fork


@needs_forkserver
def test_a_variable_read_when_torch_is_imported_changed_since_the_server_started_gives_a_fresh_interpreter(
    monkeypatch,
):
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS
    name = f"TORCH_HARNESS_TEST_{uuid.uuid4().hex[:8].upper()}"  # never in the running server's environment
    monkeypatch.setenv(name, "1")
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        r = p.run_one(case("cpu.scale"), timeout=120)
        starts, fallback, exits = [w["start"] for w in p.workers()], p.start_fallback, list(p.exits)
    assert r.verdict is Verdict.PASS, r.format()
    assert starts == ["spawn"] and fallback is None and not exits  # no fork was tried and thrown away
    monkeypatch.delenv(name)  # back as it was: forking again
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS
        assert [w["start"] for w in p.workers()] == ["forkserver"]


@needs_forkserver
def test_a_fork_that_finds_itself_unfit_exits_and_the_pool_starts_fresh_interpreters(monkeypatch):
    """A fork server this process did not start (its environment unknown here): the forked child checks."""
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS
    monkeypatch.setattr(pool_mod, "_SERVER_ENVS", {})
    name = f"TORCH_HARNESS_TEST_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(name, "1")
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:
        r = p.run_one(case("cpu.scale"), timeout=120)
        starts, fallback, method, replaced = (
            [w["start"] for w in p.workers()],
            p.start_fallback,
            p.start_method,
            p.replaced,
        )
    assert r.verdict is Verdict.PASS, r.format()
    assert method == "spawn" and starts == ["spawn"]
    assert fallback is not None and name in fallback, fallback
    assert not [why for _, why in replaced if why.startswith("start failed")]  # not counted as a failed start


def test_fork_unfit_names_the_changed_variables_an_import_reads_only(monkeypatch):
    from harness.runner import preload

    server = {"OMP_NUM_THREADS": "2", "HOME": "/a", "PYTHONPATH": "/x", "TORCHDYNAMO_VERBOSE": "0"}
    monkeypatch.setattr(preload, "SERVER_ENV", server)
    monkeypatch.setattr(preload, "READ_AT_IMPORT", frozenset({"TORCHDYNAMO_VERBOSE", "TORCHINDUCTOR_CACHE_DIR"}))
    monkeypatch.setattr(preload, "CUDA_INITIALIZED", False)
    # HOME and HARNESS_SIZE are not in this patched read set (the real one has HOME); PYTHONPATH is sys.path's;
    # the cache folder is one torch sets itself
    same = {**server, "HOME": "/b", "PYTHONPATH": "/y", "HARNESS_SIZE": "wan", "TORCHINDUCTOR_CACHE_DIR": "/tmp/i"}
    assert fork_unfit(same) is None
    why = fork_unfit({**server, "OMP_NUM_THREADS": "4", "TORCHDYNAMO_VERBOSE": "1", "HOME": "/b"})
    assert why is not None and "OMP_NUM_THREADS" in why and "TORCHDYNAMO_VERBOSE" in why and "HOME" not in why
    import harness

    elsewhere = {"harness": "/elsewhere/harness/__init__.py"}  # another checkout than the one the server imported
    assert "the fork server imported harness from" in fork_unfit(server, elsewhere)
    assert fork_unfit(server, {"harness": harness.__file__}) is None
    monkeypatch.setattr(preload, "CUDA_INITIALIZED", True)
    assert "CUDA driver" in fork_unfit(server)


def test_the_fork_server_records_what_its_imports_read():
    """The preload, in a fresh interpreter as in the server, records torch's own configuration reads (dynamo's
    config reads its variables at import) and keeps the environment it started with."""
    code = (
        "import json, os; os.environ['HARNESS_TEST_MARK'] = 'x'; from harness.runner import preload as p; "
        "print(json.dumps([p.PRELOAD_ERROR, sorted(p.READ_AT_IMPORT), p.SERVER_ENV.get('HARNESS_TEST_MARK')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    error, read, mark = json.loads(out.stdout.strip().splitlines()[-1])
    assert error is None and mark == "x"
    assert "TORCHDYNAMO_VERBOSE" in read and "TORCHINDUCTOR_CACHE_DIR" in read, read[:20]


def test_the_cuda_probe_does_not_claim_an_unloaded_driver():
    """This test process never loads libcuda: the probe must say so without loading it."""
    from harness.runner import preload

    with open("/proc/self/maps") as f:
        if "libcuda.so" in f.read():
            pytest.skip("this process has the CUDA driver loaded")
    assert preload._cuda_driver_initialized() is False
    with open("/proc/self/maps") as f:
        assert "libcuda.so" not in f.read()


def test_apply_env_sets_and_removes(monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_GONE", "1")
    monkeypatch.setenv("HARNESS_TEST_KEPT", "old")
    want = {k: v for k, v in os.environ.items() if k != "HARNESS_TEST_GONE"} | {"HARNESS_TEST_KEPT": "new"}
    worker_mod._apply_env(want)
    assert "HARNESS_TEST_GONE" not in os.environ and os.environ["HARNESS_TEST_KEPT"] == "new"
    assert dict(os.environ) == want


@needs_forkserver
def test_a_fork_server_that_dies_takes_no_case_down_with_it():
    """Its forked workers die with it (their parent-death signal): their cases are sent again, nobody is blamed, and
    the pool starts fresh interpreters from then on."""
    import signal

    from multiprocessing import forkserver

    with WorkerPool("cpu", 2, spares=0, attribute=False, start_method="forkserver") as p:
        assert p.run([case("cpu.scale", seed=s) for s in range(2)]) and p.workers()[0]["start"] == "forkserver"
        forked = [w["pid"] for w in p.workers()]
        server = forkserver._forkserver._forkserver_pid
        os.kill(server, signal.SIGKILL)
        for pid in [server, *forked]:  # gone, not reaped: the server is forkserver's to reap
            assert wait_exited(pid, 30), f"process {pid} did not end"
        results = p.run([case("cpu.scale", seed=s) for s in range(8)], timeout=120)
        fallback, starts = p.start_fallback, [w["start"] for w in p.workers()]
        failed = [why for _, why in p.replaced if why.startswith("start failed")]
    assert [r.verdict for r in results] == [Verdict.PASS] * 8, [r.format() for r in results]
    assert fallback is not None and "fork server died" in fallback, fallback
    assert starts == ["spawn", "spawn"] and not failed
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="forkserver") as p:  # a new server
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS and p.workers()[0]["start"] == "forkserver"


def test_gpu_pools_spawn_unless_asked_to_fork(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert default_start_method(["cuda:0"]) == "spawn"
    assert default_start_method(["cpu", "cuda:1"]) == "spawn"
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    assert default_start_method(["cuda:0"]) == "forkserver"
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert default_start_method(["cpu"]) == "spawn"


def test_spawn_is_a_choice_and_a_bad_one_is_named(monkeypatch):
    with WorkerPool("cpu", 1, spares=0, attribute=False, start_method="spawn") as p:
        assert p.run_one(case("cpu.scale")).verdict is Verdict.PASS
        assert p.workers()[0]["start"] == "spawn"
    with pytest.raises(ValueError, match="start_method='fork'"):
        WorkerPool("cpu", 1, start_method="fork")
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(ValueError, match=r"\$HARNESS_WORKER_START='fork': use 'forkserver' or 'spawn'"):
        default_start_method()


def test_a_restarted_fork_server_is_not_ready_until_a_fork_is_answered(monkeypatch):
    """A fork server that had to be started again imports everything again: until a fork through it is answered,
    pools start nothing through it (they would wait under their lock) and an exit ends it (it would hold the
    process's output); a first start does not reset what the readiness probe found."""
    import multiprocessing.forkserver as fs

    import harness.runner.pool as P

    def server_comes_up_as(pid):
        monkeypatch.setattr(fs, "ensure_running", lambda: setattr(fs._forkserver, "_forkserver_pid", pid))

    monkeypatch.setattr(fs._forkserver, "_forkserver_pid", None, raising=False)
    monkeypatch.setattr(P, "_SERVER_ENVS", {})
    monkeypatch.setattr(P, "_FORK_SERVER_READY", threading.Event())
    P._FORK_SERVER_READY.set()
    server_comes_up_as(4242)
    P._fork_server_env()  # the first start
    assert P._FORK_SERVER_READY.is_set()
    P._fork_server_env()  # the same server
    assert P._FORK_SERVER_READY.is_set()
    server_comes_up_as(4343)
    P._fork_server_env()  # it died and was started again
    assert not P._FORK_SERVER_READY.is_set()
