"""The legacy FP8 forwards reproduce their defects: who writes to the caller's tensor, which ranks, which path."""

from __future__ import annotations

import pytest
import torch

from harness.layouts import LayoutSpec, materialize
from harness.quant.legacy import LEGACY_FORWARDS, comfyui_fp8_linear, get_legacy, last_path, legacy_op, make_fp8_module
from harness.reference.formats import round_to_format, scaled_mm
from harness.reference.metrics import Bound, judge, scaled_mm_kernel_bound

K, N = 32, 16


def _weight(scale: float = 2.0**-3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = round_to_format(torch.randn(N, K, generator=g) * 8, "e4m3").to(torch.float8_e4m3fn)
    return w, torch.tensor(scale)


def _input(shape=(2, 4, K), big: bool = True, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    if big:
        x.view(-1, K)[0, 0] = 1000.0  # beyond E4M3's 448
        x.view(-1, K)[-1, 5] = -600.0
    return x.to(dtype)


# (name, rank, contiguous, stored scale_input) -> does the caller's tensor change?
MUTATION_TABLE = [
    ("wanvideo_late2025", 3, True, False, True),
    ("wanvideo_late2025", 3, False, False, True),  # clamp(out=input) writes through any view
    ("wanvideo_late2025", 2, True, False, False),  # 2-D takes the original forward
    ("wanvideo_early2025", 3, True, False, False),
    ("wanvideo_early2025", 3, False, False, False),
    ("comfyui", 3, True, False, True),
    ("comfyui", 2, True, False, True),  # unsqueeze(1) is a view: the clamp reaches the caller
    ("comfyui", 3, False, False, True),
    ("comfyui", 3, True, True, False),  # with scale_input it multiplies into a new tensor
    ("user_fixed", 3, True, False, True),  # .contiguous() returns the same tensor, then clamps it in place
    ("user_fixed", 3, False, False, False),  # .contiguous() copied first: the caller is safe
    ("user_fixed", 3, True, True, False),
]


@pytest.mark.parametrize(
    "name,rank,contiguous,scaled_input,mutates",
    MUTATION_TABLE,
    ids=[f"{r[0]}-{r[1]}d-{'contig' if r[2] else 'strided'}-{'si' if r[3] else 'nosi'}" for r in MUTATION_TABLE],
)
def test_who_writes_to_the_callers_tensor(
    name: str, rank: int, contiguous: bool, scaled_input: bool, mutates: bool
) -> None:
    shape = (2, 4, K) if rank == 3 else (8, K)
    if contiguous:
        x = _input(shape)
    else:
        spec = LayoutSpec(shape, "bfloat16", pad=(0,) * (rank - 1) + (16,))  # padded rows: not contiguous
        x = materialize(spec, _input(shape).float())
        assert not x.is_contiguous()
    before = x.clone()
    w, sw = _weight()
    si = torch.tensor(4.0) if scaled_input else None
    legacy_op(name)(x, w, weight_scale=sw, input_scale=si)
    changed = not torch.equal(x, before)
    assert changed == mutates, f"{name}: path {last_path()}"
    if changed:  # the change is exactly the clamp to +-448
        assert torch.equal(x, before.clamp(-448, 448))


def test_late2025_before_the_fix_clamps_the_callers_tensor() -> None:
    """The reproduction keeps the defect: the caller's 1000 becomes 448."""
    x = _input()
    w, sw = _weight()
    legacy_op("wanvideo_late2025")(x, w, weight_scale=sw)
    assert float(x.view(-1, K)[0, 0]) == 448.0 and float(x.view(-1, K)[-1, 5]) == -448.0


def test_mutation_conditions_are_documented() -> None:
    assert LEGACY_FORWARDS["wanvideo_early2025"].mutates_input == "never"
    for name in ("wanvideo_late2025", "comfyui", "user_fixed"):
        assert LEGACY_FORWARDS[name].mutates_input != "never"


@pytest.mark.parametrize(
    "name,rank,path",
    [
        ("wanvideo_early2025", 2, "original: 2-D input"),
        ("wanvideo_late2025", 2, "original: 2-D input"),
        ("wanvideo_late2025", 4, "original: 4-D input"),
        ("comfyui", 2, "fp8"),
        ("comfyui", 4, "fallback: fp8_linear returned None (4-D input or non-E4M3 weight)"),
        ("user_fixed", 2, "fp8"),
        ("wanvideo_late2025", 3, "fp8"),
    ],
)
def test_rank_handling(name: str, rank: int, path: str) -> None:
    shape = {2: (8, K), 3: (2, 4, K), 4: (2, 2, 2, K)}[rank]
    x = _input(shape, big=False)
    w, sw = _weight()
    out = legacy_op(name)(x, w, weight_scale=sw)
    assert last_path() == path
    assert out.shape == shape[:-1] + (N,)


def test_comfyui_falls_back_on_a_kernel_error() -> None:
    """An (N, 1) scale next to a scalar input scale is no valid _scaled_mm scaling; ComfyUI swallows the error."""
    x = _input(big=False)
    w, _ = _weight()
    out = legacy_op("comfyui")(x, w, weight_scale=torch.full((N, 1), 0.5))
    assert last_path().startswith("fallback: ") and "scaling" in last_path(), last_path()
    # the fallback is a plain linear on the dequantized weight
    want = torch.nn.functional.linear(x, (w.float() * 0.5).to(x.dtype))
    assert torch.equal(out, want)


def _kernel_bound(a_deq: torch.Tensor, b_deq: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, why: str) -> Bound:
    floor = float(scaled_mm_kernel_bound(a_deq, b_deq, ref, dtype).max())
    return Bound(0.0, floor, why + "; float32 accumulation in any order + 1 output ULP")


@pytest.mark.parametrize("name", ["wanvideo_late2025", "comfyui", "user_fixed"])
def test_fp8_path_computes_the_clamped_ones_scale_scheme(name: str) -> None:
    """Their numerics: input clamped to +-448, cast to E4M3 with scale 1, times W * scale_weight."""
    x = _input()
    w, sw = _weight()
    out = legacy_op(name)(x.clone(), w, weight_scale=sw)
    a = round_to_format(x.float().clamp(-448, 448).reshape(-1, K), "e4m3")
    emu = scaled_mm(a, w.t(), 1.0, sw, out_dtype=torch.bfloat16)
    b = w.double().t() * float(sw)
    bound = _kernel_bound(a.double(), b, emu, torch.bfloat16, f"{name} vs the emulated clamp/ones-scale scheme")
    j = judge(out.reshape(-1, N).double(), emu.double(), None, bound)
    assert j.passed, str(j)


def test_early2025_ignores_the_stored_scale_and_casts_to_e5m2() -> None:
    x = _input(big=False)
    w, sw = _weight(scale=0.25)
    out = legacy_op("wanvideo_early2025")(x, w, weight_scale=sw)
    a = round_to_format(x.float().reshape(-1, K), "e5m2")
    emu = scaled_mm(a, w.t(), 1.0, 1.0, out_dtype=torch.bfloat16)  # scale 1, not 0.25
    bound = _kernel_bound(a.double(), w.double().t(), emu, torch.bfloat16, "E5M2 input x E4M3 weight, ones scales")
    j = judge(out.reshape(-1, N).double(), emu.double(), None, bound)
    assert j.passed, str(j)


def test_make_fp8_module_quantizes_high_precision_weights_tensorwise() -> None:
    w = torch.randn(N, K) * 3
    m = make_fp8_module(w, bias=torch.zeros(N))
    assert m.weight.dtype == torch.float8_e4m3fn and m.scale_weight.shape == ()
    assert m.scale_weight == w.abs().max() / 448  # amax maps to the top of E4M3
    assert torch.equal(m.weight.float(), round_to_format(w / m.scale_weight, "e4m3"))  # RNE, no saturation
    assert m.weight.float().abs().max() == 448.0


def test_comfyui_fp8_linear_alone_returns_none_for_other_weights() -> None:
    m = make_fp8_module(_weight()[0].to(torch.float8_e5m2))
    assert comfyui_fp8_linear(m, _input(big=False)) is None


def test_unknown_legacy_name() -> None:
    with pytest.raises(KeyError, match="unknown legacy forward 'nope'"):
        get_legacy("nope")
    assert get_legacy("legacy.comfyui").name == "comfyui"
