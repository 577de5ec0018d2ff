"""Unit and property tests of the benchmark dashboard (``harness.dashboard``).

The saved runs in ``tests/fixtures/bench_runs`` are genuine pytest-benchmark
output (see ``regenerate.py`` there): three CPU runs whose medians agree within
5%, except ``test_bench_cpu_materialize[offset1]``, whose times were multiplied
by 1.6 in the third run.  Expected values below come from those facts or from
the raw JSON, never from the code under test.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.dashboard import (
    SPEEDUP_BASE_OP,
    build_dashboard,
    build_series,
    check_regressions,
    latest_table,
    load_matrix_summary,
    load_runs,
    render_html,
    speed_tables,
    speed_targets,
    speedups,
    time_to_find,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "bench_runs"
SLOWED = "test_bench_cpu_materialize[offset1]"
SLOW_FACTOR = 1.6


def _fixture_files() -> list[Path]:
    return sorted(p for p in FIXTURES.rglob("*.json") if p.name != "summary.json")


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- fixtures themselves
def test_dashboard_fixtures_are_genuine_runs() -> None:
    """Three runs, pytest-benchmark's format, in a machine-id folder, with our extra_info."""
    files = _fixture_files()
    assert len(files) == 3, files
    for f in files:
        doc = _raw(f)
        assert f.parent.parent == FIXTURES, "runs live in a machine-id sub-folder, as --benchmark-autosave writes them"
        assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= doc.keys()
        names = {b["name"] for b in doc["benchmarks"]}
        assert SLOWED in names
        for b in doc["benchmarks"]:
            assert b["extra_info"]["schema"] == "harness.bench/1"
    first, _, third = (_raw(f) for f in files)
    med = lambda doc, name: next(b for b in doc["benchmarks"] if b["name"] == name)["extra_info"]["device_ms"]["median"]  # noqa: E731
    assert med(third, SLOWED) / med(first, SLOWED) > 1 + 0.10, "the third run must be slower on the slowed benchmark"


# --------------------------------------------------------------------------- loading
def test_dashboard_loads_fixture_runs_in_time_order() -> None:
    runs, problems = load_runs(FIXTURES)
    assert problems == []
    assert [Path(r.path).name for r in runs] == [f.name for f in _fixture_files()]
    assert [r.when for r in runs] == sorted(r.when for r in runs)
    assert {r.machine for r in runs} == {_fixture_files()[0].parent.name}


def test_dashboard_series_use_device_ms() -> None:
    """Each point's median is extra_info.device_ms.median of that run (ms), not pytest-benchmark's seconds."""
    runs, _ = load_runs(FIXTURES)
    series = {s.name: s for s in build_series(runs)}
    raw = [_raw(f) for f in _fixture_files()]
    names = {b["name"] for b in raw[0]["benchmarks"]}
    assert set(series) == names
    for name, s in series.items():
        want = [
            next(b for b in doc["benchmarks"] if b["name"] == name)["extra_info"]["device_ms"]["median"] for doc in raw
        ]
        assert s.medians == want
        assert all(p.source == "device_ms" and p.min <= p.median <= p.max for p in s.points)


# --------------------------------------------------------------------------- regression flag
def test_dashboard_flags_the_slowed_benchmark_only() -> None:
    runs, _ = load_runs(FIXTURES)
    flagged = {
        s.name
        for s in build_series(runs)
        if (c := check_regressions(s.medians, threshold=0.10, window=5)[-1]) is not None and c.regressed
    }
    assert flagged == {SLOWED}


def test_dashboard_flag_respects_threshold() -> None:
    """Runs 1-2 agree within 5% and run 3 is 1.6x: flagged at 50%, not at 70%."""
    runs, _ = load_runs(FIXTURES)
    s = next(s for s in build_series(runs) if s.name == SLOWED)
    change = s.medians[-1] / statistics.median(s.medians[:-1]) - 1
    assert SLOW_FACTOR / 1.05 - 1 <= change <= SLOW_FACTOR * 1.05 - 1
    assert check_regressions(s.medians, threshold=0.5, window=5)[-1].regressed
    assert not check_regressions(s.medians, threshold=0.7, window=5)[-1].regressed


REGRESSION_TABLE = [
    # (medians, threshold, window, flag of the last point, why)
    ([10.0], 0.10, 5, None, "first run: no baseline"),
    ([10.0, 10.0, 10.0, 11.5], 0.10, 5, True, "15% over a flat baseline"),
    ([10.0, 10.0, 10.0, 11.0], 0.10, 5, False, "exactly at the limit is not a regression"),
    ([10.0, 12.0, 8.0, 10.9], 0.10, 5, False, "baseline is the median (10), not the last run (8)"),
    ([10.0, 16.0, 9.0, 11.2], 0.10, 5, True, "baseline is the median (10), not the mean (11.67)"),
    ([20.0, 20.0, 20.0, 10.0, 10.0, 12.0], 0.10, 2, True, "window 2: baseline 10"),
    ([20.0, 20.0, 20.0, 10.0, 10.0, 12.0], 0.10, 5, False, "window 5: baseline median(20,20,20,10,10) = 20"),
    ([10.0, 9.0], 0.10, 5, False, "faster is never a regression"),
]


@pytest.mark.parametrize(
    "medians, threshold, window, expected, why", REGRESSION_TABLE, ids=[r[-1] for r in REGRESSION_TABLE]
)
def test_dashboard_regression_table(medians, threshold, window, expected, why) -> None:
    last = check_regressions(medians, threshold=threshold, window=window)[-1]
    assert (None if last is None else last.regressed) is expected, why


@pytest.mark.parametrize(
    "threshold, window, match",
    [
        (0.0, 5, "threshold=0.0"),
        (-0.1, 5, "threshold=-0.1"),
        (math.nan, 5, "threshold=nan"),
        (0.1, 0, "window=0"),
        (0.1, 2.5, "window=2.5"),
    ],
)
def test_dashboard_rejects_bad_rule(threshold, window, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_regressions([1.0, 2.0], threshold=threshold, window=window)


medians_st = st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=1, max_size=12)


@given(
    medians=medians_st,
    factor=st.floats(min_value=1e-2, max_value=1e2),
    threshold=st.floats(min_value=0.01, max_value=1.0),
    window=st.integers(1, 8),
)
def test_dashboard_regression_is_scale_invariant(medians, factor, threshold, window) -> None:
    """Flags depend on ratios only: timing every run on a uniformly faster machine changes none of them
    (up to the rounding of the multiplication when a point sits on the limit)."""
    a = check_regressions(medians, threshold=threshold, window=window)
    b = check_regressions([m * factor for m in medians], threshold=threshold, window=window)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None and abs(x.median / x.limit - 1) > 1e-9:
            assert x.regressed == y.regressed


@given(
    base=st.floats(min_value=1e-3, max_value=1e3),
    n=st.integers(1, 12),
    window=st.integers(1, 8),
    threshold=st.floats(min_value=0.01, max_value=1.0),
)
def test_dashboard_constant_series_never_flags(base, n, window, threshold) -> None:
    assert not any(
        c is not None and c.regressed for c in check_regressions([base] * n, threshold=threshold, window=window)
    )


@given(
    medians=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=12),
    bump=st.floats(min_value=0.0, max_value=10.0),
    window=st.integers(1, 8),
)
def test_dashboard_slower_last_run_only_adds_flags(medians, bump, window) -> None:
    """Making the latest run slower can turn 'ok' into 'regression', never the reverse."""
    before = check_regressions(medians, threshold=0.1, window=window)[-1]
    after = check_regressions(medians[:-1] + [medians[-1] * (1 + bump)], threshold=0.1, window=window)[-1]
    assert after.baseline == before.baseline
    assert after.regressed or not before.regressed


# --------------------------------------------------------------------------- speed-up
def _bench_entry(name: str, op: str, shape_key: str, median_ms: float, device: str = "GPU X", **extra) -> dict:
    """A minimal pytest-benchmark entry with harness.bench extra_info."""
    s = median_ms / 1e3
    return {
        "group": None,
        "name": name,
        "fullname": f"tests/bench/test_x.py::{name}",
        "params": None,
        "param": None,
        "stats": {"min": s * 0.9, "max": s * 1.2, "median": s, "mean": s, "rounds": 5},
        "extra_info": {
            "schema": "harness.bench/1",
            "op": op,
            "shape_key": shape_key,
            "device_ms": {"min": median_ms * 0.9, "median": median_ms, "max": median_ms * 1.2},
            "env": {"device": device},
            **extra,
        },
    }


def _write_run(path: Path, when: str, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "machine_info": {},
                "commit_info": {"id": "abc"},
                "benchmarks": entries,
                "datetime": when,
                "version": "5.2.3",
            }
        )
    )


def test_dashboard_speedup_pairs_by_shape(tmp_path: Path) -> None:
    _write_run(
        tmp_path / "m" / "0001.json",
        "2026-01-01T00:00:00",
        [
            _bench_entry("bf16[a]", SPEEDUP_BASE_OP, "shapeA", 10.0),
            _bench_entry("fp8[a]", "fp8_linear", "shapeA", 6.0),
            _bench_entry("bare[a]", "scaled_mm_bare", "shapeA", 5.0),
            _bench_entry("legacy[a]", "legacy.comfyui", "shapeA", 8.0),
            _bench_entry("target[a]", "fp8_linear", "shapeA", 99.0, family="speed_target"),  # has its own table
            _bench_entry("fp8[b]", "fp8_linear", "shapeB", 3.0),  # no bf16 partner: no row
            _bench_entry("bf16[c]", SPEEDUP_BASE_OP, "shapeC", 8.0, device="GPU Y"),
            _bench_entry("fp8[c]", "fp8_linear", "shapeC", 4.0, device="GPU Y"),
        ],
    )
    runs, problems = load_runs(tmp_path)
    assert problems == []
    rows = {(r.device, r.shape_key, r.op): r.speedup for r in speedups(build_series(runs))}
    assert rows == {
        ("GPU X", "shapeA", "fp8_linear"): pytest.approx(10 / 6),
        ("GPU X", "shapeA", "scaled_mm_bare"): pytest.approx(10 / 5),
        ("GPU X", "shapeA", "legacy.comfyui"): pytest.approx(10 / 8),
        ("GPU Y", "shapeC", "fp8_linear"): pytest.approx(8 / 4),
    }


def test_dashboard_speedup_uses_latest_run(tmp_path: Path) -> None:
    _write_run(
        tmp_path / "m" / "0001.json",
        "2026-01-01T00:00:00",
        [_bench_entry("bf16", SPEEDUP_BASE_OP, "s", 10.0), _bench_entry("fp8", "fp8_linear", "s", 5.0)],
    )
    _write_run(
        tmp_path / "m" / "0002.json",
        "2026-01-02T00:00:00",
        [_bench_entry("bf16", SPEEDUP_BASE_OP, "s", 9.0), _bench_entry("fp8", "fp8_linear", "s", 6.0)],
    )
    runs, _ = load_runs(tmp_path)
    (row,) = speedups(build_series(runs))
    assert row.speedup == pytest.approx(9 / 6)


def test_dashboard_speedup_on_fixtures_matches_raw_json() -> None:
    runs, _ = load_runs(FIXTURES)
    raw = _raw(_fixture_files()[-1])
    by_op = {
        b["extra_info"]["op"]: b["extra_info"]["device_ms"]["median"]
        for b in raw["benchmarks"]
        if b["extra_info"]["family"] == "linear"
    }
    rows = {r.op: r.speedup for r in speedups(build_series(runs))}
    assert rows == {op: pytest.approx(by_op[SPEEDUP_BASE_OP] / by_op[op]) for op in ("fp8_linear", "scaled_mm_bare")}


def test_dashboard_speed_target_verdicts(tmp_path: Path) -> None:
    rule = {"min_speedup_vs_bf16": 1.5, "max_overhead_vs_bare": 0.05, "why": "because"}
    _write_run(
        tmp_path / "m" / "0001.json",
        "2026-01-01T00:00:00",
        [
            _bench_entry(
                "t[met]",
                "fp8_linear",
                "s1",
                1.0,
                family="speed_target",
                speed_target={**rule, "speedup_vs_bf16": 1.55, "overhead_vs_bare": 0.02},
            ),
            _bench_entry(
                "t[slow]",
                "fp8_linear",
                "s2",
                1.0,
                family="speed_target",
                speed_target={**rule, "speedup_vs_bf16": 1.45, "overhead_vs_bare": 0.02},
            ),
            _bench_entry(
                "t[overhead]",
                "fp8_linear",
                "s3",
                1.0,
                family="speed_target",
                speed_target={**rule, "speedup_vs_bf16": 1.6, "overhead_vs_bare": 0.08},
            ),
            _bench_entry(
                "t[broken]", "fp8_linear", "s4", 1.0, family="speed_target", speed_target={"speedup_vs_bf16": "?"}
            ),
        ],
    )
    runs, _ = load_runs(tmp_path)
    assert {t["shape_key"]: t["met"] for t in speed_targets(runs[0])} == {"s1": True, "s2": False, "s3": False}
    page = render_html(runs, [], storage="x", threshold=0.1, window=5)
    assert page.count(">MISSED<") == 2 and page.count(">met<") == 1
    table = latest_table(runs)
    assert "speed target s1: fp8_linear 1.55x bf16 (>= 1.5x), +2.0% vs bare cast + _scaled_mm (<= 5%): met" in table
    assert table.count("MISSED") == 2


# --------------------------------------------------------------------------- time to find
A, B = "legacy.x|broadcast|rejected", "legacy.x|outliers|input_mutation"


def _ttf_entry(figures: dict, device: str = "CPU X", seconds: float = 2.0) -> dict:
    """A time-to-find result as tests/bench/test_bench_explore.py writes it (host-timer stats, no device_ms)."""
    return {
        "group": None,
        "name": "test_bench_explore_time_to_find[cpu]",
        "fullname": "tests/bench/test_bench_explore.py::test_bench_explore_time_to_find[cpu]",
        "stats": {"min": seconds, "max": seconds, "median": seconds, "mean": seconds, "rounds": 1},
        "extra_info": {
            "op": "explore.time_to_find",
            "family": "time_to_find",
            "env": {"device": device},
            "seed": 0,
            "budget_cases": 300,
            "time_to_find": figures,
        },
    }


def _fig(cases: int, seconds: float, found: bool = True) -> dict:
    return {"cases": cases, "seconds": seconds, "found": found, "note": "explored: x: an outlier token"}


def test_dashboard_time_to_find_latest_against_previous(tmp_path: Path) -> None:
    runs_in = [
        ("2026-01-01T00:00:00", [_ttf_entry({A: _fig(10, 1.0), B: _fig(40, 4.0)})]),
        ("2026-01-02T00:00:00", [_ttf_entry({A: _fig(12, 1.2), B: _fig(300, 30.0, found=False)})]),
        ("2026-01-03T00:00:00", [_ttf_entry({A: _fig(6, 0.6)}), _ttf_entry({A: _fig(99, 9.0)}, device="GPU Y")]),
    ]
    for i, (when, entries) in enumerate(runs_in):
        _write_run(tmp_path / "m" / f"000{i}.json", when, entries)
    runs, problems = load_runs(tmp_path)
    assert problems == []
    rows = {(r.device, r.fingerprint): r for r in time_to_find(runs)}
    assert set(rows) == {("CPU X", A), ("CPU X", B), ("GPU Y", A)}
    a = rows["CPU X", A]
    assert (a.latest.run, a.latest.cases, a.latest.seconds) == (2, 6, 0.6)
    assert (a.previous.run, a.previous.cases) == (1, 12)
    assert a.cases_change == pytest.approx(6 / 12 - 1)
    b = rows["CPU X", B]  # not measured in the latest run: its latest is run 2, not found
    assert (b.latest.run, b.latest.cases, b.latest.found, b.previous.cases) == (1, 300, False, 40)
    assert b.cases_change is None, "no change against a budget that ran out"
    g = rows["GPU Y", A]
    assert g.previous is None and g.latest.cases == 99, "another device never shares the history"

    page = render_html(runs, [], storage="x", threshold=0.1, window=5)
    assert page.count('<table class="time-to-find">') == 2 and page.count("bars time-to-find") == 2
    assert "NOT FOUND within 300 cases" in page and "-50%" in page
    table = latest_table(runs)
    assert f"time to find {A}: 6 cases, 0.600 s (previous: 12 cases, 1.20 s)" in table
    assert f"time to find {B}: NOT FOUND within 300 cases (previous: 40 cases, 4.00 s)" in table
    assert f"time to find {A}: 99 cases, 9.00 s" in table


BAD_FIGURES = [
    ({"cases": -1, "seconds": 1.0, "found": True}, "cases = -1"),
    ({"cases": True, "seconds": 1.0, "found": True}, "cases = True"),
    ({"cases": 3, "seconds": float("inf"), "found": True}, "seconds = inf"),
    ({"cases": 3, "seconds": "fast", "found": True}, "seconds = 'fast'"),
    ({"cases": 3, "seconds": 1.0}, "found = None"),
    ([3, 1.0], "is a list, not an object"),
]


@pytest.mark.parametrize("figure, expected", BAD_FIGURES, ids=[e for _, e in BAD_FIGURES])
def test_dashboard_skips_malformed_time_to_find_figures(tmp_path: Path, figure, expected) -> None:
    _write_run(tmp_path / "m" / "0001.json", "2026-01-01T00:00:00", [_ttf_entry({A: _fig(5, 0.5), B: figure})])
    runs, problems = load_runs(tmp_path)
    assert [r.fingerprint for r in time_to_find(runs)] == [A], "the good figure is kept"
    (p,) = problems
    assert expected in p.message and B in p.message and "that figure skipped" in p.message


def test_dashboard_time_to_find_not_an_object_is_one_problem(tmp_path: Path) -> None:
    _write_run(tmp_path / "m" / "0001.json", "2026-01-01T00:00:00", [_ttf_entry(["oops"])])
    runs, problems = load_runs(tmp_path)
    assert time_to_find(runs) == [] and len(runs[0].benchmarks) == 1, "the run and its timing stay"
    assert len(problems) == 1 and "time_to_find is a list, not an object" in problems[0].message


def test_dashboard_without_time_to_find_has_no_such_section() -> None:
    runs, _ = load_runs(FIXTURES)
    assert time_to_find(runs) == []
    assert "Time to find" not in render_html(runs, [], storage="x", threshold=0.1, window=5)


# --------------------------------------------------------------------------- malformed files
MALFORMED = {
    "not_json.json": ("{ this is not json", "not valid JSON"),
    "a_list.json": ("[1, 2, 3]", "not a pytest-benchmark run"),
    "no_datetime.json": (json.dumps({"benchmarks": []}), "'datetime' = None"),
    "empty.json": (json.dumps({"benchmarks": [], "datetime": "2026-01-01T00:00:00"}), "no usable benchmark entries"),
}


def test_dashboard_skips_malformed_files_with_clear_messages(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    shutil.copytree(FIXTURES, storage, ignore=shutil.ignore_patterns("*.py", "*.md"))
    for name, (text, _) in MALFORMED.items():
        (storage / name).write_text(text)
    (storage / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    runs, problems = load_runs(storage)
    assert len(runs) == 3, "the good runs are still used"
    by_file = {}
    for p in problems:
        by_file.setdefault(p.path, []).append(p.message)
    for name, (_, expected) in MALFORMED.items():
        assert any(expected in m for m in by_file.get(name, [])), (name, by_file.get(name))
    assert "binary.json" in by_file


BAD_ENTRIES = [
    ({"name": "x", "fullname": "t::x"}, "has no 'stats' object"),
    ({"name": "x", "fullname": "t::x", "stats": {"min": 1, "max": 2, "median": float("nan")}}, "stats.median = nan"),
    ({"name": "x", "fullname": "t::x", "stats": {"min": -1, "max": 2, "median": 1}}, "stats.min = -1"),
    ({"name": "x", "fullname": "t::x", "stats": {"min": 3, "max": 2, "median": 1}}, "inconsistent"),
    ({"fullname": "t::x", "stats": {"min": 1, "max": 2, "median": 1}}, "lacks the string fields"),
    ("oops", "not an object"),
]


@pytest.mark.parametrize("entry, expected", BAD_ENTRIES, ids=[e for _, e in BAD_ENTRIES])
def test_dashboard_skips_malformed_entries(tmp_path: Path, entry, expected) -> None:
    good = _bench_entry("good", "fp8_linear", "s", 1.0)
    _write_run(tmp_path / "m" / "0001.json", "2026-01-01T00:00:00", [good, entry])
    runs, problems = load_runs(tmp_path)
    assert [b["name"] for b in runs[0].benchmarks] == ["good"]
    assert len(problems) == 1 and expected in problems[0].message and "benchmarks[1]" in problems[0].message


def test_dashboard_bad_device_ms_falls_back_to_stats(tmp_path: Path) -> None:
    entry = _bench_entry("b", "fp8_linear", "s", 2.0)
    entry["extra_info"]["device_ms"] = {"min": 1.0, "median": "fast", "max": 3.0}
    _write_run(tmp_path / "m" / "0001.json", "2026-01-01T00:00:00", [entry])
    runs, problems = load_runs(tmp_path)
    (s,) = build_series(runs)
    assert s.points[0].source == "stats" and s.points[0].median == pytest.approx(2.0)
    assert (
        "device_ms.median = 'fast'" in problems[0].message and "using pytest-benchmark's stats" in problems[0].message
    )


def test_dashboard_missing_storage_names_the_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.*--benchmark-storage"):
        load_runs(tmp_path / "nowhere")


def test_dashboard_runs_on_different_devices_are_separate_series(tmp_path: Path) -> None:
    _write_run(tmp_path / "m" / "0001.json", "2026-01-01T00:00:00", [_bench_entry("b", "fp8_linear", "s", 1.0, "H100")])
    _write_run(tmp_path / "m" / "0002.json", "2026-01-02T00:00:00", [_bench_entry("b", "fp8_linear", "s", 9.0, "H200")])
    runs, _ = load_runs(tmp_path)
    series = build_series(runs)
    assert sorted(s.device for s in series) == ["H100", "H200"]
    assert all(len(s.points) == 1 for s in series), "an H200 run is no regression of the H100 trend"


# --------------------------------------------------------------------------- page and CLI
def test_dashboard_page_is_self_contained(tmp_path: Path) -> None:
    runs, problems = load_runs(FIXTURES)
    page = render_html(runs, problems, storage=str(FIXTURES), threshold=0.10, window=5)
    assert (
        "<script src" not in page
        and "<link" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert "https://" not in page
    n_series = len(build_series(runs))
    assert page.count('class="plot trend"') == n_series
    assert 'id="threshold">10%<' in page
    assert f"{SLOWED}" in page and "REGRESSION" in page
    assert 'id="matrix-none"' in page and "no matrix report" in page


MATRIX = FIXTURES / "matrix" / "summary.json"  # a genuine CPU matrix run (python -m harness matrix ...)


def test_dashboard_page_shows_matrix_summary() -> None:
    data, note = load_matrix_summary(MATRIX.parent)
    assert data == _raw(MATRIX) and note == str(MATRIX)
    runs, problems = load_runs(FIXTURES)
    page = render_html(runs, problems, storage="x", threshold=0.1, window=5, matrix=data, matrix_note=note)
    assert "matrix-none" not in page and 'id="matrix"' in page
    failing = [c for c in data["cells"] if c["status"] == "fail"]
    assert failing, "the fixture summary has failing cells to show"
    for c in failing:
        assert f"<td>{c['op']}</td><td>{c['layout_class']}</td><td>fail</td>" in page
    for verdict, n in data["totals"].items():
        assert f"{verdict} <b>{n}</b>" in page
    assert data["device"]["torch"] in page


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("{oops", "is not valid JSON"),
        ("[1]", "must be a JSON object, got list"),
        ('{"schema_version": 99}', "schema_version 99 is not supported"),
    ],
)
def test_dashboard_bad_matrix_summary_says_why(tmp_path: Path, content, expected) -> None:
    p = tmp_path / "summary.json"
    if content is not None:
        p.write_text(content)
    data, note = load_matrix_summary(p)
    assert data is None and expected in note and note.startswith("no matrix report")
    runs, problems = load_runs(FIXTURES)
    page = render_html(runs, problems, storage="x", threshold=0.1, window=5, matrix=data, matrix_note=note)
    assert 'id="matrix-none"' in page and expected in page


def test_dashboard_latest_table_lists_latest_run(tmp_path: Path) -> None:
    runs, _ = load_runs(FIXTURES)
    table = latest_table(runs)
    raw = _raw(_fixture_files()[-1])
    for b in raw["benchmarks"]:
        assert b["name"] in table
    assert "vs bf16" in table and "TFLOP/s" in table and "GB/s" in table


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``python -m harness dashboard ARGS`` in-process: (exit code, stdout, stderr)."""
    from harness.cli import main

    try:
        rc = main(["dashboard", *args])
    except SystemExit as exc:  # argparse rejects arguments this way
        rc = int(exc.code)
    out, err = capsys.readouterr()
    return rc, out, err


def test_dashboard_cli_entry_point(tmp_path: Path) -> None:
    """The real command line, in a subprocess, as the nightly job runs it."""
    out = tmp_path / "d.html"
    r = subprocess.run(
        [sys.executable, "-m", "harness", "dashboard", "--storage", str(FIXTURES), "--out", str(out), "--print-latest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "1 regressions" in r.stdout and "vs bf16" in r.stdout


def test_dashboard_cli_writes_page_and_reports_regression(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.html"
    rc, stdout, stderr = _cli(
        capsys,
        "--storage",
        str(FIXTURES),
        "--out",
        str(out),
        "--threshold",
        "0.10",
        "--window",
        "5",
        "--fail-on-regression",
    )
    assert rc == 1, stderr
    assert out.is_file() and f"REGRESSION {SLOWED}" in stdout
    rc, stdout, stderr = _cli(
        capsys, "--storage", str(FIXTURES), "--out", str(out), "--threshold", "0.9", "--fail-on-regression"
    )
    assert rc == 0, stderr
    assert "0 regressions" in stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--threshold", "-0.2"), "--threshold '-0.2' must be > 0"),
        (("--threshold", "ten"), "--threshold 'ten' is not a number"),
        (("--window", "0"), "--window '0' must be >= 1"),
    ],
)
def test_dashboard_cli_rejects_bad_arguments(tmp_path: Path, capsys, args, expected) -> None:
    rc, _, stderr = _cli(capsys, "--storage", str(FIXTURES), "--out", str(tmp_path / "d.html"), *args)
    assert rc == 2 and expected in stderr


def test_dashboard_cli_empty_storage_is_one_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rc, stdout, stderr = _cli(capsys, "--storage", str(store), "--out", str(tmp_path / "d.html"))
    assert rc == 2 and stdout == "" and not (tmp_path / "d.html").exists()
    [line] = stderr.splitlines()  # one thing: the error, naming the folder and how to fill it
    assert f"--storage {store}: no usable pytest-benchmark runs found" in line and "--benchmark-autosave" in line


@pytest.mark.parametrize(
    "make, args, expected",
    [
        (None, ("--storage", "{t}/missing", "--out", "{t}/d.html"), "--storage {t}/missing does not exist"),
        ("file:x", ("--storage", "{t}/x", "--out", "{t}/d.html"), "--storage {t}/x is a file"),
        ("dir:o", ("--storage", "FIX", "--out", "{t}/o"), "--out {t}/o is a directory"),
        ("file:f", ("--storage", "FIX", "--out", "{t}/f/d.html"), "--out {t}/f/d.html: {t}/f is a file"),
        (None, ("--storage", "FIX", "--out", "{t}/d.html", "--matrix", "{t}/nope"), "--matrix {t}/nope does not exist"),
        ("file:s.json", ("--storage", "FIX", "--out", "{t}/d.html", "--matrix", "{t}/s.json"), "--matrix {t}/s.json: "),
    ],
)
def test_dashboard_cli_wrong_paths_are_one_line_exit_2(tmp_path: Path, capsys, make, args, expected) -> None:
    if make:
        kind, name = make.split(":")
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("not json")
    argv = [str(FIXTURES) if a == "FIX" else a.format(t=tmp_path) for a in args]
    rc, stdout, stderr = _cli(capsys, *argv)
    assert rc == 2 and stdout == "" and not (tmp_path / "d.html").exists()
    [line] = stderr.splitlines()
    assert expected.format(t=tmp_path) in line and "Traceback" not in line


def test_dashboard_cli_success_says_how_many_runs(tmp_path: Path, capsys) -> None:
    rc, stdout, stderr = _cli(
        capsys, "--storage", str(FIXTURES), "--out", str(tmp_path / "d.html"), "--matrix", str(MATRIX.parent)
    )
    assert rc == 0 and stderr == ""
    assert stdout.splitlines()[0].startswith(f"dashboard: wrote {tmp_path / 'd.html'} (3 runs, ")


def test_dashboard_build_returns_what_it_found(tmp_path: Path) -> None:
    res = build_dashboard(FIXTURES, tmp_path / "sub" / "d.html", threshold=0.10, window=5)
    assert res.out.is_file() and res.runs == 3 and res.problems == ()
    assert [name for _, name, _ in res.regressions] == [SLOWED]


def test_dashboard_says_when_the_matrix_run_was_interrupted(tmp_path: Path) -> None:
    summary = json.loads((MATRIX.parent / "summary.json").read_text())
    summary.update(status="interrupted", interrupted="SIGTERM", completed=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "summary.json").write_text(json.dumps(summary))
    res = build_dashboard(FIXTURES, tmp_path / "d.html", matrix=tmp_path / "m")
    page = res.out.read_text()
    assert "INTERRUPTED (SIGTERM)" in page
    plain = build_dashboard(FIXTURES, tmp_path / "e.html", matrix=MATRIX.parent).out.read_text()
    assert "INTERRUPTED" not in plain


def test_dashboard_speed_table_rows_and_verdicts(tmp_path: Path) -> None:
    bounds = {"min_speedup_vs_bf16": 1.0, "max_overhead_vs_bare": 0.05}

    def row(dyn, static, dyn_over, static_over, **graph):
        return {
            **bounds,
            "dynamic_speedup_vs_bf16": dyn,
            "static_speedup_vs_bf16": static,
            "dynamic_overhead_vs_bare": dyn_over,
            "static_overhead_vs_bare": static_over,
            "meets_target": True,  # the recorded flag is not trusted: the verdict is recomputed from the ratios
            **graph,
        }

    _write_run(
        tmp_path / "m" / "0001.json",
        "2026-01-01T00:00:00",
        [
            _bench_entry(
                "t[a]", "fp8_linear", "a.L32760", 1.0, family="speed_table", speed_table=row(1.6, 1.7, -0.3, 0.01)
            ),
            _bench_entry(
                "t[b]", "fp8_linear", "b.L32760", 1.0, family="speed_table", speed_table=row(0.9, 1.2, -0.5, 0.0)
            ),
            _bench_entry(
                "t[c]", "fp8_linear", "c.L32760", 1.0, family="speed_table", speed_table=row(1.2, 1.3, 0.0, 0.08)
            ),
            _bench_entry(
                "t[d]",
                "fp8_linear",
                "d.L512",
                1.0,
                family="speed_table",
                speed_table=row(0.25, 0.37, 0.39, 0.98, graph_dynamic_speedup_vs_bf16_graph=1.18),
            ),
            _bench_entry(
                "t[e]", "fp8_linear", "e", 1.0, family="speed_table", speed_table={"dynamic_speedup_vs_bf16": "?"}
            ),
        ],
    )
    runs, _ = load_runs(tmp_path)
    rows = speed_tables(runs[0])
    assert {r["shape_key"]: r["met"] for r in rows} == {
        "a.L32760": True,
        "b.L32760": False,  # dynamic below bf16
        "c.L32760": False,  # static over the bare budget
        "d.L512": False,
    }
    assert rows[-1]["graph_dynamic_speedup_vs_bf16_graph"] == 1.18
    page = render_html(runs, [], storage="x", threshold=0.1, window=5)
    assert page.count('class="speed-table"') == 1 and page.count(">MISSED<") == 3
    assert ">1.18x<" in page  # the graph replay column
    assert not any(r.op == "fp8_linear" for r in speedups(build_series(runs)))  # not paired into the bf16 table
    table = latest_table(runs)
    assert (
        "speed table b.L32760: dynamic 0.900x / static 1.20x bf16 (>= 1x), -50.0% / +0.0% vs bare (<= 5%): MISSED"
        in table
    )
