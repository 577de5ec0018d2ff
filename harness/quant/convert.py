"""Swap a model's ``nn.Linear`` layers for FP8 ones, and back.

``convert_to_fp8(model)`` replaces every ``nn.Linear`` whose qualified name contains none of
``params_to_keep`` (substring match, as WanVideoWrapper's ``convert_fp8_linear`` does) by an
:class:`FP8Linear` holding the FP8 E4M3 weight and its scale, whose forward is
``harness.quant.fp8_linear`` (or a legacy/plug-in forward, for reproducing user setups).
``revert_fp8(model)`` puts the original ``nn.Linear`` objects back -- the same objects, so
weights and everything else are restored exactly. The originals are kept (on their device)
until reverted; pass ``keep_originals=False`` to drop them when memory matters.

Weight scaling (``weight_scaling``): ``"tensor"`` (one float32 scale ``amax / 448``, the layout
of scaled FP8 checkpoints), ``"row"`` (one per output channel), or ``"none"`` (an unscaled
checkpoint: the weight is clamped to +-448 and cast, no scale stored). Scales use the same
one-ULP nudge as ``fp8_linear`` so no weight is ever saturated by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from harness.quant.legacy import FP8_FORWARD_KEEP
from harness.quant.linear import (
    E4M3_MAX,
    _amax,
    _dynamic_scale,
    fp8_linear,
    quantize_activation,
    quantize_weight_rowwise,
)

__all__ = [
    "DEFAULT_KEEP",
    "FP8Linear",
    "ConversionReport",
    "convert_to_fp8",
    "revert_fp8",
    "quantize_weight",
]

#: Name keywords kept in high precision by default: WanVideoWrapper's list plus the user's
#: ``multitalk_audio_proj`` fix (quant-numerics §3; ``audio_proj`` already matches it by substring).
DEFAULT_KEEP: tuple[str, ...] = FP8_FORWARD_KEEP + ("multitalk_audio_proj",)

_ORIGINALS = "_harness_fp8_originals"
_SCALINGS = ("tensor", "row", "none")


def quantize_weight(weight: Tensor, weight_scaling: str = "tensor") -> tuple[Tensor, Optional[Tensor]]:
    """E4M3 copy of a high-precision (N, K) weight and its float32 dequantization scale.

    ``"tensor"``: scale shape () = amax/448; ``"row"``: shape (N,); ``"none"``: no scale, values
    clamped to +-448 (on a copy) before the cast. ``weight`` is never modified.
    """
    if weight_scaling not in _SCALINGS:
        raise ValueError(f"weight_scaling={weight_scaling!r}; use one of {_SCALINGS}")
    w = weight.detach()
    if weight_scaling == "none":
        return torch.clamp(w.to(torch.float32), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), None
    if weight_scaling == "row":
        return quantize_weight_rowwise(w)
    s = _dynamic_scale(_amax(w, rowwise=False))
    return quantize_activation(w, s.reshape(1)), s.reshape(())


ForwardFn = Callable[[nn.Module, torch.dtype, Tensor], Tensor]


class FP8Linear(nn.Module):
    """A linear layer holding an FP8 E4M3 weight ``(out_features, in_features)``.

    Attributes use the names of scaled FP8 checkpoints: ``weight`` (FP8), ``scale_weight``
    (float32 scalar or (N,), or None), ``scale_input`` (float32 scalar or None), ``bias`` (high
    precision). ``forward(x)`` = ``fp8_linear(x, weight, scale_weight, scale_input, bias,
    out_dtype)``, or ``forward_fn(self, base_dtype, x)`` when a legacy / plug-in forward is set.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight: Tensor,
        scale_weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        scale_input: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
        forward_fn: Optional[ForwardFn] = None,
    ) -> None:
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (out_features, in_features):
            raise ValueError(
                f"weight must be float8_e4m3fn of shape ({out_features}, {in_features}), "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("scale_weight", scale_weight)
        self.register_buffer("scale_input", scale_input)
        self.out_dtype = out_dtype
        self.forward_fn = forward_fn

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        weight_scaling: str = "tensor",
        input_scale: Optional[float] = None,
        out_dtype: Optional[torch.dtype] = None,
        forward_fn: Optional[ForwardFn] = None,
    ) -> "FP8Linear":
        """Quantize ``linear``'s weight (see :func:`quantize_weight`); ``linear`` is left untouched."""
        q, s = quantize_weight(linear.weight, weight_scaling)
        si = (
            None
            if input_scale is None
            else torch.tensor(float(input_scale), dtype=torch.float32, device=linear.weight.device)
        )
        return cls(linear.in_features, linear.out_features, q, s, linear.bias, si, out_dtype, forward_fn)

    def forward(self, x: Tensor) -> Tensor:
        if self.forward_fn is not None:
            return self.forward_fn(self, self.out_dtype or x.dtype, x)
        return fp8_linear(x, self.weight, self.scale_weight, self.scale_input, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        s = "none" if self.scale_weight is None else ("tensor" if self.scale_weight.numel() == 1 else "row")
        fwd = "fp8_linear" if self.forward_fn is None else getattr(self.forward_fn, "__name__", "custom")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_scaling={s}, forward={fwd}"
        )


@dataclass
class ConversionReport:
    """What :func:`convert_to_fp8` did: ``converted`` names, ``kept`` {name: matching keyword}."""

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why (already FP8, excluded by filter)

    def to_dict(self) -> dict[str, Any]:
        return {"converted": list(self.converted), "kept": dict(self.kept), "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        return f"converted {len(self.converted)} linear(s), kept {len(self.kept)} in high precision" + (
            f", skipped {len(self.skipped)}" if self.skipped else ""
        )


def _set_child(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert_to_fp8(
    module: nn.Module,
    params_to_keep: Sequence[str] = DEFAULT_KEEP,
    *,
    weight_scaling: str = "tensor",
    input_scale: Optional[float] = None,
    out_dtype: Optional[torch.dtype] = None,
    forward_fn: Optional[ForwardFn] = None,
    filter: Optional[Callable[[str, nn.Linear], bool]] = None,
    keep_originals: bool = True,
) -> ConversionReport:
    """Replace ``nn.Linear`` submodules of ``module`` by :class:`FP8Linear`, in place; returns a report.

    A linear is kept in high precision when its qualified name contains any of
    ``params_to_keep`` (the report names the keyword) or ``filter(name, linear)`` is False.
    ``forward_fn`` (e.g. a ``harness.quant.legacy`` forward) replaces ``fp8_linear`` as the
    forward. Converting twice converts only what is still ``nn.Linear``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.Linear):
        raise ValueError(
            "convert_to_fp8 converts the linears *inside* a module; wrap a bare nn.Linear in a container "
            "(e.g. nn.Sequential(linear)) or use FP8Linear.from_linear"
        )
    if isinstance(params_to_keep, str):
        raise TypeError(f"params_to_keep={params_to_keep!r} must be a sequence of keywords, not one string")
    if weight_scaling not in _SCALINGS:
        raise ValueError(f"weight_scaling={weight_scaling!r}; use one of {_SCALINGS}")
    report = ConversionReport()
    originals: dict[str, nn.Linear] = module.__dict__.setdefault(_ORIGINALS, {}) if keep_originals else {}
    for name, sub in list(module.named_modules()):
        if isinstance(sub, FP8Linear):
            report.skipped[name] = "already FP8Linear"
            continue
        if not isinstance(sub, nn.Linear):
            continue
        hit = next((kw for kw in params_to_keep if kw in name), None)
        if hit is not None:
            report.kept[name] = hit
            continue
        if filter is not None and not filter(name, sub):
            report.skipped[name] = "excluded by filter"
            continue
        new = FP8Linear.from_linear(
            sub, weight_scaling=weight_scaling, input_scale=input_scale, out_dtype=out_dtype, forward_fn=forward_fn
        )
        _set_child(module, name, new)
        if keep_originals:
            originals[name] = sub
        report.converted.append(name)
    return report


def revert_fp8(module: nn.Module) -> list[str]:
    """Put back the original ``nn.Linear`` objects replaced by :func:`convert_to_fp8`; returns their names."""
    originals: Optional[dict[str, nn.Linear]] = module.__dict__.get(_ORIGINALS)
    if not originals:
        if any(isinstance(m, FP8Linear) for m in module.modules()):
            raise RuntimeError(
                "this module has FP8Linear layers but no originals to restore (converted with keep_originals=False?)"
            )
        return []
    restored = []
    for name, orig in list(originals.items()):
        _set_child(module, name, orig)
        restored.append(name)
    module.__dict__.pop(_ORIGINALS, None)
    return restored
