"""Dashboard input: pytest-benchmark run files and the matrix summary, validated (bad entries become Problems)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "BENCH_SCHEMA",
    "Problem",
    "Run",
    "check_time_to_find",
    "finite",
    "load_run",
    "load_runs",
    "load_matrix_summary",
]

#: The ``extra_info`` version harness.bench writes (its ``device_ms`` is trusted only under it).
BENCH_SCHEMA = "harness.bench/1"


# --------------------------------------------------------------------------- loading and validation
@dataclass(frozen=True)
class Problem:
    """A file or entry that was skipped (or partly used), with the reason."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Run:
    """One saved pytest-benchmark run: where it came from and its valid benchmark entries."""

    path: str
    machine: str  # sub-folder of the storage dir ("." for files at its top)
    when: datetime
    commit: str
    benchmarks: tuple[Mapping[str, Any], ...]

    @property
    def label(self) -> str:
        return f"{self.when:%Y-%m-%d %H:%M} {self.commit[:8]}".strip()


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _check_benchmark(entry: Any, index: int) -> str | None:
    """Why a benchmark entry is unusable (None when it is fine)."""
    if not isinstance(entry, dict):
        return f"benchmarks[{index}] is a {type(entry).__name__}, not an object"
    name = entry.get("fullname") or entry.get("name")
    where = f"benchmarks[{index}] ({name!r})" if isinstance(name, str) else f"benchmarks[{index}]"
    if not isinstance(entry.get("fullname"), str) or not isinstance(entry.get("name"), str):
        return f"{where} lacks the string fields 'name' and 'fullname'"
    stats = entry.get("stats")
    if not isinstance(stats, dict):
        return f"{where} has no 'stats' object"
    bad = _check_min_med_max(stats, f"{where} stats")
    if bad:
        return bad
    extra = entry.get("extra_info", {})
    if not isinstance(extra, dict):
        return f"{where} extra_info is a {type(extra).__name__}, not an object"
    return None


def _check_device_ms(extra: Mapping[str, Any]) -> str | None:
    dm = extra.get("device_ms")
    if not isinstance(dm, dict):
        return "extra_info.device_ms is missing"
    return _check_min_med_max(dm, "extra_info.device_ms")


def _check_min_med_max(d: Mapping[str, Any], label: str) -> str | None:
    """Why ``d``'s min/median/max timings are unusable (None when finite, >= 0 and ordered)."""
    for k in ("min", "median", "max"):
        if not finite(d.get(k)) or d[k] < 0:
            return f"{label}.{k} = {d.get(k)!r}; expected a finite number >= 0"
    if not d["min"] <= d["median"] <= d["max"]:
        return f"{label} are inconsistent: min {d['min']}, median {d['median']}, max {d['max']}"
    return None


def check_time_to_find(value: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The valid figures of an ``extra_info["time_to_find"]`` (corpus fingerprint -> ``{"cases", "seconds",
    "found"}``, tests/bench/test_bench_explore.py) and why each invalid one was dropped."""
    if not isinstance(value, dict):
        return {}, [f"extra_info.time_to_find is a {type(value).__name__}, not an object"]
    good: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for fp, fig in value.items():
        where = f"extra_info.time_to_find[{fp!r}]"
        if not isinstance(fig, dict):
            bad.append(f"{where} is a {type(fig).__name__}, not an object")
            continue
        cases, seconds, found = fig.get("cases"), fig.get("seconds"), fig.get("found")
        if not isinstance(cases, int) or isinstance(cases, bool) or cases < 0:
            bad.append(f"{where}.cases = {cases!r}; expected an integer >= 0")
        elif not finite(seconds) or seconds < 0:
            bad.append(f"{where}.seconds = {seconds!r}; expected a finite number >= 0")
        elif not isinstance(found, bool):
            bad.append(f"{where}.found = {found!r}; expected true or false")
        else:
            good[str(fp)] = {"cases": cases, "seconds": float(seconds), "found": found}
    return good, bad


def load_run(path: Path, storage: Path) -> tuple[Run | None, list[Problem]]:
    """Parse and validate one saved run; bad entries are dropped with a :class:`Problem` each."""
    rel = str(path.relative_to(storage)) if path.is_relative_to(storage) else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(rel, f"cannot read: {exc}")]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(rel, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); skipped")]
    if not isinstance(obj, dict) or not isinstance(obj.get("benchmarks"), list):
        return None, [Problem(rel, "not a pytest-benchmark run (no top-level 'benchmarks' list); skipped")]
    when = _parse_when(obj.get("datetime"))
    if when is None:
        return None, [Problem(rel, f"'datetime' = {obj.get('datetime')!r} is not an ISO timestamp; skipped")]
    problems: list[Problem] = []
    good: list[Mapping[str, Any]] = []
    for i, entry in enumerate(obj["benchmarks"]):
        why = _check_benchmark(entry, i)
        if why is not None:
            problems.append(Problem(rel, why + "; entry skipped"))
            continue
        extra = entry.get("extra_info", {})
        if extra.get("schema") == BENCH_SCHEMA:
            why = _check_device_ms(extra)
            if why is not None:
                problems.append(Problem(rel, f"{entry['fullname']}: {why}; using pytest-benchmark's stats instead"))
                entry = {**entry, "extra_info": {k: v for k, v in extra.items() if k != "device_ms"}}
        if "time_to_find" in extra:
            figures, why_not = check_time_to_find(extra["time_to_find"])
            problems += [Problem(rel, f"{entry['fullname']}: {w}; that figure skipped") for w in why_not]
            entry = {**entry, "extra_info": {**entry.get("extra_info", {}), "time_to_find": figures}}
        good.append(entry)
    if not good:
        problems.append(
            Problem(rel, "no usable benchmark entries (was the run made with --benchmark-disable?); skipped")
        )
        return None, problems
    commit_info = obj.get("commit_info") if isinstance(obj.get("commit_info"), dict) else {}
    commit = str(commit_info.get("id") or "")
    machine = str(path.parent.relative_to(storage)) if path.is_relative_to(storage) else "."
    return Run(rel, machine, when, commit, tuple(good)), problems


def load_runs(storage: Path | str) -> tuple[list[Run], list[Problem]]:
    """All valid runs under ``storage`` (recursively), oldest first, and the problems met on the way."""
    storage = Path(storage)
    if not storage.is_dir():
        raise FileNotFoundError(
            f"benchmark storage {str(storage)!r} is not a directory; pass the DIR given to --benchmark-storage"
        )
    runs: list[Run] = []
    problems: list[Problem] = []
    for path in sorted(storage.rglob("*.json")):
        if path.name == "summary.json":  # a matrix report kept next to the runs is not a run
            continue
        run, probs = load_run(path, storage)
        problems.extend(probs)
        if run is not None:
            runs.append(run)
    runs.sort(key=lambda r: (r.when, r.path))
    return runs, problems


# --------------------------------------------------------------------------- matrix summary
def load_matrix_summary(path: Path | str | None) -> tuple[dict[str, Any] | None, str]:
    """The matrix report's ``summary.json`` (``path`` is the file or its directory), validated, and a note.

    Validation is :func:`harness.report.load_summary`'s (the schema's owner).  Returns
    ``(None, reason)`` when there is none or it is malformed; the page then says so.
    """
    from harness.report import SummaryError, load_summary  # noqa: PLC0415

    if path is None:
        return None, "no matrix report (pass --matrix DIR_OR_SUMMARY_JSON)"
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    try:
        return load_summary(p), str(p)
    except (SummaryError, OSError) as exc:
        return None, f"no matrix report: {exc}"
