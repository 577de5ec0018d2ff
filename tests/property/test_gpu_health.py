"""A CUDA torch that finds no GPU where the driver lists one says why: a GPU that needs a reset, or GPUs hidden by
``CUDA_VISIBLE_DEVICES`` (harness.runner.gpu_health).  No GPU here: ``nvidia-smi`` is a script on ``PATH`` that
answers as the H200 did once its GSP firmware had stopped answering (Xid 119, then Xid 154 "GPU Reset Required")."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

import harness.capability as C
from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.matrix import MatrixError, run_matrix
from harness.runner import devices
from harness.runner.gpu_health import driver_gpus, no_gpu_diagnosis
from harness.runner.pool import WorkerPool
from harness.verdicts import Result, Verdict
from helpers import InProcessPool, empty_corpus

NO_GPUS = "RuntimeError: No CUDA GPUs are available"


def _fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, *, reset_fields: bool = True) -> Path:
    """An ``nvidia-smi`` on PATH: with the reset fields asked for it prints ``answer`` (or, for a driver without
    them, refuses the query as nvidia-smi does); asked for index and name alone it prints the first two columns."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "full.csv").write_text(answer + "\n")
    (bindir / "names.csv").write_text("\n".join(",".join(line.split(",")[:2]) for line in answer.splitlines()) + "\n")
    full = f'cat "{bindir}/full.csv"' if reset_fields else "echo 'Field is not a valid field to query.' >&2; exit 2"
    script = bindir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\ncase "$1" in\n  *reset_status*) {full};;\n  *) cat "{bindir}/names.csv";;\nesac\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_the_reset_status_of_each_gpu_is_read(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA H200, Yes, No\n1, NVIDIA H200, No, No")
    assert driver_gpus() == [
        {"index": 0, "name": "NVIDIA H200", "reset_required": True, "drain_and_reset": False},
        {"index": 1, "name": "NVIDIA H200", "reset_required": False, "drain_and_reset": False},
    ]


def test_a_driver_without_the_reset_fields_still_lists_its_gpus(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA L40S, [N/A], [N/A]", reset_fields=False)
    assert driver_gpus() == [{"index": 0, "name": "NVIDIA L40S", "reset_required": None, "drain_and_reset": None}]


def test_no_tool_no_gpus_and_no_diagnosis(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert driver_gpus() == []
    assert no_gpu_diagnosis(NO_GPUS) is None  # nothing listed: there is simply no GPU


def test_a_gpu_that_needs_a_reset_is_named_with_what_cuda_said():
    listed = [{"index": 0, "name": "NVIDIA H200", "reset_required": True, "drain_and_reset": None}]
    why = no_gpu_diagnosis(NO_GPUS, gpus=lambda: listed, environ={})
    assert why.startswith(
        f"nvidia-smi lists 1 GPU (0: NVIDIA H200) but CUDA finds none ({NO_GPUS}): GPU 0 needs a reset"
    )
    assert "\n" not in why and "administrator" in why and "dmesg" in why


def test_hidden_gpus_are_not_called_broken():
    listed = [{"index": 0, "name": "NVIDIA H200", "reset_required": False, "drain_and_reset": False}]
    assert no_gpu_diagnosis(None, gpus=lambda: listed, environ={"CUDA_VISIBLE_DEVICES": ""}).endswith(
        "CUDA_VISIBLE_DEVICES='' hides them or names none that exists"
    )
    healthy = no_gpu_diagnosis(None, gpus=lambda: listed, environ={})
    assert "needs a reset" not in healthy and healthy.endswith(
        "the driver reports no reset needed; `dmesg | grep -i xid` may say more"
    )


def test_the_device_probe_and_the_matrix_say_the_gpu_needs_a_reset(tmp_path, monkeypatch):
    """The probe child of a CUDA torch answered count 0 with CUDA's words; the parent asks nvidia-smi why, and
    ``--device cuda`` is refused with that reason instead of "count 0"."""
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA H200, Yes, No")
    child = {"count": 0, "devices": [], "error": NO_GPUS, "torch": "2.11.0+cu130", "cuda": "13.0"}
    real_run = subprocess.run

    def run(cmd, *a, **k):
        if cmd[:2] == [devices.sys.executable, "-c"]:
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(child), stderr="")
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(devices.subprocess, "run", run)
    monkeypatch.setattr(devices, "_PROBE_CACHE", None)
    info = devices.probe_cuda()
    assert info["count"] == 0 and "GPU 0 needs a reset" in info["error"] and NO_GPUS in info["error"]
    with pytest.raises(MatrixError) as e:
        run_matrix(device="cuda", time_budget=5, out=tmp_path / "m", progress=None)
    assert str(e.value).startswith("--device cuda but no CUDA device is visible (nvidia-smi lists 1 GPU")
    assert "needs a reset" in str(e.value)


def test_a_cuda_torch_that_sees_no_gpu_says_why_in_its_skip_reason(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA H200, Yes, No")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(C, "cuda_available", lambda: False)
    C._no_gpu_diagnosis.cache_clear()
    try:
        why = C.no_cuda_reason()
    finally:
        C._no_gpu_diagnosis.cache_clear()
    assert why.startswith(f"no CUDA device: torch {torch.__version__} (CUDA 13.0) sees no GPU; nvidia-smi lists 1 GPU")
    assert "GPU 0 needs a reset" in why


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
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA H200, Yes, No")
    with WorkerPool(["cuda:0"], 1, spares=0, attribute=False, case_timeout=300) as pool:
        r = pool.submit(CASE).result(timeout=120)
        assert r.verdict is Verdict.ERROR
        first = r.message.splitlines()[0]
        assert first.startswith("worker start failed: cuda:0: nvidia-smi lists 1 GPU (0: NVIDIA H200), and a worker")
        assert "GPU 0 needs a reset" in first and "no worker will start on this pool's devices" in r.message
        assert "given up on (its GPU needs a reset)" in r.message
        assert set(pool.broken_devices) == {"cuda:0"}
        assert _until(lambda: not pool.workers(), 60)  # a start already under way when the answer came ends
        starts = len(pool.replaced)
        again = pool.submit(CASE).result(timeout=10)
        assert again.verdict is Verdict.ERROR and "needs a reset" in again.message
        assert len(pool.replaced) == starts and not pool.workers()  # nothing was started for it


def test_a_healthy_driver_does_not_make_a_pool_give_a_gpu_up(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "0, NVIDIA H200, No, No")
    pool = WorkerPool(["cuda:0"], 1, spares=0, attribute=False)
    try:
        pool._check_gpu_health("cuda:0", "RuntimeError: CUDA error: out of memory")  # what the thread runs
        assert pool.broken_devices == {}
    finally:
        pool.close(cancel_pending=True)


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
