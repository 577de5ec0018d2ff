"""FP8 linear targets: the robust ``fp8_linear``, the legacy forwards, user plug-ins and raw ``_scaled_mm``.

Inputs (names as the runner sees them):

- ``x``: the activation, swept through the linear layout classes (bf16; FP8 E4M3 for
  ``raw.scaled_mm``, whose A operand is already quantized);
- ``weight``: FP8 E4M3 ``(N, K)``, contiguous, as converted checkpoints store it;
- ``bias``: bf16 ``(N,)``;
- ``weight_scale``: float32 scalar dequantization scale (``params["weight_scale"]``, a power of two
  so it is exact), absent when the target models an unscaled checkpoint.

References, all in float64 on the inputs as given (the weight is already quantized: the stored
FP8 values times its scale):

- *exact* = ``x @ (weight * weight_scale).T + bias``: the linear the caller asked for;
- *emulated* = the quantization scheme the op documents, run through
  :func:`harness.reference.formats.quantize` and :func:`~harness.reference.formats.scaled_mm`:
  the activation quantized to the op's input format with the op's input scale (``fp8_linear``:
  dynamic per-tensor ``amax / 448``; the legacy forwards: a fixed scale of 1, saturating at the
  format's max as their clamp does), FP32 accumulation, one rounding to the output dtype.  For
  ``raw.scaled_mm`` the inputs are already FP8, so *exact* is the product of exactly those
  values and *emulated* only adds FP32 accumulation and the output cast.

  Why each op's own scheme and not one ideal scheme for all: the bound must measure what the
  kernel and the adapter's mechanics (reshapes, scales, casts, layouts) add to the format's
  unavoidable error.  Judging a fixed-scale-1 forward against a dynamic-scale emulation compares
  two different roundings of the few largest values, whose max error differs by up to a binade
  from case to case (measured: ratios 0.5-6 on outlier channels) -- a flaky verdict, not a
  finding.  What the fixed scale costs shows up in the report's SQNR instead.

Drift bound: ``max_abs(out - exact) <= 2 * max_abs(emulated - exact) + floor`` (FlashAttention's
rule: a kernel may be twice as far from the truth as the scheme it implements), ``floor`` = half a
bf16 ULP at ``max|exact|`` (rounding the exact result once).  An adapter that loses more than its
own scheme (a wrong or ignored scale, a misread layout) drifts; NaN from an unclamped cast is
``nonfinite``; writing to the caller's tensor is ``input_mutation``.

Layout bound (how far two layouts of the same values may differ): ``fp8_linear`` and the legacy
forwards cast the activation into a *fresh* row-major FP8 tensor before the kernel (quantization
is elementwise and the dynamic scale depends on the values only), so the kernel sees bitwise
identical operands for any layout: **bitwise equal** is expected (``layout_bound`` None).  A
difference means the op took another path for one layout (a fallback) or read outside its view.
``raw.scaled_mm`` hands the strided operand to the kernel, which may block the K loop
differently: the same ``2 x emulated + floor`` slack as the drift bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.quant.plugins import LINEAR_GROUP
from harness.reference.metrics import Bound
from harness.targets.protocol import register_target
from harness.targets.base import ClassTarget, materialize_inputs
from harness.targets.layout_classes import Draw
from harness.targets.plugin import PluginTarget, register_plugin_target
from harness.values import ValueSpec

__all__ = [
    "LinearTarget",
    "Fp8LinearTarget",
    "Fp8LinearStaticTarget",
    "LegacyTarget",
    "RawScaledMmTarget",
    "PluginLinearTarget",
    "LEGACY_TARGETS",
    "register_plugin",
    "DEFAULT_WEIGHT_SCALE",
]

#: Dequantization scale of the stored FP8 weights (2**-4: exact; N(0,1) codes become std-0.0625 weights).
DEFAULT_WEIGHT_SCALE = 2.0**-4
_K_BOUND = 2.0


class LinearTarget(ClassTarget):
    """Common inputs, references and bounds of the FP8 linear targets."""

    kind = "linear"
    sweep_dtype = "bfloat16"
    out_dtype = torch.bfloat16
    weight_scale: float | None = DEFAULT_WEIGHT_SCALE
    #: format the emulated scheme quantizes the activation to ("e4m3" or "e5m2")
    input_format = "e4m3"
    #: input scale of the emulated scheme: "dynamic" (amax / format max, per tensor) or "ones" (scale 1)
    input_scaling = "dynamic"
    #: a stored static input scale (``scale_input`` of scaled checkpoints) the op is given; None: none stored
    input_scale: float | None = None
    scheme = "per-tensor dynamic-scale E4M3 input x FP8 E4M3 weight, FP32 accumulation, bf16 output"

    # ---- cases
    def case_from_draw(self, draw: Draw, class_name: str, seed: int) -> Case:
        k, n = draw.params["in_features"], draw.params["out_features"]
        layouts = {
            "weight": LayoutSpec.contiguous((n, k), "float8_e4m3fn"),
            "bias": LayoutSpec.contiguous((n,), "bfloat16"),
        }
        values = {"weight": ValueSpec("normal", seed), "bias": ValueSpec("normal", seed + 1)}
        params = {"weight_scale": self.weight_scale, "out_dtype": "bfloat16"}
        if self.input_scale is not None:
            params["input_scale"] = self.input_scale
        return self._case(draw, class_name, seed, layouts=layouts, values=values, params=params)

    def make_inputs(
        self, case: Case, device: str, values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        inputs = materialize_inputs(case, device, values)
        for key in ("weight_scale", "input_scale"):
            v = case.params.get(key)
            if v is not None:
                inputs[key] = torch.tensor(float(v), dtype=torch.float32, device=device)
        return inputs

    # ---- references
    @staticmethod
    def _weight(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = inputs["weight"].to(torch.float64)
        ws = inputs.get("weight_scale")
        return w * ws.to(torch.float64) if ws is not None else w

    def exact(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float64 ``x @ W.T + b`` with W the stored FP8 weight times its scale."""
        x = inputs["x"].to(torch.float64)
        out = x @ self._weight(inputs).T
        if inputs.get("bias") is not None:
            out = out + inputs["bias"].to(torch.float64)
        return out

    def emulated(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scheme: dynamic per-tensor quantization of x to ``input_format``, then ``_scaled_mm`` emulated."""
        from harness.reference.formats import quantize, scaled_mm

        x = inputs["x"]
        k = x.shape[-1]
        if inputs.get("input_scale") is not None:  # static scale: saturating cast of x / scale
            scale: Any = float(inputs["input_scale"])
        else:
            scale = None if self.input_scaling == "dynamic" else 1.0  # scale 1: saturating, as the clamp does
        qx = quantize(x.to(torch.float32).reshape(-1, k), self.input_format, granularity="tensor", scale=scale)
        ws = inputs.get("weight_scale")
        w = inputs["weight"]
        out = scaled_mm(
            qx.values,
            w.to(torch.float32).t(),
            qx.scale,
            ws if ws is not None else torch.ones((), dtype=torch.float32, device=w.device),
            bias=inputs.get("bias"),
            out_dtype=self.out_dtype,
        )
        return out.reshape(tuple(x.shape[:-1]) + (w.shape[0],))

    def reference(self, inputs, params):
        return self.exact(inputs), self.emulated(inputs)

    def bound(self, inputs, params, exact):
        return Bound.derived(
            _K_BOUND,
            exact,
            self.out_dtype,
            why=f"{self.name}: max_abs <= {_K_BOUND:g} x the emulated scheme's error ({self.scheme}) "
            "against the exact float64 linear",
        )

    def layout_bound(self, inputs, params, exact):
        return None  # bitwise: the activation is cast into a fresh row-major FP8 tensor for every layout

    # ---- the op
    def call(self, x: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def run(self, inputs, params):
        return self.call(inputs["x"], inputs)


@register_target
class Fp8LinearTarget(LinearTarget):
    """``harness.quant.linear.fp8_linear``: the robust forward; must accept every layout."""

    name = "fp8_linear"
    accepts_all_layouts = True
    description = "robust FP8 linear (dynamic per-tensor input scale, copies only what the kernel needs)"

    def available(self, device):
        try:
            import harness.quant.linear  # noqa: F401
        except ImportError as e:
            return False, f"harness.quant.linear not importable: {e}"
        return True, ""

    def call(self, x, inputs):
        from harness.quant.linear import fp8_linear

        return fp8_linear(
            x,
            inputs["weight"],
            weight_scale=inputs.get("weight_scale"),
            input_scale=inputs.get("input_scale"),
            bias=inputs.get("bias"),
            out_dtype=self.out_dtype,
        )


@register_target
class Fp8LinearStaticTarget(Fp8LinearTarget):
    """``fp8_linear`` given a stored static ``input_scale`` (1.0): values beyond 448 must saturate, never NaN."""

    name = "fp8_linear.static_scale"
    input_scale = 1.0
    scheme = (
        "E4M3 input x / input_scale (static), saturating at +-448 x FP8 E4M3 weight, FP32 accumulation, bf16 output"
    )
    description = "robust FP8 linear with a stored static input scale (clamps on a temporary copy)"


class LegacyTarget(LinearTarget):
    """One of ``harness.quant.legacy.LEGACY_FORWARDS``, called through ``legacy_op``."""

    legacy_name = ""
    input_scaling = "ones"

    def available(self, device):
        try:
            from harness.quant.legacy import get_legacy

            get_legacy(self.legacy_name)
        except (ImportError, KeyError) as e:
            return False, f"legacy forward {self.legacy_name!r} not importable: {e}"
        from harness.quant.linear import scaled_mm_available

        return scaled_mm_available(device, mixed=self.input_format == "e5m2")

    def call(self, x, inputs):
        from harness.quant.legacy import legacy_op

        return legacy_op(self.legacy_name)(
            x,
            inputs["weight"],
            weight_scale=inputs.get("weight_scale"),
            input_scale=inputs.get("input_scale"),
            bias=inputs.get("bias"),
            out_dtype=self.out_dtype,
        )


def _legacy(
    name: str,
    fmt: str,
    scale: float | None,
    scheme: str,
    doc: str,
    *,
    input_scale: float | None = None,
    suffix: str = "",
) -> type[LegacyTarget]:
    cls = type(
        f"Legacy_{name}{suffix.replace('.', '_')}",
        (LegacyTarget,),
        {
            "name": f"legacy.{name}{suffix}",
            "legacy_name": name,
            "input_format": fmt,
            "weight_scale": scale,
            "input_scale": input_scale,
            "scheme": scheme,
            "description": doc,
            "__doc__": doc,
        },
    )
    return register_target(cls)


_LEGACY_SCHEME = "E4M3 input with scale 1, clamped to +-448 x FP8 E4M3 weight, FP32 accumulation, bf16 output"
_STATIC_SCHEME = (
    "E4M3 input x / scale_input (stored static scale), saturating at +-448 x FP8 E4M3 weight, "
    "FP32 accumulation, bf16 output"
)

LEGACY_TARGETS: dict[str, type[LegacyTarget]] = {
    # early 2025 ignores any stored scale (ones scales), as the unscaled checkpoints of its time needed:
    # the target models such a checkpoint (weight_scale None), so only the E5M2 input cast is judged.
    "legacy.wanvideo_early2025": _legacy(
        "wanvideo_early2025",
        "e5m2",
        None,
        "E5M2 input cast with scale 1 x FP8 E4M3 weight (ones scales), FP32 accumulation, bf16 output",
        "WanVideoWrapper early 2025: E5M2 input cast, ones scales, 3-D only (unscaled checkpoint)",
    ),
    "legacy.wanvideo_late2025": _legacy(
        "wanvideo_late2025",
        "e4m3",
        DEFAULT_WEIGHT_SCALE,
        _LEGACY_SCHEME,
        "WanVideoWrapper late 2025 before the fix: clamps the caller's tensor in place, ones input scale",
    ),
    "legacy.user_fixed": _legacy(
        "user_fixed",
        "e4m3",
        DEFAULT_WEIGHT_SCALE,
        _LEGACY_SCHEME,
        "the user's fixed WanVideoWrapper forward: contiguous() first, ComfyUI-style",
    ),
    "legacy.comfyui": _legacy(
        "comfyui",
        "e4m3",
        DEFAULT_WEIGHT_SCALE,
        _LEGACY_SCHEME,
        "ComfyUI fp8_linear with its caller's fallback to a plain linear",
    ),
    # With a stored scale_input (scaled checkpoints) ComfyUI-style forwards skip the clamp and cast
    # x / scale_input straight to E4M3: values beyond 448 saturate on torch 2.13's CPU cast but turn
    # to NaN on torch 2.11 (CPU and CUDA) -- a version-dependent defect (quant-numerics.md section 1).
    "legacy.comfyui.scaled_input": _legacy(
        "comfyui",
        "e4m3",
        DEFAULT_WEIGHT_SCALE,
        _STATIC_SCHEME,
        "ComfyUI fp8_linear with a stored scale_input: unclamped cast of x / scale_input",
        input_scale=1.0,
        suffix=".scaled_input",
    ),
    "legacy.user_fixed.scaled_input": _legacy(
        "user_fixed",
        "e4m3",
        DEFAULT_WEIGHT_SCALE,
        _STATIC_SCHEME,
        "the user's fixed forward with a stored scale_input: unclamped cast of x / scale_input",
        input_scale=1.0,
        suffix=".scaled_input",
    ),
}


@register_target
class RawScaledMmTarget(LinearTarget):
    """``torch._scaled_mm`` with no adapter: A = the swept FP8 activation (2-D), B = weight.t().

    Shows what the adapters protect against: on CUDA a misaligned pointer or odd leading
    dimension fails inside cuBLASLt (``CUBLAS_STATUS_NOT_SUPPORTED``: verdict ``rejected``), a
    transposed A is refused by torch's own check.
    """

    name = "raw.scaled_mm"
    sweep_dtype = "float8_e4m3fn"
    ranks = (2,)
    scheme = "the given FP8 operands, FP32 accumulation, bf16 output"
    description = "torch._scaled_mm called directly on the swept FP8 operand (no adapter)"

    def available(self, device):
        from harness.quant.linear import scaled_mm_available

        return scaled_mm_available(device)

    input_scale = 2.0**-2  # dequantization scale of A (exact)

    def exact(self, inputs):
        x = inputs["x"].to(torch.float64) * inputs["input_scale"].to(torch.float64)
        out = x @ self._weight(inputs).T
        return out + inputs["bias"].to(torch.float64)

    def emulated(self, inputs):
        from harness.reference.formats import scaled_mm

        return scaled_mm(
            inputs["x"],
            inputs["weight"].t(),
            inputs["input_scale"],
            inputs["weight_scale"],
            bias=inputs["bias"],
            out_dtype=self.out_dtype,
        )

    def layout_bound(self, inputs, params, exact):
        return Bound.derived(
            _K_BOUND,
            exact,
            self.out_dtype,
            why="the kernel reads the strided A as given and may block K differently per layout: "
            f"{_K_BOUND:g} x the emulated run's error + rounding floor",
        )

    def run(self, inputs, params):
        r = torch._scaled_mm(
            inputs["x"],
            inputs["weight"].t(),
            scale_a=inputs["input_scale"],
            scale_b=inputs["weight_scale"],
            bias=inputs["bias"],
            out_dtype=self.out_dtype,
        )
        return r[0] if isinstance(r, tuple) else r


class PluginLinearTarget(PluginTarget, LinearTarget):
    """A user's FP8 linear, named ``package.module:attr``, in the ``fp8_linear`` calling convention.

    Resolved inside the worker (see :mod:`harness.targets.plugin`); the matrix's own process learns
    the signature from :func:`harness.quant.plugins.probe` instead of importing user code.  Cases
    fit the signature: no ``weight_scale`` parameter gives cases with an unscaled weight, no
    ``bias`` cases without bias.
    """

    plugin_group = LINEAR_GROUP

    def _resolve(self) -> Callable[..., torch.Tensor]:
        """The plug-in's op in the ``fp8_linear`` convention, resolved once per target instance."""
        op = self.__dict__.get("_op")
        if op is None:
            op = self.__dict__["_op"] = self.plugin().as_linear_op()
        return op

    def case_from_draw(self, draw, class_name, seed):
        info = self.info()
        case = super().case_from_draw(draw, class_name, seed)
        layouts, values, params = dict(case.layouts), dict(case.values), dict(case.params)
        takes = set(info.get("takes", ()))
        if "weight_scale" not in takes:
            params["weight_scale"] = None  # an unscaled checkpoint: the weight is the FP8 values as stored
        if "bias" not in takes:
            layouts.pop("bias", None)
            values.pop("bias", None)
        params["plugin"] = info
        return dataclasses.replace(case, layouts=layouts, values=values, params=params)

    def call(self, x, inputs):
        return self._resolve()(
            x,
            inputs["weight"],
            weight_scale=inputs.get("weight_scale"),
            bias=inputs.get("bias"),
            out_dtype=self.out_dtype,
        )


def register_plugin(spec: str, info: Mapping[str, Any] | None = None, *, probe: bool = False) -> str:
    """Register the FP8 linear plug-in ``spec`` as target ``plugin.<spec>``; returns the target name.

    ``spec``: ``package.module:attr`` or the name of a ``harness.fp8_linear`` entry point.
    ``info``: its ``Plugin.describe()``, when known; ``probe=True`` gets it from
    :func:`harness.quant.plugins.probe` (a subprocess) and raises ValueError, one line, when the
    plug-in does not load.
    """
    if (
        not isinstance(spec, str)
        or not spec.strip()
        or spec.count(":") > 1
        or (":" in spec and not all(spec.split(":")))
    ):
        raise ValueError(
            f"plug-in {spec!r} must be named 'package.module:attr' (e.g. 'mypkg.fp8:linear') "
            "or be a harness.fp8_linear entry-point name"
        )
    return register_plugin_target(PluginLinearTarget, f"plugin.{spec}", spec, info, probe, f"user FP8 linear {spec}")
