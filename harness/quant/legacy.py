"""Reproductions of the FP8 linear forwards found in the wild, so the harness can test them.

Written from the descriptions in ``quant-numerics.md`` §3 (this project's own code). They are
*faithful*, defects included -- the harness exists to catch those defects, so fixing them here
would hide them:

``wanvideo_early2025_forward``
    3-D input only (anything else takes the module's original forward). Casts the input,
    reshaped to (-1, K), to the *other* FP8 type than the weight's (E5M2 for an E4M3 weight)
    without clamping; scales are ``torch.ones(1)`` (a stored ``scale_weight`` is ignored);
    unwraps a tuple result; reshapes to (-1, S, N).
``wanvideo_late2025_forward`` ("before the fix")
    3-D input only. ``scale_weight`` = the stored one squeezed, or a ones scalar;
    ``scale_input`` = ones scalar on ``input.device``; **clamps the caller's tensor in place**
    to +-448 (``clamp(..., out=input)``); reshape (-1, K), cast to E4M3, ``.contiguous()``;
    ``_scaled_mm(inn, weight.t(), out_dtype=base_dtype, bias=bias, scale_a, scale_b)``; reshapes
    to (-1, S, N). ``.contiguous()`` on a contiguous but misaligned view is a no-op, but the cast
    allocates, so A is aligned; a non-contiguous input is copied by ``reshape``.
``user_fixed_forward`` (the user's "fixed" version)
    ``input = input.contiguous()`` first, then as ComfyUI below with ``.contiguous()`` after each
    step. Its in-place clamp still writes to the caller's tensor whenever the input was already
    contiguous (``.contiguous()`` then returns the same tensor).
``comfyui_forward`` (ComfyUI ``fp8_linear`` with its caller's fallback)
    2-D input becomes (B, 1, K); weight kept FP8, bias cast to the input dtype; without
    ``scale_input``: **clamps the input in place** (a view of the caller's tensor) to +-448,
    reshape, cast, ``.contiguous()``; with ``scale_input``: ``input * (1/scale_input)`` (the
    reciprocal rounded to the input dtype), reshape, cast, ``.contiguous()`` -- no clamp;
    ``_scaled_mm(scale_a=scale_input, scale_b=scale_weight)``; unwrap; reshape back. The caller
    falls back to a plain linear when it returns None or raises.

Every forward has the signature ``forward(module, base_dtype, input)``: ``module`` holds
``weight`` (FP8 (N, K)), ``bias`` (or None), optional ``scale_weight`` / ``scale_input``.
:func:`make_fp8_module` builds such a module and :func:`legacy_op` wraps a forward in the
``fp8_linear`` calling convention so the runner calls every linear the same way. The path
the last call took (FP8 kernel or fallback, and why) is reported by :func:`last_path`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LegacyForward",
    "LEGACY_FORWARDS",
    "FP8_FORWARD_KEEP",
    "wanvideo_early2025_forward",
    "wanvideo_late2025_forward",
    "user_fixed_forward",
    "comfyui_forward",
    "comfyui_fp8_linear",
    "original_forward",
    "make_fp8_module",
    "legacy_op",
    "get_legacy",
    "last_path",
]

_E4M3 = torch.float8_e4m3fn
_E5M2 = torch.float8_e5m2
_FP8 = (_E4M3, _E5M2)

#: Name keywords WanVideoWrapper's ``convert_fp8_linear`` keeps in high precision (late 2025).
FP8_FORWARD_KEEP = (
    "norm",
    "bias",
    "time_in",
    "patch_embedding",
    "time_",
    "img_emb",
    "modulation",
    "text_embedding",
    "adapter",
    "add",
    "ref_conv",
    "audio_proj",
)

_state = threading.local()


def last_path() -> Optional[str]:
    """How the most recent legacy forward in this thread ran: "fp8", or "original: <why>"/"fallback: <why>"."""
    return getattr(_state, "path", None)


def _set_path(p: str) -> None:
    _state.path = p


def _unwrap(o: Union[Tensor, tuple]) -> Tensor:
    return o[0] if isinstance(o, tuple) else o


def original_forward(module: nn.Module, input: Tensor) -> Tensor:
    """The module's non-FP8 forward: ``module.original_forward`` if set, else a dequantizing linear.

    The stand-in dequantizes the weight (``weight * scale_weight``) to the input's dtype and runs
    ``F.linear``; WanVideoWrapper calls the patched class's original ``forward`` there.
    """
    orig = getattr(module, "original_forward", None)
    if callable(orig):
        return orig(input)
    w = module.weight
    sw = getattr(module, "scale_weight", None)
    wd = w.to(torch.float32)
    if sw is not None:
        s = sw.to(torch.float32)
        wd = wd * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
    b = module.bias.to(input.dtype) if getattr(module, "bias", None) is not None else None
    return F.linear(input, wd.to(input.dtype), b)


def wanvideo_early2025_forward(module: nn.Module, base_dtype: torch.dtype, input: Tensor) -> Tensor:
    """WanVideoWrapper FP8 forward, early 2025 (see module docstring)."""
    weight = module.weight
    if weight.dtype in _FP8 and input.dim() == 3:
        other = _E5M2 if weight.dtype == _E4M3 else _E4M3
        inn = input.reshape(-1, weight.shape[1]).to(other)
        one = torch.ones(1, device=input.device, dtype=torch.float32)
        bias = module.bias.to(base_dtype) if module.bias is not None else None
        o = _unwrap(torch._scaled_mm(inn, weight.t(), out_dtype=base_dtype, bias=bias, scale_a=one, scale_b=one))
        _set_path("fp8")
        return o.reshape(-1, input.shape[1], weight.shape[0])
    _set_path(f"original: {input.dim()}-D input" if weight.dtype in _FP8 else "original: weight not FP8")
    return original_forward(module, input.to(base_dtype))


def wanvideo_late2025_forward(module: nn.Module, base_dtype: torch.dtype, input: Tensor) -> Tensor:
    """WanVideoWrapper FP8 forward, late 2025, before the fix: clamps the caller's tensor in place."""
    weight = module.weight
    if weight.dtype in _FP8 and input.dim() == 3:
        sw = getattr(module, "scale_weight", None)
        scale_weight = sw.squeeze() if sw is not None else torch.ones((), device=input.device, dtype=torch.float32)
        scale_input = torch.ones((), device=input.device, dtype=torch.float32)
        input = torch.clamp(input, min=-448, max=448, out=input)  # the defect: writes the caller's tensor
        inn = input.reshape(-1, input.shape[2]).to(_E4M3).contiguous()
        bias = module.bias.to(base_dtype) if module.bias is not None else None
        o = _unwrap(
            torch._scaled_mm(
                inn, weight.t(), out_dtype=base_dtype, bias=bias, scale_a=scale_input, scale_b=scale_weight
            )
        )
        _set_path("fp8")
        return o.reshape((-1, input.shape[1], weight.shape[0]))
    _set_path(f"original: {input.dim()}-D input" if weight.dtype in _FP8 else "original: weight not FP8")
    return original_forward(module, input.to(base_dtype))


def _comfy_core(module: nn.Module, input: Tensor, contiguous_steps: bool) -> Optional[Tensor]:
    """ComfyUI's ``fp8_linear`` body; None when it does not apply (the caller then falls back)."""
    dtype = module.weight.dtype
    if dtype != _E4M3:
        return None
    c = (lambda t: t.contiguous()) if contiguous_steps else (lambda t: t)
    tensor_2d = False
    if input.dim() == 2:
        tensor_2d = True
        input = c(input.unsqueeze(1))
    input_shape = input.shape
    input_dtype = input.dtype
    if input.dim() != 3:
        return None
    w = module.weight.t()  # cast_bias_weight with dtype=weight dtype: stays FP8
    bias = module.bias.to(input_dtype) if module.bias is not None else None
    sw = getattr(module, "scale_weight", None)
    si = getattr(module, "scale_input", None)
    scale_weight = torch.ones((), device=input.device, dtype=torch.float32) if sw is None else sw.to(input.device)
    if si is None:
        scale_input = torch.ones((), device=input.device, dtype=torch.float32)
        input = c(torch.clamp(input, min=-448, max=448, out=input))  # in place on the caller's memory
        inn = input.reshape(-1, input_shape[2]).to(dtype).contiguous()
    else:
        scale_input = si.to(input.device)
        inn = (input * (1.0 / scale_input).to(input_dtype)).reshape(-1, input_shape[2]).to(dtype).contiguous()
    if bias is not None:
        o = torch._scaled_mm(inn, w, out_dtype=input_dtype, bias=bias, scale_a=scale_input, scale_b=scale_weight)
    else:
        o = torch._scaled_mm(inn, w, out_dtype=input_dtype, scale_a=scale_input, scale_b=scale_weight)
    o = c(_unwrap(o))
    if tensor_2d:
        return c(o.reshape(input_shape[0], -1))
    return c(o.reshape((-1, input_shape[1], module.weight.shape[0])))


def comfyui_fp8_linear(module: nn.Module, input: Tensor) -> Optional[Tensor]:
    """ComfyUI ``fp8_linear(self, input)`` alone: the output, or None when it does not apply."""
    return _comfy_core(module, input, contiguous_steps=False)


def comfyui_forward(module: nn.Module, base_dtype: torch.dtype, input: Tensor) -> Tensor:
    """ComfyUI's linear forward: ``fp8_linear`` in try/except, plain linear on None or error."""
    try:
        out = _comfy_core(module, input, contiguous_steps=False)
    except Exception as e:  # noqa: BLE001 - the reproduction swallows everything, as ComfyUI does
        _set_path(f"fallback: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return original_forward(module, input)
    if out is None:
        _set_path(f"fallback: fp8_linear returned None ({input.dim()}-D input or non-E4M3 weight)")
        return original_forward(module, input)
    _set_path("fp8")
    return out


def user_fixed_forward(module: nn.Module, base_dtype: torch.dtype, input: Tensor) -> Tensor:
    """The user's "fixed" WanVideoWrapper forward: ``input.contiguous()`` first, then ComfyUI-style."""
    input = input.contiguous()
    out = _comfy_core(module, input, contiguous_steps=True)
    if out is None:
        _set_path(f"original: {input.dim()}-D input or non-E4M3 weight")
        return original_forward(module, input.to(base_dtype))
    _set_path("fp8")
    return out


@dataclass(frozen=True)
class LegacyForward:
    """A legacy forward with what is known about it (for reports and tests)."""

    name: str
    forward: Callable[[nn.Module, torch.dtype, Tensor], Tensor]
    description: str
    mutates_input: str  # when it writes to the caller's tensor ("never" or the condition)
    supports: str  # which input ranks take the FP8 path


LEGACY_FORWARDS: dict[str, LegacyForward] = {
    f.name: f
    for f in (
        LegacyForward(
            "wanvideo_early2025",
            wanvideo_early2025_forward,
            "WanVideoWrapper early 2025: other-FP8-type input cast, ones scales, 3-D only",
            "never",
            "3-D",
        ),
        LegacyForward(
            "wanvideo_late2025",
            wanvideo_late2025_forward,
            "WanVideoWrapper late 2025 before the fix: in-place clamp of the caller's tensor, 3-D only",
            "always on the FP8 path (any |x| > 448 is clamped in the caller's tensor)",
            "3-D",
        ),
        LegacyForward(
            "user_fixed",
            user_fixed_forward,
            "user's fix: input.contiguous() first, ComfyUI-style, scale_input honoured, 2-D and 3-D",
            "when the input is already contiguous and no scale_input is stored",
            "2-D, 3-D",
        ),
        LegacyForward(
            "comfyui",
            comfyui_forward,
            "ComfyUI fp8_linear with its caller's try/except fallback to a plain linear",
            "when no scale_input is stored (the clamp writes through the view)",
            "2-D, 3-D",
        ),
    )
}


def get_legacy(name: str) -> LegacyForward:
    """Look up a legacy forward by name (accepts a ``legacy.`` prefix)."""
    key = name.removeprefix("legacy.")
    if key not in LEGACY_FORWARDS:
        raise KeyError(f"unknown legacy forward {name!r}; known: {sorted(LEGACY_FORWARDS)}")
    return LEGACY_FORWARDS[key]


class _Fp8Holder(nn.Module):
    """Minimal module with the attributes the legacy forwards read."""

    def __init__(
        self, weight: Tensor, bias: Optional[Tensor], scale_weight: Optional[Tensor], scale_input: Optional[Tensor]
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.scale_weight = scale_weight
        self.scale_input = scale_input
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]


def make_fp8_module(
    weight: Tensor,
    weight_scale: Optional[Tensor] = None,
    input_scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    copy: bool = True,
) -> nn.Module:
    """A module holding an FP8 E4M3 weight, as the converted checkpoints do.

    A high-precision ``weight`` is quantized tensorwise (``scale_weight = amax / 448``, the
    scaled-checkpoint recipe), computed with ``harness.reference.formats`` so no torch cast
    overflow is involved. ``copy`` (default): the module holds copies, so nothing it does reaches
    the arguments. ``copy=False`` (how the ops under test call it, once per call): an FP8 weight,
    its scales and the bias are held as they are -- no per-call copy of the weight, and a forward
    that writes them is seen by the harness's input-mutation check.
    """
    own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype in _FP8:
        w = own(weight)
        sw = None if weight_scale is None else own(weight_scale.to(torch.float32))
    else:
        if weight_scale is not None:
            raise ValueError("weight_scale only applies to an FP8 weight; a high-precision weight gets its own scale")
        from harness.reference.formats import quantize

        qt = quantize(weight.detach(), "e4m3", granularity="tensor")
        w = qt.to_torch().to(weight.device)
        sw = qt.scale.reshape(()).to(weight.device)
    si = None
    if input_scale is not None:
        si = own(torch.as_tensor(input_scale, dtype=torch.float32, device=weight.device)).reshape(())
    b = None if bias is None else own(bias)
    return _Fp8Holder(w, b, sw, si)


def legacy_op(name: str) -> Callable[..., Tensor]:
    """The legacy forward ``name`` in the ``fp8_linear`` calling convention.

    ``op(input, weight, weight_scale=None, input_scale=None, bias=None, out_dtype=None)``;
    ``base_dtype`` = ``out_dtype`` or the input's dtype. The input is passed through untouched,
    so an in-place defect reaches the caller's tensor exactly as in the original code.
    """
    lf = get_legacy(name)

    def op(
        input: Tensor,
        weight: Tensor,
        weight_scale: Optional[Tensor] = None,
        input_scale: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        module = make_fp8_module(weight, weight_scale, input_scale, bias, copy=False)
        return lf.forward(module, out_dtype or input.dtype, input)

    op.__name__ = f"legacy_{lf.name}"
    op.__doc__ = lf.description
    return op
