"""``python -m harness matrix``: every available op and backend through every layout class, then a report.

What it does:

1. selects the targets (``--ops`` patterns, default every ``linear`` and ``attention`` target,
   plus ``--plugin`` FP8 linears and ``--attn-plugin`` attention functions) and their layout
   classes (``--classes`` patterns): each (target, class) pair is a *cell*;
2. picks the device without initialising CUDA here (``auto``: a subprocess probe; the GPU when
   there is one, else the CPU) and starts a :class:`~harness.runner.pool.WorkerPool` there;
3. submits cases round-robin over the cells -- case 0 of every cell, then case 1 of every
   cell, ... -- so a short budget still covers every cell.  Round 0 is always submitted whole
   (every available cell gets a case and is waited for); once ``--time-budget`` is spent no
   case is submitted and later rounds' cases still running are dropped, without waiting for
   them or for their faults' attribution reruns (the summary's ``wrapup_s`` is the time from
   then to the reports: closing the pool, writing the example cases).  Case *i* of a
   cell is deterministic (``CaseFactory.build``); ``--seed`` shifts to another set.
   A target whose first result is ``unavailable`` is dropped, with its reason;
4. aggregates verdict counts, the worst bound ratio and one example case file per non-pass
   verdict per cell (``DIR/cases/``; the worst-ratio case for drift), and matches failures
   against the regression corpus by fingerprint ``op|layout_class|verdict``;
5. writes ``DIR/summary.json``, ``DIR/report.md`` and ``DIR/report.html`` (see
   :mod:`harness.report`).

Exit status: 0 when the run completed (whatever it found); with ``--fail-on-new``, 1 when some
failure's fingerprint is not in the corpus; 1 too when some case is ``unsupported`` (the harness
could not call a plug-in as the case needs); 2 for bad arguments, a ``--plugin`` that does not
load, or no usable device; 3 when the
run did not complete (interrupted, or no case ran) -- the partial report is written anyway.

Failing verdicts are those outside :data:`harness.verdicts.BENIGN`, plus ``rejected`` for
targets that promise to accept every layout (``accepts_all_layouts``: ``fp8_linear``,
``safe_attn.*``).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_OUT",
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
DEFAULT_OUT = "matrix-out"
DEFAULT_CASE_TIMEOUT_S = 120.0  # first calls may JIT-compile Triton kernels (SageAttention)
MATRIX_KINDS = ("linear", "attention")


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

    @property
    def key(self) -> tuple[str, str]:
        return self.op, self.layout_class

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def add(self, case: Any, result: Any) -> None:
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
            return
        old = self.examples.get(v)
        if old is None or (v == "drift" and (ratio or 0) > (_worst_of(old[1])["ratio"] or 0)):
            self.examples[v] = (case, result)


def _worst_of(result: Any) -> dict[str, Any]:
    """The bound check a result reports: the layout check for ``layout_noninvariance``, else drift.

    ``ratio`` = err / allowed (inf when bitwise equality was expected and not met; None when the
    result carries no bound check, e.g. ``rejected``).
    """
    m, b = result.metrics or {}, result.bound or {}
    if result.verdict.value == "layout_noninvariance":
        if "layout_ratio" in m:
            return {"metric": f"layout {b.get('metric', 'max_abs')}", "err": m.get("layout_err"),
                    "allowed": m.get("layout_allowed"), "ratio": _num(m.get("layout_ratio")), "why": b.get("why", "")}
        err = _num(m.get("layout_max_abs"))
        return {"metric": "layout max_abs", "err": err, "allowed": 0.0,
                "ratio": math.inf if err is None or err > 0 else 0.0, "why": b.get("why", "bitwise equal expected")}
    return {"metric": b.get("metric", "max_abs"), "err": m.get("err"), "allowed": m.get("allowed"),
            "ratio": _num(m.get("ratio")), "why": b.get("why", "")}


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
                out.append({"op": c["op"], "layout_class": c["layout_class"], "verdict": verdict,
                            "case": c.get("examples", {}).get(verdict, ""), "fingerprint": fp})
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
        per_target.append([Cell(t.name, t.kind, name, f, bool(getattr(t, "accepts_all_layouts", False)))
                           for name, f in table.items()])
    if classes:
        have = {c.layout_class for p in per_target for c in p}
        for pat in classes:
            if not any(fnmatch.fnmatchcase(n, pat) for n in have):
                known = sorted({n for t in targets for n in t.layout_classes()})
                raise MatrixError(f"--classes pattern {pat!r} matches no layout class of the selected ops; "
                                  f"known: {', '.join(known)}")
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

    def update(self, done: int, cells_done: int, n_cells: int, totals: Mapping[str, int], unavailable: int,
               force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        el = now - self.t0
        frac = min(1.0, el / self.budget) if self.budget > 0 else 1.0
        bar = "#" * int(frac * 20)
        fails = {k: v for k, v in totals.items() if k != "pass"}
        line = (f"[{bar:<20}] {el:5.0f}/{self.budget:.0f}s  {done} cases  cells {cells_done}/{n_cells}  "
                f"pass {totals.get('pass', 0)}" + "".join(f"  {k} {v}" for k, v in sorted(fails.items()))
                + (f"  unavailable targets {unavailable}" if unavailable else ""))
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


def _device_env(devices: Sequence[str]) -> dict[str, Any]:
    """Versions and device identity for the report header, from a subprocess (no CUDA here)."""
    import platform

    env: dict[str, Any] = {}
    try:
        from harness.env import collect_env_subprocess

        env = collect_env_subprocess(backends=False)
    except Exception as e:  # noqa: BLE001 - the header is informative; the run must not die for it
        import torch

        env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
               "probe_error": f"{type(e).__name__}: {e}"}
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
            raise MatrixError(f"--device cuda but no CUDA device is visible ({info.get('error') or 'count 0'}); "
                              "use --device cpu or auto")
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


def aggregate(cells: Sequence[Cell], out: Path, known: set[str], *, save_examples: bool = True) -> dict[str, Any]:
    """Summary ``cells`` list (see :mod:`harness.report`); writes one example case per non-pass verdict."""
    from harness.runner.pool import save_failure
    from harness.targets.attention import known_upstream_defect
    from harness.targets.corpus import fingerprint

    cases_dir = out / "cases"
    rows = []
    for c in cells:
        examples: dict[str, str] = {}
        messages: dict[str, str] = {}
        for verdict, (case, result) in sorted(c.examples.items()):
            messages[verdict] = (result.message or "").strip().splitlines()[0][:500] if result.message else ""
            if save_examples:
                path = save_failure(case, result, cases_dir, name=f"{c.op}-{c.layout_class}-{verdict}")
                examples[verdict] = _rel(path, out) or ""
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
            worst = dict(_worst_of(result), verdict=v, min_sqnr_db=c.min_sqnr_db,
                         case=examples.get(v) if c.examples.get(v, (None,))[0] is case else None)
        counts = {k: n for k, n in sorted(c.counts.items())}
        # a kernel defect the harness already names (harness.targets.attention.known_upstream_defect) explains
        # its example case: reported with its description, not as a new failure
        defects = {}
        for v in failing:
            if v in c.examples:
                ex_case, ex_result = c.examples[v]
                why = known_upstream_defect(c.op, ex_case, v, ex_result.message or "")
                if why:
                    defects[v] = why
        rows.append({
            "op": c.op, "kind": c.kind, "layout_class": c.layout_class, "status": status, "cases": c.cases,
            "counts": counts, "reason": c.unavailable or "", "worst": worst, "examples": examples,
            "messages": messages, "failing": failing,
            "new": [v for v in failing if fingerprint(c.op, c.layout_class, v) not in known and v not in defects],
            "known": [v for v in failing if fingerprint(c.op, c.layout_class, v) in known or v in defects],
            "kernel_defects": defects,
        })
    return {"cells": rows}


# ------------------------------------------------------------------------------ the run


def _register_plugins(plugins: Sequence[str], attn_plugins: Sequence[str]) -> list[str]:
    """Register plug-in targets here and, through the environment, in every worker; returns their names."""
    from harness.targets import ATTN_PLUGINS_ENV, PLUGINS_ENV, register_attention_plugin, register_plugin

    names = []
    for specs, var, reg in ((plugins, PLUGINS_ENV, register_plugin),
                            (attn_plugins, ATTN_PLUGINS_ENV, register_attention_plugin)):
        if not specs:
            continue
        try:
            names += [reg(spec, probe=True) for spec in specs]  # a plug-in that does not load: one line, exit 2
        except ValueError as e:
            raise MatrixError(str(e)) from None
        prior = [s for s in os.environ.get(var, "").split(",") if s.strip()]
        os.environ[var] = ",".join(dict.fromkeys(prior + list(specs)))  # spawned workers inherit it
    return names



def run_matrix(*, device: str = "auto", time_budget: float = DEFAULT_BUDGET_S, ops: Sequence[str] | None = None,
               out: str | os.PathLike = DEFAULT_OUT, workers: int | None = None, cases_per_cell: int | None = None,
               classes: Sequence[str] | None = None,
               size: str = "small", seed: int = 0, corpus: str | os.PathLike | None = None,
               case_timeout: float = DEFAULT_CASE_TIMEOUT_S, plugins: Sequence[str] = (),
               attn_plugins: Sequence[str] = (),
               attribute: bool = True, progress: TextIO | None = sys.stderr, command: str = "",
               pool_factory: Callable[..., Any] | None = None, shard: str | None = None) -> dict[str, Any]:
    """Run the matrix and write the reports into ``out``; returns the summary as written to ``summary.json``.

    ``cases_per_cell`` caps the rounds (None: until the budget ends).  ``pool_factory`` (tests)
    replaces :class:`~harness.runner.pool.WorkerPool`.  ``shard`` (``"I/N"``) keeps this machine's
    share of the cells (:mod:`harness.shard`); ``python -m harness merge`` joins the shards' outputs.
    """
    from harness.contract import infer_contracts, measured_on, record_of, write_contracts
    from harness.report import write_reports
    from harness.targets.corpus import load_corpus
    from harness.verdicts import POOL_CLOSED, Result, Verdict

    if not (isinstance(time_budget, (int, float)) and time_budget >= 0):
        raise MatrixError(f"--time-budget {time_budget!r} must be >= 0 seconds")
    if cases_per_cell is not None and cases_per_cell < 1:
        raise MatrixError(f"--cases-per-cell {cases_per_cell} must be >= 1")
    if size not in ("small", "wan"):
        raise MatrixError(f"--size {size!r}: use small or wan")
    plugin_names = _register_plugins(plugins, attn_plugins)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    if workers is not None and workers < 1:
        raise MatrixError(f"--workers {workers} must be >= 1")
    targets = select_targets(list(ops) + plugin_names if ops else None)
    cells = _build_cells(targets, classes)
    if not cells:
        raise MatrixError("no (op, layout class) cell selected: check --ops / --classes")
    shard_record = None
    if shard is not None:  # this machine's share; an empty share still writes its (empty) summary for merge
        from harness.shard import shard_record as _shard_record

        cells, shard_record = _shard_record(shard, cells)
    devices = _resolve_device(device)
    n_workers = workers or (1 if devices != ["cpu"] else max(1, min(4, (os.cpu_count() or 2) // 2)))
    entries = load_corpus(corpus)
    known = {e.fingerprint for e in entries}
    out_dir = Path(out)
    cases_dir = out_dir / "cases"
    if cases_dir.exists():  # stale examples of an earlier run would be linked by nobody
        for p in cases_dir.iterdir():
            if p.suffix in (".json", ".safetensors") and p.is_file():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _device_env(devices)

    by_target: dict[str, list[Cell]] = collections.defaultdict(list)
    for c in cells:
        by_target[c.op].append(c)
    unavailable: dict[str, str] = {}
    totals: collections.Counter = collections.Counter()
    contract_records: list[dict[str, Any]] = []  # harness.contract.record_of per result, for contracts.json
    by_device: collections.Counter = collections.Counter()  # cases answered per device (the spread)
    prog = Progress(progress, time_budget)
    done = 0
    budget_exhausted = False
    offset = int(seed) * 1_000_000

    def cell_open(c: Cell, rnd: int) -> bool:
        return c.op not in unavailable and (cases_per_cell is None or rnd < cases_per_cell)

    def handle(c: Cell, case: Any, r: Any) -> None:
        nonlocal done
        done += 1
        if r.verdict is Verdict.UNAVAILABLE:
            reason = (r.message or "unavailable").strip().splitlines()[0]
            if c.op not in unavailable:
                unavailable[c.op] = reason
            for other in by_target[c.op]:
                other.unavailable = unavailable[c.op]
            return
        if r.verdict is Verdict.ERROR and (r.message or "").startswith(POOL_CLOSED):
            return  # cancelled at the end of the budget: not a result
        totals[r.verdict.value] += 1
        by_device[r.device or "unknown"] += 1
        c.add(case, r)
        contract_records.append(record_of(case, r))

    factory = pool_factory
    if factory is None:
        from harness.runner.pool import WorkerPool

        factory = WorkerPool
    pool = factory(devices, workers_per_device=n_workers, case_timeout=case_timeout, attribute=attribute)
    completed = True
    try:
        inflight: dict[Future, tuple[Cell, Any]] = {}
        max_inflight = max(2, 3 * n_workers * len(devices))
        rnd = 0
        queue: collections.deque[Cell] = collections.deque()

        def refill() -> bool:
            nonlocal rnd, budget_exhausted
            over = time.monotonic() - t0 >= time_budget
            if over and rnd >= 2:  # past round 0 (always submitted whole): stop, even mid-round
                budget_exhausted = True
                queue.clear()
                return False
            while not queue:
                if rnd >= 1 and over:
                    budget_exhausted = True
                    return False
                nxt = [c for c in cells if cell_open(c, rnd)]
                if not nxt:
                    return False
                queue.extend(nxt)
                rnd += 1
            return True

        late: set[Future] = set()  # submitted in rounds >= 1: not waited for once the budget is spent
        while True:
            while len(inflight) < max_inflight and refill():
                c = queue.popleft()
                if not cell_open(c, c.submitted):
                    continue
                case = c.factory.build(offset + c.submitted, size=size)
                fut = pool.submit(case)
                if c.submitted:
                    late.add(fut)
                c.submitted += 1
                inflight[fut] = (c, case)
            if late and time.monotonic() - t0 >= time_budget:
                # the budget is spent: round 0 (one case per cell) is still awaited, later rounds are dropped
                # (pool.close cancels them, and skips the attribution reruns of faults not yet attributed)
                budget_exhausted = True
                for f in late:
                    inflight.pop(f, None)
                late.clear()
                queue.clear()
            if not inflight:
                break
            finished, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                late.discard(f)
                c, case = inflight.pop(f)
                try:
                    r = f.result()
                except Exception as e:  # noqa: BLE001 - a lost future is reported, not fatal
                    r = Result(Verdict.ERROR, f"the pool lost this case: {type(e).__name__}: {e}", op=c.op)
                handle(c, case, r)
            cells_done = sum(1 for c in cells if c.cases or c.unavailable)
            prog.update(done, cells_done, len(cells), totals, len(unavailable))
    except KeyboardInterrupt:  # stop, but still write what was found (exit 3: not completed)
        completed = False
        if progress is not None:
            progress.write("\nmatrix: interrupted; writing the partial report\n")
    finally:
        cases_done_at = time.monotonic()
        pool.close(cancel_pending=True)
        prog.update(done, sum(1 for c in cells if c.cases or c.unavailable), len(cells), totals, len(unavailable),
                    force=True)
        prog.done()

    if done == 0 and cells:
        completed = False
    agg = aggregate(cells, out_dir, known)
    new = find_new_failures(agg["cells"], known)
    contracts = infer_contracts(contract_records, measured_on(env), "python -m harness matrix")
    summary = {
        "schema_version": 1,
        "kind": "harness.matrix.summary",
        "started_at": started,
        "duration_s": round(time.monotonic() - t0, 3),
        "wrapup_s": round(time.monotonic() - cases_done_at, 3),  # closing the pool, writing example cases
        "budget_s": float(time_budget),
        "budget_exhausted": budget_exhausted,
        "completed": completed,
        "command": command,
        "size": size,
        "seed": seed,
        "workers": n_workers,
        "device": env,
        "totals": dict(sorted(totals.items())),
        "cases_by_device": dict(sorted(by_device.items())),
        "workers_replaced": len(getattr(pool, "replaced", ())),
        "corpus": str(corpus) if corpus is not None else "tests/cases",
        "known_failures": len(known),
        "layout_classes": _class_order(targets),
        "cells": agg["cells"],
        "unavailable": [{"op": op, "reason": why} for op, why in sorted(unavailable.items())],
        "new_failures": new,
        "contracts": contracts["contracts"],  # harness.contract: one layout contract per op (report section)
    }
    if shard_record is not None:
        summary["shard"] = shard_record
    write_contracts(out_dir, contracts)  # DIR/contracts.json
    paths = write_reports(summary, out_dir)
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
    ops = [p.strip() for s in (args.ops or []) for p in s.split(",") if p.strip()]
    classes = [p.strip() for s in (args.classes or []) for p in s.split(",") if p.strip()]
    command = "python -m harness matrix " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or [])
    try:
        summary = run_matrix(device=args.device, time_budget=args.time_budget, ops=ops or None, out=args.out,
                             workers=args.workers, cases_per_cell=args.cases_per_cell, classes=classes or None,
                             size=args.size,
                             seed=args.seed, corpus=args.corpus, case_timeout=args.case_timeout,
                             plugins=args.plugin or (), attn_plugins=args.attn_plugin or (),
                             attribute=not args.no_attribute,
                             progress=None if args.quiet else sys.stderr, command=command.strip(),
                             shard=args.shard)
    except (MatrixError, ValueError) as e:  # ValueError: a malformed corpus index (CorpusError)
        print(f"harness matrix: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    new = summary["new_failures"]
    fails = sum(1 for c in summary["cells"] if c["status"] == "fail")
    print(f"matrix: {sum(summary['totals'].values())} cases in {summary['duration_s']:.0f} s on "
          f"{summary['device'].get('used')}; {fails} failing cells, {len(new)} new failure(s), "
          f"{len(summary['unavailable'])} unavailable target(s)")
    print(f"report: {out / 'report.html'}  ({out / 'report.md'}, {out / 'summary.json'})")
    for f in new:
        print(f"NEW  {f['fingerprint']}  {out / f['case'] if f['case'] else ''}")
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
    p = subparsers.add_parser("matrix", help="drive every op and backend through every layout class; write a report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (GPU if any, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"stop starting new rounds after this long (default {DEFAULT_BUDGET_S:g}); round 0 always runs")
    p.add_argument("--ops", action="append", metavar="NAMES",
                   help="comma-separated target names or fnmatch patterns (e.g. 'fp8_linear,legacy.*,attn.sdpa*')")
    p.add_argument("--classes", action="append", metavar="NAMES",
                   help="comma-separated layout class names or patterns to keep (e.g. 'contiguous,offset_*')")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--fail-on-new", action="store_true",
                   help="exit 1 when a failure's op|layout_class|verdict is not in the regression corpus")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="workers per device (default 1 per GPU; "
                   "CPU: half the cores, at most 4)")
    p.add_argument("--cases-per-cell", type=int, default=None, metavar="N", help="at most N cases per cell")
    p.add_argument("--size", choices=("small", "wan"), default="small", help="tensor sizes: small, or Wan2.1's")
    p.add_argument("--seed", type=int, default=0, help="case set (0: the standard one; nightly: a date)")
    p.add_argument("--corpus", default=None, metavar="DIR", help="regression corpus (default tests/cases)")
    p.add_argument("--case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT_S, metavar="SECONDS",
                   help=f"per case (default {DEFAULT_CASE_TIMEOUT_S:g})")
    p.add_argument("--plugin", action="append", metavar="PKG.MOD:ATTR",
                   help="also drive this FP8 linear plug-in (or harness.fp8_linear entry point)")
    p.add_argument("--attn-plugin", action="append", metavar="PKG.MOD:ATTR",
                   help="also drive this attention plug-in (or harness.attention entry point)")
    p.add_argument("--no-attribute", action="store_true",
                   help="skip the CUDA_LAUNCH_BLOCKING rerun that names the op behind a device fault")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N (1 <= I <= N) of the cells, the same split on every machine; "
                        "join the outputs with `python -m harness merge`")
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
