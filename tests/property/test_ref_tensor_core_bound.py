"""The Hopper FP8 accumulator model: a simulated reduced-precision accumulator stays inside its bound."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.reference.formats import round_to_format
from harness.reference.metrics import (
    TENSOR_CORE_FP8_ACCUM_BITS,
    TENSOR_CORE_FP8_PROMOTE_INTERVAL,
    fp8_tensor_core_bound,
    summation_bound,
)


def _round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float64 values to ``bits`` mantissa bits (nearest), exponent unbounded."""
    m, e = torch.frexp(x)
    scale = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(m * scale) / scale, e)


def _tensor_core_dot(a: torch.Tensor, b: torch.Tensor, bits: int, interval: int) -> torch.Tensor:
    """Sequential accumulation with ``bits``-bit rounding inside runs of ``interval``, float32 across runs."""
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, a.numel(), interval):
        acc = torch.zeros((), dtype=torch.float64)
        for p in (a[start : start + interval] * b[start : start + interval]).tolist():
            acc = _round_mantissa(acc + p, bits)
        total = total + acc.float()
    return total.double()


@given(st.integers(1, 400), st.integers(0, 2**16), st.sampled_from([1.0, 30.0]))
def test_simulated_accumulator_stays_within_the_bound(k: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a = round_to_format(torch.randn(k, generator=g, dtype=torch.float64) * scale, "e4m3")
    b = round_to_format(torch.randn(k, generator=g, dtype=torch.float64), "e4m3")
    exact = (a * b).sum()
    got = _tensor_core_dot(a, b, bits=TENSOR_CORE_FP8_ACCUM_BITS, interval=TENSOR_CORE_FP8_PROMOTE_INTERVAL)
    bound = fp8_tensor_core_bound((a * b).abs().sum(), k)
    assert abs(float(got - exact)) <= float(bound)


def test_bound_is_wider_than_float32_and_grows_with_k() -> None:
    s = torch.tensor(100.0, dtype=torch.float64)
    for k in (16, 128, 129, 5120):
        assert fp8_tensor_core_bound(s, k) > summation_bound(s, k, torch.float32)
    assert fp8_tensor_core_bound(s, 5120) > fp8_tensor_core_bound(s, 128) > fp8_tensor_core_bound(s, 16)


@given(st.integers(1, 300), st.integers(0, 2**16))
def test_kernel_bound_covers_another_float32_summation_order(k: int, seed: int) -> None:
    """A kernel summing the same FP8 products in another float32 order stays within scaled_mm_kernel_bound
    of the emulation (both rounded to bf16)."""
    from harness.reference.formats import scaled_mm
    from harness.reference.metrics import scaled_mm_kernel_bound

    g = torch.Generator().manual_seed(seed)
    a = round_to_format(torch.randn(5, k, generator=g) * 30, "e4m3").float()
    b = round_to_format(torch.randn(k, 7, generator=g), "e4m3").float()
    sa, sb = torch.tensor(0.25), torch.tensor(2.0)
    emu = scaled_mm(a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), sa, sb, out_dtype=torch.bfloat16)
    other = (((a.flip(1) @ b.flip(0)) * sa) * sb).to(torch.bfloat16)  # reversed K order, float32
    bound = scaled_mm_kernel_bound(a.double() * 0.25, b.double() * 2.0, emu, torch.bfloat16)
    assert ((other.double() - emu.double()).abs() <= bound).all()
