"""Dashboard statistics: per-device benchmark series, regression checks, speed-ups and speed targets."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from harness.dashboard.load import BENCH_SCHEMA, Run, finite

__all__ = [
    "Point",
    "Series",
    "RegressionCheck",
    "SpeedupRow",
    "build_series",
    "check_regressions",
    "validate_rule",
    "speedups",
    "speed_targets",
    "speed_tables",
    "analyse",
    "device_of",
    "SPEEDUP_BASE_OP",
    "SPEEDUP_SKIP_FAMILIES",
    "FindFigure",
    "TimeToFindRow",
    "time_to_find",
]

#: The op every speed-up is measured against: each other op with the same ``shape_key`` gets a row
#: (fp8_linear, the bare cast + _scaled_mm, the legacy forwards, the misaligned-input run), except
#: results of the families in :data:`SPEEDUP_SKIP_FAMILIES` (the speed-target check has its own table).
SPEEDUP_BASE_OP = "bf16_linear"
SPEEDUP_SKIP_FAMILIES = ("speed_target", "speed_table")


# --------------------------------------------------------------------------- series and regressions
@dataclass(frozen=True)
class Point:
    """One benchmark in one run: times in ms and what was derived from them."""

    run: int  # index into the runs list
    median: float
    min: float
    max: float
    source: str  # "device_ms" | "stats"
    throughput: float | None = None
    unit: str | None = None
    ceiling_ratio: float | None = None
    ceiling_name: str | None = None


@dataclass
class Series:
    """A benchmark's history on one device (runs from different devices never share a trend)."""

    machine: str
    device: str
    fullname: str
    name: str
    group: str | None
    op: str | None
    shape_key: str | None
    family: str | None = None
    points: list[Point] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.machine, self.device, self.fullname)

    @property
    def medians(self) -> list[float]:
        return [p.median for p in self.points]


def device_of(entry: Mapping[str, Any]) -> str:
    env = entry.get("extra_info", {}).get("env")
    if isinstance(env, dict) and isinstance(env.get("device"), str):
        return env["device"]
    return "unknown device"


def _point(entry: Mapping[str, Any], run_index: int) -> Point:
    extra = entry.get("extra_info", {})
    dm = extra.get("device_ms") if extra.get("schema") == BENCH_SCHEMA else None
    if isinstance(dm, dict):
        med, lo, hi, src = float(dm["median"]), float(dm["min"]), float(dm["max"]), "device_ms"
    else:
        st = entry["stats"]
        med, lo, hi, src = st["median"] * 1e3, st["min"] * 1e3, st["max"] * 1e3, "stats"
    tp = extra.get("throughput") if isinstance(extra.get("throughput"), dict) else {}
    ceil = extra.get("ceiling") if isinstance(extra.get("ceiling"), dict) else {}
    ratio = extra.get("ceiling_ratio")
    return Point(
        run=run_index,
        median=med,
        min=lo,
        max=hi,
        source=src,
        throughput=float(tp["value"]) if finite(tp.get("value")) else None,
        unit=tp.get("unit") if isinstance(tp.get("unit"), str) else None,
        ceiling_ratio=float(ratio) if finite(ratio) else None,
        ceiling_name=ceil.get("name") if isinstance(ceil.get("name"), str) else None,
    )


def build_series(runs: Sequence[Run]) -> list[Series]:
    """Group every benchmark entry by (machine folder, device, fullname), points in run order."""
    by_key: dict[tuple[str, str, str], Series] = {}
    for i, run in enumerate(runs):
        for entry in run.benchmarks:
            extra = entry.get("extra_info", {})
            key = (run.machine, device_of(entry), entry["fullname"])
            s = by_key.get(key)
            if s is None:
                s = by_key[key] = Series(
                    machine=key[0],
                    device=key[1],
                    fullname=key[2],
                    name=entry["name"],
                    group=entry.get("group") if isinstance(entry.get("group"), str) else None,
                    op=extra.get("op") if isinstance(extra.get("op"), str) else None,
                    shape_key=extra.get("shape_key") if isinstance(extra.get("shape_key"), str) else None,
                    family=extra.get("family") if isinstance(extra.get("family"), str) else None,
                )
            s.points.append(_point(entry, i))
    return sorted(by_key.values(), key=lambda s: (s.device, s.machine, s.family or "~", s.group or "", s.fullname))


@dataclass(frozen=True)
class RegressionCheck:
    """How one point compares with the median of the points before it."""

    index: int  # position in the series
    median: float
    baseline: float  # median of the previous `window` medians
    window_used: int
    threshold: float

    @property
    def change(self) -> float:
        """Relative slow-down: +0.25 = 25% slower than the baseline."""
        return self.median / self.baseline - 1.0 if self.baseline > 0 else math.inf

    @property
    def limit(self) -> float:
        return self.baseline * (1.0 + self.threshold)

    @property
    def regressed(self) -> bool:
        return self.median > self.limit


def validate_rule(threshold: float, window: int) -> None:
    if not finite(threshold) or threshold <= 0:
        raise ValueError(f"threshold={threshold!r}; pass a relative slow-down > 0, e.g. 0.10 for 10%")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window={window!r}; pass how many previous runs form the baseline (an int >= 1)")


def check_regressions(
    medians: Sequence[float], *, threshold: float = 0.10, window: int = 5
) -> list[RegressionCheck | None]:
    """For each point, compare it with the median of up to ``window`` points before it.

    The first point has no baseline (None).  A point is a regression when its
    median exceeds ``baseline * (1 + threshold)``.
    """
    validate_rule(threshold, window)
    out: list[RegressionCheck | None] = []
    for i, m in enumerate(medians):
        prev = list(medians[max(0, i - window) : i])
        out.append(RegressionCheck(i, m, statistics.median(prev), len(prev), threshold) if prev else None)
    return out


@dataclass(frozen=True)
class SpeedupRow:
    """``op`` against :data:`SPEEDUP_BASE_OP` on one shape in one run: base median / op median."""

    device: str
    shape_key: str
    op: str
    base_ms: float
    op_ms: float

    @property
    def speedup(self) -> float:
        return self.base_ms / self.op_ms if self.op_ms > 0 else math.inf


def speedups(series: Sequence[Series], run_index: int | None = None) -> list[SpeedupRow]:
    """Speed-up over :data:`SPEEDUP_BASE_OP` of every other op per (device, shape), in one run (default: latest).

    Pairs are matched on ``extra_info.shape_key``; a shape without a bf16 result gives no row.
    """
    latest: dict[str, int] = {}
    for s in series:
        for p in s.points:
            latest[s.device] = max(latest.get(s.device, -1), p.run)
    table: dict[tuple[str, str], dict[str, float]] = {}
    for s in series:
        if s.shape_key is None or s.op is None or s.family in SPEEDUP_SKIP_FAMILIES:
            continue
        want = latest.get(s.device) if run_index is None else run_index
        pts = [p for p in s.points if p.run == want]
        if pts:
            table.setdefault((s.device, s.shape_key), {})[s.op] = pts[-1].median
    rows = []
    for (device, shape_key), ops in sorted(table.items()):
        base = ops.get(SPEEDUP_BASE_OP)
        if base is None:
            continue
        rows += [SpeedupRow(device, shape_key, op, base, ms) for op, ms in sorted(ops.items()) if op != SPEEDUP_BASE_OP]
    return rows


def speed_targets(run: Run) -> list[dict[str, Any]]:
    """The speed-target verdicts (``extra_info["speed_target"]``) recorded in one run, with their shape."""
    out = []
    for entry in run.benchmarks:
        extra = entry.get("extra_info", {})
        st = extra.get("speed_target")
        if isinstance(st, dict) and all(
            finite(st.get(k))
            for k in ("speedup_vs_bf16", "overhead_vs_bare", "min_speedup_vs_bf16", "max_overhead_vs_bare")
        ):
            out.append(
                {
                    "name": entry["name"],
                    "shape_key": extra.get("shape_key", "?"),
                    "device": device_of(entry),
                    **st,
                    "met": st["speedup_vs_bf16"] >= st["min_speedup_vs_bf16"]
                    and st["overhead_vs_bare"] <= st["max_overhead_vs_bare"],
                }
            )
    return out


#: the ratios of one speed-table row (``extra_info["speed_table"]``), each a finite number
SPEED_TABLE_RATIOS = (
    "dynamic_speedup_vs_bf16",
    "static_speedup_vs_bf16",
    "dynamic_overhead_vs_bare",
    "static_overhead_vs_bare",
    "min_speedup_vs_bf16",
    "max_overhead_vs_bare",
)


def speed_tables(run: Run) -> list[dict[str, Any]]:
    """The per-shape speed-table rows (``extra_info["speed_table"]``, tests/bench/test_bench_linear.py) of one run:
    fp8_linear with a dynamic and a static scale against bf16 and the matching bare floor; ``met`` recomputed
    here from the ratios and their bounds (a row whose ratios are not all numbers is left out)."""
    out = []
    for entry in run.benchmarks:
        extra = entry.get("extra_info", {})
        st = extra.get("speed_table")
        if not isinstance(st, dict) or not all(finite(st.get(k)) for k in SPEED_TABLE_RATIOS):
            continue
        met = (
            min(st["dynamic_speedup_vs_bf16"], st["static_speedup_vs_bf16"]) >= st["min_speedup_vs_bf16"]
            and max(st["dynamic_overhead_vs_bare"], st["static_overhead_vs_bare"]) <= st["max_overhead_vs_bare"]
        )
        graph = {k: st.get(k) for k in ("graph_dynamic_speedup_vs_bf16_graph", "graph_static_speedup_vs_bf16_graph")}
        out.append(
            {
                "name": entry["name"],
                "shape_key": extra.get("shape_key", "?"),
                "device": device_of(entry),
                **{k: st[k] for k in SPEED_TABLE_RATIOS},
                **{k: v for k, v in graph.items() if finite(v)},
                "met": met,
            }
        )
    return sorted(out, key=lambda r: r["shape_key"])


@dataclass(frozen=True)
class FindFigure:
    """One corpus entry in one run of the time-to-find benchmark: cases and seconds to the first find
    (``found`` False: the budget ran out after ``cases``)."""

    run: int  # index into the runs list
    cases: int
    seconds: float
    found: bool


@dataclass(frozen=True)
class TimeToFindRow:
    """A corpus entry's time to find on one device: the latest run that measured it and the one before."""

    device: str
    fingerprint: str
    latest: FindFigure
    previous: FindFigure | None

    @property
    def cases_change(self) -> float | None:
        """Relative change in cases from the previous run (+0.5 = half again as many); None without one."""
        p = self.previous
        if p is None or not (p.found and self.latest.found):
            return None
        return self.latest.cases / p.cases - 1.0 if p.cases > 0 else math.inf


def time_to_find(runs: Sequence[Run]) -> list[TimeToFindRow]:
    """Per device and corpus fingerprint, the figures of ``extra_info["time_to_find"]`` (validated by the
    loader) in the latest run that recorded that entry and in the previous one; sorted by device, fingerprint."""
    history: dict[tuple[str, str], list[FindFigure]] = {}
    for i, run in enumerate(runs):
        for entry in run.benchmarks:
            figures = entry.get("extra_info", {}).get("time_to_find")
            if not isinstance(figures, dict):
                continue
            for fp, f in figures.items():
                history.setdefault((device_of(entry), fp), []).append(
                    FindFigure(i, f["cases"], f["seconds"], f["found"])
                )
    return [
        TimeToFindRow(device, fp, figs[-1], figs[-2] if len(figs) > 1 else None)
        for (device, fp), figs in sorted(history.items())
    ]


def analyse(runs: Sequence[Run], threshold: float, window: int) -> tuple[list[Series], dict[Any, list]]:
    """The benchmark series and, per series, the regression check of every run."""
    series = build_series(runs)
    return series, {s.key: check_regressions(s.medians, threshold=threshold, window=window) for s in series}
