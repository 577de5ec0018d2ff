"""The write-up's scenarios as quantized Wan blocks (tiny config), judged against the emulation of their formats."""

from __future__ import annotations

import pytest
import torch

from harness.quant.blocks import (
    PRESET_ALIASES,
    PRESETS,
    make_block,
    preset_config,
    resolve_preset,
)
from harness.scenarios import (
    K_BOUND,
    SCENARIOS,
    judge_outputs,
    run_scenario,
    run_scenarios,
    scenario_inputs,
)


@pytest.mark.parametrize(
    "alias,preset",
    [("sageattn_3", "fp4+sage3-fp4"), ("sageattn_3_fp4", "fp4+sage3-fp4"), ("sageattn_3_fp8", "fp8+sage3-fp8")],
)
def test_writeup_mode_names_are_preset_aliases(alias: str, preset: str) -> None:
    assert PRESET_ALIASES[alias] == preset and preset_config(alias) is PRESETS[preset]
    r = resolve_preset(alias, "cpu", emulate_missing=True)
    assert r.config is PRESETS[preset] and r.runnable
    assert make_block(alias, "cpu", emulate_missing=True).config.name == preset


def test_unknown_preset_names_the_aliases() -> None:
    with pytest.raises(KeyError, match="aliases: sageattn_3"):
        preset_config("sageattn_4")


def test_every_scenario_is_a_preset() -> None:
    assert set(SCENARIOS) <= set(PRESETS)


def test_judge_fails_a_finite_output_beyond_the_emulation_bound() -> None:
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(1, 8, 16, generator=g)
    emulated = exact + 0.01 * torch.randn(1, 8, 16, generator=g)
    ok = judge_outputs(emulated, exact, emulated, torch.bfloat16, "planted")
    assert ok.passed
    off = exact.clone()
    off[0, 0, 0] += 10 * K_BOUND * float((emulated - exact).abs().max())  # finite, same shape, far beyond the bound
    bad = judge_outputs(off, exact, emulated, torch.bfloat16, "planted")
    assert not bad.passed and torch.isfinite(off).all() and "allowed" in bad.reason


@pytest.mark.parametrize("name", ["3d-input", "2d-input", "unscaled-weights"])
def test_fp8_scenarios_pass_their_bound_on_cpu(name: str) -> None:
    r = run_scenario(name, "cpu")
    j = r.judgement
    assert r.status == "pass", r.reason
    # the bound is scaled by a real emulation error, and the run is not the emulation itself
    assert j["ref_report"]["max_abs"] > 0 and j["check"]["allowed"] > j["check"]["err"] > 0
    assert set(r.operators["linear"].values()) == {"fp8"}


def test_infinitetalk_runs_the_audio_attention_on_the_emulation_it_names() -> None:
    r = run_scenario("infinitetalk", "cpu")
    assert r.status == "pass", r.reason
    assert r.operators["attention"] == {
        "self_attn": "emu.sage1",
        "cross_attn": "emu.sage1",
        "audio_cross_attn": "emu.sage1",
    }
    assert any(
        s.split(": ")[0].startswith("self_attn/") and "sage1.sageattn -> emu.sage1" in s for s in r.substitutions
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_a_scenario_that_cannot_run_as_asked_is_skipped_with_the_reason() -> None:
    r = run_scenario("3d-input", "cuda", emulate_missing=False)
    assert r.status == "skipped" and "no CUDA device" in r.reason


def test_a_broken_scenario_is_a_named_failure() -> None:
    (r,) = run_scenarios("cpu", ("no-such-preset",))
    assert r.status == "fail" and "unknown preset 'no-such-preset'" in r.reason


def test_emulated_block_uses_the_scheme_not_the_kernel() -> None:
    block = make_block("3d-input", "cpu")
    inp = scenario_inputs("t2v", "cpu")
    args = (inp["x"], inp["e"], inp["params"], 0)
    y = block(*args, **inp["kw"])
    emu = block.emulated(*args, **inp["kw"])
    assert y.shape == emu.shape and not torch.equal(y, emu)
    assert block.trace["linear"] and all(not why.endswith("emulated") for _, _, why in block.trace["linear"])


def test_scenario_inputs_check_the_grid() -> None:
    with pytest.raises(ValueError, match="must equal the grid"):
        scenario_inputs("t2v", "cpu", tokens=9)


def test_an_all_emulated_run_says_it_checks_only_the_mechanics() -> None:
    r = run_scenario("sageattn_3_fp8", "cpu")
    assert r.status == "pass" and r.name == "sageattn_3_fp8"
    # the FP8 linears ran the CPU kernel, so the run is not the emulation itself
    assert "block's mechanics" not in r.reason
    assert r.substitutions[0].startswith("self_attn/cross_attn/") and "-> emu.sage2.sm90" in r.substitutions[0]


def test_a_run_that_is_its_own_emulation_says_so() -> None:
    from harness.quant.blocks import QuantizedBlockConfig

    r = run_scenario(QuantizedBlockConfig(name="all-emulated", linear="nvfp4", attention="emu.naive"), "cpu")
    assert r.name == "all-emulated" and r.status == "pass" and "block's mechanics, not a kernel" in r.reason


def test_a_failure_the_known_sage1_defect_explains_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in kernel with Sage 1.0.6's short-tile defect fails its bound, and the defect's emulation explains it."""
    from harness.quant import backends as B
    from harness.quant.blocks import QuantizedBlockConfig

    emu = B.BACKENDS["emu.sage1"]
    faulty = B.AttentionBackend(
        name="test.sage1_short_tile",
        description="emu.sage1 with the short-tile defect",
        requires=B.Requirements(),
        runner=lambda q, k, v, layout, **kw: emu.run(q, k, v, layout, tail_keys_score_zero=True, **kw),
    )
    monkeypatch.setitem(B.BACKENDS, faulty.name, faulty)
    monkeypatch.setitem(B.EMULATION_OF, faulty.name, "emu.sage1")
    r = run_scenario(QuantizedBlockConfig(name="short-tile", linear="nvfp4", attention=faulty.name), "cpu")
    assert r.status == "fail" and r.known_defect and "short last key tile" in r.reason
    healthy = run_scenario(QuantizedBlockConfig(name="healthy", linear="nvfp4", attention="emu.sage1"), "cpu")
    assert healthy.status == "pass" and healthy.known_defect is None


def test_rowwise_weight_scales_are_emulated_per_row() -> None:
    from harness.quant.blocks import QuantizedBlockConfig

    r = run_scenario(QuantizedBlockConfig(name="row-scaled", weight_scaling="row"), "cpu")
    assert r.status == "pass", r.reason
    assert r.judgement["check"]["allowed"] > r.judgement["check"]["err"] > 0
