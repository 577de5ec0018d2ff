"""convert_to_fp8 / revert_fp8: which layers convert, the report, numerics of the converted model, exact revert."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.quant.convert import DEFAULT_KEEP, FP8Linear, convert_to_fp8, quantize_weight, revert_fp8
from harness.quant.legacy import wanvideo_late2025_forward
from harness.quant.linear import fp8_linear
from harness.reference.formats import quantize, round_to_format


class Tiny(nn.Module):
    """Module names modelled on the Wan wrapper's (blocks.N.<part>...)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "self_attn": nn.ModuleDict({"q": nn.Linear(32, 32), "norm_q": nn.LayerNorm(32)}),
                        "ffn": nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)),
                        "modulation_proj": nn.Linear(32, 32),
                        "audio_cross_attn": nn.ModuleDict({"kv_linear": nn.Linear(32, 64)}),
                    }
                )
            ]
        )
        self.patch_embedding = nn.Linear(16, 32)
        self.time_embedding = nn.Sequential(nn.Linear(32, 32))
        self.multitalk_audio_proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks[0]
        h = b["self_attn"]["q"](x)
        h = b["ffn"](h)
        h = b["modulation_proj"](h)
        h = b["audio_cross_attn"]["kv_linear"](h)[..., :32]
        return self.head(self.multitalk_audio_proj(self.time_embedding(h)))


def test_keep_list_is_the_wrappers_plus_multitalk() -> None:
    assert DEFAULT_KEEP == (
        "norm",
        "bias",
        "time_in",
        "patch_embedding",
        "time_",
        "img_emb",
        "modulation",
        "text_embedding",
        "adapter",
        "add",
        "ref_conv",
        "audio_proj",
        "multitalk_audio_proj",
    )


def test_report_names_converted_and_kept_with_the_keyword() -> None:
    m = Tiny()
    rep = convert_to_fp8(m)
    assert rep.converted == [
        "blocks.0.self_attn.q",
        "blocks.0.ffn.0",
        "blocks.0.ffn.2",
        "blocks.0.audio_cross_attn.kv_linear",
        "head",
    ]
    assert rep.kept == {
        "blocks.0.modulation_proj": "modulation",
        "patch_embedding": "patch_embedding",
        "time_embedding.0": "time_",
        "multitalk_audio_proj": "audio_proj",
    }
    assert isinstance(m.blocks[0]["ffn"][0], FP8Linear) and type(m.patch_embedding) is nn.Linear
    assert isinstance(m.blocks[0]["self_attn"]["norm_q"], nn.LayerNorm)
    again = convert_to_fp8(m)  # idempotent: nothing left to convert
    assert again.converted == [] and set(again.skipped) == set(rep.converted)


def test_revert_restores_the_same_objects_and_weights_exactly() -> None:
    m = Tiny()
    originals = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 32)
    y0 = m(x)
    convert_to_fp8(m)
    assert not torch.equal(m(x), y0)  # it really runs FP8
    restored = revert_fp8(m)
    assert sorted(restored) == sorted(
        n
        for n in originals
        if n
        in {"blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.0.ffn.2", "head", "blocks.0.audio_cross_attn.kv_linear"}
    )
    for n, mod in m.named_modules():
        if n in originals:
            assert mod is originals[n]
    after = m.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(m(x), y0)
    assert revert_fp8(m) == []


@pytest.mark.parametrize("scaling", ["tensor", "row", "none"])
def test_converted_layer_is_fp8_linear_on_the_quantized_weight(scaling: str) -> None:
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32) * 3)
    w0 = lin.weight.detach().clone()
    layer = FP8Linear.from_linear(lin, weight_scaling=scaling)
    assert torch.equal(lin.weight, w0)  # source untouched
    q, s = layer.weight, layer.scale_weight
    if scaling == "none":
        assert s is None and torch.equal(q.float(), round_to_format(w0.clamp(-448, 448), "e4m3"))
    else:
        ref = quantize(w0, "e4m3", granularity="tensor" if scaling == "tensor" else "row", axis=-1)
        nudged = torch.nextafter(ref.scale, torch.full_like(ref.scale, math.inf))  # the one-ULP saturation nudge
        got = s.reshape(ref.scale.shape)
        assert ((got == ref.scale) | (got == nudged)).all()
        assert torch.equal(q.float(), round_to_format(w0 / s.reshape(-1, 1) if s.dim() else w0 / s, "e4m3"))
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), fp8_linear(x, q, s, None, layer.bias))


def test_forward_fn_and_filter_and_errors() -> None:
    m = Tiny()
    rep = convert_to_fp8(m, forward_fn=wanvideo_late2025_forward, filter=lambda n, l: n != "head")
    assert rep.skipped == {"head": "excluded by filter"}
    layer = m.blocks[0]["ffn"][0]
    assert layer.forward_fn is wanvideo_late2025_forward and "wanvideo_late2025_forward" in repr(layer)
    x = torch.randn(1, 3, 32) * 1000  # the legacy forward clamps its (3-D) input in place
    x0 = x.clone()
    layer(x)
    assert not torch.equal(x, x0)
    with pytest.raises(ValueError, match="converts the linears \\*inside\\* a module"):
        convert_to_fp8(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a sequence of keywords"):
        convert_to_fp8(Tiny(), params_to_keep="norm")
    with pytest.raises(ValueError, match="weight_scaling='int8'"):
        quantize_weight(torch.ones(2, 2), "int8")


def test_keep_originals_false_cannot_revert() -> None:
    m = Tiny()
    convert_to_fp8(m, keep_originals=False)
    with pytest.raises(RuntimeError, match="no originals to restore"):
        revert_fp8(m)
