"""Reliability of the worker pool under faults, with its figures (issue 11): N cases per fault kind, on CPU.

Every fault kind the pool must survive (segfault, hang, ``os._exit``, OOM kill, sticky device fault, a worker
SIGKILLed mid-case, a worker dying or hanging between cases, failed worker starts, an idle worker SIGKILLed)
is submitted ``N`` times (``$HARNESS_RELIABILITY_N``, default 2), each followed by innocent cases, all at
once, in a shuffled order. Asserted: every case returned (0 lost), each answered once (0 duplicated: the
pools' own ``anomalies`` count a case answered or started twice), each with the verdict its kind implies
(0 mis-attributed: the innocent cases after a fault, and the next case after a death between cases, pass).
Measured: recovery per fault kind, the seconds from the pool noticing the fault to the next case starting on
that device (``WorkerPool.recovery_log``). The table is printed; ``$HARNESS_RELIABILITY_JSON`` names a file
for it as JSON.

Marked ``slow`` (still in the default run): under a minute on two shared cores.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import statistics
import time

import pytest

from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.runner.pool import WorkerPool
from harness.runner.worker import FAIL_STARTS_ENV
from harness.values import ValueSpec
from harness.verdicts import Verdict

pytestmark = pytest.mark.slow

N = int(os.environ.get("HARNESS_RELIABILITY_N", "2"))
JSON_ENV = "HARNESS_RELIABILITY_JSON"
INNOCENT_AFTER = 2  # innocent cases submitted behind each fault
INNOCENT_TIMEOUT = 5.0  # they take milliseconds; short, so a worker stuck before taking one is replaced soon

#: kind -> (op, params, per-case timeout or None, expected verdict, text in the message)
KINDS = {
    "segfault": ("fault.segfault", {}, None, Verdict.WORKER_CRASH, "SIGSEGV"),
    "hang": ("fault.hang", {}, 1.0, Verdict.TIMEOUT, "1 s case timeout"),
    "os._exit": ("fault.exit", {"code": 3}, None, Verdict.WORKER_CRASH, "exited with status 3"),
    "oom_kill": ("fault.oom_kill", {}, None, Verdict.WORKER_CRASH, "SIGKILL"),
    "sticky_fault": ("fault.sticky", {}, None, Verdict.DEVICE_FAULT, "illegal memory access"),
    "sigkilled_worker": ("fault.killed", {}, None, Verdict.WORKER_CRASH, "SIGKILL"),
    # the arming case passes; its worker dies when the next case reaches it, before starting it
    "death_between_cases": ("fault.exit_between_cases", {"code": 0}, None, Verdict.PASS, ""),
    # ... or hangs there: replaced after the next case's timeout, that case resent
    "stuck_between_cases": ("fault.stall_between_cases", {}, None, Verdict.PASS, ""),
}


def _case(op: str, seed: int, **params) -> Case:
    return Case(
        op=op, layouts={"x": LayoutSpec((4, 8), "float32")}, values={"x": ValueSpec("normal", seed=seed)}, params=params
    )


def _kind_of(entry: dict) -> str | None:
    """The fault kind a ``recovery_log`` entry belongs to."""
    if entry["reason"].startswith("start failed"):
        return "failed_worker_starts"
    if entry["reason"].startswith("died between cases"):
        return "death_between_cases"
    if entry["reason"].startswith("died idle"):
        return "idle_worker_sigkilled"
    if entry["reason"].startswith("did not take the case"):
        return "stuck_between_cases"
    return next((k for k, spec in KINDS.items() if spec[0] == entry["op"]), None)


def _check(expected: list[tuple[str, Case, Verdict, str]], results: list, stats: dict) -> list[str]:
    """Tally returned / lost / mis-attributed per kind; returns one line per mis-attributed case."""
    bad = []
    for (kind, c, verdict, text), r in zip(expected, results):
        row = stats.setdefault(kind, {"cases": 0, "returned": 0, "lost": 0, "misattributed": 0})
        row["cases"] += 1
        if r is None:
            row["lost"] += 1
            continue
        row["returned"] += 1
        if r.verdict is not verdict or r.op != c.op or text not in r.message:
            row["misattributed"] += 1
            bad.append(f"{kind}: {c.op} seed {c.values['x'].seed}: {r.verdict.value}: {r.message[:200]}")
    return bad


def _results(futures: list, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    out = []
    for f in futures:
        try:
            out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            out.append(None)
    return out


def test_reliability_faults_are_answered_once_with_their_verdict_and_the_pool_recovers(tmp_path, monkeypatch):
    t0 = time.monotonic()
    stats: dict[str, dict] = {}
    recoveries: dict[str, list[float]] = {}
    anomalies = {"answered_twice": 0, "started_twice": 0}
    seeds = iter(range(10**6))

    # ---- phase 1: every fault kind N times, each with innocent cases behind it, all submitted at once
    blocks = []
    for kind, (op, params, timeout, verdict, text) in KINDS.items():
        for _ in range(N):
            block = [(kind, _case(op, next(seeds), **params), timeout, verdict, text)]
            block += [
                ("innocent", _case("cpu.scale", next(seeds)), INNOCENT_TIMEOUT, Verdict.PASS, "")
                for _ in range(INNOCENT_AFTER)
            ]
            blocks.append(block)
    random.Random(11).shuffle(blocks)
    plan = [entry for block in blocks for entry in block]
    with WorkerPool("cpu", 2, spares=1, case_timeout=60, attribute=False) as pool:
        futures = [pool.submit(c, timeout=t) for _, c, t, _, _ in plan]
        results = _results(futures, 240)
        log = list(pool.recovery_log)
        for k in anomalies:
            anomalies[k] += pool.anomalies[k]
    bad = _check([(k, c, v, x) for k, c, _, v, x in plan], results, stats)

    # ---- phase 2: failed worker starts (the cause goes away after N), then idle workers SIGKILLed
    counter = tmp_path / "fail-starts"
    counter.write_text(str(N))
    monkeypatch.setenv(FAIL_STARTS_ENV, str(counter))
    with WorkerPool("cpu", 1, spares=0, case_timeout=60, attribute=False) as pool:
        plan2 = [("failed_worker_starts", _case("cpu.scale", next(seeds)), Verdict.PASS, "") for _ in range(N)]
        bad += _check(plan2, _results([pool.submit(c) for _, c, _, _ in plan2], 120), stats)
        for _ in range(N):
            assert pool.wait_ready(120)
            pid = pool.workers()[0]["pid"]
            fd = os.pidfd_open(pid)
            os.kill(pid, signal.SIGKILL)
            assert select.select([fd], [], [], 30)[0], "the SIGKILLed worker did not exit"
            os.close(fd)
            c = _case("cpu.scale", next(seeds))  # submitted as soon as the idle worker is gone
            bad += _check([("idle_worker_sigkilled", c, Verdict.PASS, "")], _results([pool.submit(c)], 120), stats)
        log += pool.recovery_log
        for k in anomalies:
            anomalies[k] += pool.anomalies[k]

    for entry in log:
        kind = _kind_of(entry)
        if kind is not None:
            recoveries.setdefault(kind, []).append(entry["seconds"])
    table = {
        kind: dict(
            row,
            recovery_s=(
                {
                    "n": len(recoveries[kind]),
                    "median": round(statistics.median(recoveries[kind]), 3),
                    "max": round(max(recoveries[kind]), 3),
                }
                if recoveries.get(kind)
                else None
            ),
        )
        for kind, row in stats.items()
    }
    total = {key: sum(row[key] for row in stats.values()) for key in ("cases", "returned", "lost", "misattributed")}
    total["duplicated"] = anomalies["answered_twice"] + anomalies["started_twice"]
    report = {
        "n_per_kind": N,
        "kinds": table,
        "total": total,
        "anomalies": anomalies,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    _print_table(report)
    if os.environ.get(JSON_ENV):
        with open(os.environ[JSON_ENV], "w") as f:
            json.dump(report, f, indent=2)

    assert total["lost"] == 0 and total["returned"] == total["cases"], report
    assert anomalies == {"answered_twice": 0, "started_twice": 0}, report
    assert not bad, "\n".join(bad)
    # every kind that loses a worker shows up in the recovery log, so its recovery was measured
    killers = [*KINDS, "failed_worker_starts", "idle_worker_sigkilled"]
    assert all(recoveries.get(k) for k in killers), {k: recoveries.get(k) for k in killers}


def _print_table(report: dict) -> None:
    rows = [("kind", "cases", "returned", "lost", "dup", "misattr", "recovery median s", "max s")]
    for kind, row in report["kinds"].items():
        rec = row["recovery_s"] or {}
        rows.append(
            (
                kind,
                row["cases"],
                row["returned"],
                row["lost"],
                "-",
                row["misattributed"],
                rec.get("median", "-"),
                rec.get("max", "-"),
            )
        )
    t = report["total"]
    rows.append(("total", t["cases"], t["returned"], t["lost"], t["duplicated"], t["misattributed"], "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\npool reliability, N={report['n_per_kind']} per fault kind, {report['wall_s']} s "
        "(dup: cases answered or started twice, counted pool-wide)"
    )
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
