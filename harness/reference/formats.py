"""Number formats for quantized kernels, emulated exactly in plain PyTorch arithmetic.

Every rounding here is computed with ``frexp``/``ldexp``/``round`` on float32 or float64,
never with torch's own float8/float4 casts: those disagree between versions for
out-of-range inputs (torch 2.11 gives NaN from 480 up for E4M3FN, torch 2.13 on CPU
saturates). All roundings are round-to-nearest-even and saturating (values beyond the
format's max, including +-inf, become +-max; NaN stays NaN).

Scales are *dequantization multipliers* throughout, as ``torch._scaled_mm`` uses them:
a tensor quantized as ``q = round(x / s)`` is restored as ``q * s``.

Formats (``FORMATS``): ``"e4m3"`` (FP8 E4M3FN, max 448, no inf), ``"e5m2"`` (FP8 E5M2,
max 57344), ``"e2m1"`` (FP4, +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}). Block formats: NVFP4
(E2M1 values, E4M3 scale per 16, optional FP32 global scale), MXFP4 (E2M1, E8M0 per 32),
MXFP8 (E4M3, E8M0 per 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "FormatInfo",
    "FORMATS",
    "format_info",
    "round_to_format",
    "representable_values",
    "is_representable",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "amax_to_scale",
    "round_e8m0",
    "E8M0_MIN_EXP",
    "E8M0_MAX_EXP",
    "quantize_nvfp4",
    "quantize_mx",
    "MX_FORMATS",
    "scaled_mm",
]

Granularity = Literal["tensor", "row", "block"]
ScaleLike = Union[Tensor, float]


@dataclass(frozen=True)
class FormatInfo:
    """Metadata of a small floating-point format (sign bit + ``exp_bits`` + ``man_bits``).

    ``max`` is the largest finite value, ``min_normal`` = 2**(1-bias), ``min_subnormal`` =
    2**(1-bias-man_bits), ``unit_roundoff`` = 2**-(man_bits+1) (relative error bound of
    round-to-nearest for normal values), ``emax`` = exponent of ``max`` (used by the MX rule).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float
    has_inf: bool
    torch_dtype_name: Optional[str]

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (floor(log2(max)))."""
        return math.frexp(self.max)[1] - 1

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def unit_roundoff(self) -> float:
        return 2.0 ** -(self.man_bits + 1)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """The matching torch dtype, if this torch build has one."""
        if self.torch_dtype_name is None:
            return None
        return getattr(torch, self.torch_dtype_name, None)


FORMATS: dict[str, FormatInfo] = {
    "e4m3": FormatInfo("e4m3", 4, 3, 7, 448.0, False, "float8_e4m3fn"),
    "e5m2": FormatInfo("e5m2", 5, 2, 15, 57344.0, True, "float8_e5m2"),
    "e2m1": FormatInfo("e2m1", 2, 1, 1, 6.0, False, None),
}

# E8M0: unsigned powers of two 2**-127 .. 2**127 (code 255 is NaN).
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

MX_FORMATS: dict[str, str] = {"mxfp4": "e2m1", "mxfp8": "e4m3"}


def format_info(fmt: str) -> FormatInfo:
    """Look up a format by name, with an error that lists the valid names."""
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown number format {fmt!r}; use one of {sorted(FORMATS)}") from None


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32 (exact for these formats)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_dtype(x: Tensor) -> torch.dtype:
    """Results keep the input's dtype, except sub-16-bit inputs, which come back as float32."""
    if x.dtype.itemsize < 2:
        return torch.float32
    return x.dtype


#: work dtype -> (same-width integer dtype, mantissa bits, exponent bias)
_FLOAT_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _check_float(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what} has dtype {x.dtype}; pass a floating-point tensor (e.g. x.float())")


def round_to_format(x: Tensor, fmt: str) -> Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (ties to even), saturating at +-max.

    Computed in float32 (float64 for float64 input) with exact power-of-two scaling, so the
    result does not depend on torch's float8 casts. Returns a new tensor in ``x``'s dtype
    (float32 for float8 inputs); every value is exactly representable in that dtype. NaN
    propagates; +-inf saturates to +-max (also for ``"e5m2"``, which has inf: saturating is
    what quantizing kernels do). ``x`` is never modified.
    """
    _check_float(x, "x")
    info = format_info(fmt)
    w = x.to(_work_dtype(x))  # always a copy or a fresh view we never write to
    int_dt, man_w, bias_w = _FLOAT_LAYOUT[w.dtype]
    # clamping first saturates +-inf and out-of-range values (max lies on its binade's grid, so
    # rounding a clamped value never exceeds it)
    c = torch.clamp(w, -info.max, info.max)
    # the quantum 2**(binade exponent - man_bits) built from c's exponent bits (sign masked off);
    # the floor at emin covers zeros, subnormals and the format's own subnormal range
    ebits = c.view(int_dt) & (((1 << (w.dtype.itemsize * 8 - 1 - man_w)) - 1) << man_w)
    qbits = torch.clamp(ebits - (info.man_bits << man_w), min=(info.emin - info.man_bits + bias_w) << man_w)
    quantum = qbits.view(w.dtype)
    q = torch.round(c / quantum) * quantum  # exact scaling; round is ties-to-even and odd, so signs and -0 stay
    return torch.where(torch.isnan(w), w, q).to(_out_dtype(x))


def representable_values(fmt: str, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """All finite values of ``fmt``, sorted ascending, with +0 and -0 collapsed to one 0.

    Enumerated from the bit layout (exponent codes x mantissa codes), not from torch casts.
    """
    info = format_info(fmt)
    vals = set()
    for ecode in range(2**info.exp_bits):
        for mcode in range(2**info.man_bits):
            if ecode == 0:
                v = mcode * 2.0 ** (info.emin - info.man_bits)
            else:
                v = (1 + mcode / 2**info.man_bits) * 2.0 ** (ecode - info.bias)
            if v <= info.max:
                vals.add(v)
    pos = sorted(vals)
    allv = [-v for v in reversed(pos) if v != 0] + pos
    return torch.tensor(allv, dtype=dtype)


def is_representable(x: Tensor, fmt: str) -> Tensor:
    """Elementwise: is ``x`` exactly a finite value of ``fmt``?"""
    _check_float(x, "x")
    return round_to_format(x, fmt).to(x.dtype) == x


# ---------------------------------------------------------------------------
# Scaled quantization


@dataclass
class QuantizedTensor:
    """Quantized values and their dequantization scales: ``x ~= values * scale``.

    ``values``: float32 tensor of exactly representable ``fmt`` values, same shape as the
    input. ``scale``: float32, broadcastable to ``values`` after expanding blocks along
    ``axis`` (shape ``()`` for "tensor", input shape with ``axis`` reduced to 1 for "row",
    and to ``n_blocks`` for "block"). ``scale_fmt`` says what the scales themselves are
    rounded to ("fp32", "e4m3" for NVFP4, "e8m0" for MX). ``global_scale`` (NVFP4 only)
    multiplies every block scale. ``orig_dtype`` is the input's dtype.
    """

    values: Tensor
    scale: Tensor
    fmt: str
    granularity: str
    axis: int
    block_size: Optional[int] = None
    scale_fmt: str = "fp32"
    global_scale: Optional[Tensor] = None
    orig_dtype: torch.dtype = torch.float32

    def expanded_scale(self) -> Tensor:
        """The scale broadcast to ``values``' shape (blocks repeated along ``axis``)."""
        s = self.scale
        if self.global_scale is not None:
            s = s * self.global_scale
        if self.granularity == "block":
            s = torch.repeat_interleave(s, self.block_size, dim=self.axis)
        return s.expand_as(self.values)

    def to_torch(self) -> Tensor:
        """The values as the native torch dtype (e.g. ``float8_e4m3fn``); exact, values are representable."""
        dt = FORMATS[self.fmt].torch_dtype
        if dt is None:
            raise ValueError(f"format {self.fmt!r} has no unpacked torch dtype; use .values (float32)")
        return self.values.to(dt)


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"axis={axis} is out of range for a {ndim}-D tensor; use -{ndim}..{ndim - 1}")
    return axis % ndim if ndim else 0


def amax_to_scale(amax: Tensor, fmt_max: float) -> Tensor:
    """Dequantization scale ``amax / fmt_max`` in float32; 1.0 where ``amax`` is 0 (all-zero groups stay 0)."""
    amax = amax.to(torch.float32)
    return torch.where(amax > 0, amax / fmt_max, 1.0)


def _check_block(x: Tensor, axis: int, block_size: Optional[int], default: Optional[int] = None) -> int:
    if block_size is None:
        if default is None:
            raise ValueError('granularity="block" needs block_size=..., e.g. block_size=32')
        block_size = default
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    n = x.shape[axis]
    if n % block_size:
        raise ValueError(
            f"axis {axis} has length {n}, not a multiple of block_size={block_size}; "
            f"pad the tensor along that axis or pick a block size dividing {n}"
        )
    return block_size


def _block_view(x: Tensor, axis: int, block_size: int) -> Tensor:
    """View ``x`` with ``axis`` split into (n_blocks, block_size); block_size dim at axis+1."""
    shape = list(x.shape)
    n = shape[axis]
    return x.reshape(shape[:axis] + [n // block_size, block_size] + shape[axis + 1 :])


def _block_amax(x: Tensor, axis: int, block_size: int) -> Tensor:
    return _block_view(x, axis, block_size).abs().amax(dim=axis + 1)


def quantize(
    x: Tensor,
    fmt: str,
    *,
    granularity: Granularity = "tensor",
    block_size: Optional[int] = None,
    axis: int = -1,
    scale: Optional[ScaleLike] = None,
) -> QuantizedTensor:
    """Quantize ``x`` to ``fmt`` with a per-tensor, per-row or per-block FP32 scale.

    ``axis`` is the reduction (contraction) axis: "row" gives one scale per slice along
    ``axis`` (for a weight (N, K) with axis=-1: one per output channel, shape (N, 1));
    "block" gives one per ``block_size`` consecutive elements along ``axis``. Scale =
    ``amax / fmt_max`` (1.0 for all-zero groups), unless ``scale`` is given, which must be
    positive, finite and broadcastable to the scale shape. Values are
    ``round_to_format(x / scale)`` computed in float64 (exact division, one rounding).
    """
    _check_float(x, "x")
    info = format_info(fmt)
    if granularity not in ("tensor", "row", "block"):
        raise ValueError(f'granularity={granularity!r}; use "tensor", "row" or "block"')
    ndim = x.dim()
    ax = _norm_axis(axis, ndim) if ndim else 0
    xd = x.detach().to(torch.float64)
    if granularity == "block":
        if ndim == 0:
            raise ValueError('granularity="block" needs at least a 1-D tensor')
        block_size = _check_block(x, ax, block_size)
    elif block_size is not None:
        raise ValueError(f'block_size={block_size} only applies to granularity="block"')

    if granularity == "tensor":
        target_shape: tuple[int, ...] = ()
    elif granularity == "row":
        target_shape = tuple(1 if i == ax else n for i, n in enumerate(x.shape))
    else:
        target_shape = tuple(n // block_size if i == ax else n for i, n in enumerate(x.shape))

    if scale is None:
        if granularity == "tensor":
            amax = xd.abs().amax() if xd.numel() else xd.new_zeros(())
        elif granularity == "row":
            amax = xd.abs().amax(dim=ax, keepdim=True)
        else:
            amax = _block_amax(xd, ax, block_size)
        s = amax_to_scale(amax, info.max)
    else:
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if not torch.isfinite(s).all() or not (s > 0).all():
            raise ValueError(f"scale must be positive and finite, got {s.flatten()[:4].tolist()}...")
        try:
            s = s.expand(target_shape).clone() if s.shape != target_shape else s
        except RuntimeError:
            raise ValueError(
                f"scale of shape {tuple(s.shape)} does not fit granularity={granularity!r} "
                f"(expected a shape broadcastable to {target_shape})"
            ) from None

    sd = s.to(torch.float64)
    if granularity == "block":
        sd = torch.repeat_interleave(sd, block_size, dim=ax)
    values = round_to_format(xd / sd, fmt).to(torch.float32)
    return QuantizedTensor(
        values=values,
        scale=s,
        fmt=fmt,
        granularity=granularity,
        axis=ax,
        block_size=block_size,
        scale_fmt="fp32",
        global_scale=None,
        orig_dtype=x.dtype,
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Restore ``values * scale``: each product exact (as formed in float64), rounded once to ``dtype``."""
    s = qt.scale if qt.global_scale is None else qt.scale * qt.global_scale  # float32, as expanded_scale
    # a product of two float32 numbers is exact in float64, so rounding it to float32 once is
    # the float32 product itself: for float32 out the float64 detour is skipped
    wd = torch.float32 if dtype == torch.float32 and qt.values.dtype == s.dtype == torch.float32 else torch.float64
    v, s = qt.values.to(wd), s.to(wd)
    if qt.granularity == "block":
        # broadcast each block's scale over its elements instead of materialising it
        axis = _norm_axis(qt.axis, v.dim())  # a QuantizedTensor built by hand may count from the end
        prod = _block_view(v, axis, qt.block_size) * s.unsqueeze(axis + 1)
        return prod.reshape(v.shape).to(dtype)
    return (v * s).to(dtype)


# ---------------------------------------------------------------------------
# Block formats: E8M0, NVFP4, MX


def round_e8m0(x: Tensor, mode: Literal["floor", "ceil", "nearest"] = "floor") -> Tensor:
    """Round positive ``x`` to a power of two representable in E8M0 (2**-127 .. 2**127).

    ``"floor"`` (largest power of two <= x) is what the OCP MX rule needs; ``"ceil"`` and
    ``"nearest"`` (nearest in log2, ties up) are offered for kernels that round scales up.
    Zero and negative inputs give 2**-127 (E8M0 has no zero); NaN stays NaN. Float32 out.
    """
    _check_float(x, "x")
    if mode not in ("floor", "ceil", "nearest"):
        raise ValueError(f'mode={mode!r}; use "floor", "ceil" or "nearest"')
    xd = x.detach().to(torch.float64)
    pos = xd > 0
    safe = torch.where(pos & torch.isfinite(xd), xd, torch.ones_like(xd))
    m, e2 = torch.frexp(safe)  # safe = m * 2**e2, m in [0.5, 1)
    fl = e2 - 1
    if mode == "floor":
        e = fl
    elif mode == "ceil":
        e = torch.where(m == 0.5, fl, fl + 1)
    else:
        e = torch.where(m >= math.sqrt(0.5), fl + 1, fl)
    e = torch.where(torch.isinf(xd) & pos, torch.full_like(e, E8M0_MAX_EXP), e)
    e = torch.clamp(e, E8M0_MIN_EXP, E8M0_MAX_EXP)
    e = torch.where(pos, e, torch.full_like(e, E8M0_MIN_EXP))
    out = torch.ldexp(torch.ones_like(xd), e)
    out = torch.where(torch.isnan(xd), xd, out)
    return out.to(torch.float32)


def quantize_nvfp4(
    x: Tensor,
    *,
    axis: int = -1,
    block_size: int = 16,
    global_scale: Union[None, Literal["auto"], float, Tensor] = None,
) -> QuantizedTensor:
    """NVFP4: E2M1 values, one E4M3 scale per ``block_size`` (16) elements along ``axis``.

    Block scale = ``e4m3(amax_block / 6 / global_scale)``; values =
    ``e2m1(x / (block_scale * global_scale))``. ``global_scale``: None (1.0, as SageAttention 3
    uses it), a positive float/tensor, or ``"auto"`` = ``amax(x) / (448 * 6)`` so block scales
    use the full E4M3 range (NVIDIA's recipe). A block whose scale rounds to 0 (amax below
    E4M3's resolution) is stored as zeros.
    """
    _check_float(x, "x")
    if x.dim() == 0:
        raise ValueError("quantize_nvfp4 needs at least a 1-D tensor")
    ax = _norm_axis(axis, x.dim())
    block_size = _check_block(x, ax, block_size)
    xd = x.detach().to(torch.float64)
    if global_scale is None:
        g = gd = None
    else:
        if isinstance(global_scale, str):
            if global_scale != "auto":
                raise ValueError(f'global_scale={global_scale!r}; use None, "auto" or a positive number')
            amax_t = xd.abs().amax()
            g = amax_to_scale(amax_t, FORMATS["e4m3"].max * FORMATS["e2m1"].max)
        else:
            g = torch.as_tensor(global_scale, dtype=torch.float32).detach().clone().reshape(())
            if not (torch.isfinite(g) and g > 0):
                raise ValueError(f"global_scale must be positive and finite, got {g.item()}")
        gd = g.to(torch.float64)
    e2m1_max = FORMATS["e2m1"].max
    blocks = _block_view(xd, ax, block_size)
    amax = blocks.abs().amax(dim=ax + 1)
    # without a global scale its factor 1.0 is left out (dividing/multiplying by 1 is exact)
    bs = round_to_format(amax / e2m1_max if gd is None else amax / e2m1_max / gd, "e4m3").to(torch.float32)
    # float64 blocks / float32 scales divide in float64 (the scales convert exactly)
    full = (bs if gd is None else bs.to(torch.float64) * gd).unsqueeze(ax + 1)
    # a block whose scale is 0 (or NaN) is stored as zeros; x / 0 there is masked away
    values = round_to_format(blocks / full, "e2m1")
    values = torch.where(full > 0, values, 0.0).to(torch.float32).reshape(x.shape)
    return QuantizedTensor(
        values=values,
        scale=bs,
        fmt="e2m1",
        granularity="block",
        axis=ax,
        block_size=block_size,
        scale_fmt="e4m3",
        global_scale=g,
        orig_dtype=x.dtype,
    )


def quantize_mx(
    x: Tensor,
    kind: Literal["mxfp4", "mxfp8"],
    *,
    axis: int = -1,
    block_size: int = 32,
) -> QuantizedTensor:
    """MXFP4 (E2M1) / MXFP8 (E4M3) with one E8M0 scale per ``block_size`` (32) elements.

    Scale rule, from the OCP Microscaling Formats (MX) v1.0 specification, section 6.3
    ("Conversion from vector of scalar floats to MX"): shared exponent
    ``X = floor(log2(amax_block)) - emax_elem`` where ``emax_elem`` is the exponent of the
    element format's largest normal (2 for E2M1, 8 for E4M3), clamped to E8M0's range; then
    each element is ``round_to_format(x / 2**X)``, saturating. Because of the floor, the
    largest element may land above the element max (up to 2**(emax+1)) and is clamped,
    as the spec prescribes. All-zero blocks get scale 1.0.
    """
    _check_float(x, "x")
    if kind not in MX_FORMATS:
        raise ValueError(f"kind={kind!r}; use one of {sorted(MX_FORMATS)}")
    if x.dim() == 0:
        raise ValueError("quantize_mx needs at least a 1-D tensor")
    fmt = MX_FORMATS[kind]
    info = FORMATS[fmt]
    ax = _norm_axis(axis, x.dim())
    block_size = _check_block(x, ax, block_size)
    xd = x.detach().to(torch.float64)
    amax = _block_amax(xd, ax, block_size)
    pos = amax > 0
    _, e2 = torch.frexp(torch.where(pos, amax, torch.ones_like(amax)))
    shared = torch.clamp(e2 - 1 - info.emax, E8M0_MIN_EXP, E8M0_MAX_EXP)
    shared = torch.where(pos, shared, torch.zeros_like(shared))
    scale = torch.ldexp(torch.ones_like(amax), shared)
    full = torch.repeat_interleave(scale, block_size, dim=ax)
    values = round_to_format(xd / full, fmt).to(torch.float32)
    return QuantizedTensor(
        values=values,
        scale=scale.to(torch.float32),
        fmt=fmt,
        granularity="block",
        axis=ax,
        block_size=block_size,
        scale_fmt="e8m0",
        global_scale=None,
        orig_dtype=x.dtype,
    )


# ---------------------------------------------------------------------------
# torch._scaled_mm emulation

_SCALED_MM_CHUNK_BYTES = 256 * 2**20


def _scale_tensor(s: ScaleLike, name: str, rows: int, cols: int, which: str) -> Tensor:
    t = torch.as_tensor(s, dtype=torch.float32) if not isinstance(s, Tensor) else s
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {t.dtype}; pass a float32 scale")
    if t.numel() == 1:
        return t.detach().to(torch.float32).reshape(1, 1)
    want = (rows, 1) if which == "a" else (1, cols)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; use a scalar (tensorwise) or shape {want} (rowwise)")
    return t.detach().to(torch.float32)


def scaled_mm(
    a: Tensor,
    b: Tensor,
    scale_a: ScaleLike,
    scale_b: ScaleLike,
    bias: Optional[Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    accum_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Emulate ``torch._scaled_mm``: ``out = (A @ B) * scale_a * scale_b + bias``, cast once.

    ``a``: (M, K), ``b``: (K, N), FP8 tensors or float tensors holding FP8-representable values
    (any layout; not checked for representability). ``scale_a``: scalar or (M, 1);
    ``scale_b``: scalar or (1, N) (float32 dequantization multipliers). The products of FP8
    values are exact in float32; they are summed in ``accum_dtype`` (float32 as on cuBLASLt,
    or float64 for an exact sum), the scales and the bias are applied to the accumulator in
    ``accum_dtype`` (as the cuBLASLt epilogue does) and the result is cast to ``out_dtype``
    once. Works in row chunks of M so the upcast copies stay under ~256 MiB. Inputs are not
    modified. Runs on whatever device the inputs are on.
    """
    for t, n in ((a, "a"), (b, "b")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be 2-D, got shape {tuple(t.shape)}; reshape to (-1, K) first")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{n} has dtype {t.dtype}; pass FP8 (or float holding FP8 values)")
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"a is (M={M}, K={K}) but b is (K={K2}, N={N}); inner dimensions must match")
    if accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accum_dtype={accum_dtype}; use torch.float32 or torch.float64")
    sa = _scale_tensor(scale_a, "scale_a", M, N, "a").to(a.device, accum_dtype)
    sb = _scale_tensor(scale_b, "scale_b", M, N, "b").to(a.device, accum_dtype)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({N},)")
        bias_acc = bias.detach().to(accum_dtype)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    bw = b.detach().to(accum_dtype)
    row_bytes = max(1, (K + N) * accum_dtype.itemsize)
    chunk = max(1, min(M, _SCALED_MM_CHUNK_BYTES // row_bytes)) if M else 1
    for i in range(0, M, chunk):
        acc = a[i : i + chunk].detach().to(accum_dtype) @ bw
        acc = acc * (sa[i : i + chunk] if sa.shape[0] > 1 else sa)
        acc = acc * sb
        if bias is not None:
            acc = acc + bias_acc
        out[i : i + chunk] = acc.to(out_dtype)
    return out
