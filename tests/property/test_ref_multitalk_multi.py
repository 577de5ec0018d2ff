"""MultiTalk/InfiniteTalk multi-speaker audio attention (wan-blocks.md section 8.3).

Checked against an independent float64 formulation written here with explicit loops per
frame/head/token and RoPE as a complex-number rotation.
"""

from __future__ import annotations

import cmath
import functools
import importlib.util
import math
import subprocess
from pathlib import Path

import pytest
import torch

from harness.reference.wan import blocks as wb
from harness.reference.wan import weights as ww
from harness.reference.wan.config import TINY

F64 = torch.float64
CFG = TINY
GRID = (3, 2, 4)
S = GRID[1] * GRID[2]  # 8 tokens per frame
L = GRID[0] * S  # 24
PRE = "blocks.0.audio_cross_attn"
PER_SPK = 4  # audio tokens per speaker per frame (32 upstream; fewer keeps the loops fast)
# last commit of blocks.py before the multi-speaker path existed (single-speaker baseline)
BASE_COMMIT = "28351bc324b79f06cba6c322f3b65f659beeb6a6"


def _x(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def params() -> dict:
    return ww.init_params(CFG, 0, "multitalk", layers=1, embeddings=False, dtype=F64)


# --- independent float64 formulation --------------------------------------------------------


def ind_map(q, k, masks, n_first):
    """q, k (1, L, H, d); masks (n, n_first) -> (n, L) with explicit loops."""
    _, Lq, H, d = q.shape
    out = torch.zeros(masks.shape[0], Lq, dtype=F64)
    for c in range(masks.shape[0]):
        cnt = float(masks[c].sum())
        for t in range(Lq):
            tot = 0.0
            for h in range(H):
                sc = [float(q[0, t, h] @ k[0, s, h]) / math.sqrt(d) for s in range(n_first)]
                mx = max(sc)
                e = [math.exp(v - mx) for v in sc]
                z = sum(e)
                tot += sum(e[s] / z * float(masks[c, s]) for s in range(n_first)) / (cnt + 1e-8)
            out[c, t] = tot / H
    return out


def ind_positions(amap, n_spk, background):
    ranges = [(0, 4), (20, 24)] if n_spk == 2 else [(4 * i, 4 * i + 4) for i in range(n_spk)]
    rows = amap.tolist()
    pos = []
    for t in range(len(rows[0])):
        col = [rows[c][t] for c in range(len(rows))]
        best = max(range(len(col)), key=lambda c: (col[c], -c))  # first index on ties
        if background and best == n_spk:
            pos.append(12.0)
            continue
        r = rows[best]
        lo, hi = ranges[best]
        pos.append((r[t] - min(r)) / (max(r) - min(r)) * (hi - lo) + lo)
    return pos, [(lo + hi) / 2 for lo, hi in ranges]


def ind_rotate(vec, pos):
    d = vec.shape[0]
    out = torch.empty_like(vec)
    for j in range(d // 2):
        z = complex(float(vec[2 * j]), float(vec[2 * j + 1])) * cmath.exp(1j * pos * 10000.0 ** (-2 * j / d))
        out[2 * j], out[2 * j + 1] = z.real, z.imag
    return out


def ind_multitalk(x, audio, p, n_spk, amap, background, n_frames):
    C, H = CFG.dim, CFG.heads
    d = C // H
    W = lambda n: (p[f"{PRE}.{n}.weight"], p[f"{PRE}.{n}.bias"])  # noqa: E731
    wq, bq = W("q_linear")
    wkv, bkv = W("kv_linear")
    wp, bp = W("proj")
    pos_q, centres = ind_positions(amap, n_spk, background)
    n_a = audio.shape[1]
    out = torch.zeros_like(x)
    for f in range(n_frames):
        kv = audio[f] @ wkv.T + bkv
        kk, vv = kv[:, :C], kv[:, C:]
        for s in range(S):
            t = f * S + s
            qv = x[0, t] @ wq.T + bq
            merged = torch.empty(C, dtype=F64)
            for h in range(H):
                qh = ind_rotate(qv[h * d : (h + 1) * d], pos_q[t])
                ks = [ind_rotate(kk[a, h * d : (h + 1) * d], centres[a // (n_a // n_spk)]) for a in range(n_a)]
                sc = torch.tensor([float(qh @ kr) / math.sqrt(d) for kr in ks], dtype=F64)
                w = torch.softmax(sc, 0)
                merged[h * d : (h + 1) * d] = sum(w[a] * vv[a, h * d : (h + 1) * d] for a in range(n_a))
            out[0, t] = merged @ wp.T + bp
    return out


def _close(out, ref):
    assert out.dtype == F64
    err = (out - ref).abs().max().item()
    assert err <= 1e-10 * max(1.0, ref.abs().max().item()), err


def _masks(n_cls, seed):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n_cls, S, generator=g) > 0.5).to(F64)
    m[:, 0] = 1.0  # no empty mask
    return m


# --- tests -----------------------------------------------------------------------------------


def test_ref_attn_map_matches_loops() -> None:
    q, k = _x(1, 1, L, CFG.heads, CFG.head_dim), _x(2, 1, L, CFG.heads, CFG.head_dim)
    masks = _masks(3, 3)
    got = wb.multitalk_ref_attn_map(q, k, masks, S)
    assert got.shape == (3, L)
    _close(got, ind_map(q, k, masks, S))
    # (n, N_h, N_w) masks are the same as flattened ones
    assert torch.equal(wb.multitalk_ref_attn_map(q, k, masks.view(3, GRID[1], GRID[2]), S), got)
    with pytest.raises(ValueError, match="ref_target_masks must be"):
        wb.multitalk_ref_attn_map(q, k, masks[:, :5], S)
    with pytest.raises(ValueError, match="batch 1"):
        wb.multitalk_ref_attn_map(q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1), masks, S)


def test_query_positions_ranges_and_background() -> None:
    amap = _x(4, 3, L).abs()
    amap[2, :5] += 10.0  # background wins on the first 5 tokens
    pos = wb.multitalk_query_positions(amap, 2, background=True)
    assert torch.all(pos[:5] == 12.0)
    ref, _ = ind_positions(amap, 2, True)
    assert torch.allclose(pos, torch.tensor(ref, dtype=F64), rtol=0, atol=1e-12)
    rest = pos[5:]
    assert torch.all(((rest >= 0) & (rest <= 4)) | ((rest >= 20) & (rest <= 24)) | (rest == 12))
    # without a background mask the background never takes part
    pos2 = wb.multitalk_query_positions(amap[:2], 2, background=False)
    assert not torch.any(pos2 == 12.0)
    assert wb.multitalk_rope_ranges(3) == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize(
    "n_spk,background,extra", [(2, False, False), (2, True, False), (3, False, False), (3, True, True), (2, True, True)]
)
def test_multi_speaker_matches_loops(params, n_spk, background, extra) -> None:
    n_cls = n_spk + int(background)
    Lx = L + S if extra else L
    x = _x(10 + n_spk, 1, Lx, CFG.dim)
    audio = _x(20 + n_spk, GRID[0], n_spk * PER_SPK, CFG.multitalk_audio_dim)
    masks = _masks(n_cls, 30 + n_spk)
    q, k = _x(40, 1, Lx, CFG.heads, CFG.head_dim), _x(41, 1, Lx, CFG.heads, CFG.head_dim)
    amap = wb.multitalk_ref_attn_map(q, k, masks, S)
    if background:
        amap[-1, ::3] += 1.0  # make the background win somewhere
    out = wb.multitalk_audio_attention(
        x, audio, params, PRE, CFG, GRID, n_speakers=n_spk, ref_target_masks=masks, x_ref_attn_map=amap
    )
    assert out.shape == x.shape
    ref = ind_multitalk(x, audio, params, n_spk, amap, background, GRID[0])
    _close(out[:, :L], ref[:, :L])
    if extra:
        assert torch.equal(out[:, L:], torch.zeros(1, S, CFG.dim, dtype=F64))
    # the RoPE positions matter: another map changes the output
    out2 = wb.multitalk_audio_attention(
        x, audio, params, PRE, CFG, GRID, n_speakers=n_spk, ref_target_masks=masks, x_ref_attn_map=amap.flip(-1)
    )
    assert not torch.allclose(out2, out)


def test_extra_frame_detected_from_audio_rows(params) -> None:
    # upstream's multi test: x covers N_t frames but audio only N_t - 1 -> last frame is extra
    x = _x(50, 1, L, CFG.dim)
    audio = _x(51, GRID[0] - 1, 2 * PER_SPK, CFG.multitalk_audio_dim)
    masks = _masks(2, 52)
    amap = _x(53, 2, L).abs()
    out = wb.multitalk_audio_attention(
        x, audio, params, PRE, CFG, GRID, n_speakers=2, ref_target_masks=masks, x_ref_attn_map=amap
    )
    assert torch.equal(out[:, L - S :], torch.zeros(1, S, CFG.dim, dtype=F64))
    ref = ind_multitalk(x, audio, params, 2, amap, False, GRID[0] - 1)
    _close(out[:, : L - S], ref[:, : L - S])


def test_operators_are_used(params) -> None:
    calls = {"lin": [], "attn": 0}

    def lin(x, w, b, name):
        calls["lin"].append(name)
        return wb.exact_linear(x, w, b, name)

    def attn(q, k, v):
        calls["attn"] += 1
        assert not k.is_contiguous() and k.stride(1) == 2 * CFG.dim  # packed K, as upstream
        return wb.exact_attention(q, k, v)

    x = _x(60, 1, L, CFG.dim)
    audio = _x(61, GRID[0], 2 * PER_SPK, CFG.multitalk_audio_dim)
    kw = dict(n_speakers=2, ref_target_masks=_masks(2, 62), x_ref_attn_map=_x(63, 2, L).abs())
    a = wb.multitalk_audio_attention(x, audio, params, PRE, CFG, GRID, **kw, linear=lin, attention=attn)
    b = wb.multitalk_audio_attention(x, audio, params, PRE, CFG, GRID, **kw)
    assert torch.equal(a, b)
    assert calls["attn"] == 1 and calls["lin"] == [f"{PRE}.q_linear", f"{PRE}.kv_linear", f"{PRE}.proj"]


def test_errors(params) -> None:
    x = _x(70, 1, L, CFG.dim)
    audio = _x(71, GRID[0], 2 * PER_SPK, CFG.multitalk_audio_dim)
    amap = _x(72, 2, L).abs()
    masks = _masks(2, 73)

    def call(**kw):
        args = dict(n_speakers=2, ref_target_masks=masks, x_ref_attn_map=amap)
        args.update(kw)
        return wb.multitalk_audio_attention(x, audio, params, PRE, CFG, GRID, **args)

    with pytest.raises(ValueError, match="needs ref_target_masks and x_ref_attn_map"):
        call(ref_target_masks=None, x_ref_attn_map=None)
    with pytest.raises(ValueError, match="needs x_ref_attn_map"):
        call(x_ref_attn_map=None)
    with pytest.raises(ValueError, match="ref_target_masks has 4 masks; 2 speakers need 2"):
        call(ref_target_masks=_masks(4, 74), x_ref_attn_map=_x(75, 4, L))
    with pytest.raises(ValueError, match="ref_target_masks has 1 masks"):
        call(ref_target_masks=masks[:1])
    with pytest.raises(ValueError, match="ref_target_masks must be .* got shape \\(2, 6\\)"):
        call(ref_target_masks=masks[:, :6])
    with pytest.raises(ValueError, match="x_ref_attn_map must be \\(n_classes=3, 24\\)"):
        call(ref_target_masks=_masks(3, 76))  # background mask but a 2-row map
    with pytest.raises(ValueError, match="x_ref_attn_map must be"):
        call(x_ref_attn_map=amap[:, :10])
    with pytest.raises(ValueError, match="not divisible by n_speakers=3"):
        call(n_speakers=3, ref_target_masks=_masks(3, 77), x_ref_attn_map=_x(78, 3, L))
    with pytest.raises(ValueError, match="n_speakers=0"):
        call(n_speakers=0)


@functools.lru_cache(maxsize=1)
def _baseline_blocks():
    root = Path(__file__).resolve().parents[2]
    try:
        src = subprocess.run(
            ["git", "show", f"{BASE_COMMIT}:harness/reference/wan/blocks.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("baseline blocks.py not available from git")
    spec = importlib.util.spec_from_loader("_baseline_wan_blocks", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, "baseline_blocks.py", "exec"), mod.__dict__)
    return mod


@pytest.mark.parametrize("extra", [False, True])
def test_single_speaker_unchanged(params, extra) -> None:
    x = _x(80, 1, L + S if extra else L, CFG.dim)
    audio = _x(81, GRID[0], 32, CFG.multitalk_audio_dim)
    out = wb.multitalk_audio_attention(x, audio, params, PRE, CFG, GRID)
    # the multi-speaker inputs are ignored for one speaker (upstream falls through)
    same = wb.multitalk_audio_attention(
        x, audio, params, PRE, CFG, GRID, n_speakers=1, ref_target_masks=_masks(2, 82), x_ref_attn_map=_x(83, 2, L)
    )
    assert torch.equal(out, same)
    old = _baseline_blocks().multitalk_audio_attention(x, audio, params, PRE, CFG, GRID)
    assert torch.equal(out, old)
    p32 = {k_: v.float() for k_, v in params.items()}
    new32 = wb.multitalk_audio_attention(x.float(), audio.float(), p32, PRE, CFG, GRID)
    old32 = _baseline_blocks().multitalk_audio_attention(x.float(), audio.float(), p32, PRE, CFG, GRID)
    assert torch.equal(new32, old32)


# --- the block computes the map from its own self-attention --------------------------------------


@pytest.fixture(scope="module")
def block_params() -> dict:
    return ww.init_params(CFG, 1, "multitalk", layers=1, dtype=F64)


def _block_inputs():
    return dict(
        x=_x(90, 1, L, CFG.dim),
        e=_x(91, 1, 6, CFG.dim),
        context=_x(92, 1, CFG.text_len, CFG.dim),
        context_img=_x(93, 1, CFG.image_tokens, CFG.dim),
        multitalk_audio=_x(94, GRID[0], 2 * PER_SPK, CFG.multitalk_audio_dim),
    )


@pytest.mark.parametrize("background", [False, True])
def test_wan_block_feeds_the_map_of_its_own_self_attention(block_params, monkeypatch, background) -> None:
    seen = {"self_qk": None, "audio_kw": None}

    def attn(q, k, v):
        if seen["self_qk"] is None:  # the block's first attention call is its self-attention (q, k after RoPE)
            seen["self_qk"] = (q.clone(), k.clone())
        return wb.exact_attention(q, k, v)

    real = wb.multitalk_audio_attention

    def spy(*a, **kw):
        seen["audio_kw"] = kw
        return real(*a, **kw)

    monkeypatch.setattr(wb, "multitalk_audio_attention", spy)
    inp = _block_inputs()
    masks = _masks(2 + int(background), 95)
    out = wb.wan_block(
        inp.pop("x"),
        inp.pop("e"),
        block_params,
        0,
        CFG,
        grid=GRID,
        multitalk_speakers=2,
        ref_target_masks=masks,
        attention=attn,
        **inp,
    )
    assert out.shape == (1, L, CFG.dim) and torch.isfinite(out).all()
    kw = seen["audio_kw"]
    assert kw["n_speakers"] == 2 and kw["ref_target_masks"] is masks
    q, k = seen["self_qk"]
    _close(kw["x_ref_attn_map"], ind_map(q, k, masks, S))  # over the first frame's S keys, mean over heads


def test_wan_block_multi_speaker_changes_the_output_and_names_missing_masks(block_params) -> None:
    inp = _block_inputs()
    x, e = inp.pop("x"), inp.pop("e")
    one = wb.wan_block(x, e, block_params, 0, CFG, grid=GRID, **inp)
    two = wb.wan_block(
        x, e, block_params, 0, CFG, grid=GRID, multitalk_speakers=2, ref_target_masks=_masks(2, 96), **inp
    )
    assert not torch.allclose(one, two)  # RoPE1D by speaker: the audio term is not the single-speaker one
    with pytest.raises(wb.MultiTalkInputError, match="2 MultiTalk speakers need ref_target_masks"):
        wb.wan_block(x, e, block_params, 0, CFG, grid=GRID, multitalk_speakers=2, **inp)
    with pytest.raises(ValueError, match="multitalk_speakers=0"):
        wb.wan_block(x, e, block_params, 0, CFG, grid=GRID, multitalk_speakers=0, **inp)
    with pytest.raises(ValueError, match="batch 1"):
        wb.wan_block(
            x.repeat(2, 1, 1),
            e.repeat(2, 1, 1),
            block_params,
            0,
            CFG,
            grid=GRID,
            multitalk_speakers=2,
            ref_target_masks=_masks(2, 97),
            **{**inp, "context": inp["context"].repeat(2, 1, 1), "context_img": inp["context_img"].repeat(2, 1, 1)},
        )
