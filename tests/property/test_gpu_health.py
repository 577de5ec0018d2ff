"""A CUDA torch that finds no GPU where the driver lists one says why: a GPU that needs a reset, or GPUs hidden by
``CUDA_VISIBLE_DEVICES`` (harness.runner.gpu_health).  No GPU here: ``nvidia-smi`` is a script on ``PATH`` that
answers as the H200 did once its GSP firmware had stopped answering (Xid 119, then Xid 154 "GPU Reset Required")."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

import harness.capability as C
from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.matrix import MatrixError, run_matrix
from harness.runner import devices
from harness.runner.gpu_health import driver_gpus, no_gpu_diagnosis, reset_diagnosis
from harness.runner.pool import WorkerPool
from harness.verdicts import Result, Verdict
from helpers import InProcessPool, empty_corpus

NO_GPUS = "RuntimeError: No CUDA GPUs are available"


UUID = "GPU-48e29482-a151-db27-877d-fe0c7591abd6"


def _fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows, *, recovery: bool = True, reset: bool = True):
    """An ``nvidia-smi`` on PATH answering ``--query-gpu`` for ``rows`` of (index, uuid, recovery action, reset
    required, name); a driver without a field (``recovery=False`` / ``reset=False``) refuses the query naming it,
    as nvidia-smi does."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    (bindir / "recovery.csv").write_text("".join(f"{i}, {u}, {a}, {n}\n" for i, u, a, _, n in rows))
    (bindir / "reset.csv").write_text("".join(f"{i}, {u}, {r}, {n}\n" for i, u, _, r, n in rows))
    (bindir / "plain.csv").write_text("".join(f"{i}, {u}, {n}\n" for i, u, _, _, n in rows))
    refuse = "echo 'Field is not a valid field to query.'; exit 2"
    script = bindir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  *gpu_recovery_action*) {f'cat {bindir}/recovery.csv' if recovery else refuse};;\n"
        f"  *reset_status*) {f'cat {bindir}/reset.csv' if reset else refuse};;\n"
        f"  *) cat {bindir}/plain.csv;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


WEDGED = [(0, UUID, "Reset", "Yes", "NVIDIA H200")]  # as nvidia-smi -q described the H200 after Xid 154
HEALTHY = [(0, UUID, "None", "No", "NVIDIA H200")]


def test_the_recovery_action_is_read(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, WEDGED + [(1, "GPU-1111", "None", "No", "NVIDIA H200")])
    assert driver_gpus() == [
        {"index": 0, "uuid": UUID, "name": "NVIDIA H200", "needs_reset": True, "status": "Reset"},
        {"index": 1, "uuid": "GPU-1111", "name": "NVIDIA H200", "needs_reset": False, "status": "None"},
    ]


def test_a_driver_without_the_recovery_action_is_asked_for_its_reset_status(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, WEDGED, recovery=False)
    assert [(g["needs_reset"], g["status"]) for g in driver_gpus()] == [(True, "Yes")]


def test_a_driver_that_reports_neither_leaves_the_status_unknown_not_healthy(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, [(0, UUID, "[N/A]", "[N/A]", "NVIDIA L40S")])
    assert [(g["name"], g["needs_reset"]) for g in driver_gpus()] == [("NVIDIA L40S", None)]
    why = no_gpu_diagnosis(NO_GPUS)
    assert why.endswith("this driver reports no recovery action or reset status; `dmesg | grep -i xid` may say more")
    _fake_smi(tmp_path / "old", monkeypatch, [(0, UUID, "", "", "NVIDIA L40S")], recovery=False, reset=False)
    assert [(g["name"], g["needs_reset"]) for g in driver_gpus()] == [("NVIDIA L40S", None)]


def test_a_recovery_action_the_driver_cannot_read_falls_back_to_the_reset_status(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, [(0, UUID, "[N/A]", "Yes", "NVIDIA H200")])
    assert [(g["needs_reset"], g["status"]) for g in driver_gpus()] == [(True, "Yes")]


@pytest.mark.parametrize(
    "action, needs",
    [
        ("None", False),
        ("Reset", True),
        ("Drain and Reset", True),
        ("Reboot", True),
        ("[GPU requires reset]", True),
        ("Drain P2P", None),  # not a reset: nothing to act on here
        ("[GPU is lost]", None),
        ("[Insufficient Permissions]", None),
        ("[Unknown Error]", None),
    ],
)
def test_only_a_reset_or_a_reboot_counts_as_needing_one(action, needs):
    def run(args, timeout):
        return 0, f"0, {UUID}, {action}, NVIDIA H200\n" if "gpu_recovery_action" in args[0] else ""

    assert driver_gpus(run=run)[0]["needs_reset"] is needs
    reboot = no_gpu_diagnosis(None, gpus=lambda: [_gpu(0, True, "Reboot")], environ={})
    assert "GPU 0 needs a reboot (nvidia-smi: Reboot)" in reboot


def test_names_with_commas_partial_answers_and_a_hung_tool():
    asked = []

    def run(args, timeout):
        asked.append(args[0])
        return (
            15,
            f"0, {UUID}, Reset, NVIDIA H200, rev. B\nUnable to determine the device handle for GPU 1: Unknown Error\n",
        )

    assert driver_gpus(run=run) == [
        {"index": 0, "uuid": UUID, "name": "NVIDIA H200, rev. B", "needs_reset": True, "status": "Reset"}
    ]
    asked.clear()
    assert driver_gpus(run=lambda args, timeout: asked.append(args[0])) == []  # timed out: None
    assert len(asked) == 1  # a tool that did not answer is not asked again


def test_no_tool_no_gpus_and_no_diagnosis(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert driver_gpus() == []
    assert no_gpu_diagnosis(NO_GPUS) is None  # nothing listed: there is simply no GPU


def _gpu(index, needs, status="", uuid=UUID):
    return {"index": index, "uuid": uuid, "name": "NVIDIA H200", "needs_reset": needs, "status": status}


def test_a_gpu_that_needs_a_reset_is_named_with_what_cuda_said():
    why = no_gpu_diagnosis(NO_GPUS, gpus=lambda: [_gpu(0, True, "Reset")], environ={})
    assert why.startswith(
        f"nvidia-smi lists 1 GPU (0: NVIDIA H200) but CUDA finds none ({NO_GPUS}): GPU 0 needs a reset (nvidia-smi: Reset)"
    )
    assert "\n" not in why and "administrator" in why and "dmesg" in why


def test_hidden_gpus_are_named_before_any_broken_one():
    for needs in (False, True):
        hidden = no_gpu_diagnosis(None, gpus=lambda: [_gpu(0, needs)], environ={"CUDA_VISIBLE_DEVICES": ""})
        assert hidden.endswith("CUDA_VISIBLE_DEVICES='' hides them or names none that exists")
    healthy = no_gpu_diagnosis(None, gpus=lambda: [_gpu(0, False, "None")], environ={})
    assert healthy.endswith("the driver reports no reset needed; `dmesg | grep -i xid` may say more")


def test_a_pool_device_is_judged_by_its_own_gpu_only():
    two = [_gpu(0, False, "None", "GPU-aaaa"), _gpu(1, True, "Reset", "GPU-bbbb")]
    assert reset_diagnosis(NO_GPUS, uuid="aaaa", gpus=lambda: two) is None  # torch's uuid has no GPU- prefix
    mine = reset_diagnosis(NO_GPUS, uuid="bbbb", gpus=lambda: two)
    assert "GPU 1 needs a reset (nvidia-smi: Reset)" in mine and "0: NVIDIA H200" not in mine
    assert reset_diagnosis(NO_GPUS, gpus=lambda: two) is None  # no uuid, several GPUs: which one is unknown
    assert "needs a reset" in reset_diagnosis(NO_GPUS, gpus=lambda: two[1:])  # no uuid, one GPU: that one


def test_the_device_probe_and_the_matrix_say_the_gpu_needs_a_reset(tmp_path, monkeypatch):
    """The probe child of a CUDA torch answered count 0 with CUDA's words; the parent asks nvidia-smi why, and
    ``--device cuda`` is refused with that reason instead of "count 0"."""
    _fake_smi(tmp_path, monkeypatch, WEDGED)
    child = {"count": 0, "devices": [], "error": NO_GPUS, "torch": "2.11.0+cu130", "cuda": "13.0"}
    real_run = subprocess.run

    def run(cmd, *a, **k):
        if cmd[:2] == [devices.sys.executable, "-c"]:
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(child), stderr="")
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(devices.subprocess, "run", run)
    monkeypatch.setattr(devices, "_PROBE_CACHE", None)
    info = devices.probe_cuda()
    assert (
        info["count"] == 0 and "GPU 0 needs a reset (nvidia-smi: Reset)" in info["error"] and NO_GPUS in info["error"]
    )
    with pytest.raises(MatrixError) as e:
        run_matrix(device="cuda", time_budget=5, out=tmp_path / "m", progress=None)
    assert str(e.value).startswith("--device cuda but no CUDA device is visible (nvidia-smi lists 1 GPU")
    assert "needs a reset" in str(e.value)


def test_a_cuda_torch_that_sees_no_gpu_says_why_in_its_skip_reason(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, WEDGED)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(C, "cuda_available", lambda: False)
    C._no_gpu_diagnosis.cache_clear()
    try:
        why = C.no_cuda_reason()
    finally:
        C._no_gpu_diagnosis.cache_clear()
    assert why.startswith(f"no CUDA device: torch {torch.__version__} (CUDA 13.0) sees no GPU; nvidia-smi lists 1 GPU")
    assert "GPU 0 needs a reset (nvidia-smi: Reset)" in why


CASE = Case(op="cpu.scale", layouts={"x": LayoutSpec((2, 3), "float32")})


def _until(cond, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_pool_gives_up_a_gpu_that_needs_a_reset_and_answers_its_cases_at_once(tmp_path, monkeypatch):
    """``cuda:0`` on this CPU-only torch: every worker start fails, as on the H200 once it needed a reset.  With
    nvidia-smi saying so, the case is answered after the first failed start instead of after its 300 s timeout,
    and no worker is started there again."""
    _fake_smi(tmp_path, monkeypatch, WEDGED)
    with WorkerPool(["cuda:0"], 1, spares=0, attribute=False, case_timeout=300) as pool:
        r = pool.submit(CASE).result(timeout=120)
        assert r.verdict is Verdict.ERROR
        first = r.message.splitlines()[0]
        assert first.startswith("worker start failed: cuda:0: nvidia-smi lists 1 GPU (0: NVIDIA H200), and a worker")
        assert (
            "GPU 0 needs a reset (nvidia-smi: Reset)" in first
            and "no worker will start on this pool's devices" in r.message
        )
        assert "given up on (its GPU needs a reset)" in r.message
        assert set(pool.broken_devices) == {"cuda:0"}
        assert _until(lambda: not pool.workers(), 60)  # a start already under way when the answer came ends
        starts = len(pool.replaced)
        again = pool.submit(CASE).result(timeout=10)
        assert again.verdict is Verdict.ERROR and "needs a reset" in again.message
        assert len(pool.replaced) == starts and not pool.workers()  # nothing was started for it


def _health_check(pool, device: str, why: str) -> None:
    """What the pool's thread runs after a failed start, on a stand-in for the pool (a real one would start a
    worker for ``cuda:0`` at once: a torch import, seconds of CPU here)."""
    WorkerPool._check_gpu_health(pool, device, why)


def _pool_stand_in():
    return types.SimpleNamespace(_lock=threading.RLock(), _closed=False, broken_devices={}, _wake=lambda: None)


def test_a_pool_gives_a_gpu_up_only_when_its_driver_says_it_needs_a_reset(tmp_path, monkeypatch):
    pool = _pool_stand_in()
    _fake_smi(tmp_path / "healthy", monkeypatch, HEALTHY)
    _health_check(pool, "cuda:0", "RuntimeError: CUDA error: out of memory")
    assert pool.broken_devices == {}
    _fake_smi(tmp_path / "wedged", monkeypatch, WEDGED)
    _health_check(pool, "cuda:0", "Traceback ...\nRuntimeError: No CUDA GPUs are available\n")
    assert "needs a reset" in pool.broken_devices["cuda:0"] and NO_GPUS in pool.broken_devices["cuda:0"]


def test_a_pool_device_is_matched_to_its_gpu_by_the_probes_uuid(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, WEDGED)
    pool = _pool_stand_in()
    other = {"count": 1, "devices": [{"index": 0, "uuid": "0000aaaa-0000-0000-0000-000000000000"}], "cuda": "13.0"}
    monkeypatch.setattr(devices, "_PROBE_CACHE", other)  # cuda:0 is another GPU than the one that failed
    _health_check(pool, "cuda:0", "RuntimeError: No CUDA GPUs are available")
    assert pool.broken_devices == {}
    mine = {"count": 1, "devices": [{"index": 0, "uuid": UUID[4:]}], "cuda": "13.0"}  # torch: no GPU- prefix
    monkeypatch.setattr(devices, "_PROBE_CACHE", mine)
    _health_check(pool, "cuda:0", "RuntimeError: No CUDA GPUs are available")
    assert "GPU 0 needs a reset" in pool.broken_devices["cuda:0"]
    closed = dict(vars(_pool_stand_in()), _closed=True)  # a pool closed meanwhile is left alone
    closed = types.SimpleNamespace(**closed)
    _health_check(closed, "cuda:0", "RuntimeError: No CUDA GPUs are available")
    assert closed.broken_devices == {}


def test_cases_are_not_failed_while_a_worker_still_runs_on_a_given_up_device():
    with WorkerPool("cpu", 1, spares=0, attribute=False) as pool:
        assert pool.wait_ready(60)
        with pool._lock:
            pool.broken_devices["cpu"] = "GPU 0 needs a reset"  # as if its GPU failed after the worker started
        results = pool.run([CASE] * 6, timeout=60)
        assert [r.verdict for r in results] == [Verdict.PASS] * 6


def test_a_given_up_device_sets_no_retry_deadline():
    """The dispatcher waits until the next deadline: a past retry time of a device given up would make it spin."""
    with WorkerPool("cpu", 1, spares=0, attribute=False) as pool:
        assert pool.wait_ready(60)
        with pool._lock:
            pool._start_failures["cpu"] = 1
            pool._next_start["cpu"] = time.monotonic() - 100.0
            pool._pending.append(object())  # only its presence is read
            try:
                assert pool._next_deadline() < time.monotonic() - 50.0  # the retry, overdue: wait 0 s
                pool.broken_devices["cpu"] = "GPU 0 needs a reset"
                deadline = pool._next_deadline()
                assert deadline is None or deadline > time.monotonic() - 1.0
            finally:
                pool._pending.clear()
                pool._start_failures["cpu"] = 0
                pool.broken_devices.clear()


class _LostPool(InProcessPool):
    """Answers the first two cases, then says its only device's GPU needs a reset (as WorkerPool does)."""

    def submit(self, case):
        f = super().submit(case)
        if len(self.cases) >= 2:
            self.broken_devices = {"cpu": "nvidia-smi lists 1 GPU (0: NVIDIA H200), ...: GPU 0 needs a reset"}
        return f


def test_the_matrix_ends_in_order_when_every_device_needs_a_reset(tmp_path):
    out = tmp_path / "m"
    s = run_matrix(
        device="cpu",
        time_budget=120,
        ops=["fp8_linear"],
        out=out,
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: _LostPool(["cpu"]),
    )
    assert s["status"] == "interrupted" and s["interrupted"].endswith("GPU 0 needs a reset")
    assert s["duration_s"] < 60  # it did not run on to its budget
    assert sum(s["totals"].values()) >= 2 and (out / "report.md").is_file()


class _LostWhileExploring(InProcessPool):
    """Loses its only device at the first explored case; from then on answers every case as WorkerPool does when
    no worker can start (at once, ``error``)."""

    broken_devices: dict = {}

    def submit(self, case):
        if "explore" in case.params and not self.broken_devices:
            self.broken_devices = {"cpu": "nvidia-smi lists 1 GPU (0: NVIDIA H200), ...: GPU 0 needs a reset"}
        if self.broken_devices:
            f = Future()
            f.set_result(Result(Verdict.ERROR, "worker start failed: cpu: GPU 0 needs a reset", op=case.op))
            self.cases.append(case)
            return f
        return super().submit(case)


def test_a_gpu_lost_during_the_exploration_ends_the_searches_too(tmp_path):
    pool = _LostWhileExploring(["cpu"])
    s = run_matrix(
        device="cpu",
        time_budget=120,
        cases_per_cell=1,
        explore_cases=10_000,
        ops=["fp8_linear", "attn.emu.naive"],
        out=tmp_path / "m",
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: pool,
    )
    assert s["status"] == "interrupted" and s["interrupted"].endswith("GPU 0 needs a reset")
    assert s["duration_s"] < 60
    explored_after = sum(1 for c in pool.cases if "explore" in c.params)
    assert explored_after < 20, explored_after  # each search stopped at its next case (before: 89 in 0.5 s here)
    assert "error" not in s["totals"]  # "worker start failed" on a lost GPU is the run's end, not the ops' errors


def test_device_auto_on_a_gpu_that_needs_a_reset_runs_on_the_cpu_and_says_so(tmp_path, monkeypatch):
    why = (
        "nvidia-smi lists 1 GPU (0: NVIDIA H200) but CUDA finds none (...): GPU 0 needs a reset (nvidia-smi: Reset) ..."
    )
    monkeypatch.setattr(devices, "_PROBE_CACHE", {"count": 0, "devices": [], "error": why, "cuda": "13.0"})
    s = run_matrix(
        device="auto",
        cases_per_cell=1,
        explore=False,
        ops=["fp8_linear"],
        classes=["contiguous"],
        out=tmp_path / "m",
        corpus=empty_corpus(tmp_path),
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
    )
    assert s["device"]["devices_used"] == ["cpu"]
    assert f"--device auto runs on the CPU: {why}" in s["warnings"]
