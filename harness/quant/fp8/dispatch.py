"""Where the FP8 linear runs and how: capability probes, backend selection, ``_scaled_mm``, the forward.

``fp8_linear`` builds an immutable :class:`~harness.quant.fp8.plan.LinearPlan` once per layout signature
(:mod:`harness.quant.fp8.cache`) and then only executes it: a cached call computes its key, re-asks
:func:`select_backend` for a non-CUDA plan (a CPU probe can change, and a changed answer re-plans), checks a
Python-number ``input_scale``'s value, and launches. On the fused CUDA path nothing reads a value back to the host
(a tensor ``input_scale`` is read once per storage version, on its first call), so the call can be
captured in a CUDA graph after one warm-up call.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from harness.capability import cuda_capability, format_capability, require_cuda
from harness.quant.fp8 import plan as _planning
from harness.quant.fp8.cache import CacheInfo, PlanCache, plan_key
from harness.quant.fp8.config import (
    BACKENDS,
    E4M3_MAX,
    FP8,
    MIN_CAPABILITY,
    Fp8LinearConfig,
    Fp8LinearError,
)
from harness.quant.fp8.plan import LinearPlan, resolve_config
from harness.quant.fp8.quantize import (
    _amax,
    _dynamic_scale,
    _validated_static_scale,
    dynamic_tensorwise_quantize,
    quantize_activation,
    quantize_weight_rowwise,
    rowwise_quantize,
    scaled_cast,
)

__all__ = [
    "scaled_mm_available",
    "select_backend",
    "call_scaled_mm",
    "LinearResult",
    "fp8_linear",
    "fp8_linear_with_plan",
    "last_plan",
    "plan_cache_info",
    "clear_plan_cache",
    "PLAN_CACHE_SIZE",
]

#: the logger users (and tests) configure; one name for the whole FP8 linear
logger = logging.getLogger("harness.quant.linear")

#: Distinct layout signatures whose plans are kept (least recently used evicted first).
PLAN_CACHE_SIZE = 256
PLAN_CACHE = PlanCache(PLAN_CACHE_SIZE)


def plan_cache_info() -> CacheInfo:
    """(hits, misses, maxsize, currsize) of ``fp8_linear``'s plan cache; every miss built one plan."""
    return PLAN_CACHE.info()


def clear_plan_cache() -> None:
    """Forget every cached plan (and the hit/miss counts)."""
    PLAN_CACHE.clear()


# ---------------------------------------------------------------------------
# Backend selection (probed at call time)


@functools.lru_cache(maxsize=None)
def _cpu_scaled_mm_supports(scaling: str) -> tuple[bool, str]:
    """Probe torch's CPU ``_scaled_mm`` on a 16x16 problem with known values."""
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    a = torch.eye(16).to(FP8)
    b = (torch.arange(256, dtype=torch.float32).reshape(16, 16) % 7).to(FP8)
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
        out = call_scaled_mm(a, torch.ones(16, 16).to(FP8).t(), one, one, None, torch.float32)
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
        reason = require_cuda(MIN_CAPABILITY, what, device=dev)
        return reason is None, reason or ""
    if dev.type == "cpu":
        return _cpu_scaled_mm_mixed() if mixed else _cpu_scaled_mm_supports("tensorwise")
    return False, f"no torch._scaled_mm on device {str(device)!r}"


def select_backend(device: Union[str, torch.device], scaling: str, requested: str = "auto") -> tuple[str, str]:
    """Pick ``"cuda"``, ``"cpu"`` or ``"emulate"`` for tensors on ``device``; returns (backend, why).

    Probed at call time: the compute capability on CUDA, a tiny known-answer call on CPU.
    ``requested`` other than ``"auto"`` is honoured or raises saying why it cannot run.
    """
    if requested not in BACKENDS:
        raise Fp8LinearError(f"backend={requested!r}; use one of {BACKENDS}")
    dev = torch.device(device)
    if requested == "emulate":
        return "emulate", "emulation requested"
    if dev.type == "cuda":
        if requested == "cpu":
            raise Fp8LinearError("backend='cpu' requested but the tensors are on CUDA; move them or use backend='auto'")
        cap = cuda_capability(dev)
        if cap >= MIN_CAPABILITY:
            return "cuda", f"torch._scaled_mm on compute capability {format_capability(cap)}"
        why = (
            f"FP8 matmul needs compute capability >= {format_capability(MIN_CAPABILITY)}, "
            f"found {format_capability(cap)}"
        )
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


def call_scaled_mm(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
    use_fast_accum: bool = False,
) -> Tensor:
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
# fp8_linear: plan once per layout, then execute


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


@dataclass(frozen=True)
class _Recipe:
    """A plan with the per-operand actions the executor branches on, read out of it once."""

    plan: LinearPlan
    lead: tuple[int, ...]
    weight: str
    scale_b: str
    input: str
    scale_a: str
    bias: Optional[str]
    rowwise: bool
    scales_in_epilogue: bool
    use_fast_accum: bool


def _recipe(plan: LinearPlan, input: Tensor) -> _Recipe:
    roles = {d.role: d.action for d in plan.decisions}
    return _Recipe(
        plan=plan,
        lead=tuple(input.shape[:-1]),
        weight=roles["weight"],
        scale_b=roles["scale_b"],
        input=roles["input"],
        scale_a=roles["scale_a"],
        bias=roles.get("bias"),
        rowwise=plan.scaling == "rowwise",
        scales_in_epilogue="rowwise scales" in plan.epilogue,
        use_fast_accum=bool(plan.config and plan.config.use_fast_accum),
    )


def _prepare(
    input: Any,
    weight: Any,
    weight_scale: Any,
    input_scale: Any,
    bias: Any,
    config: Optional[Fp8LinearConfig],
    out_dtype: Optional[torch.dtype],
    backend: str,
    rules: Optional[str],
    use_fast_accum: bool,
) -> _Recipe:
    """Validate the call, resolve its config, pick the backend and build the plan (the uncached path)."""
    cfg = resolve_config(
        input,
        weight,
        weight_scale,
        input_scale,
        bias,
        config,
        out_dtype=out_dtype,
        backend=backend,
        rules=rules,
        use_fast_accum=use_fast_accum,
    )
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise Fp8LinearError("fp8_linear needs tensors; plan_operands accepts layouts")
    dev = input.device
    for name, t in (
        ("weight", weight),
        ("weight_scale", weight_scale),
        ("bias", bias),
        ("input_scale", input_scale if isinstance(input_scale, Tensor) else None),
    ):
        if t is not None and t.device != dev:
            raise Fp8LinearError(f"{name} is on {t.device} but input is on {dev}; put every operand on one device")
    chosen, why = select_backend(dev, cfg.weight_scaling, cfg.backend)
    plan = _planning.build_plan(input, weight, weight_scale, input_scale, bias, cfg, chosen, why)
    return _recipe(plan, input)


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
    config: Optional[Fp8LinearConfig] = None,
) -> LinearResult:
    """:func:`fp8_linear`, returning the output together with its plan and kernel operands.

    Inference only: runs under ``torch.no_grad()`` (``_scaled_mm`` has no backward for this use).
    """
    with torch.no_grad():
        return _fp8_linear_impl(
            input, weight, weight_scale, input_scale, bias, out_dtype, backend, rules, use_fast_accum, config
        )


def _fp8_linear_impl(
    input: Tensor,
    weight: Tensor,
    weight_scale: Optional[Tensor],
    input_scale: Any,
    bias: Optional[Tensor],
    out_dtype: Optional[torch.dtype],
    backend: str,
    rules: Optional[str],
    use_fast_accum: bool,
    config: Optional[Fp8LinearConfig],
) -> LinearResult:
    key = plan_key(input, weight, weight_scale, input_scale, bias, (config, out_dtype, backend, rules, use_fast_accum))
    recipe = PLAN_CACHE.get(key) if key is not None else None
    if recipe is not None and recipe.plan.backend != "cuda":
        # a CPU probe's answer can change (a cleared probe cache): plan again then.  A CUDA plan cannot go stale
        # this way -- the key holds the device, whose compute capability is asked once per process
        plan = recipe.plan
        if select_backend(input.device, plan.scaling, plan.config.backend) != (plan.backend, plan.backend_reason):
            recipe = None
    if recipe is None:
        recipe = _prepare(
            input, weight, weight_scale, input_scale, bias, config, out_dtype, backend, rules, use_fast_accum
        )
        if key is not None:
            PLAN_CACHE.put(key, recipe)
    elif (
        input_scale is not None
        and not isinstance(input_scale, Tensor)
        and not (math.isfinite(input_scale) and input_scale > 0)
    ):
        raise Fp8LinearError(f"input_scale={input_scale} must be positive and finite")
    _state.plan = recipe.plan
    _log_plan(recipe.plan)
    return _execute(recipe, input, weight, weight_scale, input_scale, bias)


def _execute(
    r: _Recipe, input: Tensor, weight: Tensor, weight_scale: Optional[Tensor], input_scale: Any, bias: Optional[Tensor]
) -> LinearResult:
    """Run a plan: quantize or copy what it says, call the kernel, apply the epilogue. Never writes an argument."""
    plan = r.plan
    dev = input.device
    f32 = torch.float32
    k, n, m = plan.k, plan.n, plan.m
    kp, np_ = plan.k_padded, plan.n_padded
    lead = r.lead
    rowwise = r.rowwise
    out_dtype = plan.out_dtype

    if m == 0:
        out = torch.zeros(lead + (n,), dtype=out_dtype, device=dev)
        return LinearResult(out, plan)

    # ---- B and scale_b
    if plan.weight_quantized:
        b_q, sb_vec = quantize_weight_rowwise(weight, k_padded=kp, n_padded=np_)
        scale_b = sb_vec.reshape(1, np_)
    else:
        if r.weight == "use":
            b_q = weight
        else:
            b_q = _aligned_copy(weight, (np_, kp), FP8, fill_zero=(np_ != n or kp != k))
        if weight_scale is None:
            scale_b = torch.ones(1, dtype=f32, device=dev) if not rowwise else torch.ones(1, np_, dtype=f32, device=dev)
        elif not rowwise:
            scale_b = (
                (weight_scale if weight_scale.dim() == 1 else weight_scale.reshape(1))
                if r.scale_b == "use"
                else weight_scale.detach().to(dtype=f32, device=dev).reshape(1).clone()
            )
        elif r.scale_b == "use":
            scale_b = weight_scale.reshape(1, n)
        else:
            scale_b = torch.ones(1, np_, dtype=f32, device=dev)
            scale_b[0, :n].copy_(weight_scale.reshape(n))

    # ---- A and scale_a
    if input.dtype == FP8:
        if r.input == "use":
            a_q = input.reshape(m, k)  # a view: the rows merge (checked by the plan)
        else:
            a_q = torch.empty((m, kp), dtype=FP8, device=dev)
            if kp != k:
                a_q[:, k:].zero_()
            a_q[:, :k].view(lead + (k,)).copy_(input)
        if isinstance(input_scale, Tensor):
            s_in = input_scale.detach().to(dtype=f32, device=dev).reshape(1)
        else:  # a fill, not a host-to-device copy: capturable in a CUDA graph
            s_in = torch.full((1,), 1.0 if input_scale is None else float(input_scale), dtype=f32, device=dev)
        scale_a = s_in.expand(m, 1).contiguous() if rowwise else (s_in if r.scale_a == "use" else s_in.clone())
    elif input_scale is not None and plan.quantizer == "triton-tensorwise":
        # a static scale needs no pass over the input: one fused divide-clamp-cast (the clamp is a no-op
        # where the eager path would not saturate, so the numbers are the same) and no device sync
        s_in = _validated_static_scale(input_scale, dev)
        if r.scale_a == "copy":
            s_in = s_in.clone()
        a_q = scaled_cast(input.view(m, k), s_in, kp, out_shape=lead + (kp,))
        scale_a = s_in.expand(m, 1).contiguous() if rowwise else s_in
    elif input_scale is not None:
        s_in = torch.as_tensor(input_scale, dtype=f32, device=dev).detach().to(dtype=f32, device=dev).reshape(1)
        if r.scale_a == "copy":
            s_in = s_in.clone()
        peak_t = torch.stack([_amax(input, rowwise=False)[0] / s_in[0], s_in[0]])
        peak, s_val = peak_t.tolist()  # one sync: validation + saturation decision
        if not (math.isfinite(s_val) and s_val > 0):
            raise Fp8LinearError(f"input_scale={s_val} must be positive and finite")
        saturate = not (peak <= E4M3_MAX)
        if saturate:
            logger.debug(
                "input: values reach %.4g x input_scale beyond +-%g: clamped on a temporary copy", peak, E4M3_MAX
            )
        scale_a = s_in.expand(m, 1).contiguous() if rowwise else s_in
        a_q = quantize_activation(input, s_in, k_padded=kp, saturate=saturate)
    elif plan.quantizer == "triton-rowwise":
        # one pass: row amax, scale and E4M3 values (bitwise the eager scheme below)
        a_q, s_row = rowwise_quantize(input.view(m, k), kp, out_shape=lead + (kp,))
        scale_a = s_row.reshape(m, 1)
        logger.debug("input: %s quantization (%d x %d)", plan.quantizer, m, k)
    elif plan.quantizer == "triton-tensorwise":
        # a per-tensor scale needs one read-only amax pass first; scale, division and cast are one pass
        a_q, scale_a = dynamic_tensorwise_quantize(input.view(m, k), kp, out_shape=lead + (kp,))
        logger.debug("input: %s quantization (%d x %d)", plan.quantizer, m, k)
    else:
        if plan.quantizer_reason:
            logger.debug("input: eager quantization (%s)", plan.quantizer_reason)
        scale_div = _dynamic_scale(_amax(input, rowwise=rowwise))
        scale_a = scale_div.reshape(m, 1) if rowwise else scale_div
        a_q = quantize_activation(input, scale_div, k_padded=kp, saturate=False)

    # ---- bias
    kernel_bias: Optional[Tensor] = None
    if bias is not None and out_dtype != torch.float32:
        if r.bias == "use":
            kernel_bias = bias
        else:
            kernel_bias = torch.zeros(np_, dtype=out_dtype, device=dev)
            kernel_bias[:n].copy_(bias)

    # ---- matmul
    b_mat = b_q.t()  # (Kp, Np) column-major view of the row-major weight
    if plan.backend == "emulate":
        from harness.reference.formats import scaled_mm

        out2 = scaled_mm(a_q, b_mat, scale_a, scale_b, bias=kernel_bias, out_dtype=out_dtype)
    elif r.scales_in_epilogue:
        one = torch.ones(1, dtype=f32, device=dev)
        acc = call_scaled_mm(a_q, b_mat, one, one, None, torch.float32, r.use_fast_accum)
        acc.mul_(scale_a).mul_(scale_b)
        if kernel_bias is not None:
            acc.add_(kernel_bias.to(torch.float32))
        out2 = acc.to(out_dtype)
    else:
        out2 = call_scaled_mm(a_q, b_mat, scale_a, scale_b, kernel_bias, out_dtype, r.use_fast_accum)
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
    config: Optional[Fp8LinearConfig] = None,
) -> Tensor:
    """FP8 E4M3 linear: ``input @ W.T + bias`` on ``torch._scaled_mm`` (see ``harness.quant.linear``).

    ``input``: (..., K) in any layout, float16/bfloat16/float32 (quantized here) or
    float8_e4m3fn (``input_scale`` is then its dequantization scale, default 1). ``weight``:
    (N, K), float8_e4m3fn (with optional ``weight_scale``: scalar or (N,)/(N, 1)) or high
    precision (quantized rowwise). ``bias``: (N,). ``out_dtype``: default the input's dtype
    (bfloat16 for an FP8 input). Returns (..., N), contiguous. Never writes to any argument.
    ``backend``: "auto" | "cuda" | "cpu" | "emulate"; ``rules``: None (the backend's own
    requirements) or "cuda" (apply the CUDA kernel's layout rules on any backend).
    ``config``: a declared :class:`Fp8LinearConfig` instead of deriving one from the arguments
    (then out_dtype/backend/rules/use_fast_accum go in it). The plan of the call is available
    from :func:`last_plan`.
    """
    return fp8_linear_with_plan(
        input,
        weight,
        weight_scale,
        input_scale,
        bias,
        out_dtype,
        backend=backend,
        rules=rules,
        use_fast_accum=use_fast_accum,
        config=config,
    ).out
