"""Matrix report rendering: every non-pass cell is shown with its numbers and a working link;
summaries are validated; the files are plain JSON and self-contained HTML."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.report import (
    CELL_STATUSES,
    SummaryError,
    load_summary,
    render_html,
    render_markdown,
    validate_summary,
    write_reports,
)

VERDICTS = ["pass", "rejected", "drift", "nonfinite", "input_mutation", "layout_noninvariance", "device_fault"]


def _cell(op, cls, status, counts, examples=None, worst=None, kind="linear", **kw):
    return {
        "op": op,
        "kind": kind,
        "layout_class": cls,
        "status": status,
        "cases": sum(counts.values()),
        "counts": counts,
        "examples": examples or {},
        "worst": worst,
        **kw,
    }


def _summary(cells, **kw):
    base = {
        "schema_version": 1,
        "kind": "harness.matrix.summary",
        "duration_s": 12.5,
        "budget_s": 30.0,
        "device": {
            "used": "cuda",
            "name": "NVIDIA H200",
            "capability": "9.0",
            "torch": "2.11.0",
            "cuda": "13.0",
            "cudnn": 91900,
            "cublas": "13.1.0.3",
        },
        "totals": {"pass": 10, "drift": 2},
        "cells": cells,
        "unavailable": [],
        "new_failures": [],
    }
    base.update(kw)
    return base


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "img", "script") and (a.get("href") or a.get("src") or "").startswith("http"):
            self.external.append(a.get("href") or a.get("src"))


def test_nonpass_cell_is_rendered_with_numbers_and_links() -> None:
    worst = {
        "metric": "max_abs",
        "err": 0.5,
        "allowed": 0.125,
        "ratio": 4.0,
        "why": "2 x emulated + floor",
        "verdict": "drift",
        "case": "cases/a-b-drift.json",
    }
    cells = [
        _cell("fp8_linear", "contiguous", "pass", {"pass": 4}),
        _cell(
            "fp8_linear",
            "offset_2",
            "fail",
            {"pass": 1, "drift": 3},
            {"drift": "cases/a-b-drift.json"},
            worst,
            new=["drift"],
            messages={"drift": "max_abs 0.5 > allowed 0.125 (x4)"},
        ),
        _cell(
            "attn.sdpa.flash",
            "misaligned_ptr_2",
            "fail",
            {"device_fault": 1},
            {"device_fault": "cases/flash-fault.json"},
            kind="attention",
            known=["device_fault"],
        ),
        _cell("attn.sage1.sageattn", "hnd_contiguous", "unavailable", {}, kind="attention", reason="no CUDA device"),
    ]
    s = _summary(
        cells,
        unavailable=[{"op": "attn.sage1.sageattn", "reason": "no CUDA device"}],
        new_failures=[
            {
                "op": "fp8_linear",
                "layout_class": "offset_2",
                "verdict": "drift",
                "case": "cases/a-b-drift.json",
                "fingerprint": "fp8_linear|offset_2|drift",
            }
        ],
    )
    md = render_markdown(s)
    assert "[FAIL drift 3/4](cases/a-b-drift.json)" in md
    assert "max_abs 0.5 vs allowed 0.125 (ratio 4)" in md and "2 x emulated + floor" in md
    assert "NEW: drift" in md and "known: device_fault" in md
    assert "[cases/flash-fault.json](cases/flash-fault.json)" in md
    assert "attn.sage1.sageattn: no CUDA device" in md
    for key in ("NVIDIA H200", "9.0", "2.11.0", "13.0", "| cuDNN | 9.19.0 |", "13.1.0.3", "12.5 s"):
        assert key in md

    html = render_html(s)
    p = _Links()
    p.feed(html)
    assert "cases/a-b-drift.json" in p.hrefs and "cases/flash-fault.json" in p.hrefs
    internal = [h[1:] for h in p.hrefs if h.startswith("#")]
    assert internal and all(i in p.ids for i in internal)  # grid cells jump to their detail section
    assert p.scripts == 0 and not p.external  # static, self-contained
    assert "class='fail new'" in html and "class='unavailable'" in html


def test_html_escapes_messages() -> None:
    cells = [
        _cell(
            "legacy.x",
            "broadcast",
            "fail",
            {"rejected": 1},
            {"rejected": "cases/x.json"},
            messages={"rejected": "<script>alert('x')</script> & \"quotes\""},
        )
    ]
    html = render_html(_summary(cells))
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.update(schema_version=2), "schema_version"),
        (lambda s: s["cells"][0].update(status="weird"), "status 'weird'"),
        (lambda s: s["cells"][0].update(examples={"drift": "/etc/passwd"}), "relative"),
        (lambda s: s["cells"][0].update(examples={"drift": "../x.json"}), "relative"),
        (lambda s: s["cells"][0].update(counts={"pass": -1}), "non-negative"),
        (lambda s: s["cells"][0].pop("op"), "missing field 'op'"),
        (lambda s: s.update(cells={}), "'cells' must be list"),
        (lambda s: s.update(cases_by_device={"cuda:0": -3}), "cases_by_device"),
        (lambda s: s.update(cases_by_device=["cuda:0"]), "cases_by_device"),
    ],
)
def test_validate_summary_names_the_bad_field(mutate, match) -> None:
    s = _summary([_cell("fp8_linear", "contiguous", "pass", {"pass": 1})])
    mutate(s)
    with pytest.raises(SummaryError, match=match):
        validate_summary(s)


def test_write_reports_makes_plain_json_and_reloads(tmp_path) -> None:
    worst = {
        "metric": "max_abs",
        "err": math.inf,
        "allowed": 0.0,
        "ratio": math.nan,
        "why": "bitwise",
        "verdict": "layout_noninvariance",
        "case": None,
    }
    s = _summary(
        [
            _cell(
                "legacy.comfyui",
                "broadcast",
                "fail",
                {"layout_noninvariance": 2},
                {"layout_noninvariance": "cases/c.json"},
                worst,
            )
        ]
    )
    paths = write_reports(s, tmp_path)
    text = paths["summary"].read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON for the dashboard
    loaded = load_summary(tmp_path)
    assert loaded["cells"][0]["worst"]["ratio"] == "nan" and loaded["cells"][0]["worst"]["err"] == "inf"
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")
    assert "legacy.comfyui" in paths["markdown"].read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_load_summary_errors(tmp_path) -> None:
    with pytest.raises(SummaryError, match="does not exist"):
        load_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(SummaryError, match="not valid JSON"):
        load_summary(tmp_path)


@st.composite
def summaries(draw):
    ops = draw(
        st.lists(
            st.sampled_from(["fp8_linear", "raw.scaled_mm", "legacy.comfyui", "attn.sdpa"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    classes = draw(
        st.lists(
            st.sampled_from(["contiguous", "offset_2", "broadcast", "a&b<c>"]), min_size=1, max_size=3, unique=True
        )
    )
    cells = []
    for op in ops:
        for cls in classes:
            status = draw(st.sampled_from(CELL_STATUSES))
            counts, examples = {}, {}
            if status in ("pass", "fail", "nonpass"):
                counts["pass"] = draw(st.integers(0 if status != "pass" else 1, 5))
            if status in ("fail", "nonpass"):
                for v in draw(
                    st.lists(
                        st.sampled_from(VERDICTS[1:] if status == "fail" else ["rejected"]),
                        min_size=1,
                        max_size=2,
                        unique=True,
                    )
                ):
                    counts[v] = draw(st.integers(1, 4))
                    examples[v] = f"cases/{op}-{cls}-{v}.json".replace("&", "_").replace("<", "_").replace(">", "_")
            cells.append(_cell(op, cls, status, counts, examples))
    return _summary(cells)


@settings(max_examples=60)
@given(summaries())
def test_every_nonpass_cell_links_every_example(summary) -> None:
    md, html = render_markdown(summary), render_html(summary)
    p = _Links()
    p.feed(html)
    for c in summary["cells"]:
        if c["status"] in ("fail", "nonpass"):
            for path in c["examples"].values():
                assert f"]({path})" in md
                assert path in p.hrefs
        assert c["op"] in md
    # one grid row per op per kind, one column per layout class
    for cls in {c["layout_class"] for c in summary["cells"]}:
        assert re.search(r"\|[^\n]*" + re.escape(cls.replace("|", "\\|")), md)
    json.dumps(summary)  # the strategy builds plain JSON


@pytest.mark.parametrize(
    "raw,text",
    [(91900, "9.19.0"), (90100, "9.1.0"), (8902, "8.9.2"), (7605, "7.6.5"), (None, "-"), ("9.19.0", "9.19.0")],
)
def test_cudnn_version_is_written_as_people_write_it(raw, text) -> None:
    from harness.report import cudnn_version_text

    assert cudnn_version_text(raw) == text


def test_a_failed_rewrite_leaves_the_previous_reports_whole_and_no_temp_file(tmp_path, monkeypatch) -> None:
    import os

    import harness.report

    first = write_reports(_summary([_cell("fp8_linear", "contiguous", "pass", {"pass": 3})]), tmp_path)
    before = {k: p.read_bytes() for k, p in first.items()}
    real = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if str(dst).endswith("report.md"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(harness.report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_reports(_summary([_cell("fp8_linear", "contiguous", "pass", {"pass": 9})], status="running"), tmp_path)
    assert first["markdown"].read_bytes() == before["markdown"]  # the old one, whole
    assert json.loads(first["summary"].read_text())["status"] == "running"  # written before the failure: whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md", "summary.json"]
    temps = [os.path.basename(src) for src, _ in calls]
    assert len(set(temps)) == len(temps) and all(t.startswith(".") and t.endswith(".tmp") for t in temps)


@pytest.mark.parametrize(
    "state, text",
    [
        ({"status": "interrupted", "interrupted": "SIGTERM", "completed": False}, "INTERRUPTED (SIGTERM)"),
        ({"status": "running", "completed": False}, "RUNNING: partial results"),
        ({"status": "no_results", "completed": False}, "NO RESULTS"),
    ],
)
def test_reports_say_how_the_run_ended(state, text) -> None:
    s = _summary(
        [_cell("fp8_linear", "contiguous", "pass", {"pass": 3}), _cell("fp8_linear", "offset_2", "not_run", {})],
        **state,
    )
    md, html = render_markdown(s), render_html(s)
    assert f"| run | {text}" in md and text in html
    assert "## Not reached (1 cells; no result, not passing)" in md and "fp8_linear × `offset_2`" in md
    done = render_markdown(_summary([_cell("fp8_linear", "contiguous", "pass", {"pass": 3})], status="completed"))
    assert "| run |" not in done and "Not reached" not in done
