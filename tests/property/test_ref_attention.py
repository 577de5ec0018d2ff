"""harness.reference.attention: the exact tiled attention and the same-precision naive run.

The oracle is an independent float64 formulation: an explicit loop over (batch, head) with
``exp(s - max) / sum``. Agreement bounds are derived from float64 summation error
(``summation_bound``) of the score dot products and the softmax/output sums.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.reference.attention import attention, naive_attention, plan_chunks
from harness.reference.metrics import Bound, judge, summation_bound
from harness.reference.wan.config import GRID_480P, TOKENS_480P, WAN_14B

from helpers import ALLOCATOR_SLACK


def _oracle(q, k, v, scale, mask=None):
    """HND float64 attention, one (batch, head) at a time, written out."""
    b, h, s_q, _ = q.shape
    out = torch.zeros(b, h, s_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        keep = torch.ones(k.shape[2], dtype=torch.bool) if mask is None else mask[bi]
        if not keep.any():
            continue
        for hi in range(h):
            s = (q[bi, hi].double() @ k[bi, hi][keep].double().T) * scale
            w = torch.exp(s - s.max(dim=1, keepdim=True).values)
            out[bi, hi] = (w / w.sum(dim=1, keepdim=True)) @ v[bi, hi][keep].double()
    return out


def _same_math_bound(q, k, v, scale, why: str, dtype: torch.dtype = torch.float64) -> Bound:
    """Two evaluations of attention in ``dtype`` differ by at most
    2 * max|v| * (2*dS + 2*gamma_{s_k} + 4u), dS = gamma_d * scale * max(|q||k|^T) + u*max|S|:
    a perturbation dS of every score moves each normalised weight by a relative 2*dS."""
    d, s_k = q.shape[-1], k.shape[-2]
    u = torch.finfo(dtype).eps / 2
    qk = (q.double().abs() @ k.double().abs().transpose(-1, -2)).max().item() * scale
    ds = summation_bound(qk, d + 1, dtype) + u * qk
    vmax = v.double().abs().max().item()
    floor = 2 * vmax * (2 * ds + 2 * summation_bound(1.0, s_k + 1, dtype) + 4 * u)
    return Bound(k=0.0, floor=floor, why=why)


shapes = st.tuples(
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 70),
    st.integers(1, 70),
    st.sampled_from([8, 40, 64]),
    st.sampled_from([8, 24]),
)


@settings(max_examples=30)
@given(shapes, st.integers(0, 2**31 - 1), st.data())
def test_matches_independent_float64_softmax(shape, seed, data) -> None:
    b, h, s_q, s_k, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(b, h, s_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, s_k, dv, generator=g, dtype=torch.float64)
    qc = data.draw(st.integers(1, s_q), label="q_chunk")
    kc = data.draw(st.integers(1, s_k), label="k_chunk")
    scale = 1 / math.sqrt(d)
    exact = _oracle(q, k, v, scale)
    bound = _same_math_bound(q, k, v, scale, "float64 reformulation of the same math")
    for out in (attention(q, k, v), attention(q, k, v, q_chunk=qc, k_chunk=kc)):
        j = judge(out, exact, None, bound)
        assert j.passed, str(j)


def test_tiled_equals_untiled_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 40, generator=g, dtype=torch.float64) for n in (113, 239, 239))
    whole = attention(q, k, v, q_chunk=113, k_chunk=239)
    bound = _same_math_bound(q, k, v, 40**-0.5, "online-softmax tiling only reorders float64 sums")
    for qc, kc in [(1, 1), (7, 11), (64, 64), (113, 17)]:
        j = judge(attention(q, k, v, q_chunk=qc, k_chunk=kc), whole, None, bound)
        assert j.passed, f"q_chunk={qc} k_chunk={kc}\n{j}"


def test_nhd_equals_hnd() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 37, 64, generator=g)
    k = torch.randn(2, 3, 53, 64, generator=g)
    v = torch.randn(2, 3, 53, 64, generator=g)
    hnd = attention(q, k, v, layout="HND")
    nhd = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD")
    assert nhd.shape == (2, 37, 3, 64) and nhd.is_contiguous()
    j = judge(nhd.transpose(1, 2), hnd, None, _same_math_bound(q, k, v, 0.125, "layout only changes strides"))
    assert j.passed, str(j)


def test_key_padding_mask_equals_slicing() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 20, 16, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 31, 16, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 31, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 31, generator=g) > 0.4
    mask[2] = False  # a fully masked batch element: zero rows
    out = attention(q, k, v, key_padding_mask=mask, k_chunk=7)
    bound = _same_math_bound(q, k, v, 0.25, "masked keys removed vs sliced away")
    for bi in range(2):
        keep = mask[bi]
        sliced = attention(q[bi : bi + 1], k[bi : bi + 1, :, keep], v[bi : bi + 1, :, keep])
        assert judge(out[bi : bi + 1], sliced, None, bound).passed
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert judge(out, _oracle(q, k, v, 0.25, mask), None, bound).passed


def test_inputs_untouched_and_strided_inputs_accepted() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 4, 50, 2 * 32, generator=g)
    q = base[:, ::2, :, ::2]  # non-contiguous, step 2 in two dims
    k = base[:, 1::2, :, ::2]
    v = base[:, 1::2, :, 1::2]
    before = base.clone()
    out = attention(q, k, v, compute_dtype=torch.float32)
    assert torch.equal(base, before)
    assert out.dtype == torch.float32 and out.is_contiguous()
    exact = _oracle(q, k, v, 32**-0.5)
    # float32 compute: bound by the float32 versions of the same sums
    bound = _same_math_bound(q, k, v, 32**-0.5, "float32 evaluation of the same math", torch.float32)
    assert judge(out, exact, None, bound).passed


def test_naive_attention_in_float64_is_the_same_math() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, 24, generator=g, dtype=torch.float64) for n in (30, 45, 45))
    bound = _same_math_bound(q, k, v, 24**-0.5, "naive == exact at float64")
    assert judge(naive_attention(q, k, v, q_chunk=7), attention(q, k, v), None, bound).passed


def test_naive_attention_bf16_error_is_within_its_rounding_model() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).to(torch.bfloat16) for n in (113, 203, 203))
    naive = naive_attention(q, k, v)
    assert naive.dtype == torch.bfloat16 and naive.shape == (1, 2, 113, 64)
    exact = attention(q, k, v)  # float64 on the same bf16 values
    ub = 2.0**-8
    scale = 64**-0.5
    qk = (q.double().abs() @ k.double().abs().transpose(-1, -2)).max().item() * scale
    smax = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() * scale
    # q*scale rounded (ub), S rounded to bf16 (ub*|S|), fp32 dot sums; P rounded (ub);
    # P@V summed in fp32 then rounded (ub*|o|)
    ds = ub * qk + ub * smax + summation_bound(qk, 64, torch.float32)
    vmax = v.double().abs().max().item()
    floor = vmax * (2 * ds + 2 * ub + summation_bound(1.0, 203, torch.float32)) + ub * exact.abs().max().item()
    j = judge(naive, exact, None, Bound(0.0, floor, "bf16 rounding model of the naive run"))
    assert j.passed, str(j)


def test_memory_plan_keeps_wan14b_float32_under_16gib() -> None:
    b, h, s, d = 1, WAN_14B.heads, TOKENS_480P, WAN_14B.head_dim
    assert s == math.prod(GRID_480P)
    plan = plan_chunks(b, h, s, s, d, d, compute_dtype=torch.float32)
    tensor_bytes = b * h * s * d * 4
    peak = 3 * tensor_bytes + tensor_bytes + plan.workspace_bytes  # q, k, v, output, workspace
    assert peak + ALLOCATOR_SLACK <= 16 * 2**30  # what tests/gpu/test_ref_memory.py measures on CUDA
    tight = plan_chunks(b, h, s, s, d, d, compute_dtype=torch.float64, memory_budget=4 << 20)
    assert tight.head_chunk == 1 and tight.workspace_bytes <= 4 << 20
    with pytest.raises(ValueError, match="memory_budget=1000 bytes is below"):
        plan_chunks(b, h, s, s, d, d, memory_budget=1000)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(layout="BHSD"), ValueError, "layout='BHSD'"),
        (dict(key_padding_mask=torch.ones(1, 5)), TypeError, "bool tensor"),
        (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"expected \(b, s_k\) = \(1, 5\)"),
        (dict(compute_dtype=torch.float16), ValueError, "compute_dtype"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, match) -> None:
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(exc, match=match):
        attention(q, k, k, **kwargs)


def test_mismatched_heads_are_named() -> None:
    with pytest.raises(ValueError, match="only the token count may differ"):
        attention(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
