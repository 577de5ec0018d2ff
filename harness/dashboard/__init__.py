"""Static benchmark dashboard: ``python -m harness dashboard --storage DIR --out FILE.html``.

Reads the runs pytest-benchmark saved with ``--benchmark-autosave
--benchmark-storage DIR`` (JSON files, usually under one sub-folder per
machine id; a ``--benchmark-json`` file anywhere under DIR works too),
validates each file and each benchmark entry (malformed ones are skipped and
listed on the page and on stderr, never fatal), and writes one self-contained
HTML page: inline CSS and SVG drawn here, no server, no CDN, no dependency.

The page shows, per device:

- a trend plot per benchmark across runs: the median with a min/max band, and
  the regression threshold over the baseline of the latest run;
- a regression flag when a run's median is slower than the median of the
  previous ``window`` runs of the same benchmark on the same device by more
  than ``threshold`` (the flag and the rule are printed on the page);
- the latest run's throughput and ratio to the ceiling measured in that run,
  and the FP8-over-bf16 speed-up per shape (with the issue-4 speed target);
- per corpus entry, the exploration's time to find it (cases and seconds, the latest run
  against the previous one: ``extra_info["time_to_find"]`` of tests/bench/test_bench_explore.py);
- the latest ``matrix`` report (``summary.json``) or "no matrix report".

Times are taken from ``extra_info["device_ms"]`` (CUDA-event times, see
:mod:`harness.bench`) when a result has them, else from pytest-benchmark's own
statistics.

The package: :mod:`~harness.dashboard.load` (run files and the matrix summary, validated),
:mod:`~harness.dashboard.stats` (series, regressions, speed-ups) and
:mod:`~harness.dashboard.render` (SVG, HTML, the text table); this module builds the page and
holds the CLI.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.dashboard.load import Problem, Run, load_matrix_summary, load_run, load_runs
from harness.dashboard.render import latest_table, render_html, render_page
from harness.dashboard.stats import (
    SPEEDUP_BASE_OP,
    SPEEDUP_SKIP_FAMILIES,
    Point,
    RegressionCheck,
    Series,
    SpeedupRow,
    TimeToFindRow,
    analyse,
    build_series,
    check_regressions,
    speed_tables,
    speed_targets,
    speedups,
    time_to_find,
    validate_rule,
)

__all__ = [
    "Problem",
    "Run",
    "Point",
    "Series",
    "RegressionCheck",
    "SpeedupRow",
    "load_run",
    "load_runs",
    "build_series",
    "check_regressions",
    "speedups",
    "load_matrix_summary",
    "render_html",
    "build_dashboard",
    "DashboardResult",
    "DashboardError",
    "latest_table",
    "add_parser",
    "SPEEDUP_BASE_OP",
    "SPEEDUP_SKIP_FAMILIES",
    "speed_tables",
    "speed_targets",
    "time_to_find",
    "TimeToFindRow",
]


# --------------------------------------------------------------------------- entry points
class DashboardError(ValueError):
    """The dashboard cannot be built as asked (no runs, a bad path); the message names the path and the fix."""


@dataclass(frozen=True)
class DashboardResult:
    """What :func:`build_dashboard` wrote and found."""

    out: Path
    runs: int
    series: int
    problems: tuple[Problem, ...]
    regressions: tuple[tuple[str, str, float], ...]  # (device, benchmark name, relative change)
    loaded: tuple[Run, ...] = ()  # the runs read (for latest_table)


def build_dashboard(
    storage: Path | str,
    out: Path | str,
    *,
    matrix: Path | str | None = None,
    threshold: float = 0.10,
    window: int = 5,
    require_runs: bool = False,
) -> DashboardResult:
    """Load the runs under ``storage`` and write the page to ``out``.

    ``require_runs``: raise :class:`DashboardError` (and write nothing) when ``storage`` holds no
    usable run, or when ``matrix`` is given but is not a readable matrix summary.
    """
    validate_rule(threshold, window)
    runs, problems = load_runs(storage)
    if require_runs and not runs:
        raise DashboardError(
            f"--storage {storage}: no usable pytest-benchmark runs found; create some with `python3 -m pytest tests/bench "
            f"--benchmark-enable --benchmark-autosave --benchmark-storage {storage}`"
            + (f" ({len(problems)} file(s) skipped: {problems[0]})" if problems else "")
        )
    summary, note = load_matrix_summary(matrix)
    if require_runs and matrix is not None and summary is None:
        raise DashboardError(f"--matrix {matrix}: {note.removeprefix('no matrix report: ')}")
    series, checks = analyse(runs, threshold, window)
    page = render_page(
        runs,
        problems,
        series,
        checks,
        storage=str(storage),
        threshold=threshold,
        window=window,
        matrix=summary,
        matrix_note=note,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    regs = [
        (s.device, s.name, checks[s.key][-1].change)
        for s in series
        if checks[s.key][-1] is not None and checks[s.key][-1].regressed
    ]
    return DashboardResult(out, len(runs), len(series), tuple(problems), tuple(regs), tuple(runs))


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {text!r} is not a number; pass e.g. 0.10 for 10%") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"--threshold {text!r} must be > 0 (a relative slow-down, 0.10 = 10%)")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window {text!r} is not an integer; pass e.g. 5") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--window {text!r} must be >= 1 (previous runs in the baseline)")
    return v


def _check_paths(args: argparse.Namespace) -> str | None:
    """One line naming the first wrong path argument, or None."""
    if not args.storage.exists():
        return (
            f"--storage {args.storage} does not exist; pass the folder given to --benchmark-storage "
            "(runs are saved there by `pytest tests/bench --benchmark-enable --benchmark-autosave`)"
        )
    if not args.storage.is_dir():
        return f"--storage {args.storage} is a file; pass the folder given to --benchmark-storage"
    if args.out.is_dir():
        return f"--out {args.out} is a directory; pass the HTML file to write, e.g. {args.out / 'dashboard.html'}"
    parent = next((p for p in args.out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--out {args.out}: {parent} is a file, not a folder"
    if args.matrix is not None and not args.matrix.exists():
        return f"--matrix {args.matrix} does not exist; pass the matrix --out folder or its summary.json"
    return None


def _main(args: argparse.Namespace) -> int:
    bad = _check_paths(args)
    if bad:
        print(f"dashboard: {bad}", file=sys.stderr)
        return 2
    try:
        res = build_dashboard(
            args.storage, args.out, matrix=args.matrix, threshold=args.threshold, window=args.window, require_runs=True
        )
    except (DashboardError, OSError) as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    for p in res.problems:
        print(f"dashboard: skipped: {p}", file=sys.stderr)
    print(f"dashboard: wrote {res.out} ({res.runs} runs, {res.series} series, {len(res.regressions)} regressions)")
    for device, name, change in res.regressions:
        print(f"dashboard: REGRESSION {name} on {device}: {change:+.1%} (threshold {args.threshold:.0%})")
    if args.print_latest:
        print(latest_table(res.loaded))
    return 1 if (args.fail_on_regression and res.regressions) else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dashboard`` on the CLI's subparsers and set its ``func``."""
    p = subparsers.add_parser(
        "dashboard", help="build the static benchmark dashboard from saved runs", description=__doc__.splitlines()[0]
    )
    p.add_argument("--storage", required=True, type=Path, help="the --benchmark-storage DIR of the saved runs")
    p.add_argument("--out", required=True, type=Path, help="HTML file to write")
    p.add_argument("--matrix", type=Path, default=None, help="matrix report directory or its summary.json")
    p.add_argument(
        "--threshold",
        type=_positive_float,
        default=0.10,
        help="relative slow-down that flags a regression (default 0.10 = 10%%)",
    )
    p.add_argument(
        "--window", type=_positive_int, default=5, help="previous runs whose median is the baseline (default 5)"
    )
    p.add_argument("--print-latest", action="store_true", help="also print a table of the latest run per device")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when the latest run has a regression")
    p.set_defaults(func=_main)
    return p
