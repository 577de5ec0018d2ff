"""Case files: lossless round trips, strict validation, no pickle anywhere."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.cases import SCHEMA_VERSION, Case, CaseError, case_paths, load_case, save_case
from harness.layouts import LayoutSpec, materialize
from harness.strategies import attention_inputs, layouts, value_specs
from harness.values import ValueSpec


@st.composite
def cases(draw) -> tuple[Case, dict[str, torch.Tensor]]:
    a = draw(attention_inputs(max_numel=4096))
    weight = draw(layouts((32, 16), "float8_e4m3fn", views=True))
    case = Case(
        op=draw(st.sampled_from(["attn.sdpa.flash", "fp8_linear", "legacy.comfyui"])),
        backend=draw(st.text(max_size=8)),
        layouts={"q": a.q, "k": a.k, "v": a.v, "weight": weight},
        values={"q": a.values, "k": a.values, "v": a.values, "weight": draw(value_specs())},
        params={"tensor_layout": a.tensor_layout, "is_causal": draw(st.booleans()), "scale": draw(st.floats(0.01, 1))},
        tolerances={"k": 2.0, "floor": 2.0**-8, "why": "2x emulated error + half a bf16 ULP"},
        seed=draw(st.integers(0, 2**31)),
        env={"torch": torch.__version__, "device": "cpu"},
        verdict={"verdict": draw(st.sampled_from(["pass", "drift", "device_fault"])), "metrics": {"max_abs": 0.5}},
        note=draw(st.text(max_size=20)),
    )
    store = draw(st.booleans())
    tensors = {n: vs.generate(case.layouts[n].shape, case.layouts[n].torch_dtype) for n, vs in case.values.items()}
    return case, (tensors if store else {})


@given(cases())
def test_case_round_trip_is_lossless(tmp_path_factory, case_and_tensors) -> None:
    case, tensors = case_and_tensors
    path = tmp_path_factory.mktemp("case") / "c"
    json_path = save_case(case, path, tensors)
    again, loaded = load_case(json_path)
    assert again.to_dict() == case.to_dict()
    assert again.layouts == case.layouts and again.values == case.values
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8))


def test_saved_tensors_are_logical_values_and_layouts_rematerialize(tmp_path) -> None:
    spec = LayoutSpec((4, 16), "bfloat16", offset=1, pad=(0, 5))
    x = materialize(spec, torch.randn(4, 16))
    case = Case(op="fp8_linear", layouts={"input": spec})
    save_case(case, tmp_path / "c.json", {"input": x})  # a strided, misaligned view is stored as its values
    again, tensors = load_case(tmp_path / "c")
    y = materialize(again.layouts["input"], tensors["input"])
    assert y.stride() == x.stride() and y.storage_offset() == x.storage_offset() and torch.equal(y, x)


def _write(tmp_path, payload) -> str:
    p = tmp_path / "bad.json"
    p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(p)


GOOD = {"schema_version": SCHEMA_VERSION, "op": "fp8_linear", "layouts": {"input": {"shape": [2, 16]}},
        "values": {"input": {"kind": "normal", "seed": 1}}}

MALFORMED = [
    ("not json {", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({**GOOD, "schema_version": 99}, "schema_version 99"),
    ({k: v for k, v in GOOD.items() if k != "schema_version"}, "missing 'schema_version'"),
    ({k: v for k, v in GOOD.items() if k != "op"}, "missing 'op'"),
    ({**GOOD, "surprise": 1}, "unknown fields"),
    ({**GOOD, "layouts": {"input": {"shape": [2, 16], "perm": [0, 0]}}}, r"layouts\['input'\]"),
    ({**GOOD, "values": {"input": {"kind": "gaussian"}}}, r"values\['input'\]"),
    ({**GOOD, "values": {"other": {"kind": "normal"}}}, "no matching layout"),
    ({**GOOD, "values": {}}, "neither stored values"),
    ({**GOOD, "seed": "7"}, "'seed' must be an integer"),
    ({**GOOD, "params": []}, "'params' must be a JSON dict"),
]


@pytest.mark.parametrize("payload,match", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_case_files_are_rejected_with_the_reason(tmp_path, payload, match) -> None:
    with pytest.raises(CaseError, match=match):
        load_case(_write(tmp_path, payload))


def test_missing_case_file(tmp_path) -> None:
    with pytest.raises(CaseError, match="does not exist"):
        load_case(tmp_path / "nope.json")


def test_a_pickle_posing_as_safetensors_is_rejected_not_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _write(tmp_path, GOOD)
    _, st_path = case_paths(tmp_path / "bad.json")
    st_path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CaseError, match="not a valid safetensors"):
        load_case(tmp_path / "bad.json")
    assert not marker.exists()


def test_tensor_shape_must_match_layout(tmp_path) -> None:
    case = Case(op="fp8_linear", layouts={"input": LayoutSpec((2, 16))})
    with pytest.raises(CaseError, match="shape"):
        save_case(case, tmp_path / "c", {"input": torch.zeros(3, 16)})
    from safetensors.torch import save_file

    save_case(case, tmp_path / "c", {"input": torch.zeros(2, 16)})
    save_file({"input": torch.zeros(5, 5)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CaseError, match=r"shape \(5, 5\)"):
        load_case(tmp_path / "c.json")


def test_show_prints_layouts_and_verdict(tmp_path) -> None:
    spec = LayoutSpec((2, 5, 8), "bfloat16", offset=3)
    case = Case(op="attn.sdpa.flash", layouts={"q": spec}, values={"q": ValueSpec("outliers", 3)},
                verdict={"verdict": "device_fault", "message": "CUDA error: misaligned address",
                         "attribution": {"op": "aten::_scaled_dot_product_flash_attention"}})
    path = save_case(case, tmp_path / "c")
    out = subprocess.run([sys.executable, "-m", "harness", "show", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device_fault" in out.stdout and "misaligned address" in out.stdout
    assert spec.describe() in out.stdout and "_scaled_dot_product_flash_attention" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "harness", "show", str(tmp_path / "missing.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stdout
