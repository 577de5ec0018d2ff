"""Layout-safe attention on the CPU: the fewest copies, recorded; inputs never written; layout invariance."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.layouts import LayoutSpec, data_ptr_alignment, materialize, poison_intact
from harness.quant.attention import UnsupportedInput, aligned_copy, plan_attention, safe_attention
from harness.quant.backends import BACKENDS, AttentionBackend, Requirements, get_backend, register_backend
from harness.strategies import attention_inputs

from helpers import hard_permutation_attention

B_, H_, S_, D_ = 1, 2, 24, 64


def _spec(**kw: Any) -> LayoutSpec:
    return LayoutSpec((B_, H_, S_, D_), "bfloat16", **kw)


# a strict CUDA-like backend on the CPU: needs last-dim stride 1 and 16-byte alignment, HND only,
# writes k in place (k -= mean(k), like SageAttention 1), and computes via the math SDPA kernel
def _strict_runner(q, k, v, layout, **kw):
    assert layout == "HND" and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    for t in (q, k, v):
        assert data_ptr_alignment(t) >= 16
        assert all((s * t.element_size()) % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1)
    if kw.get("smooth_k", True):
        k -= k.mean(dim=2, keepdim=True)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


STRICT = AttentionBackend(
    "test.strict",
    "strict CPU stand-in for a CUDA kernel",
    Requirements(
        device="cpu",
        layouts=("HND",),
        last_dim_stride_one=True,
        alignment=16,
        modifies_inputs=("k",),
        modifies_unless=("smooth_k", False),
    ),
    runner=_strict_runner,
)


@pytest.fixture(autouse=True)
def _strict_registered():
    register_backend(STRICT, replace=True)
    yield
    BACKENDS.pop("test.strict", None)


PLAN_TABLE = [
    ("contiguous", _spec(), "HND", {"k": "copy"}),  # only the write protection
    ("offset 1 element (2 B)", _spec(offset=1), "HND", {"q": "copy", "k": "copy", "v": "copy"}),
    ("offset 8 elements (16 B)", _spec(offset=8), "HND", {"k": "copy"}),
    ("last-dim stride 2", _spec(step=(1, 1, 1, 2)), "HND", {"q": "copy", "k": "copy", "v": "copy"}),
    ("odd token stride", _spec(pad=(0, 0, 0, 1)), "HND", {"q": "copy", "k": "copy", "v": "copy"}),
]


@pytest.mark.parametrize("name,spec,layout,want", PLAN_TABLE, ids=[r[0] for r in PLAN_TABLE])
def test_plan_table(name: str, spec: LayoutSpec, layout: str, want: dict[str, str]) -> None:
    acts = plan_attention("test.strict", spec, spec, spec, layout)
    got = {a.tensor: a.action for a in acts if a.is_copy}
    assert got == want, [str(a) for a in acts]
    # one copy per tensor at most, however many requirements it misses
    assert len([a for a in acts if a.is_copy]) == len({a.tensor for a in acts if a.is_copy})


def test_nhd_for_an_hnd_backend_is_a_view_not_a_copy() -> None:
    nhd = LayoutSpec((B_, S_, H_, D_), "bfloat16")
    acts = plan_attention("test.strict", nhd, nhd, nhd, "NHD", smooth_k=False)
    assert [a.action for a in acts] == ["transpose"] * 3 + ["transpose"]
    assert acts[-1].tensor == "out"


def test_smooth_k_false_needs_no_protection() -> None:
    assert plan_attention("test.strict", _spec(), _spec(), _spec(), "HND", smooth_k=False) == []
    assert plan_attention("sage1.sageattn", _spec(), _spec(), _spec(), "HND", smooth_k=False) == []
    acts = plan_attention("sage1.sageattn", _spec(), _spec(), _spec(), "HND")
    assert [(a.tensor, a.action) for a in acts] == [("k", "copy")] and "writes to its k input" in acts[0].why


def test_misaligned_reason_names_the_alignment() -> None:
    (a,) = [x for x in plan_attention("test.strict", _spec(offset=2), _spec(), _spec(), "HND", smooth_k=False)]
    assert a.tensor == "q" and "4-byte aligned" in a.why and "needs 16" in a.why


def test_contiguous_does_not_realign_but_aligned_copy_does() -> None:
    spec = _spec(offset=1)
    x = materialize(spec, torch.randn(spec.shape))
    assert x.is_contiguous() and data_ptr_alignment(x.contiguous()) == 2  # the defect
    y = aligned_copy(x)
    assert data_ptr_alignment(y) >= 16 and torch.equal(y, x)


@settings(max_examples=30, deadline=None)
@given(inp=attention_inputs(), smooth=st.booleans())
def test_any_layout_runs_unmutated_and_layout_invariant(inp: Any, smooth: bool) -> None:
    """The strict backend (which asserts its requirements) runs on any drawn layout through the wrapper;
    the caller's q/k/v are untouched; the result equals the one on plain contiguous copies."""
    g = torch.Generator().manual_seed(inp.batch * 7 + inp.seq_q)
    tensors = {}
    for name in ("q", "k", "v"):
        spec = getattr(inp, name)
        tensors[name] = (spec, materialize(spec, torch.randn(spec.shape, generator=g)))
    q, k, v = (tensors[n][1] for n in ("q", "k", "v"))
    before = [t.clone() for t in (q, k, v)]
    out, actions = safe_attention("test.strict", q, k, v, inp.tensor_layout, smooth_k=smooth)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t, b)
    for name in ("q", "k", "v"):
        assert poison_intact(tensors[name][1], tensors[name][0])
    plain = [t.contiguous().clone() for t in (q, k, v)]
    ref, _ = safe_attention("test.strict", *plain, inp.tensor_layout, smooth_k=smooth)
    assert torch.equal(out, ref)
    assert out.shape == q.shape[:-1] + (v.shape[-1],)


def test_raw_backend_mutates_k_and_the_wrapper_prevents_it() -> None:
    q, k, v = (torch.randn(B_, H_, S_, D_, dtype=torch.bfloat16) + 3 for _ in range(3))
    k0 = k.clone()
    safe_attention("test.strict", q, k, v, "HND")
    assert torch.equal(k, k0)
    get_backend("test.strict").run(q, k, v, "HND")  # raw: the defect reaches the caller
    assert not torch.equal(k, k0)


@pytest.mark.parametrize("backend", ["sdpa.math", "emu.exact", "emu.sage1"])
def test_real_cpu_backends_through_the_wrapper_match_plain_inputs(backend: str) -> None:
    spec = LayoutSpec((1, 40, 2, 64), "bfloat16", perm=(0, 2, 1, 3), offset=3)  # NHD view of HND memory, misaligned
    vals = [torch.randn(spec.shape) for _ in range(3)]
    q, k, v = (materialize(spec, x) for x in vals)
    out, _ = safe_attention(backend, q, k, v, "NHD")
    plain = [x.to(torch.bfloat16) for x in vals]
    ref, _ = safe_attention(backend, *plain, "NHD")
    assert torch.equal(out, ref)
    # and the answer itself, from an oracle that computes no attention (the wrapper's copy could be wrong both ways)
    *qkv, want = (t.transpose(1, 2) for t in hard_permutation_attention(heads=2, seq=40, head_dim=64, seed=5))
    out, _ = safe_attention(backend, *(materialize(spec, x) for x in qkv), "NHD")
    assert torch.equal(out.float(), want.float())


def test_unsupported_inputs_raise_with_the_value() -> None:
    q = torch.zeros(1, 2, 16, 80, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedInput, match="head_dim 80 not supported by sage1.sageattn"):
        safe_attention("sage1.sageattn", q, q, q, "HND")
    with pytest.raises(UnsupportedInput, match="layout='BSHD'"):
        safe_attention("emu.exact", q, q, q, "BSHD")
    with pytest.raises(UnsupportedInput, match=r"q has shape \(2, 16, 80\)"):
        safe_attention("emu.exact", q[0], q, q, "HND")
