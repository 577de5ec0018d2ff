"""Case files: lossless round trips, strict validation, no pickle anywhere."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.cases import (
    MAX_CASE_ELEMENTS_ENV,
    SCHEMA_VERSION,
    STALE_TEMP_SECONDS,
    Case,
    CaseError,
    CaseTooNew,
    case_paths,
    load_case,
    printable,
    save_case,
)
from harness.layouts import DTYPES, LayoutSpec, materialize, poison_intact
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


GOOD = {
    "schema_version": SCHEMA_VERSION,
    "op": "fp8_linear",
    "layouts": {"input": {"shape": [2, 16]}},
    "values": {"input": {"kind": "normal", "seed": 1}},
}

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
    case = Case(
        op="attn.sdpa.flash",
        layouts={"q": spec},
        values={"q": ValueSpec("outliers", 3)},
        verdict={
            "verdict": "device_fault",
            "message": "CUDA error: misaligned address",
            "attribution": {"op": "aten::_scaled_dot_product_flash_attention"},
        },
    )
    path = save_case(case, tmp_path / "c")
    out = subprocess.run([sys.executable, "-m", "harness", "show", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device_fault" in out.stdout and "misaligned address" in out.stdout
    assert spec.describe() in out.stdout and "_scaled_dot_product_flash_attention" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "harness", "show", str(tmp_path / "missing.json")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and not bad.stdout


# ------------------------------------------------------------------------------ writing a case as one unit

_IN = {"layouts": {"input": LayoutSpec((2, 16), "float32")}, "values": {"input": ValueSpec("normal", 1)}}
CASE_A = Case(op="fp8_linear", verdict={"verdict": "drift"}, **_IN)
CASE_B = Case(op="fp8_linear", verdict={"verdict": "nonfinite"}, **_IN)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_save_killed_between_its_renames_is_refused_not_paired(tmp_path, monkeypatch) -> None:
    save_case(CASE_A, tmp_path / "c", {"input": torch.zeros(2, 16)})
    real = os.replace
    calls = []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped after the tensors are in place
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_case(CASE_B, tmp_path / "c", {"input": torch.ones(2, 16)})
    monkeypatch.setattr(os, "replace", real)
    assert _leftovers(tmp_path) == []  # the JSON temp was removed in finally
    with pytest.raises(CaseError, match="was not written with this c.json"):
        load_case(tmp_path / "c.json")
    # the note is free text: editing it by hand keeps the pair
    save_case(CASE_A, tmp_path / "c", {"input": torch.zeros(2, 16)})
    d = json.loads((tmp_path / "c.json").read_text())
    d["note"] = "looked at it on Tuesday"
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert load_case(tmp_path / "c.json")[0].note == "looked at it on Tuesday"


def test_concurrent_saves_of_one_name_lose_nothing(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(CASE_A if i % 2 else CASE_B, torch.full((2, 16), float(i % 2))) for i in range(40)]
    with ThreadPoolExecutor(8) as ex:
        paths = list(ex.map(lambda job: save_case(job[0], tmp_path / "same", {"input": job[1]}), jobs))
    assert all(p == tmp_path / "same.json" for p in paths)
    case, tensors = load_case(tmp_path / "same.json")  # the last writer's pair, whole
    assert float(tensors["input"][0, 0]) == (1.0 if case.verdict["verdict"] == "drift" else 0.0)
    assert _leftovers(tmp_path) == []


def test_save_removes_its_own_stale_temps_only(tmp_path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    stale = tmp_path / f".c.json.{dead}-0123abcd.tmp"
    fresh = tmp_path / f".c.safetensors.{dead}-0123abce.tmp"
    alive = tmp_path / f".c.json.{os.getpid()}-0123abcf.tmp"
    legacy = tmp_path / "c.json.tmp"
    other = tmp_path / f".d.json.{dead}-0123abd0.tmp"
    for p in (stale, fresh, alive, legacy, other):
        p.write_bytes(b"x" * 100)
    old = time.time() - 2 * STALE_TEMP_SECONDS
    for p in (stale, alive, legacy, other):
        os.utime(p, (old, old))
    save_case(CASE_A, tmp_path / "c")
    left = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in left and legacy.name not in left  # ours, process gone, old
    assert {fresh.name, alive.name, other.name} <= left  # too recent / still running / another case's
    assert load_case(tmp_path / "c.json")[0].verdict == CASE_A.verdict  # loaders ignore temps


def test_stored_tensor_dtype_must_match_its_layout(tmp_path) -> None:
    from safetensors.torch import save_file

    case = Case(op="fp8_linear", layouts={"input": LayoutSpec((2, 16), "bfloat16")})
    save_case(case, tmp_path / "c", {"input": torch.zeros(2, 16)})  # float32 values are stored as the layout's dtype
    assert load_case(tmp_path / "c")[1]["input"].dtype == torch.bfloat16
    save_file({"input": torch.zeros(2, 16)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CaseError, match="tensor 'input' is float32, its layout says bfloat16"):
        load_case(tmp_path / "c")


# ------------------------------------------------------------------------------ strict, bounded loading


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_allowed_dtype_materializes_and_round_trips(tmp_path, name) -> None:
    spec = LayoutSpec((3, 4), name, offset=1, pad=(0, 1))
    values = ValueSpec("normal", seed=1).generate(spec.shape, spec.torch_dtype)
    assert poison_intact(materialize(spec, values), spec)
    save_case(Case(op="cpu.scale", layouts={"x": spec}), tmp_path / "c", {"x": values})
    assert torch.equal(load_case(tmp_path / "c")[1]["x"].view(torch.uint8), values.view(torch.uint8))


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        ("qint8", "'qint8' is not a supported dtype"),
        ("float4_e2m1fn_x2", "'float4_e2m1fn_x2' is not a supported"),
        ("_dynamo", "'_dynamo' is not a supported"),
        (["bfloat16"], "must be a dtype name string"),
    ],
)
def test_dtype_names_come_from_the_allow_list(tmp_path, dtype, match) -> None:
    with pytest.raises(CaseError, match=match):
        load_case(_write(tmp_path, {**GOOD, "layouts": {"input": {"shape": [2, 16], "dtype": dtype}}}))


def test_a_hostile_dtype_name_imports_nothing() -> None:
    code = (
        "import sys; from harness.layouts import LayoutSpec, LayoutError\n"
        "try:\n    LayoutSpec((2,), '_dynamo')\nexcept LayoutError:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0 and cp.stdout.strip() == "[]", cp.stderr


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({**GOOD, "schema_version": True}, "schema_version must be an integer, got True"),
        ({**GOOD, "schema_version": 1.0}, "schema_version must be an integer, got 1.0"),
        (
            {**GOOD, "layouts": {"input": {"shape": [2, 16], "views": [{"op": "select", "args": [0, 1.5]}]}}},
            "each view must be",
        ),
        ({**GOOD, "values": {"input": {"kind": "outliers", "params": {"n_channels": "many"}}}}, "integer >= 0"),
        ({**GOOD, "op": "fp8\x1b[2J_linear"}, "printable string"),
        ({**GOOD, "layouts": {"input": {"shape": [2] * 17}}}, "at most 16 are supported"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
        ('{"seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_loose_fields_are_refused(tmp_path, payload, match) -> None:
    with pytest.raises(CaseError, match=match):
        load_case(_write(tmp_path, payload))


def test_a_newer_schema_is_its_own_error(tmp_path) -> None:
    with pytest.raises(CaseTooNew, match="written by a newer harness"):
        load_case(_write(tmp_path, {**GOOD, "schema_version": SCHEMA_VERSION + 1}))


def test_the_element_budget_is_checked_before_anything_is_read(tmp_path, monkeypatch) -> None:
    big = {**GOOD, "layouts": {"input": {"shape": [2, 16], "offset": 500_000_000}}}
    with pytest.raises(CaseError, match=r"need 500,000,064 elements .* over the budget of 268,435,456"):
        load_case(_write(tmp_path, big))
    monkeypatch.setenv(MAX_CASE_ELEMENTS_ENV, str(10**9))  # a user with a real big case
    assert load_case(tmp_path / "bad.json")[0].layouts["input"].offset == 500_000_000
    with pytest.raises(CaseError, match="over the budget of 64"):
        load_case(tmp_path / "bad.json", max_elements=64)
    monkeypatch.setenv(MAX_CASE_ELEMENTS_ENV, "lots")
    with pytest.raises(CaseError, match="HARNESS_CASE_MAX_ELEMENTS='lots' is not an integer"):
        load_case(tmp_path / "bad.json")


def test_only_regular_files_are_read(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "dir.json").mkdir()
    for name, what in (("fifo.json", r"a FIFO \(named pipe\)"), ("zero.json", "a device"), ("dir.json", "a directory")):
        with pytest.raises(CaseError, match=f"is {what}, not a case file"):
            load_case(tmp_path / name)
    _write(tmp_path, GOOD)
    (tmp_path / "bad.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CaseError, match="is a device, not a safetensors file"):
        load_case(tmp_path / "bad.json")


def test_a_directory_gets_a_file_suggested(tmp_path) -> None:
    save_case(CASE_A, tmp_path / "cases" / "one.json")
    with pytest.raises(
        CaseError, match=r"cases is a directory, not a case file; name a case file in it, e\.g\. .*one\.json"
    ):
        load_case(tmp_path / "cases")


def test_show_escapes_untrusted_text(tmp_path) -> None:
    case = Case(
        op="cpu.scale",
        layouts={"x": LayoutSpec((2,), "float32")},
        values={"x": ValueSpec()},
        backend="\ud800",
        env={"device": "\x1b]0;pwned\x07"},
        note="\x1b[2J\x1b[31mred\nsecond line \ud83d",
    )
    path = save_case(case, tmp_path / "c")
    out = subprocess.run([sys.executable, "-m", "harness", "show", str(path)], capture_output=True, timeout=120)
    assert out.returncode == 0 and out.stderr == b"", out.stderr
    assert b"\x1b" not in out.stdout and b"\x07" not in out.stdout
    assert rb"note: \x1b[2J\x1b[31mred\nsecond line \ud83d" in out.stdout and rb"backend: \ud800" in out.stdout
    assert printable("a\x1b[0m\u202eb") == r"a\x1b[0m\u202eb"


def test_a_sigkilled_save_leaves_no_silent_pair_and_its_orphan_is_cleaned(tmp_path) -> None:
    save_case(CASE_A, tmp_path / "c", {"input": torch.zeros(2, 16)})
    # a real SIGKILL (no finally runs) right after the tensor file is renamed into place
    code = (
        "import os, signal, torch\n"
        "from harness.cases import Case, save_case\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        f"case = Case.from_dict({CASE_B.to_dict()!r})\n"
        f"save_case(case, {str(tmp_path / 'c')!r}, {{'input': torch.ones(2, 16)}})\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert cp.returncode == -9, cp.stderr
    orphans = _leftovers(tmp_path)
    assert len(orphans) == 1 and orphans[0].startswith(".c.json."), orphans  # the JSON temp it never renamed
    with pytest.raises(CaseError, match="was not written with this c.json"):
        load_case(tmp_path / "c.json")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(tmp_path / orphans[0], (old, old))
    save_case(CASE_B, tmp_path / "c", {"input": torch.ones(2, 16)})  # the rerun
    assert _leftovers(tmp_path) == []
    assert load_case(tmp_path / "c.json")[0].verdict == CASE_B.verdict
