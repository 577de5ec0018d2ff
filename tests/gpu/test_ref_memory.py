"""The reference attention on CUDA: memory stays within ``plan_chunks``' formula, TF32 stays off.

Skipped without CUDA by conftest.py (the reason names what is missing). The full Wan-14B size
is measured by ``scripts/gpu_reference_memory.py``; here a smaller size checks the formula (that the
formula keeps Wan-14B under 16 GiB is arithmetic: tests/property/test_ref_attention.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.reference.attention import attention, plan_chunks
from harness.reference.metrics import Bound, cosine, judge, summation_bound

from helpers import ALLOCATOR_SLACK

pytestmark = pytest.mark.gpu


def _fresh(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_peak_memory_within_formula(layout: str, compute: torch.dtype) -> None:
    b, h, s, d = 1, 8, 8192, 128
    budget = 128 << 20
    w = torch.randn(1, 2, 256, d, device="cuda", dtype=compute)
    attention(w, w, w, compute_dtype=compute)  # kernels + cuBLAS workspace outside the measurement
    shape = (b, h, s, d) if layout == "HND" else (b, s, h, d)
    q, k, v = _fresh(shape, torch.bfloat16, 0)  # bf16 in: exercises the tile-wise upcast
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = attention(q, k, v, layout=layout, compute_dtype=compute, memory_budget=budget)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    plan = plan_chunks(b, h, s, s, d, d, compute_dtype=compute, memory_budget=budget)
    out_bytes = out.numel() * out.element_size()
    allowed = out_bytes + plan.workspace_bytes + ALLOCATOR_SLACK
    assert out_bytes <= extra <= allowed, (
        f"peak above inputs {extra} B, formula allows {allowed} B (output {out_bytes}, workspace "
        f"{plan.workspace_bytes}, plan {plan})"
    )
    assert plan.workspace_bytes <= budget


def _float32_bound(q, k, v) -> Bound:
    d, s_k = q.shape[-1], k.shape[-2]
    qk = (q.double().abs() @ k.double().abs().transpose(-1, -2)).max().item() / math.sqrt(d)
    u = 2.0**-24
    ds = summation_bound(qk, d + 1, torch.float32) + u * qk
    floor = 2 * v.abs().max().item() * (2 * ds + 2 * summation_bound(1.0, s_k + 1, torch.float32) + 4 * u)
    return Bound(0.0, floor, "IEEE float32 evaluation; TF32 (10-bit mantissa) would exceed it")


def _tf32_probe(device: str):
    """Keys that differ only in a bit TF32 drops: k = 512*(1 + 2**-12) vs 512 (TF32 keeps 10
    mantissa bits). In IEEE float32 the score gap is 128*512*2**-12/sqrt(128) = sqrt(2), so the
    output (v = 1 on the first group, 0 on the second) is sigmoid(sqrt(2)) ~ 0.80; with TF32
    both keys round to 512 and the output is 0.5."""
    n, d = 256, 128
    q = torch.ones(1, 1, n, d, device=device)
    k = torch.full((1, 1, n, d), 512.0, device=device)
    k[:, :, 0::2] *= 1 + 2.0**-12
    v = torch.zeros(1, 1, n, d, device=device)
    v[:, :, 0::2] = 1.0
    return q, k, v


def test_float32_on_cuda_ignores_a_global_tf32_setting() -> None:
    q, k, v = _tf32_probe("cuda")
    exact = attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
    bound = _float32_bound(q.cpu(), k.cpu(), v.cpu())
    tf32_like = attention(q.cpu(), torch.full_like(k.cpu(), 512.0), v.cpu(), compute_dtype=torch.float32)
    assert not judge(tf32_like, exact, None, bound).passed  # the probe can tell the two apart
    m = torch.backends.cuda.matmul
    new_api = hasattr(m, "fp32_precision")
    old = m.fp32_precision if new_api else m.allow_tf32
    try:
        if new_api:
            m.fp32_precision = "tf32"
        else:
            m.allow_tf32 = True
        out = attention(q, k, v, compute_dtype=torch.float32)
        restored = m.fp32_precision if new_api else m.allow_tf32
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old
    assert restored == ("tf32" if new_api else True)
    j = judge(out.cpu(), exact, None, bound)
    assert j.passed, f"TF32 leaked into the reference (TF32 would give 0.5):\n{j}"


def test_sage_emulations_run_on_cuda() -> None:
    from harness.reference.sage import sage_v1, sage_v2, sage_v3

    q, k, v = _fresh((1, 2, 300, 128), torch.bfloat16, 2)
    exact = attention(q, k, v)
    for name, fn, floor in (("v1", sage_v1, 0.99), ("v2", sage_v2, 0.99)):
        out = fn(q, k, v)
        assert out.is_cuda and cosine(out, exact) >= floor, name
    assert sage_v3(q, k, v).is_cuda
