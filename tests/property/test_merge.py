"""``matrix --shard`` + ``harness merge``: real sharded CPU runs merge into the unsharded run; bad inputs refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import harness_argv, run_at_once

from harness.cases import Case, load_case
from harness.contract import infer_contracts, load_contracts, record_of, write_contracts
from harness.layouts import LayoutSpec
from harness.merge import MergeError, merge
from harness.report import load_summary, write_reports
from harness.shard import cell_key, shard_of
from harness.verdicts import Result, Verdict

REPO = Path(__file__).resolve().parents[2]
OPS = "legacy.wanvideo_late2025,fp8_linear"
CLASSES = "contiguous,offset_2,broadcast,values_beyond_448"


def _matrix_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return harness_argv(
        "matrix",
        "--device",
        "cpu",
        "--time-budget",
        "300",
        "--cases-per-cell",
        "1",
        "--workers",
        "1",
        "--ops",
        OPS,
        "--classes",
        CLASSES,
        "--corpus",
        str(corpus),
        "--quiet",
        "--out",
        str(out),
        "--no-explore",  # the grid's cells; the exploration's merge is checked on its own
        *extra,
    )


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The real matrix runs the tests below judge, started at once: the two shards and the unsharded run of
    OPS x CLASSES, the empty shard of one cell, and the refused --shard values. Name -> (its --out, result)."""
    root = tmp_path_factory.mktemp("merge_runs")
    corpus = root / "empty-corpus"  # every failure is new: new_failures and their case links get merged too
    corpus.mkdir()
    one_cell = ("--time-budget", "300", "--cases-per-cell", "1", "--workers", "1", "--quiet")
    runs = {
        "shard1": _matrix_args(root / "shard1", corpus, "--shard", "1/2"),
        "shard2": _matrix_args(root / "shard2", corpus, "--shard", "2/2"),
        "whole": _matrix_args(root / "whole", corpus),
        "empty": harness_argv(
            "matrix",
            "--device",
            "cpu",
            *one_cell,
            "--ops",
            "fp8_linear",
            "--classes",
            "contiguous",
            "--shard",
            f"{_empty_shard()}/2",
            "--out",
            str(root / "empty"),
        ),  # fmt: skip
        **{
            f"bad{i}": harness_argv(
                "matrix", "--device", "cpu", "--ops", "fp8_linear", "--shard", spec, "--out", str(root / f"bad{i}")
            )
            for i, spec in enumerate(BAD_SHARDS)
        },
    }
    results = run_at_once(*runs.values(), timeout=600, cwd=REPO)
    return {name: (root / name, cp) for name, cp in zip(runs, results)}


def _empty_shard() -> int:
    """The shard of 2 that holds no cell of fp8_linear x contiguous."""
    return next(i for i in (1, 2) if shard_of(cell_key("fp8_linear", "contiguous"), 2) != i)


def test_two_real_shards_merge_into_what_one_unsharded_run_finds(matrix_runs, tmp_path) -> None:
    outs = {i: matrix_runs[f"shard{i}"][0] for i in (1, 2)}
    for name in ("shard1", "shard2", "whole"):
        cp = matrix_runs[name][1]
        assert cp.returncode == 0, cp.stderr[-2000:]

    shards = {i: load_summary(o) for i, o in outs.items()}
    ref = load_summary(matrix_runs["whole"][0])
    keys = {i: [(c["op"], c["layout_class"]) for c in s["cells"]] for i, s in shards.items()}
    ref_keys = [(c["op"], c["layout_class"]) for c in ref["cells"]]
    assert keys[1] and keys[2] and not set(keys[1]) & set(keys[2])  # both non-empty, disjoint
    assert sorted(keys[1] + keys[2]) == sorted(ref_keys)  # together complete
    assert shards[1]["shard"]["all_cells"] == [list(k) for k in ref_keys]

    merged_dir = tmp_path / "merged"
    r = subprocess.run(
        harness_argv("merge", str(outs[2]), str(outs[1]), "--out", str(merged_dir)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "merged 2 of 2 shards" in r.stdout and "shard 1/2: cpu" in r.stdout
    m = load_summary(merged_dir)
    assert [(c["op"], c["layout_class"]) for c in m["cells"]] == ref_keys  # the unsharded order
    fields = ("kind", "status", "cases", "counts", "failing", "new", "known", "examples", "kernel_defects")
    for got, want in zip(m["cells"], ref["cells"]):
        assert {k: got.get(k) for k in fields} == {k: want.get(k) for k in fields}, got["op"]
        assert got["shard"] == shard_of(cell_key(got["op"], got["layout_class"]), 2)
    assert m["totals"] == ref["totals"]
    sp = m["speed"]  # the shards ran side by side: their results over the longer case work
    assert sp["results"] == sum(m["totals"].values())
    assert sp["case_work_s"] == max(s["speed"]["case_work_s"] for s in shards.values())
    assert sp["first_result_s"] == max(s["speed"]["first_result_s"] for s in shards.values())
    assert sorted(f["fingerprint"] for f in m["new_failures"]) == sorted(f["fingerprint"] for f in ref["new_failures"])
    assert m["new_failures"], "the selection was chosen to hold a known defect"
    for c in m["cells"]:
        for verdict, rel in c["examples"].items():
            case, _ = load_case(merged_dir / rel)
            assert case.op == c["op"] and case.verdict["verdict"] == verdict
    assert [e["shard"] for e in m["merged_from"]] == ["1/2", "2/2"]
    assert set(m["cases_by_device"]) == {"1/2 cpu", "2/2 cpu"}
    assert "fp8_linear" in (merged_dir / "report.md").read_text()
    assert (merged_dir / "report.html").exists()

    # the layout contracts: inferred again from both shards' cases, they are the unsharded run's
    want = json.loads((matrix_runs["whole"][0] / "contracts.json").read_text())["contracts"]
    got = json.loads((merged_dir / "contracts.json").read_text())["contracts"]
    assert got == want and m["contracts"] == want
    split = [op for op in want if {i for i in (1, 2) if op in {k[0] for k in keys[i]}} == {1, 2}]
    assert split, "an op must have cells on both shards for this test"
    for op in split:
        for i in (1, 2):
            alone = json.loads((outs[i] / "contracts.json").read_text())["contracts"][op]
            assert alone["counted"] < want[op]["counted"]  # each shard saw only part of the op's cases
    shown = subprocess.run(
        harness_argv("contract", str(merged_dir)), cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("layout contracts (python -m harness merge (2 of 2 shards")
    for op, c in want.items():
        assert f"{op}: {c['counted']} cases" in shown.stdout
        assert all(f"  needs {cl['text']}: violated" in shown.stdout for cl in c["preconditions"])
    assert any(c["preconditions"] for c in want.values()), "the selection was chosen to hold a rejected layout"


# ------------------------------------------------------------------ synthetic shard outputs (no workers)

ALL = [["opA", "c1"], ["opB", "c1"], ["opA", "c2"], ["opB", "c2"], ["opA", "c3"], ["opB", "c3"], ["opA", "c4"]]


def _cell(op: str, cls: str, status: str = "pass") -> dict:
    counts = {"pass": 2} if status == "pass" else {"drift": 1, "pass": 1}
    ex = {} if status == "pass" else {"drift": f"cases/{op}-{cls}-drift.json"}
    return {
        "op": op,
        "kind": "linear",
        "layout_class": cls,
        "status": status,
        "cases": 2,
        "counts": counts,
        "reason": "",
        "worst": None,
        "examples": ex,
        "messages": {},
        "failing": [] if status == "pass" else ["drift"],
        "new": [],
        "known": [],
        "kernel_defects": {},
    }


def _shard(root: Path, i: int, n: int, *, all_cells=ALL, device=None, cells=None, extra=None, case_names=()) -> Path:
    out = root / f"s{i}of{n}"
    mine = [c for c in all_cells if shard_of(cell_key(*c), n) == i] if cells is None else cells
    rows = [_cell(op, cls, "fail" if cls == "c2" else "pass") for op, cls in mine]
    (out / "cases").mkdir(parents=True)
    for r in rows:
        for rel in r["examples"].values():
            (out / rel).write_text(json.dumps({"from": i}))
    for name in case_names:
        (out / "cases" / f"{name}.json").write_text(json.dumps({"from": i}))
    s = {
        "schema_version": 1,
        "kind": "harness.matrix.summary",
        "started_at": f"2026-01-01T00:0{i}:00+00:00",
        "duration_s": 10.0 * i,
        "budget_s": 60.0,
        "budget_exhausted": False,
        "completed": True,
        "size": "small",
        "seed": 0,
        "workers": 1,
        "device": dict(
            {
                "used": "cuda",
                "name": f"NVIDIA H200 #{i}",
                "capability": "9.0",
                "torch": "2.13.0",
                "cuda": "13.0",
                "devices_used": ["cuda:0"],
            },
            **(device or {}),
        ),
        "totals": {
            "pass": sum(r["counts"].get("pass", 0) for r in rows),
            "drift": sum(r["counts"].get("drift", 0) for r in rows),
        },
        "cases_by_device": {"cuda:0": sum(r["cases"] for r in rows)},
        "cells": rows,
        "unavailable": [],
        "new_failures": [],
        "shard": {"index": i, "count": n, "harness": "0.1.0", "cells": len(rows), "all_cells": all_cells},
    }
    s.update(extra or {})
    write_reports(s, out)
    return out


def _check_spread() -> None:
    got = {shard_of(cell_key(*c), 3) for c in ALL}
    assert got == {1, 2, 3}, "the synthetic cells must spread over three shards for these tests"


def test_the_pace_of_merged_shards_skips_an_empty_share_and_needs_every_shard_to_have_one() -> None:
    from harness.merge import _merged_speed

    class Out:
        def __init__(self, speed):
            self.summary = {"speed": speed} if speed is not None else {}

    busy = {"results": 100, "case_work_s": 50.0, "first_result_s": 10.0}
    empty = {"results": 0, "case_work_s": 5.0, "first_result_s": None}
    assert _merged_speed([Out(busy), Out(empty)])["speed"] == {
        "results": 100,
        "case_work_s": 50.0,
        "cases_per_s": 2.0,
        "first_result_s": 10.0,
        "cases_per_s_after_first_result": 2.5,
    }
    assert _merged_speed([Out(busy), Out(None)]) == {}  # a shard from an older harness: no pace claimed


def test_synthetic_merge_orders_cells_sums_totals_and_names_devices(tmp_path) -> None:
    _check_spread()
    ins = [_shard(tmp_path, i, 3) for i in (3, 1, 2)]
    m = merge(ins, tmp_path / "m")
    assert [[c["op"], c["layout_class"]] for c in m["cells"]] == ALL
    assert m["totals"]["pass"] == sum(c["counts"].get("pass", 0) for c in m["cells"])
    assert m["duration_s"] == 30.0 and m["started_at"].startswith("2026-01-01T00:01")
    assert m["completed"] is True and m["shards"]["missing"] == []
    assert [e["device"] for e in m["merged_from"]] == ["NVIDIA H200 #1", "NVIDIA H200 #2", "NVIDIA H200 #3"]
    assert m["device"]["capability"] == "9.0" and "NVIDIA H200 #2 (1 shard)" in m["device"]["name"]
    for c in m["cells"]:
        for rel in c["examples"].values():
            assert (tmp_path / "m" / rel).exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"device": {"torch": "2.12.0"}}, "torch '2.12.0'"),
        ({"device": {"capability": "8.9"}}, "capability '8.9'"),
        ({"extra": {"seed": 7}}, "seed 7"),
        ({"all_cells": ALL[:-1]}, "different cell selections"),
    ],
)
def test_incompatible_shards_are_refused(tmp_path, change, match) -> None:
    a = _shard(tmp_path, 1, 3)
    b = _shard(tmp_path, 2, 3, **change)
    c = _shard(tmp_path, 3, 3)
    with pytest.raises(MergeError, match=match):
        merge([a, b, c], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_duplicate_and_mixed_shards_are_named(tmp_path) -> None:
    a, b = _shard(tmp_path, 1, 3), _shard(tmp_path, 2, 3)
    with pytest.raises(MergeError, match=r"shard\(s\) 3/3 missing"):
        merge([a, b], tmp_path / "m")
    with pytest.raises(MergeError, match="shard 1/3 given twice"):
        merge([a, a, b], tmp_path / "m")
    other = _shard(tmp_path / "x", 1, 2)
    with pytest.raises(MergeError, match="same N"):
        merge([a, other], tmp_path / "m")
    wrong = _shard(tmp_path / "y", 2, 3, cells=[ALL[0]] if shard_of(cell_key(*ALL[0]), 3) != 2 else [ALL[1]])
    with pytest.raises(MergeError, match="does not belong to shard 2/3"):
        merge([a, wrong], tmp_path / "m")


def test_allow_missing_marks_the_missing_cells_not_run_and_the_run_incomplete(tmp_path) -> None:
    a, b = _shard(tmp_path, 1, 3), _shard(tmp_path, 2, 3)
    m = merge([a, b], tmp_path / "m", allow_missing=True)
    gone = [c for c in m["cells"] if c["status"] == "not_run"]
    assert gone and all(c["shard"] == 3 and "shard 3/3 missing" in c["reason"] for c in gone)
    assert [[c["op"], c["layout_class"]] for c in gone] == [c for c in ALL if shard_of(cell_key(*c), 3) == 3]
    assert m["completed"] is False and m["shards"]["missing"] == [3]


def test_a_taken_case_name_is_prefixed_and_relinked(tmp_path) -> None:
    a = _shard(tmp_path, 1, 3, case_names=["clash"])
    b = _shard(tmp_path, 2, 3, case_names=["clash"])
    c = _shard(tmp_path, 3, 3)
    s2 = load_summary(b)
    s2["cells"][0]["examples"] = {"drift": "cases/clash.json"}
    s2["cells"][0]["status"], s2["cells"][0]["counts"] = "fail", {"drift": 2}
    write_reports(s2, b)
    m = merge([a, b, c], tmp_path / "m")
    moved = next(
        x for x in m["cells"] if x["op"] == s2["cells"][0]["op"] and x["layout_class"] == s2["cells"][0]["layout_class"]
    )
    assert moved["examples"]["drift"] == "cases/shard2of3-clash.json"
    assert json.loads((tmp_path / "m" / "cases" / "shard2of3-clash.json").read_text()) == {"from": 2}
    assert json.loads((tmp_path / "m" / "cases" / "clash.json").read_text()) == {"from": 1}


def test_unknown_fields_are_tolerated_and_kept_when_the_shards_agree(tmp_path) -> None:
    ins = [
        _shard(tmp_path, i, 3, extra={"future": {"x": 1}, "per_shard": i, "interrupted": "SIGTERM" if i == 2 else ""})
        for i in (1, 2, 3)
    ]
    m = merge(ins, tmp_path / "m")
    assert m["future"] == {"x": 1} and "per_shard" not in m
    assert m["interrupted"] == "shard 2: SIGTERM"


# one op, two layout classes on different shards of 2: the misaligned class fails, the aligned one passes
_BF16 = 2  # bytes per element


def _split_classes() -> tuple[str, str]:
    names = [f"c{i}" for i in range(1, 20)]
    bad = names[0]
    good = next(c for c in names if shard_of(cell_key("opA", c), 2) != shard_of(cell_key("opA", bad), 2))
    return bad, good


def _records(cls: str, aligns: tuple[int, ...], verdict: Verdict) -> list[dict]:
    """Real records (record_of) of opA cases whose q has exactly these pointer alignments."""
    out = []
    for a in aligns:
        q = LayoutSpec((1, 2, 64, 64), offset=a // _BF16 if a < 256 else 0)
        case = Case(
            op="opA",
            layouts={"q": q, "k": LayoutSpec((1, 2, 64, 64)), "v": LayoutSpec((1, 2, 64, 64))},
            params={"layout_class": cls, "seq_k": 64},
        )
        r = record_of(case, Result(verdict, "" if verdict is Verdict.PASS else "misaligned address", op="opA"))
        assert r["operands"]["q"]["alignment"] == a
        out.append(r)
    return out


def _contract_shards(tmp_path: Path, *, with_records: bool = True) -> tuple[list[Path], list[dict], str]:
    bad, good = _split_classes()
    cells = [["opA", bad], ["opA", good], ["opB", "other"]]
    recs = {
        bad: _records(bad, (2, 4, 8), Verdict.DEVICE_FAULT),
        good: _records(good, (16, 32, 256), Verdict.PASS),
        "other": [dict(r, op="opB") for r in _records("other", (256,), Verdict.PASS)],
    }
    env = {"used": "cuda", "capability": "9.0", "torch": "2.13.0"}
    outs = []
    for i in (1, 2):
        mine = [c for c in cells if shard_of(cell_key(*c), 2) == i]
        doc = infer_contracts(
            [r for _, cls in mine for r in recs[cls]], dict(env, name=f"NVIDIA H200 #{i}"), "python -m harness matrix"
        )
        if not with_records:
            del doc["records"]
        out = _shard(tmp_path, i, 2, all_cells=cells, extra={"contracts": doc["contracts"]})
        write_contracts(out, doc)
        outs.append(out)
    return outs, [r for rs in recs.values() for r in rs], bad


def test_contracts_are_inferred_again_from_the_union_of_the_shards_records(tmp_path) -> None:
    (s1, s2), everything, bad = _contract_shards(tmp_path)
    for s in (s1, s2):  # neither shard alone can draw the boundary: one saw only failures, the other only passes
        alone = load_contracts(s)["contracts"]["opA"]
        assert alone["preconditions"] == [] and alone["counted"] == 3
    m = merge([s2, s1], tmp_path / "m")
    got = load_contracts(tmp_path / "m")
    env = {"used": "cuda", "capability": "9.0", "torch": "2.13.0", "name": "NVIDIA H200 #1; NVIDIA H200 #2"}
    want = infer_contracts(everything, env)["contracts"]
    assert got["contracts"] == want and m["contracts"] == want
    (cl,) = got["contracts"]["opA"]["preconditions"]
    assert (cl["key"], cl["bound"], cl["nearest_failing"]) == ("q:alignment:min", 16, 8)
    assert cl["violated"] == {"cases": 3, "failed": 3, "by_verdict": {"device_fault": 3}}
    assert cl["satisfied"]["cases"] == 3 and cl["satisfied"]["failed"] == 0
    assert cl["classes_violating"] == [bad] and got["contracts"]["opA"]["unexplained"]["failures"] == 0
    assert len(got["records"]) == len(everything) and "partial" not in got and "contracts_partial" not in m
    md = (tmp_path / "m" / "report.md").read_text()
    assert "q pointer alignment >= 16 B: violated -> 3 failed in 3 cases (device_fault 3)" in md


def test_shards_without_records_keep_only_the_contracts_one_shard_saw_whole_and_say_so(tmp_path) -> None:
    (s1, s2), _, _ = _contract_shards(tmp_path, with_records=False)
    opb_shard = shard_of(cell_key("opB", "other"), 2)
    r = subprocess.run(
        harness_argv("merge", str(s1), str(s2), "--out", str(tmp_path / "m")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "layout contracts left out for 1 op(s) (opA)" in r.stdout and "kept no case records" in r.stdout
    got = load_contracts(tmp_path / "m")
    assert got["contracts"] == {"opB": load_contracts([s1, s2][opb_shard - 1])["contracts"]["opB"]}
    assert got["partial"] == {"opA": ["1/2", "2/2"]} and str(s1) in got["partial_reason"]
    m = load_summary(tmp_path / "m")
    assert set(m["contracts"]) == {"opB"} and m["contracts_partial"] == {"opA": ["1/2", "2/2"]}
    assert "Layout contracts left out for opA" in (tmp_path / "m" / "report.md").read_text()


def test_a_malformed_record_in_a_shard_is_refused_in_one_line(tmp_path) -> None:
    (s1, s2), _, _ = _contract_shards(tmp_path)
    doc = json.loads((s2 / "contracts.json").read_text())
    doc["records"][0]["operands"]["q"]["alignment"] = [16]
    (s2 / "contracts.json").write_text(json.dumps(doc))
    with pytest.raises(MergeError, match=r"records\[0\] field 'operands'"):
        merge([s1, s2], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_reports_name_the_device_of_every_shard(tmp_path) -> None:
    a, b = _shard(tmp_path, 1, 3), _shard(tmp_path, 3, 3)
    merge([a, b], tmp_path / "m", allow_missing=True)
    md = (tmp_path / "m" / "report.md").read_text()
    assert "## Shards (2 of 3 merged)" in md and "Missing shards: 2/3" in md
    assert "| 1/3 | NVIDIA H200 #1 | 9.0 | cuda:0 |" in md and "| 3/3 | NVIDIA H200 #3 |" in md
    page = (tmp_path / "m" / "report.html").read_text()
    assert "<h2>Shards (2 of 3 merged)</h2>" in page and page.rstrip().endswith("</html>")
    assert page.index("NVIDIA H200 #3</td>") < page.index("</body>")


def test_a_non_empty_out_is_never_touched(tmp_path) -> None:
    ins = [_shard(tmp_path, i, 3) for i in (1, 2, 3)]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(MergeError, match="never overwrites"):
        merge(ins, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(ins, empty)["shards"]["merged"] == [1, 2, 3]


@pytest.mark.parametrize(
    "setup, match",
    [
        ("not_a_dir", "is not a directory"),
        ("unsharded", "no shard record"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, setup, match) -> None:
    good = _shard(tmp_path, 1, 1)
    bad = tmp_path / "bad"
    if setup == "unsharded":
        s = load_summary(good)
        del s["shard"]
        write_reports(s, bad)
    elif setup == "bad_json":
        bad.mkdir()
        (bad / "summary.json").write_text("{nope")
    r = subprocess.run(
        harness_argv("merge", str(good), str(bad), "--out", str(tmp_path / "m")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness merge: ") and match in lines[0], r.stderr
    assert not (tmp_path / "m").exists()


def test_cli_exit_3_for_an_incomplete_merge(tmp_path) -> None:
    a = _shard(tmp_path, 1, 3)
    r = subprocess.run(
        harness_argv("merge", str(a), "--out", str(tmp_path / "m"), "--allow-missing"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 3, r.stderr
    assert "missing shards 2/3, 3/3" in r.stdout


def test_an_empty_shard_still_writes_its_summary(matrix_runs) -> None:
    empty = _empty_shard()
    out, r = matrix_runs["empty"]
    assert r.returncode == 0, r.stderr[-2000:]
    s = load_summary(out)
    assert s["cells"] == [] and s["shard"] == {
        "index": empty,
        "count": 2,
        "harness": s["shard"]["harness"],
        "cells": 0,
        "all_cells": [["fp8_linear", "contiguous"]],
    }


#: refused --shard values -> what their one line says
BAD_SHARDS = {"0/2": "between 1 and 2", "x": "is not I/N"}


@pytest.mark.parametrize("index", range(len(BAD_SHARDS)), ids=list(BAD_SHARDS))
def test_matrix_rejects_a_bad_shard_in_one_line(matrix_runs, index: int) -> None:
    out, r = matrix_runs[f"bad{index}"]
    match = list(BAD_SHARDS.values())[index]
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness matrix: ") and match in lines[0], r.stderr
    assert not out.exists()
