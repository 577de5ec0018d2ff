"""FP8 E4M3 linear on ``torch._scaled_mm``, copying operands only when the kernel needs it.

``fp8_linear(input, weight, weight_scale=None, input_scale=None, bias=None, out_dtype=None)``
computes ``input @ dequant(weight).T + bias`` with both operands in FP8 E4M3 and FP32
accumulation. It is the op under test *and* the reference way of calling the kernel: every
operand is checked against the kernel's real requirements and copied only when one is not met.

Scaling (scales are dequantization multipliers: ``x ~= q * s``):

- **FP8 weight, scalar or no ``weight_scale``** -> tensorwise. The input is quantized with
  ``input_scale`` when given (static, as scaled checkpoints store it: ``q = x / input_scale``),
  otherwise with a *dynamic per-tensor* scale ``amax(|x|) / 448``. Not the ones-scale the
  public forwards use: with scale 1 every ``|x| < 2**-6`` lands in E4M3's subnormals and values
  beyond 448 saturate, so small activations lose most of their bits; the amax scale uses the
  whole E4M3 range and never saturates.
- **FP8 weight with an (N,) / (N, 1) ``weight_scale``** -> rowwise. ``_scaled_mm`` rowwise needs
  both operands rowwise, so the input gets a *dynamic per-row* scale ``amax(|x_row|) / 448``
  (or ``input_scale`` broadcast to every row).
- **High-precision weight** -> quantized here, rowwise: ``scale_w[n] = amax(|W[n, :]|) / 448``
  (1.0 for an all-zero row), hence rowwise input scales as above. ``weight_scale`` must be None.

Dynamic scales are nudged up by one float32 ULP where ``amax / scale`` would round above 448,
so no value ever exceeds the E4M3 range and nothing relies on the cast's overflow behaviour
(which differs by torch version). With a static ``input_scale`` the largest ``|x / s|`` is read
back (one device sync); if it exceeds 448 the input is divided into a temporary copy and
clamped to +-448 there before the cast. The caller's tensors are never written.
Non-finite inputs: a dynamic scale computed from a NaN/inf amax is NaN/inf, so every output of
that scaling group (the row, or the whole tensor when tensorwise) becomes NaN -- no silent
saturation of infinities, and no device sync on the dynamic path.

Division by the scale happens in float32 (the scale is a non-0-d float32 tensor, so type
promotion computes in float32) with one rounding to E4M3, exactly like
``harness.reference.formats.quantize``.

Kernel requirements (CUDA, ``rules="cuda"``), from quant-numerics §2 and the torch source:
A row-major with last stride 1, B column-major (the ``(N, K)`` weight row-major), K and N
multiples of 16, every data pointer (A, B, scales, bias, out) and every leading dimension
16-byte aligned, scales float32 and contiguous, bias of the output dtype (none with a float32
output). K or N that is not a multiple of 16 is **zero-padded** (zeros add nothing to the dot
products; padded output columns are sliced off and the result compacted) rather than
rejected: that is what a user of a linear layer expects. The CPU ``_scaled_mm`` and the
emulation accept every layout (``rules="none"``); pass ``rules="cuda"`` to apply the CUDA rules
anywhere, e.g. to count on a CPU the copies a GPU run would make.

A high-precision input is quantized anyway, and a cast always allocates a fresh, aligned,
row-major tensor: that cast *is* the realignment, so an unaligned or strided bf16 input costs
no extra copy. For an aligned, contiguous bf16 input and an aligned FP8 weight the call
allocates exactly two large tensors: the FP8 copy of the input and the output.

Backends (``backend_used`` on the result, and a DEBUG log line saying why):
``"cuda"`` (``torch._scaled_mm``, compute capability >= 8.9), ``"cpu"`` (torch's CPU
``_scaled_mm``, used when a probe shows it handles the scaling kind), ``"emulate"``
(``harness.reference.formats.scaled_mm`` on the same quantized operands). Where FP8 matmul
cannot run natively the emulation is used and the reason logged.

Each decision is recorded in a :class:`LinearPlan` (``result.plan`` and :func:`last_plan`):
which operand was used as is, quantized, copied, padded or cast, and why.
:func:`plan_operands` and :func:`copy_reasons` compute the same decisions from layouts alone
(tensors on any device, ``meta`` tensors or :class:`harness.layouts.LayoutSpec`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from harness.quant._geom import Geom
from harness.quant._triton_quant import (
    MAX_K,
    dynamic_tensorwise_quantize,
    rowwise_quantize,
    scaled_cast,
    triton_available,
)

__all__ = [
    "E4M3_MAX",
    "KERNEL_ALIGNMENT",
    "DIM_MULTIPLE",
    "MIN_CAPABILITY",
    "scaled_mm_available",
    "Fp8LinearError",
    "CopyReason",
    "OperandDecision",
    "LinearPlan",
    "LinearResult",
    "copy_reasons",
    "plan_operands",
    "select_backend",
    "fp8_linear",
    "fp8_linear_with_plan",
    "last_plan",
    "quantize_activation",
    "quantize_weight_rowwise",
    "call_scaled_mm",
]

logger = logging.getLogger("harness.quant.linear")

#: Largest finite FP8 E4M3FN value.
E4M3_MAX = 448.0
#: Byte alignment cuBLASLt needs for every data pointer and leading dimension (measured, quant-numerics §2).
KERNEL_ALIGNMENT = 16
#: K and N must be multiples of this for ``_scaled_mm``.
DIM_MULTIPLE = 16
#: FP8 matmul needs compute capability 8.9 (Ada) or >= 9.0.
MIN_CAPABILITY = (8, 9)

_FP8 = torch.float8_e4m3fn
_HIGH = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "cuda", "cpu", "emulate")
_RULES = ("cuda", "none")
# Roles understood by copy_reasons (aliases map onto the kernel operand names).
_ROLE_ALIASES = {"input": "a", "a": "a", "weight": "b", "b": "b", "scale_a": "scale_a",
                 "scale_b": "scale_b", "bias": "bias", "out": "out"}


class Fp8LinearError(ValueError):
    """Bad arguments to :func:`fp8_linear`; the message names the value and the fix."""


# ---------------------------------------------------------------------------
# Geometry

_Geom = Geom


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _rows_view(g: _Geom) -> Optional[tuple[int, int]]:
    """(rows, row_stride) if the leading dims of ``g`` merge into one row dim without a copy."""
    lead = [(s, st) for s, st in zip(g.shape[:-1], g.strides[:-1]) if s != 1]
    rows = math.prod(g.shape[:-1]) if g.shape[:-1] else 1
    if not lead:
        k = g.shape[-1] if g.shape else 1
        return rows, max(k, 1)  # a single row: the leading dimension is free, report the packed one
    for (s0, st0), (s1, st1) in zip(lead, lead[1:]):
        if st0 != st1 * s1:
            return None
    return rows, lead[-1][1]


# ---------------------------------------------------------------------------
# Copy reasons


class CopyReason(NamedTuple):
    """One unmet kernel requirement: a stable ``code`` and a message naming the value."""

    code: str  # last_stride | rows | ld | ptr | k_multiple | n_multiple | dtype | contiguity | shape
    message: str

    def __str__(self) -> str:
        return self.message


def copy_reasons(
    x: Any,
    role: str,
    *,
    rules: str = "cuda",
    out_dtype: Optional[torch.dtype] = None,
) -> list[CopyReason]:
    """The kernel requirements ``x`` does not meet in ``role``; empty when it can be used as is.

    ``role``: ``"input"``/``"a"`` (activation ``(..., K)``, used as row-major ``(M, K)``),
    ``"weight"``/``"b"`` (``(N, K)`` row-major = B column-major), ``"scale_a"``, ``"scale_b"``,
    ``"bias"`` (``(N,)``; ``out_dtype`` also checks its dtype), ``"out"`` (``(M, N)``).
    ``x``: a tensor (its real data pointer; ``meta`` tensors assume an aligned base) or a
    ``LayoutSpec``. ``rules="none"`` (CPU kernel, emulation) only keeps what any 2-D matmul
    needs: leading dims that merge into rows. Pure: reads metadata only, never the values.
    """
    if role not in _ROLE_ALIASES:
        raise ValueError(f"role={role!r}; use one of {sorted(_ROLE_ALIASES)}")
    if rules not in _RULES:
        raise ValueError(f"rules={rules!r}; use 'cuda' (the CUDA kernel's requirements) or 'none'")
    kind = _ROLE_ALIASES[role]
    g = _Geom.of(x)
    reasons: list[CopyReason] = []
    al = KERNEL_ALIGNMENT
    if kind in ("a", "b", "out"):
        if len(g.shape) < 1 or (kind != "a" and len(g.shape) != 2):
            want = "(..., K)" if kind == "a" else "2-D"
            return [CopyReason("shape", f"{role} has shape {g.shape}; expected {want}")]
        rv = _rows_view(g)
        if rv is None:
            reasons.append(CopyReason(
                "rows", f"{role} leading dims {g.shape[:-1]} with strides {g.strides[:-1]} cannot be "
                        "merged into one row dimension without a copy"))
        if rules == "none":
            return reasons
        last = g.strides[-1]
        if g.shape[-1] > 1 and last != 1:
            major = {"a": "A must be row-major", "b": "B must be column-major (weight row-major)",
                     "out": "out must be row-major"}[kind]
            reasons.append(CopyReason("last_stride", f"{role} last-dim stride is {last}, the kernel needs 1 ({major})"))
        if rv is not None and rv[0] > 1 and (last == 1 or g.shape[-1] == 1):
            ld = rv[1]
            k = g.shape[-1]
            if ld < k:
                reasons.append(CopyReason("ld", f"{role} row stride {ld} is smaller than the row length {k}"))
            elif (ld * g.itemsize) % al:
                reasons.append(CopyReason(
                    "ld", f"{role} leading dimension is {ld} elements = {ld * g.itemsize} bytes, "
                          f"not a multiple of {al}"))
        if g.ptr_align < al:
            reasons.append(CopyReason(
                "ptr", f"{role} data pointer is {g.ptr_align}-byte aligned (storage offset {g.offset} "
                       f"elements of {g.itemsize} B), the kernel needs {al}"))
        k = g.shape[-1]
        if kind in ("a", "b") and k % DIM_MULTIPLE:
            reasons.append(CopyReason(
                "k_multiple", f"K={k} is not a multiple of {DIM_MULTIPLE}: zero-padded to {_ceil_to(k, DIM_MULTIPLE)}"))
        if kind == "b" and g.shape[0] % DIM_MULTIPLE:
            n = g.shape[0]
            reasons.append(CopyReason(
                "n_multiple", f"N={n} is not a multiple of {DIM_MULTIPLE}: zero-padded to {_ceil_to(n, DIM_MULTIPLE)}"))
        return reasons
    if kind in ("scale_a", "scale_b"):
        if g.dtype != torch.float32:
            reasons.append(CopyReason("dtype", f"{role} has dtype {g.dtype}, the kernel needs torch.float32"))
        if rules == "none":
            return reasons
        if g.numel > 1:
            nontrivial = [(s, st) for s, st in zip(g.shape, g.strides) if s != 1]
            if len(nontrivial) != 1 or nontrivial[0][1] != 1:
                reasons.append(CopyReason(
                    "contiguity", f"{role} of shape {g.shape} has strides {g.strides}; rowwise scales must be contiguous"))
        if g.ptr_align < al:
            reasons.append(CopyReason(
                "ptr", f"{role} data pointer is {g.ptr_align}-byte aligned, the kernel needs {al}"))
        return reasons
    # bias
    if len(g.shape) != 1:
        return [CopyReason("shape", f"bias has shape {g.shape}; expected (N,)")]
    if out_dtype is not None and g.dtype != out_dtype:
        reasons.append(CopyReason("dtype", f"bias dtype {g.dtype} differs from the output dtype {out_dtype}"))
    if rules == "none":
        return reasons
    if g.shape[0] > 1 and g.strides[0] != 1:
        reasons.append(CopyReason("contiguity", f"bias stride is {g.strides[0]}, the kernel needs 1"))
    if g.ptr_align < al:
        reasons.append(CopyReason("ptr", f"bias data pointer is {g.ptr_align}-byte aligned, the kernel needs {al}"))
    if g.shape[0] % DIM_MULTIPLE:
        reasons.append(CopyReason("n_multiple", f"bias has N={g.shape[0]}, zero-padded to {_ceil_to(g.shape[0], DIM_MULTIPLE)}"))
    return reasons


# ---------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class OperandDecision:
    """What happened to one operand and why.

    ``action``: ``"use"`` (passed as is, maybe a view), ``"quantize"`` (a fresh FP8 tensor was
    made from high-precision values; layout problems are absorbed by it, listed in
    ``absorbed``), ``"copy"`` (copied only to meet the kernel's requirements), ``"pad"``
    (copied into a zero-padded buffer), ``"cast"`` (converted to another dtype), ``"derive"``
    (made by fp8_linear, e.g. a dynamic scale), ``"epilogue"`` (applied after the kernel),
    ``"alloc"`` (allocated by the kernel).
    """

    role: str
    action: str
    reasons: tuple[CopyReason, ...] = ()
    absorbed: tuple[CopyReason, ...] = ()

    @property
    def copied(self) -> bool:
        """True when the operand was copied because of a kernel requirement."""
        return self.action in ("copy", "pad", "cast")

    def describe(self) -> str:
        why = "; ".join(r.message for r in self.reasons)
        s = f"{self.role}: {self.action}"
        if why:
            s += f" ({why})"
        if self.absorbed:
            s += " [absorbed by the quantizing cast: " + "; ".join(r.message for r in self.absorbed) + "]"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "action": self.action,
                "reasons": [r._asdict() for r in self.reasons],
                "absorbed": [r._asdict() for r in self.absorbed]}


@dataclass(frozen=True)
class LinearPlan:
    """Every decision one ``fp8_linear`` call made (or would make, from :func:`plan_operands`)."""

    backend: str
    backend_reason: str
    rules: str
    scaling: str  # "tensorwise" | "rowwise"
    input_scaling: str  # "static" | "dynamic-tensor" | "dynamic-row"
    weight_quantized: bool
    m: int
    k: int
    n: int
    k_padded: int
    n_padded: int
    out_dtype: torch.dtype
    decisions: tuple[OperandDecision, ...]
    epilogue: tuple[str, ...] = ()
    #: how the activation was quantized: "eager" (PyTorch ops), "triton-rowwise" (amax, scale and cast in one
    #: pass) or "triton-tensorwise" (amax pass, then one fused divide-clamp-cast pass); same numbers either way
    quantizer: str = "eager"

    def decision(self, role: str) -> OperandDecision:
        for d in self.decisions:
            if d.role == role:
                return d
        raise KeyError(f"no decision for role {role!r}; roles: {[d.role for d in self.decisions]}")

    @property
    def copies(self) -> int:
        """Operands copied only because of kernel requirements (not counting quantization)."""
        return sum(d.copied for d in self.decisions) + ("compact output" in self.epilogue)

    @property
    def copied_roles(self) -> tuple[str, ...]:
        return tuple(d.role for d in self.decisions if d.copied)

    def describe(self) -> str:
        head = (f"fp8_linear M={self.m} K={self.k} N={self.n} (padded K={self.k_padded}, N={self.n_padded}) "
                f"{self.scaling} ({self.input_scaling} input) out={self.out_dtype} backend={self.backend} "
                f"({self.backend_reason}); rules={self.rules}; quantizer={self.quantizer}")
        lines = [head] + ["  " + d.describe() for d in self.decisions]
        if self.epilogue:
            lines.append("  epilogue: " + ", ".join(self.epilogue))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "backend_reason": self.backend_reason, "rules": self.rules,
                "quantizer": self.quantizer,
                "scaling": self.scaling, "input_scaling": self.input_scaling,
                "weight_quantized": self.weight_quantized, "m": self.m, "k": self.k, "n": self.n,
                "k_padded": self.k_padded, "n_padded": self.n_padded,
                "out_dtype": str(self.out_dtype).replace("torch.", ""),
                "decisions": [d.to_dict() for d in self.decisions], "epilogue": list(self.epilogue),
                "copies": self.copies}


@dataclass
class LinearResult:
    """Output of :func:`fp8_linear_with_plan`, with the exact kernel operands for judging.

    ``a`` (M, K_padded) FP8, ``b`` (K_padded, N_padded) FP8 (column-major view of the weight),
    ``scale_a``/``scale_b`` float32, ``bias`` as given to the kernel (None if absent or added in
    the epilogue). Feed these to ``harness.reference.formats.scaled_mm`` to judge the kernel
    alone, without the quantization error.
    """

    out: Tensor
    plan: LinearPlan
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    scale_a: Optional[Tensor] = None
    scale_b: Optional[Tensor] = None
    bias: Optional[Tensor] = None

    @property
    def backend_used(self) -> str:
        return self.plan.backend


_state = threading.local()


def last_plan() -> Optional[LinearPlan]:
    """The plan of the most recent :func:`fp8_linear` call in this thread (None before any)."""
    return getattr(_state, "plan", None)


def _dtype_of(x: Any) -> torch.dtype:
    if isinstance(x, Tensor):
        return x.dtype
    if hasattr(x, "torch_dtype"):
        return x.torch_dtype
    raise TypeError(f"expected a tensor or LayoutSpec, got {type(x).__name__}")


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_args(input: Any, weight: Any, weight_scale: Any, input_scale: Any, bias: Any,
                out_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, str]:
    """Validate dtypes and shapes; return (out_dtype, scaling)."""
    for name, v in (("input", input), ("weight", weight)):
        if not (isinstance(v, Tensor) or hasattr(v, "torch_dtype")):
            raise Fp8LinearError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    in_dt, w_dt = _dtype_of(input), _dtype_of(weight)
    ishape, wshape = _shape_of(input), _shape_of(weight)
    if in_dt not in _HIGH + (_FP8,):
        raise Fp8LinearError(
            f"input dtype {in_dt} is not supported; pass float16/bfloat16/float32 activations "
            "(or float8_e4m3fn with input_scale as its dequantization scale)")
    if len(ishape) < 1:
        raise Fp8LinearError(f"input is 0-d (shape {ishape}); pass a tensor of shape (..., in_features)")
    if len(wshape) != 2:
        raise Fp8LinearError(f"weight must be 2-D (out_features, in_features), got shape {wshape}")
    if w_dt == torch.float8_e5m2:
        raise Fp8LinearError(
            "weight dtype float8_e5m2 is not supported: fp8_linear multiplies E4M3 x E4M3; "
            "pass the high-precision weight (it is quantized rowwise) or an E4M3 weight")
    if w_dt not in _HIGH + (_FP8,):
        raise Fp8LinearError(f"weight dtype {w_dt} is not supported; pass float8_e4m3fn or float16/bfloat16/float32")
    n, k = wshape
    if ishape[-1] != k:
        raise Fp8LinearError(
            f"input has {ishape[-1]} features (shape {ishape}) but weight {wshape} expects in_features={k}")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if in_dt == _FP8 else in_dt
    if out_dtype not in _OUT_DTYPES:
        raise Fp8LinearError(f"out_dtype={out_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    scaling = "tensorwise"
    if w_dt != _FP8:
        if weight_scale is not None:
            raise Fp8LinearError(
                f"weight_scale was given for a {w_dt} weight; it only applies to an FP8 weight "
                "(a high-precision weight is quantized here with its own rowwise scale)")
        scaling = "rowwise"
    elif weight_scale is not None:
        if not isinstance(weight_scale, Tensor) and not hasattr(weight_scale, "torch_dtype"):
            raise Fp8LinearError(f"weight_scale must be a tensor, got {type(weight_scale).__name__}")
        ws = _shape_of(weight_scale)
        numel = math.prod(ws)
        if numel == 1:
            scaling = "tensorwise"
        elif numel == n and ws in ((n,), (n, 1), (1, n)):
            scaling = "rowwise"
        else:
            raise Fp8LinearError(
                f"weight_scale has shape {ws}; use a scalar (tensorwise) or ({n},) / ({n}, 1) (rowwise) for N={n}")
        if not _dtype_of(weight_scale).is_floating_point:
            raise Fp8LinearError(f"weight_scale has dtype {_dtype_of(weight_scale)}; pass a float32 tensor")
    if input_scale is not None:
        if isinstance(input_scale, (int, float)) and not isinstance(input_scale, bool):
            if not (math.isfinite(input_scale) and input_scale > 0):
                raise Fp8LinearError(f"input_scale={input_scale} must be positive and finite")
        elif isinstance(input_scale, Tensor) or hasattr(input_scale, "torch_dtype"):
            if math.prod(_shape_of(input_scale)) != 1:
                raise Fp8LinearError(
                    f"input_scale has shape {_shape_of(input_scale)}; pass a scalar (one scale for the whole input)")
            if not _dtype_of(input_scale).is_floating_point:
                raise Fp8LinearError(f"input_scale has dtype {_dtype_of(input_scale)}; pass a float32 tensor")
        else:
            raise Fp8LinearError(f"input_scale must be a float or a tensor, got {type(input_scale).__name__}")
    if bias is not None:
        if not isinstance(bias, Tensor) and not hasattr(bias, "torch_dtype"):
            raise Fp8LinearError(f"bias must be a tensor, got {type(bias).__name__}")
        if _shape_of(bias) != (n,):
            raise Fp8LinearError(f"bias has shape {_shape_of(bias)}; expected ({n},) for out_features={n}")
        if not _dtype_of(bias).is_floating_point:
            raise Fp8LinearError(f"bias has dtype {_dtype_of(bias)}; pass a floating-point tensor")
    return out_dtype, scaling


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover - exotic builds
        return (0, 0)


def plan_operands(
    input: Any,
    weight: Any,
    weight_scale: Any = None,
    input_scale: Any = None,
    bias: Any = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "cuda",
    backend_reason: str = "planned",
    rules: Optional[str] = None,
) -> LinearPlan:
    """Decide, from layouts alone, what :func:`fp8_linear` does with each operand on ``backend``.

    Pure: reads shapes, strides, dtypes and pointer alignment (tensors, meta tensors or
    ``LayoutSpec``s), never values and never the device. ``backend`` is a concrete backend
    (``"cuda"``, ``"cpu"``, ``"emulate"``); ``rules`` defaults to ``"cuda"`` for the CUDA backend
    and ``"none"`` otherwise.
    """
    if backend not in ("cuda", "cpu", "emulate"):
        raise ValueError(f"backend={backend!r}; plan for 'cuda', 'cpu' or 'emulate'")
    rules = rules if rules is not None else ("cuda" if backend == "cuda" else "none")
    if rules not in _RULES:
        raise ValueError(f"rules={rules!r}; use 'cuda' or 'none'")
    out_dtype, scaling = _check_args(input, weight, weight_scale, input_scale, bias, out_dtype)
    in_dt, w_dt = _dtype_of(input), _dtype_of(weight)
    ishape = _shape_of(input)
    n, k = _shape_of(weight)
    m = math.prod(ishape[:-1]) if len(ishape) > 1 else 1
    pad = rules == "cuda"
    kp = _ceil_to(k, DIM_MULTIPLE) if pad else k
    np_ = _ceil_to(n, DIM_MULTIPLE) if pad else n
    decisions: list[OperandDecision] = []
    epilogue: list[str] = []

    # input / A
    a_reasons = tuple(copy_reasons(input, "input", rules=rules))
    if in_dt == _FP8:
        input_scaling = "static"
        decisions.append(OperandDecision("input", "copy" if a_reasons else "use", a_reasons))
    else:
        input_scaling = "static" if input_scale is not None else (
            "dynamic-row" if scaling == "rowwise" else "dynamic-tensor")
        decisions.append(OperandDecision("input", "quantize", (), a_reasons))

    # weight / B
    b_reasons = tuple(copy_reasons(weight, "weight", rules=rules))
    if w_dt == _FP8:
        pad_only = b_reasons and all(r.code in ("k_multiple", "n_multiple") for r in b_reasons)
        action = "pad" if pad_only else ("copy" if b_reasons else "use")
        decisions.append(OperandDecision("weight", action, b_reasons))
    else:
        decisions.append(OperandDecision("weight", "quantize", (), b_reasons))

    # scale_a
    if isinstance(input_scale, Tensor) or hasattr(input_scale, "torch_dtype"):
        if scaling == "rowwise":
            decisions.append(OperandDecision("scale_a", "derive", (CopyReason(
                "shape", f"rowwise scaling needs scale_a of shape ({m}, 1): input_scale broadcast to every row"),)))
        else:
            r = tuple(copy_reasons(input_scale, "scale_a", rules=rules))
            decisions.append(OperandDecision("scale_a", "copy" if r else "use", r))
    else:
        decisions.append(OperandDecision("scale_a", "derive"))

    # scale_b
    if weight_scale is not None:
        r = list(copy_reasons(weight_scale, "scale_b", rules=rules))
        if scaling == "rowwise" and np_ != n:
            r.append(CopyReason("n_multiple", f"rowwise scale_b padded from N={n} to {np_}"))
        decisions.append(OperandDecision("scale_b", ("pad" if np_ != n and scaling == "rowwise" else "copy")
                                         if r else "use", tuple(r)))
    else:
        decisions.append(OperandDecision("scale_b", "derive"))

    # bias
    if bias is not None:
        if out_dtype == torch.float32:
            decisions.append(OperandDecision("bias", "epilogue", (CopyReason(
                "dtype", "_scaled_mm takes no bias with a float32 output: added to the float32 result"),)))
            epilogue.append("bias")
        else:
            r = tuple(copy_reasons(bias, "bias", rules=rules, out_dtype=out_dtype))
            action = "use"
            if r:
                action = "cast" if any(x.code == "dtype" for x in r) else (
                    "pad" if all(x.code == "n_multiple" for x in r) else "copy")
            decisions.append(OperandDecision("bias", action, r))

    # out
    decisions.append(OperandDecision("out", "alloc"))
    if scaling == "rowwise" and backend == "cuda" and out_dtype != torch.bfloat16 and _torch_version() < (2, 7):
        epilogue.insert(0, "rowwise scales")  # old torch: rowwise kernels emit bf16 only
    if np_ != n:
        epilogue.append("compact output")
    return LinearPlan(
        backend=backend, backend_reason=backend_reason, rules=rules, scaling=scaling,
        input_scaling=input_scaling, weight_quantized=w_dt != _FP8, m=m, k=k, n=n, k_padded=kp,
        n_padded=np_, out_dtype=out_dtype, decisions=tuple(decisions), epilogue=tuple(epilogue),
    )


# ---------------------------------------------------------------------------
# Backend selection (probed at call time)


@functools.lru_cache(maxsize=None)
def _cpu_scaled_mm_supports(scaling: str) -> tuple[bool, str]:
    """Probe torch's CPU ``_scaled_mm`` on a 16x16 problem with known values."""
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    a = torch.eye(16).to(_FP8)
    b = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 7).to(_FP8)
    if scaling == "rowwise":
        sa = torch.arange(1, 17, dtype=torch.float32).reshape(16, 1)
        sb = torch.arange(1, 17, dtype=torch.float32).reshape(1, 16) * 0.5
    else:
        sa, sb = torch.tensor(2.0), torch.tensor(0.5)
    try:
        out = call_scaled_mm(a, b.t(), sa, sb, None, torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return False, f"torch {torch.__version__} CPU _scaled_mm rejects {scaling} scales ({str(e).splitlines()[0]})"
    want = (a.float() * sa) @ (b.float().t() * sb)
    if not torch.equal(out, want):
        return False, f"torch {torch.__version__} CPU _scaled_mm gives wrong {scaling} results"
    return True, f"torch {torch.__version__} CPU _scaled_mm"


@functools.lru_cache(maxsize=None)
def _cpu_scaled_mm_mixed() -> tuple[bool, str]:
    """Probe torch's CPU ``_scaled_mm`` with an E5M2 A and an E4M3 B (what an E5M2 input cast calls)."""
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    a = torch.ones(16, 16).to(torch.float8_e5m2)
    one = torch.ones((), dtype=torch.float32)
    try:
        out = call_scaled_mm(a, torch.ones(16, 16).to(_FP8).t(), one, one, None, torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return False, f"torch {torch.__version__} CPU _scaled_mm rejects E5M2 x E4M3 ({str(e).splitlines()[0][:160]})"
    if not bool((out == 16).all()):
        return False, f"torch {torch.__version__} CPU _scaled_mm gives wrong E5M2 x E4M3 results"
    return True, f"torch {torch.__version__} CPU _scaled_mm (E5M2 x E4M3)"


def scaled_mm_available(device: Union[str, torch.device], *, mixed: bool = False) -> tuple[bool, str]:
    """(ok, why): can ``torch._scaled_mm`` itself run on ``device`` (what the legacy forwards call directly)?

    CUDA: compute capability >= ``MIN_CAPABILITY``. CPU: a known-answer probe, E4M3 x E4M3 or, with
    ``mixed``, E5M2 x E4M3.
    """
    dev = torch.device(device)
    what = "FP8 matmul (torch._scaled_mm)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, f"{what} needs a CUDA device: no CUDA device"
        major, minor = torch.cuda.get_device_capability(dev)
        if (major, minor) < MIN_CAPABILITY:
            need = ".".join(map(str, MIN_CAPABILITY))
            return False, f"{what} needs compute capability >= {need}, found {major}.{minor}"
        return True, ""
    if dev.type == "cpu":
        return _cpu_scaled_mm_mixed() if mixed else _cpu_scaled_mm_supports("tensorwise")
    return False, f"no torch._scaled_mm on device {str(device)!r}"


def select_backend(device: Union[str, torch.device], scaling: str, requested: str = "auto") -> tuple[str, str]:
    """Pick ``"cuda"``, ``"cpu"`` or ``"emulate"`` for tensors on ``device``; returns (backend, why).

    Probed at call time: the compute capability on CUDA, a tiny known-answer call on CPU.
    ``requested`` other than ``"auto"`` is honoured or raises saying why it cannot run.
    """
    if requested not in _BACKENDS:
        raise Fp8LinearError(f"backend={requested!r}; use one of {_BACKENDS}")
    dev = torch.device(device)
    if requested == "emulate":
        return "emulate", "emulation requested"
    if dev.type == "cuda":
        if requested == "cpu":
            raise Fp8LinearError("backend='cpu' requested but the tensors are on CUDA; move them or use backend='auto'")
        major, minor = torch.cuda.get_device_capability(dev)
        if (major, minor) >= MIN_CAPABILITY:
            return "cuda", f"torch._scaled_mm on compute capability {major}.{minor}"
        why = f"FP8 matmul needs compute capability >= 8.9, found {major}.{minor}"
        if requested == "cuda":
            raise Fp8LinearError(why + "; use backend='emulate'")
        return "emulate", why + ": emulated"
    if requested == "cuda":
        raise Fp8LinearError(f"backend='cuda' requested but the tensors are on {dev}; move them to a CUDA device")
    if dev.type == "cpu":
        ok, why = _cpu_scaled_mm_supports(scaling)
        if ok:
            return "cpu", why
        if requested == "cpu":
            raise Fp8LinearError(why + "; use backend='emulate'")
        return "emulate", why + ": emulated"
    if requested == "cpu":
        raise Fp8LinearError(f"backend='cpu' requested but the tensors are on {dev}")
    return "emulate", f"no native FP8 matmul on device type {dev.type!r}: emulated"


# ---------------------------------------------------------------------------
# Quantization helpers (never write to their inputs)


def _amax(x: Tensor, rowwise: bool) -> Tensor:
    """float32 amax over the last dim (rowwise, shape x.shape[:-1]) or overall (shape (1,)); no large copies."""
    if rowwise:
        lo, hi = torch.aminmax(x, dim=-1)
    else:
        lo, hi = torch.aminmax(x)
        lo, hi = lo.reshape(1), hi.reshape(1)
    return torch.maximum(hi.to(torch.float32), lo.to(torch.float32).neg())


def _dynamic_scale(amax: Tensor) -> Tensor:
    """amax / 448 (1.0 where amax is 0), nudged up by one ULP wherever amax / scale > 448."""
    s = amax / E4M3_MAX
    s = torch.where(amax == 0, torch.ones_like(s), s)  # NaN/inf amax stay NaN/inf: the group's outputs go NaN
    s = s.clamp(min=torch.finfo(torch.float32).tiny)
    over = (amax / s) > E4M3_MAX
    return torch.where(over, torch.nextafter(s, torch.full_like(s, math.inf)), s)


def quantize_activation(
    x: Tensor,
    scale: Tensor,
    *,
    k_padded: Optional[int] = None,
    saturate: bool = False,
) -> Tensor:
    """FP8 E4M3 copy of ``x / scale`` as a row-major (M, k_padded) tensor, zero-padded columns.

    ``x``: (..., K) any layout, read only. ``scale``: float32, shape (1,) (tensorwise) or
    x.shape[:-1] (rowwise). ``saturate``: divide into a temporary and clamp to +-448 before the
    cast (needed when some ``|x / scale|`` may exceed 448); otherwise the division writes the FP8
    result directly (one allocation).
    """
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    kp = k if k_padded is None else k_padded
    # a non-0-d float32 scale makes type promotion divide in float32 (one rounding to E4M3)
    s = scale.reshape((1,) * x.dim()) if scale.numel() == 1 else scale.reshape(lead + (1,))
    if kp == k:
        q = torch.empty(lead + (k,), dtype=_FP8, device=x.device)
        target = q
        q2 = q.view(m, k)
    else:
        q2 = torch.empty((m, kp), dtype=_FP8, device=x.device)
        q2[:, k:].zero_()
        target = q2[:, :k].view(lead + (k,))
    if saturate:
        tmp = torch.div(x, s).clamp_(-E4M3_MAX, E4M3_MAX)  # float32 temporary, clamped before the cast
        target.copy_(tmp)
    else:
        torch.div(x, s, out=target)
    return q2


def quantize_weight_rowwise(weight: Tensor, *, k_padded: Optional[int] = None,
                            n_padded: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Rowwise E4M3 quantization of a high-precision (N, K) weight: (q (Np, Kp), scale (Np,) float32).

    ``scale[n] = amax(|W[n, :]|) / 448`` (1.0 for zero rows and for padded rows); padded
    entries of ``q`` are zero. ``weight`` is read only.
    """
    n, k = weight.shape
    np_ = n if n_padded is None else n_padded
    kp = k if k_padded is None else k_padded
    s = _dynamic_scale(_amax(weight, rowwise=True))
    q = torch.empty((np_, kp), dtype=_FP8, device=weight.device)
    if np_ != n or kp != k:
        q.zero_()
    torch.div(weight, s.reshape(n, 1), out=q[:n, :k])
    if np_ != n:
        s = torch.cat([s, torch.ones(np_ - n, dtype=torch.float32, device=s.device)])
    return q, s


_SCALE_CHECKED: "dict[tuple, bool]" = {}


def _validated_static_scale(input_scale: Any, f32: dict) -> Tensor:
    """``input_scale`` as a (1,) float32 tensor, checked positive and finite.

    A Python number is checked on the host.  A device tensor is checked once per (storage, version):
    the first call reads it back (one sync); later calls with the same, unmodified scale buffer (a
    model's stored ``scale_input``) cost nothing.
    """
    if isinstance(input_scale, Tensor):
        key = (input_scale.device, input_scale.data_ptr(), input_scale._version, input_scale.numel())
        if key not in _SCALE_CHECKED:
            if input_scale.numel() != 1:
                raise Fp8LinearError(f"input_scale must have one element, got shape {tuple(input_scale.shape)}")
            val = float(input_scale.detach().reshape(()).float())
            if not (math.isfinite(val) and val > 0):
                raise Fp8LinearError(f"input_scale={val} must be positive and finite")
            if len(_SCALE_CHECKED) > 1024:
                _SCALE_CHECKED.clear()
            _SCALE_CHECKED[key] = True
        return input_scale.detach().to(**f32).reshape(1)
    val = float(input_scale)
    if not (math.isfinite(val) and val > 0):
        raise Fp8LinearError(f"input_scale={val} must be positive and finite")
    return torch.full((1,), val, **f32)


def _fused_quant_input(input: Tensor, plan: "LinearPlan", m: int, k: int) -> tuple[Optional[Tensor], str]:
    """``(x2d, "")`` when the one-pass Triton quantizer can read ``input`` as (m, k) rows, else ``(None, why)``.

    Taken at every size: at Wan's cross-attention k/v (512 x 5120) on an H200 (torch 2.11, Triton 3.6) a call
    cost 191 us (dynamic scale) / 156 us (static) on the fused path against 292 / 257 us on the eager one,
    which launches 11-15 small kernels and, with a static scale, synchronises once for its saturation check.
    """
    if plan.backend != "cuda" or input.device.type != "cuda":
        return None, ""
    if input.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None, f"input dtype {input.dtype}"
    if plan.k_padded > MAX_K:
        return None, f"K={plan.k_padded} > {MAX_K}"
    ok, why = triton_available()
    if not ok:
        return None, why
    if k > 1 and input.stride(-1) != 1:
        return None, f"last-dim stride {input.stride(-1)}"
    try:
        return input.view(m, k), ""
    except RuntimeError:
        return None, "rows do not merge into one (m, k) view"


def call_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor],
                   out_dtype: torch.dtype, use_fast_accum: bool = False) -> Tensor:
    """``torch._scaled_mm`` with keyword arguments, unwrapping the ``(out, amax)`` tuple of torch <= 2.4."""
    kwargs: dict[str, Any] = dict(scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    if bias is not None:
        kwargs["bias"] = bias
    if use_fast_accum:
        kwargs["use_fast_accum"] = True
    r = torch._scaled_mm(a, b, **kwargs)
    if isinstance(r, tuple):
        r = r[0]
    return r


# ---------------------------------------------------------------------------
# fp8_linear


def _aligned_copy(src: Tensor, shape: Sequence[int], dtype: torch.dtype, fill_zero: bool) -> Tensor:
    """A fresh (hence aligned, row-major) buffer of ``shape`` with ``src`` in its top-left corner."""
    buf = torch.empty(tuple(shape), dtype=dtype, device=src.device)
    if fill_zero:
        buf.zero_()
    idx = tuple(slice(0, s) for s in src.shape)
    buf[idx].copy_(src)
    return buf


def _log_plan(plan: LinearPlan) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    logger.debug("backend %s: %s", plan.backend, plan.backend_reason)
    for d in plan.decisions:
        if d.copied or d.absorbed or d.action == "epilogue":
            logger.debug("%s", d.describe())
    for e in plan.epilogue:
        logger.debug("epilogue: %s", e)


def fp8_linear_with_plan(
    input: Tensor,
    weight: Tensor,
    weight_scale: Optional[Tensor] = None,
    input_scale: Union[None, float, Tensor] = None,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "auto",
    rules: Optional[str] = None,
    use_fast_accum: bool = False,
) -> LinearResult:
    """:func:`fp8_linear`, returning the output together with its plan and kernel operands.

    Inference only: runs under ``torch.no_grad()`` (``_scaled_mm`` has no backward for this use).
    """
    with torch.no_grad():
        return _fp8_linear_impl(input, weight, weight_scale, input_scale, bias, out_dtype, backend, rules,
                                use_fast_accum)


def _fp8_linear_impl(input: Tensor, weight: Tensor, weight_scale: Optional[Tensor], input_scale: Any,
                     bias: Optional[Tensor], out_dtype: Optional[torch.dtype], backend: str, rules: Optional[str],
                     use_fast_accum: bool) -> LinearResult:
    out_dtype, scaling = _check_args(input, weight, weight_scale, input_scale, bias, out_dtype)
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise Fp8LinearError("fp8_linear needs tensors; plan_operands accepts layouts")
    dev = input.device
    for name, t in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias),
                    ("input_scale", input_scale if isinstance(input_scale, Tensor) else None)):
        if t is not None and t.device != dev:
            raise Fp8LinearError(f"{name} is on {t.device} but input is on {dev}; put every operand on one device")
    chosen, why = select_backend(dev, scaling, backend)
    plan = plan_operands(input, weight, weight_scale, input_scale, bias, out_dtype,
                         backend=chosen, backend_reason=why, rules=rules)
    _state.plan = plan
    _log_plan(plan)

    k, n, m = plan.k, plan.n, plan.m
    kp, np_ = plan.k_padded, plan.n_padded
    lead = tuple(input.shape[:-1])
    rowwise = plan.scaling == "rowwise"
    f32 = dict(dtype=torch.float32, device=dev)

    if m == 0:
        out = torch.zeros(lead + (n,), dtype=out_dtype, device=dev)
        return LinearResult(out, plan)

    # ---- B and scale_b
    dw = plan.decision("weight")
    if plan.weight_quantized:
        b_q, sb_vec = quantize_weight_rowwise(weight, k_padded=kp, n_padded=np_)
        scale_b = sb_vec.reshape(1, np_)
    else:
        if dw.action == "use":
            b_q = weight
        else:
            b_q = _aligned_copy(weight, (np_, kp), _FP8, fill_zero=(np_ != n or kp != k))
        ds = plan.decision("scale_b")
        if weight_scale is None:
            scale_b = torch.ones(1, **f32) if not rowwise else torch.ones(1, np_, **f32)
        elif not rowwise:
            scale_b = weight_scale.reshape(1) if ds.action == "use" else weight_scale.detach().to(**f32).reshape(1).clone()
        else:
            if ds.action == "use":
                scale_b = weight_scale.reshape(1, n)
            else:
                scale_b = torch.ones(1, np_, **f32)
                scale_b[0, :n].copy_(weight_scale.reshape(n))

    # ---- A and scale_a
    if input.dtype == _FP8:
        da = plan.decision("input")
        if da.action == "use":
            a_q = input.reshape(m, k)  # a view: the rows merge (checked by the plan)
        else:
            a_q = torch.empty((m, kp), dtype=_FP8, device=dev)
            if kp != k:
                a_q[:, k:].zero_()
            a_q[:, :k].view(lead + (k,)).copy_(input)
        s_in = (torch.as_tensor(input_scale, **f32) if input_scale is not None else torch.ones((), **f32))
        s_in = s_in.detach().to(**f32).reshape(1)
        scale_a = s_in.expand(m, 1).contiguous() if rowwise else (
            s_in if plan.decision("scale_a").action == "use" else s_in.clone())
    else:
        x2d = None
        fused_static = None
        if input_scale is not None:
            fused_static, _ = _fused_quant_input(input, plan, m, k)
        if fused_static is not None:
            # a static scale needs no pass over the input: one fused divide-clamp-cast (the clamp is a no-op
            # where the eager path would not saturate, so the numbers are the same) and no device sync
            s_in = _validated_static_scale(input_scale, f32)
            if plan.decision("scale_a").action == "copy":
                s_in = s_in.clone()
            x2d = fused_static
            a_q = scaled_cast(x2d, s_in, kp, out_shape=lead + (kp,))
            scale_a = s_in.expand(m, 1).contiguous() if rowwise else s_in
            plan = dataclasses.replace(plan, quantizer="triton-tensorwise")
            _state.plan = plan
        elif input_scale is not None:
            s_in = torch.as_tensor(input_scale, **f32).detach().to(**f32).reshape(1)
            if plan.decision("scale_a").action == "copy":
                s_in = s_in.clone()
            peak_t = torch.stack([_amax(input, rowwise=False)[0] / s_in[0], s_in[0]])
            peak, s_val = peak_t.tolist()  # one sync: validation + saturation decision
            if not (math.isfinite(s_val) and s_val > 0):
                raise Fp8LinearError(f"input_scale={s_val} must be positive and finite")
            saturate = not (peak <= E4M3_MAX)
            if saturate:
                logger.debug("input: values reach %.4g x input_scale beyond +-%g: clamped on a temporary copy",
                             peak, E4M3_MAX)
            scale_div = s_in
            scale_a = s_in.expand(m, 1).contiguous() if rowwise else s_in
        else:
            saturate = False
            x2d, why_not = _fused_quant_input(input, plan, m, k)
            quantizer = None
            if x2d is not None and rowwise:
                # one pass: row amax, scale and E4M3 values (bitwise the eager scheme below)
                a_q, s_row = rowwise_quantize(x2d, kp, out_shape=lead + (kp,))
                scale_a = s_row.reshape(m, 1)
                quantizer = "triton-rowwise"
            elif x2d is not None:
                # a per-tensor scale needs one read-only amax pass first; scale, division and cast are one pass
                a_q, scale_div = dynamic_tensorwise_quantize(x2d, kp, out_shape=lead + (kp,))
                scale_a = scale_div
                quantizer = "triton-tensorwise"
            else:
                amax = _amax(input, rowwise=rowwise)
                scale_div = _dynamic_scale(amax)
                scale_a = scale_div.reshape(m, 1) if rowwise else scale_div
            if quantizer is not None:
                plan = dataclasses.replace(plan, quantizer=quantizer)
                _state.plan = plan
                logger.debug("input: %s quantization (%d x %d)", quantizer, m, k)
            elif why_not:
                logger.debug("input: eager quantization (%s)", why_not)
        if x2d is None:
            a_q = quantize_activation(input, scale_div, k_padded=kp, saturate=saturate)

    # ---- bias
    kernel_bias: Optional[Tensor] = None
    if bias is not None and out_dtype != torch.float32:
        db = plan.decision("bias")
        if db.action == "use":
            kernel_bias = bias
        else:
            kernel_bias = torch.zeros(np_, dtype=out_dtype, device=dev)
            kernel_bias[:n].copy_(bias)

    # ---- matmul
    b_mat = b_q.t()  # (Kp, Np) column-major view of the row-major weight
    scales_in_epilogue = "rowwise scales" in plan.epilogue
    if plan.backend == "emulate":
        from harness.reference.formats import scaled_mm

        out2 = scaled_mm(a_q, b_mat, scale_a, scale_b, bias=kernel_bias, out_dtype=out_dtype)
    elif scales_in_epilogue:
        one = torch.ones(1, **f32)
        acc = call_scaled_mm(a_q, b_mat, one, one, None, torch.float32, use_fast_accum)
        acc.mul_(scale_a).mul_(scale_b)
        if kernel_bias is not None:
            acc.add_(kernel_bias.to(torch.float32))
        out2 = acc.to(out_dtype)
    else:
        out2 = call_scaled_mm(a_q, b_mat, scale_a, scale_b, kernel_bias, out_dtype, use_fast_accum)
    if bias is not None and out_dtype == torch.float32:
        if np_ != n:
            out2[:, :n].add_(bias.to(torch.float32))
        else:
            out2.add_(bias.to(torch.float32))
    if np_ != n:
        out2 = out2[:, :n].contiguous()
    out = out2.reshape(lead + (n,))
    return LinearResult(out=out, plan=plan, a=a_q, b=b_mat, scale_a=scale_a, scale_b=scale_b, bias=kernel_bias)


def fp8_linear(
    input: Tensor,
    weight: Tensor,
    weight_scale: Optional[Tensor] = None,
    input_scale: Union[None, float, Tensor] = None,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    *,
    backend: str = "auto",
    rules: Optional[str] = None,
    use_fast_accum: bool = False,
) -> Tensor:
    """FP8 E4M3 linear: ``input @ W.T + bias`` on ``torch._scaled_mm`` (see the module docstring).

    ``input``: (..., K) in any layout, float16/bfloat16/float32 (quantized here) or
    float8_e4m3fn (``input_scale`` is then its dequantization scale, default 1). ``weight``:
    (N, K), float8_e4m3fn (with optional ``weight_scale``: scalar or (N,)/(N, 1)) or high
    precision (quantized rowwise). ``bias``: (N,). ``out_dtype``: default the input's dtype
    (bfloat16 for an FP8 input). Returns (..., N), contiguous. Never writes to any argument.
    ``backend``: "auto" | "cuda" | "cpu" | "emulate"; ``rules``: None (the backend's own
    requirements) or "cuda" (apply the CUDA kernel's layout rules on any backend).
    The plan of the call is available from :func:`last_plan`.
    """
    return fp8_linear_with_plan(input, weight, weight_scale, input_scale, bias, out_dtype,
                                backend=backend, rules=rules, use_fast_accum=use_fast_accum).out
