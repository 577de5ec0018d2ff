"""The write-up's claims: each decision on planted evidence for every outcome, and the CPU experiments."""

from __future__ import annotations

import json

import pytest
import torch

from harness import claims as C
from harness.cli import main


def _claim(cid: str) -> C.Claim:
    return next(c for c in C.CLAIMS if c.id == cid)


# ------------------------------------------------------------------ decisions on planted evidence


def _reads(errors=(), ops=0, types=None) -> dict:
    return {"reads": 56, "errors": list(errors), "dispatched_ops": ops, "ops": [], "shape0_types": types or {"int": 8}}


def test_metadata_decision_has_all_three_outcomes() -> None:
    d = _claim("metadata-read").decide
    assert d({"healthy": _reads(["q.device: RuntimeError: misaligned address"]), "poisoned": None})[0] == C.CONFIRMED
    status, why, settle = d({"healthy": _reads(), "poisoned": None})
    assert status == C.UNTESTABLE and "CUDA" in settle and "0 aten ops" in why
    poisoned = {
        "fault_triggered": True,
        "fault": "sdpa flash",
        "metadata_after_fault": _reads(),
        "surfaced_at": "torch.cuda.synchronize()",
        "error": "AcceleratorError: CUDA error: misaligned address",
    }
    status, why, _ = d({"healthy": _reads(), "poisoned": poisoned})
    assert status == C.REFUTED and "torch.cuda.synchronize()" in why
    after = dict(poisoned, metadata_after_fault=_reads(["x.shape: AcceleratorError: misaligned address"]))
    assert d({"healthy": _reads(), "poisoned": after})[0] == C.CONFIRMED
    late = dict(poisoned, metadata_after_error=_reads(["x.device: AcceleratorError: misaligned address"]))
    assert d({"healthy": _reads(), "poisoned": late})[0] == C.CONFIRMED
    no_fault = dict(poisoned, fault_triggered=False, surfaced_at=None)
    assert d({"healthy": _reads(), "poisoned": no_fault})[0] == C.UNTESTABLE
    assert d({"healthy": _reads(), "poisoned": {"child_failed": "exit 1: boom"}})[0] == C.UNTESTABLE


def _sweep(failing=None, n=4) -> dict:
    return {
        "available": True,
        "cases_run": n,
        "verdicts": {},
        "failing": failing or {},
        "by_class": {},
        "case_files": [],
    }


_MIS = {"is_contiguous": True, "contiguous_returns_self": True, "alignment_before": 2, "alignment_after": 2}


def test_contiguous_first_decision() -> None:
    d = _claim("contiguous-first").decide
    ok = {op: _sweep() for op in (*C._FIXED_OPS, "legacy.wanvideo_late2025")}
    assert d({"misaligned_contiguous_view": _MIS, "sweeps": ok})[0] == C.CONFIRMED
    bad = dict(ok, **{"legacy.user_fixed": _sweep({"input_mutation": ["outliers"]})})
    status, why, _ = d({"misaligned_contiguous_view": _MIS, "sweeps": bad})
    assert status == C.REFUTED and "input_mutation in outliers" in why and "2-byte aligned" in why
    gone = {op: {"available": False, "reason": "FP8 needs 8.9"} for op in ok}
    assert d({"misaligned_contiguous_view": _MIS, "sweeps": gone})[0] == C.UNTESTABLE


def _row(layout, op, as_is_error=None, equal=True) -> dict:
    return {
        "layout": layout,
        "op": op,
        "flatten_is_view": True,
        "flatten_contiguous": True,
        "as_is_error": as_is_error,
        "contiguous_error": None,
        "bitwise_equal": equal,
    }


def test_flatten_decision() -> None:
    d = _claim("flatten-contiguous").decide
    assert d({"rows": [_row("a", "op1"), _row("b", "op1", equal=False)]})[0] == C.REFUTED
    assert d({"rows": [_row("a", "op1", as_is_error="RuntimeError"), _row("b", "op1", equal=False)]})[0] == C.CONFIRMED
    assert d({"child_failed": "exit 1"})[0] == C.UNTESTABLE


def test_sage3_decision() -> None:
    d = _claim("sage3-transpose").decide
    emu = {"hnd_contiguous": {"bitwise_equal_to_contiguous": True, "max_abs_diff": 0.0}}
    status, why, settle = d({"emulation": emu, "real": {"available": False, "reason": "needs compute capability 10.0"}})
    assert status == C.UNTESTABLE and "Blackwell" in settle and "#370" in why
    sweep = {"cases_run": 3, "by_class": {"hnd_contiguous": {"pass": 1}, "transposed_view": {"device_fault": 1}}}
    assert d({"emulation": emu, "real": {"available": True, "sweep": sweep}})[0] == C.CONFIRMED
    sweep_ok = {"cases_run": 2, "by_class": {"hnd_contiguous": {"pass": 1}, "transposed_view": {"pass": 1}}}
    assert d({"emulation": emu, "real": {"available": True, "sweep": sweep_ok}})[0] == C.REFUTED
    # Sage 3's in-place key write shows in every layout: it is not a layout failure
    sweep_mut = {
        "cases_run": 2,
        "by_class": {"hnd_contiguous": {"input_mutation": 1}, "transposed_view": {"input_mutation": 1}},
    }
    assert d({"emulation": emu, "real": {"available": True, "sweep": sweep_mut}})[0] == C.REFUTED
    sweep_bad = {"cases_run": 1, "by_class": {"hnd_contiguous": {"drift": 1}}}
    assert d({"emulation": emu, "real": {"available": True, "sweep": sweep_bad}})[0] == C.REFUTED


def test_int_shape_decision() -> None:
    d = _claim("int-shape").decide
    assert d({"reads": _reads(), "views": 8})[0] == C.REFUTED
    assert d({"reads": _reads(types={"SymInt": 8}), "views": 8})[0] == C.UNTESTABLE
    assert d({"reads": _reads(["x.shape: RuntimeError"]), "views": 8})[0] == C.CONFIRMED


def test_comfyui_decision() -> None:
    d = _claim("comfyui-reference").decide
    ok = {op: _sweep() for op in (*C._COMFY_OPS, "fp8_linear")}
    assert d({"sweeps": ok})[0] == C.CONFIRMED
    bad = dict(ok, **{"legacy.comfyui": _sweep({"layout_noninvariance": ["broadcast"]})})
    assert d({"sweeps": bad})[0] == C.REFUTED
    assert d({"sweeps": {op: {"available": False, "reason": "x"} for op in ok}})[0] == C.UNTESTABLE


def _free(ratio=0.001, returns_self=True, ops=()) -> dict:
    return {
        "returns_self": returns_self,
        "dispatched_ops": list(ops),
        "contiguous_ms": 0.001,
        "forward_ms": 1.0,
        "noncontiguous_copy_ms": 0.5,
        "ratio": ratio,
        "target": C.OVERHEAD_TARGET,
        "shape": [4, 4],
    }


def test_contiguous_free_decision() -> None:
    d = _claim("contiguous-free").decide
    assert d(_free())[0] == C.CONFIRMED
    assert d(_free(ratio=0.5))[0] == C.REFUTED
    assert d(_free(returns_self=False))[0] == C.REFUTED
    assert d(_free(ops=["aten.clone.default"]))[0] == C.REFUTED
    assert d({"unavailable": "no FP8"})[0] == C.UNTESTABLE


def _after(alignment=None, video="pass", cost=None) -> dict:
    return {"alignment": alignment, "video": {"status": video, "reason": "max_abs 1 <= 2"}, "cost": cost}


def test_after_fixes_decision() -> None:
    d = _claim("after-fixes").decide
    assert d(_after())[0] == C.UNTESTABLE  # CPU: three of four parts need CUDA
    assert d(_after(video="fail"))[0] == C.REFUTED
    cost = {
        "median_ms": {"user_fixed": 1.0, "wanvideo_late2025": 1.0},
        "input_bytes": 100,
        "peak_extra_bytes": {"user_fixed": 150, "wanvideo_late2025": 100},
    }
    aligned = {"available": True, "verdicts": {"pass": 10}, "cases_run": 10}
    assert d(_after(aligned, cost=cost))[0] == C.CONFIRMED
    faulty = dict(aligned, verdicts={"pass": 9, "device_fault": 1})
    assert d(_after(faulty, cost=cost))[0] == C.REFUTED
    clean_error = dict(aligned, misaligned_messages=1)
    assert d(_after(clean_error, cost=cost))[0] == C.REFUTED
    slow = dict(cost, median_ms={"user_fixed": 1.1, "wanvideo_late2025": 1.0})
    assert d(_after(aligned, cost=slow))[0] == C.REFUTED
    fat = dict(cost, peak_extra_bytes={"user_fixed": 300, "wanvideo_late2025": 100})
    assert d(_after(aligned, cost=fat))[0] == C.REFUTED


# ------------------------------------------------------------------ the measurements on this CPU


def test_op_recorder_sees_ops_so_zero_means_none() -> None:
    x = torch.randn(3)
    rec = C._OpRecorder()
    with rec:
        x + 1
    assert any("add" in o for o in rec.ops)


def test_metadata_and_int_shape_measured_on_cpu() -> None:
    ctx = C.ClaimContext("cpu")
    r = C.run_claim(_claim("metadata-read"), ctx)
    h = r.evidence["healthy"]
    assert r.status == C.UNTESTABLE and h["reads"] >= 7 * 7 and h["dispatched_ops"] == 0 and not h["errors"]
    assert "CUDA" in r.settle
    r = C.run_claim(_claim("int-shape"), ctx)
    assert r.status == C.REFUTED and r.evidence["reads"]["shape0_types"] == {"int": r.evidence["views"]}


def test_flatten_and_sage3_measured_on_cpu() -> None:
    ctx = C.ClaimContext("cpu")
    r = C.run_claim(_claim("flatten-contiguous"), ctx)
    rows = r.evidence["rows"]
    assert r.status == C.REFUTED
    seq = [x for x in rows if x["layout"] == "sequence_major"]
    assert seq and all(x["flatten_is_view"] and not x["flatten_contiguous"] for x in seq)
    assert {x["op"] for x in rows} >= {"fp8_linear", "legacy.user_fixed", "legacy.comfyui"}
    r = C.run_claim(_claim("sage3-transpose"), ctx)
    assert r.status == C.UNTESTABLE and "needs a CUDA device" in r.why
    assert all(e["bitwise_equal_to_contiguous"] for e in r.evidence["emulation"].values())


def test_contiguous_first_refuted_on_cpu_with_case_files(tmp_path) -> None:
    ctx = C.ClaimContext("cpu", out=tmp_path, classes=("contiguous", "values_beyond_448"))
    r = C.run_claim(_claim("contiguous-first"), ctx)
    assert r.status == C.REFUTED and "legacy.user_fixed: input_mutation in values_beyond_448" in r.why
    assert r.evidence["misaligned_contiguous_view"]["alignment_after"] == 2
    assert r.cases and all((tmp_path / "cases").joinpath(p.split("/")[-1]).exists() for p in r.cases)
    from harness.cases import load_case

    case, tensors = load_case(r.cases[0])
    assert case.verdict["verdict"] == "input_mutation" and "x" in tensors


def test_contiguous_free_measured_on_cpu() -> None:
    r = C.run_claim(_claim("contiguous-free"), C.ClaimContext("cpu", timing_rounds=3))
    ev = r.evidence
    assert ev["returns_self"] and ev["same_data_ptr"] and ev["dispatched_ops"] == []
    assert r.status == (C.CONFIRMED if ev["ratio"] <= C.OVERHEAD_TARGET else C.REFUTED)


def test_a_raising_experiment_is_not_testable_and_named() -> None:
    def boom(ctx):
        raise RuntimeError("probe broke")

    r = C.run_claim(C.Claim("x", "text", boom, lambda ev: (C.CONFIRMED, "", "")), C.ClaimContext("cpu"))
    assert r.status == C.UNTESTABLE and "probe broke" in r.why


def test_child_failure_is_reported_not_raised() -> None:
    out = C._child("import sys; sys.exit(3)")
    assert out["child_failed"].startswith("exit 3")


# ------------------------------------------------------------------ output and CLI


def _result(status=C.REFUTED) -> C.ClaimResult:
    return C.ClaimResult(
        "int-shape", "int(x.shape[0]) | safe", status, "already an int", "", "cpu", {"a": 1}, ["out/cases/a.json"]
    )


def test_formats() -> None:
    md = C.format_results([_result()], "md", env={"device": "cpu", "torch": "2.13"})
    assert "| int(x.shape[0]) \\| safe | **refuted** | already an int | out/cases/a.json |" in md
    html = C.format_results([_result()], "html")
    assert "<b>refuted</b>" in html and "<table>" in html
    data = json.loads(C.format_results([_result()], "json"))
    assert data["claims"][0]["status"] == "refuted" and data["claims"][0]["cases"] == ["out/cases/a.json"]


def test_cli_refuses_a_non_empty_out_dir(tmp_path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["claims", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty directory" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_bad_claim_id_is_one_line(capsys) -> None:
    assert main(["claims", "--device", "cpu", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown claim id" in err


def test_cli_markdown_and_files(tmp_path, capsys) -> None:
    out = tmp_path / "claims"
    assert (
        main(["claims", "--device", "cpu", "--only", "int-shape,metadata-read", "--format", "md", "--out", str(out)])
        == 0
    )
    md = capsys.readouterr().out
    assert "| int(x.shape[0]) makes shape access safe | **refuted** |" in md
    assert "**not testable here**" in md
    data = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in data["claims"]] == ["metadata-read", "int-shape"]
    assert (out / "claims.html").exists() and (out / "claims.md").read_text() == md


@pytest.mark.parametrize("bad", ["cuda:7x", "tpu"])
def test_cli_bad_device(bad, capsys) -> None:
    assert main(["claims", "--device", bad, "--only", "int-shape"]) == 2
    assert "--device" in capsys.readouterr().err


def test_sweeps_through_the_worker_pool_as_on_cuda(tmp_path) -> None:
    """The GPU path (sweeps in spawned workers, failing cases saved by the parent), exercised on the CPU."""
    ctx = C.ClaimContext("cpu", out=tmp_path, classes=("values_beyond_448",), pool=True)
    s = C._run_cases(ctx, "legacy.user_fixed")
    assert s["by_class"] == {"values_beyond_448": {"input_mutation": 1}}
    assert len(s["case_files"]) == 1 and C._run_cases(ctx, "legacy.user_fixed") is s  # cached per op


def test_cli_keeps_each_claim_as_it_is_measured(tmp_path, capsys, monkeypatch) -> None:
    """A run that dies after the first claim still leaves that claim in claims.json."""
    calls = []

    def dies(ctx):
        calls.append(1)
        raise KeyboardInterrupt

    broken = C.Claim("contiguous-free", "second claim", dies, lambda ev: (C.CONFIRMED, "", ""))
    monkeypatch.setattr(C, "CLAIMS", (_claim("int-shape"), broken))
    out = tmp_path / "o"
    assert main(["claims", "--device", "cpu", "--out", str(out)]) == 130  # the CLI's Ctrl-C status
    data = json.loads((out / "claims.json").read_text())
    assert calls and [c["id"] for c in data["claims"]] == ["int-shape"] and data["claims"][0]["status"] == C.REFUTED


def test_comfyui_evidence_says_what_scaled_mm_returns_here() -> None:
    ev = {
        "sweeps": {op: _sweep() for op in (*C._COMFY_OPS, "fp8_linear")},
        "scaled_mm_returns": "Tensor",
        "torch": "2.13",
    }
    assert "tuple unwrap is dead code on torch 2.13" in _claim("comfyui-reference").decide(ev)[1]
    from harness.quant.linear import scaled_mm_available

    if scaled_mm_available("cpu")[0]:
        assert C._scaled_mm_returns("cpu") == "Tensor"


def test_poison_probe_reports_no_fault_where_none_happens() -> None:
    """The child script runs to its report; on the CPU (synchronize stubbed) nothing faults, so nothing is decided."""
    code = "import torch\ntorch.cuda.synchronize = lambda *a: None\n" + C._POISON_CHILD
    rep = C._child(code, "cpu")
    assert "child_failed" not in rep, rep
    assert rep["fault_triggered"] is False and rep["metadata_after_fault"]["reads"] >= 49
    assert (
        rep["fault"] and rep["surfaced_at"] is None
    )  # the attempt ran (CPU SDPA takes any pointer) and raised nothing
    assert _claim("metadata-read").decide({"healthy": _reads(), "poisoned": rep})[0] == C.UNTESTABLE
