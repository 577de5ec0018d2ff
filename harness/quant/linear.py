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
(which differs by torch version). With a static ``input_scale`` the eager path reads the largest
``|x / s|`` back (one device sync); if it exceeds 448 the input is divided into a temporary copy
and clamped to +-448 there before the cast (the fused CUDA cast clamps in place of that check,
same numbers, no sync). The caller's tensors are never written.
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

The scaling scheme is a frozen :class:`Fp8LinearConfig` (weight tensorwise/rowwise, input
dynamic/static, out dtype, backend, rules): derived from the arguments above, or passed as
``config=``. A plan is built once per layout signature (dtypes, shapes, strides, devices, pointer
alignment, config) and kept in a bounded LRU cache (:func:`plan_cache_info`,
:func:`clear_plan_cache`); a cached call only computes its key and executes the immutable plan.

This module re-exports the package :mod:`harness.quant.fp8`, one concern per module: ``config``
(constants, the error, :class:`Fp8LinearConfig`), ``plan`` (copy reasons, operand decisions, the
plan), ``quantize`` (amax, scales, casts; the fused CUDA kernels are in ``harness.quant._triton_quant``),
``cache`` (the layout signature and the LRU) and ``dispatch`` (capability probes, backend selection,
``_scaled_mm``, the forward).
"""

from __future__ import annotations

from harness.quant.fp8.config import (
    DIM_MULTIPLE,
    E4M3_MAX,
    KERNEL_ALIGNMENT,
    MIN_CAPABILITY,
    Fp8LinearConfig,
    Fp8LinearError,
)
from harness.quant.fp8.dispatch import (  # noqa: F401 - private names kept for existing importers
    PLAN_CACHE_SIZE,
    LinearResult,
    _cpu_scaled_mm_mixed,
    _cpu_scaled_mm_supports,
    call_scaled_mm,
    clear_plan_cache,
    fp8_linear,
    fp8_linear_with_plan,
    last_plan,
    logger,
    plan_cache_info,
    scaled_mm_available,
    select_backend,
)
from harness.quant.fp8.plan import (  # noqa: F401
    CopyReason,
    LinearPlan,
    OperandDecision,
    _check_args,
    copy_reasons,
    plan_operands,
    resolve_config,
)
from harness.quant.fp8.quantize import (  # noqa: F401
    _amax,
    _dynamic_scale,
    _validated_static_scale,
    quantize_activation,
    quantize_weight_rowwise,
)

__all__ = [
    "E4M3_MAX",
    "KERNEL_ALIGNMENT",
    "DIM_MULTIPLE",
    "MIN_CAPABILITY",
    "scaled_mm_available",
    "Fp8LinearError",
    "Fp8LinearConfig",
    "CopyReason",
    "OperandDecision",
    "LinearPlan",
    "LinearResult",
    "copy_reasons",
    "plan_operands",
    "resolve_config",
    "select_backend",
    "fp8_linear",
    "fp8_linear_with_plan",
    "last_plan",
    "plan_cache_info",
    "clear_plan_cache",
    "PLAN_CACHE_SIZE",
    "quantize_activation",
    "quantize_weight_rowwise",
    "call_scaled_mm",
]
