"""fp8_linear on CUDA (torch._scaled_mm): every layout against the emulation, the raw kernel's defect, no mutation.

Skips name what is missing: "no CUDA device", "FP8 matmul needs compute capability >= 8.9, found 8.6".
Bounds are derived from the accumulators: Hopper's FP8 tensor cores keep about 14 mantissa bits
within each 128-product run (float32 across runs; ``fp8_tensor_core_bound``), the emulation sums in
float32 (gamma_(K+2) x |A||B|), plus one output ULP, against ``harness.reference.formats.scaled_mm``
run on the very operands fp8_linear handed to the kernel (``LinearResult.a/b/scale_a/scale_b``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.layouts import LayoutSpec, data_ptr_alignment, materialize, poison_intact
from harness.quant.legacy import legacy_op
from harness.quant.linear import (
    LinearResult,
    copy_reasons,
    fp8_linear,
    fp8_linear_with_plan,
    last_plan,
    scaled_mm_available,
)
from harness.reference.formats import round_to_format, scaled_mm
from harness.reference.metrics import judge
from harness.strategies import layouts

from helpers import kernel_bound

pytestmark = pytest.mark.gpu

E4M3 = torch.float8_e4m3fn


@pytest.fixture
def dev() -> torch.device:
    """A CUDA device that can run FP8 matmul (probed when the test runs, never at import)."""
    ok, why = scaled_mm_available("cuda")
    if not ok:
        pytest.skip(why)
    return torch.device("cuda")


def check(res: LinearResult, bias: torch.Tensor | None = None) -> None:
    emu = scaled_mm(res.a, res.b, res.scale_a, res.scale_b, bias=res.bias, out_dtype=res.plan.out_dtype)
    emu = emu[:, : res.plan.n]
    if bias is not None and res.plan.out_dtype == torch.float32:
        emu = emu + bias.to(torch.float32)
    j = judge(res.out.reshape(emu.shape).double(), emu.double(), None, kernel_bound(res, emu, tensor_core=True))
    assert j.passed, f"{j}\n{res.plan.describe()}"


def weight(n: int, k: int, dev: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = round_to_format(torch.randn(n, k, generator=g) * 4, "e4m3").to(E4M3).to(dev)
    return w, torch.tensor(2.0**-4, device=dev)


M, K, N = 96, 256, 192
LAYOUTS = [
    ("bf16 contiguous", LayoutSpec((2, 48, K), "bfloat16")),
    ("bf16 offset 1 element (2 B)", LayoutSpec((2, 48, K), "bfloat16", offset=1)),
    ("bf16 transposed memory", LayoutSpec((2, 48, K), "bfloat16", perm=(2, 0, 1))),
    ("bf16 last stride 2", LayoutSpec((M, K), "bfloat16", step=(1, 2))),
    ("bf16 odd leading dim", LayoutSpec((M, K), "bfloat16", pad=(0, 1))),
    ("fp8 offset 1 byte", LayoutSpec((M, K), "float8_e4m3fn", offset=1)),
    ("fp8 offset 8 bytes", LayoutSpec((M, K), "float8_e4m3fn", offset=8)),
    ("fp8 offset 16 bytes", LayoutSpec((M, K), "float8_e4m3fn", offset=16)),
    ("fp8 odd leading dim", LayoutSpec((M, K), "float8_e4m3fn", pad=(0, 1))),
    ("fp8 column-major", LayoutSpec((M, K), "float8_e4m3fn", perm=(1, 0))),
    ("fp32 3-D unmergeable rows", LayoutSpec((4, 24, K), "float32", perm=(1, 0, 2))),
]


@pytest.mark.parametrize("name,spec", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_linear_on_cuda_matches_emulation(dev: torch.device, name: str, spec: LayoutSpec, scaling: str) -> None:
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(spec.shape, generator=g) * 3
    if spec.dtype == "float8_e4m3fn":
        vals = round_to_format(vals, "e4m3")
    x = materialize(spec, vals, device=dev)
    before = x.clone()
    w, sw = weight(N, K, dev)
    ws = sw if scaling == "tensor" else (torch.rand(N, generator=g) + 0.5).to(dev)
    bias = torch.randn(N, generator=g).to(dev, torch.bfloat16)
    res = fp8_linear_with_plan(
        x, w, ws, input_scale=0.5 if spec.dtype == "float8_e4m3fn" else None, bias=bias, out_dtype=torch.bfloat16
    )
    assert res.backend_used == "cuda", res.plan.backend_reason
    for t in (res.a, res.b.t(), res.scale_a, res.scale_b):  # what the kernel got is aligned
        assert data_ptr_alignment(t) >= 16
    assert torch.equal(
        x.view(torch.uint8) if x.element_size() == 1 else x,
        before.view(torch.uint8) if before.element_size() == 1 else before,
    )
    assert poison_intact(x, spec)
    check(res)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kn", [(40, 40), (256, 200), (200, 256)])
def test_padding_and_out_dtypes_on_cuda(dev: torch.device, out_dtype: torch.dtype, kn: tuple[int, int]) -> None:
    k, n = kn
    x = torch.randn(3, 37, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)  # high precision: quantized rowwise here
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    res = fp8_linear_with_plan(x, w, bias=bias, out_dtype=out_dtype)
    assert res.backend_used == "cuda" and res.out.shape == (3, 37, n) and res.out.is_contiguous()
    assert res.plan.k_padded % 16 == 0 and res.plan.n_padded % 16 == 0
    check(res, bias)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_drawn_layout_on_cuda(data: Any) -> None:
    ok, why = scaled_mm_available("cuda")
    if not ok:
        pytest.skip(why)
    k = data.draw(st.sampled_from([64, 128, 136]), label="K")
    dtype = data.draw(st.sampled_from(["bfloat16", "float8_e4m3fn"]), label="dtype")
    spec = data.draw(layouts((2, 33, k), dtype, views=True), label="layout")
    vals = torch.randn(spec.shape) * 2
    if dtype == "float8_e4m3fn":
        vals = round_to_format(vals, "e4m3")
    x = materialize(spec, vals, device="cuda")
    w, sw = weight(48, k, torch.device("cuda"))
    res = fp8_linear_with_plan(x, w, sw, input_scale=1.0 if dtype == "float8_e4m3fn" else None)
    assert res.backend_used == "cuda"
    if dtype == "float8_e4m3fn":
        assert (res.plan.decision("input").action == "copy") == bool(copy_reasons(x, "input", rules="cuda"))
    assert poison_intact(x, spec)
    check(res)


RAW_DEFECTS = [
    ("A offset 1 byte", LayoutSpec((M, K), "float8_e4m3fn", offset=1)),
    ("A offset 8 bytes", LayoutSpec((M, K), "float8_e4m3fn", offset=8)),
    ("A odd leading dim", LayoutSpec((M, K), "float8_e4m3fn", pad=(0, 1))),
]


@pytest.mark.parametrize("name,spec", RAW_DEFECTS, ids=[n for n, _ in RAW_DEFECTS])
def test_raw_scaled_mm_rejects_what_fp8_linear_handles(dev: torch.device, name: str, spec: LayoutSpec) -> None:
    """The defect the harness exists to catch: cuBLASLt refuses a misaligned A (a clean CUBLAS error)."""
    a = materialize(spec, round_to_format(torch.randn(spec.shape), "e4m3"), device=dev)
    w, sw = weight(N, K, dev)
    one = torch.ones((), device=dev)
    with pytest.raises(RuntimeError):
        torch._scaled_mm(a, w.t(), scale_a=one, scale_b=sw, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    res = fp8_linear_with_plan(a, w, sw, input_scale=1.0)
    assert res.plan.decision("input").action == "copy" and res.plan.copies == 1
    check(res)


def test_static_scale_saturation_never_writes_the_callers_tensor(dev: torch.device) -> None:
    x = torch.randn(64, K, device=dev, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([500.0, -1e4, 470.0, 448.0], device=dev, dtype=torch.bfloat16)
    before = x.clone()
    w, sw = weight(N, K, dev)
    res = fp8_linear_with_plan(x, w, sw, input_scale=1.0)
    assert torch.equal(x, before)
    assert res.a[0, :4].float().tolist() == [448.0, -448.0, 448.0, 448.0]  # saturated, not NaN (2.11 casts give NaN)
    assert torch.isfinite(res.out).all()
    check(res)


class _Big(TorchDispatchMode):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.n and t.untyped_storage().data_ptr() not in ins:
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_aligned_bf16_input_costs_the_cast_and_the_output_only(dev: torch.device) -> None:
    x = torch.randn(2, 48, K, device=dev, dtype=torch.bfloat16)
    w, sw = weight(N, K, dev)
    fp8_linear(x, w, sw)  # warm up (cuBLAS handles, workspace)
    with _Big(min(M * K, M * N, N * K) // 2) as mode:
        fp8_linear(x, w, sw)
    assert [(s, d) for _, s, d in mode.seen] == [((2, 48, K), E4M3), ((M, N), torch.bfloat16)], mode.seen
    assert last_plan().copies == 0


def test_legacy_late2025_still_mutates_on_cuda(dev: torch.device) -> None:
    x = torch.randn(2, 48, K, device=dev, dtype=torch.bfloat16)
    x[0, 0, 0] = 1000.0
    w, sw = weight(N, K, dev)
    legacy_op("wanvideo_late2025")(x, w, weight_scale=sw)
    assert float(x[0, 0, 0]) == 448.0


# ---------------------------------------------------------------------------- the one-pass Triton quantizer
from harness.quant._triton_quant import rowwise_quantize, triton_available  # noqa: E402
from harness.quant.fp8.quantize import _quantize_eager  # noqa: E402
from harness.quant.linear import _amax, _dynamic_scale, quantize_activation  # noqa: E402
from harness.values import FINITE_KINDS, ValueSpec  # noqa: E402


@pytest.mark.parametrize("kind", FINITE_KINDS + ("nonfinite",))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mk", [(257, 5120), (33, 40), (7, 13824)])
def test_triton_rowwise_quantizer_is_bitwise_the_eager_one(dev, kind: str, dtype: torch.dtype, mk) -> None:
    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    m, k = mk
    kp = -(-k // 16) * 16
    x = ValueSpec(kind, 7).generate((m, k), torch.float32).to(dtype).to(dev)
    before = x.clone()
    q, s = rowwise_quantize(x, kp)
    s_ref = _dynamic_scale(_amax(x, rowwise=True))
    q_ref = _quantize_eager(x, s_ref, k_padded=kp)
    assert torch.equal(x.view(torch.uint8), before.view(torch.uint8)), "the quantizer wrote its input"
    _same_bits(s, s_ref, "scales")
    _same_bits(q, q_ref, "E4M3 values")


def _same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equal, except that any NaN matches any NaN (sign and payload of NaN are not part of the scheme)."""
    an, bn = torch.isnan(a.float()), torch.isnan(b.float())
    assert torch.equal(an, bn), f"{what}: NaN positions differ"
    view = torch.uint8 if a.dtype.itemsize == 1 else torch.int32
    assert torch.equal(a.view(view)[~an], b.view(view)[~bn]), f"{what} differ"


def test_fp8_linear_takes_the_one_pass_quantizer_for_plain_bf16(dev) -> None:
    if not triton_available()[0]:
        pytest.skip(triton_available()[1])
    x = torch.randn(2, 48, K, device=dev, dtype=torch.bfloat16)
    w, sw = weight(N, K, dev)
    res = fp8_linear_with_plan(x, w, sw)  # scalar weight scale: per-tensor input scale
    assert res.plan.quantizer == "triton-tensorwise" and res.plan.scaling == "tensorwise"
    check(res)
    strided = materialize(LayoutSpec((2, 48, K), "bfloat16", offset=1, pad=(0, 0, 8)), x.cpu(), device="cuda")
    res2 = fp8_linear_with_plan(strided, w, sw)  # misaligned, padded rows: still fused, same numbers
    assert res2.plan.quantizer == "triton-tensorwise"
    assert torch.equal(res2.out, res.out)
    transposed = materialize(LayoutSpec((2, 48, K), "bfloat16", perm=(0, 2, 1)), x.cpu(), device="cuda")
    res3 = fp8_linear_with_plan(transposed, w, sw)  # last stride != 1: the eager path, the same numbers
    assert res3.plan.quantizer == "eager" and torch.equal(res3.out, res.out)
    wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)  # high-precision weight: rowwise, one pass
    res4 = fp8_linear_with_plan(x, wb)
    assert res4.plan.quantizer == "triton-rowwise"
    check(res4)
    assert torch.equal(fp8_linear_with_plan(transposed, wb).out, res4.out)


# the cast runs as 1-D blocks when input rows and output are one dense run, else per row: both must be the scheme
CAST_PATHS = {
    "flat": (1000, None, 0),
    "padded_rows": (1000, 1008, 0),
    "strided_rows": (1000, None, 24),
    "flat_tail": (997, None, 0),
}


@pytest.mark.parametrize("path", sorted(CAST_PATHS))
@pytest.mark.parametrize("kind", FINITE_KINDS + ("nonfinite",))
def test_triton_scaled_cast_is_bitwise_the_eager_one(dev, kind: str, path: str) -> None:
    if not triton_available()[0]:
        pytest.skip(triton_available()[1])
    from harness.quant._triton_quant import cast_is_flat, dynamic_tensorwise_quantize, scaled_cast

    k, kp, extra = CAST_PATHS[path]
    wide = ValueSpec(kind, 3).generate((1290, k + extra), torch.float32).to(torch.bfloat16).to(dev)
    x = wide[:, :k]  # row stride k + extra: not one dense run when extra > 0
    q_shape = torch.empty((1290, kp or k), dtype=torch.float8_e4m3fn, device=dev)
    assert cast_is_flat(x, q_shape, kp) is path.startswith("flat"), path
    before = wide.clone()
    s = _dynamic_scale(_amax(x, rowwise=False))
    q_ref = _quantize_eager(x, s, k_padded=kp)
    _same_bits(scaled_cast(x, s, kp), q_ref, "E4M3 values (given scale)")
    _same_bits(quantize_activation(x, s, k_padded=kp), q_ref, "quantize_activation (fused on CUDA)")
    q_dyn, s_dyn = dynamic_tensorwise_quantize(x, kp)
    assert torch.equal(wide.view(torch.int16), before.view(torch.int16)), "the quantizer wrote its input"
    _same_bits(s_dyn, s, "dynamic scale")
    _same_bits(q_dyn, q_ref, "E4M3 values (dynamic scale)")


def test_the_direct_triton_launch_runs_the_same_kernel_and_keys_on_pointer_alignment(dev) -> None:
    # after its first launch a kernel is launched through its compiled launcher (no per-call argument binding):
    # the bits must stay the eager scheme's, and a differently aligned view of the same shape is its own entry
    if not triton_available()[0]:
        pytest.skip(triton_available()[1])
    from harness.quant import _triton_quant as TQ

    flat = ValueSpec("normal", 5).generate((300 * 1000 + 1,), torch.float32).to(torch.bfloat16).to(dev)
    views = {"aligned": flat[:300_000].view(300, 1000), "2-byte": flat[1:300_001].view(300, 1000)}
    s = _dynamic_scale(_amax(views["aligned"], rowwise=False))
    for name, v in views.items():
        ref = _quantize_eager(v, s)
        dyn_ref = _quantize_eager(v, _dynamic_scale(_amax(v, rowwise=False)))
        for _ in range(3):  # the first launch binds; the next two take the direct path
            _same_bits(TQ.scaled_cast(v, s), ref, f"{name}: static cast")
            _same_bits(TQ.dynamic_tensorwise_quantize(v)[0], dyn_ref, f"{name}: dynamic quantization")
    lows = {arg[2] for key in TQ._CAST._compiled for arg in key[3] if len(arg) == 3 and arg[0] == torch.bfloat16}
    assert {0, 2} <= lows, lows  # the misaligned view did not reuse the aligned view's entry
