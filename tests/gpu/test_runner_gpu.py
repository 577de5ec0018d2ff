"""The worker pool on real GPUs: real sticky CUDA faults are survived, attributed, and recovered from.

Faults provoked on purpose:
- ``fault.device_assert``: an out-of-bounds gather trips the index kernel's device-side assert;
  a device-side assert is sticky (the context stays unusable; every later call fails).
- ``fault.illegal_address``: a Triton kernel stores 2**36 elements past its buffer
  ("an illegal memory access was encountered", also sticky). Needs Triton.
(``torch._scaled_mm`` on a 1-byte-offset FP8 operand is *not* used: it fails with
``CUBLAS_STATUS_NOT_SUPPORTED``, a clean error that leaves the context healthy -- a rejection.)

This module's process never initialises CUDA itself: pools and probes run in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.cases import Case, load_case
from harness.layouts import LayoutSpec
from harness.runner.pool import WorkerPool, find_sanitizer, probe_cuda, probe_devices, run_in_fresh_process
from harness.verdicts import Verdict

import helpers

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
RECOVERY_LIMIT_S = 10.0  # the product promise: a fresh CUDA interpreter costs 5-7 s, a spare takes over at once


#: big enough for a GPU to launch real kernels
GPU_X = LayoutSpec((64, 128), "float32")


def case(op: str, spec: LayoutSpec = GPU_X, seed: int = 1, **params) -> Case:
    return helpers.case(op, spec, seed, **params)


@pytest.fixture(scope="module")
def devices() -> list[str]:
    found = probe_devices()
    if not found:
        pytest.skip(f"no CUDA device (probe: {probe_cuda().get('error') or 'torch sees 0 GPUs'})")
    return found


@pytest.fixture(scope="module")
def gpu_pool(devices, tmp_path_factory):
    with WorkerPool(
        devices[:1], 1, spares=1, case_timeout=120, attribute=True, cases_dir=tmp_path_factory.mktemp("cases")
    ) as p:
        assert p.wait_ready(300), "GPU workers did not start"
        yield p


def test_gpu_worker_runs_plain_targets(gpu_pool):
    odd = LayoutSpec((64, 128), "float32", offset=3, pad=(0, 5))
    results = gpu_pool.run([case("cpu.scale", odd, seed=s) for s in range(32)])
    assert {r.verdict for r in results} == {Verdict.PASS}
    mm = Case(
        op="cpu.matmul",
        layouts={"a": LayoutSpec((33, 40), "float32", offset=1), "b": LayoutSpec((40, 17), "float32", perm=(1, 0))},
    )
    r = gpu_pool.run_one(mm)
    assert r.verdict is Verdict.PASS, r.format()
    assert r.env["device_type"] == "cuda" and r.env["capability"]


def test_gpu_worker_device_assert_is_survived_attributed_and_recovered(gpu_pool):
    before = {w["name"] for w in gpu_pool.workers() if not w["spare"]}
    r = gpu_pool.run_one(case("fault.device_assert"))
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert "device-side assert" in r.message
    att = r.attribution
    # the blocking rerun in a fresh process names the gather, not where the error surfaced
    assert att["reproduced"] is True and att["launch_blocking"] is True, att
    assert att["op"].startswith("aten::index"), att
    assert "y.reshape(-1)[bad]" in att["frame"], att
    saved, _ = load_case(r.case_path)
    assert saved.verdict["verdict"] == "device_fault" and saved.env["device_type"] == "cuda"
    t0 = time.monotonic()
    nxt = gpu_pool.run_one(case("cpu.scale"))
    assert nxt.verdict is Verdict.PASS and nxt.worker not in before  # a new worker took over
    assert time.monotonic() - t0 < RECOVERY_LIMIT_S
    assert gpu_pool.recoveries and gpu_pool.recoveries[-1] < RECOVERY_LIMIT_S, gpu_pool.recoveries


def test_gpu_worker_illegal_address_from_triton_is_a_device_fault(gpu_pool):
    r = gpu_pool.run_one(case("fault.illegal_address"))
    if r.verdict is Verdict.UNAVAILABLE:
        pytest.skip(r.message)
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert "illegal memory access" in r.message or "illegal address" in r.message
    att = r.attribution
    # Triton launches bypass torch's dispatcher: the recorder's launch hook must still name the kernel,
    # as the op that raised or as the suspect launched just before the op that surfaced the error
    assert "triton::_oob_store_kernel" in att.get("op", "") + att.get("note", ""), att
    assert att["reproduced"] is True, att
    assert gpu_pool.run_one(case("cpu.scale")).verdict is Verdict.PASS


def test_gpu_worker_real_oom_keeps_the_worker(gpu_pool):
    first = gpu_pool.run_one(case("cpu.scale"))
    r = gpu_pool.run_one(case("fault.oom", real=True))
    assert r.verdict is Verdict.OOM, r.format()
    after = gpu_pool.run_one(case("cpu.scale"))
    assert after.verdict is Verdict.PASS and after.worker == r.worker == first.worker  # no replacement needed


def test_gpu_worker_hang_times_out(gpu_pool):
    r = gpu_pool.run_one(case("fault.hang"), timeout=2.0)
    assert r.verdict is Verdict.TIMEOUT
    assert gpu_pool.run_one(case("cpu.scale")).verdict is Verdict.PASS


def test_gpu_worker_parent_never_initialises_cuda(devices, tmp_path):
    # checked in a clean interpreter: other GPU tests in this session may use CUDA in-process
    script = textwrap.dedent(f"""
        import json, torch
        from harness.cases import Case
        from harness.layouts import LayoutSpec
        from harness.runner.pool import WorkerPool
        if __name__ == "__main__":
            with WorkerPool({devices[:1]!r}, 1, spares=0, attribute=False) as p:
                rs = p.run([Case(op="fault.device_assert", layouts={{"x": LayoutSpec((8,), "float32")}}),
                            Case(op="cpu.scale", layouts={{"x": LayoutSpec((8,), "float32")}})])
            print(json.dumps({{"verdicts": [r.verdict.value for r in rs],
                              "initialized": torch.cuda.is_initialized()}}))
    """)
    path = tmp_path / "parent.py"
    path.write_text(script)
    cp = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert out == {"verdicts": ["device_fault", "pass"], "initialized": False}


def test_gpu_worker_pool_spreads_across_all_devices(devices):
    if len(devices) < 2:
        pytest.skip(f"needs 2 GPUs to check the spread, found {len(devices)}")
    with WorkerPool(devices, 2, spares=0, attribute=False) as p:
        results = p.run([case("cpu.scale", seed=i) for i in range(200)])
        assert {r.verdict for r in results} == {Verdict.PASS}
        assert {r.device for r in results} == set(devices)
        # a fault on one device does not stop the others
        rs = p.run([case("fault.device_assert")] + [case("cpu.scale", seed=i) for i in range(50)])
        assert rs[0].verdict is Verdict.DEVICE_FAULT and {r.verdict for r in rs[1:]} == {Verdict.PASS}


@pytest.mark.slow
def test_gpu_worker_fault_under_compute_sanitizer(devices, tmp_path):
    if find_sanitizer() is None:
        pytest.skip("compute-sanitizer not found ($PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    from harness.cases import save_case

    path = save_case(case("fault.device_assert", LayoutSpec((8,), "float32")), tmp_path / "assert.json")
    r = run_in_fresh_process(path, devices[0], launch_blocking=True, sanitizer=True, timeout=600)
    assert r.verdict in (Verdict.DEVICE_FAULT, Verdict.WORKER_CRASH), r.format()
    assert "=========" in r.attribution["sanitizer"], r.attribution


@pytest.mark.slow
def test_gpu_sanitized_attribution_names_the_triton_kernel_its_access_and_launch(devices, tmp_path):
    """compute-sanitizer's report parsed into the attribution: an out-of-bounds 4-byte global write."""
    if find_sanitizer() is None:
        pytest.skip("compute-sanitizer not found ($PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    from harness.cases import save_case
    from harness.runner.fresh import SANITIZER_METHOD, SanitizerPolicy, attribution_rerun

    path = save_case(case("fault.illegal_address"), tmp_path / "oob.json")
    policy = SanitizerPolicy(None)
    assert policy.use(devices[0]), "auto must use the installed compute-sanitizer on CUDA"
    r = attribution_rerun(path, devices[0], sanitizer=policy, timeout=600)
    if r.verdict is Verdict.UNAVAILABLE:
        pytest.skip(r.message)
    att = r.attribution or {}
    if att.get("sanitizer_unusable"):
        pytest.skip(f"compute-sanitizer cannot check programs on this machine: {att['sanitizer_unusable']}")
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert att["method"] == SANITIZER_METHOD, att
    assert "_oob_store_kernel" in att["kernel"], att
    assert att["access"]["kind"] == "write" and att["access"]["space"] == "global", att
    assert att["access"]["problem"] == "out of bounds", att
    assert "doubles.py" in att.get("launch_frame", ""), att  # the Python line that launched it
