"""Wan2.1 attention blocks as plain functions over a state dict, with swappable operators.

Every block takes ``params`` (a mapping with upstream key names, e.g.
``blocks.3.self_attn.q.weight``), the ``prefix`` of its module (``"blocks.3.self_attn"``) and
two operators:

- ``linear(x, weight, bias, name) -> y``: ``weight`` is (out, in) as stored; ``name`` is the
  module name (``"blocks.3.self_attn.q"``) so an FP8 conversion can apply upstream's
  name filter. Default ``exact_linear``.
- ``attention(q, k, v) -> o`` on NHD tensors (B, L, H, d) -> (B, Lq, H, d). Default
  ``exact_attention``. Inputs may be non-contiguous exactly where upstream's are (MTV keys).

Swapping either is one argument. Arithmetic runs in ``promote(x.dtype, float32)``: float32
normally, float64 when the inputs and params are float64 (the tests use that). Formulas
follow wan-blocks.md; section numbers refer to it. Inputs are never modified.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.reference.attention import _ieee_fp32_matmul
from harness.reference.attention import attention as _ref_attention
from harness.reference.wan.config import WanConfig

__all__ = [
    "LinearFn",
    "AttentionFn",
    "exact_linear",
    "exact_attention",
    "rms_norm",
    "layer_norm",
    "rope_axis_pairs",
    "rope_angles",
    "apply_rope",
    "rope_1d_angles",
    "motion_rope_table",
    "apply_motion_rope",
    "split_heads",
    "merge_heads",
    "self_attention",
    "t2v_cross_attention",
    "i2v_cross_attention",
    "ffn",
    "mtv_motion_attention",
    "humo_audio_attention",
    "multitalk_audio_attention",
    "multitalk_ref_attn_map",
    "multitalk_rope_ranges",
    "multitalk_query_positions",
    "MultiTalkInputError",
    "wan_block",
    "sinusoidal_embedding",
    "time_modulation",
    "text_projection",
    "clip_projection",
    "pad_motion_tokens",
]

LinearFn = Callable[[Tensor, Tensor, Optional[Tensor], str], Tensor]
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Grid = Sequence[int]


def _cdt(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def exact_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str) -> Tensor:
    """``x @ weight.T + bias`` in float32 (float64 for float64 inputs); TF32 off on CUDA."""
    dt = _cdt(x)
    with _ieee_fp32_matmul(x.device):
        return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def exact_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact softmax attention on NHD (B, L, H, d) via ``harness.reference.attention``."""
    return _ref_attention(q, k, v, layout="NHD", compute_dtype=_cdt(q))


def _p(params: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        return params[key]
    except KeyError:
        raise KeyError(
            f"parameter {key!r} is missing; build params with harness.reference.wan.weights "
            "(init_params/load_params) for the right variant"
        ) from None


def _lin(x: Tensor, params: Mapping[str, Tensor], name: str, linear: LinearFn) -> Tensor:
    return linear(x, _p(params, f"{name}.weight"), params.get(f"{name}.bias"), name)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight`` (section 2)."""
    xf = x.to(_cdt(x))
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(xf.dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim (affine when ``weight``/``bias`` are given)."""
    xf = x.to(_cdt(x))
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    return F.layer_norm(xf, (xf.shape[-1],), w, b, eps)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, C) -> (B, L, H, d): channel c goes to head c // d, lane c % d."""
    B, L, C = x.shape
    if C % heads:
        raise ValueError(f"width {C} is not divisible by heads={heads}")
    return x.reshape(B, L, heads, C // heads)


def merge_heads(x: Tensor) -> Tensor:
    """(B, L, H, d) -> (B, L, H*d), head-major (inverse of ``split_heads``)."""
    B, L, H, d = x.shape
    return x.reshape(B, L, H * d)


# ---------------------------------------------------------------------------
# RoPE


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs per axis (frame, height, width): [d/2 - 2*(d//6), d//6, d//6] -> 22, 21, 21 at d=128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim={head_dim} must be even and >= 6")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def rope_angles(grid: Grid, head_dim: int, theta: float = 10000.0, device: Optional[torch.device] = None) -> Tensor:
    """3D RoPE angles (L = f*h*w, head_dim/2) in float64 (section 2).

    Token (f, h, w) has index ``f*H*W + h*W + w``. Pair j of the frame axis (width 2*nf lanes)
    turns by ``f * theta**(-2j / (2*nf))``; height and width axes likewise with their own widths.
    """
    if len(grid) != 3 or any((not isinstance(g, int)) or g < 1 for g in grid):
        raise ValueError(f"grid={tuple(grid)} must be three positive ints (frames, height, width)")
    nf, nh, nw = rope_axis_pairs(head_dim)
    Fr, H, W = grid
    af, ah, aw = (
        rope_1d_angles(torch.arange(n, dtype=torch.float64), 2 * n_pairs, theta)
        for n_pairs, n in ((nf, Fr), (nh, H), (nw, W))
    )
    ang = torch.cat(
        [
            af[:, None, None, :].expand(Fr, H, W, nf),
            ah[None, :, None, :].expand(Fr, H, W, nh),
            aw[None, None, :, :].expand(Fr, H, W, nw),
        ],
        dim=-1,
    ).reshape(Fr * H * W, head_dim // 2)
    return ang.to(device) if device is not None else ang


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved pairs (x[2j], x[2j+1]) rotated by per-pair cos/sin (broadcast to x[..., ::2])."""
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate (B, L, H, d) by angles (L', d/2) (float64, applied in x's compute dtype).

    The first L' tokens are rotated; tokens beyond the grid (padding) are left as they are.
    Same rotation for every head. Returns a new tensor.
    """
    B, L, H, d = x.shape
    Lg = angles.shape[0]
    if angles.shape[1] != d // 2:
        raise ValueError(f"angles have {angles.shape[1]} pairs, head_dim {d} needs {d // 2}")
    if Lg > L:
        raise ValueError(f"RoPE grid has {Lg} tokens but x has only {L}; check the grid")
    dt = _cdt(x)
    xf = x.to(dt)
    cos = torch.cos(angles).to(dt)[None, :, None, :]
    sin = torch.sin(angles).to(dt)[None, :, None, :]
    rot = _rotate_pairs(xf[:, :Lg], cos, sin)
    if Lg == L:
        return rot
    return torch.cat([rot, xf[:, Lg:]], dim=1)


def rope_1d_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """1D RoPE angles (n, head_dim/2) for real positions: pair j turns by ``pos * theta**(-2j/d)``."""
    inv = theta ** (-2.0 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    return torch.outer(positions.to(torch.float64).reshape(-1), inv)


def motion_rope_table(
    n_frames: int, joint_xyz: Tensor, head_dim: int = 128, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """MTV-Crafter "4D" motion RoPE (cos, sin), each (n_frames * joints, head_dim), float32.

    Row ``s = f * joints + j``. Lanes 0..43: time, 22 pairs at ``theta**(-2k/44)``, position f;
    lanes 44..127: x, y, z groups of 28 lanes (14 pairs at ``theta**(-2k/28)``), position =
    joint j's coordinate minus that coordinate's mean over joints. Both lanes of a pair carry
    the pair's value (interleaved). Only head_dim 128 is defined (section 8.1).
    """
    if head_dim != 128:
        raise ValueError(f"the MTV motion RoPE is defined for head_dim 128, got {head_dim}")
    j = joint_xyz.to(torch.float64)
    if j.dim() != 2 or j.shape[1] != 3:
        raise ValueError(f"joint_xyz must be (joints, 3), got {tuple(joint_xyz.shape)}")
    nj = j.shape[0]
    centred = j - j.mean(dim=0, keepdim=True)
    f = torch.arange(n_frames, dtype=torch.float64).repeat_interleave(nj)  # (S_m,)
    ang = [rope_1d_angles(f, 44, theta)]  # time: 22 pairs
    for axis in range(3):  # x, y, z: 14 pairs each, at the joint's coordinate in every frame
        ang.append(rope_1d_angles(centred[:, axis].repeat(n_frames), 28, theta))
    a = torch.cat(ang, dim=1)  # (S_m, 64) pairs
    lanes = a.repeat_interleave(2, dim=1)
    return torch.cos(lanes).to(torch.float32), torch.sin(lanes).to(torch.float32)


def apply_motion_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Per-lane rotation ``(a, b) -> (a*cos - b*sin, b*cos + a*sin)`` on the token axis -2.

    x: (..., S, d); cos/sin: (S, d), lane 2j rotates with its partner 2j+1 using each lane's
    own table entry. Returns a new tensor in x's compute dtype.
    """
    dt = _cdt(x)
    xf = x.to(dt)
    c, s = cos.to(dt), sin.to(dt)
    a, b = xf[..., 0::2], xf[..., 1::2]
    out_a = a * c[..., 0::2] - b * s[..., 0::2]
    out_b = b * c[..., 1::2] + a * s[..., 1::2]
    return torch.stack((out_a, out_b), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------
# attention blocks


def self_attention(
    x: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    rope: Tensor,
    *,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
    return_qk: bool = False,
):
    """WanSelfAttention (section 3). x: (B, L, C); rope: ``rope_angles(grid, head_dim)``.

    ``return_qk``: return ``(out, q, k)`` with the (B, L, H, d) queries and keys after RMSNorm and
    RoPE, which MultiTalk's multi-speaker map is computed from (section 8.3).
    """
    q = rms_norm(_lin(x, params, f"{prefix}.q", linear), _p(params, f"{prefix}.norm_q.weight"), cfg.eps)
    k = rms_norm(_lin(x, params, f"{prefix}.k", linear), _p(params, f"{prefix}.norm_k.weight"), cfg.eps)
    v = _lin(x, params, f"{prefix}.v", linear)
    q = apply_rope(split_heads(q, cfg.heads), rope)
    k = apply_rope(split_heads(k, cfg.heads), rope)
    y = attention(q, k, split_heads(v, cfg.heads))
    out = _lin(merge_heads(y), params, f"{prefix}.o", linear)
    return (out, q, k) if return_qk else out


def t2v_cross_attention(
    x: Tensor,
    context: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    *,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """WanT2VCrossAttention (section 4): queries from x (B, L, C), keys/values from context (B, Lc, C)."""
    q = rms_norm(_lin(x, params, f"{prefix}.q", linear), _p(params, f"{prefix}.norm_q.weight"), cfg.eps)
    k = rms_norm(_lin(context, params, f"{prefix}.k", linear), _p(params, f"{prefix}.norm_k.weight"), cfg.eps)
    v = _lin(context, params, f"{prefix}.v", linear)
    y = attention(split_heads(q, cfg.heads), split_heads(k, cfg.heads), split_heads(v, cfg.heads))
    return _lin(merge_heads(y), params, f"{prefix}.o", linear)


def i2v_cross_attention(
    x: Tensor,
    context: Tensor,
    context_img: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    *,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """WanI2VCrossAttention (section 5, wrapper form): text context and image tokens given apart.

    ``o(Attn(Q, K_txt, V_txt) + Attn(Q, K_img, V_img))`` with one shared Q and one ``o``.
    Use ``context[:, :n_img]`` / ``context[:, n_img:]`` to call it with the original's
    concatenated [image ; text] context.
    """
    H = cfg.heads
    q = split_heads(rms_norm(_lin(x, params, f"{prefix}.q", linear), _p(params, f"{prefix}.norm_q.weight"), cfg.eps), H)
    kt = rms_norm(_lin(context, params, f"{prefix}.k", linear), _p(params, f"{prefix}.norm_k.weight"), cfg.eps)
    vt = _lin(context, params, f"{prefix}.v", linear)
    ki = rms_norm(
        _lin(context_img, params, f"{prefix}.k_img", linear), _p(params, f"{prefix}.norm_k_img.weight"), cfg.eps
    )
    vi = _lin(context_img, params, f"{prefix}.v_img", linear)
    y_txt = merge_heads(attention(q, split_heads(kt, H), split_heads(vt, H)))
    y_img = merge_heads(attention(q, split_heads(ki, H), split_heads(vi, H)))
    return _lin(y_txt + y_img, params, f"{prefix}.o", linear)


def ffn(x: Tensor, params: Mapping[str, Tensor], prefix: str, *, linear: LinearFn = exact_linear) -> Tensor:
    """FFN (section 6): ``ffn.0`` -> GELU(tanh) -> ``ffn.2``."""
    h = _lin(x, params, f"{prefix}.0", linear)
    return _lin(F.gelu(h, approximate="tanh"), params, f"{prefix}.2", linear)


def pad_motion_tokens(motion: Tensor, width: int) -> Tensor:
    """Append zero channels to motion codes (B, S_m, c) up to ``width`` (3072 -> 5120 upstream)."""
    c = motion.shape[-1]
    if c > width:
        raise ValueError(f"motion tokens have {c} channels, more than the model width {width}")
    return F.pad(motion, (0, width - c)) if c < width else motion


def mtv_motion_attention(
    x: Tensor,
    motion: Tensor,
    motion_pe: tuple[Tensor, Tensor],
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    rope: Tensor,
    *,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """MTVCrafterMotionAttention (section 8.1), including upstream's key reinterpretation.

    x: (B, L, C) (already ``norm4``-ed); motion: (B, S_m, C) (see ``pad_motion_tokens``);
    motion_pe: ``motion_rope_table(...)`` (cos, sin), each (S_m, d). Keys are the contiguous
    (B, S_m, C) projection *reinterpreted* as (B, H, S_m, d), motion-RoPE'd, then axis-swapped
    to (B, S_m, H, d) -- non-contiguous, passed to ``attention`` as is. Values are split normally.
    """
    B, S_m, C = motion.shape
    H, d = cfg.heads, cfg.head_dim
    cos, sin = motion_pe
    if cos.shape != (S_m, d) or sin.shape != (S_m, d):
        raise ValueError(f"motion_pe tables must be ({S_m}, {d}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    q = rms_norm(_lin(x, params, f"{prefix}.q", linear), _p(params, f"{prefix}.norm_q.weight"), cfg.eps)
    q = apply_rope(split_heads(q, H), rope)
    kr = rms_norm(
        _lin(motion, params, f"{prefix}.k", linear), _p(params, f"{prefix}.norm_k.weight"), cfg.eps
    ).contiguous()
    kw = kr.view(B, H, S_m, d)  # raw memory reinterpretation, not a head split
    kw = apply_motion_rope(kw, cos, sin)
    k = kw.transpose(1, 2)
    v = split_heads(_lin(motion, params, f"{prefix}.v", linear), H)
    y = attention(q, k, v)
    return _lin(merge_heads(y), params, f"{prefix}.o", linear)


def humo_audio_attention(
    x: Tensor,
    audio: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    grid: Grid,
    *,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """HuMo audio cross-attention (section 8.2): frame f's tokens attend to its 16 audio tokens.

    x: (B, L, C) (already ``norm1_audio``-ed) with L = F * h * w for grid (F', h, w);
    audio: (B_a, F * 16, A) with B_a * F * 16 / 16 = B * F groups. ``prefix`` is the
    ``...audio_cross_attn_wrapper.audio_cross_attn`` module.
    """
    B, L, C = x.shape
    H, d = cfg.heads, cfg.head_dim
    hw = int(grid[1]) * int(grid[2])
    if L % hw:
        raise ValueError(f"HuMo needs L = frames * h*w; got L={L}, h*w={hw} (grid {tuple(grid)})")
    n_f = L // hw
    at = cfg.humo_audio_tokens
    n_groups = audio.shape[0] * audio.shape[1] // at if audio.shape[1] % at == 0 else -1
    if n_groups != B * n_f:
        raise ValueError(
            f"HuMo audio {tuple(audio.shape)} gives {n_groups} groups of {at} tokens but "
            f"x has B*F = {B}*{n_f} = {B * n_f} frames; pass {at} audio tokens per latent frame"
        )
    q = split_heads(rms_norm(_lin(x, params, f"{prefix}.q", linear), _p(params, f"{prefix}.norm_q.weight"), cfg.eps), H)
    k = split_heads(
        rms_norm(_lin(audio, params, f"{prefix}.k", linear), _p(params, f"{prefix}.norm_k.weight"), cfg.eps), H
    )
    v = split_heads(_lin(audio, params, f"{prefix}.v", linear), H)
    y = attention(q.reshape(B * n_f, hw, H, d), k.reshape(-1, at, H, d), v.reshape(-1, at, H, d))
    return _lin(y.reshape(B, n_f * hw, C), params, f"{prefix}.o", linear)


def multitalk_audio_attention(
    x: Tensor,
    audio: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    grid: Grid,
    *,
    n_speakers: int = 1,
    ref_target_masks: Optional[Tensor] = None,
    x_ref_attn_map: Optional[Tensor] = None,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """MultiTalk/InfiniteTalk audio cross-attention (section 8.3).

    x: (B, L, C) (already ``norm_x``-ed); grid (N_t, N_h, N_w), S = N_h*N_w. If L != N_t*S the
    last S tokens are an extra (reference) frame: excluded from the attention and given zero
    output, and the remaining L - S tokens must be whole frames (upstream instead decrements
    N_t, whose view then only fits when L == N_t*S; this reference keeps the intended math).
    audio: (B * frames, N_a, A). No q/k norm; ``kv_linear`` is packed [K | V].
    ``prefix`` is the block's ``audio_cross_attn`` module.

    Several speakers (``n_speakers > 1``): ``audio`` rows hold the speakers' tokens concatenated
    per frame (N_a = n_speakers * 32 upstream; speaker i owns tokens [i*N_a/n, (i+1)*N_a/n)).
    ``ref_target_masks`` (n_classes, S) or (n_classes, N_h, N_w): one first-frame token mask per
    speaker plus optionally a background mask last (n_classes = n_speakers or n_speakers + 1);
    ``x_ref_attn_map`` (n_classes, L or L_main) from ``multitalk_ref_attn_map``. Q is rotated by
    RoPE1D at ``multitalk_query_positions`` (min-max over each given map row, then the first
    L_main entries are used), K by the centre of each speaker's range. An extra frame is also
    assumed when ``audio`` rows != B*N_t (upstream's multi-speaker test); it is dropped and
    zero-filled as for one speaker.
    """
    if n_speakers != 1:
        return _multitalk_multi(
            x, audio, params, prefix, cfg, grid, n_speakers, ref_target_masks, x_ref_attn_map, linear, attention
        )
    B, L, _ = x.shape
    n_t, n_h, n_w = (int(g) for g in grid)
    S = n_h * n_w
    extra = L != n_t * S
    L_main, frames = _multitalk_frames(L, S, B, extra, audio, grid)
    return _multitalk_attend(x, audio, params, prefix, cfg, L_main, frames, S, extra, linear, attention)


def _multitalk_attend(
    x: Tensor,
    audio: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    L_main: int,
    frames: int,
    S: int,
    extra: bool,
    linear: LinearFn,
    attention: AttentionFn,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
) -> Tensor:
    """Per-frame audio attention of the first ``L_main`` tokens; zeros for an extra frame's S tokens.

    ``pos_q`` (L_main,) / ``pos_k`` (N_a,): RoPE1D positions of the multi-speaker path (None: no RoPE).
    """
    B, _, C = x.shape
    H, d = cfg.heads, cfg.head_dim
    n_a = audio.shape[1]
    xm = x[:, :L_main].reshape(B * frames, S, C)
    q = split_heads(_lin(xm, params, f"{prefix}.q_linear", linear), H)
    kv = _lin(audio, params, f"{prefix}.kv_linear", linear)
    kv = kv.view(B * frames, n_a, 2, H, d)
    if pos_q is not None:
        q = apply_rope(q.reshape(B, L_main, H, d), rope_1d_angles(pos_q, d).to(x.device))
        q = q.reshape(B * frames, S, H, d)
        k = apply_rope(kv[:, :, 0], rope_1d_angles(pos_k, d).to(x.device))
        kv = torch.stack((k, kv[:, :, 1].to(k.dtype)), dim=2)
    k, v = kv[:, :, 0], kv[:, :, 1]  # non-contiguous, token stride 2C, as upstream
    y = _lin(merge_heads(attention(q, k, v)), params, f"{prefix}.proj", linear)
    y = y.reshape(B, L_main, C)
    if extra:
        y = torch.cat([y, y.new_zeros(B, S, C)], dim=1)
    return y


def _multitalk_frames(L: int, S: int, B: int, extra: bool, audio: Tensor, grid: Sequence[int]) -> tuple[int, int]:
    """(tokens without the extra reference frame, latent frames), validated against x and the audio rows."""
    L_main = L - S if extra else L
    if L_main <= 0 or L_main % S:
        raise ValueError(f"MultiTalk: x has {L} tokens, not whole frames of S={S} (grid {tuple(grid)})")
    frames = L_main // S
    if audio.shape[0] != B * frames:
        raise ValueError(
            f"MultiTalk audio has {audio.shape[0]} rows, needs B*frames = {B}*{frames} = {B * frames} "
            "(one row per latent frame per batch element)"
        )
    return L_main, frames


class MultiTalkInputError(ValueError):
    """Several MultiTalk speakers were asked for without ``ref_target_masks``/``x_ref_attn_map``."""


MULTITALK_BACKGROUND_POS = 12.0


def multitalk_rope_ranges(n_speakers: int) -> list[tuple[float, float]]:
    """RoPE1D position range R_i per speaker: 2 speakers [0,4], [20,24]; otherwise [4i, 4i+4]."""
    if n_speakers < 1:
        raise ValueError(f"n_speakers={n_speakers} must be >= 1")
    if n_speakers == 2:
        return [(0.0, 4.0), (20.0, 24.0)]
    return [(4.0 * i, 4.0 * i + 4.0) for i in range(n_speakers)]


def _flat_masks(ref_target_masks: Tensor, S: int) -> Tensor:
    m = ref_target_masks
    if m.dim() == 3:
        m = m.reshape(m.shape[0], -1)
    if m.dim() != 2 or m.shape[0] < 1 or m.shape[1] != S:
        raise ValueError(
            f"ref_target_masks must be (n_classes, S={S}) or (n_classes, N_h, N_w) first-frame "
            f"token masks, got shape {tuple(ref_target_masks.shape)}"
        )
    return m


def multitalk_ref_attn_map(q: Tensor, k: Tensor, ref_target_masks: Tensor, first_frame_tokens: int) -> Tensor:
    """MultiTalk ``x_ref_attn_map`` (n_classes, L) from the block's self-attention (section 8.3).

    q, k: (1, L, H, d) self-attention queries/keys after RMSNorm and 3D RoPE;
    ref_target_masks: (n_classes, S) or (n_classes, N_h, N_w) masks over the first frame's
    S = ``first_frame_tokens`` keys. For each class c:
    ``mean_h( sum_s softmax_s((Q_h/sqrt(d)) K_h[:S]^T)[:, s] * mask_c[s] / (sum(mask_c) + 1e-8) )``.
    Computed one head at a time in the compute dtype. Batch must be 1 (upstream stacks the
    per-class maps of all samples along one axis).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k must be (B, L, H, d) alike, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, L, H, d = q.shape
    if B != 1:
        raise ValueError(f"multitalk_ref_attn_map needs batch 1, got B={B}")
    S = int(first_frame_tokens)
    if S < 1 or S > k.shape[1]:
        raise ValueError(f"first_frame_tokens={S} must be in [1, {k.shape[1]}] (keys available)")
    dt = _cdt(q)
    masks = _flat_masks(ref_target_masks, S).to(device=q.device, dtype=dt)
    norm = masks.sum(dim=1) + 1e-8  # (n_classes,)
    qs = q[0].to(dt) / math.sqrt(d)
    kf = k[0, :S].to(dt)
    acc = torch.zeros(masks.shape[0], L, dtype=dt, device=q.device)
    with _ieee_fp32_matmul(q.device):
        for h in range(H):
            probs = torch.softmax(qs[:, h] @ kf[:, h].T, dim=-1)  # (L, S)
            acc += (probs @ masks.T).T / norm[:, None]
    return acc / H


def multitalk_query_positions(x_ref_attn_map: Tensor, n_speakers: int, background: bool) -> Tensor:
    """RoPE1D query positions (L,) in float64 from the class map (section 8.3).

    Speaker i's row is min-max normalised into ``multitalk_rope_ranges(n)[i]`` (a constant row
    goes to the range's lower end); the background position is 12. Each token takes the
    position of the class whose map value is largest (first on ties); the background row
    (last) takes part only when ``background``.
    """
    n_cls = n_speakers + (1 if background else 0)
    if x_ref_attn_map.dim() != 2 or x_ref_attn_map.shape[0] != n_cls:
        raise ValueError(
            f"x_ref_attn_map must be (n_classes={n_cls}, L) for {n_speakers} speakers"
            f"{' + background' if background else ''}, got {tuple(x_ref_attn_map.shape)}"
        )
    m = x_ref_attn_map.to(torch.float64)
    rows = []
    for i, (lo, hi) in enumerate(multitalk_rope_ranges(n_speakers)):
        r = m[i]
        mn, mx = r.min(), r.max()
        span = mx - mn
        unit = (r - mn) / span if span > 0 else torch.zeros_like(r)
        rows.append(unit * (hi - lo) + lo)
    if background:
        rows.append(torch.full_like(m[0], MULTITALK_BACKGROUND_POS))
    table = torch.stack(rows, dim=0)  # (n_cls, L)
    idx = torch.argmax(m, dim=0)
    return table.gather(0, idx[None]).squeeze(0)


def _multitalk_multi(
    x: Tensor,
    audio: Tensor,
    params: Mapping[str, Tensor],
    prefix: str,
    cfg: WanConfig,
    grid: Grid,
    n_speakers: int,
    ref_target_masks: Optional[Tensor],
    x_ref_attn_map: Optional[Tensor],
    linear: LinearFn,
    attention: AttentionFn,
) -> Tensor:
    """Several-speaker path of ``multitalk_audio_attention`` (section 8.3)."""
    if not isinstance(n_speakers, int) or n_speakers < 1:
        raise ValueError(f"n_speakers={n_speakers!r} must be a positive int")
    if ref_target_masks is None or x_ref_attn_map is None:
        missing = [
            n for n, t in (("ref_target_masks", ref_target_masks), ("x_ref_attn_map", x_ref_attn_map)) if t is None
        ]
        raise MultiTalkInputError(
            f"n_speakers={n_speakers}: the multi-speaker MultiTalk path needs "
            f"{' and '.join(missing)} (see multitalk_ref_attn_map)"
        )
    B, L, _ = x.shape
    n_t, n_h, n_w = (int(g) for g in grid)
    S = n_h * n_w
    masks = _flat_masks(ref_target_masks, S)
    n_cls = masks.shape[0]
    if n_cls not in (n_speakers, n_speakers + 1):
        raise ValueError(
            f"ref_target_masks has {n_cls} masks; {n_speakers} speakers need {n_speakers} "
            f"(one per speaker) or {n_speakers + 1} (plus a background mask last)"
        )
    background = n_cls == n_speakers + 1
    extra = L != n_t * S or audio.shape[0] != B * n_t
    L_main, frames = _multitalk_frames(L, S, B, extra, audio, grid)
    n_a = audio.shape[1]
    if n_a % n_speakers:
        raise ValueError(f"MultiTalk audio has {n_a} tokens per frame, not divisible by n_speakers={n_speakers}")
    if x_ref_attn_map.dim() != 2 or x_ref_attn_map.shape[0] != n_cls or x_ref_attn_map.shape[1] not in (L, L_main):
        raise ValueError(
            f"x_ref_attn_map must be (n_classes={n_cls}, {L}) (or ({n_cls}, {L_main}) without the "
            f"extra frame) to match ref_target_masks and x, got {tuple(x_ref_attn_map.shape)}"
        )
    pos_q = multitalk_query_positions(x_ref_attn_map, n_speakers, background)[:L_main]
    centres = torch.tensor([(lo + hi) / 2 for lo, hi in multitalk_rope_ranges(n_speakers)], dtype=torch.float64)
    pos_k = centres.repeat_interleave(n_a // n_speakers)  # (N_a,), same in every frame
    return _multitalk_attend(x, audio, params, prefix, cfg, L_main, frames, S, extra, linear, attention, pos_q, pos_k)


def wan_block(
    x: Tensor,
    e: Tensor,
    params: Mapping[str, Tensor],
    index: int,
    cfg: WanConfig,
    *,
    grid: Grid,
    context: Tensor,
    context_img: Optional[Tensor] = None,
    rope: Optional[Tensor] = None,
    multitalk_audio: Optional[Tensor] = None,
    multitalk_scale: float = 1.0,
    multitalk_speakers: int = 1,
    ref_target_masks: Optional[Tensor] = None,
    motion: Optional[Tensor] = None,
    motion_pe: Optional[tuple[Tensor, Tensor]] = None,
    mtv_scale: float = 1.0,
    humo_audio: Optional[Tensor] = None,
    humo_scale: float = 1.0,
    linear: LinearFn = exact_linear,
    attention: AttentionFn = exact_attention,
) -> Tensor:
    """WanAttentionBlock ``blocks.<index>`` (section 7) with 6-way modulation and adapters.

    x: (B, L, C); e: (B, 6, C) or per-token (B, 6, L, C) (``time_modulation``); context:
    (B, Lc, C) text; context_img: (B, n_img, C) for I2V blocks (those with ``cross_attn.k_img``).
    Adapters run when the block has their params (``audio_cross_attn.q_linear`` MultiTalk,
    ``motion_attn`` MTV, ``audio_cross_attn_wrapper`` HuMo) and then need their input.
    MultiTalk with ``multitalk_speakers > 1`` also needs ``ref_target_masks`` (see
    ``multitalk_audio_attention``); the block computes ``x_ref_attn_map`` from its own
    self-attention queries and keys (after RMSNorm and RoPE) over the first frame's N_h*N_w
    keys, as upstream does (batch 1, as upstream runs it).
    Returns a new (B, L, C) tensor in the compute dtype.
    """
    pre = f"blocks.{index}"
    if rope is None:
        rope = rope_angles(tuple(grid), cfg.head_dim, device=x.device)
    dt = _cdt(x)
    xf = x.to(dt)
    mod = _p(params, f"{pre}.modulation").to(dt)
    if e.dim() not in (3, 4) or e.shape[1] != 6:
        raise ValueError(f"e must be (B, 6, C) or (B, 6, L, C), got {tuple(e.shape)}")
    if e.dim() == 3:
        m = (mod + e.to(dt)).chunk(6, dim=1)  # each (B, 1, C)
    else:
        m = tuple(t.squeeze(1) for t in (mod.unsqueeze(2) + e.to(dt)).chunk(6, dim=1))
    sh1, sc1, g1, sh2, sc2, g2 = m
    eps = cfg.eps
    ops = dict(linear=linear, attention=attention)

    multitalk = f"{pre}.audio_cross_attn.q_linear.weight" in params
    if not isinstance(multitalk_speakers, int) or isinstance(multitalk_speakers, bool) or multitalk_speakers < 1:
        raise ValueError(f"multitalk_speakers={multitalk_speakers!r} must be an integer >= 1")
    several = multitalk and multitalk_speakers > 1
    if several and ref_target_masks is None:
        raise MultiTalkInputError(
            f"{pre}: {multitalk_speakers} MultiTalk speakers need ref_target_masks "
            "(one first-frame token mask per speaker, optionally a background mask)"
        )
    y, q_rope, k_rope = self_attention(
        layer_norm(xf, eps=eps) * (1 + sc1) + sh1, params, f"{pre}.self_attn", cfg, rope, return_qk=True, **ops
    )
    x_ref_attn_map = (
        multitalk_ref_attn_map(q_rope, k_rope, ref_target_masks, int(grid[1]) * int(grid[2])) if several else None
    )
    xf = xf + y * g1

    h = layer_norm(xf, params.get(f"{pre}.norm3.weight"), params.get(f"{pre}.norm3.bias"), eps)
    if f"{pre}.cross_attn.k_img.weight" in params:
        if context_img is None:
            raise ValueError(f"{pre} is an I2V block (has cross_attn.k_img): pass context_img")
        xf = xf + i2v_cross_attention(h, context, context_img, params, f"{pre}.cross_attn", cfg, **ops)
    else:
        xf = xf + t2v_cross_attention(h, context, params, f"{pre}.cross_attn", cfg, **ops)

    if multitalk:
        if multitalk_audio is None:
            raise ValueError(f"{pre} has MultiTalk audio attention: pass multitalk_audio")
        h = layer_norm(xf, _p(params, f"{pre}.norm_x.weight"), _p(params, f"{pre}.norm_x.bias"), eps)
        xf = xf + multitalk_scale * multitalk_audio_attention(
            h,
            multitalk_audio,
            params,
            f"{pre}.audio_cross_attn",
            cfg,
            grid,
            n_speakers=multitalk_speakers,
            ref_target_masks=ref_target_masks,
            x_ref_attn_map=x_ref_attn_map,
            **ops,
        )
    if f"{pre}.motion_attn.q.weight" in params:
        if motion is None or motion_pe is None:
            raise ValueError(f"{pre} has MTV motion attention: pass motion and motion_pe")
        h = layer_norm(xf, _p(params, f"{pre}.norm4.weight"), _p(params, f"{pre}.norm4.bias"), eps)
        xf = xf + mtv_scale * mtv_motion_attention(h, motion, motion_pe, params, f"{pre}.motion_attn", cfg, rope, **ops)
    hw = f"{pre}.audio_cross_attn_wrapper"
    if f"{hw}.audio_cross_attn.q.weight" in params:
        if humo_audio is None:
            raise ValueError(f"{pre} has HuMo audio attention: pass humo_audio")
        h = layer_norm(xf, _p(params, f"{hw}.norm1_audio.weight"), _p(params, f"{hw}.norm1_audio.bias"), eps)
        xf = xf + humo_scale * humo_audio_attention(h, humo_audio, params, f"{hw}.audio_cross_attn", cfg, grid, **ops)

    y = ffn(layer_norm(xf, eps=eps) * (1 + sc2) + sh2, params, f"{pre}.ffn", linear=linear)
    return xf + y * g2


# ---------------------------------------------------------------------------
# embeddings feeding the blocks


def sinusoidal_embedding(t: Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """[cos | sin] of ``t * 10000**(-i/(dim/2))``, i < dim/2, computed in float64, ``dtype`` out."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half).to(t.device)
    a = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1).to(dtype)


def time_modulation(
    t: Tensor, params: Mapping[str, Tensor], cfg: WanConfig, *, linear: LinearFn = exact_linear
) -> tuple[Tensor, Tensor]:
    """(temb, e) from timesteps t: (B,) -> e (B, 6, C); per-token t (B, L) -> e (B, 6, L, C).

    ``temb = time_embedding.2(SiLU(time_embedding.0(sincos(t))))``,
    ``e = time_projection.1(SiLU(temb))`` reshaped to 6 chunks of C. Computed in the
    parameters' dtype promoted to float32.
    """
    s = sinusoidal_embedding(t, cfg.freq_dim, _cdt(_p(params, "time_embedding.0.weight")))
    temb = _lin(F.silu(_lin(s, params, "time_embedding.0", linear)), params, "time_embedding.2", linear)
    e = _lin(F.silu(temb), params, "time_projection.1", linear)
    e = e.unflatten(-1, (6, cfg.dim))
    e = e.movedim(-2, 1) if t.dim() == 2 else e
    return temb, e


def text_projection(text: Tensor, params: Mapping[str, Tensor], *, linear: LinearFn = exact_linear) -> Tensor:
    """T5 features (B, Lt, text_dim) -> (B, Lt, C): ``text_embedding.0`` -> GELU(tanh) -> ``.2``."""
    h = _lin(text, params, "text_embedding.0", linear)
    return _lin(F.gelu(h, approximate="tanh"), params, "text_embedding.2", linear)


def clip_projection(
    clip: Tensor, params: Mapping[str, Tensor], cfg: WanConfig, *, linear: LinearFn = exact_linear
) -> Tensor:
    """CLIP features (B, n_img, clip_dim) -> (B, n_img, C) (section 5): LN, Lin, GELU, Lin, LN.

    Both LayerNorms use ``cfg.eps`` (wan-blocks.md: eps 1e-6 for all norms).
    """
    h = layer_norm(clip, _p(params, "img_emb.proj.0.weight"), _p(params, "img_emb.proj.0.bias"), cfg.eps)
    h = F.gelu(_lin(h, params, "img_emb.proj.1", linear))
    h = _lin(h, params, "img_emb.proj.3", linear)
    return layer_norm(h, _p(params, "img_emb.proj.4.weight"), _p(params, "img_emb.proj.4.bias"), cfg.eps)
