"""``python -m harness matrix --device cuda`` end to end: runs on the GPU, reports the GPU, links resolve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.cases import load_case
from harness.report import load_summary

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def test_matrix_on_cuda_writes_a_gpu_report(tmp_path) -> None:
    out = tmp_path / "m"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "matrix",
            "--device",
            "cuda",
            "--time-budget",
            "200",  # bounds the whole run: the grid's cap and the exploration's share of what is left
            "--cases-per-cell",
            "2",
            "--explore-cases",
            "40",
            "--ops",
            "fp8_linear,raw.scaled_mm,attn.sdpa*,safe_attn.sdpa*,legacy.comfyui",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    s = load_summary(out)
    dev = s["device"]
    assert dev["used"] == "cuda" and dev["capability"] and dev["cuda"] and dev["cublas"], dev
    cells = {(c["op"], c["layout_class"]): c for c in s["cells"]}
    assert cells[("fp8_linear", "contiguous")]["status"] == "pass", cells[("fp8_linear", "contiguous")]
    assert cells[("attn.sdpa.math", "hnd_contiguous")]["status"] == "pass"
    assert all(c["cases"] >= 1 for c in s["cells"] if c["status"] != "unavailable"), "round 0 must cover every cell"
    # every visible GPU ran cases (issue 5.7: the matrix uses them all), and no case lost its device
    assert set(s["cases_by_device"]) == set(dev["devices_used"]), (s["cases_by_device"], dev["devices_used"])
    assert sum(s["cases_by_device"].values()) == sum(s["totals"].values())
    for c in s["cells"]:
        for verdict, rel in c["examples"].items():
            case, _ = load_case(out / rel)
            assert case.verdict["verdict"] == verdict
            if verdict == "device_fault":  # attributed beside the grid (or skipped when the run ended first)
                att = case.verdict.get("attribution") or {}
                assert att.get("method") or att.get("kernel") or att.get("skipped"), (c["op"], c["layout_class"], att)
            assert case.env.get("device_type") == "cuda" or str(case.env.get("device", "")).startswith("cuda")
    html = (out / "report.html").read_text()
    assert dev["name"] in html and s["device"]["capability"] in html
    # the exploration after the grid: every corpus finding of these ops is reproduced by an explored case, and
    # each device-fault signature's minimal case was attributed to a kernel by a named method
    ex = s["explore"]
    tried = [c for c in ex["corpus"] if not c["skipped"]]
    assert tried and all(c["reproduced"] for c in tried), [c for c in tried if not c["reproduced"]]
    faults = [f for d in ex["ops"].values() for f in d.get("findings", []) if f["verdict"] == "device_fault"]
    assert faults, "sdpa.flash / efficient fault on misaligned pointers"
    assert all(
        (f.get("attribution") or {}).get("method") or (f.get("attribution") or {}).get("skipped") for f in faults
    )
