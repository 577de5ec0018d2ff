"""Quantized Wan blocks on the CPU (small config): routing per part, rank invariance, presets and their fallbacks."""

from __future__ import annotations

import pytest
import torch

from harness.quant.backends import EMULATION_OF
from harness.quant.blocks import (
    CONFIGS,
    PRESETS,
    QuantizedBlockConfig,
    make_block,
    nvfp4_linear_emulated,
    part_of,
    resolve_preset,
)
from harness.reference.formats import dequantize, quantize_nvfp4
from harness.reference.wan import TINY, init_params
from harness.reference.wan.blocks import time_modulation

GRID = (2, 2, 2)
L = 8


def _inputs(variant: str = "t2v", seed: int = 0) -> dict:
    params = init_params(TINY, seed, variant, layers=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, TINY.dim, generator=g)
    _, e = time_modulation(torch.tensor([500.0]), params, TINY)
    kw = dict(grid=GRID, context=torch.randn(1, TINY.text_len, TINY.dim, generator=g))
    if variant in ("i2v", "multitalk", "mtv"):
        kw["context_img"] = torch.randn(1, TINY.image_tokens, TINY.dim, generator=g)
    if variant == "multitalk":
        kw["multitalk_audio"] = torch.randn(2, TINY.multitalk_audio_tokens, TINY.multitalk_audio_dim, generator=g)
    return dict(x=x, e=e, params=params, kw=kw)


def _run(block, inp):
    return block(inp["x"], inp["e"], inp["params"], 0, **inp["kw"])


def test_configs_cover_the_model_sizes() -> None:
    assert CONFIGS["1.3b"].dim == 1536 and CONFIGS["14b"].dim == 5120 and CONFIGS["small"] is TINY


def test_part_of_names() -> None:
    assert part_of("blocks.3.self_attn.q") == "self_attn"
    assert part_of("blocks.0.audio_cross_attn_wrapper.audio_cross_attn.q") == "audio_cross_attn_wrapper"
    assert part_of("time_embedding.0") == "time_embedding"


def test_2d_and_3d_linear_inputs_give_identical_blocks() -> None:
    """Per-tensor quantization does not see the rank: feeding (B*L, C) or (B, L, C) must not change a bit."""
    inp = _inputs()
    y3 = _run(make_block("3d-input", "cpu"), inp)
    b2 = make_block("2d-input", "cpu")
    y2 = _run(b2, inp)
    assert torch.equal(y2, y3)
    assert all(call[2] == "2-D input" for call in b2.trace["linear"] if call[1] == "fp8")


def test_attention_is_routed_per_part_and_inputs_untouched() -> None:
    inp = _inputs("i2v")
    x0 = inp["x"].clone()
    cfg = QuantizedBlockConfig(name="routing", attention="sdpa.math", attention_overrides={"cross_attn": "emu.naive"})
    block = make_block(cfg, "cpu")
    y = _run(block, inp)
    calls = block.trace["attention"]
    assert [(p, b) for p, b, _ in calls] == [
        ("self_attn", "sdpa.math"),
        ("cross_attn", "emu.naive"),
        ("cross_attn", "emu.naive"),
    ]
    assert torch.equal(inp["x"], x0) and torch.isfinite(y).all()
    # the same block with every part on sdpa.math differs only in the cross-attention backend
    y_all = _run(make_block(QuantizedBlockConfig(name="all-math", attention="sdpa.math"), "cpu"), inp)
    assert not torch.equal(y, y_all)


def test_keep_keywords_run_in_high_precision() -> None:
    inp = _inputs()
    block = make_block(QuantizedBlockConfig(name="keep-ffn", keep=("ffn",)), "cpu")
    _run(block, inp)
    kinds = {name: (kind, why) for name, kind, why in block.trace["linear"]}
    assert kinds["blocks.0.ffn.0"] == ("bf16", "kept (ffn)") and kinds["blocks.0.ffn.2"] == ("bf16", "kept (ffn)")
    assert kinds["blocks.0.self_attn.q"][0] == "fp8"


def test_infinitetalk_preset_runs_the_multitalk_path_on_emulations() -> None:
    inp = _inputs("multitalk")
    block = make_block("infinitetalk", "cpu", emulate_missing=True)
    y = _run(block, inp)
    assert y.shape == inp["x"].shape and torch.isfinite(y).all()
    parts = {p: b for p, b, _ in block.trace["attention"]}
    assert parts == {"self_attn": "emu.sage1", "cross_attn": "emu.sage1", "audio_cross_attn": "emu.sage1"}
    lin = {name: kind for name, kind, _ in block.trace["linear"]}
    # audio_cross_attn.kv_linear matches no keep keyword ("audio_proj" is not a substring): it runs FP8
    assert lin["blocks.0.audio_cross_attn.kv_linear"] == "fp8"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_resolve_on_cpu_with_reasons_or_emulations(name: str) -> None:
    cfg = PRESETS[name]
    strict = resolve_preset(name, "cpu")
    needs_cuda = cfg.attention.split("|")[0] not in ("sdpa", "sdpa.math") and not cfg.attention.startswith("emu.")
    assert strict.runnable == (not needs_cuda)
    if needs_cuda:
        assert "needs a CUDA device, got cpu" in strict.reason
        with pytest.raises(RuntimeError, match="pass emulate_missing=True"):
            make_block(name, "cpu")
        loose = resolve_preset(name, "cpu", emulate_missing=True)
        assert loose.runnable
        first = cfg.attention.split("|")[0]
        assert loose.attention["self_attn"] == EMULATION_OF[first]
        assert any(s.startswith(f"self_attn: {first} -> {EMULATION_OF[first]}") for s in loose.substitutions)


def test_fp8_sage3_fp8_prefers_the_sm90_kernel_then_the_sm89_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.quant import backends as B

    monkeypatch.setattr(B, "_cuda_available", lambda: True)
    monkeypatch.setattr(B, "_capability", lambda dev: (8, 9))
    monkeypatch.setattr(B, "_installed_version", lambda dist: "2.2.0" if dist == "sageattention" else None)
    monkeypatch.setattr(B, "_module_present", lambda n: n.startswith("sageattention"))

    class _Mod:
        sageattn_qk_int8_pv_fp8_cuda = staticmethod(lambda *a, **k: None)
        sageattn_qk_int8_pv_fp8_cuda_sm90 = staticmethod(lambda *a, **k: None)

    monkeypatch.setattr(B, "_import", lambda n: _Mod)
    r = resolve_preset("fp8+sage3-fp8", "cuda")
    assert r.attention["self_attn"] == "sage2.qk_int8_pv_fp8_cuda" and r.substitutions == ()
    monkeypatch.setattr(B, "_capability", lambda dev: (9, 0))
    r = resolve_preset("fp8+sage3-fp8", "cuda")
    assert r.attention["self_attn"] == "sage2.qk_int8_pv_fp8_cuda_sm90"


def test_nvfp4_linear_is_the_product_of_nvfp4_operands() -> None:
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    got = nvfp4_linear_emulated(x, w, b)
    want = dequantize(quantize_nvfp4(x)) @ dequantize(quantize_nvfp4(w)).T + b
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="K divisible by 16"):
        nvfp4_linear_emulated(torch.randn(2, 40), torch.randn(3, 40), None)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(attention="nope"), KeyError, "unknown attention backend 'nope'"),
        (dict(attention_overrides={"ffn": "sdpa"}), ValueError, "unknown block part 'ffn'"),
        (dict(linear="int4"), ValueError, "unknown linear kind 'int4'"),
        (dict(linear="legacy.nope"), KeyError, "unknown legacy forward"),
        (dict(weight_scaling="block"), ValueError, "weight_scaling='block'"),
        (dict(input_rank=4), ValueError, "input_rank=4"),
    ],
)
def test_config_validation(kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        QuantizedBlockConfig(**kwargs)
