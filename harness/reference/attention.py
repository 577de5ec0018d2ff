"""Exact (tiled, memory-bounded) attention and the same-precision "naive" attention.

``attention`` is the oracle: softmax(Q K^T * scale) V computed in float64 (or float32) with
an online softmax over key tiles, so Wan-14B self-attention fits a fixed memory budget.
``naive_attention`` is the same math in the inputs' own low precision, the "plain PyTorch
implementation in the same precision" that FlashAttention's tests measure kernels against
(kernel error <= 2 x naive error + rounding floor).

Layouts: "HND" = (batch, heads, tokens, head_dim), "NHD" = (batch, tokens, heads, head_dim).
Outputs come back in the input layout, as fresh contiguous tensors. Inputs are never modified.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "DEFAULT_MEMORY_BUDGET",
    "ChunkPlan",
    "plan_chunks",
    "attention",
    "naive_attention",
    "to_hnd",
    "from_hnd",
]

Layout = Literal["HND", "NHD"]
LAYOUTS = ("HND", "NHD")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of workspace (score tiles, accumulators, upcasts)


def to_hnd(x: Tensor, layout: str) -> Tensor:
    """View ``x`` as (b, h, s, d) from ``layout`` (no copy)."""
    _check_layout(layout)
    return x if layout == "HND" else x.transpose(1, 2)


def from_hnd(x: Tensor, layout: str) -> Tensor:
    """Contiguous tensor in ``layout`` from an HND (b, h, s, d) tensor."""
    _check_layout(layout)
    return (x if layout == "HND" else x.transpose(1, 2)).contiguous()


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use 'HND' (b, h, s, d) or 'NHD' (b, s, h, d)")


def _validate(
    q: Tensor, k: Tensor, v: Tensor, layout: str, key_padding_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    _check_layout(layout)
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "(b, h, s, d)" if layout == "HND" else "(b, s, h, d)"
            raise ValueError(f"{n} has shape {tuple(t.shape)}; layout {layout} needs 4-D {want}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{n} has dtype {t.dtype}; attention needs floating-point inputs")
    qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    b, h, _, d = qh.shape
    if kh.shape[0] != b or kh.shape[1] != h or kh.shape[3] != d:
        raise ValueError(
            f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, heads or head_dim "
            f"(layout {layout}); only the token count may differ"
        )
    if vh.shape[:3] != kh.shape[:3]:
        raise ValueError(
            f"v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, heads and tokens (layout {layout})"
        )
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (b, s_k), True = keep")
        if tuple(m.shape) != (b, kh.shape[2]):
            raise ValueError(f"key_padding_mask has shape {tuple(m.shape)}; expected (b, s_k) = {(b, kh.shape[2])}")
    return qh, kh, vh


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for CUDA float32 matmuls inside the block (restored after)."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    try:
        old = m.fp32_precision  # torch >= 2.9; "none" inherits the global setting
        new_api = True
    except (AttributeError, RuntimeError):
        old = m.allow_tf32
        new_api = False
    if new_api:
        if old == "ieee":
            yield
            return
        m.fp32_precision = "ieee"
    else:
        m.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


@dataclass(frozen=True)
class ChunkPlan:
    """How ``attention`` tiles the work: heads per step, query rows and key rows per tile.

    ``workspace_bytes`` is the formula in ``plan_chunks``' docstring evaluated for this plan.
    """

    head_chunk: int
    q_chunk: int
    k_chunk: int
    workspace_bytes: int


def _workspace(hc: int, qc: int, kc: int, d: int, dv: int, e: int) -> int:
    tiles = 2 * qc * kc  # the score/probability tile (updated in place) + one temporary
    rows = qc * (d + dv + 16)  # scaled q tile, accumulator, ~a dozen per-row vectors
    keys = 2 * kc * (d + dv)  # K/V tile (an upcast copy when the input dtype differs)
    return e * hc * (tiles + rows + keys)


def plan_chunks(
    b: int,
    h: int,
    s_q: int,
    s_k: int,
    d: int,
    dv: int,
    *,
    compute_dtype: torch.dtype = torch.float64,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    q_chunk: Optional[int] = None,
    k_chunk: Optional[int] = None,
) -> ChunkPlan:
    """Pick (head_chunk, q_chunk, k_chunk) so the workspace stays within ``memory_budget`` bytes.

    Workspace per step, with ``e`` = bytes of ``compute_dtype``, ``hc`` heads, ``qc`` query
    rows, ``kc`` key rows::

        W = e * hc * (2*qc*kc + qc*(d + dv + 16) + 2*kc*(d + dv))

    (score/probability tile, the query tile, accumulator and per-row vectors, K/V tiles).
    Peak memory of ``attention`` <= inputs (caller's) + output (b*h*s_q*dv*e) + W, plus the
    matmul library's own workspace (cuBLAS: tens of MiB, allocated once per process). Defaults start from
    qc = 1024, kc = 4096 and take as many heads as fit; if one head does not fit, kc then qc
    are halved (down to 16). Explicit ``q_chunk``/``k_chunk`` are honoured as given. Raises
    ``ValueError`` if even the smallest tiles exceed ``memory_budget``.
    """
    e = compute_dtype.itemsize
    qc = min(s_q, q_chunk or 1024) if s_q else 1
    kc = min(s_k, k_chunk or 4096) if s_k else 1
    if q_chunk is not None and q_chunk < 1 or k_chunk is not None and k_chunk < 1:
        raise ValueError(f"q_chunk={q_chunk}, k_chunk={k_chunk} must be positive")
    qc, kc = max(qc, 1), max(kc, 1)
    while _workspace(1, qc, kc, d, dv, e) > memory_budget:
        if k_chunk is None and kc > 16:
            kc = max(16, kc // 2)
        elif q_chunk is None and qc > 16:
            qc = max(16, qc // 2)
        else:
            raise ValueError(
                f"memory_budget={memory_budget} bytes is below the smallest tiles' workspace "
                f"({_workspace(1, qc, kc, d, dv, e)} bytes for q_chunk={qc}, k_chunk={kc}); "
                "raise the budget or pass smaller q_chunk/k_chunk"
            )
    one = _workspace(1, qc, kc, d, dv, e)
    hc = max(1, min(h, memory_budget // max(one, 1)))
    return ChunkPlan(hc, qc, kc, _workspace(hc, qc, kc, d, dv, e))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout = "HND",
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    q_chunk: Optional[int] = None,
    k_chunk: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Exact attention ``softmax(q k^T * scale) v``, tiled with an online softmax.

    q: (b, h, s_q, d) for "HND" or (b, s_q, h, d) for "NHD"; k: same with s_k tokens;
    v: same as k with head dim dv. ``scale`` defaults to 1/sqrt(d). ``key_padding_mask``:
    (b, s_k) bool, True = keep; a query whose keys are all masked gets a zero output row.
    All arithmetic is in ``compute_dtype`` (float64 default, or float32; TF32 is switched off
    for the duration on CUDA); the result is a new contiguous ``compute_dtype`` tensor in
    ``layout``, on the inputs' device. Memory: see ``plan_chunks`` (the default 1 GiB budget
    keeps Wan-14B self-attention, (1, 40, 32760, 128) float32, at ~4 GiB total).
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype={compute_dtype}; use torch.float64 or torch.float32")
    qh, kh, vh = _validate(q, k, v, layout, key_padding_mask)
    b, h, s_q, d = qh.shape
    s_k, dv = kh.shape[2], vh.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    plan = plan_chunks(
        b,
        h,
        s_q,
        s_k,
        d,
        dv,
        compute_dtype=compute_dtype,
        memory_budget=memory_budget,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
    )
    # allocate the result in the caller's layout and write through an HND view: no final copy
    if layout == "HND":
        result = torch.zeros((b, h, s_q, dv), dtype=compute_dtype, device=q.device)
        out = result
    else:
        result = torch.zeros((b, s_q, h, dv), dtype=compute_dtype, device=q.device)
        out = result.transpose(1, 2)
    if s_q == 0 or s_k == 0 or b == 0 or h == 0:
        return result
    neg_inf = -math.inf
    with torch.no_grad(), _ieee_fp32_matmul(q.device):
        for bi in range(b):
            keep = None if key_padding_mask is None else key_padding_mask[bi].to(q.device)
            for h0 in range(0, h, plan.head_chunk):
                h1 = min(h, h0 + plan.head_chunk)
                kb = kh[bi, h0:h1]  # (hc, s_k, d) views; tiles are upcast one at a time
                vb = vh[bi, h0:h1]
                for q0 in range(0, s_q, plan.q_chunk):
                    q1 = min(s_q, q0 + plan.q_chunk)
                    qt = qh[bi, h0:h1, q0:q1].to(compute_dtype, copy=True).mul_(scale)
                    m = torch.full((h1 - h0, q1 - q0, 1), neg_inf, dtype=compute_dtype, device=q.device)
                    l = torch.zeros_like(m)
                    acc = torch.zeros((h1 - h0, q1 - q0, dv), dtype=compute_dtype, device=q.device)
                    for k0 in range(0, s_k, plan.k_chunk):
                        k1 = min(s_k, k0 + plan.k_chunk)
                        p = qt @ kb[:, k0:k1].to(compute_dtype).transpose(1, 2)  # scores
                        if keep is not None:
                            p.masked_fill_(~keep[k0:k1], neg_inf)
                        m_new = torch.maximum(m, p.amax(dim=-1, keepdim=True))
                        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                        p.sub_(m_safe).exp_()  # probabilities, in place
                        corr = torch.exp(m - m_safe)
                        l.mul_(corr).add_(p.sum(dim=-1, keepdim=True))
                        acc.mul_(corr).baddbmm_(p, vb[:, k0:k1].to(compute_dtype))
                        m = m_new
                    l_safe = torch.where(l > 0, l, torch.ones_like(l))
                    out[bi, h0:h1, q0:q1] = acc.div_(l_safe)
    return result


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout = "HND",
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    *,
    q_chunk: Optional[int] = None,
) -> Tensor:
    """Attention in the inputs' own precision: the "same-precision naive run".

    Mirrors FlashAttention's test reference without upcast: ``q`` is scaled in its dtype,
    ``S = q @ k^T`` rounded to the dtype, ``softmax`` in the dtype (torch accumulates
    internally in float32 and rounds P), ``P @ v`` rounded to the dtype. Chunked over heads
    and query rows only (each softmax row is whole, so no online rescaling): one (s_q-chunk,
    s_k) score block per head at a time. Fully masked rows give 0. Returns a new contiguous
    tensor in the inputs' dtype and ``layout``.
    """
    qh, kh, vh = _validate(q, k, v, layout, key_padding_mask)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"naive_attention needs one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    b, h, s_q, d = qh.shape
    s_k, dv = kh.shape[2], vh.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.zeros((b, h, s_q, dv), dtype=q.dtype, device=q.device)
    if 0 in (b, h, s_q, s_k):
        return from_hnd(out, layout)
    e = q.element_size()
    qc = q_chunk or max(1, min(s_q, (256 << 20) // max(1, 3 * s_k * e)))
    with torch.no_grad():
        for bi in range(b):
            keep = None if key_padding_mask is None else key_padding_mask[bi].to(q.device)
            for hi in range(h):
                kt = kh[bi, hi].transpose(0, 1)
                for q0 in range(0, s_q, qc):
                    q1 = min(s_q, q0 + qc)
                    s = (qh[bi, hi, q0:q1] * scale) @ kt
                    if keep is not None:
                        s = s.masked_fill(~keep, -math.inf)
                    p = torch.softmax(s, dim=-1)
                    if keep is not None:
                        p = torch.nan_to_num(p, nan=0.0)
                    out[bi, hi, q0:q1] = p @ vh[bi, hi]
    return from_hnd(out, layout)
