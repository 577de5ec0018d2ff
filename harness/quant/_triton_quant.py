"""One-pass dynamic row-wise FP8 E4M3 quantization on CUDA (Triton).

Eager PyTorch needs a reduction pass for the row amax and a second pass that divides into a
float32 temporary before the cast; at Wan sizes that is several times the bytes of the input
(measured 0.73 ms for a 32760 x 5120 bf16 activation on an H200, about 700 GB/s).  This kernel
reads each row once into registers, computes its amax, the scale and the E4M3 values, and writes
the FP8 row and its scale: the bytes of a bare cast.

It computes exactly what ``harness.quant.fp8.quantize._dynamic_scale`` and ``quantize_activation``
compute in eager mode (bit for bit, checked by ``tests/gpu/test_quant_linear_gpu.py``):
``s = amax * float32(1/448)`` (what eager ``amax / 448`` does on CUDA) (1.0 for an all-zero row, at least the smallest normal
float32), nudged up one ULP where ``amax / s > 448``; NaN anywhere in a row makes its scale NaN
(so the row's outputs are NaN, as in eager mode); ``q = x / s`` rounded to nearest, then to E4M3
with round-to-nearest-even.  Padded columns ``k <= j < k_padded`` are written as zeros.

Triton is imported only when :func:`rowwise_quantize` is first called.

Launch cost: Triton's ``kernel[grid](...)`` binds and specializes its arguments on every call (about 40 us
of host time per launch on an H200 host, torch 2.11 / Triton 3.6, against 27 us for ``torch._scaled_mm``).
:class:`_Launcher` pays that once per specialization and then calls the compiled kernel's own launcher
(``HARNESS_TRITON_DIRECT_LAUNCH=0`` turns it off).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import torch

__all__ = [
    "triton_available",
    "rowwise_quantize",
    "scaled_cast",
    "dynamic_tensorwise_quantize",
    "cast_is_flat",
    "MAX_K",
]

#: Longest row the one-block-per-row kernel handles (registers); longer rows use the eager path.
MAX_K = 32768
#: ``0`` launches every kernel through Triton's per-call argument binding instead of :class:`_Launcher`'s cache
DIRECT_LAUNCH_ENV = "HARNESS_TRITON_DIRECT_LAUNCH"


def _arg_key(a: Any) -> Any:
    """What Triton specializes a kernel argument on, and more: a tensor's dtype, device and data-pointer low bits
    (Triton assumes 16-byte alignment where it holds), a scalar's exact value."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.device, a.data_ptr() & 15)
    return (type(a), a)


class _Launcher:
    """``kernel[grid](*args, num_warps=..., **constexprs)``, with Triton's argument binding paid once per key.

    The first launch for a key goes through Triton (compiling if needed), which returns its compiled kernel;
    later launches with the same key -- every tensor's dtype, device and pointer low bits, every scalar's value,
    the constexprs and ``num_warps``, a superset of what Triton specializes on -- call that compiled kernel's
    launcher directly (same kernel, same current stream, launch hooks honoured, capturable in a CUDA graph).
    A Triton whose launch does not return a compiled kernel with a launcher keeps the ordinary path.
    """

    MAX_ENTRIES = 1024

    def __init__(self, kernel: Callable[[], Any]) -> None:
        self._kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        self._order: Optional[tuple[str, ...]] = None

    def __call__(self, grid: tuple[int, ...], *args: Any, num_warps: int, **constexprs: Any) -> None:
        key = (grid, num_warps, tuple(constexprs.items()), tuple(_arg_key(a) for a in args))
        compiled = self._compiled.get(key)
        if compiled is not None:
            grid3 = grid + (1,) * (3 - len(grid))  # the compiled kernel's launcher takes all three grid dims
            compiled[grid3](*args, *(constexprs[n] for n in self._order[len(args) :]))  # type: ignore[index]
            return
        jit = self._kernel()
        compiled = jit[grid](*args, num_warps=num_warps, **constexprs)
        if os.environ.get(DIRECT_LAUNCH_ENV, "1") == "0":
            return
        order = tuple(getattr(jit, "arg_names", ()) or ())
        usable = (
            hasattr(compiled, "function")
            and callable(getattr(type(compiled), "__getitem__", None))
            and len(order) == len(args) + len(constexprs)
            and set(order[len(args) :]) == set(constexprs)
        )
        if usable:
            self._order = order
            if len(self._compiled) >= self.MAX_ENTRIES:
                self._compiled.clear()
            self._compiled[key] = compiled


@functools.lru_cache(maxsize=1)
def triton_available() -> tuple[bool, str]:
    """(True, "") when Triton imports and exposes the FP8 E4M3 type this kernel writes."""
    try:
        import triton  # noqa: F401
        import triton.language as tl
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"triton not importable: {type(e).__name__}: {e}"
    if not hasattr(tl, "float8e4nv"):
        return False, "this Triton has no float8e4nv type"
    return True, ""


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _rowwise_quant(x_ptr, q_ptr, s_ptr, K, K_PAD, stride_xm, stride_qm, INV_MAX, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        n_nan = tl.sum((x != x).to(tl.int32), axis=0)
        amax = tl.max(tl.abs(x), axis=0)
        s = amax * INV_MAX  # eager ``amax / 448`` on CUDA multiplies by the float32 reciprocal
        s = tl.where(amax == 0.0, 1.0, s)
        s = tl.maximum(s, 1.1754943508222875e-38)  # float32 tiny, as the eager clamp
        over = tl.math.div_rn(amax, s) > 448.0
        s_up = (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)  # nextafter(s, +inf), s > 0
        s = tl.where(over, s_up, s)
        s = tl.where(n_nan > 0, float("nan"), s)
        q = tl.where(offs < K, tl.math.div_rn(x, s), 0.0)  # padded columns are zeros whatever the scale
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.float8e4nv), mask=offs < K_PAD)
        tl.store(s_ptr + row, s)

    return _rowwise_quant


def _fp8_rows(
    x2d: torch.Tensor, k_padded: Optional[int], out_shape: Optional[tuple[int, ...]], who: str
) -> tuple[int, int, int, torch.Tensor]:
    """Validate ``x2d`` (M, K) with last-dim stride 1; allocate the FP8 output. -> (m, k, k_padded, q (M, k_padded))."""
    m, k = x2d.shape
    kp = k if k_padded is None else k_padded
    if x2d.stride(-1) != 1 and k > 1:
        raise ValueError(f"{who} needs last-dim stride 1, got {x2d.stride(-1)}")
    if kp > MAX_K:
        raise ValueError(f"{who}: rows of {kp} elements exceed MAX_K={MAX_K}")
    q = torch.empty(out_shape if out_shape is not None else (m, kp), dtype=torch.float8_e4m3fn, device=x2d.device)
    return m, k, kp, q.view(m, kp)


#: the float32 reciprocal of 448 that eager ``x / 448`` multiplies by on CUDA
_INV_MAX = float(torch.tensor(1.0, dtype=torch.float32) / 448.0)


def rowwise_quantize(
    x2d: torch.Tensor, k_padded: Optional[int] = None, out_shape: Optional[tuple[int, ...]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: q (M, k_padded) float8_e4m3fn row-major, scale (M,) float32, from ``x2d`` (M, K).

    ``x2d`` must be on CUDA, bf16/fp16/fp32, with last-dim stride 1 (any row stride); it is read
    only.  ``out_shape`` lets the caller allocate q with its own leading shape (same numel).
    """
    import triton

    m, k, kp, q2 = _fp8_rows(x2d, k_padded, out_shape, "rowwise_quantize")
    scale = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q2, scale
    block = triton.next_power_of_2(max(kp, 16))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _ROWWISE((m,), x2d, q2, scale, k, kp, x2d.stride(0), q2.stride(0), _INV_MAX, BLOCK_K=block, num_warps=warps)
    return q2, scale


@functools.lru_cache(maxsize=1)
def _absmax_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _absmax(x_ptr, out_ptr, M, K, stride_xm, BLOCK_K: tl.constexpr, FLAT: tl.constexpr):
        # |x| of non-negative floats orders like its int32 bits, and NaN's bits sort above inf: an integer max
        # keeps NaN (a float max would drop it), and one atomic per program keeps contention low
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK_K], dtype=tl.int32)
        if FLAT:  # one dense run of M elements (K unused): wide blocks striding over it, no row tails
            for start in range(pid.to(tl.int64) * BLOCK_K, M, tl.num_programs(0) * BLOCK_K):
                offs = start + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs, mask=offs < M, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
        else:
            for row in range(pid, M, tl.num_programs(0)):
                for k0 in range(0, K, BLOCK_K):
                    offs = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
                    acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
        tl.atomic_max(out_ptr, tl.max(acc, axis=0))

    return _absmax


@functools.lru_cache(maxsize=1)
def _cast_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled_cast(
        x_ptr,
        s_ptr,
        amax_ptr,
        q_ptr,
        K,
        K_PAD,
        stride_xm,
        stride_qm,
        INV_MAX,
        BLOCK: tl.constexpr,
        DYNAMIC: tl.constexpr,
        FLAT: tl.constexpr,
    ):
        if FLAT:  # input and output are one dense run of K (= K_PAD) elements: 1-D blocks, no row tails
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            x_ptrs = x_ptr + offs
            q_ptrs = q_ptr + offs
        else:  # grid (rows, blocks per row)
            row = tl.program_id(0).to(tl.int64)
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            x_ptrs = x_ptr + row * stride_xm + offs
            q_ptrs = q_ptr + row * stride_qm + offs
        if DYNAMIC:  # the scale from the amax, exactly as harness.quant.fp8.quantize._dynamic_scale
            amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
            s = amax * INV_MAX
            s = tl.where(amax == 0.0, 1.0, s)
            s = tl.maximum(s, 1.1754943508222875e-38)
            over = tl.math.div_rn(amax, s) > 448.0
            s = tl.where(over, (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), s)
            s = tl.where(amax != amax, amax, s)
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(s_ptr, s)
        else:
            s = tl.load(s_ptr)
        x = tl.load(x_ptrs, mask=offs < K, other=0.0).to(tl.float32)
        q0 = tl.math.div_rn(x, s)
        q = tl.minimum(tl.maximum(q0, -448.0), 448.0)  # saturate on the copy
        q = tl.where(q0 != q0, q0, q)  # NaN stays NaN (min/max would drop it)
        q = tl.where(offs < K, q, 0.0)  # padded columns are zeros whatever the scale
        tl.store(q_ptrs, q.to(tl.float8e4nv), mask=offs < K_PAD)

    return _scaled_cast


#: Launch shapes of the cast.  Measured on an H200 (torch 2.11, Triton 3.6, scripts/gpu_cast_diag.py) for a
#: 32760 x 5120 bf16 activation: 1-D blocks of 2048 with 4 warps 118 us (4.3 TB/s) against 203 us for
#: per-row blocks of 2048 with 8 warps (5120 = 2.5 blocks: a half-empty block per row) and 154 us for
#: torch's own unscaled ``x.to(float8_e4m3fn)``.  Per-row blocks remain for padded or strided rows.
_FLAT_BLOCK, _FLAT_WARPS = 2048, 4
_ROW_BLOCK, _ROW_WARPS = 2048, 8


def cast_is_flat(x2d: torch.Tensor, q2: torch.Tensor, k_padded: Optional[int] = None) -> bool:
    """True when the cast of ``x2d`` (M, K) into ``q2`` (M, k_padded) runs as 1-D blocks: no padding, and
    input and output rows each form one dense run (row stride K)."""
    m, k = x2d.shape
    kp = k if k_padded is None else k_padded
    dense = m <= 1 or (x2d.stride(0) == k and q2.stride(0) == kp)
    return kp == k and (k <= 1 or x2d.stride(1) == 1) and dense


def _launch_cast(
    x2d: torch.Tensor,
    s: torch.Tensor,
    amax: torch.Tensor,
    q2: torch.Tensor,
    m: int,
    k: int,
    kp: int,
    inv_max: float,
    dynamic: bool,
) -> None:
    """One pass of ``_scaled_cast`` over (m, k) rows into ``q2`` (m, kp); flat when both are one dense run."""
    import triton

    if cast_is_flat(x2d, q2, k_padded=kp):
        n = m * k
        _CAST(
            (triton.cdiv(n, _FLAT_BLOCK),),
            x2d,
            s,
            amax,
            q2,
            n,
            n,
            0,
            0,
            inv_max,
            BLOCK=_FLAT_BLOCK,
            DYNAMIC=dynamic,
            FLAT=True,
            num_warps=_FLAT_WARPS,
        )
    else:
        _CAST(
            (m, triton.cdiv(kp, _ROW_BLOCK)),
            x2d,
            s,
            amax,
            q2,
            k,
            kp,
            x2d.stride(0),
            q2.stride(0),
            inv_max,
            BLOCK=_ROW_BLOCK,
            DYNAMIC=dynamic,
            FLAT=False,
            num_warps=_ROW_WARPS,
        )


_ROWWISE = _Launcher(_kernel)
_ABSMAX = _Launcher(_absmax_kernel)
_CAST = _Launcher(_cast_kernel)
#: elements per block of the flat amax pass (each program strides over the tensor in blocks of this)
_AMAX_FLAT_BLOCK = 8192


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scaled_cast(
    x2d: torch.Tensor, scale: torch.Tensor, k_padded: Optional[int] = None, out_shape: Optional[tuple[int, ...]] = None
) -> torch.Tensor:
    """E4M3 ``clamp(x / scale, -448, 448)`` of (M, K) rows in one pass: q (M, k_padded), zero-padded columns.

    ``scale``: a one-element float32 CUDA tensor (per-tensor; static or computed by the caller).
    Bitwise what eager ``torch.div(x, scale)`` (true division) then a clamp and an RNE cast give.
    """
    m, k, kp, q2 = _fp8_rows(x2d, k_padded, out_shape, "scaled_cast")
    if m == 0:
        return q2
    s = scale.reshape(1)
    _launch_cast(x2d, s, s, q2, m, k, kp, 0.0, dynamic=False)
    return q2


@functools.lru_cache(maxsize=8)
def _programs(device_index: int) -> int:
    return 8 * torch.cuda.get_device_properties(device_index).multi_processor_count


def dynamic_tensorwise_quantize(
    x2d: torch.Tensor, k_padded: Optional[int] = None, out_shape: Optional[tuple[int, ...]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with a dynamic per-tensor scale: one read-only amax pass, then one fused cast pass.

    ``scale`` is a (1,) float32 tensor, bitwise ``_dynamic_scale(amax(|x|))``; ``q`` bitwise the eager
    ``quantize_activation``.  No host synchronisation.
    """
    m, k, kp, q2 = _fp8_rows(x2d, k_padded, out_shape, "dynamic_tensorwise_quantize")
    # one allocation and one fill for both: the scale at offset 0, the amax bits 16 bytes on (every pointer
    # _scaled_mm reads must be 16-byte aligned)
    buf = torch.zeros(8, dtype=torch.int32, device=x2d.device)
    scale, amax_bits = buf[:1].view(torch.float32), buf[4:5]
    if m == 0:
        return q2, scale.fill_(1.0)
    if m <= 1 or x2d.stride(0) == k:  # one dense run: flat blocks
        n = m * k
        nprog = max(1, min(_cdiv(n, _AMAX_FLAT_BLOCK), _programs(x2d.device.index or 0) // 2))
        _ABSMAX((nprog,), x2d, amax_bits, n, k, 0, BLOCK_K=_AMAX_FLAT_BLOCK, FLAT=True, num_warps=8)
    else:
        nprog = min(m, _programs(x2d.device.index or 0))
        _ABSMAX((nprog,), x2d, amax_bits, m, k, x2d.stride(0), BLOCK_K=1024, FLAT=False, num_warps=4)
    _launch_cast(x2d, scale, amax_bits, q2, m, k, kp, _INV_MAX, dynamic=True)
    return q2, scale
