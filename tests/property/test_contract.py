"""Layout contracts: inference from synthetic records whose true boundary is known, record facts from
LayoutSpecs, the contracts file and report section a matrix run writes, ``harness contract`` and its --diff."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cases import Case
from harness.contract import (
    ContractError,
    diff_contracts,
    infer_contract,
    infer_contracts,
    load_contracts,
    operand_facts,
    record_of,
    write_contracts,
    written_inputs,
)
from harness.layouts import LayoutSpec, ViewOp
from harness.values import ValueSpec
from harness.verdicts import INPUT_MUTATION_PREFIX, Result, Verdict

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 2, 64, 64)


def _facts(
    align: int = 256, last_stride: int = 1, dtype: str = "bfloat16", values: str = "normal", d: int = 64
) -> dict:
    step = (1, 1, 1, last_stride)
    spec = LayoutSpec((1, 2, 64, d), dtype, step=step, offset=align // 2 if align < 256 else 0)
    f = operand_facts(spec, ValueSpec(values))
    assert f["alignment"] == align  # the offset above gives exactly this alignment (bf16: 2 B per element)
    return f


def _rec(
    verdict: str,
    op: str = "op",
    cls: str = "c",
    written: tuple[str, ...] = (),
    params: dict | None = None,
    **per_operand: dict,
) -> dict:
    ops = {n: per_operand.get(n, _facts()) for n in "qkv"}
    return {
        "op": op,
        "verdict": verdict,
        "class": cls,
        "operands": ops,
        "params": params or {},
        "written": list(written),
    }


def _clause(contract: dict, key: str) -> dict:
    hits = [c for c in contract["preconditions"] if c["key"] == key]
    assert hits, f"no clause {key}: {[c['key'] for c in contract['preconditions']]}"
    return hits[0]


# ------------------------------------------------------------------------------ facts from specs


@pytest.mark.parametrize(
    "spec,fact,value",
    [
        (LayoutSpec(SHAPE, offset=1), "alignment", 2),
        (LayoutSpec(SHAPE, offset=8), "alignment", 16),
        (LayoutSpec(SHAPE, step=(1, 1, 1, 2)), "last_stride_one", False),
        (LayoutSpec(SHAPE), "last_stride_one", True),
        (LayoutSpec((2, 3, 8), broadcast=(0,)), "no_stride0", False),
        (LayoutSpec((4, 8), pad=(0, 1)), "ld_dense", False),
        (LayoutSpec((4, 8), pad=(0, 1)), "stride_alignment", 2),  # row stride 9 elements = 18 bytes
        (LayoutSpec((4, 8)), "stride_alignment", 16),
        (LayoutSpec((2, 1, 16), base_shape=(2, 16, 1), views=(ViewOp.transpose(1, 2),)), "size1_canonical", False),
        (LayoutSpec((2, 1, 16), base_shape=(2, 3, 16), views=(ViewOp.narrow(1, 1, 1),)), "size1_canonical", True),
        (LayoutSpec((2, 8, 4), base_shape=(2, 4, 8), views=(ViewOp.transpose(1, 2),)), "contiguous", False),
        (LayoutSpec((2, 8, 4), "float16"), "dtype", "float16"),
        (LayoutSpec((2, 8, 96)), "last_dim_multiple", 32),
    ],
)
def test_operand_facts_come_from_the_spec(spec: LayoutSpec, fact: str, value) -> None:
    assert operand_facts(spec)[fact] == value


def test_record_of_a_case_and_its_result() -> None:
    spec = LayoutSpec(SHAPE, offset=1)
    case = Case(
        op="attn.x",
        layouts={"q": spec, "k": LayoutSpec(SHAPE), "v": LayoutSpec(SHAPE)},
        values={"q": ValueSpec("outliers", 3)},
        params={"layout_class": "misaligned_ptr_2", "seq_k": 64, "is_causal": False},
    )
    msg = INPUT_MUTATION_PREFIX + "k: 12 of its 8192 values changed (first at index [0, 0, 0, 0]); v: 3 byte(s) x"
    r = record_of(case, Result(Verdict.INPUT_MUTATION, msg, op="attn.x"))
    assert r["verdict"] == "input_mutation" and r["class"] == "misaligned_ptr_2"
    assert r["operands"]["q"]["alignment"] == 2 and r["operands"]["k"]["alignment"] == 256
    assert r["operands"]["q"]["values"] == "outliers" and r["operands"]["k"]["values"] == "normal"
    assert r["params"] == {"seq_k": 64}  # booleans and strings are not sizes
    assert r["written"] == ["k", "v"]
    assert json.loads(json.dumps(r)) == r
    assert written_inputs("drift", msg) == []


def test_the_written_inputs_come_from_the_results_record_when_it_has_one() -> None:
    case = Case(op="attn.x", layouts={n: LayoutSpec(SHAPE) for n in "qkv"})
    msg = INPUT_MUTATION_PREFIX + "k: 12 of its 8192 values changed (first at index [0, 0, 0, 0])"
    r = Result(Verdict.INPUT_MUTATION, msg, op="attn.x", mutated_inputs=["v", "q"], poison_written=["q"])
    assert record_of(case, r)["written"] == ["q", "v"]  # the record, not the (here inconsistent) message
    assert written_inputs("input_mutation", msg, ["v"]) == ["v"] and written_inputs("input_mutation", msg) == ["k"]


# ------------------------------------------------------------------------------ inference, known boundaries


def _sdpa_like() -> list[dict]:
    """40 misaligned cases (q, k, v together) fault, 5 strided ones are rejected, 212 pass."""
    recs = []
    for i in range(40):
        a = (2, 4, 8)[i % 3]
        recs.append(_rec("device_fault", cls=f"misaligned_ptr_{a}", q=_facts(a), k=_facts(a), v=_facts(a)))
    for _ in range(5):
        s = _facts(last_stride=2)
        recs.append(_rec("rejected", cls="last_stride_ne_1", q=s, k=s, v=s))
    for i in range(212):
        a = (16, 32, 256)[i % 3]
        recs.append(_rec("pass", cls="fine", q=_facts(a), k=_facts(a), v=_facts(a)))
    return recs


def test_two_causes_give_two_clause_groups_with_counts_on_both_sides() -> None:
    c = infer_contract(_sdpa_like(), env={"device": "NVIDIA H200", "torch": "2.11.0"})
    v = _clause(c, "v:alignment:min")
    assert v["bound"] == 16 and v["nearest_failing"] == 8
    assert v["violated"] == {"cases": 40, "failed": 40, "by_verdict": {"device_fault": 40}}
    assert v["satisfied"]["cases"] == 217 and v["satisfied"]["failed"] == 5
    assert v["satisfied"]["explained_by_other_clauses"] == 5
    assert set(v["confounded_with"]) == {"q:alignment:min", "k:alignment:min"}  # misaligned together
    assert v["measured_on"] == {"device": "NVIDIA H200", "torch": "2.11.0"}
    ls = _clause(c, "q:last_stride_one:min")
    assert ls["bound"] is True and ls["violated"]["by_verdict"] == {"rejected": 5}
    assert c["unexplained"]["failures"] == 0
    assert (c["counted"], c["worked"], c["failed"]) == (257, 212, 45)


def test_no_separating_boundary_is_said_with_counts() -> None:
    recs = [_rec("pass"), _rec("drift", cls="seq_77"), _rec("pass"), _rec("drift", cls="seq_77")]
    c = infer_contract(recs)
    assert c["preconditions"] == []
    assert c["unexplained"] == {"failures": 2, "by_verdict": {"drift": 2}, "classes": ["seq_77"]}


def test_everything_failing_has_no_boundary() -> None:
    c = infer_contract([_rec("rejected"), _rec("rejected", q=_facts(2))])
    assert c["preconditions"] == [] and c["unexplained"]["failures"] == 2


def test_excluded_verdicts_are_counted_apart_and_input_writes_count_as_worked() -> None:
    recs = [
        _rec("unavailable"),
        _rec("error"),
        _rec("input_mutation", written=("k",)),
        _rec("rejected", q=_facts(last_stride=2)),
    ]
    c = infer_contract(recs)
    assert c["records"] == 4 and c["counted"] == 2 and c["excluded"] == {"error": 1, "unavailable": 1}
    assert _clause(c, "q:last_stride_one:min")["violated"]["cases"] == 1
    (w,) = c["writes"]
    assert w["operand"] == "k" and w["always"] and (w["written"], w["checked"]) == (1, 1)


def test_a_write_that_depends_on_the_values_names_them() -> None:
    recs = [_rec("input_mutation", written=("q",), q=_facts(values="fp8_edge")) for _ in range(3)]
    recs += [_rec("pass") for _ in range(9)]
    (w,) = infer_contract(recs)["writes"]
    assert not w["always"] and (w["written"], w["checked"]) == (3, 12)
    (when,) = w["when"]
    assert when["key"] == "q:values:one_of" and when["values"] == ["fp8_edge"]
    assert when["violated"]["cases"] == 3 and when["satisfied"] == {
        "cases": 9,
        "failed": 0,
        "by_verdict": {},
        "explained_by_other_clauses": 0,
    }


def test_a_size_parameter_boundary_is_found() -> None:
    """Sage 1's short key tile: every s_k that is not a multiple of 64 drifts."""
    recs = [_rec("drift" if s % 64 else "pass", params={"seq_k": s}) for s in (16, 64, 77, 100, 113, 128, 257, 512)]
    c = infer_contract(recs)
    m = _clause(c, "*:seq_k_multiple:min")
    assert m["bound"] == 64 and m["violated"]["failed"] == m["violated"]["cases"] == 5
    assert c["unexplained"]["failures"] == 0


# ------------------------------------------------------------------------------ properties

_ALIGNS = (2, 4, 8, 16, 32, 64, 128, 256)


@st.composite
def planted(draw):
    """Records of one op that fails exactly when operand ``who``'s alignment is below ``t``."""
    t = draw(st.sampled_from(_ALIGNS[1:]))
    who = draw(st.sampled_from("qkv"))
    n = draw(st.integers(4, 40))
    recs = []
    for _ in range(n):
        al = {o: draw(st.sampled_from(_ALIGNS)) for o in "qkv"}
        extra = draw(st.sampled_from(["pass", "unavailable", "error"]))
        verdict = draw(st.sampled_from(["device_fault", "rejected", "nonfinite"])) if al[who] < t else extra
        recs.append(_rec(verdict, **{o: _facts(a) for o, a in al.items()}))
    return t, who, recs


@settings(max_examples=60, deadline=None)
@given(planted())
def test_a_planted_alignment_boundary_is_recovered(p) -> None:
    t, who, recs = p
    c = infer_contract(recs)
    counted = [r for r in recs if r["verdict"] not in ("unavailable", "error")]
    assert c["counted"] + sum(c["excluded"].values()) == len(recs)
    assert c["worked"] + c["failed"] == c["counted"] == len(counted)
    ok = [r["operands"][who]["alignment"] for r in counted if r["verdict"] == "pass"]
    bad = [r["operands"][who]["alignment"] for r in counted if r["verdict"] != "pass"]
    for cl in c["preconditions"]:  # counts on both sides add up to the cases that have the feature
        assert cl["satisfied"]["cases"] + cl["violated"]["cases"] == c["counted"]
        assert cl["violated"]["failed"] == cl["violated"]["cases"]
        assert sum(cl["violated"]["by_verdict"].values()) == cl["violated"]["cases"]
    if not ok:  # nothing worked: no boundary to draw, every failure is unexplained
        assert c["preconditions"] == [] and c["unexplained"]["failures"] == len(bad)
        return
    assert c["unexplained"]["failures"] == 0
    if not bad:
        assert c["preconditions"] == []
        return
    cl = _clause(c, f"{who}:alignment:min")
    assert max(bad) < t <= cl["bound"] == min(ok) and cl["nearest_failing"] == max(bad)
    assert cl["satisfied"]["failed"] == 0 and cl["violated"]["failed"] == len(bad)


@settings(max_examples=40, deadline=None)
@given(
    st.sets(st.sampled_from(["bfloat16", "float16", "float32"]), min_size=1, max_size=2),
    st.lists(st.sampled_from(["bfloat16", "float16", "float32"]), min_size=2, max_size=30),
)
def test_a_planted_dtype_set_is_recovered(accepted, dtypes) -> None:
    recs = [_rec("pass" if d in accepted else "rejected", q=_facts(dtype=d)) for d in dtypes]
    c = infer_contract(recs)
    refused = [d for d in dtypes if d not in accepted]
    if not refused or len(refused) == len(dtypes):
        assert not any(cl["key"] == "q:dtype:one_of" for cl in c["preconditions"])
        return
    cl = _clause(c, "q:dtype:one_of")
    assert set(cl["bound"]) == {d for d in dtypes if d in accepted}
    assert set(cl["nearest_failing"]) == set(refused) and cl["violated"]["cases"] == len(refused)


# ------------------------------------------------------------------------------ files, diff, CLI


def _doc(recs: list[dict], env: dict | None = None) -> dict:
    return infer_contracts(recs, env or {"device": "cpu"}, "test")


def _shift(recs: list[dict], need: int) -> list[dict]:
    """The same cases, judged by a kernel that needs ``need``-byte alignment of every operand."""
    return [
        dict(
            r,
            verdict="pass"
            if all(o["alignment"] >= need for o in r["operands"].values()) and r["operands"]["q"]["last_stride_one"]
            else "device_fault",
        )
        for r in recs
    ]


def test_diff_names_a_narrowed_and_a_widened_clause(tmp_path) -> None:
    recs = _sdpa_like()
    old, new = _doc(recs), _doc(_shift(recs, 32))
    changes = diff_contracts(old, new)
    narrowed = {c["key"] for c in changes if c["change"] == "narrowed"}
    assert {"q:alignment:min", "k:alignment:min", "v:alignment:min"} <= narrowed
    (line,) = [c for c in changes if c["key"] == "v:alignment:min"]
    assert "40 failed in 40" in line["old"] and "needs" not in line["old"] and ">= 32" in line["new"]
    back = diff_contracts(new, old)
    assert {c["key"] for c in back if c["change"] == "widened"} >= {"v:alignment:min"}
    assert not [c for c in back if c["change"] == "narrowed"]
    assert diff_contracts(old, old) == []


def test_diff_names_a_new_input_write_as_narrowed() -> None:
    old = _doc([_rec("pass")] * 3)
    new = _doc([_rec("input_mutation", written=("k",))] * 3)
    (ch,) = diff_contracts(old, new)
    assert ch["change"] == "narrowed" and ch["key"] == "k:writes"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", "contract", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )


def test_cli_prints_and_diffs_and_refuses_bad_input(tmp_path) -> None:
    recs = _sdpa_like()
    a, b = tmp_path / "a", tmp_path / "b"
    write_contracts(a, _doc(recs))
    write_contracts(b, _doc(_shift(recs, 32)))
    shown = _cli(str(a))
    assert shown.returncode == 0, shown.stderr
    assert "v pointer alignment >= 16 B: violated -> 40 failed in 40 cases (device_fault 40)" in shown.stdout
    d = _cli("--diff", str(a), str(b / "contracts.json"))
    assert d.returncode == 1, d.stdout + d.stderr
    assert "NARROWED" in d.stdout and "v:alignment:min" in d.stdout
    assert _cli("--diff", str(b), str(a)).returncode == 0
    for bad in ([str(tmp_path / "missing")], ["--diff", str(a)], [str(tmp_path)]):
        r = _cli(*bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("harness contract: ")
    (tmp_path / "x.json").write_text('{"kind": "harness.contracts", "schema_version": 9, "contracts": {}}')
    r = _cli(str(tmp_path / "x.json"))
    assert r.returncode == 2 and "schema_version 9" in r.stderr and "Traceback" not in r.stderr


def test_load_refuses_what_is_not_a_contracts_file(tmp_path) -> None:
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ContractError, match="not a contracts document"):
        load_contracts(tmp_path / "s.json")
    (tmp_path / "t.json").write_text("{nope")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_contracts(tmp_path / "t.json")


def test_the_file_keeps_the_records_it_was_inferred_from(tmp_path) -> None:
    recs = _sdpa_like()
    path = write_contracts(tmp_path, _doc(recs))
    doc = load_contracts(tmp_path)
    assert doc["records"] == recs
    assert len(path.read_text().splitlines()) < len(recs) + 2000  # one line per record, not one per field
    assert infer_contracts(doc["records"], doc["measured_on"], "again")["contracts"] == doc["contracts"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r.pop("verdict"), r"records\[3\] needs string fields op, verdict, class"),
        (lambda r: r["operands"]["q"].update(alignment=[16]), r"records\[3\] field 'operands'"),
        (lambda r: r.update(params={"seq_k": True}), r"records\[3\] field 'params'"),
        (lambda r: r.update(written="k"), r"records\[3\] field 'written'"),
    ],
)
def test_a_malformed_record_is_refused_on_load(tmp_path, change, match) -> None:
    doc = json.loads(json.dumps(_doc(_sdpa_like())))
    change(doc["records"][3])
    (tmp_path / "contracts.json").write_text(json.dumps(doc))
    with pytest.raises(ContractError, match=match):
        load_contracts(tmp_path)
    (tmp_path / "contracts.json").write_text(json.dumps(dict(doc, records={"not": "a list"})))
    with pytest.raises(ContractError, match="'records' must be a list"):
        load_contracts(tmp_path)


def test_records_past_the_size_limit_are_left_out_and_said(tmp_path, monkeypatch) -> None:
    from harness import contract

    doc = _doc(_sdpa_like())
    without = len(json.dumps({k: v for k, v in doc.items() if k != "records"}, indent=1, sort_keys=True))
    monkeypatch.setattr(contract, "MAX_FILE_BYTES", without + 1000)  # room for the contracts, not the records
    write_contracts(tmp_path, doc)
    got = load_contracts(tmp_path)
    assert "records" not in got and got["records_omitted"].startswith(f"{len(doc['records'])} case records left out")
    assert got["contracts"] == json.loads(json.dumps(doc["contracts"]))
    assert "records" in doc  # the caller's document is not modified


def test_a_matrix_run_writes_contracts_and_the_report_section(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import InProcessPool

    from harness.matrix import run_matrix

    out = tmp_path / "m"
    (tmp_path / "empty").mkdir()
    s = run_matrix(
        device="cpu",
        time_budget=60,
        ops=["legacy.comfyui"],
        classes=["contiguous", "values_beyond_448"],
        out=out,
        cases_per_cell=3,
        corpus=tmp_path / "empty",
        progress=None,
        pool_factory=lambda *a, **k: InProcessPool(["cpu"]),
        explore=False,  # the grid's cases only: the counts below are the grid's
    )
    doc = load_contracts(out)
    c = doc["contracts"]["legacy.comfyui"]
    assert c["counted"] == 6 and doc["measured_on"]["torch"]
    (w,) = c["writes"]  # the legacy forward clamps the caller's x in place, only for values beyond 448
    assert w["operand"] == "x" and (w["written"], w["checked"]) == (3, 6)
    assert w["when"][0]["key"] == "x:values:one_of" and w["when"][0]["values"] == ["fp8_edge(beyond=True)"]
    assert s["contracts"]["legacy.comfyui"] == c
    assert len(doc["records"]) == 6 and infer_contracts(doc["records"], doc["measured_on"])["contracts"] == {
        "legacy.comfyui": c
    }
    md = (out / "report.md").read_text()
    assert "## Layout contracts" in md and "writes x: in 3 of 6 checked cases" in md
    assert "Layout contracts" in (out / "report.html").read_text()


def _feature_table_by_definition(records: list[dict]) -> dict:
    """The feature table as its docstring defines it, one comprehension per (operand, feature) and param."""
    from harness.contract import FEATURES, _pow2_divisor

    table = {}
    for name in sorted({n for r in records for n in r.get("operands", {})}):
        for feat in FEATURES:
            col = {
                i: r["operands"][name][feat]
                for i, r in enumerate(records)
                if name in r.get("operands", {}) and r["operands"][name].get(feat) is not None
            }
            if col:
                table[(name, feat)] = col
    for p in sorted({p for r in records for p in r.get("params", {})}):
        col = {i: int(r["params"][p]) for i, r in enumerate(records) if p in r.get("params", {})}
        table[(None, p)] = col
        table[(None, p + "_multiple")] = {i: _pow2_divisor(v) for i, v in col.items()}
    return table


_fact_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 512), st.sampled_from(["bfloat16", "float16"]))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "operands": st.dictionaries(
                    st.sampled_from(["q", "k", "v", "x"]),
                    st.dictionaries(
                        st.sampled_from(["alignment", "dtype", "last_dim", "values", "unknown"]), _fact_values
                    ),
                    max_size=3,
                ),
                "params": st.dictionaries(
                    st.sampled_from(["seq", "heads", "tokens"]), st.integers(0, 4096), max_size=2
                ),
            }
        ),
        max_size=12,
    )
)
def test_the_one_pass_feature_table_is_the_table_by_definition(records) -> None:
    """The wrap-up infers from every record a run made, so the table is built in one pass over them; it is the
    same table, in the same key order (which breaks ties between clauses), as the definition."""
    from harness.contract import _feature_values

    got = _feature_values(records)
    want = _feature_table_by_definition(records)
    assert list(got) == list(want)
    assert got == want
