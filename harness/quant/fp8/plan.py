"""Operand decisions for the FP8 linear: copy reasons, the immutable :class:`LinearPlan`, and how it is built.

Pure: everything here reads shapes, strides, dtypes and pointer alignment (tensors, ``meta`` tensors or
``harness.layouts.LayoutSpec``), never values and never the device. :func:`plan_operands` is the public
entry; :func:`build_plan` is what ``fp8_linear`` caches per layout signature (it also decides which
activation quantizer the call takes, which needs real tensors).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from harness.quant._geom import Geom
from harness.quant._triton_quant import MAX_K, triton_available
from harness.quant.fp8.config import (
    DIM_MULTIPLE,
    FP8,
    HIGH_DTYPES,
    KERNEL_ALIGNMENT,
    OUT_DTYPES,
    RULES,
    Fp8LinearConfig,
    Fp8LinearError,
)

__all__ = [
    "CopyReason",
    "OperandDecision",
    "LinearPlan",
    "copy_reasons",
    "plan_operands",
    "resolve_config",
    "build_plan",
]

# Roles understood by copy_reasons (aliases map onto the kernel operand names).
_ROLE_ALIASES = {
    "input": "a",
    "a": "a",
    "weight": "b",
    "b": "b",
    "scale_a": "scale_a",
    "scale_b": "scale_b",
    "bias": "bias",
    "out": "out",
}


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _rows_view(g: Geom) -> Optional[tuple[int, int]]:
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
    needs: leading dims that merge into rows, and a bias of stride 1. Pure: reads metadata only, never the values.
    """
    if role not in _ROLE_ALIASES:
        raise ValueError(f"role={role!r}; use one of {sorted(_ROLE_ALIASES)}")
    if rules not in RULES:
        raise ValueError(f"rules={rules!r}; use 'cuda' (the CUDA kernel's requirements) or 'none'")
    kind = _ROLE_ALIASES[role]
    g = Geom.of(x)
    reasons: list[CopyReason] = []
    al = KERNEL_ALIGNMENT
    if kind in ("a", "b", "out"):
        if len(g.shape) < 1 or (kind != "a" and len(g.shape) != 2):
            want = "(..., K)" if kind == "a" else "2-D"
            return [CopyReason("shape", f"{role} has shape {g.shape}; expected {want}")]
        rv = _rows_view(g)
        if rv is None:
            reasons.append(
                CopyReason(
                    "rows",
                    f"{role} leading dims {g.shape[:-1]} with strides {g.strides[:-1]} cannot be "
                    "merged into one row dimension without a copy",
                )
            )
        if rules == "none":
            return reasons
        last = g.strides[-1]
        if g.shape[-1] > 1 and last != 1:
            major = {
                "a": "A must be row-major",
                "b": "B must be column-major (weight row-major)",
                "out": "out must be row-major",
            }[kind]
            reasons.append(CopyReason("last_stride", f"{role} last-dim stride is {last}, the kernel needs 1 ({major})"))
        if rv is not None and rv[0] > 1 and (last == 1 or g.shape[-1] == 1):
            ld = rv[1]
            k = g.shape[-1]
            if ld < k:
                reasons.append(CopyReason("ld", f"{role} row stride {ld} is smaller than the row length {k}"))
            elif (ld * g.itemsize) % al:
                reasons.append(
                    CopyReason(
                        "ld",
                        f"{role} leading dimension is {ld} elements = {ld * g.itemsize} bytes, not a multiple of {al}",
                    )
                )
        if g.ptr_align < al:
            reasons.append(
                CopyReason(
                    "ptr",
                    f"{role} data pointer is {g.ptr_align}-byte aligned (storage offset {g.offset} "
                    f"elements of {g.itemsize} B), the kernel needs {al}",
                )
            )
        k = g.shape[-1]
        if kind in ("a", "b") and k % DIM_MULTIPLE:
            reasons.append(
                CopyReason(
                    "k_multiple",
                    f"K={k} is not a multiple of {DIM_MULTIPLE}: zero-padded to {_ceil_to(k, DIM_MULTIPLE)}",
                )
            )
        if kind == "b" and g.shape[0] % DIM_MULTIPLE:
            n = g.shape[0]
            reasons.append(
                CopyReason(
                    "n_multiple",
                    f"N={n} is not a multiple of {DIM_MULTIPLE}: zero-padded to {_ceil_to(n, DIM_MULTIPLE)}",
                )
            )
        return reasons
    if kind in ("scale_a", "scale_b"):
        if g.dtype != torch.float32:
            reasons.append(CopyReason("dtype", f"{role} has dtype {g.dtype}, the kernel needs torch.float32"))
        if rules == "none":
            return reasons
        if g.numel > 1:
            nontrivial = [(s, st) for s, st in zip(g.shape, g.strides) if s != 1]
            if len(nontrivial) != 1 or nontrivial[0][1] != 1:
                reasons.append(
                    CopyReason(
                        "contiguity",
                        f"{role} of shape {g.shape} has strides {g.strides}; rowwise scales must be contiguous",
                    )
                )
        if g.ptr_align < al:
            reasons.append(
                CopyReason("ptr", f"{role} data pointer is {g.ptr_align}-byte aligned, the kernel needs {al}")
            )
        return reasons
    # bias
    if len(g.shape) != 1:
        return [CopyReason("shape", f"bias has shape {g.shape}; expected (N,)")]
    if out_dtype is not None and g.dtype != out_dtype:
        reasons.append(CopyReason("dtype", f"bias dtype {g.dtype} differs from the output dtype {out_dtype}"))
    if g.shape[0] > 1 and g.strides[0] != 1:  # every kernel: CPU torch._scaled_mm reads bias as packed, whatever
        # its strides (a stride-0 bias reads past its storage; found by harness.explore on torch 2.13 CPU)
        reasons.append(CopyReason("contiguity", f"bias stride is {g.strides[0]}, the kernel needs 1"))
    if rules == "none":
        return reasons
    if g.ptr_align < al:
        reasons.append(CopyReason("ptr", f"bias data pointer is {g.ptr_align}-byte aligned, the kernel needs {al}"))
    if g.shape[0] % DIM_MULTIPLE:
        reasons.append(
            CopyReason("n_multiple", f"bias has N={g.shape[0]}, zero-padded to {_ceil_to(g.shape[0], DIM_MULTIPLE)}")
        )
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
        return {
            "role": self.role,
            "action": self.action,
            "reasons": [r._asdict() for r in self.reasons],
            "absorbed": [r._asdict() for r in self.absorbed],
        }


@dataclass(frozen=True)
class LinearPlan:
    """Every decision one ``fp8_linear`` call made (or would make, from :func:`plan_operands`).

    Built once per layout signature and never changed afterwards (``fp8_linear`` caches it).
    """

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
    #: why a high-precision activation takes the eager quantizer on CUDA ("" when it does not, or off CUDA)
    quantizer_reason: str = ""
    #: the resolved scaling scheme (concrete out_dtype, weight and input scaling); backend is the one requested
    config: Optional[Fp8LinearConfig] = None

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
        head = (
            f"fp8_linear M={self.m} K={self.k} N={self.n} (padded K={self.k_padded}, N={self.n_padded}) "
            f"{self.scaling} ({self.input_scaling} input) out={self.out_dtype} backend={self.backend} "
            f"({self.backend_reason}); rules={self.rules}; quantizer={self.quantizer}"
        )
        lines = [head] + ["  " + d.describe() for d in self.decisions]
        if self.epilogue:
            lines.append("  epilogue: " + ", ".join(self.epilogue))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "rules": self.rules,
            "quantizer": self.quantizer,
            "scaling": self.scaling,
            "input_scaling": self.input_scaling,
            "weight_quantized": self.weight_quantized,
            "m": self.m,
            "k": self.k,
            "n": self.n,
            "k_padded": self.k_padded,
            "n_padded": self.n_padded,
            "out_dtype": str(self.out_dtype).replace("torch.", ""),
            "decisions": [d.to_dict() for d in self.decisions],
            "epilogue": list(self.epilogue),
            "copies": self.copies,
        }


# ---------------------------------------------------------------------------
# Building a plan


def _dtype_of(x: Any) -> torch.dtype:
    if isinstance(x, Tensor):
        return x.dtype
    if hasattr(x, "torch_dtype"):
        return x.torch_dtype
    raise TypeError(f"expected a tensor or LayoutSpec, got {type(x).__name__}")


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_args(
    input: Any, weight: Any, weight_scale: Any, input_scale: Any, bias: Any, out_dtype: Optional[torch.dtype]
) -> tuple[torch.dtype, str]:
    """Validate dtypes and shapes; return (out_dtype, scaling)."""
    for name, v in (("input", input), ("weight", weight)):
        if not (isinstance(v, Tensor) or hasattr(v, "torch_dtype")):
            raise Fp8LinearError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    in_dt, w_dt = _dtype_of(input), _dtype_of(weight)
    ishape, wshape = _shape_of(input), _shape_of(weight)
    if in_dt not in HIGH_DTYPES + (FP8,):
        raise Fp8LinearError(
            f"input dtype {in_dt} is not supported; pass float16/bfloat16/float32 activations "
            "(or float8_e4m3fn with input_scale as its dequantization scale)"
        )
    if len(ishape) < 1:
        raise Fp8LinearError(f"input is 0-d (shape {ishape}); pass a tensor of shape (..., in_features)")
    if len(wshape) != 2:
        raise Fp8LinearError(f"weight must be 2-D (out_features, in_features), got shape {wshape}")
    if w_dt == torch.float8_e5m2:
        raise Fp8LinearError(
            "weight dtype float8_e5m2 is not supported: fp8_linear multiplies E4M3 x E4M3; "
            "pass the high-precision weight (it is quantized rowwise) or an E4M3 weight"
        )
    if w_dt not in HIGH_DTYPES + (FP8,):
        raise Fp8LinearError(f"weight dtype {w_dt} is not supported; pass float8_e4m3fn or float16/bfloat16/float32")
    n, k = wshape
    if ishape[-1] != k:
        raise Fp8LinearError(
            f"input has {ishape[-1]} features (shape {ishape}) but weight {wshape} expects in_features={k}"
        )
    if out_dtype is None:
        out_dtype = torch.bfloat16 if in_dt == FP8 else in_dt
    if out_dtype not in OUT_DTYPES:
        raise Fp8LinearError(
            f"out_dtype={out_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32"
        )
    scaling = "tensorwise"
    if w_dt != FP8:
        if weight_scale is not None:
            raise Fp8LinearError(
                f"weight_scale was given for a {w_dt} weight; it only applies to an FP8 weight "
                "(a high-precision weight is quantized here with its own rowwise scale)"
            )
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
                f"weight_scale has shape {ws}; use a scalar (tensorwise) or ({n},) / ({n}, 1) (rowwise) for N={n}"
            )
        if not _dtype_of(weight_scale).is_floating_point:
            raise Fp8LinearError(f"weight_scale has dtype {_dtype_of(weight_scale)}; pass a float32 tensor")
    if input_scale is not None:
        if isinstance(input_scale, (int, float)) and not isinstance(input_scale, bool):
            if not (math.isfinite(input_scale) and input_scale > 0):
                raise Fp8LinearError(f"input_scale={input_scale} must be positive and finite")
        elif isinstance(input_scale, Tensor) or hasattr(input_scale, "torch_dtype"):
            if math.prod(_shape_of(input_scale)) != 1:
                raise Fp8LinearError(
                    f"input_scale has shape {_shape_of(input_scale)}; pass a scalar (one scale for the whole input)"
                )
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


def resolve_config(
    input: Any,
    weight: Any,
    weight_scale: Any = None,
    input_scale: Any = None,
    bias: Any = None,
    config: Optional[Fp8LinearConfig] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    rules: Optional[str] = None,
    use_fast_accum: bool = False,
) -> Fp8LinearConfig:
    """The scaling scheme of one call, with a concrete ``out_dtype``, ``weight_scaling`` and ``input_scaling``.

    Without ``config`` it is derived from the arguments, as ``fp8_linear`` always did: the weight scale's
    shape says tensorwise or rowwise, a given ``input_scale`` (or an FP8 input) makes the input static. With
    ``config`` the operands must agree with it (an FP8 weight without ``weight_scale`` may be declared
    rowwise: unit row scales), and ``out_dtype`` / ``backend`` / ``rules`` / ``use_fast_accum`` belong in it.
    Also validates the operands' dtypes and shapes (:class:`Fp8LinearError` naming the value and the fix).
    """
    if config is None:
        cfg = Fp8LinearConfig(out_dtype=out_dtype, backend=backend, rules=rules, use_fast_accum=bool(use_fast_accum))
    elif not isinstance(config, Fp8LinearConfig):
        raise Fp8LinearError(f"config must be an Fp8LinearConfig, got {type(config).__name__}")
    else:
        for name, value, default in (
            ("out_dtype", out_dtype, None),
            ("backend", backend, "auto"),
            ("rules", rules, None),
            ("use_fast_accum", use_fast_accum, False),
        ):
            if value != default:
                raise Fp8LinearError(
                    f"{name}={value!r} was passed together with config= (config.{name}={getattr(config, name)!r}); "
                    f"set it in the config instead: dataclasses.replace(config, {name}=...)"
                )
        cfg = config
    out, implied = _check_args(input, weight, weight_scale, input_scale, bias, cfg.out_dtype)
    input_fp8 = _dtype_of(input) == FP8
    input_scaling = "static" if (input_fp8 or input_scale is not None) else "dynamic"
    scaling = implied
    if config is not None:
        want = config.weight_scaling
        if want != implied and not (_dtype_of(weight) == FP8 and weight_scale is None):
            if weight_scale is None:
                raise Fp8LinearError(
                    f"config.weight_scaling={want!r} but the weight is {_dtype_of(weight)}, which is quantized here "
                    "rowwise; use weight_scaling='rowwise' or pass an FP8 weight"
                )
            ws = _shape_of(weight_scale)
            fix = "a scalar weight_scale" if want == "tensorwise" else f"a ({_shape_of(weight)[0]},) weight_scale"
            raise Fp8LinearError(
                f"weight_scale has shape {ws}, which means {implied} scaling, but config.weight_scaling={want!r}; "
                f"pass {fix} or use weight_scaling={implied!r}"
            )
        scaling = want
        if config.input_scaling != input_scaling:
            if input_fp8:
                raise Fp8LinearError(
                    "config.input_scaling='dynamic' but the input is float8_e4m3fn, already quantized with a static "
                    "scale (input_scale, default 1); use input_scaling='static'"
                )
            if input_scale is None:
                raise Fp8LinearError(
                    "config.input_scaling='static' but no input_scale was given; pass input_scale= "
                    "or use input_scaling='dynamic'"
                )
            raise Fp8LinearError(
                "input_scale was given but config.input_scaling='dynamic'; drop input_scale or use "
                "input_scaling='static'"
            )
    return dataclasses.replace(cfg, out_dtype=out, weight_scaling=scaling, input_scaling=input_scaling)


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
    config: Optional[Fp8LinearConfig] = None,
) -> LinearPlan:
    """Decide, from layouts alone, what :func:`fp8_linear` does with each operand on ``backend``.

    Pure: reads shapes, strides, dtypes and pointer alignment (tensors, meta tensors or
    ``LayoutSpec``s), never values and never the device. ``backend`` is a concrete backend
    (``"cuda"``, ``"cpu"``, ``"emulate"``); ``rules`` defaults to ``"cuda"`` for the CUDA backend
    and ``"none"`` otherwise. ``config``: a declared :class:`Fp8LinearConfig` (then ``out_dtype``
    and ``rules`` come from it).
    """
    if backend not in ("cuda", "cpu", "emulate"):
        raise ValueError(f"backend={backend!r}; plan for 'cuda', 'cpu' or 'emulate'")
    if rules is not None and rules not in RULES:
        raise ValueError(f"rules={rules!r}; use 'cuda' or 'none'")
    cfg = resolve_config(input, weight, weight_scale, input_scale, bias, config, out_dtype=out_dtype, rules=rules)
    return _plan(input, weight, weight_scale, input_scale, bias, cfg, backend, backend_reason)


def _plan(
    input: Any,
    weight: Any,
    weight_scale: Any,
    input_scale: Any,
    bias: Any,
    cfg: Fp8LinearConfig,
    backend: str,
    backend_reason: str,
) -> LinearPlan:
    """The operand decisions under a resolved ``cfg`` (see :func:`resolve_config`)."""
    rules = cfg.rules if cfg.rules is not None else ("cuda" if backend == "cuda" else "none")
    out_dtype, scaling = cfg.out_dtype, cfg.weight_scaling
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
    if in_dt == FP8:
        input_scaling = "static"
        decisions.append(OperandDecision("input", "copy" if a_reasons else "use", a_reasons))
    else:
        input_scaling = (
            "static" if input_scale is not None else ("dynamic-row" if scaling == "rowwise" else "dynamic-tensor")
        )
        decisions.append(OperandDecision("input", "quantize", (), a_reasons))

    # weight / B
    b_reasons = tuple(copy_reasons(weight, "weight", rules=rules))
    if w_dt == FP8:
        pad_only = b_reasons and all(r.code in ("k_multiple", "n_multiple") for r in b_reasons)
        action = "pad" if pad_only else ("copy" if b_reasons else "use")
        decisions.append(OperandDecision("weight", action, b_reasons))
    else:
        decisions.append(OperandDecision("weight", "quantize", (), b_reasons))

    # scale_a
    if isinstance(input_scale, Tensor) or hasattr(input_scale, "torch_dtype"):
        if scaling == "rowwise":
            decisions.append(
                OperandDecision(
                    "scale_a",
                    "derive",
                    (
                        CopyReason(
                            "shape",
                            f"rowwise scaling needs scale_a of shape ({m}, 1): input_scale broadcast to every row",
                        ),
                    ),
                )
            )
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
        decisions.append(
            OperandDecision(
                "scale_b", ("pad" if np_ != n and scaling == "rowwise" else "copy") if r else "use", tuple(r)
            )
        )
    else:
        decisions.append(OperandDecision("scale_b", "derive"))

    # bias
    if bias is not None:
        if out_dtype == torch.float32:
            decisions.append(
                OperandDecision(
                    "bias",
                    "epilogue",
                    (
                        CopyReason(
                            "dtype", "_scaled_mm takes no bias with a float32 output: added to the float32 result"
                        ),
                    ),
                )
            )
            epilogue.append("bias")
        else:
            r = tuple(copy_reasons(bias, "bias", rules=rules, out_dtype=out_dtype))
            action = "use"
            if r:
                action = (
                    "cast"
                    if any(x.code == "dtype" for x in r)
                    else ("pad" if all(x.code == "n_multiple" for x in r) else "copy")
                )
            decisions.append(OperandDecision("bias", action, r))

    # out
    decisions.append(OperandDecision("out", "alloc"))
    if scaling == "rowwise" and backend == "cuda" and out_dtype != torch.bfloat16 and _torch_version() < (2, 7):
        epilogue.insert(0, "rowwise scales")  # old torch: rowwise kernels emit bf16 only
    if np_ != n:
        epilogue.append("compact output")
    return LinearPlan(
        backend=backend,
        backend_reason=backend_reason,
        rules=rules,
        scaling=scaling,
        input_scaling=input_scaling,
        weight_quantized=w_dt != FP8,
        m=m,
        k=k,
        n=n,
        k_padded=kp,
        n_padded=np_,
        out_dtype=out_dtype,
        decisions=tuple(decisions),
        epilogue=tuple(epilogue),
        config=cfg,
    )


def _quantizer(input: Tensor, plan: LinearPlan) -> tuple[str, str]:
    """(quantizer, why not Triton): the one-pass Triton quantizers when they can read ``input`` as (m, k) rows.

    Taken at every size: at Wan's cross-attention k/v (512 x 5120) on an H200 (torch 2.11, Triton 3.6) a call
    cost 191 us (dynamic scale) / 156 us (static) on the fused path against 292 / 257 us on the eager one,
    which launches 11-15 small kernels and, with a static scale, synchronises once for its saturation check.
    """
    if plan.m == 0 or input.dtype == FP8 or plan.backend != "cuda" or input.device.type != "cuda":
        return "eager", ""
    if input.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "eager", f"input dtype {input.dtype}"
    if plan.k_padded > MAX_K:
        return "eager", f"K={plan.k_padded} > {MAX_K}"
    ok, why = triton_available()
    if not ok:
        return "eager", why
    if plan.k > 1 and input.stride(-1) != 1:
        return "eager", f"last-dim stride {input.stride(-1)}"
    try:
        input.view(plan.m, plan.k)
    except RuntimeError:
        return "eager", "rows do not merge into one (m, k) view"
    if plan.input_scaling == "dynamic-row":
        return "triton-rowwise", ""  # one pass: row amax, scale and E4M3 values
    return "triton-tensorwise", ""  # a static scale, or an amax pass then one fused divide-clamp-cast pass


def build_plan(
    input: Tensor,
    weight: Tensor,
    weight_scale: Optional[Tensor],
    input_scale: Any,
    bias: Optional[Tensor],
    cfg: Fp8LinearConfig,
    backend: str,
    backend_reason: str,
) -> LinearPlan:
    """The complete plan of one ``fp8_linear`` call on real tensors: operand decisions and the quantizer."""
    plan = _plan(input, weight, weight_scale, input_scale, bias, cfg, backend, backend_reason)
    quantizer, why = _quantizer(input, plan)
    return dataclasses.replace(plan, quantizer=quantizer, quantizer_reason=why)
