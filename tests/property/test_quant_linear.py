"""fp8_linear on the CPU: against the _scaled_mm emulation, copy planning, allocations, no mutation, errors.

Every numeric check compares against ``harness.reference.formats.scaled_mm`` run on the *same*
quantized operands fp8_linear handed to its kernel (``LinearResult.a/b/scale_a/scale_b``), so the
measured error is the kernel's, with a bound derived from float32 summation error analysis.
"""

from __future__ import annotations

import logging
from typing import Any

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.layouts import LayoutSpec, materialize, poison_intact
from harness.quant import linear as L
from harness.quant.linear import (
    Fp8LinearError,
    copy_reasons,
    fp8_linear,
    fp8_linear_with_plan,
    last_plan,
    plan_operands,
)
from harness.reference.formats import quantize, round_to_format, scaled_mm
from harness.reference.metrics import Bound, judge
from harness.strategies import layouts, value_specs

from helpers import kernel_bound

E4M3 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------- helpers


def emulate(res: L.LinearResult, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The emulated _scaled_mm on the operands fp8_linear gave its kernel, as (M, N).

    ``bias``: the caller's bias, added to the float32 result when the output is float32 (fp8_linear's
    epilogue: _scaled_mm takes no bias with a float32 output).
    """
    out = scaled_mm(res.a, res.b, res.scale_a, res.scale_b, bias=res.bias, out_dtype=res.plan.out_dtype)
    out = out[:, : res.plan.n]
    if bias is not None and res.plan.out_dtype == torch.float32:
        out = out + bias.to(torch.float32)
    return out


def check_against_emulation(res: L.LinearResult, bias: torch.Tensor | None = None) -> None:
    emu = emulate(res, bias)
    out = res.out.reshape(emu.shape)
    j = judge(out.to(torch.float64), emu.to(torch.float64), None, kernel_bound(res, emu))
    assert j.passed, f"{j}\nplan:\n{res.plan.describe()}"


def make_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight with a power-of-two tensorwise scale (exact dequantization)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 4
    return round_to_format(w, "e4m3").to(E4M3), torch.tensor(2.0**-4)


class BigAllocations(TorchDispatchMode):
    """Records every op output with at least ``min_numel`` elements on a storage none of its inputs had."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.numel() >= self.min_numel
                and t.untyped_storage().data_ptr() not in ins
            ):
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


# ---------------------------------------------------------------------------- copy decisions from layouts

M, K, N = 32, 64, 48

# name, layout of the FP8 activation (M, K) or the weight, role, expected reason codes
DECISION_TABLE = [
    ("contiguous", LayoutSpec((M, K), "float8_e4m3fn"), "input", set()),
    ("transposed (column-major)", LayoutSpec((M, K), "float8_e4m3fn", perm=(1, 0)), "input", {"last_stride"}),
    ("last stride 2", LayoutSpec((M, K), "float8_e4m3fn", step=(1, 2)), "input", {"last_stride"}),
    ("odd leading dim", LayoutSpec((M, K), "float8_e4m3fn", pad=(0, 1)), "input", {"ld"}),
    ("offset 1 element (1 B)", LayoutSpec((M, K), "float8_e4m3fn", offset=1), "input", {"ptr"}),
    ("offset 8 elements (8 B)", LayoutSpec((M, K), "float8_e4m3fn", offset=8), "input", {"ptr"}),
    ("16-byte aligned offset", LayoutSpec((M, K), "float8_e4m3fn", offset=16), "input", set()),
    ("leading dim padded by 16", LayoutSpec((M, K), "float8_e4m3fn", pad=(0, 16)), "input", set()),
    ("K=40 not a multiple of 16", LayoutSpec((M, 40), "float8_e4m3fn"), "input", {"k_multiple", "ld"}),
    ("bf16 offset 4 elements (8 B)", LayoutSpec((M, K), "bfloat16", offset=4), "input", {"ptr"}),
    ("bf16 offset 8 elements (16 B)", LayoutSpec((M, K), "bfloat16", offset=8), "input", set()),
    ("3-D, leading dims not mergeable", LayoutSpec((2, 8, K), "float8_e4m3fn", perm=(1, 0, 2)), "input", {"rows"}),
    ("3-D contiguous", LayoutSpec((2, 8, K), "float8_e4m3fn"), "input", set()),
    ("weight contiguous", LayoutSpec((N, K), "float8_e4m3fn"), "weight", set()),
    ("weight transposed", LayoutSpec((N, K), "float8_e4m3fn", perm=(1, 0)), "weight", {"last_stride"}),
    ("weight N=40", LayoutSpec((40, K), "float8_e4m3fn"), "weight", {"n_multiple"}),
    ("weight offset 4 (4 B)", LayoutSpec((N, K), "float8_e4m3fn", offset=4), "weight", {"ptr"}),
]


@pytest.mark.parametrize("name,spec,role,codes", DECISION_TABLE, ids=[r[0] for r in DECISION_TABLE])
def test_copy_reasons_table(name: str, spec: LayoutSpec, role: str, codes: set[str]) -> None:
    got = copy_reasons(spec, role, rules="cuda")
    assert {r.code for r in got} == codes, [r.message for r in got]
    # the same answer from a real tensor with that layout (pointer alignment read from data_ptr)
    t = materialize(spec, torch.zeros(spec.shape))
    assert {r.code for r in copy_reasons(t, role, rules="cuda")} == codes
    # the CPU kernel and the emulation take any layout whose rows merge
    assert {r.code for r in copy_reasons(spec, role, rules="none")} <= {"rows"}


def test_copy_reasons_name_the_value() -> None:
    (r,) = copy_reasons(LayoutSpec((M, K), "float8_e4m3fn", offset=8), "input")
    assert "8-byte aligned" in r.message and "storage offset 8" in r.message and "needs 16" in r.message
    (r,) = copy_reasons(LayoutSpec((M, K), "float8_e4m3fn", pad=(0, 1)), "input")
    assert "65 elements" in r.message


@pytest.mark.parametrize(
    "name,spec,role,codes",
    [r for r in DECISION_TABLE if r[2] == "input"],
    ids=[r[0] for r in DECISION_TABLE if r[2] == "input"],
)
def test_plan_copies_fp8_input_only_when_required(name: str, spec: LayoutSpec, role: str, codes: set[str]) -> None:
    k = spec.shape[-1]
    w = LayoutSpec((N, k), "float8_e4m3fn")
    plan = plan_operands(spec, w, backend="cuda")
    d = plan.decision("input")
    if spec.dtype == "float8_e4m3fn":
        assert d.action == ("copy" if codes else "use")
        assert plan.copies == (1 if codes else 0) + (1 if k % 16 else 0)  # + the padded weight
    else:  # a high-precision input is quantized anyway: the cast is the realignment, no extra copy
        assert d.action == "quantize" and plan.copies == 0
        assert {r.code for r in d.absorbed} == codes


def test_plan_for_high_precision_weight_is_rowwise_and_pads() -> None:
    plan = plan_operands(LayoutSpec((4, 40), "bfloat16"), LayoutSpec((24, 40), "bfloat16"), backend="cuda")
    assert plan.scaling == "rowwise" and plan.input_scaling == "dynamic-row"
    assert (plan.k_padded, plan.n_padded) == (48, 32)
    assert plan.decision("weight").action == "quantize"
    assert "compact output" in plan.epilogue
    plan_cpu = plan_operands(LayoutSpec((4, 40), "bfloat16"), LayoutSpec((24, 40), "bfloat16"), backend="cpu")
    assert (plan_cpu.k_padded, plan_cpu.n_padded) == (40, 24) and plan_cpu.copies == 0


# ---------------------------------------------------------------------------- numerics against the emulation


@pytest.mark.parametrize("backend", ["cpu", "emulate"])
@pytest.mark.parametrize("weight_kind", ["fp8-tensor", "fp8-row", "fp8-none", "bf16"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_matches_emulation_on_same_operands(backend: str, weight_kind: str, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g)
    w8, sw = make_weight(N, K)
    if weight_kind == "fp8-tensor":
        args = (w8, sw)
    elif weight_kind == "fp8-row":
        args = (w8, torch.rand(N, generator=g) + 0.5)
    elif weight_kind == "fp8-none":
        args = (w8, None)
    else:
        args = (torch.randn(N, K, generator=g).to(torch.bfloat16), None)
    res = fp8_linear_with_plan(x, *args, bias=bias, out_dtype=out_dtype, backend=backend, rules="cuda")
    assert res.backend_used == backend and res.out.shape == (2, 7, N) and res.out.dtype == out_dtype
    if backend == "emulate":
        # the emulation backend *is* scaled_mm on those operands: bitwise
        assert torch.equal(res.out.reshape(-1, N), emulate(res, bias))
    check_against_emulation(res, bias)
    assert last_plan() is res.plan


def test_quantized_activation_is_the_reference_quantization() -> None:
    """The FP8 copy of x is exactly round_to_format(x / scale) with the dynamic amax/448 scale."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, K, generator=g) * torch.logspace(-3, 2, K)).to(torch.bfloat16)
    w8, sw = make_weight(N, K)
    res = fp8_linear_with_plan(x, w8, sw, backend="emulate")
    s = res.scale_a.reshape(())
    assert float(s) >= float(x.float().abs().max()) / 448  # never saturates by construction
    want = round_to_format(x.float() / s, "e4m3")
    assert torch.equal(res.a.float(), want)
    # rowwise: one scale per row
    res_r = fp8_linear_with_plan(x, w8, torch.ones(N), backend="emulate")
    want_r = round_to_format(x.float() / res_r.scale_a, "e4m3")
    assert torch.equal(res_r.a.float(), want_r)
    # and it matches the reference scheme's own quantization up to the scale's one-ULP nudge
    ref = quantize(x.float(), "e4m3", granularity="row", axis=-1).scale.reshape(res_r.scale_a.shape)
    nudged = torch.nextafter(ref, torch.full_like(ref, math.inf))
    assert ((res_r.scale_a == ref) | (res_r.scale_a == nudged)).all()


def test_accuracy_vs_exact_is_that_of_the_emulated_scheme() -> None:
    """Against exact float64, fp8_linear errs no more than the emulated scheme (+ the kernel's own slack)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, K, generator=g).to(torch.bfloat16)
    w8, sw = make_weight(N, K)
    res = fp8_linear_with_plan(x, w8, sw, out_dtype=torch.float32)
    exact = x.to(torch.float64).reshape(-1, K) @ (w8.to(torch.float64) * float(sw)).T
    qx = quantize(x.float().reshape(-1, K), "e4m3", granularity="tensor")
    scheme = scaled_mm(qx.values, w8.t(), qx.scale, sw, out_dtype=torch.float32)
    kb = kernel_bound(res, scheme)
    bound = Bound(k=1.0, floor=kb.floor, why="the emulated per-tensor E4M3 scheme's error + " + kb.why)
    j = judge(res.out.reshape(-1, N).to(torch.float64), exact, scheme.to(torch.float64), bound)
    assert j.passed, str(j)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_layout_matches_emulation_and_is_not_mutated(data: Any) -> None:
    rank = data.draw(st.sampled_from([2, 3]), label="rank")
    k = data.draw(st.sampled_from([16, 40, 64]), label="K")
    n = data.draw(st.sampled_from([16, 24, 48]), label="N")
    dtype = data.draw(st.sampled_from(["bfloat16", "float8_e4m3fn", "float32"]), label="dtype")
    shape = (5, k) if rank == 2 else (2, 3, k)
    spec = data.draw(layouts(shape, dtype, views=True), label="input layout")
    vspec = data.draw(
        value_specs(kinds=["normal", "outliers", "zero_blocks", "constant_rows", "fp8_edge"]), label="values"
    )
    vals = vspec.generate(shape, torch.float32)
    if dtype == "float8_e4m3fn":
        vals = round_to_format(vals.clamp(-448, 448), "e4m3")
    x = materialize(spec, vals)
    before = x.clone()
    w8, sw = make_weight(n, k, seed=data.draw(st.integers(0, 3), label="weight seed"))
    wspec = data.draw(layouts((n, k), "float8_e4m3fn"), label="weight layout")
    w = materialize(wspec, w8.float())
    rules = data.draw(st.sampled_from(["cuda", None]), label="rules")
    res = fp8_linear_with_plan(x, w, sw, input_scale=0.5 if dtype == "float8_e4m3fn" else None, rules=rules)
    # nothing the caller owns was written, inside or outside the views
    assert torch.equal(
        x.view(torch.uint8) if x.element_size() == 1 else x,
        before.view(torch.uint8) if before.element_size() == 1 else before,
    )
    assert poison_intact(x, spec) and poison_intact(w, wspec)
    # the plan copied the FP8 input iff the rules found a reason
    d = res.plan.decision("input")
    if dtype == "float8_e4m3fn":
        reasons = copy_reasons(x, "input", rules=res.plan.rules)
        assert (d.action == "copy") == bool(reasons)
    assert res.out.shape == shape[:-1] + (n,) and res.out.is_contiguous()
    check_against_emulation(res)


def test_padding_k_and_n_gives_the_unpadded_result() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 40, generator=g).to(torch.bfloat16)
    w8, sw = make_weight(24, 40)
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    padded = fp8_linear_with_plan(x, w8, sw, bias=bias, rules="cuda")
    plain = fp8_linear_with_plan(x, w8, sw, bias=bias, rules="none")
    assert (padded.plan.k_padded, padded.plan.n_padded) == (48, 32) and padded.a.shape == (6, 48)
    assert torch.equal(padded.a[:, 40:].float(), torch.zeros(6, 8))  # zero padding: adds nothing
    assert padded.out.shape == plain.out.shape == (6, 24) and padded.out.is_contiguous()
    j = judge(padded.out.double(), plain.out.double(), None, kernel_bound(plain, plain.out.reshape(6, 24)))
    assert j.passed, str(j)


@pytest.mark.parametrize("rules", ["none", "cuda"])
@pytest.mark.parametrize("view", ["stride0", "step2"])
def test_a_strided_bias_gives_the_dense_bias_result(rules: str, view: str) -> None:
    """CPU ``torch._scaled_mm`` reads its bias as packed whatever its strides (found by harness.explore on
    torch 2.13): a stride-0 bias reads past its one element, a step-2 bias reads the poison between its
    elements.  fp8_linear copies such a bias, so the result is bitwise that of the same values packed."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, K, generator=g).to(torch.bfloat16)
    w8, sw = make_weight(N, K)
    if view == "stride0":
        spec = LayoutSpec(shape=(N,), dtype="bfloat16", broadcast=(0,))
        values = torch.full((N,), 0.75)
    else:
        spec = LayoutSpec(shape=(N,), dtype="bfloat16", step=(2,))
        values = torch.randn(N, generator=g)
    bias = materialize(spec, values)
    assert bias.stride() != (1,)
    res = fp8_linear_with_plan(x, w8, sw, bias=bias, rules=rules)
    dense = fp8_linear_with_plan(x, w8, sw, bias=bias.contiguous(), rules=rules)
    assert any(r.code == "contiguity" for d in res.plan.decisions if d.role == "bias" for r in d.reasons)
    assert torch.equal(res.out, dense.out) and poison_intact(bias, spec)


# ---------------------------------------------------------------------------- saturation and mutation


def test_static_scale_saturates_a_copy_not_the_callers_tensor() -> None:
    x = torch.tensor([[1.0, -2.0, 500.0, -1e4] + [0.5] * 12], dtype=torch.bfloat16)
    before = x.clone()
    w8, sw = make_weight(16, 16)
    res = fp8_linear_with_plan(x, w8, sw, input_scale=1.0, backend="emulate")
    assert torch.equal(x, before)  # the caller keeps 500 and -1e4
    assert res.a.float()[0, :4].tolist() == [1.0, -2.0, 448.0, -448.0]  # clamped on the copy, never NaN
    assert torch.isfinite(res.out).all()


def test_dynamic_scale_keeps_large_values_in_range() -> None:
    x = torch.tensor([[1e4, -3e3, 1.0, 2.0] * 4], dtype=torch.float32)
    w8, sw = make_weight(16, 16)
    res = fp8_linear_with_plan(x, w8, sw, backend="emulate")
    assert res.a.float().abs().max() == 448.0 and torch.isfinite(res.out).all()
    assert torch.equal(x, torch.tensor([[1e4, -3e3, 1.0, 2.0] * 4]))


def test_nonfinite_amax_poisons_its_scaling_group_only() -> None:
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    w8, sw = make_weight(16, 32)
    rowwise = fp8_linear(x, w8, torch.ones(16), backend="emulate")
    assert torch.isnan(rowwise[1]).all() and torch.isfinite(rowwise[[0, 2, 3]]).all()
    tensorwise = fp8_linear(x, w8, sw, backend="emulate")
    assert torch.isnan(tensorwise).all()  # documented: one scale for the tensor, so every output goes NaN


# ---------------------------------------------------------------------------- copies and allocations

MA, KA, NA = 64, 64, 48
_THRESHOLD = min(MA * KA, MA * NA, NA * KA) // 2  # above every scale and bias, below every operand


def _count(fn) -> list:
    with BigAllocations(_THRESHOLD) as mode:
        fn()
    return mode.seen


@pytest.mark.parametrize(
    "spec,extra",
    [
        (LayoutSpec((2, 32, KA), "bfloat16"), 0),
        (LayoutSpec((2, 32, KA), "bfloat16", offset=1), 0),  # misaligned: absorbed by the quantizing cast
        (LayoutSpec((2, 32, KA), "bfloat16", perm=(2, 0, 1)), 0),  # transposed: absorbed too
        (LayoutSpec((2, 32, KA), "float8_e4m3fn"), 0),
        (LayoutSpec((2, 32, KA), "float8_e4m3fn", offset=8), 1),  # FP8 input misaligned: one realigning copy
        (LayoutSpec((2, 32, KA), "float8_e4m3fn", step=(1, 1, 2)), 1),
    ],
    ids=["bf16-aligned", "bf16-offset1", "bf16-transposed", "fp8-aligned", "fp8-offset8", "fp8-stride2"],
)
def test_allocations_are_the_cast_and_the_output_plus_required_copies(spec: LayoutSpec, extra: int) -> None:
    vals = torch.randn(spec.shape).clamp(-400, 400)
    x = materialize(spec, round_to_format(vals, "e4m3") if spec.dtype == "float8_e4m3fn" else vals)
    w8, sw = make_weight(NA, KA)
    seen = _count(
        lambda: fp8_linear(x, w8, sw, input_scale=1.0 if spec.dtype == "float8_e4m3fn" else None, rules="cuda")
    )
    plan = last_plan()
    base = (1 if spec.dtype != "float8_e4m3fn" else 0) + 1  # the FP8 cast (when quantizing) + the output
    assert plan.copies == extra
    assert len(seen) == base + extra, seen


def test_aligned_bf16_input_allocates_exactly_the_cast_and_the_output() -> None:
    x = torch.randn(2, 32, KA, dtype=torch.bfloat16)
    w8, sw = make_weight(NA, KA)
    seen = _count(lambda: fp8_linear(x, w8, sw))
    assert [(s, d) for _, s, d in seen] == [((2, 32, KA), E4M3), ((64, NA), torch.bfloat16)], seen


def test_padding_costs_one_copy_per_padded_operand() -> None:
    x = torch.randn(MA, KA, dtype=torch.bfloat16)
    w8, sw = make_weight(40, KA)  # N=40 -> padded weight copy + compacted output
    seen = _count(lambda: fp8_linear(x, w8, sw, rules="cuda"))
    plan = last_plan()
    assert plan.copied_roles == ("weight",) and "compact output" in plan.epilogue and plan.copies == 2
    assert len(seen) == 2 + plan.copies, seen


def test_debug_log_names_the_requirement(caplog: pytest.LogCaptureFixture) -> None:
    spec = LayoutSpec((4, KA), "float8_e4m3fn", offset=8)
    x = materialize(spec, torch.ones(spec.shape))
    w8, sw = make_weight(NA, KA)
    with caplog.at_level(logging.DEBUG, logger="harness.quant.linear"):
        fp8_linear(x, w8, sw, rules="cuda")
    text = caplog.text
    assert "input: copy" in text and "8-byte aligned" in text and "backend" in text


def test_tuple_return_of_old_torch_is_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch._scaled_mm

    def old_style(*a, **kw):
        out = real(*a, **kw)
        return out, torch.tensor(0.0)

    monkeypatch.setattr(torch, "_scaled_mm", old_style)
    L._cpu_scaled_mm_supports.cache_clear()
    try:
        x = torch.randn(4, 32)
        w8, sw = make_weight(16, 32)
        out = fp8_linear(x, w8, sw, backend="cpu")
        assert isinstance(out, torch.Tensor) and out.shape == (4, 16)
    finally:
        L._cpu_scaled_mm_supports.cache_clear()


def test_without_cpu_scaled_mm_it_says_so_and_emulates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "_scaled_mm")
    L._cpu_scaled_mm_supports.cache_clear()
    try:
        res = fp8_linear_with_plan(torch.randn(4, 32), *make_weight(16, 32))
        assert res.backend_used == "emulate" and "has no torch._scaled_mm" in res.plan.backend_reason
        with pytest.raises(Fp8LinearError, match="has no torch._scaled_mm"):
            fp8_linear(torch.randn(4, 32), *make_weight(16, 32), backend="cpu")
    finally:
        L._cpu_scaled_mm_supports.cache_clear()


# ---------------------------------------------------------------------------- errors

_W8 = make_weight(16, 32)[0]
ERRORS = [
    (dict(input=torch.randn(4, 31), weight=_W8), r"input has 31 features .* in_features=32"),
    (dict(input=torch.randn(4, 32), weight=_W8[0]), r"weight must be 2-D .* got shape \(32,\)"),
    (dict(input=torch.ones(4, 32, dtype=torch.int32), weight=_W8), r"input dtype torch.int32"),
    (dict(input=torch.randn(4, 32), weight=_W8.to(torch.float8_e5m2)), r"float8_e5m2 is not supported"),
    (dict(input=torch.randn(4, 32), weight=_W8, weight_scale=torch.ones(3)), r"weight_scale has shape \(3,\)"),
    (dict(input=torch.randn(4, 32), weight=_W8, bias=torch.ones(15)), r"bias has shape \(15,\); expected \(16,\)"),
    (dict(input=torch.randn(4, 32), weight=_W8, out_dtype=torch.int8), r"out_dtype=torch.int8"),
    (dict(input=torch.randn(4, 32), weight=_W8, input_scale=-1.0), r"input_scale=-1.0 must be positive"),
    (
        dict(input=torch.randn(4, 32), weight=torch.randn(16, 32), weight_scale=torch.ones(())),
        r"weight_scale was given for a torch.float32 weight",
    ),
    (dict(input=torch.tensor(1.0), weight=_W8), r"input is 0-d"),
]


@pytest.mark.parametrize("kwargs,match", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_bad_arguments_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(Fp8LinearError, match=match):
        fp8_linear(**kwargs)


def test_static_scale_tensor_that_is_not_positive_is_rejected() -> None:
    with pytest.raises(Fp8LinearError, match=r"input_scale=0.0 must be positive"):
        fp8_linear(torch.randn(4, 32), _W8, input_scale=torch.tensor(0.0))


def test_select_backend_rejects_unknown_and_mismatched_devices() -> None:
    with pytest.raises(Fp8LinearError, match="backend='gpu'"):
        L.select_backend("cpu", "tensorwise", "gpu")
    with pytest.raises(Fp8LinearError, match="backend='cuda' requested but the tensors are on cpu"):
        L.select_backend("cpu", "tensorwise", "cuda")
    assert L.select_backend("cpu", "tensorwise", "emulate")[0] == "emulate"


def test_the_cuda_cast_takes_1d_blocks_only_for_one_dense_run() -> None:
    from harness.quant._triton_quant import cast_is_flat

    x = torch.zeros(6, 40, dtype=torch.bfloat16)
    q = torch.zeros(6, 40, dtype=torch.float8_e4m3fn)
    assert cast_is_flat(x, q)
    assert not cast_is_flat(x, torch.zeros(6, 48, dtype=torch.float8_e4m3fn), k_padded=48)  # padded columns
    assert not cast_is_flat(torch.zeros(6, 48, dtype=torch.bfloat16)[:, :40], q)  # rows 48 apart
    assert not cast_is_flat(torch.zeros(40, 6, dtype=torch.bfloat16).t(), q)  # columns not adjacent
    assert cast_is_flat(torch.zeros(1, 48, dtype=torch.bfloat16)[:, :40], q[:1])  # one row is one run
