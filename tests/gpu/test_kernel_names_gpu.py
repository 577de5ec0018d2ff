"""Kernel names from the real profiler on CUDA: the raw kineto events ``record_kernels`` reads name the kernels that
``torch.profiler``'s ``FunctionEvent``s name, and an explored case's result carries them.  Skipped without CUDA by
conftest.py; the CPU half (fake events, a real CPU profile) is tests/property/test_kernel_coverage.py."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from harness.explore import Genome, build_case
from harness.runner.execute import kernel_names, profiler_events, run_case
from harness.runner.targets import get_target

pytestmark = pytest.mark.gpu


def _profiled(fn):
    prof = profile(activities=[ProfilerActivity.CUDA])
    prof.start()
    try:
        fn()
    finally:
        prof.stop()
    return prof


def test_raw_events_name_the_kernels_the_function_events_name():
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.float16)
    a = torch.randn(256, 256, device="cuda")

    def work():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (a @ a).sum()
        a.to("cpu")  # a copy: a device event, not a kernel

    work()  # first-call costs outside the profile
    prof = _profiled(work)
    events = profiler_events(prof)
    raw = kernel_names(events)
    assert raw == kernel_names(prof.events())
    assert len(raw) >= 3, raw  # attention, the matmul, the reduction
    assert any(e.name().startswith("Memcpy") for e in events)  # the copy was recorded ...
    assert not any(n.startswith(("Memcpy", "Memset")) for n in raw), raw  # ... and is not a kernel


def test_an_explored_case_carries_the_kernels_it_launched():
    target = get_target("attn.sdpa.flash")
    sizes = (("batch", 1), ("head_dim", 64), ("heads", 2), ("layout", "HND"), ("seq_k", 128), ("seq_q", 128))
    built = build_case(target, Genome(sizes, seed=3))
    run_case(built.case, "cuda")  # first-call costs
    r = run_case(built.case, "cuda")
    assert r.verdict.value == "pass", r.format()
    kernels = r.metrics.get("kernels")
    assert kernels and any("flash" in k.lower() for k in kernels), kernels
