"""Layout classes and op targets on the CPU: each class has its layout property, shrinks to its
smallest example, and every CPU-runnable target passes on plain layouts and gets the expected
verdict on the known-bad ones."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from harness.cases import Case, load_case, save_case
from harness.layouts import LayoutSpec
from harness.runner.execute import run_case
from harness.runner.pool import case_values
from harness.runner.targets import all_targets, get_target
from harness.targets import ATTENTION_CLASSES, LINEAR_CLASSES, Context, classes_for
from harness.targets.base import CaseFactory, materialize_inputs

LINEAR_CTX = Context(dtype="bfloat16")
FP8_CTX = Context(dtype="float8_e4m3fn", ranks=(2,))
ATT_CTX = Context(dtype="bfloat16")


def _row_stride(spec: LayoutSpec) -> int:
    return spec.strides()[-2]


# What each class promises about the layouts it draws (independent of the code that draws them).
LINEAR_PROPERTIES = {
    "contiguous": lambda s, p: s.is_contiguous() and s.storage_offset() == 0,
    "transposed": lambda s, p: s.strides()[-1] != 1 and s.strides()[-2] == 1,
    "last_stride_2": lambda s, p: s.strides()[-1] == 2,
    "padded_rows": lambda s, p: _row_stride(s) > p["in_features"] and _row_stride(s) % 2 == 1 and s.shape[-2] > 1,
    "offset_1": lambda s, p: s.alignment() == 1,
    "offset_2": lambda s, p: s.alignment() == 2,
    "offset_4": lambda s, p: s.alignment() == 4,
    "offset_8": lambda s, p: s.alignment() == 8,
    "offset_16": lambda s, p: s.alignment() >= 16 and s.storage_offset() > 0,
    "packed_slice": lambda s, p: _row_stride(s) in (2 * p["in_features"], 3 * p["in_features"]) and s.shape[-2] > 1,
    "flatten_permuted": lambda s, p: not s.is_contiguous() and s.strides()[-1] == 1 and bool(s.views),
    "broadcast": lambda s, p: 0 in s.strides() and s.numel > 0,
    "2d": lambda s, p: len(s.shape) == 2 and s.is_contiguous(),
    "3d": lambda s, p: len(s.shape) == 3 and s.is_contiguous(),
    "4d": lambda s, p: len(s.shape) == 4 and s.is_contiguous(),
    "values_beyond_448": lambda s, p: s.is_contiguous(),
    "outliers": lambda s, p: s.is_contiguous(),
}

ATTENTION_PROPERTIES = {
    "hnd_contiguous": lambda d: (
        d.params["tensor_layout"] == "HND" and all(x.is_contiguous() for x in d.layouts.values())
    ),
    "nhd_contiguous": lambda d: (
        d.params["tensor_layout"] == "NHD" and all(x.is_contiguous() for x in d.layouts.values())
    ),
    "transposed_view": lambda d: (
        d.params["tensor_layout"] == "HND" and not any(x.is_contiguous() for x in d.layouts.values())
    ),
    "packed_qkv": lambda d: all(
        x.strides()[-3 if d.params["tensor_layout"] == "NHD" else -2] == 3 * d.params["heads"] * d.params["head_dim"]
        for x in d.layouts.values()
    ),
    "misaligned_ptr_2": lambda d: all(x.alignment() == 2 for x in d.layouts.values()),
    "misaligned_ptr_4": lambda d: all(x.alignment() == 4 for x in d.layouts.values()),
    "misaligned_ptr_8": lambda d: all(x.alignment() == 8 for x in d.layouts.values()),
    "last_stride_ne_1": lambda d: all(x.strides()[-1] != 1 for x in d.layouts.values()),
    "seq_77": lambda d: d.params["seq_q"] == d.params["seq_k"] == 77,
    "seq_113": lambda d: d.params["seq_q"] == d.params["seq_k"] == 113,
    "seq_257": lambda d: d.params["seq_q"] == d.params["seq_k"] == 257,
    "seq_512": lambda d: d.params["seq_q"] == d.params["seq_k"] == 512,
    "mtv_scrambled_k": lambda d: (
        d.params["tensor_layout"] == "NHD" and not d.layouts["k"].is_contiguous() and d.layouts["q"].is_contiguous()
    ),
}


def test_every_class_has_a_stated_property() -> None:
    assert set(LINEAR_PROPERTIES) == set(LINEAR_CLASSES)
    assert set(ATTENTION_PROPERTIES) == set(ATTENTION_CLASSES)


@pytest.mark.parametrize("ctx", [LINEAR_CTX, FP8_CTX], ids=["bf16", "fp8-2d"])
@pytest.mark.parametrize("name", list(LINEAR_CLASSES))
@settings(max_examples=30)
@given(rng=st.randoms(use_true_random=False))
def test_linear_class_draws_have_their_layout_property(ctx: Context, name: str, rng: random.Random) -> None:
    lc = LINEAR_CLASSES[name]
    if not lc.applies(ctx):
        with pytest.raises(ValueError, match=name):
            lc(rng, ctx)
        return
    d = lc(rng, ctx)
    spec = d.layouts["x"]
    assert spec.dtype == ctx.dtype and len(spec.shape) in ctx.ranks
    assert spec.shape[-1] == d.params["in_features"] and d.params["in_features"] % 16 == 0
    assert d.params["out_features"] % 16 == 0
    assert LINEAR_PROPERTIES[name](spec, d.params), spec.describe()


@pytest.mark.parametrize("name", list(ATTENTION_CLASSES))
@settings(max_examples=30)
@given(rng=st.randoms(use_true_random=False))
def test_attention_class_draws_have_their_layout_property(name: str, rng: random.Random) -> None:
    d = ATTENTION_CLASSES[name](rng, ATT_CTX)
    p = d.params
    for n, spec in d.layouts.items():
        seq = p["seq_q"] if n == "q" else p["seq_k"]
        want = (
            (p["batch"], p["heads"], seq, p["head_dim"])
            if p["tensor_layout"] == "HND"
            else (p["batch"], seq, p["heads"], p["head_dim"])
        )
        assert spec.shape == want, (n, spec.describe())
    assert ATTENTION_PROPERTIES[name](d), {n: s.describe() for n, s in d.layouts.items()}


def test_offset_1_needs_one_byte_elements() -> None:
    assert "offset_1" not in classes_for("linear", LINEAR_CTX)
    assert "offset_1" in classes_for("linear", FP8_CTX)
    assert "4d" not in classes_for("linear", FP8_CTX)  # raw _scaled_mm: 2-D only


def test_context_rejects_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match="size='huge'"):
        Context(size="huge")
    with pytest.raises(ValueError, match="ranks"):
        Context(ranks=(5,))
    with pytest.raises(ValueError, match="has no layout classes"):
        classes_for("conv", LINEAR_CTX)


# ------------------------------------------------------------------------------ case factories


def test_factory_cases_are_deterministic_and_distinct() -> None:
    f = get_target("fp8_linear").layout_classes()["packed_slice"]
    a, b, c = f.build(0), f.build(0), f.build(1)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert a.params["layout_class"] == "packed_slice" and a.op == "fp8_linear"
    with pytest.raises(ValueError, match="index=-1"):
        f.build(-1)


def test_factory_strategy_shrinks_to_the_smallest_example_of_its_class() -> None:
    f = get_target("fp8_linear").layout_classes()["offset_2"]
    minimal = find(f(), lambda case: True)
    x = minimal.layouts["x"]
    # smallest everything (batch 1, 1 token, K = N = 16), yet still exactly 2-byte aligned
    assert x.shape == (1, 1, 16) and minimal.params["out_features"] == 16
    assert x.alignment() == 2 and x.storage_offset() == 1
    att = find(get_target("attn.sdpa").layout_classes()["transposed_view"](), lambda case: True)
    assert att.layouts["q"].shape == (1, 2, 16, 64)  # heads >= 2 keeps the transpose visible


def test_case_round_trips_through_a_case_file(tmp_path) -> None:
    case = get_target("legacy.comfyui").layout_classes()["broadcast"].build(3)
    path = save_case(case, tmp_path / "c.json", tensors=case_values(case))  # as a failing case is saved
    loaded, tensors = load_case(path)
    assert loaded.to_dict() == case.to_dict() and set(tensors) == set(case.layouts)
    # the stored values are the ones a worker generates from the recipes: the replay is the same run
    r1, r2 = run_case(case, "cpu"), run_case(loaded, "cpu", values=tensors)
    assert r1.verdict == r2.verdict and r1.metrics == r2.metrics, (r1.format(), r2.format())


def test_fp8_broadcast_inputs_have_the_layout_and_constant_values() -> None:
    case = get_target("raw.scaled_mm").layout_classes()["broadcast"].build(0)
    inputs = materialize_inputs(case, "cpu")
    x, spec = inputs["x"], case.layouts["x"]
    assert x.dtype == torch.float8_e4m3fn and x.stride() == spec.strides() and 0 in x.stride()
    rows = x.float()
    assert torch.equal(rows, rows[:1].expand_as(rows)) or torch.equal(rows, rows[:, :1].expand_as(rows))


# ------------------------------------------------------------------------------ targets on the CPU

CONTROL = {"linear": ("contiguous",), "attention": ("hnd_contiguous", "nhd_contiguous")}


def _cpu_targets() -> list[str]:
    out = []
    for name, t in all_targets().items():
        if t.kind in CONTROL and t.available("cpu")[0]:
            out.append(name)
    return out


def test_the_cpu_runnable_targets_are_the_expected_ones() -> None:
    names = set(_cpu_targets())
    expected = {
        "fp8_linear",
        "raw.scaled_mm",
        "legacy.wanvideo_early2025",
        "legacy.wanvideo_late2025",
        "legacy.user_fixed",
        "legacy.comfyui",
        "attn.sdpa",
        "attn.sdpa.math",
        "attn.emu.naive",
    }
    assert expected <= names, expected - names
    assert not any(n.startswith(("attn.sdpa.flash", "attn.sage1", "attn.flash_attn")) for n in names)


@pytest.mark.parametrize("name", _cpu_targets())
def test_cpu_target_passes_on_plain_layouts(name: str) -> None:
    t = get_target(name)
    classes = t.layout_classes()
    for cls in CONTROL[t.kind]:
        for i in range(2):
            r = run_case(classes[cls].build(i), "cpu")
            assert r.verdict.value == "pass", r.format()
            assert r.metrics["ratio"] <= 1.0 and r.bound["why"]


@pytest.mark.parametrize("name", ["fp8_linear", "fp8_linear.static_scale", "safe_attn.sdpa", "safe_attn.emu.naive"])
def test_layout_safe_targets_pass_in_every_class(name: str) -> None:
    t = get_target(name)
    assert t.accepts_all_layouts
    for cls, f in t.layout_classes().items():
        if cls.startswith("seq_") and cls != "seq_113":
            continue  # the long sequences add time, not layouts
        r = run_case(f.build(0), "cpu")
        assert r.verdict.value == "pass", f"{cls}: {r.format()}"


KNOWN_BAD = [
    ("legacy.wanvideo_late2025", "values_beyond_448", "input_mutation"),
    ("legacy.user_fixed", "values_beyond_448", "input_mutation"),
    ("legacy.comfyui", "values_beyond_448", "input_mutation"),
    ("legacy.wanvideo_late2025", "broadcast", "rejected"),
    ("legacy.comfyui", "broadcast", "layout_noninvariance"),
]


@pytest.mark.parametrize("name,cls,verdict", KNOWN_BAD)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_known_bad_cells_get_their_verdict(name: str, cls: str, verdict: str, data) -> None:
    case = data.draw(get_target(name).layout_classes()[cls]())
    r = run_case(case, "cpu")
    assert r.verdict.value == verdict, r.format()


@pytest.mark.parametrize("name", ["legacy.comfyui.scaled_input", "legacy.user_fixed.scaled_input"])
def test_unclamped_cast_follows_this_torch_versions_fp8_overflow(name: str) -> None:
    """With a stored scale_input the ComfyUI-style forwards cast x / scale unclamped: NaN where this torch's
    E4M3 cast overflows to NaN (2.11), a pass where it saturates (2.13 CPU) -- probed, not assumed."""
    nan_cast = bool(torch.isnan(torch.tensor([480.0, 1e4]).to(torch.float8_e4m3fn).float()).any())
    case = get_target(name).layout_classes()["values_beyond_448"].build(0)
    r = run_case(case, "cpu")
    assert r.verdict.value == ("nonfinite" if nan_cast else "pass"), r.format()
    assert r.verdict.value == "pass" or "NaN/inf" in r.message


def test_late2025_mutation_message_names_the_input_and_count() -> None:
    r = run_case(get_target("legacy.wanvideo_late2025").layout_classes()["values_beyond_448"].build(0), "cpu")
    assert r.verdict.value == "input_mutation" and "x:" in r.message and "values changed" in r.message


def test_drift_is_caught_when_the_scale_is_wrong() -> None:
    """A linear that reads the weight scale wrong is out of bound (the bound is not vacuous)."""
    from harness.targets.linear import Fp8LinearTarget

    class WrongScale(Fp8LinearTarget):
        name = "test.wrong_scale"

        def call(self, x, inputs):
            return super().call(x, inputs) * 1.02  # a 2% scale error

    t = WrongScale()
    case = t.layout_classes()["contiguous"].build(0)
    inputs = t.make_inputs(case, "cpu")
    exact, emulated = t.reference(inputs, case.params)
    from harness.reference.metrics import judge

    out = t.run(inputs, case.params)
    j = judge(out, exact, emulated, t.bound(inputs, case.params, exact))
    assert not j.passed and j.check.ratio > 1, str(j)
    good = judge(Fp8LinearTarget().run(inputs, case.params), exact, emulated, t.bound(inputs, case.params, exact))
    assert good.passed, str(good)


def test_unavailable_reason_names_what_is_missing() -> None:
    ok, why = get_target("attn.sdpa.flash").available("cpu")
    assert not ok and "CUDA" in why
    ok, why = get_target("safe_attn.sage1.sageattn").available("cpu")
    assert not ok and "CUDA" in why


def test_plugin_target_runs_a_user_linear(monkeypatch) -> None:
    from harness.targets import register_plugin

    name = register_plugin("harness.quant.linear:fp8_linear")
    t = get_target(name)
    assert t.available("cpu") == (True, "")
    r = run_case(t.layout_classes()["transposed"].build(0), "cpu")
    assert r.verdict.value == "pass", r.format()
    with pytest.raises(ValueError, match="package.module:attr"):
        register_plugin("a:b:c")
    # a plug-in that does not resolve is the harness's failure to call it (unsupported), not "unavailable"
    for spec, named in (
        ("no_such_entry_point", "no_such_entry_point"),
        ("harness.nonexistent_module:fn", "nonexistent_module"),
    ):
        bad = get_target(register_plugin(spec))
        r = run_case(dataclasses.replace(t.layout_classes()["contiguous"].build(0), op=bad.name), "cpu")
        assert r.verdict.value == "unsupported" and named in r.message, r.format()


def test_attention_plugin_target_runs_a_user_function() -> None:
    from harness.targets import register_attention_plugin

    t = get_target(register_attention_plugin("torch.nn.functional:scaled_dot_product_attention"))
    for cls in ("nhd_contiguous", "mtv_scrambled_k"):  # an HND-only function gets NHD as transposed views
        r = run_case(t.layout_classes()[cls].build(0), "cpu")
        assert r.verdict.value == "pass", r.format()
    bad = get_target(register_attention_plugin("harness.nowhere:attn"))
    r = run_case(dataclasses.replace(t.layout_classes()["nhd_contiguous"].build(0), op=bad.name), "cpu")
    assert r.verdict.value == "unsupported" and "harness.nowhere" in r.message, r.format()


def test_factories_are_case_factories_for_every_matrix_target() -> None:
    for name, t in all_targets().items():
        if t.kind not in CONTROL:
            continue
        classes = t.layout_classes()
        assert classes, name
        assert all(isinstance(f, CaseFactory) for f in classes.values())
        case = next(iter(classes.values())).build(0)
        assert isinstance(case, Case) and case.op == name


# ---------------------------------------------------------------------------- one targets package

_IMPORTS = """
import json, sys
import harness.targets.protocol as protocol
runner = lambda: sorted(m for m in sys.modules if m.startswith("harness.runner"))
out = {"after_protocol": runner(), "registered_by_import": sorted(protocol.all_targets())}
from harness.targets import load_targets
out["loaded"] = sorted(load_targets())
out["after_load"] = runner()
out["with_doubles"] = sorted(load_targets(include_doubles=True))
print(json.dumps(out))
"""


def test_the_protocol_and_the_real_ops_load_without_the_runner_and_without_the_doubles() -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_PLUGINS", "HARNESS_ATTN_PLUGINS")}
    cp = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, env=env, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert out["after_protocol"] == [] and out["after_load"] == []  # no import edge back into the runner
    assert out["registered_by_import"] == []  # importing registers nothing: loading is explicit
    assert {"fp8_linear", "attn.sdpa", "safe_attn.sdpa", "raw.scaled_mm"} <= set(out["loaded"])
    doubles = {n for n in out["with_doubles"] if n.startswith(("cpu.", "fault."))}
    assert not [n for n in out["loaded"] if n.startswith(("cpu.", "fault."))]  # production registry: real ops only
    assert {"cpu.scale", "cpu.matmul", "fault.segfault", "fault.sticky"} <= doubles
    assert set(out["with_doubles"]) - doubles == set(out["loaded"])


def test_targets_a_test_registers_are_removed_and_replaced_ones_restored() -> None:
    from harness.runner.targets import BaseTarget, register_target

    from helpers import restored_registry

    class _Leaky(BaseTarget):
        name = "test.leaky"

    class _Scale(BaseTarget):
        name = "cpu.scale"

    original = get_target("cpu.scale")
    with restored_registry():  # what the autouse fixture of tests/conftest.py wraps every test in
        register_target(_Leaky, replace=True)
        register_target(_Scale, replace=True)
        assert type(get_target("cpu.scale")) is _Scale and get_target("test.leaky").name == "test.leaky"
    assert "test.leaky" not in all_targets()
    assert get_target("cpu.scale") is original
