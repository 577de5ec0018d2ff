"""``python -m harness matrix``: every available op and backend through every layout class, then a report.

What it does:

1. selects the targets (``--ops`` patterns, default every ``linear`` and ``attention`` target,
   plus ``--plugin`` FP8 linears and ``--attn-plugin`` attention functions) and their layout
   classes (``--classes`` patterns): each (target, class) pair is a *cell*;
2. picks the device without initialising CUDA here (``auto``: a subprocess probe; the GPU when
   there is one, else the CPU) and starts a :class:`~harness.runner.pool.WorkerPool` there
   (:func:`~harness.runner.devices.default_workers` per device unless ``--workers``);
3. submits cases round-robin over the cells -- case 0 of every cell, then case 1 of every
   cell, ... -- so a short budget still covers as many cells as it can.  ``--time-budget``
   bounds the whole run, start-up included: when it is spent nothing more is submitted and
   every case still queued or running is dropped (round 0 included: cells that got no case
   are reported as *not reached*, never as passing), without waiting for faults' attribution
   reruns; the wrap-up after that (stopping the pool, the final reports) is bounded by
   :data:`WRAPUP_BOUND_S`, so the run ends within ``budget + WRAPUP_BOUND_S`` (the summary's
   ``wrapup_s`` is the time it took).  Case *i* of a cell is deterministic
   (``CaseFactory.build``); ``--seed`` shifts to another set.  A target whose first result is
   ``unavailable`` is dropped, with its reason;
   Grid cases go without an attribution rerun; each cell's device-fault example is attributed beside the
   run (``WorkerPool.attribute_result``) and its case file rewritten with the result;
4. writes each cell's example case file per non-pass verdict (``DIR/cases/``; the worst-ratio
   case for drift) as soon as the verdict is known, and rewrites ``DIR/summary.json``,
   ``DIR/report.md`` and ``DIR/report.html`` (see :mod:`harness.report`) at the start, every
   :data:`REPORT_EVERY_S` seconds (less often when a rewrite takes more than :data:`REPORT_SHARE` of that)
   and at the end, each atomically (unique temp file + rename):
   an interrupted run (Ctrl-C, SIGTERM -- both turned into an orderly stop --, an exception in
   the harness) keeps everything found so far and its report says it was interrupted and why.
   A case file that cannot be written is a one-line warning in the report, not the end of the
   run.  Failures are matched against the regression corpus by fingerprint
   ``op|layout_class|verdict``.

``--out DIR`` must be a new or empty folder: a non-empty one (an earlier run?) is refused
unless ``--force``, which writes into it alongside what is there: ``summary.json`` and the two
reports are replaced; a case file whose name ``cases/OP-CLASS-VERDICT.json`` is already taken
is written as ``OP-CLASS-VERDICT-2.json`` (``-3``, ...); nothing else is touched, and the matrix
never deletes or overwrites a case file it did not write.

Exit status: 0 when the run completed (whatever it found); with ``--fail-on-new``, 1 when some
failure's fingerprint is not in the corpus; 1 too when some case is ``unsupported`` (the harness
could not call a plug-in as the case needs); 2 for bad arguments, a ``--plugin`` that does not
load, or no usable device; 3 when the run did not complete (interrupted, budget spent before any
case, or no case ran) -- the partial report is written anyway.  A bug in the harness itself: see
:mod:`harness.cli`.

Failing verdicts are those outside :data:`harness.verdicts.BENIGN`, plus ``rejected`` for
targets that promise to accept every layout (``accepts_all_layouts``: ``fp8_linear``,
``safe_attn.*``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Mapping, Sequence, TextIO

__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_OUT",
    "REPORT_EVERY_S",
    "REPORT_SHARE",
    "WRAPUP_BOUND_S",
    "MatrixError",
    "Cell",
    "select_targets",
    "is_failure",
    "aggregate",
    "find_new_failures",
    "run_matrix",
    "add_parser",
    "main",
]

DEFAULT_BUDGET_S = 180.0
#: The share of the budget the layout-class grid gets when the exploration follows it (the rest explores).
DEFAULT_GRID_SHARE = 0.4
#: A run bounded by ``cases_per_cell`` explores at most this many drawn cases per op per round.
EXPLORE_CASES_PER_ROUND = 20
DEFAULT_OUT = "matrix-out"
DEFAULT_CASE_TIMEOUT_S = 120.0  # first calls may JIT-compile Triton kernels (SageAttention)
MATRIX_KINDS = ("linear", "attention")
REPORT_EVERY_S = 5.0  # the reports are rewritten this often while the run goes
REPORT_SHARE = 0.05  # ... or less often, so that rewriting them takes at most this share of the run
POOL_CLOSE_WAIT_S = 5.0  # the wrap-up waits this long for the pool to stop, then goes on without it
#: after the budget is spent: stopping the pool (bounded above) plus the final reports (well under a second)
WRAPUP_BOUND_S = POOL_CLOSE_WAIT_S + 3.0


class MatrixError(RuntimeError):
    """The matrix cannot run as asked (unknown op pattern, no device); the message says how to fix it."""


# ------------------------------------------------------------------------------ cells and verdicts


@dataclass
class Cell:
    """One (target, layout class) pair and everything its results said."""

    op: str
    kind: str
    layout_class: str
    factory: Any = field(repr=False, default=None)
    accepts_all_layouts: bool = False
    counts: collections.Counter = field(default_factory=collections.Counter)
    #: verdict -> (case, result) kept as the example (first seen; for drift the worst ratio)
    examples: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    worst: tuple[float, Any, Any] | None = None  # (ratio, case, result)
    min_sqnr_db: float | None = None
    submitted: int = 0
    unavailable: str | None = None
    #: verdict -> (the example case written, its path relative to the output folder)
    saved: dict[str, tuple[Any, str]] = field(default_factory=dict)
    #: verdict -> the example case whose write was last tried (a failed write is not retried every report)
    tried: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.op, self.layout_class

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def add(self, case: Any, result: Any) -> bool:
        """Count ``result``; True when it became the cell's example for its verdict (to be written)."""
        v = result.verdict.value
        self.counts[v] += 1
        m = result.metrics or {}
        ratio = _worst_of(result)["ratio"]
        if ratio is not None and (self.worst is None or ratio > self.worst[0]):
            self.worst = (ratio, case, result)
        sq = _num(m.get("sqnr_db"))
        if sq is not None and (self.min_sqnr_db is None or sq < self.min_sqnr_db):
            self.min_sqnr_db = sq
        if v == "pass":
            return False
        old = self.examples.get(v)
        if old is None or (v == "drift" and (ratio or 0) > (_worst_of(old[1])["ratio"] or 0)):
            self.examples[v] = (case, result)
            return True
        return False


def _worst_of(result: Any) -> dict[str, Any]:
    """The bound check a result reports: the layout check for ``layout_noninvariance``, else drift.

    ``ratio`` = err / allowed (inf when bitwise equality was expected and not met; None when the
    result carries no bound check, e.g. ``rejected``).
    """
    m, b = result.metrics or {}, result.bound or {}
    if result.verdict.value == "layout_noninvariance":
        if "layout_ratio" in m:
            return {
                "metric": f"layout {b.get('metric', 'max_abs')}",
                "err": m.get("layout_err"),
                "allowed": m.get("layout_allowed"),
                "ratio": _num(m.get("layout_ratio")),
                "why": b.get("why", ""),
            }
        err = _num(m.get("layout_max_abs"))
        return {
            "metric": "layout max_abs",
            "err": err,
            "allowed": 0.0,
            "ratio": math.inf if err is None or err > 0 else 0.0,
            "why": b.get("why", "bitwise equal expected"),
        }
    return {
        "metric": b.get("metric", "max_abs"),
        "err": m.get("err"),
        "allowed": m.get("allowed"),
        "ratio": _num(m.get("ratio")),
        "why": b.get("why", ""),
    }


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    return None


def is_failure(verdict: str, accepts_all_layouts: bool = False) -> bool:
    """Does ``verdict`` count as a failure? (not benign; ``rejected`` too for ops that accept every layout)."""
    from harness.verdicts import BENIGN, Verdict

    v = Verdict.parse(verdict)
    if v is Verdict.REJECTED:
        return accepts_all_layouts
    return v not in BENIGN


def find_new_failures(cells: Iterable[Mapping[str, Any]], known: set[str]) -> list[dict[str, Any]]:
    """Failing (cell, verdict) pairs of summary ``cells`` whose fingerprint is not in ``known``
    and that no named kernel defect explains (``cell["kernel_defects"]``)."""
    from harness.targets.corpus import fingerprint

    out = []
    for c in cells:
        for verdict in sorted(c.get("failing", [])):
            fp = fingerprint(c["op"], c["layout_class"], verdict)
            if fp not in known and verdict not in c.get("kernel_defects", {}):
                out.append(
                    {
                        "op": c["op"],
                        "layout_class": c["layout_class"],
                        "verdict": verdict,
                        "case": c.get("examples", {}).get(verdict, ""),
                        "fingerprint": fp,
                    }
                )
    return out


# ------------------------------------------------------------------------------ target selection


def select_targets(patterns: Sequence[str] | None = None) -> list[Any]:
    """Targets of kind linear/attention with layout classes, filtered by fnmatch ``patterns`` (names)."""
    from harness.runner.targets import all_targets

    pool = [t for t in all_targets().values() if getattr(t, "kind", "") in MATRIX_KINDS]
    if not patterns:
        return pool
    chosen: list[Any] = []
    for pat in patterns:
        hits = [t for t in pool if fnmatch.fnmatchcase(t.name, pat)]
        if not hits:
            names = ", ".join(t.name for t in pool)
            raise MatrixError(f"--ops pattern {pat!r} matches no target; known: {names}")
        chosen += [t for t in hits if t not in chosen]
    return chosen


def _build_cells(targets: Sequence[Any], classes: Sequence[str] | None = None) -> list[Cell]:
    """Cells in submission order: class 0 of every target, class 1 of every target, ...

    ``classes``: fnmatch patterns of layout class names to keep (None: all); a pattern that
    matches no class of any target is an error.
    """
    per_target = []
    for t in targets:
        table = t.layout_classes()
        if classes:
            table = {n: f for n, f in table.items() if any(fnmatch.fnmatchcase(n, p) for p in classes)}
        per_target.append(
            [Cell(t.name, t.kind, name, f, bool(getattr(t, "accepts_all_layouts", False))) for name, f in table.items()]
        )
    if classes:
        have = {c.layout_class for p in per_target for c in p}
        for pat in classes:
            if not any(fnmatch.fnmatchcase(n, pat) for n in have):
                known = sorted({n for t in targets for n in t.layout_classes()})
                raise MatrixError(
                    f"--classes pattern {pat!r} matches no layout class of the selected ops; known: {', '.join(known)}"
                )
    cells = []
    for i in range(max((len(p) for p in per_target), default=0)):
        cells += [p[i] for p in per_target if i < len(p)]
    return cells


# ------------------------------------------------------------------------------ progress


class Progress:
    """Plain-text progress on a stream: a redrawn line on a TTY, a line every ``every`` s otherwise."""

    def __init__(self, stream: TextIO | None, budget: float, every: float = 10.0) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self.budget = budget
        self.every = every
        self.t0 = time.monotonic()
        self.last = -math.inf

    def update(
        self,
        done: int,
        cells_done: int | Callable[[], int],
        n_cells: int,
        totals: Mapping[str, int],
        unavailable: int,
        force: bool = False,
    ) -> None:
        """``cells_done``: a count, or a function that counts (called only when a line is written)."""
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        if callable(cells_done):
            cells_done = cells_done()
        el = now - self.t0
        frac = min(1.0, el / self.budget) if self.budget > 0 else 1.0
        bar = "#" * int(frac * 20)
        fails = {k: v for k, v in totals.items() if k != "pass"}
        line = (
            f"[{bar:<20}] {el:5.0f}/{self.budget:.0f}s  {done} cases  cells {cells_done}/{n_cells}  "
            f"pass {totals.get('pass', 0)}"
            + "".join(f"  {k} {v}" for k, v in sorted(fails.items()))
            + (f"  unavailable targets {unavailable}" if unavailable else "")
        )
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------ environment


def _device_env(devices: Sequence[str], timeout: float = 120.0) -> dict[str, Any]:
    """Versions and device identity for the report header, from a subprocess (no CUDA here; in this process on a
    CPU-only torch: :func:`harness.env.collect_env_isolated`), within ``timeout`` s."""
    import platform

    env: dict[str, Any] = {}
    try:
        from harness.env import collect_env_isolated

        env = collect_env_isolated(timeout=timeout, backends=False)
    except Exception as e:  # noqa: BLE001 - the header is informative; the run must not die for it
        import torch

        env = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "probe_error": f"{type(e).__name__}: {e}",
        }
    used = "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"
    env["used"] = used
    env["devices_used"] = list(devices)
    if used == "cpu":
        env["name"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        env["capability"] = None
    else:
        n = sum(1 for d in devices if d.startswith("cuda"))
        env["name"] = f"{n} x {env.get('device')}" if n > 1 else env.get("device")
    return env


def _resolve_device(device: str) -> list[str]:
    from harness.runner.pool import probe_cuda, probe_devices

    if device == "cpu":
        return ["cpu"]
    found = probe_devices()
    if device == "auto":
        return found or ["cpu"]
    if device == "cuda":
        if not found:
            info = probe_cuda()
            raise MatrixError(
                f"--device cuda but no CUDA device is visible ({info.get('error') or 'count 0'}); "
                "use --device cpu or auto"
            )
        return found
    if device.startswith("cuda:"):
        if device not in found:
            raise MatrixError(f"--device {device}: visible CUDA devices are {found or 'none'}")
        return [device]
    raise MatrixError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------ aggregation


def _rel(path: str | os.PathLike | None, out: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def _example_stem(cell: Cell, verdict: str, keep: Container[str]) -> str:
    """``OP-CLASS-VERDICT`` (dots as ``_``), or with ``-2``, ``-3``, ... when ``keep`` (names of files that were
    in ``cases/`` before this run) holds that case file: the matrix never overwrites a file it did not write."""
    base = re.sub(r"[^0-9A-Za-z-]", "_", f"{cell.op}-{cell.layout_class}-{verdict}")
    stem, n = base, 1
    while f"{stem}.json" in keep or f"{stem}.safetensors" in keep:
        n += 1
        stem = f"{base}-{n}"
    return stem


def save_example(cell: Cell, verdict: str, out: Path, keep: Container[str] = ()) -> str | None:
    """Write ``cell``'s example case for ``verdict`` to ``out/cases`` now (never over a file named in ``keep``).

    Returns None, or a one-line warning when it could not be written (the cell then links no case
    for that verdict); never raises for a failed write.
    """
    from harness.runner.pool import save_failure

    case, result = cell.examples[verdict]
    cell.tried[verdict] = case
    try:
        path = save_failure(case, result, out / "cases", name=_example_stem(cell, verdict, keep))
    except Exception as e:  # noqa: BLE001 - one unwritable case must not end the run; it is reported
        cell.saved.pop(verdict, None)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"could not write the {verdict} case of {cell.op} x {cell.layout_class}: {type(e).__name__}: {first}"
    cell.saved[verdict] = (case, _rel(path, out) or "")
    return None


def aggregate(
    cells: Sequence[Cell],
    out: Path,
    known: set[str],
    *,
    save_examples: bool = True,
    warnings: list[str] | None = None,
    keep: Container[str] = (),
) -> dict[str, Any]:
    """Summary ``cells`` list (see :mod:`harness.report`).

    ``save_examples``: first write every example case not written yet (:func:`save_example`, never
    over a file named in ``keep``; a failed write appends its warning to ``warnings``).
    """
    from harness.targets import known_defect_of
    from harness.targets.corpus import fingerprint

    rows = []
    for c in cells:
        examples: dict[str, str] = {}
        messages: dict[str, str] = {}
        for verdict, (case, result) in sorted(c.examples.items()):
            messages[verdict] = (result.message or "").strip().splitlines()[0][:500] if result.message else ""
            if save_examples and c.tried.get(verdict) is not case:
                why = save_example(c, verdict, out, keep)
                if why and warnings is not None and why not in warnings:
                    warnings.append(why)
            if c.saved.get(verdict, (None,))[0] is case:
                examples[verdict] = c.saved[verdict][1]
        failing = sorted(v for v in c.counts if is_failure(v, c.accepts_all_layouts))
        if c.unavailable is not None and c.cases == 0:
            status = "unavailable"
        elif c.cases == 0:
            status = "not_run"
        elif failing:
            status = "fail"
        elif any(v != "pass" for v in c.counts if v != "unavailable"):
            status = "nonpass"
        else:
            status = "pass"
        worst = None
        if c.worst is not None:
            ratio, case, result = c.worst
            v = result.verdict.value
            worst = dict(
                _worst_of(result),
                verdict=v,
                min_sqnr_db=c.min_sqnr_db,
                case=examples.get(v) if c.examples.get(v, (None,))[0] is case else None,
            )
        counts = {k: n for k, n in sorted(c.counts.items())}
        # a kernel defect the target itself names (Target.known_defect, from the result's data) explains
        # its example case: reported with its description, not as a new failure
        defects = {}
        for v in failing:
            if v in c.examples:
                ex_case, ex_result = c.examples[v]
                why = known_defect_of(ex_case, ex_result)
                if why:
                    defects[v] = why
        rows.append(
            {
                "op": c.op,
                "kind": c.kind,
                "layout_class": c.layout_class,
                "status": status,
                "cases": c.cases,
                "counts": counts,
                "reason": c.unavailable or "",
                "worst": worst,
                "examples": examples,
                "messages": messages,
                "failing": failing,
                "new": [v for v in failing if fingerprint(c.op, c.layout_class, v) not in known and v not in defects],
                "known": [v for v in failing if fingerprint(c.op, c.layout_class, v) in known or v in defects],
                "kernel_defects": defects,
                "attribution": _attributions(c),
            }
        )
    return {"cells": rows}


def _attributions(cell: Cell) -> dict[str, str]:
    """Who faulted in each example case, in one line (:func:`harness.report.attribution_text`)."""
    from harness.report import attribution_text

    texts = {v: attribution_text(r.attribution) for v, (_, r) in sorted(cell.examples.items())}
    return {v: t for v, t in texts.items() if t}


# ------------------------------------------------------------------------------ the run


def _register_plugins(plugins: Sequence[str], attn_plugins: Sequence[str]) -> list[str]:
    """Register plug-in targets here and, through the environment, in every worker; returns their names."""
    from harness.targets import ATTN_PLUGINS_ENV, PLUGINS_ENV, register_attention_plugin, register_plugin

    names = []
    for specs, var, reg in (
        (plugins, PLUGINS_ENV, register_plugin),
        (attn_plugins, ATTN_PLUGINS_ENV, register_attention_plugin),
    ):
        if not specs:
            continue
        try:
            names += [reg(spec, probe=True) for spec in specs]  # a plug-in that does not load: one line, exit 2
        except ValueError as e:
            raise MatrixError(str(e)) from None
        prior = [s for s in os.environ.get(var, "").split(",") if s.strip()]
        os.environ[var] = ",".join(dict.fromkeys(prior + list(specs)))  # spawned workers inherit it
    return names


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder without ``force`` (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise MatrixError(f"--out {out} is an existing file; pass a folder for the reports")
    if out.is_dir() and not force and any(out.iterdir()):
        raise MatrixError(
            f"--out {out} is not empty (an earlier run?); pass a new folder, or --force to write "
            "alongside (replaces summary.json and the reports; deletes or overwrites no case file)"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MatrixError(f"--out {out}: {parent} is a file, not a folder")
            break


class _Stop:
    """SIGTERM and the first Ctrl-C ask for an orderly stop (``reason``); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.reason = ""
        self.signalled = False  # the reason is a signal's (not :meth:`end`'s)
        self._old: dict[int, Any] = {}

    def end(self, reason: str) -> None:
        """Stop the run in order for ``reason`` (e.g. every device's GPU needs a reset), as a signal would."""
        self.reason = self.reason or reason

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.reason:
            self.reason, self.signalled = signal.Signals(signum).name, True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _close_pool(pool: Any, wait_s: float) -> str | None:
    """``pool.close(cancel_pending=True)``, waited for at most ``wait_s``; a warning when it did not finish."""
    errors: list[BaseException] = []

    def close() -> None:
        try:
            pool.close(cancel_pending=True)
        except BaseException as e:  # noqa: BLE001 - reported as a warning below
            errors.append(e)

    t = threading.Thread(target=close, name="matrix-pool-close", daemon=True)
    t.start()
    t.join(wait_s)
    if t.is_alive():
        return f"the worker pool did not stop within {wait_s:g} s; its workers are left to the exit handlers"
    if errors:
        return f"stopping the worker pool failed: {type(errors[0]).__name__}: {errors[0]}"
    return None


def run_matrix(
    *,
    device: str = "auto",
    time_budget: float = DEFAULT_BUDGET_S,
    ops: Sequence[str] | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    workers: int | None = None,
    cases_per_cell: int | None = None,
    classes: Sequence[str] | None = None,
    size: str = "small",
    seed: int = 0,
    corpus: str | os.PathLike | None = None,
    case_timeout: float = DEFAULT_CASE_TIMEOUT_S,
    plugins: Sequence[str] = (),
    attn_plugins: Sequence[str] = (),
    attribute: bool = True,
    progress: TextIO | None = sys.stderr,
    command: str = "",
    pool_factory: Callable[..., Any] | None = None,
    force: bool = False,
    started_at: float | None = None,
    shard: str | None = None,
    explore: bool = True,
    grid_share: float = DEFAULT_GRID_SHARE,
    explore_cases: int | None = None,
    large_offsets: bool | None = None,
) -> dict[str, Any]:
    """Run the matrix and write the reports into ``out``; returns the summary as written to ``summary.json``.

    ``cases_per_cell`` caps the rounds (None: until the budget ends).  ``pool_factory`` (tests)
    replaces :class:`~harness.runner.pool.WorkerPool`.  ``started_at``: the ``time.monotonic()``
    the budget counts from (default: now).  An exception in the harness is re-raised after the
    partial report is written.  ``shard`` (``"I/N"``) keeps this machine's share of the cells
    (:mod:`harness.shard`); ``python -m harness merge`` joins the shards' outputs.

    ``explore``: after the grid, explore each op for the rest of the budget (:mod:`harness.matrix_explore`);
    the grid then has ``grid_share`` of the budget (it ends sooner when ``cases_per_cell`` rounds are done).
    ``explore_cases``: drawn cases per op at most (None: the time decides, or ``EXPLORE_CASES_PER_ROUND``
    per round when ``cases_per_cell`` bounds the run).  ``large_offsets``: the exploration's rare draw of a view whose
    largest element offset passes 2**31 (None: on CUDA, sized from half the device's memory; off on CPU).
    """
    t0 = time.monotonic() if started_at is None else started_at
    if not (isinstance(time_budget, (int, float)) and time_budget > 0):  # also refuses NaN
        raise MatrixError(f"--time-budget {time_budget!r} must be > 0 seconds (the whole run, start-up included)")
    if cases_per_cell is not None and cases_per_cell < 1:
        raise MatrixError(f"--cases-per-cell {cases_per_cell} must be >= 1")
    if size not in ("small", "wan"):
        raise MatrixError(f"--size {size!r}: use small or wan")
    if workers is not None and workers < 1:
        raise MatrixError(f"--workers {workers} must be >= 1")
    if not (isinstance(grid_share, (int, float)) and 0 < grid_share <= 1):
        raise MatrixError(f"--grid-share {grid_share!r} must be in (0, 1]: the share of the budget the grid gets")
    if explore_cases is not None and explore_cases < 1:
        raise MatrixError(f"--explore-cases {explore_cases} must be >= 1 (or use --no-explore)")
    if explore_cases is None and cases_per_cell is not None:
        explore_cases = EXPLORE_CASES_PER_ROUND * cases_per_cell
    out_dir = Path(out)
    _prepare_out(out_dir, force)
    if corpus is not None and not Path(corpus).is_dir():
        what = "is a file" if Path(corpus).exists() else "does not exist"
        raise MatrixError(f"--corpus {corpus} {what}; pass the regression corpus folder (default tests/cases)")
    # torch comes in with these: the checks above answer a wrong argument before it is imported (~2.5 s here)
    from harness.contract import infer_contracts, measured_on, record_of, write_contracts
    from harness.report import speed_record, write_reports
    from harness.targets.corpus import DEFAULT_CORPUS, load_corpus
    from harness.verdicts import POOL_CLOSED, Result, Verdict

    plugin_names = _register_plugins(plugins, attn_plugins)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    deadline = t0 + float(time_budget)
    targets = select_targets(list(ops) + plugin_names if ops else None)
    cells = _build_cells(targets, classes)
    if not cells:
        raise MatrixError("no (op, layout class) cell selected: check --ops / --classes")
    shard_record = None
    if shard is not None:  # this machine's share; an empty share still writes its (empty) summary for merge
        from harness.shard import shard_record as _shard_record

        cells, shard_record = _shard_record(shard, cells)
    devices = _resolve_device(device)
    from harness.runner.devices import default_workers

    n_workers = workers or default_workers(devices, size)
    entries = load_corpus(DEFAULT_CORPUS if corpus is None else corpus)
    known = {e.fingerprint for e in entries}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MatrixError(f"--out {out_dir}: cannot create the folder: {e.strerror or e}") from None
    cases_dir = out_dir / "cases"
    keep = frozenset(p.name for p in cases_dir.iterdir()) if cases_dir.is_dir() else frozenset()  # --force
    stop = _Stop()  # from here on SIGTERM / Ctrl-C end the run in order, with its report
    stop.install()
    # the environment probe (a child interpreter, ~1 s) runs while the pool's workers start; joined before the first
    # report is written (``env`` is filled in place: the summary reads it)
    env: dict[str, Any] = {}
    env_probe: dict[str, Any] = {}
    probe_timeout = max(1.0, deadline - time.monotonic())
    probe_thread = threading.Thread(
        target=lambda: env_probe.update(_device_env(devices, timeout=probe_timeout)), name="matrix-env", daemon=True
    )
    probe_thread.start()

    def join_env() -> None:
        if not env:
            probe_thread.join(probe_timeout + 5)
            env.update(env_probe or _device_env(devices, timeout=1.0))

    by_target: dict[str, list[Cell]] = collections.defaultdict(list)
    for c in cells:
        by_target[c.op].append(c)
    unavailable: dict[str, str] = {}
    totals: collections.Counter = collections.Counter()
    contract_records: list[dict[str, Any]] = []  # harness.contract.record_of per result, for contracts.json
    by_device: collections.Counter = collections.Counter()  # cases answered per device (the spread)
    warnings: list[str] = []
    prog = Progress(progress, time_budget)
    done = 0
    budget_exhausted = False
    offset = int(seed) * 1_000_000
    pool: Any = None
    cases_done_at: float | None = None
    first_result_at: float | None = None  # when the first result was counted (the run's start-up ends there)

    def warn(msg: str) -> None:
        if msg not in warnings:
            warnings.append(msg)
            if progress is not None:
                progress.write(f"\nmatrix: warning: {msg}\n")

    if device == "auto" and devices == ["cpu"]:  # a GPU the driver lists but CUDA cannot use: say so, run on
        from harness.runner.devices import probe_cuda

        why = probe_cuda().get("error") or ""
        if why.startswith("nvidia-smi lists"):
            warn(f"--device auto runs on the CPU: {why}")

    def cell_open(c: Cell, rnd: int) -> bool:
        return c.op not in unavailable and (cases_per_cell is None or rnd < cases_per_cell)

    lock = threading.Lock()  # the exploration's threads count their results too
    phase: Any = None
    save_explored = None

    def count(case: Any, r: Any) -> bool:
        """Count a result in the totals, the spread and the contract records; False for what is not a result."""
        if r.verdict is Verdict.ERROR and (r.message or "").startswith(POOL_CLOSED):
            return False  # cancelled at the end of the budget
        if stop.signalled and r.verdict is Verdict.WORKER_CRASH:
            return False  # after a stop signal a dead worker is the signal's doing (Ctrl-C reaches workers)
        if r.verdict is Verdict.ERROR and (r.message or "").startswith("worker start failed") and pool_lost():
            return False  # no worker could start on a GPU that needs a reset: the run's end says so, not each op
        nonlocal first_result_at
        if first_result_at is None:
            first_result_at = time.monotonic()
        totals[r.verdict.value] += 1
        by_device[r.device or "unknown"] += 1
        contract_records.append(record_of(case, r))
        return True

    def pool_lost() -> bool:
        lost = getattr(pool, "broken_devices", None) or {}
        return bool(devices) and all(d in lost for d in devices)

    def handle(c: Cell, case: Any, r: Any) -> None:
        with lock:
            _handle(c, case, r)

    def _handle(c: Cell, case: Any, r: Any) -> None:
        nonlocal done
        done += 1
        if r.verdict is Verdict.UNAVAILABLE:
            reason = (r.message or "unavailable").strip().splitlines()[0]
            if c.op not in unavailable:
                unavailable[c.op] = reason
            for other in by_target[c.op]:
                other.unavailable = unavailable[c.op]
            return
        if count(case, r) and c.add(case, r):  # a new example: on disk now, so an interrupted run keeps it
            why = save_example(c, r.verdict.value, out_dir, keep)
            if why:
                warn(why)
            if r.verdict is Verdict.DEVICE_FAULT and attr_exec is not None:
                attr_exec.submit(attribute_example, c, case, r)

    def attribute_example(c: Cell, case: Any, r: Any) -> None:
        """The attribution rerun of a cell's device-fault example, beside the grid (grid cases are submitted
        without one, so a rerun in a fresh interpreter never holds up the cases behind it); the example is
        rewritten with it.  The pool's close at the end of the budget cancels a rerun still going."""
        try:
            if attr_closing.is_set():  # the run ended before this rerun started: say so on the example
                from harness.runner.pool import ATTRIBUTION_SKIPPED

                attributed = dataclasses.replace(r, attribution=dict(r.attribution or {}, skipped=ATTRIBUTION_SKIPPED))
            else:
                attributed = pool.attribute_result(case, r)
        except Exception as e:  # noqa: BLE001 - the example keeps its verdict; the rerun's failure is reported
            warn(f"attributing the device fault of {c.op} x {c.layout_class} failed: {type(e).__name__}: {e}")
            return
        with lock:
            if c.examples.get(r.verdict.value, (None, None))[0] is case:
                c.examples[r.verdict.value] = (case, attributed)
                why = save_example(c, r.verdict.value, out_dir, keep)
                if why:
                    warn(why)

    def handle_explored(case: Any, r: Any) -> None:
        nonlocal done
        with lock:  # an unavailable op's search ends on it; its row says so
            if r.verdict is not Verdict.UNAVAILABLE and count(case, r):
                done += 1

    def explore_section() -> dict[str, Any]:
        nonlocal save_explored
        if not explore:
            return {"enabled": False}
        if phase is None:
            return {"enabled": True, "status": "not started (the grid runs first)", "ops": {}, "corpus": []}
        if save_explored is None:
            from harness.matrix_explore import save_into

            save_explored = save_into(out_dir, keep, warn)
        return {"enabled": True, "status": "running" if phase.running() else "done", **phase.summary(save_explored)}

    def summary(status: str, interrupted: str = "") -> dict[str, Any]:
        with lock:  # the exploration's threads add results while the main thread writes the report
            return _summary(status, interrupted)

    def _summary(status: str, interrupted: str = "") -> dict[str, Any]:
        from harness.matrix_explore import new_findings

        agg = aggregate(cells, out_dir, known, warnings=warnings, keep=keep)
        ex = explore_section()
        now = time.monotonic()
        return {
            "schema_version": 1,
            "kind": "harness.matrix.summary",
            "started_at": started,
            "duration_s": round(now - t0, 3),
            "wrapup_s": round(now - cases_done_at, 3) if cases_done_at is not None else 0.0,
            "budget_s": float(time_budget),
            "budget_exhausted": budget_exhausted,
            "completed": status == "completed",
            "status": status,
            "interrupted": interrupted,
            "warnings": list(warnings),
            "command": command,
            "size": size,
            "seed": seed,
            "workers": n_workers,
            "device": env,
            "totals": dict(sorted(totals.items())),
            "cases_by_device": dict(sorted(by_device.items())),
            "workers_replaced": len(getattr(pool, "replaced", ())),
            "speed": speed_record(
                sum(totals.values()), t0, first_result_at, now if cases_done_at is None else cases_done_at
            ),
            "corpus": str(corpus) if corpus is not None else "tests/cases",
            "known_failures": len(known),
            "layout_classes": _class_order(targets),
            "cells": agg["cells"],
            "unavailable": [{"op": op, "reason": why} for op, why in sorted(unavailable.items())],
            "new_failures": find_new_failures(agg["cells"], known) + new_findings(ex),
            "explore": ex,
            **({"shard": shard_record} if shard_record is not None else {}),
        }

    def final_summary(status: str, interrupted: str = "") -> dict[str, Any]:
        """The last summary, with the layout contracts inferred from every result (also written as contracts.json;
        inferred once here, not on every rewrite while the run goes)."""
        s = summary(status, interrupted)
        contracts = infer_contracts(contract_records, measured_on(env), "python -m harness matrix")
        s["contracts"] = contracts["contracts"]  # harness.contract: one layout contract per op (report section)
        try:
            write_contracts(out_dir, contracts)  # DIR/contracts.json
        except OSError as e:
            warn(f"contracts.json not written: {e}")
            s["warnings"] = list(warnings)
        return s

    interrupted = ""
    error: Exception | None = None
    inflight: dict[Future, tuple[Cell, Any]] = {}
    attr_exec: ThreadPoolExecutor | None = None  # attribution reruns of the grid's device-fault examples
    attr_closing = threading.Event()
    try:
        try:
            factory = pool_factory
            if factory is None:
                from harness.runner.pool import WorkerPool

                factory = WorkerPool
            pool = factory(devices, workers_per_device=n_workers, case_timeout=case_timeout, attribute=attribute)
            join_env()

            last_write = 0.0

            def rewrite() -> float:
                """The running report, rewritten; the seconds until the next rewrite: ``REPORT_EVERY_S``, or more
                when a rewrite takes longer than ``REPORT_SHARE`` of that (it holds the interpreter while the
                workers wait for their next cases)."""
                nonlocal last_write
                t_w = time.monotonic()
                write_reports(summary("running"), out_dir)
                last_write = time.monotonic()
                return max(REPORT_EVERY_S, (last_write - t_w) / REPORT_SHARE)

            def cells_done() -> int:
                return sum(1 for c in cells if c.cases or c.unavailable)

            report_every = rewrite()  # replaces an earlier run's summary (--force) at once
            max_inflight = max(2, 3 * n_workers * len(devices))
            # the real pool attributes on request: grid cases go without, and each cell's device-fault example is
            # attributed beside the run (a pool without attribute_result, e.g. a test double, attributes its own)
            can_defer = hasattr(pool, "attribute_result")
            if attribute and can_defer:
                attr_exec = ThreadPoolExecutor(max_workers=2 * len(devices), thread_name_prefix="harness-matrix-attr")
            submit = (lambda c: pool.submit(c, attribute=False)) if can_defer else pool.submit  # grid and exploration
            rnd = 0
            queue: collections.deque[Cell] = collections.deque()

            def refill() -> bool:
                nonlocal rnd
                while not queue:
                    nxt = [c for c in cells if cell_open(c, rnd)]
                    if not nxt:
                        return False
                    queue.extend(nxt)
                    rnd += 1
                return True

            def devices_lost() -> bool:
                """Whether the run is to stop: a signal, or every device's GPU needs a reset (the pool gave them
                up), which ends the run saying so."""
                if pool_lost():
                    stop.end(pool.broken_devices[devices[0]])
                return bool(stop.reason)

            grid_deadline = t0 + grid_share * float(time_budget) if explore else deadline
            while not devices_lost():
                if time.monotonic() >= deadline:
                    # the budget is spent: whatever is queued or running is dropped, round 0 included (pool
                    # close cancels it and skips the attribution reruns of faults not yet attributed)
                    budget_exhausted = True
                    break
                while (
                    len(inflight) < max_inflight
                    and (time.monotonic() < grid_deadline or (rnd <= 1 and bool(queue)))
                    and refill()
                ):
                    c = queue.popleft()
                    if not cell_open(c, c.submitted):
                        continue
                    case = c.factory.build(offset + c.submitted, size=size)
                    fut = submit(case)
                    c.submitted += 1
                    inflight[fut] = (c, case)
                if not inflight:
                    break
                timeout = min(0.5, max(0.0, deadline - time.monotonic()))
                finished, _ = wait(list(inflight), timeout=timeout, return_when=FIRST_COMPLETED)
                for f in finished:
                    c, case = inflight.pop(f)
                    try:
                        r = f.result()
                    except Exception as e:  # noqa: BLE001 - a lost future is reported, not fatal
                        r = Result(Verdict.ERROR, f"the pool lost this case: {type(e).__name__}: {e}", op=c.op)
                    handle(c, case, r)
                prog.update(done, cells_done, len(cells), totals, len(unavailable))
                if time.monotonic() - last_write >= report_every:
                    report_every = rewrite()
            if explore and not stop.reason and not budget_exhausted:
                from harness.matrix_explore import ExplorePhase, explore_key

                mine = targets
                if shard is not None:
                    from harness.shard import parse_shard

                    sh = parse_shard(shard)
                    mine = [t for t in targets if sh.holds(explore_key(t.name))]
                phase = ExplorePhase(
                    mine,
                    submit,
                    device=devices[0],
                    seed=seed,
                    deadline=deadline,
                    on_result=handle_explored,
                    stop_reason=lambda: stop.reason if devices_lost() else "",  # each search sees a lost GPU too
                    corpus=entries,
                    env=env,
                    selected_ops=[t.name for t in targets],
                    unavailable=unavailable,
                    max_cases=explore_cases,
                    attribute=pool.attribute_result if can_defer and attribute else None,
                    large_offsets=large_offsets,
                    workers=n_workers,
                )
                phase.start()
                while phase.running() and not devices_lost() and time.monotonic() < deadline:
                    phase.wait(min(deadline, time.monotonic() + REPORT_EVERY_S), stopped=devices_lost)
                    prog.update(done, len(cells), len(cells), totals, len(unavailable))
                    if time.monotonic() - last_write >= report_every:
                        report_every = rewrite()
                # the time, not the work, ended the run: a search still going, or one that stopped drawing at its
                # share of the budget (every search is time-bound unless --explore-cases capped it)
                ended = [str(getattr(r, "stopped", "")) for r in list(phase.results.values())]
                timed = ("budget_s", "deadline", "the pool closed")
                if not stop.reason and (phase.running() or any(e.startswith(timed) for e in ended)):
                    budget_exhausted = True
            interrupted = stop.reason
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, but still write what was found
            interrupted = "SIGINT"
        except Exception as e:  # noqa: BLE001 - a harness bug: keep the partial report, then re-raise
            interrupted = f"harness error: {type(e).__name__}: {e}"
            error = e
        finally:
            join_env()  # the pool may have failed before it was joined
            cases_done_at = time.monotonic()
            if interrupted and progress is not None:
                progress.write(f"\nmatrix: interrupted ({interrupted}); writing the partial report\n")
            attr_closing.set()
            if pool is not None:
                why = _close_pool(pool, POOL_CLOSE_WAIT_S)
                if why:
                    warn(why)
                if getattr(pool, "start_fallback", None):
                    warn(f"worker processes were started fresh instead of forked: {pool.start_fallback}")
            if attr_exec is not None:  # the pool is closed: a rerun still going was cancelled (its example says so)
                attr_exec.shutdown(wait=True)
            if phase is not None:  # the pool is closed: each search ends at its next case
                if not phase.wait(time.monotonic() + POOL_CLOSE_WAIT_S):
                    warn("an exploration thread did not end after the pool closed; its op is reported as running")
            for f, (c, case) in list(inflight.items()):  # answered but not yet counted: kept (cancelled: skipped)
                if f.done() and not f.cancelled() and f.exception() is None:
                    handle(c, case, f.result())
            prog.update(
                done,
                sum(1 for c in cells if c.cases or c.unavailable),
                len(cells),
                totals,
                len(unavailable),
                force=True,
            )
            prog.done()

        # a shard whose share is empty completed its (empty) work: merge needs its summary, and it is no failure
        status = "interrupted" if interrupted else ("completed" if done or not cells else "no_results")
        paths = write_reports(final_summary(status, interrupted), out_dir)
    finally:
        stop.restore()
    if error is not None:
        raise error
    return json.loads(paths["summary"].read_text())  # exactly what the file says (non-finite floats as strings)


def _class_order(targets: Sequence[Any]) -> dict[str, list[str]]:
    """Per op kind, the layout class names in their canonical order (report columns)."""
    from harness.targets.layout_classes import ATTENTION_CLASSES, LINEAR_CLASSES

    canon = {"linear": list(LINEAR_CLASSES), "attention": list(ATTENTION_CLASSES)}
    out: dict[str, list[str]] = {}
    for t in targets:
        names = out.setdefault(t.kind, [])
        names += [n for n in t.layout_classes() if n not in names]
    for kind, names in out.items():
        order = canon.get(kind, [])
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    return out


# ------------------------------------------------------------------------------ CLI


def _cmd(args: argparse.Namespace) -> int:
    t0 = time.monotonic()  # the budget counts from here: argument handling and start-up are part of the run
    ops = [p.strip() for s in (args.ops or []) for p in s.split(",") if p.strip()]
    classes = [p.strip() for s in (args.classes or []) for p in s.split(",") if p.strip()]
    command = "python -m harness matrix " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or [])
    try:
        summary = run_matrix(
            device=args.device,
            time_budget=args.time_budget,
            ops=ops or None,
            out=args.out,
            workers=args.workers,
            cases_per_cell=args.cases_per_cell,
            classes=classes or None,
            size=args.size,
            seed=args.seed,
            corpus=args.corpus,
            case_timeout=args.case_timeout,
            plugins=args.plugin or (),
            attn_plugins=args.attn_plugin or (),
            attribute=not args.no_attribute,
            progress=None if args.quiet else sys.stderr,
            command=command.strip(),
            force=args.force,
            started_at=t0,
            shard=args.shard,
            explore=not args.no_explore,
            grid_share=args.grid_share,
            explore_cases=args.explore_cases,
            large_offsets=False if args.no_large_offsets else None,
        )
    except (MatrixError, ValueError) as e:  # ValueError: a malformed corpus index (CorpusError)
        print(f"harness matrix: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    new = summary["new_failures"]
    fails = sum(1 for c in summary["cells"] if c["status"] == "fail")
    print(
        f"matrix: {sum(summary['totals'].values())} cases in {summary['duration_s']:.0f} s on "
        f"{summary['device'].get('used')}; {fails} failing cells, {len(new)} new failure(s), "
        f"{len(summary['unavailable'])} unavailable target(s)"
    )
    print(f"report: {out / 'report.html'}  ({out / 'report.md'}, {out / 'summary.json'})")
    for f in new:
        print(f"NEW  {f['fingerprint']}  {out / f['case'] if f['case'] else ''}")
    ex = summary.get("explore") or {}
    if ex.get("enabled") and ex.get("ops") is not None:
        sigs = sum(len(o.get("findings", [])) for o in ex["ops"].values())
        corpus = [c for c in ex.get("corpus", []) if not c.get("skipped")]
        got = sum(1 for c in corpus if c["reproduced"])
        print(
            f"explore: {ex.get('cases', 0)} cases; {sigs} failure signature(s); "
            f"corpus findings reproduced by the exploration: {got}/{len(corpus)}"
        )
    not_reached = sum(1 for c in summary["cells"] if c["status"] == "not_run")
    if not_reached:
        print(f"matrix: {not_reached} cell(s) not reached (listed in the report)")
    if summary["warnings"]:
        print(f"matrix: {len(summary['warnings'])} warning(s), listed in the report; first: {summary['warnings'][0]}")
    if summary["status"] == "interrupted":
        print(f"matrix: INTERRUPTED ({summary['interrupted']}); the report holds what was found until then")
    if not summary.get("completed", True):
        return 3
    unsupported = summary["totals"].get("unsupported", 0)  # the harness could not run these as asked
    if unsupported:
        print(f"UNSUPPORTED  {unsupported} case(s) the harness could not call as they need (see the report's top)")
    if (args.fail_on_new and new) or unsupported:
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``matrix`` and its options (see the module docstring)."""
    p = subparsers.add_parser(
        "matrix",
        help="drive every op and backend through every layout class; write a report",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--device", default="auto", help="auto (GPU if any, else CPU), cpu, cuda or cuda:N")
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="SECONDS",
        help=f"wall time of the whole run, start-up included (default {DEFAULT_BUDGET_S:g}); "
        f"the wrap-up after it takes at most {WRAPUP_BOUND_S:g} s; cells not reached are listed",
    )
    p.add_argument(
        "--ops",
        action="append",
        metavar="NAMES",
        help="comma-separated target names or fnmatch patterns (e.g. 'fp8_linear,legacy.*,attn.sdpa*')",
    )
    p.add_argument(
        "--classes",
        action="append",
        metavar="NAMES",
        help="comma-separated layout class names or patterns to keep (e.g. 'contiguous,offset_*')",
    )
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out: summary.json and the reports are replaced, a taken case "
        "file name gets -2, -3, ...; nothing is deleted",
    )
    p.add_argument(
        "--fail-on-new",
        action="store_true",
        help="exit 1 when a failure's op|layout_class|verdict is not in the regression corpus",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="workers per device (default: two cores per worker, at most 8 per GPU, 1 per GPU with --size wan; "
        "CPU: half the cores, at most 4)",
    )
    p.add_argument("--cases-per-cell", type=int, default=None, metavar="N", help="at most N cases per cell")
    p.add_argument("--size", choices=("small", "wan"), default="small", help="tensor sizes: small, or Wan2.1's")
    p.add_argument("--seed", type=int, default=0, help="case set (0: the standard one; nightly: a date)")
    p.add_argument("--corpus", default=None, metavar="DIR", help="regression corpus (default tests/cases)")
    p.add_argument(
        "--case-timeout",
        type=float,
        default=DEFAULT_CASE_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per case (default {DEFAULT_CASE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--plugin",
        action="append",
        metavar="PKG.MOD:ATTR",
        help="also drive this FP8 linear plug-in (or harness.fp8_linear entry point)",
    )
    p.add_argument(
        "--attn-plugin",
        action="append",
        metavar="PKG.MOD:ATTR",
        help="also drive this attention plug-in (or harness.attention entry point)",
    )
    p.add_argument(
        "--no-attribute",
        action="store_true",
        help="skip the CUDA_LAUNCH_BLOCKING rerun that names the op behind a device fault",
    )
    p.add_argument(
        "--no-explore",
        action="store_true",
        help="run the layout-class grid only, for the whole budget (default: the grid, then explore each op)",
    )
    p.add_argument(
        "--grid-share",
        type=float,
        default=DEFAULT_GRID_SHARE,
        metavar="F",
        help=f"share of the budget for the grid before the exploration (default {DEFAULT_GRID_SHARE:g})",
    )
    p.add_argument(
        "--explore-cases",
        type=int,
        default=None,
        metavar="N",
        help="drawn cases per op at most (default: the budget decides; with --cases-per-cell N: "
        f"{EXPLORE_CASES_PER_ROUND} x N)",
    )
    p.add_argument(
        "--no-large-offsets",
        action="store_true",
        help="no explored view whose largest element offset passes 2^31 (default: a rare draw on CUDA, a few GiB each)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only shard I of N (1 <= I <= N) of the cells, the same split on every machine; "
        "join the outputs with `python -m harness merge`",
    )
    p.set_defaults(func=_cmd, argv=sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "matrix" else [])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.matrix ...`` = ``python -m harness matrix ...``."""
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["matrix", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
