"""Emulations of SageAttention 1, 2 and 3 numerics in plain PyTorch.

Each function reproduces what the kernel quantizes and how (smoothing, group sizes, scale
rules, rounding, P quantization, accumulator precision) so that the *emulated error* against
the exact ``harness.reference.attention`` can scale a kernel's drift bound. They do not
reproduce the kernels' summation order, and they do not have the kernels' input
restrictions (head_dim, dtype): those belong to the adapters.

Facts used (SageAttention sources and quant-numerics.md section 4):
- v1 (1.0.6, Triton): ``k - mean_tokens(k)`` in the input dtype; Q pre-multiplied by
  ``sm_scale * 1.44269504`` (log2 e) in float32, INT8 per block of 128 tokens, K INT8 per
  block of 64 tokens, scale = amax/127, rounding half away from zero; S in the log2 domain,
  online softmax with exp2 over 64-key tiles; P and V (cast to) FP16, each tile's P.V summed
  in an FP16 accumulator and added to an FP32 one.
- v2 (CUDA): Q INT8 per warp group (32 tokens; 16 on sm90) or "per_thread" (within a warp
  group, tokens ``t % 8`` share a scale); K INT8 per block (64; 128 on sm90) or per_thread
  (within a block, tokens with equal ``(t % 8) // 2`` share a scale); V FP8 E4M3 per channel
  with scale ``amax_tokens / 448`` (``/ 2.25`` for "fp32+fp16", so FP16 partial sums cannot
  overflow); P in [0, 1] times 448 rounded to E4M3 (static scale); the row sum uses P before
  quantization.
- v3 (Blackwell FP4): ``k - mean_tokens(k)`` in the input dtype; Q (zero-padded to a
  multiple of 128 tokens) minus its per-128-token-block mean, with ``mean_block(q) . k^T``
  (computed in the input dtype) added back to S; Q and K NVFP4 along head_dim, V NVFP4 along
  tokens (16-element blocks, scale = e4m3(amax/6)); P~ = exp(S - m) * 448 * 6 with the running
  row max m, quantized per 16 keys with scale e4m3(max(P~)/6); row sum from P~ before
  quantization.

Not emulated: the FP22 accumulator of FP8 MMAs on sm89/sm90 (a kernel may sit slightly
above the emulation there), and exact in-MMA summation order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from harness.reference.attention import DEFAULT_MEMORY_BUDGET, _ieee_fp32_matmul, _validate, from_hnd
from harness.reference.formats import FORMATS, amax_to_scale, dequantize, quantize_nvfp4, round_to_format

__all__ = [
    "LOG2E_SAGE",
    "SageIntermediates",
    "int8_quantize_groups",
    "group_ids",
    "sage_v1",
    "sage_v2",
    "sage_v3",
]

LOG2E_SAGE = 1.44269504  # the truncated log2(e) SageAttention multiplies sm_scale by
_P_FP8_SCALE = FORMATS["e4m3"].max  # v2: P in [0, 1] is multiplied by 448 before E4M3
_P_FP4_SCALE = FORMATS["e4m3"].max * FORMATS["e2m1"].max  # v3: 448 * 6


@dataclass
class SageIntermediates:
    """Quantized tensors and scales of one emulated call, in HND order (b, h, s, ...).

    ``q_values``/``k_values``: INT8 codes (v1, v2) or E2M1 values (v3) as float32.
    ``q_scale``/``k_scale``: per-token dequantization scales (b, h, s, 1) for INT8, per-16-channel
    block scales (b, h, s, d/16) for NVFP4. ``v_values``: FP16 (v1), E4M3 (v2) or E2M1 (v3)
    values as float32; ``v_scale``: None (v1), per channel (b, h, 1, dv) (v2), or per 16-token
    block (b, h, ceil(s/16), dv) (v3). ``k_mean``/``v_mean``/``q_mean``: the subtracted means
    (None when not smoothed). ``params``: the block sizes and options used.
    """

    version: int
    q_values: Tensor
    q_scale: Tensor
    k_values: Tensor
    k_scale: Tensor
    v_values: Tensor
    v_scale: Optional[Tensor]
    k_mean: Optional[Tensor] = None
    v_mean: Optional[Tensor] = None
    q_mean: Optional[Tensor] = None
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# helpers


def group_ids(
    n: int, kind: Literal["block", "thread_q", "thread_k"], size: int, device: Optional[torch.device] = None
) -> tuple[Tensor, int]:
    """Token -> scale-group index for ``n`` tokens, and the number of groups.

    "block": ``t // size``. "thread_q": within each group of ``size`` tokens, tokens with
    equal ``t % 8`` share a scale (8 per group). "thread_k": within each group of ``size``,
    tokens with equal ``(t % 8) // 2`` share a scale (4 per group). These follow the MMA
    fragment ownership of SageAttention 2's per-thread quantization.
    """
    if size < 1:
        raise ValueError(f"group size {size} must be positive")
    t = torch.arange(n, device=device)
    ngroups = -(-n // size)
    if kind == "block":
        return t // size, ngroups
    if kind in ("thread_q", "thread_k"):
        if size % 8:
            raise ValueError(f"per-thread groups need a size that is a multiple of 8, got {size}")
        if kind == "thread_q":
            return (t // size) * 8 + t % 8, ngroups * 8
        return (t // size) * 4 + (t % 8) // 2, ngroups * 4
    raise ValueError(f"kind={kind!r}; use 'block', 'thread_q' or 'thread_k'")


def int8_quantize_groups(x: Tensor, gid: Tensor, ngroups: int) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 per token group: scale = amax(group)/127, round half away from zero.

    x: (..., s, d) float32 (any leading batch/head dims, each quantized on its own); gid: (s,)
    group of each token. Returns (codes as float32 (..., s, d), per-token scale (..., s, 1)).
    All-zero groups get scale 1 (codes 0).
    """
    amax_tok = x.abs().amax(dim=-1)
    g = torch.zeros((*amax_tok.shape[:-1], ngroups), dtype=torch.float32, device=x.device)
    g = g.scatter_reduce(-1, gid.expand_as(amax_tok), amax_tok, reduce="amax", include_self=True)
    tok_scale = amax_to_scale(g, 127.0).index_select(-1, gid).unsqueeze(-1)
    y = x / tok_scale
    codes = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return codes.clamp_(-127, 127), tok_scale


def _per_head(op: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """``op(*xs)`` for (b, h, ...) operands; on CPU one call per (batch, head), elsewhere one call.

    For the float32 products whose sums are not exact (``torch.matmul``) and for ``torch.exp2``, torch's CPU results
    depend on the batch: the batched product sums in another order for some shapes (a 1-key last tile, tiles of a
    few hundred multiply-adds; measured up to one output ulp), and ``exp2`` rounds the vectorised body and the
    scalar tail of a loop differently (1 ulp), so an element's result depends on its position. Per head keeps the
    CPU results those of the per-head emulation, which replays and tests pin; other devices' summation order was
    never part of the emulation.
    """
    if xs[0].device.type != "cpu":
        return op(*xs)
    b, h = xs[0].shape[:2]
    return torch.stack([torch.stack([op(*(x[bi, hi] for x in xs)) for hi in range(h)]) for bi in range(b)])


def _t(x: Tensor, k0: int, k1: int) -> Tensor:
    """Keys ``k0:k1`` of a (b, h, s, d) tensor, transposed to (b, h, d, k1 - k0)."""
    return x[:, :, k0:k1].transpose(-1, -2)


def _online(
    lead: tuple[int, ...],
    s_q: int,
    s_k: int,
    dv: int,
    k_tile: int,
    device: torch.device,
    scores: Callable[[int, int], Tensor],
    pv: Callable[[Tensor, int, int], Tensor],
    tail_zero_scores: bool = False,
) -> tuple[Tensor, Tensor]:
    """Online softmax in the log2 domain over key tiles; returns (acc, l) in float32.

    All (batch, head) pairs at once: ``lead`` is their shape, (b, h). ``scores(k0, k1)`` gives
    the (*lead, s_q, k1-k0) log2-domain scores; ``pv(p, k0, k1)`` turns the unnormalised
    probabilities ``p = exp2(S - m)`` into the tile's (*lead, s_q, dv) contribution (quantizing
    as the kernel does). The row sum ``l`` uses ``p`` before quantization. With
    ``tail_zero_scores`` a short last tile is padded with score-0 keys that add to ``l`` only.
    """
    m = torch.full((*lead, s_q, 1), -math.inf, dtype=torch.float32, device=device)
    l = torch.zeros((*lead, s_q, 1), dtype=torch.float32, device=device)
    acc = torch.zeros((*lead, s_q, dv), dtype=torch.float32, device=device)
    for k0 in range(0, s_k, k_tile):
        k1 = min(s_k, k0 + k_tile)
        s = scores(k0, k1)
        pad = (k_tile - (k1 - k0)) if tail_zero_scores else 0
        tile_max = s.amax(dim=-1, keepdim=True)
        if pad:
            tile_max = torch.clamp(tile_max, min=0.0)
        m_new = torch.maximum(m, tile_max)
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
        p = _per_head(torch.exp2, s - m_safe)
        alpha = _per_head(torch.exp2, m - m_safe)
        l_tile = p.sum(dim=-1, keepdim=True)
        if pad:
            l_tile = l_tile + pad * _per_head(torch.exp2, -m_safe)
        l = l * alpha + l_tile
        acc = acc * alpha + pv(p, k0, k1)
        m = m_new
    return acc, l


def _head_bytes(s_q: int, s_k: int, d: int, k_tile: int) -> int:
    """Workspace of one (batch, head) pair: about a dozen float64 temporaries of its Q/K/V-sized
    and score-tile-sized tensors (the float64 quantization steps; measured ~9x on CPU)."""
    return 12 * 8 * ((s_q + s_k) * d + s_q * k_tile)


def _by_heads(
    core: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, dict]],
    qkv: tuple[Tensor, Tensor, Tensor],
    head_bytes: int,
) -> tuple[Tensor, dict]:
    """Run ``core`` on as many (batch, head) pairs at once as fit ``DEFAULT_MEMORY_BUDGET``.

    ``core(q, k, v)`` emulates contiguous (b', h', s, d) HND slices (each head's (s, d) rows packed) and returns
    (output, intermediates); heads are independent, so the pieces are joined along batch and heads unchanged.
    """
    qh, kh, vh = (x.contiguous() for x in qkv)
    b, h = qh.shape[:2]
    n = max(1, DEFAULT_MEMORY_BUDGET // max(head_bytes, 1))  # pairs per piece
    with torch.no_grad(), _ieee_fp32_matmul(qh.device):
        if n >= b * h:
            return core(qh, kh, vh)
        if n >= h:
            rows = [[(slice(b0, b0 + n // h), slice(None))] for b0 in range(0, b, n // h)]
        else:
            rows = [[(slice(bi, bi + 1), slice(h0, h0 + n)) for h0 in range(0, h, n)] for bi in range(b)]
        parts = [[core(qh[i].contiguous(), kh[i].contiguous(), vh[i].contiguous()) for i in row] for row in rows]

    def join(pick: Callable[[tuple[Tensor, dict]], Optional[Tensor]]) -> Optional[Tensor]:
        if pick(parts[0][0]) is None:
            return None
        return torch.cat([torch.cat([pick(p) for p in row], dim=1) for row in parts], dim=0)

    return join(lambda p: p[0]), {name: join(lambda p, n=name: p[1][n]) for name in parts[0][0][1]}


def _finish(acc: Tensor, l: Tensor) -> Tensor:
    return acc / torch.where(l > 0, l, 1.0)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


# ---------------------------------------------------------------------------
# SageAttention 1


def sage_v1(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Literal["HND", "NHD"] = "HND",
    sm_scale: Optional[float] = None,
    smooth_k: bool = True,
    q_block: int = 128,
    k_block: int = 64,
    return_intermediates: bool = False,
    *,
    tail_keys_score_zero: bool = False,
):
    """Emulate SageAttention 1.0.6 (``sageattn``, Triton): INT8 Q/K per block, FP16 P.V.

    q: (b, h, s_q, d) for "HND" / (b, s_q, h, d) for "NHD"; k, v likewise with s_k tokens.
    Output: new tensor in the input dtype (float32 stays float32) and layout; with
    ``return_intermediates`` a ``(out, SageIntermediates)`` tuple. Emulates as many (batch,
    head) pairs at once as fit ``attention.DEFAULT_MEMORY_BUDGET`` of workspace (one at least),
    one 64-key tile at a time.

    ``tail_keys_score_zero``: the 1.0.6 Triton kernel loads out-of-range keys of a short last
    tile as zeros without masking their scores, which appears to add ``exp2(0 - m)`` per
    missing key to the row sum when ``s_k % 64 != 0`` (inferred from the source, unverified
    on hardware). False emulates the intended math; True emulates that reading.
    """
    qh, kh, vh = _validate(q, k, v, layout, None)
    b, h, s_q, d = qh.shape
    s_k, dv = kh.shape[2], vh.shape[3]
    scale = (d**-0.5) if sm_scale is None else float(sm_scale)
    in_dt = q.dtype
    qid, nq = group_ids(s_q, "block", q_block, q.device)
    kid, nk = group_ids(s_k, "block", k_block, q.device)

    def core(qh: Tensor, kh: Tensor, vh: Tensor) -> tuple[Tensor, dict]:
        b, h = qh.shape[:2]
        kk, km = kh, None
        if smooth_k:
            km = kh.mean(dim=2, keepdim=True)  # in the input dtype, as torch does
            kk = kh - km
        qf = qh.to(torch.float32) * (scale * LOG2E_SAGE)
        q_codes, q_s = int8_quantize_groups(qf, qid, nq)
        k_codes, k_s = int8_quantize_groups(kk.to(torch.float32), kid, nk)
        v16 = vh.to(torch.float16).to(torch.float32)

        def scores(k0: int, k1: int) -> Tensor:
            # INT8 codes: the float32 sums are exact, so one batched product is bitwise per head
            return (q_codes @ _t(k_codes, k0, k1)) * q_s * _t(k_s, k0, k1)

        def pv(p: Tensor, k0: int, k1: int) -> Tensor:
            p16 = p.to(torch.float16).to(torch.float32)
            return _per_head(torch.matmul, p16, v16[:, :, k0:k1]).to(torch.float16).to(torch.float32)

        acc, l = _online((b, h), s_q, s_k, dv, k_block, q.device, scores, pv, tail_zero_scores=tail_keys_score_zero)
        out = _finish(acc, l).to(_out_dtype(in_dt))
        if not return_intermediates:
            return out, {}
        keep = dict(q_values=q_codes, q_scale=q_s, k_values=k_codes, k_scale=k_s, v_values=v16)
        return out, dict(keep, k_mean=None if km is None else km.to(torch.float32))

    out, it = _by_heads(core, (qh, kh, vh), _head_bytes(s_q, s_k, max(d, dv), k_block))
    o = from_hnd(out, layout)
    if not return_intermediates:
        return o
    inter = SageIntermediates(
        version=1,
        v_scale=None,
        **it,
        params=dict(
            sm_scale=scale, q_block=q_block, k_block=k_block, smooth_k=smooth_k, q_premultiplied=scale * LOG2E_SAGE
        ),
    )
    return o, inter


# ---------------------------------------------------------------------------
# SageAttention 2

_PV_ACCUM = ("fp32", "fp32+fp16", "fp32+fp32")


def sage_v2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Literal["HND", "NHD"] = "HND",
    sm_scale: Optional[float] = None,
    smooth_k: bool = True,
    qk_quant_gran: Literal["per_warp", "per_thread"] = "per_thread",
    pv_accum_dtype: Literal["fp32", "fp32+fp16", "fp32+fp32"] = "fp32+fp16",
    smooth_v: bool = False,
    q_warp: int = 32,
    k_block: int = 64,
    v_scale_max: Optional[float] = None,
    return_intermediates: bool = False,
):
    """Emulate SageAttention 2 (``sageattn_qk_int8_pv_fp8_cuda``): INT8 Q/K, FP8 P and V.

    Defaults follow the sm89 path (``q_warp=32``, ``k_block=64``, "fp32+fp16"); the sm90 path
    is ``q_warp=16, k_block=128, pv_accum_dtype="fp32+fp32"``. ``v_scale_max`` defaults to 448
    (2.25 for "fp32+fp16"). ``smooth_v`` applies only to "fp32" (the library ignores it
    otherwise, with a warning; so does this). K smoothing is done in float32 (fused into the
    quantization kernel). With "fp32+fp16" each tile's P.V is rounded to FP16 before joining
    the FP32 accumulator. Output as for ``sage_v1``.
    """
    if qk_quant_gran not in ("per_warp", "per_thread"):
        raise ValueError(f"qk_quant_gran={qk_quant_gran!r}; use 'per_warp' or 'per_thread'")
    if pv_accum_dtype not in _PV_ACCUM:
        raise ValueError(f"pv_accum_dtype={pv_accum_dtype!r}; use one of {_PV_ACCUM}")
    if smooth_v and pv_accum_dtype != "fp32":
        warnings.warn(f"smooth_v is ignored with pv_accum_dtype={pv_accum_dtype!r} (as in SageAttention 2)")
        smooth_v = False
    if v_scale_max is None:
        v_scale_max = 2.25 if pv_accum_dtype == "fp32+fp16" else FORMATS["e4m3"].max
    qh, kh, vh = _validate(q, k, v, layout, None)
    b, h, s_q, d = qh.shape
    s_k, dv = kh.shape[2], vh.shape[3]
    scale = (d**-0.5) if sm_scale is None else float(sm_scale)
    if qk_quant_gran == "per_warp":
        qid, nq = group_ids(s_q, "block", q_warp, q.device)
        kid, nk = group_ids(s_k, "block", k_block, q.device)
    else:
        qid, nq = group_ids(s_q, "thread_q", q_warp, q.device)
        kid, nk = group_ids(s_k, "thread_k", k_block, q.device)

    def core(qh: Tensor, kh: Tensor, vh: Tensor) -> tuple[Tensor, dict]:
        b, h = qh.shape[:2]
        kf = kh.to(torch.float32)
        km = None
        if smooth_k:
            km = kh.mean(dim=2, keepdim=True).to(torch.float32)
            kf = kf - km
        q_codes, q_s = int8_quantize_groups(qh.to(torch.float32), qid, nq)
        k_codes, k_s = int8_quantize_groups(kf, kid, nk)
        vf = vh.to(torch.float32)
        vm = None
        if smooth_v:
            vm = vf.mean(dim=2, keepdim=True)
            vf = vf - vm
        v_amax = vf.abs().amax(dim=2, keepdim=True)
        v_s = amax_to_scale(v_amax, v_scale_max)
        v_q = round_to_format(vf / v_s, "e4m3")
        sl = scale * LOG2E_SAGE

        def scores(k0: int, k1: int) -> Tensor:
            # INT8 codes: the float32 sums are exact, so one batched product is bitwise per head
            return (q_codes @ _t(k_codes, k0, k1)) * q_s * _t(k_s, k0, k1) * sl

        def pv(p: Tensor, k0: int, k1: int) -> Tensor:
            p8 = round_to_format(p * _P_FP8_SCALE, "e4m3")
            t = _per_head(torch.matmul, p8, v_q[:, :, k0:k1])
            if pv_accum_dtype == "fp32+fp16":
                t = t.to(torch.float16).to(torch.float32)
            return t

        acc, l = _online((b, h), s_q, s_k, dv, k_block, q.device, scores, pv)
        out = _finish(acc, l) * (v_s / _P_FP8_SCALE)
        if vm is not None:
            out = out + vm
        out = out.to(_out_dtype(q.dtype))
        if not return_intermediates:
            return out, {}
        keep = dict(q_values=q_codes, q_scale=q_s, k_values=k_codes, k_scale=k_s, v_values=v_q, v_scale=v_s)
        return out, dict(keep, k_mean=km, v_mean=vm)

    out, it = _by_heads(core, (qh, kh, vh), _head_bytes(s_q, s_k, max(d, dv), k_block))
    o = from_hnd(out, layout)
    if not return_intermediates:
        return o
    inter = SageIntermediates(
        version=2,
        **it,
        params=dict(
            sm_scale=scale,
            qk_quant_gran=qk_quant_gran,
            pv_accum_dtype=pv_accum_dtype,
            q_warp=q_warp,
            k_block=k_block,
            v_scale_max=v_scale_max,
            smooth_k=smooth_k,
            smooth_v=smooth_v,
            p_scale=_P_FP8_SCALE,
        ),
    )
    return o, inter


# ---------------------------------------------------------------------------
# SageAttention 3


def _nvfp4_dq(x: Tensor, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """NVFP4 (no global scale) along ``axis``: (dequantized, E2M1 values, block scales)."""
    qt = quantize_nvfp4(x, axis=axis, block_size=16)
    return dequantize(qt), qt.values, qt.scale


def _quant_p_fp4(p: Tensor) -> Tensor:
    """P~ = p * 448 * 6, NVFP4 per 16 keys along the last axis, dequantized, divided back."""
    pt = p * _P_FP4_SCALE
    n = pt.shape[-1]
    padn = (-n) % 16
    if padn:
        pt = torch.nn.functional.pad(pt, (0, padn))
    deq, _, _ = _nvfp4_dq(pt, axis=-1)
    return deq[..., :n] / _P_FP4_SCALE


def sage_v3(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Literal["HND", "NHD"] = "HND",
    sm_scale: Optional[float] = None,
    per_block_mean: bool = True,
    q_block: int = 128,
    k_block: int = 128,
    return_intermediates: bool = False,
):
    """Emulate SageAttention 3 (``sageattn3_blackwell``): NVFP4 Q, K, V and two-level P.

    ``per_block_mean``: Q minus its mean per ``q_block`` tokens (else one mean over all
    tokens), the correction ``mean . k^T`` added to S. Q is zero-padded to a multiple of
    ``q_block`` first, so a short last block's mean includes the padding (as the kernel's
    preprocessing does). V is zero-padded to a multiple of 16 tokens for its token blocks.
    ``sm_scale`` defaults to 1/sqrt(d) (the kernel ignores a given one; the emulation honours
    it). head_dim must be a multiple of 16. Output as for ``sage_v1``.
    """
    qh, kh, vh = _validate(q, k, v, layout, None)
    b, h, s_q, d = qh.shape
    s_k, dv = kh.shape[2], vh.shape[3]
    if d % 16 or dv % 16:
        raise ValueError(f"sage_v3 needs head dims that are multiples of 16 (NVFP4 blocks), got d={d}, dv={dv}")
    if k_block % 16:
        raise ValueError(f"k_block={k_block} must be a multiple of 16 (P is quantized per 16 keys)")
    scale = (d**-0.5) if sm_scale is None else float(sm_scale)
    in_dt = q.dtype
    sq_pad = -(-s_q // q_block) * q_block if per_block_mean else s_q
    sv_pad = -(-s_k // 16) * 16
    pad_tokens = torch.nn.functional.pad

    def core(qh: Tensor, kh: Tensor, vh: Tensor) -> tuple[Tensor, dict]:
        b, h = qh.shape[:2]
        km = kh.mean(dim=2, keepdim=True)
        kk = kh - km  # input dtype, like the kernel's in-place update
        qq = pad_tokens(qh, (0, 0, 0, sq_pad - s_q))
        if per_block_mean:
            blocks = qq.to(torch.float32).reshape(b, h, sq_pad // q_block, q_block, d)
            qm = blocks.mean(dim=3).to(in_dt)  # (b, h, n_blocks, d)
            qm_tok = torch.repeat_interleave(qm, q_block, dim=2)
        else:
            qm = qq.mean(dim=2, keepdim=True)
            qm_tok = qm.expand(b, h, sq_pad, d)
        qs = (qq - qm_tok)[:, :, :s_q]
        qm_rows = qm_tok[:, :, :s_q]
        q_dq, q_vals, q_sc = _nvfp4_dq(qs.to(torch.float32), axis=-1)
        k_dq, k_vals, k_sc = _nvfp4_dq(kk.to(torch.float32), axis=-1)
        vf = pad_tokens(vh.to(torch.float32), (0, 0, 0, sv_pad - s_k))
        v_dq, v_vals, v_sc = _nvfp4_dq(vf, axis=2)
        sl = scale * LOG2E_SAGE

        def scores(k0: int, k1: int) -> Tensor:
            # correction mean . k^T in the input dtype, then float32 (as the kernel's
            # matmul), one key tile at a time so no (s_q, s_k) matrix is materialised
            delta = _per_head(torch.matmul, qm_rows, _t(kk, k0, k1)).to(torch.float32)
            return (_per_head(torch.matmul, q_dq, _t(k_dq, k0, k1)) + delta) * sl

        def pv(p: Tensor, k0: int, k1: int) -> Tensor:
            return _per_head(torch.matmul, _quant_p_fp4(p), v_dq[:, :, k0:k1])

        acc, l = _online((b, h), s_q, s_k, dv, k_block, q.device, scores, pv)
        out = _finish(acc, l).to(_out_dtype(in_dt))
        if not return_intermediates:
            return out, {}
        v_vals = v_vals[:, :, :s_k].contiguous()
        keep = dict(q_values=q_vals, q_scale=q_sc, k_values=k_vals, k_scale=k_sc, v_values=v_vals)
        return out, dict(keep, v_scale=v_sc, k_mean=km.to(torch.float32), q_mean=qm.to(torch.float32))

    out, it = _by_heads(core, (qh, kh, vh), _head_bytes(s_q, s_k, max(d, dv), k_block))
    o = from_hnd(out, layout)
    if not return_intermediates:
        return o
    inter = SageIntermediates(
        version=3,
        **it,
        params=dict(
            sm_scale=scale, per_block_mean=per_block_mean, q_block=q_block, k_block=k_block, p_scale=_P_FP4_SCALE
        ),
    )
    return o, inter
