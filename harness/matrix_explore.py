"""The matrix's exploration phase (issue 16): after the named grid, the rest of the budget explores each op.

:func:`harness.matrix.run_matrix` runs the layout classes first (the regression grid), then hands the
rest of its budget to :class:`ExplorePhase`: one seeded :func:`harness.explore.explore` per op, each in
its own thread, all submitting to the run's one worker pool (so a device fault costs a worker, never the
run, and the ops share the devices).  Drawing stops at :data:`DRAW_SHARE` of the remaining time; the rest
is for shrinking what was found; at the deadline (or a stop signal) every search ends at once and what
it found so far is reported.

What the phase adds to ``summary.json`` (key ``explore``; the report's "Exploration" section):

- ``ops``: per op, the :class:`~harness.explore.ExploreResult` (cases, verdict counts, coverage, why it
  stopped) with each distinct failure signature once -- (verdict, operand, property), its count of raw
  cases and its minimal case, saved as a replayable case file under ``cases/`` (``case``) -- and the
  worst drift found, with its case file;
- ``corpus``: every regression-corpus entry that applies on this machine, and whether an *explored*
  case (not a grid cell) reproduced it (:func:`harness.explore.reproduces`: the same op and verdict, and
  the property family of the entry's layout class), after how many of that op's explored cases and
  seconds, or why not (op not selected, unavailable here, not reached within the budget).

Every explored result is also counted in the run's totals and fed to the contract inference, like a
grid result.  With ``--shard I/N`` each op is explored by exactly one shard (:func:`explore_key`).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.explore import BuiltCase, ExploreStopped, Genome, build_case, explore, family_of, reproduces
from harness.verdicts import POOL_CLOSED, Result, Verdict

__all__ = ["DRAW_SHARE", "ExplorePhase", "explore_key"]

#: Of the time the exploration has, the share for drawing new cases; the rest shrinks what was found.
DRAW_SHARE = 0.7
#: Seconds an attribution rerun needs at least (a fresh CUDA context, the case; under compute-sanitizer more)
ATTRIBUTION_MIN_S = 10.0
#: ``attribution["skipped"]`` of a device-fault finding whose rerun the budget left no time for
ATTRIBUTION_SKIPPED_AT_DEADLINE = "the budget ended before the attribution rerun; replay the case to attribute it"


def explore_key(op: str) -> str:
    """The shard key of an op's exploration (never equal to a cell key, which is a JSON list)."""
    return f"explore|{op}"


def _capability(env: Mapping[str, Any]) -> tuple[int, int] | None:
    """The env probe's compute capability ("9.0" or [9, 0]) as a pair, None without one."""
    from harness.targets.corpus import _version

    cap = env.get("capability")
    if isinstance(cap, (list, tuple)) and len(cap) == 2:
        return int(cap[0]), int(cap[1])
    if isinstance(cap, str):
        v = _version(cap)
        return (v[0], v[1]) if len(v) >= 2 else None
    return None


def _half_memory(env: Mapping[str, Any], device: str) -> int | None:
    """Half the memory of ``device`` (``cuda:N``) from the env probe's ``devices`` list, in bytes; None if unknown."""
    if not str(device).startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
    for d in env.get("devices") or []:
        if isinstance(d, Mapping) and d.get("index") == index and isinstance(d.get("memory_gib"), (int, float)):
            return int(float(d["memory_gib"]) * 2**30 / 2)
    return None


class _OpState:
    """What one op's search has seen: its case count, the cases of non-pass genomes, the best score."""

    def __init__(self) -> None:
        self.cases = 0
        self.by_key: dict[str, tuple[Any, Result]] = {}  # genome key -> (case, result), non-pass verdicts
        self.best: tuple[float, str, Any, Result] | None = None


class ExplorePhase:
    """Explore ``targets`` through ``submit`` until ``deadline`` (``time.monotonic()``); see the module doc.

    ``submit(case) -> Future[Result]`` (the pool's).  ``on_result(case, result)`` is called for every
    explored case that ran (the matrix counts it).  ``stop_reason()`` returns a non-empty reason to stop.
    ``corpus``: the regression corpus entries (:class:`harness.targets.corpus.CorpusEntry`); ``env``: the
    run's device record (for which entries apply here).
    """

    def __init__(
        self,
        targets: Sequence[Any],
        submit: Callable[[Any], Any],
        *,
        device: str,
        seed: int,
        deadline: float,
        on_result: Callable[[Any, Result], None],
        stop_reason: Callable[[], str],
        corpus: Sequence[Any] = (),
        env: Mapping[str, Any] | None = None,
        selected_ops: Sequence[str] = (),
        unavailable: Mapping[str, str] | None = None,
        max_minimize_runs: int = 40,
        max_cases: int | None = None,
        attribute: Callable[[Any, Result], Result] | None = None,
        large_offsets: bool | None = None,
        workers: int = 1,
    ) -> None:
        self.targets = list(targets)
        self.submit, self.device, self.seed, self.deadline = submit, device, int(seed), float(deadline)
        self.on_result_cb, self.stop_reason = on_result, stop_reason
        self.corpus = list(corpus)
        self.env = dict(env or {})
        self.selected = set(selected_ops) or {t.name for t in self.targets}
        self.unavailable = dict(unavailable or {})
        self.max_minimize_runs = max_minimize_runs
        self.max_cases = max_cases
        #: ``attribute(case, result) -> result``: the attribution rerun of a device fault (the pool's
        #: ``attribute_result``); explored cases are submitted without one and only each device-fault finding's
        #: minimal case is attributed, after its op's search (off the other ops' way)
        self.attribute = attribute
        #: the rare >= 2**31-offset draw (None: on CUDA devices), sized from half the device's memory as the env
        #: probe reported it (this process never initialises CUDA itself)
        #: (divided among the device's ``workers``: each may hold such a case at the same time)
        half = _half_memory(self.env, device)
        self.free_bytes = half // max(1, int(workers)) if half is not None else None
        self.large_offsets = (device != "cpu") if large_offsets is None else bool(large_offsets)
        self.lock = threading.Lock()
        self.states: dict[str, _OpState] = {t.name: _OpState() for t in self.targets}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.threads: list[threading.Thread] = []
        self.started_at: float | None = None
        self.reached: dict[str, dict[str, Any]] = {}  # corpus fingerprint -> first explored case that reproduced it
        self._entries = self._applicable()

    # ------------------------------------------------------------------ corpus
    def _applicable(self) -> list[tuple[Any, str]]:
        """(entry, reason it cannot be reproduced here or "") for every corpus entry."""
        from harness.targets.corpus import applies_here

        out = []
        torch_version = str(self.env.get("torch") or "")
        cap = _capability(self.env) if self.device != "cpu" else None
        for e in self.corpus:
            why = ""
            if torch_version:
                ok, why = applies_here(e, torch_version=torch_version, cuda_capability=cap)
                why = "" if ok else why
            elif e.device == "cuda" and cap is None:
                why = f"{e.file} replays on CUDA: no CUDA device"
            out.append((e, why))
        return out

    def _note_corpus(self, op: str, built: BuiltCase, r: Result, n: int) -> None:
        for e, why in self._entries:
            if why or e.op != op or e.fingerprint in self.reached:
                continue
            if reproduces(e.op, e.layout_class, e.verdict, built, r):
                self.reached[e.fingerprint] = {
                    "after_cases": n,
                    "after_s": round(time.monotonic() - (self.started_at or time.monotonic()), 3),
                    "note": built.case.note,
                }

    # ------------------------------------------------------------------ the searches
    def _run_one(self, case: Any) -> Result:
        if self.stop_reason() or time.monotonic() >= self.deadline:
            raise ExploreStopped(self.stop_reason() or "deadline")
        try:
            r = self.submit(case).result()
        except Exception as e:  # the pool closed under us (the deadline): the search ends here
            raise ExploreStopped(f"the pool closed: {type(e).__name__}") from None
        if r.verdict is Verdict.ERROR and (r.message or "").startswith(POOL_CLOSED):
            raise ExploreStopped("the pool closed")
        return r

    def _hook(self, op: str) -> Callable[[BuiltCase, Result], None]:
        st = self.states[op]

        def seen(built: BuiltCase, r: Result) -> None:
            with self.lock:
                st.cases += 1
                key = built.genome.key()
                if r.verdict is not Verdict.PASS:
                    st.by_key[key] = (built.case, r)
                ratio = r.metrics.get("ratio") if isinstance(r.metrics, dict) else None
                if isinstance(ratio, (int, float)) and ratio == ratio and (st.best is None or ratio > st.best[0]):
                    st.best = (float(ratio), key, built.case, r)
                self._note_corpus(op, built, r, st.cases)
            self.on_result_cb(built.case, r)

        return seen

    def _search(self, target: Any, draw_until: float) -> None:
        from harness.explore import cpu_coverage, kernel_coverage

        op = target.name
        try:
            res = explore(
                target,
                self._run_one,
                seed=self.seed,
                budget_cases=self.max_cases or 10**9,  # None: the time budget decides
                budget_s=max(1e-3, draw_until - time.monotonic()),
                coverage=kernel_coverage if self.device != "cpu" else cpu_coverage,
                device=self.device,
                max_minimize_runs=self.max_minimize_runs,
                large_offset=self.large_offsets,
                free_bytes=self.free_bytes,
                on_result=self._hook(op),
                should_stop=lambda: self.stop_reason() or ("deadline" if time.monotonic() >= self.deadline else ""),
            )
        except Exception as e:  # noqa: BLE001 - one op's search failing must not end the others; it is reported
            self.errors[op] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            return
        if self.attribute is not None:
            self._attribute_findings(target, res)
        self.results[op] = res  # only now: the summary writes each finding's case file once, attributed

    def _attribute_findings(self, target: Any, res: Any) -> None:
        """Name the faulting kernel of each device-fault finding's minimal case (one rerun per signature)."""
        st = self.states[target.name]
        for f in res.findings:
            if f.verdict != Verdict.DEVICE_FAULT.value:
                continue
            found = self._case_of(target, f.genome, st)
            if found is None:
                continue
            built, (case, r) = found
            left = self.deadline - time.monotonic()
            if self.stop_reason() or left < ATTRIBUTION_MIN_S:
                r = dataclasses.replace(
                    r, attribution=dict(r.attribution or {}, skipped=ATTRIBUTION_SKIPPED_AT_DEADLINE)
                )
            else:
                try:
                    r = self.attribute(case, r, left - 1.0)  # never past the run's deadline
                except Exception as e:  # noqa: BLE001 - the finding stays, without its kernel
                    r = dataclasses.replace(
                        r, attribution=dict(r.attribution or {}, skipped=f"attribution failed: {e}")
                    )
            with self.lock:
                st.by_key[built.genome.key()] = (case, r)

    def start(self) -> None:
        """Start one search thread per available target (they stop by themselves at the deadline)."""
        now = self.started_at = time.monotonic()
        draw_until = now + DRAW_SHARE * max(0.0, self.deadline - now)
        for t in self.targets:
            if t.name in self.unavailable:
                continue
            th = threading.Thread(target=self._search, args=(t, draw_until), name=f"explore-{t.name}", daemon=True)
            self.threads.append(th)
            th.start()

    def wait(self, until: float, poll: float = 0.5, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the searches up to ``until``; True when all ended."""
        while time.monotonic() < until and not stopped():
            alive = [t for t in self.threads if t.is_alive()]
            if not alive:
                return True
            alive[0].join(timeout=min(poll, max(0.0, until - time.monotonic())))
        return not any(t.is_alive() for t in self.threads)

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def cases(self) -> int:
        with self.lock:
            return sum(s.cases for s in self.states.values())

    # ------------------------------------------------------------------ the summary
    def _case_of(
        self, target: Any, genome: Mapping[str, Any], st: _OpState
    ) -> tuple[BuiltCase, tuple[Any, Result]] | None:
        try:
            built = build_case(target, Genome.from_dict(genome))
        except Exception:  # noqa: BLE001 - a genome that no longer builds: no case file, said in the summary
            return None
        hit = st.by_key.get(built.genome.key())
        return (built, hit) if hit is not None else None

    def _known(self, op: str, verdict: str, built: BuiltCase, case: Any, r: Result) -> tuple[str, str]:
        """(corpus fingerprint the finding stands for, or ""; the target's own named defect, or "")."""
        from harness.targets import known_defect_of

        for e in self.corpus:
            if e.op == op and e.verdict == verdict:
                if e.layout_class == "explore" or reproduces(e.op, e.layout_class, e.verdict, built, r):
                    return e.fingerprint, ""
        try:
            why = known_defect_of(case, r) or ""
        except Exception:  # noqa: BLE001 - a target's hook failing must not lose the finding
            why = ""
        return "", why

    def summary(self, save: Callable[[str, Any, Result], str | None]) -> dict[str, Any]:
        """The ``explore`` section; ``save(stem, case, result) -> relative path or None`` writes a case file."""
        ops: dict[str, Any] = {}
        with self.lock:
            for t in self.targets:
                op, st = t.name, self.states[t.name]
                res = self.results.get(op)
                if op in self.unavailable:
                    ops[op] = {"status": "unavailable", "reason": self.unavailable[op], "cases": 0}
                    continue
                if res is None:
                    ops[op] = {
                        "status": "error" if op in self.errors else "running",
                        "reason": self.errors.get(op, "the search had not ended when the report was written"),
                        "cases": st.cases,
                    }
                    continue
                d = res.to_dict()
                d["status"] = "done"
                for i, f in enumerate(d["findings"], 1):
                    f.pop("minimal", None)  # the case file has it
                    found = self._case_of(t, f["genome"], st)
                    f["case"], f["known"], f["kernel_defect"] = None, "", ""
                    if found is not None:
                        built, (case, r) = found
                        f["case"] = save(f"explore-{op}-{f['verdict']}-{i}", case, r)
                        if r.attribution:
                            f["attribution"] = r.attribution
                        f["known"], f["kernel_defect"] = self._known(op, f["verdict"], built, case, r)
                if d.get("worst"):
                    d["worst"].pop("case", None)
                    w = st.best
                    d["worst"]["case"] = (
                        save(f"explore-{op}-worst-{w[3].verdict.value}", w[2], w[3]) if w is not None else None
                    )
                ops[op] = d
        corpus = []
        for e, why in self._entries:
            hit = self.reached.get(e.fingerprint)
            if hit is None and not why:
                if e.op not in self.selected:
                    why = "op not selected (--ops)"
                elif e.op in self.unavailable:
                    why = f"unavailable here: {self.unavailable[e.op]}"
                elif e.op not in self.states:
                    why = "op not in this shard's share"
            corpus.append(
                {
                    "fingerprint": e.fingerprint,
                    "op": e.op,
                    "layout_class": e.layout_class,
                    "verdict": e.verdict,
                    "family": family_of(e.layout_class),
                    "reproduced": hit is not None,
                    **(hit or {}),
                    "skipped": why if hit is None else "",
                }
            )
        return {
            "seed": self.seed,
            "cases": sum(s.cases for s in self.states.values()),
            "seconds": round(time.monotonic() - self.started_at, 3) if self.started_at is not None else 0.0,
            "ops": ops,
            "corpus": corpus,
        }


def new_findings(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The exploration's findings that no corpus entry and no named kernel defect explains, as
    ``new_failures`` entries (fingerprint ``op|explore|verdict``, with the signature)."""
    from harness.targets.corpus import fingerprint

    out = []
    for op, d in sorted((section.get("ops") or {}).items()):
        for f in d.get("findings", []):
            if f.get("known") or f.get("kernel_defect"):
                continue
            out.append(
                {
                    "op": op,
                    "layout_class": "explore",
                    "verdict": f["verdict"],
                    "case": f.get("case") or "",
                    "fingerprint": fingerprint(op, "explore", f["verdict"]),
                    "signature": f"{f['operand']}: {f['property']}",
                    "count": f.get("count", 0),
                }
            )
    return out


def save_into(out: Path, keep: Any, warn: Callable[[str], None]) -> Callable[[str, Any, Result], str | None]:
    """A ``save`` for :meth:`ExplorePhase.summary`: ``out/cases/STEM.json`` (never over a file in ``keep``;
    a failed write is a warning, the finding then links no case)."""
    from harness.runner.pool import save_failure

    written: dict[str, str] = {}

    def save(stem: str, case: Any, result: Result) -> str | None:
        base = re.sub(r"[^0-9A-Za-z-]", "_", stem)
        if base in written:
            return written[base]
        name, n = base, 1
        while f"{name}.json" in keep or f"{name}.safetensors" in keep:
            n += 1
            name = f"{base}-{n}"
        try:
            path = save_failure(case, result, out / "cases", name=name)
        except Exception as e:  # noqa: BLE001
            warn(f"could not write the explored case {name}: {type(e).__name__}: {str(e).strip()[:200]}")
            return None
        written[base] = Path(path).resolve().relative_to(out.resolve()).as_posix()
        return written[base]

    return save
