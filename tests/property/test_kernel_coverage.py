"""Kernel names as coverage: ``record_kernels`` profiles explored cases on CUDA and stores the kernel names.

No GPU here: the profiler is a fake handing back real ``FunctionEvent`` objects (the type
``torch.profiler.profile.events()`` returns), so what is tested is which events count as kernels,
that names come back sorted and unique, that they reach ``metrics["kernels"]`` through the worker's
transport and a case file, and that nothing is profiled on CPU or for grid cases.  The GPU run must
check the real profiler (see tests/bench/README.md and the report of issue 16).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from harness.cases import load_case
from harness.explore import Genome, build_case, kernel_coverage
from harness.runner.casefiles import save_failure
from harness.runner.execute import _Case, kernel_names, profiler_events, record_kernels, run_case
from harness.runner.targets import get_target
from harness.verdicts import Result, Verdict

ATT = get_target("attn.emu.naive")
SIZES = (("batch", 1), ("head_dim", 64), ("heads", 1), ("layout", "HND"), ("seq_k", 16), ("seq_q", 16))


def _event(name: str, device: DeviceType, activity: str | None) -> FunctionEvent:
    """A profiler event; torch builds before 2.13 have no ``activity_type`` (set after construction there)."""
    ev = FunctionEvent(id=1, name=name, thread=0, start_us=0, end_us=1, device_type=device)
    if activity is not None:
        ev.activity_type = activity
    return ev


EVENTS = [
    _event("flash_fwd_kernel", DeviceType.CUDA, "kernel"),
    _event("aten::mm", DeviceType.CPU, "cpu_op"),
    _event("Memcpy DtoD (Device -> Device)", DeviceType.CUDA, "gpu_memcpy"),
    _event("Memset (Device)", DeviceType.CUDA, "gpu_memset"),
    _event("cast_kernel", DeviceType.CUDA, "kernel"),
    _event("flash_fwd_kernel", DeviceType.CUDA, "kernel"),
    _event("legacy_kernel", DeviceType.CUDA, None),
    _event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, None),  # no activity type: told by its name
]


class FakeProfiler:
    """Stands for ``torch.profiler.profile``: start, stop, events; counts how it was used."""

    made = 0

    def __init__(self, events=EVENTS, fail_stop: bool = False) -> None:
        FakeProfiler.made += 1
        self.started = self.stopped = False
        self._events, self.fail_stop = events, fail_stop

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        if self.fail_stop:
            raise RuntimeError("CUPTI: device context lost")
        self.stopped = True

    def events(self):
        assert self.started and self.stopped, "events read before the profiler stopped"
        return self._events


def _explored():
    return build_case(ATT, Genome(SIZES, seed=2))


def test_kernel_names_keeps_device_kernels_only_sorted_and_unique() -> None:
    assert kernel_names(EVENTS) == ["cast_kernel", "flash_fwd_kernel", "legacy_kernel"]
    assert kernel_names([]) == []


class RawEvent:
    """Stands for a raw kineto event (``torch._C._autograd._KinetoEvent``): the same fields, as methods;
    ``activity=None``: a torch whose raw events have no ``activity_type``."""

    def __init__(self, ev: FunctionEvent, with_activity: bool = True) -> None:
        self.name = lambda: ev.name
        self.device_type = lambda: ev.device_type
        activity = getattr(ev, "activity_type", None)
        if with_activity and activity is not None:
            self.activity_type = lambda: activity


def test_raw_kineto_events_give_the_names_their_function_events_give() -> None:
    assert kernel_names([RawEvent(e) for e in EVENTS]) == kernel_names(EVENTS)
    assert kernel_names([RawEvent(e, with_activity=False) for e in EVENTS]) == [
        "cast_kernel",
        "flash_fwd_kernel",
        "legacy_kernel",
    ]


def test_a_stopped_profiler_is_read_from_its_raw_events_where_torch_keeps_them() -> None:
    raw = [RawEvent(EVENTS[0])]

    class Result:
        def events(self):
            return raw

    class WithRaw(FakeProfiler):
        profiler = type("Inner", (), {"kineto_results": Result()})()

    assert profiler_events(WithRaw()) is raw
    fake = FakeProfiler()
    fake.start()
    fake.stop()
    assert profiler_events(fake) is EVENTS  # no raw results: the FunctionEvents


def test_record_kernels_reads_the_raw_events_and_never_builds_function_events() -> None:
    class Result:
        def events(self):
            return [RawEvent(_event("raw_only_kernel", DeviceType.CUDA, "kernel"))]

    class RawOnly(FakeProfiler):
        profiler = type("Inner", (), {"kineto_results": Result()})()

        def events(self):
            raise AssertionError("FunctionEvents built: the slow path")

    st = _Case(_explored().case, "cuda:0", "w0")
    assert record_kernels(st, lambda: 1, profiler=RawOnly) == 1
    assert st.kernels == ["raw_only_kernel"]


def test_the_real_profilers_raw_events_name_what_its_function_events_name() -> None:
    """On this CPU torch, the raw events of a real profile have the names and devices of its ``events()``
    (the GPU suite checks the same for kernels: tests/gpu/test_kernel_names_gpu.py)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64)
    prof = profile(activities=[ProfilerActivity.CPU])
    prof.start()
    ((x * 2) @ x).sum()
    prof.stop()
    raw = {(e.name(), e.device_type()) for e in profiler_events(prof)}
    assert ("aten::mm", DeviceType.CPU) in raw
    assert raw == {(e.name, e.device_type) for e in prof.events()}


def test_an_explored_case_on_cuda_records_its_kernels_into_the_result_metrics() -> None:
    built = _explored()
    st = _Case(built.case, "cuda:0", "w0")
    assert record_kernels(st, lambda: "out", profiler=FakeProfiler) == "out"
    r = st.result(Verdict.PASS, "ok", metrics={"ratio": 0.25})
    assert r.metrics == {"ratio": 0.25, "kernels": ["cast_kernel", "flash_fwd_kernel", "legacy_kernel"]}
    assert st.result(Verdict.REJECTED, "refused").metrics == {
        "kernels": ["cast_kernel", "flash_fwd_kernel", "legacy_kernel"]
    }
    assert kernel_coverage(built, r) == ("kernels", "cast_kernel", "flash_fwd_kernel", "legacy_kernel")


def test_no_profiling_on_cpu_nor_for_cases_of_the_grid() -> None:
    built = _explored()
    before = FakeProfiler.made
    st = _Case(built.case, "cpu", "")
    assert record_kernels(st, lambda: 7, profiler=FakeProfiler) == 7
    assert st.kernels is None and "kernels" not in st.result(Verdict.PASS).metrics
    params = {k: v for k, v in built.case.params.items() if k != "explore"} | {"layout_class": "contiguous"}
    grid = _Case(dataclasses.replace(built.case, params=params), "cuda:0", "")
    assert "explore" not in grid.case.params
    record_kernels(grid, lambda: 7, profiler=FakeProfiler)
    assert grid.kernels is None and FakeProfiler.made == before
    r = run_case(built.case, "cpu")  # the real path on CPU: judged, nothing recorded
    assert r.verdict is Verdict.PASS and "kernels" not in r.metrics
    assert kernel_coverage(built, r) == ((), ())  # the CPU key


def test_a_failing_profiler_never_hides_the_ops_exception_and_records_nothing() -> None:
    st = _Case(_explored().case, "cuda:0", "")

    def op():
        raise ValueError("the kernel refused the layout")

    with pytest.raises(ValueError, match="refused the layout"):
        record_kernels(st, op, profiler=lambda: FakeProfiler(fail_stop=True))
    assert st.kernels is None

    def no_cupti():
        raise RuntimeError("CUPTI unavailable")

    assert record_kernels(st, lambda: 3, profiler=no_cupti) == 3 and st.kernels is None


def _send(conn, payload) -> None:
    conn.send(payload)
    conn.close()


def test_kernels_survive_the_worker_transport_and_the_case_file(tmp_path: Path) -> None:
    built = _explored()
    st = _Case(built.case, "cuda:0", "w0")
    record_kernels(st, lambda: None, profiler=FakeProfiler)
    r = st.result(Verdict.DRIFT, "too far", metrics={"ratio": 3.0})
    ctx = multiprocessing.get_context("spawn")  # the pool's transport: a pipe between processes, to_json dicts
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_send, args=(send, r.to_json()))
    p.start()
    assert recv.poll(60), "the child sent nothing within 60 s"
    back = Result.from_json(recv.recv())
    p.join(60)
    assert back.metrics["kernels"] == ["cast_kernel", "flash_fwd_kernel", "legacy_kernel"]
    assert kernel_coverage(built, back) == kernel_coverage(built, r)
    path = save_failure(built.case, back, tmp_path)
    loaded, _ = load_case(path)
    assert loaded.verdict["metrics"]["kernels"] == ["cast_kernel", "flash_fwd_kernel", "legacy_kernel"]
    assert loaded.params["explore"] == built.case.params["explore"]
