"""harness.reference.formats: exact FP8/FP4 rounding, scaled quantization, block formats, scaled_mm.

Oracles are independent of the code under test: torch's own float8 casts (in range, where
torch 2.13's CPU cast is round-to-nearest-even), a nearest-neighbour search over the format's
value table with ties broken to the even code, and Python's ``math`` for exponents.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.reference import formats as fm
from harness.reference.metrics import summation_bound, ulp

FP8 = [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)]


def _positive_table(fmt: str) -> torch.Tensor:
    """Non-negative values of ``fmt`` from the bit layout; index == bit pattern (parity = mantissa LSB)."""
    info = fm.FORMATS[fmt]
    vals = []
    for code in range(2 ** (info.exp_bits + info.man_bits)):
        e, m = divmod(code, 2**info.man_bits)
        v = m * 2.0 ** (info.emin - info.man_bits) if e == 0 else (1 + m / 2**info.man_bits) * 2.0 ** (e - info.bias)
        if v > info.max:
            break
        vals.append(v)
    return torch.tensor(vals, dtype=torch.float64)


def _oracle_round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Nearest table value, ties to the even code, saturating; float64 in and out."""
    table = _positive_table(fmt)
    a = x.abs().clamp(max=table[-1].item())
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    r = torch.where(pick_hi, table[hi], table[lo])
    return torch.copysign(r, x)


def _neighbourhood(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Every finite value, every midpoint between neighbours, and one step either side of each midpoint."""
    v = fm.representable_values(fmt, dtype=torch.float64)
    mids = ((v[1:] + v[:-1]) / 2).to(dtype)
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    return torch.cat([v.to(dtype), mids, up, down])


# --- rounding ----------------------------------------------------------------


@pytest.mark.parametrize("fmt,tdt", FP8)
def test_rounding_matches_torch_cast_on_every_neighbourhood(fmt: str, tdt: torch.dtype) -> None:
    x = _neighbourhood(fmt, torch.float32)
    ours = fm.round_to_format(x, fmt)
    theirs = x.to(tdt).to(torch.float32)
    bad = ours != theirs
    assert not bad.any(), (
        f"{fmt}: {int(bad.sum())} mismatches, e.g. x={x[bad][:4].tolist()} ours={ours[bad][:4].tolist()} torch={theirs[bad][:4].tolist()}"
    )


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1"])
def test_rounding_matches_table_oracle_in_float64(fmt: str) -> None:
    # float64 neighbourhoods are one float64 step off the midpoint: only an exact method gets them
    x = _neighbourhood(fmt, torch.float64)
    ours = fm.round_to_format(x, fmt)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, _oracle_round(x, fmt))


@settings(max_examples=50)
@given(st.sampled_from(["e4m3", "e5m2", "e2m1"]), st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6))
def test_rounding_matches_oracle_on_random_values(fmt: str, seed: int, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(257, generator=g, dtype=torch.float64) * spread
    assert torch.equal(fm.round_to_format(x, fmt), _oracle_round(x, fmt))


SATURATION = [
    # (format, input, expected)
    ("e4m3", 449.0, 448.0),
    ("e4m3", 464.0, 448.0),
    ("e4m3", 480.0, 448.0),
    ("e4m3", 1e4, 448.0),
    ("e4m3", math.inf, 448.0),
    ("e4m3", -math.inf, -448.0),
    ("e4m3", -500.0, -448.0),
    ("e5m2", 61440.0, 57344.0),
    ("e5m2", 1e9, 57344.0),
    ("e5m2", math.inf, 57344.0),
    ("e2m1", 7.0, 6.0),
    ("e2m1", 1e30, 6.0),
    ("e2m1", -math.inf, -6.0),
]


@pytest.mark.parametrize("fmt,x,expected", SATURATION)
def test_beyond_range_saturates(fmt: str, x: float, expected: float) -> None:
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        out = fm.round_to_format(torch.tensor([x], dtype=dt), fmt)
        assert out.item() == expected, (fmt, x, dt, out.item())


def test_nan_propagates_and_signed_zero_is_kept() -> None:
    out = fm.round_to_format(torch.tensor([math.nan, -0.0, 0.0, -1e-30]), "e4m3")
    assert math.isnan(out[0].item())
    assert torch.equal(torch.signbit(out[1:]), torch.tensor([True, False, True]))
    assert (out[1:] == 0).all()


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1"])
def test_input_extremes_of_every_dtype(fmt: str, dt: torch.dtype) -> None:
    # the input dtype's own subnormals are far below every format's quantum: they become zeros of
    # their sign; its largest finite values and infinities saturate; NaN stays NaN; dtype is kept
    fi, fmax = torch.finfo(dt), fm.FORMATS[fmt].max
    tiny = fi.smallest_normal * fi.eps  # smallest subnormal
    x = torch.tensor([tiny, -tiny, 3 * tiny, fi.max, -fi.max, math.inf, -math.inf, math.nan], dtype=dt)
    out = fm.round_to_format(x, fmt)
    assert out.dtype == dt
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.signbit(out[:3]).tolist() == [False, True, False]
    assert out[3:7].tolist() == [fmax, -fmax, fmax, -fmax]
    assert math.isnan(out[7].item())


def test_e2m1_grid_is_exactly_the_fifteen_values() -> None:
    expected = sorted({s * v for s in (-1, 1) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)})
    assert fm.representable_values("e2m1").tolist() == expected
    assert len(expected) == 15
    dense = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    assert set(fm.round_to_format(dense, "e2m1").tolist()) == set(expected)


@pytest.mark.parametrize("fmt,tdt", FP8)
def test_format_metadata_agrees_with_torch_finfo(fmt: str, tdt: torch.dtype) -> None:
    info, fi = fm.FORMATS[fmt], torch.finfo(tdt)
    assert info.max == fi.max
    assert info.min_normal == fi.smallest_normal
    assert info.unit_roundoff == fi.eps / 2
    assert info.min_subnormal == fi.smallest_normal * fi.eps
    assert fm.representable_values(fmt).max().item() == fi.max
    assert info.torch_dtype is tdt


def test_rounding_keeps_dtype_and_never_mutates() -> None:
    x = torch.randn(64, dtype=torch.bfloat16) * 300
    before = x.clone()
    out = fm.round_to_format(x, "e4m3")
    assert out.dtype == torch.bfloat16 and torch.equal(x, before)
    assert fm.is_representable(out.float(), "e4m3").all()
    f8 = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    assert fm.round_to_format(f8, "e4m3").dtype == torch.float32


@pytest.mark.parametrize("bad,match", [("fp8", "unknown number format 'fp8'"), ("E4M3", "unknown number format")])
def test_unknown_format_names_the_value(bad: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fm.round_to_format(torch.ones(2), bad)


def test_integer_input_is_rejected_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"x\.float\(\)"):
        fm.round_to_format(torch.ones(2, dtype=torch.int32), "e4m3")


# --- scaled quantization ----------------------------------------------------


def _half_step_bound(x_scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    """Largest rounding error of |x_scaled| in ``fmt``: half the gap around it, or the excess over max."""
    table = _positive_table(fmt)
    a = x_scaled.abs().to(torch.float64)
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    half_gap = (table[hi] - table[lo]) / 2
    return torch.where(a > table[-1], a - table[-1], half_gap)


def _within_half_step(err: torch.Tensor, x: torch.Tensor, s: torch.Tensor, fmt: str) -> bool:
    """err <= half step at x/s (times s), plus the float64 evaluation error of x/s itself."""
    xd = x.double()
    slack = xd.abs() * 2.0**-50
    return bool((err <= _half_step_bound(xd / s, fmt) * s + slack).all())


@settings(max_examples=60)
@given(
    st.sampled_from(["e4m3", "e5m2", "e2m1"]),
    st.sampled_from(["tensor", "row", "block"]),
    st.sampled_from([0, 1]),
    st.integers(0, 2**31 - 1),
    st.floats(1e-3, 1e3),
)
def test_quantize_round_trip_is_within_half_a_step(fmt: str, gran: str, axis: int, seed: int, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 32, generator=g) * spread
    x[0, :4] = 0.0
    qt = fm.quantize(x, fmt, granularity=gran, axis=axis, block_size=8 if gran == "block" else None)
    s = qt.expanded_scale().to(torch.float64)
    assert fm.is_representable(qt.values, fmt).all()
    err = (fm.dequantize(qt, torch.float64) - x.double()).abs()
    assert _within_half_step(err, x, s, fmt)
    expected_scale_shape = {
        "tensor": (),
        "row": (1, 32) if axis == 0 else (8, 1),
        "block": (1, 32) if axis == 0 else (8, 4),
    }[gran]
    assert tuple(qt.scale.shape) == expected_scale_shape


def test_quantize_maps_amax_to_format_max_and_guards_zero() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -3.0, 2.0, 0.5]])
    qt = fm.quantize(x, "e4m3", granularity="row")
    assert qt.scale[0].item() == 1.0 and (qt.values[0] == 0).all()
    assert qt.values[1].abs().max().item() == 448.0
    assert qt.scale[1].item() == pytest.approx(3.0 / 448.0, rel=2**-23)


def test_quantize_with_given_scale_and_errors() -> None:
    x = torch.randn(4, 16)
    qt = fm.quantize(x, "e4m3", scale=torch.tensor(0.01))
    assert torch.equal(qt.values, fm.round_to_format(x.double() / torch.tensor(0.01).double(), "e4m3").float())
    with pytest.raises(ValueError, match="positive and finite"):
        fm.quantize(x, "e4m3", scale=0.0)
    with pytest.raises(ValueError, match="not a multiple of block_size=5"):
        fm.quantize(x, "e4m3", granularity="block", block_size=5)
    with pytest.raises(ValueError, match="needs block_size"):
        fm.quantize(x, "e4m3", granularity="block")
    with pytest.raises(ValueError, match="granularity='col'"):
        fm.quantize(x, "e4m3", granularity="col")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a shape broadcastable to \\(4, 1\\)"):
        fm.quantize(x, "e4m3", granularity="row", scale=torch.ones(3, 1))


# --- block formats -------------------------------------------------------------


@settings(max_examples=40)
@given(st.integers(0, 2**31 - 1), st.floats(1e-2, 1e2), st.sampled_from([None, "auto"]), st.sampled_from([0, 1]))
def test_nvfp4_round_trip(seed: int, spread: float, global_scale, axis: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 48, generator=g) * spread
    qt = fm.quantize_nvfp4(x, axis=axis, global_scale=global_scale)
    assert fm.is_representable(qt.values, "e2m1").all()
    assert fm.is_representable(qt.scale, "e4m3").all()
    nb = x.shape[axis] // 16
    assert qt.scale.shape[axis] == nb
    # block scale = e4m3(amax_block / 6 / global)
    blocks = x.double().movedim(axis, -1).reshape(*x.movedim(axis, -1).shape[:-1], nb, 16)
    gsc = 1.0 if qt.global_scale is None else qt.global_scale.double()
    want = fm.round_to_format(blocks.abs().amax(-1) / 6 / gsc, "e4m3").movedim(-1, axis)
    assert torch.equal(qt.scale.double(), want)
    s = qt.expanded_scale().double()
    err = (fm.dequantize(qt, torch.float64) - x.double()).abs()
    assert _within_half_step(err, x, s, "e2m1")


@pytest.mark.parametrize("global_scale", [None, 0.25])
def test_nvfp4_nan_zero_and_tiny_blocks(global_scale) -> None:
    # per 16-element block: a NaN makes only its own block NaN once dequantized; an all-zero block
    # and one below E4M3's resolution (scale rounds to 0) are stored as +0; the others round-trip
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    x[0, 5] = math.nan
    x[1] = 0.0
    x[2] = 1e-6 * torch.sign(x[2])
    qt = fm.quantize_nvfp4(x.reshape(-1), global_scale=global_scale)
    deq = fm.dequantize(qt, torch.float64).reshape(4, 16)
    assert torch.isnan(deq[0]).all() and not torch.isnan(deq[1:]).any()
    assert qt.scale[1:3].tolist() == [0.0, 0.0]
    assert torch.equal(_bits64(deq[1:3]), torch.zeros(2, 16, dtype=torch.int64))  # +0, not -0
    gsc = 1.0 if global_scale is None else global_scale
    # |x / s| <= 6: at most half the largest E2M1 step (4 -> 6) times the block's scale
    assert ((deq[3] - x[3].double()).abs() <= qt.scale[3].double() * gsc).all()


def _bits64(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


@pytest.mark.parametrize("kind,fmt", [("mxfp4", "e2m1"), ("mxfp8", "e4m3")])
def test_mx_scale_rule_and_round_trip(kind: str, fmt: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 96, generator=g) * torch.logspace(-3, 3, 4)[:, None]
    x[0, :32] = 0.0
    qt = fm.quantize_mx(x, kind)
    emax = {"e2m1": 2, "e4m3": 8}[fmt]
    for r in range(4):
        for blk in range(3):
            amax = x[r, 32 * blk : 32 * (blk + 1)].abs().max().item()
            want = 1.0 if amax == 0 else 2.0 ** (math.frexp(amax)[1] - 1 - emax)
            assert qt.scale[r, blk].item() == want
    assert fm.is_representable(qt.values, fmt).all()
    s = qt.expanded_scale().double()
    err = (fm.dequantize(qt, torch.float64) - x.double()).abs()
    assert _within_half_step(err, x, s, fmt)


def test_round_e8m0_modes() -> None:
    x = torch.tensor([1.0, 1.5, 3.0, 0.75, 1e-45, 0.0, 1e38])
    assert fm.round_e8m0(x, "floor").tolist() == [1.0, 1.0, 2.0, 0.5, 2.0**-127, 2.0**-127, 2.0**126]
    assert fm.round_e8m0(x, "ceil")[:4].tolist() == [1.0, 2.0, 4.0, 1.0]
    assert fm.round_e8m0(torch.tensor([1.41, 1.42]), "nearest").tolist() == [1.0, 2.0]


# --- scaled_mm -----------------------------------------------------------------


def _fp8_operands(M: int, K: int, N: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = fm.round_to_format(torch.randn(M, K, generator=g) * 40, "e4m3")
    b = fm.round_to_format(torch.randn(K, N, generator=g) * 40, "e4m3")
    return a, b


def _mm_bound(a: torch.Tensor, b: torch.Tensor, sa, sb, bias, ref: torch.Tensor, out_dtype) -> torch.Tensor:
    """Two float32 sums of the same exact products, in any order, differ by <= 2*gamma_K*(|A||B|),
    scaled; the epilogue adds <= 2 float32 roundings per side; the final cast may then
    straddle one rounding boundary of ``out_dtype`` (<= 1 ULP)."""
    K = a.shape[1]
    s = (torch.as_tensor(sa).double().reshape(-1, 1) * torch.as_tensor(sb).double().reshape(1, -1)).abs()
    absprod = a.abs().double() @ b.abs().double()
    acc_err = 2 * summation_bound(absprod, K, torch.float32) * s
    mag = absprod * s + (0 if bias is None else bias.double().abs())
    epi = 2 * 2 * ulp(mag, torch.float32)
    return acc_err + epi + ulp(ref.double(), out_dtype)


@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (33, 64, 48), (7, 1024, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_matches_torch_cpu_scaled_mm(M: int, K: int, N: int, with_bias: bool) -> None:
    a, b = _fp8_operands(M, K, N, seed=M * 1000 + K)
    sa, sb = torch.tensor(0.013), torch.tensor(0.021)
    bias = torch.randn(N).to(torch.bfloat16) if with_bias else None
    theirs = torch._scaled_mm(
        a.to(torch.float8_e4m3fn),
        b.t().contiguous().to(torch.float8_e4m3fn).t(),
        sa,
        sb,
        bias=bias,
        out_dtype=torch.bfloat16,
    )
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    ours = fm.scaled_mm(a, b, sa, sb, bias=bias, out_dtype=torch.bfloat16)
    diff = (ours.double() - theirs.double()).abs()
    bound = _mm_bound(a, b, sa, sb, bias, theirs, torch.bfloat16)
    assert (diff <= bound).all(), f"max diff {diff.max():.3g}, bound there {bound.flatten()[diff.argmax()]:.3g}"


def test_scaled_mm_rowwise_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _fp8_operands(37, 32, 24, seed=3)
    sa = torch.rand(37, 1) + 0.1
    sb = torch.rand(1, 24) + 0.1
    exact = (a.double() @ b.double()) * sa.double() * sb.double()
    ref = exact.to(torch.float32)
    full = fm.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    monkeypatch.setattr(fm, "_SCALED_MM_CHUNK_BYTES", 1)  # one row per chunk
    chunked = fm.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    bound = _mm_bound(a, b, sa, sb, None, ref, torch.float32)
    for out in (full, chunked):
        assert ((out.double() - exact).abs() <= bound).all()


def test_scaled_mm_validates_and_does_not_mutate() -> None:
    a, b = _fp8_operands(4, 16, 8, seed=1)
    a0, b0 = a.clone(), b.clone()
    fm.scaled_mm(a, b, 1.0, 1.0)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    with pytest.raises(ValueError, match="inner dimensions must match"):
        fm.scaled_mm(a, b[:8], 1.0, 1.0)
    with pytest.raises(ValueError, match=r"scale_b has shape \(8, 1\)"):
        fm.scaled_mm(a, b, 1.0, torch.ones(8, 1))
    with pytest.raises(ValueError, match="must be 2-D"):
        fm.scaled_mm(a[None], b, 1.0, 1.0)


def test_dequantize_takes_a_block_axis_counted_from_the_end():
    import dataclasses

    from harness.reference.formats import dequantize, quantize_nvfp4

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_nvfp4(x, axis=1)
    assert torch.equal(dequantize(dataclasses.replace(q, axis=-1)), dequantize(q))
