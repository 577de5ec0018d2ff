"""harness.reference.sage: SageAttention 1/2/3 emulations.

Accuracy is judged against the exact ``attention`` on the same inputs; the quantizers are
checked against independent loops over their token groups; the FP4 path is checked against a
composition of independently quantized parts (``formats.quantize_nvfp4`` + exact attention).
"""

from __future__ import annotations

import pytest
import torch

from harness.reference.attention import attention
from harness.reference.formats import FORMATS, dequantize, is_representable, quantize_nvfp4
from harness.reference.metrics import cosine, error_report
from harness.reference import sage
from harness.reference.sage import group_ids, sage_v1, sage_v2, sage_v3

from helpers import hard_permutation_attention

VERSIONS = {
    "v1": sage_v1,
    "v2_sm89": lambda q, k, v, **kw: sage_v2(q, k, v, **kw),
    "v2_sm90": lambda q, k, v, **kw: sage_v2(q, k, v, q_warp=16, k_block=128, pv_accum_dtype="fp32+fp32", **kw),
    "v2_warp_fp32": lambda q, k, v, **kw: sage_v2(q, k, v, qk_quant_gran="per_warp", pv_accum_dtype="fp32", **kw),
    "v3": sage_v3,
}


def _qkv(seed: int, s_q: int = 200, s_k: int = 200, d: int = 128, h: int = 2, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, s_q, d, generator=g).to(dtype)
    k = torch.randn(1, h, s_k, d, generator=g).to(dtype)
    v = torch.randn(1, h, s_k, d, generator=g).to(dtype)
    return q, k, v


def _with_outliers(x: torch.Tensor) -> torch.Tensor:
    """Every 7th token scaled by 10 (token outliers survive smoothing; channel biases would not)."""
    y = x.clone()
    y[:, :, ::7] *= 10
    return y


@pytest.mark.parametrize("name", ["v1", "v2_sm89", "v2_sm90", "v2_warp_fp32"])
def test_int8_fp8_versions_reach_the_reported_cosine(name: str) -> None:
    # SageAttention 1/2 report cosine similarity >= 0.99 against full precision
    q, k, v = _qkv(0)
    out = VERSIONS[name](q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    c = cosine(out, attention(q, k, v))
    assert c >= 0.99, f"{name}: cosine {c:.5f}"


def _nvfp4_dq(x: torch.Tensor, axis: int) -> torch.Tensor:
    return dequantize(quantize_nvfp4(x, axis=axis), torch.float64)


#: P in [0, 1] is scaled to the largest E4M3 block scale times the largest E2M1 value before FP4
P_SCALE = FORMATS["e4m3"].max * FORMATS["e2m1"].max


def test_fp4_version_error_is_the_composition_of_its_parts() -> None:
    """On iid normal inputs NVFP4 costs ~0.5-1% cosine per quantized operand (Q.K, P, V); the
    emulation's error must not exceed twice the sum of those parts, each computed here
    independently (quantize_nvfp4 + exact attention, P quantized against the final row max)."""
    q, k, v = _qkv(1, s_q=256, s_k=256)
    exact = attention(q, k, v)
    out = sage_v3(q, k, v)
    qd, kd, vd = (t[0, 0].double() for t in (q, k, v))
    kd = kd - kd.mean(dim=0, keepdim=True)
    qm = qd.reshape(2, 128, -1).mean(dim=1).repeat_interleave(128, dim=0)
    ref0 = exact[0, 0]
    parts = []
    s_qk = (_nvfp4_dq((qd - qm).float(), -1) @ _nvfp4_dq(kd.float(), -1).T + qm @ kd.T) / 128**0.5
    parts.append(torch.softmax(s_qk, -1) @ vd)
    parts.append(torch.softmax(qd @ kd.T / 128**0.5, -1) @ _nvfp4_dq(vd.float(), 0))
    s = qd @ kd.T / 128**0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    parts.append((_nvfp4_dq((p * P_SCALE).float(), -1) / P_SCALE) @ vd / p.sum(-1, keepdim=True))
    part_dist = sum(1 - cosine(pp, ref0) for pp in parts)
    got = 1 - cosine(out[0, 0], ref0)
    assert 0 < got <= 2 * part_dist, f"cos_dist {got:.4g} vs parts {part_dist:.4g}"


@pytest.mark.parametrize("name", list(VERSIONS))
def test_error_grows_with_outlier_tokens(name: str) -> None:
    q, k, v = _qkv(2)
    base = 1 - cosine(VERSIONS[name](q, k, v), attention(q, k, v))
    q2, k2 = _with_outliers(q), _with_outliers(k)
    worse = 1 - cosine(VERSIONS[name](q2, k2, v), attention(q2, k2, v))
    assert worse > base, f"{name}: outliers {worse:.3g} <= normal {base:.3g}"


def test_k_smoothing_removes_a_channel_bias() -> None:
    q, k, v = _qkv(3)
    kb = k.clone()
    kb[..., 5] += 8  # a per-channel bias: softmax-invariant, but it inflates INT8 K scales
    exact = attention(q, kb, v)
    smooth = 1 - cosine(sage_v1(q, kb, v, smooth_k=True), exact)
    raw = 1 - cosine(sage_v1(q, kb, v, smooth_k=False), exact)
    unbiased = 1 - cosine(sage_v1(q, k, v, smooth_k=True), attention(q, k, v))
    # smoothed, the bias costs (nearly) nothing: the error stays that of the unbiased keys; raw, it grows
    assert smooth <= 2 * unbiased < raw, (smooth, unbiased, raw)


@pytest.mark.parametrize("name", list(VERSIONS))
def test_layouts_agree_and_inputs_are_untouched(name: str) -> None:
    q, k, v = _qkv(4, s_q=70, s_k=90)
    before = [t.clone() for t in (q, k, v)]
    hnd = VERSIONS[name](q, k, v)
    nhd = VERSIONS[name](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD")
    assert torch.equal(nhd.transpose(1, 2), hnd)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("name", list(VERSIONS))
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_every_version_gives_the_known_answer_of_a_hard_permutation(name: str, layout: str) -> None:
    # the layouts agreeing (above) could mean both are wrong: here the answer comes from an oracle
    q, k, v, want = hard_permutation_attention(heads=2, seq=128, head_dim=128, seed=3)
    if layout == "NHD":
        q, k, v, want = (t.transpose(1, 2) for t in (q, k, v, want))
    out = VERSIONS[name](q, k, v, layout=layout)
    assert torch.equal(out.float(), want.float()), f"{name}: max diff {(out.float() - want.float()).abs().max()}"


# --- the quantizers, against loops over their groups ---------------------------------


def _group_scales_by_loop(x: torch.Tensor, members) -> torch.Tensor:
    """Per-token scale amax(group)/127 with groups given as lists of token indices."""
    out = torch.empty(x.shape[0])
    for idx in members:
        out[idx] = x[idx].abs().max() / 127
    return out


@pytest.mark.parametrize("gran", ["per_warp", "per_thread"])
def test_v2_int8_groups_and_rounding(gran: str) -> None:
    q, k, v = _qkv(5, s_q=100, s_k=150, h=1)
    _, it = sage_v2(q, k, v, qk_quant_gran=gran, return_intermediates=True)
    qf = q[0, 0].float()
    kf = k[0, 0].float() - k[0, 0].mean(dim=0, keepdim=True).float()
    if gran == "per_warp":
        q_groups = [list(range(a, min(a + 32, 100))) for a in range(0, 100, 32)]
        k_groups = [list(range(a, min(a + 64, 150))) for a in range(0, 150, 64)]
    else:
        q_groups = [[t for t in range(w, min(w + 32, 100)) if t % 8 == r] for w in range(0, 100, 32) for r in range(8)]
        k_groups = [
            [t for t in range(w, min(w + 64, 150)) if (t % 8) // 2 == r] for w in range(0, 150, 64) for r in range(4)
        ]
    for x, codes, scale, groups in (
        (qf, it.q_values[0, 0], it.q_scale[0, 0, :, 0], q_groups),
        (kf, it.k_values[0, 0], it.k_scale[0, 0, :, 0], k_groups),
    ):
        groups = [g for g in groups if g]
        want = _group_scales_by_loop(x, groups)
        assert torch.allclose(scale, want, rtol=2**-23, atol=0)
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
        # half a step, plus the float32 rounding of x/scale (|x/scale| <= 127) the kernel also does
        err = (codes.double() * scale[:, None].double() - x.double()).abs()
        assert (err <= scale[:, None].double() * (0.5 + 127 * 2.0**-24)).all()
    assert is_representable(it.v_values, "e4m3").all()
    v_amax = v[0, 0].float().abs().amax(dim=0)
    assert torch.allclose(it.v_scale[0, 0, 0], v_amax / 2.25, rtol=2**-23, atol=0)  # fp32+fp16 keeps V within 2.25


def test_group_ids_shapes() -> None:
    ids, n = group_ids(40, "thread_q", 32)
    assert n == 16 and ids[:10].tolist() == list(range(8)) + [0, 1] and ids[32].item() == 8
    ids, n = group_ids(20, "thread_k", 16)
    assert n == 8 and ids[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and ids[16].item() == 4
    with pytest.raises(ValueError, match="multiple of 8"):
        group_ids(10, "thread_q", 12)


def test_v1_intermediates_premultiply_log2e() -> None:
    q, k, v = _qkv(6, s_q=130, s_k=70, h=1)
    _, it = sage_v1(q, k, v, return_intermediates=True)
    x = q[0, 0].float() * it.params["q_premultiplied"]
    s = it.q_scale[0, 0]
    assert torch.allclose(s[0], x[:128].abs().max() / 127, rtol=2**-23, atol=0) and torch.allclose(
        s[-1], x[128:].abs().max() / 127, rtol=2**-23, atol=0
    )
    err = (it.q_values[0, 0].double() * s.double() - x.double()).abs()
    assert (err <= s.double() * (0.5 + 127 * 2.0**-24)).all()
    assert torch.equal(it.v_values, v.to(torch.float16).float())


def test_v3_intermediates_are_nvfp4() -> None:
    q, k, v = _qkv(7, s_q=150, s_k=90, h=1)
    _, it = sage_v3(q, k, v, return_intermediates=True)
    for vals, sc in ((it.q_values, it.q_scale), (it.k_values, it.k_scale), (it.v_values, it.v_scale)):
        assert is_representable(vals, "e2m1").all() and is_representable(sc, "e4m3").all()
    assert it.q_scale.shape == (1, 1, 150, 8) and it.v_scale.shape == (1, 1, 6, 128)
    # Q padded to 256 tokens: the second block's mean includes 106 zero rows
    qpad = torch.cat([q[0, 0].float(), torch.zeros(106, 128)])
    want = qpad.reshape(2, 128, 128).mean(dim=1).to(torch.bfloat16).float()
    assert torch.equal(it.q_mean[0, 0], want)
    with pytest.raises(ValueError, match="multiples of 16"):
        sage_v3(q[..., :40], k[..., :40], v[..., :40])


def test_v1_tail_key_quirk_only_rescales_rows() -> None:
    q, k, v = _qkv(8, s_q=64, s_k=100, h=1, dtype=torch.float32)
    plain = sage_v1(q, k, v)
    quirk = sage_v1(q, k, v, tail_keys_score_zero=True)
    # the quirk adds to each row's denominator (and lifts its running max to >= 0, which only
    # changes P's FP16 rounding): every row shrinks by one factor, up to FP16 resolution
    nz = plain.abs() > plain.abs().amax(dim=-1, keepdim=True) * 2.0**-8
    ratio = torch.where(nz, quirk / plain, torch.nan)
    row = ratio.nanmedian(dim=-1, keepdim=True).values
    assert (row < 1).all()
    dev = ((ratio - row).abs() / row)[nz]
    assert dev.max() <= 2 * 2.0**-10 * plain.abs().amax() / plain.abs()[nz].min()
    q, k, v = _qkv(8, s_q=64, s_k=128, h=1, dtype=torch.float32)
    assert torch.equal(sage_v1(q, k, v), sage_v1(q, k, v, tail_keys_score_zero=True))


def test_v2_smooth_v_is_ignored_outside_fp32_accumulation() -> None:
    q, k, v = _qkv(9, s_q=32, s_k=64, h=1)
    with pytest.warns(UserWarning, match="smooth_v is ignored"):
        a = sage_v2(q, k, v, smooth_v=True)
    assert torch.equal(a, sage_v2(q, k, v))
    vb = v + 3  # a channel mean: smooth_v takes it out before FP8, so FP8 only sees the residual
    exact = attention(q, k, vb)
    smoothed = error_report(sage_v2(q, k, vb, pv_accum_dtype="fp32", smooth_v=True), exact)
    plain = error_report(sage_v2(q, k, vb, pv_accum_dtype="fp32"), exact)
    assert smoothed.rmse < plain.rmse, (smoothed.rmse, plain.rmse)


# --- heads and batch entries are independent -----------------------------------------

#: every version plus the options that change which tensors are grouped together
INDEPENDENT = {
    **VERSIONS,
    "v1_raw_tail_quirk": lambda q, k, v, **kw: sage_v1(q, k, v, smooth_k=False, tail_keys_score_zero=True, **kw),
    "v2_smooth_v": lambda q, k, v, **kw: sage_v2(
        q, k, v, qk_quant_gran="per_warp", pv_accum_dtype="fp32", smooth_v=True, **kw
    ),
    "v3_one_mean": lambda q, k, v, **kw: sage_v3(q, k, v, per_block_mean=False, k_block=32, **kw),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0 differs from +0)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.dtype.itemsize])


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("name", list(INDEPENDENT))
def test_a_batch_is_emulated_head_by_head(name: str, layout: str) -> None:
    """The emulation of a (b, h) batch equals, slice by slice and bitwise, the emulation of each
    (1, 1) head alone: no scale, mean, max or tile is shared across heads or batch entries."""
    b, h, s_q, s_k, d = 2, 3, 70, 90, 32  # lengths that are no multiple of any block or tile
    g = torch.Generator().manual_seed(12)
    # every head at its own magnitude and channel bias, so a statistic shared across heads shows
    mag = (2.0 ** torch.arange(b * h, dtype=torch.float32)).reshape(b, h, 1, 1)
    q, k, v = (torch.randn(b, h, s, d, generator=g) * mag for s in (s_q, s_k, s_k))
    k = k + torch.randn(b, h, 1, d, generator=g) * 4
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    q[0, 1, :5] = 0.0  # zero tokens (scale-1 groups) in one head only
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    fn = INDEPENDENT[name]
    out, it = fn(q, k, v, layout=layout, return_intermediates=True)
    fields = [
        f for f in ("q_values", "q_scale", "k_values", "k_scale", "v_values", "v_scale") if getattr(it, f) is not None
    ]
    fields += [f for f in ("k_mean", "v_mean", "q_mean") if getattr(it, f) is not None]
    for bi in range(b):
        for hi in range(h):
            idx = (
                (slice(bi, bi + 1), slice(hi, hi + 1))
                if layout == "HND"
                else (slice(bi, bi + 1), slice(None), slice(hi, hi + 1))
            )
            one_out, one = fn(q[idx], k[idx], v[idx], layout=layout, return_intermediates=True)
            assert torch.equal(_bits(out[idx]), _bits(one_out)), f"{name}: output of head ({bi}, {hi})"
            for f in fields:  # intermediates are HND whatever the layout
                whole = getattr(it, f)[bi : bi + 1, hi : hi + 1]
                assert torch.equal(_bits(whole), _bits(getattr(one, f))), f"{name}: {f} of head ({bi}, {hi})"


@pytest.mark.parametrize("pairs", [1, 2, 4])
@pytest.mark.parametrize("name", ["v1", "v2_smooth_v", "v3"])
def test_a_batch_split_to_fit_the_memory_budget_is_unchanged(name: str, pairs: int, monkeypatch) -> None:
    """Under a budget of ``pairs`` (batch, head) pairs per piece (1: one head at a time; 2: head
    groups; 4 with 3 heads: whole batch entries) output and intermediates are those of one piece."""
    q, k, v = (t.repeat(2, 1, 1, 1) for t in _qkv(13, s_q=40, s_k=50, d=32, h=3))
    fn = INDEPENDENT[name]
    whole, it = fn(q, k, v, return_intermediates=True)
    monkeypatch.setattr(sage, "_head_bytes", lambda *a: 1)
    monkeypatch.setattr(sage, "DEFAULT_MEMORY_BUDGET", pairs)
    split, it2 = fn(q, k, v, return_intermediates=True)
    assert torch.equal(_bits(whole), _bits(split))
    for f in ("q_values", "q_scale", "k_values", "k_scale", "v_values", "v_scale", "k_mean", "v_mean", "q_mean"):
        a, b = getattr(it, f), getattr(it2, f)
        assert (a is None and b is None) or torch.equal(_bits(a), _bits(b)), f
