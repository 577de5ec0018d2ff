"""The declared scaling scheme of an FP8 linear: a frozen, validated :class:`Fp8LinearConfig`.

In the style of torchao's ``Float8LinearConfig``: a frozen dataclass whose ``__post_init__`` rejects
values it does not know, naming the value and the fix. ``fp8_linear(...)`` derives one from its
arguments (:func:`harness.quant.fp8.plan.resolve_config`); new code can pass ``config=`` instead, and an
operand that contradicts it (a ``weight_scale`` whose shape says rowwise under a tensorwise config, a
missing static ``input_scale``) is an :class:`Fp8LinearError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "E4M3_MAX",
    "KERNEL_ALIGNMENT",
    "DIM_MULTIPLE",
    "MIN_CAPABILITY",
    "WEIGHT_SCALINGS",
    "INPUT_SCALINGS",
    "Fp8LinearError",
    "Fp8LinearConfig",
]

#: Largest finite FP8 E4M3FN value.
E4M3_MAX = 448.0
#: Byte alignment cuBLASLt needs for every data pointer and leading dimension (measured, quant-numerics §2).
KERNEL_ALIGNMENT = 16
#: K and N must be multiples of this for ``_scaled_mm``.
DIM_MULTIPLE = 16
#: FP8 matmul needs compute capability 8.9 (Ada) or >= 9.0.
MIN_CAPABILITY = (8, 9)

#: "tensorwise": one weight scale (scalar or none); "rowwise": one per output row, (N,) / (N, 1).
WEIGHT_SCALINGS = ("tensorwise", "rowwise")
#: "dynamic": the input's scale is computed from its amax on every call; "static": the caller's ``input_scale``.
INPUT_SCALINGS = ("dynamic", "static")

FP8 = torch.float8_e4m3fn
HIGH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "cuda", "cpu", "emulate")
RULES = ("cuda", "none")


class Fp8LinearError(ValueError):
    """Bad arguments to :func:`fp8_linear`; the message names the value and the fix."""


@dataclass(frozen=True)
class Fp8LinearConfig:
    """How one FP8 linear scales and where it runs; hashable, so it is part of the plan cache's key.

    ``weight_scaling``: "tensorwise" | "rowwise" (a high-precision weight is always quantized rowwise).
    ``input_scaling``: "dynamic" (amax per tensor, or per row when rowwise) | "static" (``input_scale``;
    an FP8 input is always static: ``input_scale`` is its dequantization scale, default 1).
    ``out_dtype``: bfloat16 | float16 | float32, or None for the input's dtype (bfloat16 for an FP8 input).
    ``backend``: "auto" | "cuda" | "cpu" | "emulate". ``rules``: None (the backend's own layout
    requirements) or "cuda" / "none". ``use_fast_accum``: passed to ``_scaled_mm``.
    """

    weight_scaling: str = "tensorwise"
    input_scaling: str = "dynamic"
    out_dtype: Optional[torch.dtype] = None
    backend: str = "auto"
    rules: Optional[str] = None
    use_fast_accum: bool = False

    def __post_init__(self) -> None:
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise Fp8LinearError(f"weight_scaling={self.weight_scaling!r}; use one of {WEIGHT_SCALINGS}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise Fp8LinearError(f"input_scaling={self.input_scaling!r}; use one of {INPUT_SCALINGS}")
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise Fp8LinearError(
                f"out_dtype={self.out_dtype}; use torch.bfloat16, torch.float16, torch.float32 or None (the input's)"
            )
        if self.backend not in BACKENDS:
            raise Fp8LinearError(f"backend={self.backend!r}; use one of {BACKENDS}")
        if self.rules is not None and self.rules not in RULES:
            raise Fp8LinearError(f"rules={self.rules!r}; use None (the backend's own), 'cuda' or 'none'")
        if not isinstance(self.use_fast_accum, bool):
            raise Fp8LinearError(f"use_fast_accum={self.use_fast_accum!r}; pass True or False")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (dtypes as their short names)."""
        return {
            "weight_scaling": self.weight_scaling,
            "input_scaling": self.input_scaling,
            "out_dtype": None if self.out_dtype is None else str(self.out_dtype).replace("torch.", ""),
            "backend": self.backend,
            "rules": self.rules,
            "use_fast_accum": self.use_fast_accum,
        }
