"""compute-sanitizer memcheck reports -> structured attribution (harness.runner.sanitizer), and the fallback
that names the faulting call by synchronising after every C-level call (harness.runner.execute).

The sample reports are composed from the format in NVIDIA's Compute Sanitizer manual and in public reports
of several tool versions (older ``at 0x.. in file:line:kernel``, newer ``at kernel+0x..``; host frames on
one line or two)."""

from __future__ import annotations

import math
import operator
import os
import sys
import zlib

import pytest
import torch

from harness.cases import format_case, load_case
from harness.reference.metrics import Bound
from harness.report import attribution_text
from harness.runner import execute
from harness.runner.execute import GUESS_METHOD, SYNC_METHOD, LaunchChecker, OpRecorder, run_case
from harness.runner.fresh import SANITIZER_METHOD, SanitizerPolicy, _with_sanitizer, attribution_rerun
from harness.runner.pool import merge_attribution, save_failure
from harness.runner.sanitizer import (
    HostFrame,
    parse_memcheck,
    sanitizer_unusable,
    short_kernel_name,
)
from harness.runner.targets import BaseTarget, register_target
from harness.verdicts import Result, Verdict

from helpers import case as helper_case

SAGE = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at void TransposePadPermuteKernel<__nv_fp8_e4m3, 64>(const __half *, __nv_fp8_e4m3 *, int, int, int)+0x1c0
=========     by thread (32,0,0) in block (0,3,1)
=========     Address 0x7f2a4c000202 is misaligned
=========     and is inside the nearest allocation at 0x7f2a4c000000 of size 2,097,152 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2f26f0] in libcuda.so.1
=========         Host Frame: cudaLaunchKernel [0x75230] in libcudart.so.12
=========         Host Frame: transpose_pad_permute_cuda(at::Tensor, at::Tensor, int) in fused.cu:210 [0x4a1b2] in /venv/lib/python3.11/site-packages/sageattention/_fused.cpython-311-x86_64-linux-gnu.so
=========         Host Frame: pybind11::cpp_function::dispatcher(_object*, _object*, _object*) [0x2c0a1] in /venv/lib/python3.11/site-packages/sageattention/_fused.cpython-311-x86_64-linux-gnu.so
=========         Host Frame: _PyEval_EvalFrameDefault [0x1afb7e] in python3
=========
========= ERROR SUMMARY: 1 error
"""

# an older layout: kernel and source in one ``at 0x.. in`` line, host frames over two lines
OOB_OLD = """\
========= COMPUTE-SANITIZER
program output line
========= Invalid __global__ read of size 4 bytes
=========     at 0x490 in /src/box.cu:75:col_kernel(const unsigned int *, unsigned int *, int)
=========     by thread (1,0,0) in block (7,0,0)
=========     Access at 0x7f71b9e01360 is out of bounds
=========     and is 4 bytes after the nearest allocation at 0x7f71b9e00a00 of size 2,400 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========     Host Frame: [0x2efadf]
=========                in /usr/lib/libcuda.so.1
=========     Host Frame:cudaLaunchKernel [0x75230]
=========                in /opt/cuda/lib/libcudart.so.12
=========     Host Frame:box_launch(at::Tensor) [0x1a5d62]
=========                in /work/ext/box_ext.so
=========
========= ERROR SUMMARY: 1 error
"""

MANY = """\
========= COMPUTE-SANITIZER
========= Invalid __shared__ write of size 8 bytes
=========     at first_kernel+0xec0 in attn.py:43
=========     by thread (18,0,0) in block (0,0,0)
=========     Access to 0x74505bcccca0 is out of bounds
=========     and is 161 bytes before the nearest allocation at 0x74505bccc800 of size 1,024 bytes
=========
========= Invalid __global__ read of size 8 bytes
=========     at second_kernel+0x10
=========     by thread (0,0,0) in block (1,0,0)
=========     Address 0x10 is out of bounds
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call to cudaStreamSynchronize.
=========     Saved host backtrace up to driver entry point at error
=========
========= ERROR SUMMARY: 25 errors
"""


def test_misaligned_16_byte_read_in_a_sage_extension_kernel():
    rep = parse_memcheck(SAGE)
    assert rep is not None and rep.total == 1 and len(rep.errors) == 1
    e = rep.first
    assert (e.kind, e.space, e.size) == ("read", "global", 16)
    assert e.kernel.startswith("void TransposePadPermuteKernel<__nv_fp8_e4m3, 64>(const __half *")
    assert e.kernel_offset == "0x1c0"
    assert short_kernel_name(e.kernel) == "TransposePadPermuteKernel"
    assert (e.thread, e.block) == ((32, 0, 0), (0, 3, 1))
    assert e.address == "0x7f2a4c000202" and e.problem == "misaligned"
    assert e.misaligned_by == 2  # 0x...202 is 2 bytes past a 16-byte boundary
    assert e.allocation == {"base": "0x7f2a4c000000", "size": 2097152, "where": "inside", "offset": 0x202}
    ext = e.extension_frame
    assert ext is not None and ext.symbol == "transpose_pad_permute_cuda(at::Tensor, at::Tensor, int)"
    assert ext.source == "fused.cu:210" and ext.python_module == "sageattention._fused"
    assert e.host_frames[0] == HostFrame("", "libcuda.so.1")
    acc = e.access()
    assert acc["kind"] == "read" and acc["size"] == 16 and acc["problem"] == "misaligned"
    assert acc["relation"] == "inside the nearest allocation at 0x7f2a4c000000 of size 2,097,152 bytes"


def test_out_of_bounds_read_n_bytes_after_an_allocation_older_layout():
    rep = parse_memcheck(OOB_OLD)
    e = rep.first
    assert (e.kind, e.space, e.size) == ("read", "global", 4)
    assert e.kernel == "col_kernel(const unsigned int *, unsigned int *, int)" and e.source == "/src/box.cu:75"
    assert e.problem == "out of bounds" and e.address == "0x7f71b9e01360"
    assert e.allocation == {"base": "0x7f71b9e00a00", "size": 2400, "where": "after", "bytes": 4}
    assert e.misaligned_by is None
    # the symbol line and its ``in`` line are one frame
    assert [f.module for f in e.host_frames] == [
        "/usr/lib/libcuda.so.1",
        "/opt/cuda/lib/libcudart.so.12",
        "/work/ext/box_ext.so",
    ]
    assert e.extension_frame.symbol == "box_launch(at::Tensor)"


def test_several_errors_take_the_first_kernel_error_and_count_all():
    rep = parse_memcheck(MANY)
    assert rep.total == 25 and len(rep.errors) == 3
    e = rep.first
    assert e.kernel == "first_kernel" and e.source == "attn.py:43"
    assert (e.kind, e.space, e.size) == ("write", "shared", 8)
    assert e.allocation["where"] == "before" and e.allocation["bytes"] == 161
    assert rep.errors[2].kernel is None and rep.errors[2].headline.startswith("Program hit cudaErrorLaunchFailure")


def test_an_api_error_alone_is_still_the_first_error():
    text = MANY.split("========= Program hit", 1)[1]
    rep = parse_memcheck("========= COMPUTE-SANITIZER\n========= Program hit" + text)
    assert rep.first is not None and rep.first.kernel is None and rep.total == 25


def test_no_errors():
    rep = parse_memcheck("========= COMPUTE-SANITIZER\nhello\n========= ERROR SUMMARY: 0 errors\n")
    assert rep is not None and rep.errors == () and rep.total == 0 and rep.first is None
    assert sanitizer_unusable("", rep) is None


def test_cuda_memcheck_era_host_frames():
    text = """\
========= CUDA-MEMCHECK
========= Invalid __global__ read of size 8
=========     at 0x000000c8 in /home/u/src/my_helper.cuh:75:void vector_projection<double>(double*, int)
=========     by thread (9,0,0) in block (0,0,0)
=========     Address 0x000370e8 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========     Host Frame:/lib64/libcuda.so.1 (cuLaunchKernel + 0x34e) [0x2d725e]
=========     Host Frame:./qs [0x36feb]
=========
========= ERROR SUMMARY: 1 error
"""
    e = parse_memcheck(text).first
    assert (e.kind, e.space, e.size) == ("read", "global", 8)
    assert e.kernel == "void vector_projection<double>(double*, int)" and e.source == "/home/u/src/my_helper.cuh:75"
    assert short_kernel_name(e.kernel) == "vector_projection"
    assert e.host_frames == (HostFrame("cuLaunchKernel", "/lib64/libcuda.so.1"), HostFrame("", "./qs"))


@pytest.mark.parametrize(
    "text",
    ["", "Traceback (most recent call last):\n  File x\nRuntimeError: boom", "=====", None, 12, "\x00\xff" * 50],
)
def test_garbage_is_no_report_and_never_raises(text):
    assert parse_memcheck(text) is None


def test_truncated_and_odd_lines_do_not_raise():
    for cut in range(0, len(SAGE), 37):
        rep = parse_memcheck(SAGE[:cut])
        assert rep is None or rep.total >= 0
    rep = parse_memcheck(
        "========= Invalid __global__ read of size x\n=========     at \n=========     Address zz is\n"
    )
    assert rep is not None and rep.first.headline.startswith("Invalid __global__ read")


@pytest.mark.parametrize(
    ("text", "unusable"),
    [
        ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n", True),
        ("========= Internal Sanitizer Error: The Sanitizer driver version is too old\n", True),
        ("compute-sanitizer: command not found\n", True),
        (
            "========= COMPUTE-SANITIZER\n========= Error: process didn't terminate successfully\n"
            "========= ERROR SUMMARY: 1 error\n",
            False,
        ),  # the program crashed: the tool worked
        (SAGE, False),
    ],
)
def test_sanitizer_unusable_tells_a_broken_tool_from_a_crashing_program(text, unusable):
    assert (sanitizer_unusable(text, parse_memcheck(text)) is not None) is unusable


def test_short_kernel_name():
    assert short_kernel_name("void ns::K<int, 4>(const int *)") == "ns::K"
    assert short_kernel_name("matmul_kernel") == "matmul_kernel"
    assert short_kernel_name("cudaError cub::Dev<short>::Run(int) const") == "cub::Dev::Run"


def test_python_extension_frames():
    assert HostFrame("f", "/x/site-packages/pkg/sub/_ops.abi3.so").python_module == "pkg.sub._ops"
    assert HostFrame("f", "/x/site-packages/pkg/_m.cpython-311-x86_64-linux-gnu.so").in_python_extension
    assert not HostFrame("f", "/usr/lib/libcudart.so.12").in_python_extension
    assert not HostFrame("f", "libtorch_cuda.so").in_python_extension


# ------------------------------------------------------------------------------ the fallback: sync after every call


class _FakeDevice:
    """Stands for a device context: ``fail()`` is the faulty launch that does not check its error; ``check``
    is the synchronize that sees the sticky error from then on."""

    def __init__(self) -> None:
        self.state = {"broken": False}
        self.checks = 0

    def check(self) -> str | None:
        self.checks += 1
        return "CUDA error: misaligned address" if self.state["broken"] else None


def _extension_op(dev: _FakeDevice) -> None:
    # C-level calls from Python, like a pybind11 extension op: the second one "launches the bad kernel"
    zlib.crc32(b"healthy launch")
    operator.setitem(dev.state, "broken", True)  # the faulty launch
    zlib.crc32(b"innocent, after the fault")


def test_launch_checker_names_the_c_call_after_which_the_device_failed_and_its_line():
    dev = _FakeDevice()
    chk = LaunchChecker(dev.check)
    with chk:
        _extension_op(dev)
        math.sqrt(2.0)  # after the first failure nothing more is checked
    assert chk.call == "_operator.setitem"
    assert chk.frame.startswith(f"{__file__}:") and "in _extension_op" in chk.frame
    assert 'operator.setitem(dev.state, "broken", True)' in chk.frame
    assert chk.error == "CUDA error: misaligned address"
    assert dev.checks == 2  # zlib.crc32 (healthy), then operator.setitem (failed); builtins such as len skipped


def test_launch_checker_is_off_outside_its_block_and_restores_the_profiler():
    dev = _FakeDevice()
    before = sys.getprofile()
    chk = LaunchChecker(dev.check)
    with chk:
        zlib.crc32(b"x")
    assert sys.getprofile() is before
    zlib.crc32(b"y")
    assert dev.checks == 1


def test_launch_checker_does_not_check_builtins_module_calls():
    dev = _FakeDevice()
    with LaunchChecker(dev.check):
        len([1, 2])
        [].append(3)
        isinstance(dev, object)
    assert dev.checks == 0


_DEV = _FakeDevice()


@pytest.fixture
def fake_device(monkeypatch):
    """The in-process run_case sees the fake device: its launch check, and a health check that fails once the
    fake context is broken (as a sticky CUDA error makes every later call fail)."""
    _DEV.state["broken"] = False
    _DEV.checks = 0
    real = execute.device_healthy
    monkeypatch.setattr(execute, "launch_check", lambda device: _DEV.check)
    monkeypatch.setattr(
        execute,
        "device_healthy",
        lambda device: (False, "CUDA error: misaligned address") if _DEV.state["broken"] else real(device),
    )
    return _DEV


@register_target(replace=True)
class _UncheckedExtension(BaseTarget):
    """A pybind11-style op that launches a faulty kernel without checking it; the error surfaces at a later,
    innocent aten op."""

    name = "test.unchecked_extension"

    def run(self, inputs, params):
        x = inputs["x"]
        y = x * 2
        _extension_op(_DEV)
        if _DEV.state["broken"]:
            torch.zeros(1)  # an innocent op, then the sticky error surfaces
            raise RuntimeError("CUDA error: misaligned address")
        return y

    def reference(self, inputs, params):
        return inputs["x"].double() * 2, None

    def bound(self, inputs, params, exact):
        return Bound.exact("x * 2 is exact")


def test_rerun_names_the_extension_call_not_the_op_where_the_fault_surfaced(fake_device):
    r = run_case(helper_case("test.unchecked_extension"), "cpu", record_ops=True)
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    att = r.attribution
    assert att["op"] == "_operator.setitem" and att["method"] == SYNC_METHOD
    assert "in _extension_op" in att["launch_frame"] and att["call_frame"] == att["launch_frame"]
    assert att["ops_tail"][-1].startswith("aten::zeros")  # where it would have been charged before
    assert "raise RuntimeError" in att["frame"]  # where it surfaced


def test_no_recording_outside_attribution_reruns(fake_device):
    r = run_case(helper_case("test.unchecked_extension"), "cpu")
    assert r.verdict is Verdict.DEVICE_FAULT
    assert fake_device.checks == 0 and "method" not in r.attribution and "op" not in r.attribution


@register_target(replace=True)
class _SilentFault(_UncheckedExtension):
    """Breaks the context where no check can see it (inside the op's own Python, no C call after it)."""

    name = "test.silent_fault"

    def run(self, inputs, params):
        inputs["x"] * 3
        _DEV.state["broken"] = True
        raise RuntimeError("CUDA error: unspecified launch failure")


def test_where_no_check_catches_it_the_last_op_is_named_as_a_guess(fake_device):
    r = run_case(helper_case("test.silent_fault"), "cpu", record_ops=True)
    assert r.verdict is Verdict.DEVICE_FAULT, r.format()
    assert r.attribution["method"] == GUESS_METHOD and r.attribution["op"].startswith("aten::mul")


def test_an_aten_op_is_checked_after_it_returns(fake_device):
    chk = LaunchChecker(fake_device.check)
    rec = OpRecorder(checker=chk)
    x = torch.ones(3)
    with rec, chk:
        y = x + 1
        fake_device.state["broken"] = True
        z = y * 2  # the check after aten::mul fails: it is named, with this line
        del z
    assert chk.call.startswith("aten::mul") and "z = y * 2" in chk.frame


# ------------------------------------------------------------------------------ the sanitized rerun


def test_sanitizer_record_goes_into_the_attribution_with_the_workers_python_frame():
    worker = {"op": "_fused.transpose_pad_permute_cuda", "call_frame": "/sa/quant.py:123 in per_channel_fp8: x"}
    att = _with_sanitizer(worker, None, "program output\n" + SAGE)
    assert att["kernel"].startswith("void TransposePadPermuteKernel<") and att["method"] == SANITIZER_METHOD
    assert att["access"]["kind"] == "read" and att["access"]["size"] == 16 and att["access"]["problem"] == "misaligned"
    assert att["launch_frame"] == worker["call_frame"]
    assert att["host_frame"].startswith("transpose_pad_permute_cuda(at::Tensor, at::Tensor, int) in fused.cu:210")
    assert att["extension"] == "sageattention._fused" and att["sanitizer_errors"] == 1
    assert "Invalid __global__ read of size 16 bytes" in att["sanitizer"]
    # without the worker's frame, the extension's host frame stands for where it was launched
    assert _with_sanitizer({}, None, SAGE)["launch_frame"] == att["host_frame"]


def test_an_unusable_sanitizer_is_said_so_and_names_nothing():
    att = _with_sanitizer({"op": "x"}, None, "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n")
    assert "Device not supported" in att["sanitizer_unusable"] and "kernel" not in att and "method" not in att


def test_sanitizer_policy():
    auto = SanitizerPolicy(None)
    assert auto.use("cpu") is False  # auto: CUDA only
    assert SanitizerPolicy(False).use("cuda:0") is False
    on = SanitizerPolicy(True)
    assert on.use("cpu") is True
    assert on.note(Result(Verdict.DEVICE_FAULT, attribution={"kernel": "k"})) is None and on.worked
    assert on.note(Result(Verdict.WORKER_CRASH, attribution={"sanitizer_unusable": "Device not supported"}))
    assert on.use("cuda:0") is False and on.unusable == "Device not supported"  # remembered
    with pytest.raises(ValueError, match="must be True, False or None"):
        SanitizerPolicy("auto")


# ------------------------------------------------------------------------------ showing it

SAGE_FRAME = "/venv/lib/python3.11/site-packages/sageattention/core.py:123 in per_channel_fp8: q8 = _fused.f(q)"


def test_attribution_line_names_kernel_access_method_and_launch_frame():
    att = _with_sanitizer({"call_frame": SAGE_FRAME}, None, SAGE)
    assert attribution_text(att) == (
        "faulting kernel: TransposePadPermuteKernel (read of 16 B, address misaligned by 2 B) via "
        "compute-sanitizer; launched from sageattention/core.py:123 per_channel_fp8"
    )
    oob = _with_sanitizer({}, None, OOB_OLD)
    assert attribution_text(oob).startswith(
        "faulting kernel: col_kernel (read of 4 B, address out of bounds, 4 B after a 2400 B allocation) via"
    )
    sync = {"op": "_operator.setitem", "method": SYNC_METHOD, "launch_frame": "/x/y/t.py:9 in run: f()"}
    assert attribution_text(sync) == f"faulting op: _operator.setitem ({SYNC_METHOD}); launched from y/t.py:9 run"
    assert attribution_text({"op": "aten::alias"}) == "faulting op: aten::alias"  # a case file from before
    assert attribution_text(None) == "" and attribution_text({"surfaced_at": "x"}) == ""


def test_report_shows_each_example_attribution(tmp_path):
    from harness.report import SummaryError, render_html, render_markdown, validate_summary

    line = attribution_text(_with_sanitizer({"call_frame": SAGE_FRAME}, None, SAGE))
    cell = {
        "op": "sage2",
        "kind": "attention",
        "layout_class": "misaligned_ptr_2",
        "status": "fail",
        "cases": 1,
        "counts": {"device_fault": 1},
        "examples": {"device_fault": "cases/a.json"},
        "attribution": {"device_fault": line},
    }
    summary = {"schema_version": 1, "device": {}, "duration_s": 1.0, "totals": {"device_fault": 1}, "cells": [cell]}
    assert f"- device_fault attribution: {line}" in render_markdown(summary)
    assert "device_fault attribution: faulting kernel: TransposePadPermuteKernel" in render_html(summary)
    cell["attribution"] = {"device_fault": {"kernel": "k"}}
    with pytest.raises(SummaryError, match="attribution must map verdict -> one line"):
        validate_summary(summary)


def _fake_sanitizer(tmp_path, monkeypatch, report: str, run_program: bool):
    """A stand-in ``compute-sanitizer`` on $PATH: prints its banner, runs the program (or not: a tool that
    cannot start it), then prints ``report``."""
    tool = tmp_path / "bin" / "compute-sanitizer"
    tool.parent.mkdir(exist_ok=True)
    (tmp_path / "report.txt").write_text(report)
    run = 'shift 6\n"$@"\ncode=$?\n' if run_program else "code=1\n"
    tool.write_text(
        f"#!/bin/sh\necho '========= COMPUTE-SANITIZER'\n{run}cat '{tmp_path / 'report.txt'}'\nexit $code\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_sanitized_rerun_names_the_kernel_and_the_case_file_keeps_it(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, SAGE.split("\n", 1)[1], run_program=True)
    c = helper_case("fault.sticky")
    first = Result(Verdict.DEVICE_FAULT, "surfaced later", op="fault.sticky", device="cpu")
    path = save_failure(c, first, tmp_path / "cases")
    policy = SanitizerPolicy(True)
    rerun = attribution_rerun(path, "cpu", sanitizer=policy, timeout=120)
    assert rerun.verdict is Verdict.DEVICE_FAULT, rerun.format()
    assert policy.worked and policy.unusable is None
    first.attribution = merge_attribution({"surfaced_at": "x"}, rerun)
    att = first.attribution
    assert att["method"] == SANITIZER_METHOD and att["kernel"].startswith("void TransposePadPermuteKernel")
    assert att["access"]["size"] == 16 and att["op"] == "harness_fault::bad_kernel"
    saved, _ = load_case(save_failure(c, first, tmp_path / "cases", name=path.stem))
    for key in ("kernel", "access", "launch_frame", "method", "host_frame", "sanitizer_errors"):
        assert saved.verdict["attribution"][key] == att[key], key
    shown = format_case(saved)
    assert "faulting kernel: TransposePadPermuteKernel (read of 16 B, address misaligned by 2 B) via" in shown
    assert "attribution: faulting kernel: TransposePadPermuteKernel" in first.format()


def test_a_sanitizer_that_cannot_run_here_is_remembered_and_the_case_rerun_without_it(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, "========= Error: Device not supported\n", run_program=False)
    path = save_failure(helper_case("fault.sticky"), Result(Verdict.DEVICE_FAULT, device="cpu"), tmp_path / "c")
    policy = SanitizerPolicy(True)
    rerun = attribution_rerun(path, "cpu", sanitizer=policy, timeout=120)
    assert rerun.verdict is Verdict.DEVICE_FAULT, rerun.format()
    att = rerun.attribution
    assert "Device not supported" in att["sanitizer_unusable"] and "kernel" not in att
    assert att["op"] == "harness_fault::bad_kernel" and att["method"] == SYNC_METHOD  # named without the tool
    assert policy.use("cuda:0") is False  # the pool's next fault goes without it


def test_a_triton_launcher_call_is_charged_to_the_kernel_it_launched(fake_device):
    from harness.runner.execute import _Recording

    rec = _Recording("cpu")
    rec.checker.check = fake_device.check

    def launch():
        rec.recorder._triton_launch({"name": "_oob_store_kernel"})  # Triton's launch-enter hook
        operator.setitem(fake_device.state, "broken", True)  # the launcher's C call

    rec.run(launch)
    att = rec.attribution(None)
    assert att["op"] == "triton::_oob_store_kernel" and att["call"] == "_operator.setitem"
    assert att["method"] == SYNC_METHOD and "in launch" in att["launch_frame"]
