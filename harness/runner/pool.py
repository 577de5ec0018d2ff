"""A pool of persistent worker processes that survives whatever the cases do to them.

Why a pool: a CUDA fault (illegal or misaligned address, device-side assert)
poisons the process that hit it, and the error usually surfaces at an innocent
later call. So every case runs in a worker process; the parent never touches
CUDA. A worker is replaced when

- a case leaves its device context broken (the worker's health check fails;
  verdict ``device_fault``; the worker exits by itself),
- a case runs past its timeout (the parent kills the worker; verdict ``timeout``),
- the worker dies (segfault, ``os._exit``, OOM kill; verdict ``worker_crash`` with
  the exit code or signal and the tail of its faulthandler log).

Every submitted case gets exactly one :class:`~harness.verdicts.Result`: cases
queued behind a case that killed its worker are re-queued, never lost. A worker
acknowledges each case before it runs it; only an acknowledged case can be
charged with its worker's death or timeout (one that died between cases has its
next case resent). Failed worker starts are retried with back-off. Spare
workers (already started, CUDA context made) take over at once. CPU workers are
forked from a fork server that imported torch and the harness once (``start_method``;
GPU pools on request), so a replacement costs ~0.1 s, on a GPU ~0.6-1.3 s (its CUDA
context), instead of a fresh interpreter's 1.7 s here and ~9 s on a loaded GPU host.

A device fault is then attributed: the case is written to disk and rerun in a
fresh interpreter with ``CUDA_LAUNCH_BLOCKING=1``, under ``compute-sanitizer`` wherever it
is installed and works (its report names the faulting kernel), else synchronising after every
call the op makes to name the one after which the device failed.

Throughput: one message per case each way over a pipe, a small prefetch per
worker, inputs built inside the worker; no re-imports per case.

The process-level helpers live beside it and are re-exported here:
:mod:`harness.runner.devices` (device probes), :mod:`harness.runner.casefiles`
(failing-case files), :mod:`harness.runner.fresh` (fresh-process and sanitizer
runs) and :mod:`harness.runner.procs` (child environment, temp folders, exit hooks).
"""

import atexit
import collections
import dataclasses
import functools
import itertools
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

# re-exported: ``harness.runner.pool`` stays the one import for the runner's process-level API
from harness.runner.casefiles import (
    MAX_SAVED_BYTES,  # noqa: F401 - re-exported
    _saved_tensors,
    case_values,
    replay_command,
    save_failure,
)
from harness.runner.devices import probe_cuda, probe_devices, resolve_devices
from harness.runner.fresh import (
    DEFAULT_CASE_TIMEOUT,
    Cancelled,
    SanitizerPolicy,
    _default_attribution_timeout,
    _exit_text,
    _faulthandler_frame,
    attribution_rerun,
    find_sanitizer,
    run_in_fresh_process,
)
from harness.runner.procs import (
    _LIVE_POOLS,
    _child_env,  # noqa: F401 - re-exported (harness.quant.plugins uses it)
    _drop_tmp,
    _make_tmp,
    remove_stale_tmp,
)
from harness.verdicts import POOL_CLOSED, Result, Verdict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.cases import Case

__all__ = [
    "WorkerPool",
    "PoolClosed",
    "Cancelled",
    "ATTRIBUTION_SKIPPED",
    "probe_devices",
    "probe_cuda",
    "resolve_devices",
    "run_in_fresh_process",
    "attribution_rerun",
    "save_failure",
    "replay_command",
    "case_values",
    "find_sanitizer",
    "merge_attribution",
    "DEFAULT_CASE_TIMEOUT",
    "remove_stale_tmp",
]


#: seconds a worker may take to start (import torch, create the CUDA context, warm up)
DEFAULT_START_TIMEOUT = 300.0
#: seconds before the first retry of a failed worker start; doubled per consecutive failure ...
START_BACKOFF = 0.25
#: ... up to this (a device whose starts keep failing is retried this often while cases wait for it)
MAX_START_BACKOFF = 30.0
#: times a case is resent after a worker died between receiving it and starting it, before it is answered
MAX_RESENDS = 3
#: seconds a closing pool waits for its workers to exit after asking them to, before ending them
STOP_TIMEOUT = 10.0
#: seconds a worker that reported a device fault may take to exit before it is killed
RETIRE_TIMEOUT = 30.0
#: seconds the spare count looks back: a device keeps one more spare per active worker it lost in this window
SPARE_WINDOW_S = 60.0
#: how workers start, overriding the default: "forkserver" or "spawn"
START_METHOD_ENV = "HARNESS_WORKER_START"
#: what the fork server imports once (torch, torch._dynamo, the harness's own modules)
PRELOAD_MODULE = "harness.runner.preload"
#: forked worker starts on a device that fail in a row before the pool starts fresh interpreters instead
FORKED_START_FAILURES = 2
#: seconds between two looks at nvidia-smi's recovery action for a GPU whose worker starts keep failing
GPU_HEALTH_RECHECK_S = 30.0


def default_start_method(devices: Sequence[str] = ()) -> str:
    """``$HARNESS_WORKER_START`` if set; else "forkserver" for CPU-only pools where the platform has it (Linux),
    and "spawn" as soon as a GPU is among ``devices``.

    Why not forked on GPUs by default: on an H200 (torch 2.11, CUDA 13.0, driver 580.159.04) forked workers started
    in 0.6-1.3 s instead of ~9 s, and the matrix ran 1.7-1.9x the cases/s; but twice the GPU's firmware stopped
    answering (Xid 119) in machine sessions that had run forked workers with device faults, and the GPU needed a
    reset (Xid 154; docs/gpu-findings.md). ``HARNESS_WORKER_START=forkserver`` forks on GPUs too."""
    method = os.environ.get(START_METHOD_ENV, "").strip()
    if method:
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"${START_METHOD_ENV}={method!r}: use 'forkserver' or 'spawn'")
        return method
    if any(not str(d).startswith("cpu") for d in devices):
        return "spawn"
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


#: ``attribution["skipped"]`` of a device fault whose attribution rerun the pool's close cancelled
ATTRIBUTION_SKIPPED = (
    f"{POOL_CLOSED} (cancel_pending) before the CUDA_LAUNCH_BLOCKING rerun finished; replay the case to attribute it"
)


class PoolClosed(RuntimeError):
    """``submit`` after ``close``."""


def _wait_exit(procs: Sequence[Any], timeout: float) -> list[Any]:
    """Wait until every process in ``procs`` has exited or ``timeout`` passed; returns those still alive."""

    def running(p: Any) -> bool:
        try:
            return p.is_alive()
        except ValueError:  # closed: another thread reaped it
            return False

    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if running(p)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return alive
        try:
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=left)
        except (ValueError, OSError):
            pass


# ------------------------------------------------------------------------------ the pool


@dataclasses.dataclass(eq=False)
class _Item:
    id: int
    case: "Case"
    blob: bytes | None
    values: Mapping[str, Any] | None
    future: Future
    timeout: float
    record_ops: bool
    queued_at: float = 0.0  # when it (re)entered the queue
    sent_at: float = 0.0  # when it was sent to its worker
    started_at: float | None = None  # when its worker acknowledged it ("started"): the case timer runs from here
    resends: int = 0  # workers that died after it was sent to them and before they started it
    starts: int = 0  # acknowledgements received (more than one would be a protocol bug)
    attribute: bool = True  # rerun a device fault of this case to name its kernel (the pool's ``attribute`` too)


@dataclasses.dataclass(eq=False)
class _Worker:
    name: str
    device: str
    proc: Any
    conn: Any
    log_path: str
    spare: bool
    started: float
    state: str = "starting"  # starting | ready | retiring | dead
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    outstanding: collections.deque = dataclasses.field(default_factory=collections.deque)
    cases_done: int = 0
    retired_at: float = 0.0
    answered_at: float = 0.0  # when it last answered a case (the next one is its to take from then on)
    init_error: str = ""  # what its setup raised, when it failed to start
    start_method: str = "spawn"  # how its process was started: "forkserver" or "spawn"
    fork_unfit: str = ""  # why its fork could not stand in for a fresh interpreter (it exited; not a failure)


class WorkerPool:
    """Persistent spawned workers on every device; ``submit(case) -> Future[Result]``.

    ``devices``: None (every visible GPU, else CPU), "cpu", "cuda", "cuda:0,cuda:1" or a list.
    ``workers_per_device``: active workers per device. ``spares``: started, idle workers per device
    that take over at once when one is lost (default on CUDA ``1 + workers_per_device // 4``, on CPU 0).
    ``max_spares``: the spare count follows the fault rate -- one more spare per active worker lost on that
    device in the last ``SPARE_WINDOW_S`` s, up to this (default ``max(spares, workers_per_device)`` for forked
    workers, which share the fork server's memory, ``max(spares, ceil(workers_per_device / 2))`` for spawned ones;
    with ``spares=0`` no spare is ever started).
    ``case_timeout``: seconds per case. ``cases_dir``: write every failing case there.
    ``attribute``: rerun device faults in a fresh ``CUDA_LAUNCH_BLOCKING=1`` process to name the op.
    ``sanitizer``: run that rerun under ``compute-sanitizer``: None (default) on CUDA whenever it is installed
    and has not failed on this machine (decided once per pool), True always, False never.
    ``prefetch``: cases queued per worker.
    ``threads``: torch intra-op threads per worker (default: the cores divided among the active workers).
    ``start_method``: "forkserver" (the default for CPU pools on Linux; GPU pools start "spawn" unless asked, see
    :func:`default_start_method`): workers are forked from a server that imported torch and the harness once, so a
    replacement costs its CUDA context, not a fresh interpreter (~9 s on a loaded GPU host). Each forked worker
    takes the caller's environment at its start; one that cannot stand in for a fresh interpreter (the server
    touched CUDA, or a variable read at import time changed: :func:`harness.runner.worker.fork_unfit`) exits, and
    the pool starts "spawn" workers from then on (``start_fallback`` says why). "spawn": a fresh interpreter per
    worker.

    A case's timeout runs from the moment its worker acknowledges it (not while it waits in a queue or a
    worker starts). A worker that dies before acknowledging a case has not started it: the case is sent
    to another worker (at most ``MAX_RESENDS`` times), never blamed. A failed worker start is retried with
    a doubling back-off (``START_BACKOFF`` .. ``MAX_START_BACKOFF`` s) for as long as cases wait; a case
    waits at most its timeout for a worker, then gets ``error`` "worker start failed: <reason>" -- at once when
    every device is given up on (``broken_devices``: its GPU needs a reset) and no worker runs.
    ``close()`` asks the workers to exit and waits ``STOP_TIMEOUT`` s before ending them.
    """

    def __init__(
        self,
        devices: str | Sequence[str] | None = None,
        workers_per_device: int = 1,
        *,
        case_timeout: float = DEFAULT_CASE_TIMEOUT,
        spares: int | None = None,
        cases_dir: str | os.PathLike | None = None,
        attribute: bool = True,
        sanitizer: bool | None = None,
        prefetch: int = 2,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        attribution_timeout: float | None = None,
        threads: int | None = None,
        max_spares: int | None = None,
        start_method: str | None = None,
    ) -> None:
        if start_method not in (None, "forkserver", "spawn"):
            raise ValueError(f"start_method={start_method!r}: use 'forkserver' or 'spawn'")
        if not isinstance(workers_per_device, int) or workers_per_device < 1:
            raise ValueError(f"workers_per_device={workers_per_device!r} must be an integer >= 1")
        if not case_timeout or case_timeout <= 0:
            raise ValueError(f"case_timeout={case_timeout!r} must be > 0 seconds")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch={prefetch!r} must be an integer >= 1 (cases queued per worker)")
        self.devices = resolve_devices(devices)
        if start_method is None:
            start_method = default_start_method(self.devices)
        self.workers_per_device = workers_per_device
        if spares is None:
            spares = 1 + workers_per_device // 4 if any(d.startswith("cuda") for d in self.devices) else 0
        if spares < 0:
            raise ValueError(f"spares={spares!r} must be >= 0")
        self.spares = spares
        if max_spares is None:
            most = workers_per_device if start_method == "forkserver" else (workers_per_device + 1) // 2
            max_spares = max(spares, most) if spares else 0
        if max_spares < spares:
            raise ValueError(f"max_spares={max_spares!r} must be >= spares={spares!r}")
        self.max_spares = max_spares
        self.case_timeout = float(case_timeout)
        self.start_timeout = float(start_timeout)
        self.cases_dir = Path(cases_dir) if cases_dir is not None else None
        self.attribute = attribute
        self.sanitizer = sanitizer
        #: whether attribution reruns run under compute-sanitizer (remembers a tool that fails here)
        self.sanitizer_policy = SanitizerPolicy(sanitizer)
        self.prefetch = prefetch
        if threads is None:
            active = len(self.devices) * workers_per_device
            threads = max(1, (os.cpu_count() or 1) // active)
        if threads < 1:
            raise ValueError(f"threads={threads!r} must be >= 1 (torch intra-op threads per worker)")
        self._threads = threads
        self._attribution_timeout = attribution_timeout  # None: per rerun, with or without the sanitizer
        self.attribution_timeout = attribution_timeout or _default_attribution_timeout(
            self.case_timeout, sanitizer is not False
        )
        #: seconds from losing a worker until its device had its full count of ready workers again
        self.recoveries: list[float] = []
        #: (worker name, reason) for every worker replaced
        self.replaced: list[tuple[str, str]] = []
        #: (worker name, exit code) of every worker that left the pool (0: it exited when asked)
        self.exits: list[tuple[str, int | None]] = []
        #: one dict per lost worker or failed start: ``reason``, ``op`` (the case charged, or None), ``device``
        #: and ``seconds`` from the loss to the next case starting on that device
        self.recovery_log: list[dict[str, Any]] = []
        #: devices given up on, with why: a worker failed to start there and nvidia-smi says a GPU needs a reset
        #: (:func:`harness.runner.gpu_health.reset_diagnosis`); no worker is started there again, and while every
        #: device is given up on, each queued case is answered ``error`` at once with that line
        self.broken_devices: dict[str, str] = {}
        self._health_asked: dict[str, float] = {}
        #: protocol invariants the pool checks on itself; both stay 0 (the reliability suite asserts it)
        self.anomalies: dict[str, int] = {"answered_twice": 0, "started_twice": 0}

        #: how new workers start ("forkserver" or "spawn"); ``start_fallback``: why forking was given up, if it was
        self.start_method = start_method
        self.start_fallback: str | None = None
        self._lock = threading.RLock()  # re-entrant: a Future callback may submit() from the dispatcher
        self._pending: collections.deque[_Item] = collections.deque()
        self._ids = itertools.count()
        self._names = itertools.count()
        self._workers: list[_Worker] = []
        self._start_failures: dict[str, int] = collections.defaultdict(int)  # consecutive, per device
        self._start_errors: dict[str, str] = {}
        self._next_start: dict[str, float] = collections.defaultdict(float)  # no start before (back-off)
        self._first_failure: dict[str, float] = {}
        self._down_since: float | None = None  # since when no device could start a worker
        self._lost_at: dict[str, list[float]] = collections.defaultdict(list)
        self._losses: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)  # spare sizing
        self._resume: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self._closing = False
        self._closed = False
        remove_stale_tmp()
        self._tmp = _make_tmp("pool")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # case files and attribution reruns (a fresh process each, several seconds on CUDA): two per device
        self._finisher = ThreadPoolExecutor(max_workers=2 * len(self.devices), thread_name_prefix="harness-finish")
        self._cancel_attribution = threading.Event()
        self._unfinished = 0
        self._idle = threading.Condition(self._lock)
        self._ready_cv = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._loop_guarded, name="harness-pool", daemon=True)
        self._thread.start()
        _LIVE_POOLS.add(self)

    # ---------------------------------------------------------------- public API
    def submit(
        self,
        case: "Case",
        *,
        values: Mapping[str, "torch.Tensor"] | None = None,
        timeout: float | None = None,
        record_ops: bool = False,
        attribute: bool = True,
    ) -> "Future[Result]":
        """Queue ``case``; the Future resolves to its Result. ``values`` override the recipes (not modified).
        ``attribute=False``: no attribution rerun for this case's device fault (the caller attributes the ones
        it keeps, e.g. the exploration its minimal cases: off the critical path)."""
        from harness.cases import Case

        if not isinstance(case, Case):
            raise TypeError(f"submit() needs a harness.cases.Case, got {type(case).__name__}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
        from harness.runner.worker import encode_values

        fut: Future = Future()
        item = _Item(
            next(self._ids),
            case,
            encode_values(values),
            values,
            fut,
            float(timeout or self.case_timeout),
            record_ops,
            queued_at=time.monotonic(),
            attribute=attribute,
        )
        with self._lock:
            if self._closing:
                raise PoolClosed("the pool is closed; create a new WorkerPool")
            self._pending.append(item)
            self._unfinished += 1
        self._wake()
        return fut

    def run(self, cases: Iterable["Case"], *, timeout: float | None = None) -> list[Result]:
        """Run every case; results in the order given."""
        futures = [self.submit(c, timeout=timeout) for c in cases]
        return [f.result() for f in futures]

    def run_one(self, case: "Case", **kw: Any) -> Result:
        """``submit(case, **kw).result()``."""
        return self.submit(case, **kw).result()

    def worker_count(self) -> int:
        """Active workers that are started and ready (spares not counted)."""
        with self._lock:
            return sum(1 for w in self._workers if w.state == "ready" and not w.spare)

    def target_count(self) -> int:
        """Active workers the pool keeps: ``len(devices) * workers_per_device``."""
        return len(self.devices) * self.workers_per_device

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> bool:
        """Block until every active worker (and spare: as many as the recent losses call for) is started;
        False on timeout."""
        deadline = time.monotonic() + timeout
        with self._ready_cv:
            while True:
                now = time.monotonic()
                want = sum(self.workers_per_device + self._spare_target(d, now) for d in self.devices)
                if sum(1 for w in self._workers if w.state == "ready") >= want:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    return False
                self._ready_cv.wait(min(left, 0.5))
        return True

    @property
    def tmp_dir(self) -> str:
        """The pool's temp folder (``harness-pool-<pid>-*``: worker logs, attribution files); removed on close."""
        return self._tmp

    def workers(self) -> list[dict[str, Any]]:
        """One dict per live worker: name, device, pid, state, spare, cases done."""
        with self._lock:
            return [
                {
                    "name": w.name,
                    "device": w.device,
                    "pid": w.proc.pid,
                    "state": w.state,
                    "spare": w.spare,
                    "cases": w.cases_done,
                    "start": w.start_method,
                    "info": dict(w.info),
                }
                for w in self._workers
            ]

    def close(self, *, cancel_pending: bool = False, timeout: float = 30.0) -> None:
        """Finish every submitted case, then stop the workers: each is asked to exit (status 0), and ended
        (SIGTERM, then SIGKILL) only if it has not within ``STOP_TIMEOUT`` s; the temp folder is removed.

        ``cancel_pending``: do not wait; queued and running cases are answered with ``error``
        (running ones have their worker killed). ``timeout``: seconds to wait for the dispatcher thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closing = True
            if cancel_pending:
                # faults already answered by their worker keep their verdict; attribution reruns not yet done
                # are skipped (running ones killed) rather than drained one by one
                self._cancel_attribution.set()
                while self._pending:
                    item = self._pending.popleft()
                    self._resolve_locked(
                        item, Result(Verdict.ERROR, f"{POOL_CLOSED} before this case ran", op=item.case.op)
                    )
                for w in self._workers:
                    if w.outstanding:
                        for item in w.outstanding:
                            self._resolve_locked(
                                item,
                                Result(
                                    Verdict.ERROR,
                                    f"{POOL_CLOSED} while this case was queued or running",
                                    op=item.case.op,
                                    worker=w.name,
                                    device=w.device,
                                ),
                            )
                        w.outstanding.clear()
                        w.proc.kill()
        self._wake()
        with self._idle:
            while self._unfinished > 0 and self._thread.is_alive():
                self._idle.wait(0.5)
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout)  # the dispatcher stops its workers (ask, wait, then end them) as it returns
        self._finisher.shutdown(wait=True)
        if self._workers:  # the dispatcher is stuck: end them from here
            self._stop_workers(0.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        _drop_tmp(self._tmp)
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(cancel_pending=exc[0] is not None)

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            if not self._closed:
                self.close(cancel_pending=True, timeout=5)
        except Exception:
            pass

    # ---------------------------------------------------------------- internals: workers
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _spawn(self, device: str, spare: bool) -> _Worker:
        from harness.runner.worker import import_time_env_changes, worker_main

        name = f"{device}#{next(self._names)}"
        log_path = os.path.join(self._tmp, f"{name.replace(':', '_').replace('#', '_')}.log")
        while True:
            method = self.start_method
            env = dict(os.environ) if method == "forkserver" else None
            if env is not None:
                try:
                    server_env = _fork_server_env()
                except Exception as e:  # noqa: BLE001 - no fork server here: fresh interpreters
                    self._give_up_forking(f"the fork server failed to start: {type(e).__name__}: {e}")
                    continue
                if server_env is not None and import_time_env_changes(server_env, env):
                    method, env = "spawn", None  # this worker only: the caller may change it back
            parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
            proc = multiprocessing.get_context(method).Process(
                target=worker_main,
                args=(child_conn, device, name, log_path, self._threads, env, _caller_files() if env else None),
                name=f"harness-worker-{name}",
                daemon=True,
            )
            try:
                proc.start()
            except Exception as e:  # noqa: BLE001 - the fork server would not start: fresh interpreters
                parent_conn.close()
                child_conn.close()
                if method != "forkserver":
                    raise
                self._give_up_forking(f"the fork server failed: {type(e).__name__}: {e}")
                continue
            break
        child_conn.close()
        w = _Worker(name, device, proc, parent_conn, log_path, spare, time.monotonic(), start_method=method)
        self._workers.append(w)
        return w

    def _give_up_forking(self, why: str) -> None:
        if self.start_method == "forkserver":
            self.start_method = "spawn"
            self.start_fallback = why

    def _ensure_workers(self) -> None:
        """Keep each device at its count of active workers (promoting ready spares first) and spares.

        With forked workers, nothing is started until the fork server has finished its imports
        (:func:`_fork_server_ready`): a fork request waits for them, and this runs under the pool's lock, which
        ``submit`` and ``close`` need."""
        if self._closing and not self._pending and not any(w.outstanding for w in self._workers):
            return
        if self.start_method == "forkserver" and not _fork_server_ready():
            return
        now = time.monotonic()
        for dev in self.devices:
            if dev in self.broken_devices:
                continue  # its GPU needs a reset: every start would fail
            live = [w for w in self._workers if w.device == dev and w.state in ("starting", "ready")]
            if self._start_failures[dev] and (
                now < self._next_start[dev] or not self._pending or any(w.state == "starting" for w in live)
            ):
                continue  # starts fail here: one at a time, after the back-off, while cases wait
            active = [w for w in live if not w.spare]
            spares = [w for w in live if w.spare]
            while len(active) < self.workers_per_device:
                ready_spares = [s for s in spares if s.state == "ready"]
                if ready_spares:
                    s = ready_spares[0]
                    s.spare = False
                    spares.remove(s)
                    active.append(s)
                elif spares:
                    s = spares.pop(0)  # still starting: it becomes active when ready
                    s.spare = False
                    active.append(s)
                else:
                    active.append(self._spawn(dev, spare=False))
                    if self._start_failures[dev]:
                        break
            want = self._spare_target(dev, now)
            while len(spares) < want and not self._closing and not self._start_failures[dev]:
                spares.append(self._spawn(dev, spare=True))
            if self._lost_at[dev] and all(w.state == "ready" for w in active):
                for t in self._lost_at[dev]:
                    self.recoveries.append(now - t)
                self._lost_at[dev].clear()

    def _spare_target(self, dev: str, now: float) -> int:
        """Spares ``dev`` keeps now: ``spares``, plus one per active worker it lost in the last ``SPARE_WINDOW_S``
        seconds, at most ``max_spares`` -- faults come in bursts (one kernel, many layouts), and a burst that
        outruns the spares waits for fresh interpreters."""
        if not self.spares:
            return 0
        losses = self._losses[dev]
        while losses and now - losses[0] > SPARE_WINDOW_S:
            losses.popleft()
        return min(self.max_spares, self.spares + len(losses))

    def spare_counts(self) -> dict[str, int]:
        """Per device, the spares it keeps now (``spares`` raised by recent losses, at most ``max_spares``)."""
        with self._lock:
            now = time.monotonic()
            return {dev: self._spare_target(dev, now) for dev in self.devices}

    def _stop_workers(self, timeout: float) -> None:
        """Ask every worker to exit, wait up to ``timeout`` s for them, then SIGTERM, then SIGKILL; reap them.

        A worker still starting is sent SIGTERM at once: it holds no case, and it would read the request only after
        its imports and warm-up (seconds on a loaded machine, which a closing run would spend waiting)."""
        with self._lock:
            workers = list(self._workers)
            starting = [w for w in workers if w.state == "starting"]
        for w in workers:
            try:
                w.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for w in starting:
            try:
                w.proc.terminate()
            except (ValueError, OSError):
                pass
        alive = _wait_exit([w.proc for w in workers if w not in starting], timeout)
        alive += _wait_exit([w.proc for w in starting], 0.0)
        for p in alive:
            try:
                p.terminate()
            except (ValueError, OSError):
                pass
        for p in _wait_exit(alive, 2.0):
            try:
                p.kill()
            except (ValueError, OSError):
                pass
        _wait_exit(alive, 5.0)
        with self._lock:
            for w in workers:
                self._reap(w)

    def _end_workers_now(self) -> None:
        """SIGTERM handler: end the workers at once (the process is about to die). Takes no lock: the
        dispatcher may reap them meanwhile, so this works on pids and sentinels it copied, best effort."""
        self._closing = True
        procs = []
        for w in list(self._workers):
            try:
                procs.append((w.proc.pid, w.proc.sentinel))
            except ValueError:  # closed by the dispatcher already
                pass
        for pid, _ in procs:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            deadline = time.monotonic() + 2.0
            left = [s for _, s in procs]
            while left and time.monotonic() < deadline:
                done = multiprocessing.connection.wait(left, timeout=max(0.0, deadline - time.monotonic()))
                left = [s for s in left if s not in done]
        except (OSError, ValueError):
            pass

    def _reap(self, w: _Worker) -> None:
        if w.state == "dead" and w not in self._workers:
            return
        w.state = "dead"
        try:
            w.proc.join(1)
        except (ValueError, AssertionError):
            pass
        self.exits.append((w.name, w.proc.exitcode))
        try:
            w.conn.close()
        except OSError:
            pass
        if w in self._workers:
            self._workers.remove(w)
        try:
            w.proc.close()
        except ValueError:
            pass
        try:
            os.unlink(w.log_path)
        except OSError:
            pass

    def _log_tail(self, w: _Worker, n: int = 4000) -> str:
        try:
            with open(w.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _lose(self, w: _Worker, reason: str, requeue_from: int, op: str | None = None) -> None:
        """Take ``w`` out of rotation; re-queue its cases from index ``requeue_from`` (not yet started).
        ``op``: the case charged with the loss, if any."""
        now = time.monotonic()
        items = list(w.outstanding)[requeue_from:]
        w.outstanding.clear()
        for item in reversed(items):
            item.queued_at, item.started_at = now, None
            self._pending.appendleft(item)
        if w.state in ("ready", "retiring") and not w.spare:
            self._lost_at[w.device].append(now)
            self._losses[w.device].append(now)
        self.replaced.append((w.name, reason))
        self._resume[w.device].append({"reason": reason, "op": op, "device": w.device, "lost_at": now})

    def _start_failed(self, w: _Worker, why: str, reason: str) -> None:
        """A worker on ``w.device`` failed to start: back off before the next try there."""
        now = time.monotonic()
        dev = w.device
        self._start_failures[dev] += 1
        if w.start_method == "forkserver" and self._start_failures[dev] >= FORKED_START_FAILURES:
            self._give_up_forking(f"{self._start_failures[dev]} forked worker starts in a row failed: {why[:200]}")
        self._first_failure.setdefault(dev, now)
        self._start_errors[dev] = why
        self._next_start[dev] = now + min(MAX_START_BACKOFF, START_BACKOFF * 2 ** (self._start_failures[dev] - 1))
        if (
            self._down_since is None
            and all(self._start_failures[d] for d in self.devices)
            and not any(x.state == "ready" and not x.spare for x in self._workers)
        ):
            self._down_since = now
        self._lose(w, reason, 0)
        if dev.startswith("cuda") and now - self._health_asked.get(dev, -GPU_HEALTH_RECHECK_S) >= GPU_HEALTH_RECHECK_S:
            self._health_asked[dev] = now
            threading.Thread(
                target=self._check_gpu_health, args=(dev, why), name="harness-gpu-health", daemon=True
            ).start()

    def _check_gpu_health(self, dev: str, why: str) -> None:
        """Beside the dispatcher (nvidia-smi may take seconds on a failing GPU): give ``dev`` up if its GPU needs a
        reset."""
        from harness.runner.devices import probed_uuid
        from harness.runner.gpu_health import reset_diagnosis

        said = next((ln.strip() for ln in reversed(why.strip().splitlines()) if "Error" in ln), None)
        try:
            diagnosis = reset_diagnosis(said, uuid=probed_uuid(dev))
        except Exception:  # noqa: BLE001 - a diagnosis only; the starts go on being retried
            return
        if not diagnosis:
            return
        with self._lock:
            if self._closed:
                return
            self.broken_devices[dev] = diagnosis
            self._wake()  # under the lock: close() cannot have closed the pipe

    def _case_started(self, w: _Worker, item: _Item) -> None:
        now = time.monotonic()
        item.started_at = now
        item.starts += 1
        if item.starts > 1:
            self.anomalies["started_twice"] += 1
        for entry in self._resume.pop(w.device, []):
            lost_at = entry.pop("lost_at")
            self.recovery_log.append(dict(entry, seconds=now - lost_at))

    # ---------------------------------------------------------------- internals: results
    def _resolve_locked(self, item: _Item, result: Result) -> None:
        if item.future.done() and not item.future.cancelled():  # cancelled by its caller: still counted once
            self.anomalies["answered_twice"] += 1
            return
        if not item.future.done():
            item.future.set_result(result)
        self._unfinished -= 1
        self._idle.notify_all()

    def _finish(self, item: _Item, result: Result) -> None:
        """Called in the dispatcher with the lock held: resolve now, or hand to the finisher thread."""
        needs_file = self.cases_dir is not None and result.verdict.failed
        needs_attr = self.attribute and item.attribute and result.verdict is Verdict.DEVICE_FAULT
        if not (needs_file or needs_attr):
            self._resolve_locked(item, result)
            return
        self._finisher.submit(self._finish_slow, item, result)

    def attribute_result(self, case: "Case", result: Result, timeout: float | None = None) -> Result:
        """The attribution rerun of ``case``'s device fault, now, in this thread (as the pool does for a case
        submitted with ``attribute=True``), within ``timeout`` s (default the pool's); returns ``result`` with the
        attribution merged in."""
        tmpdir = tempfile.mkdtemp(prefix="harness-attr-", dir=self._tmp)
        try:
            path = save_failure(case, dataclasses.replace(result), tmpdir)
            return dataclasses.replace(result, attribution=self._attribution_of(path, result, timeout))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _attribution_of(self, path: str | os.PathLike, result: Result, timeout: float | None) -> dict[str, Any]:
        """``result``'s attribution merged with its case file's rerun (``skipped`` when the pool's close cancelled it)."""
        try:
            rerun = attribution_rerun(
                path,
                result.device or "cpu",
                sanitizer=self.sanitizer_policy,
                case_timeout=self.case_timeout,
                timeout=timeout or self._attribution_timeout,
                cancel=self._cancel_attribution,
            )
            return merge_attribution(result.attribution, rerun)
        except Cancelled:
            return dict(result.attribution or {}, skipped=ATTRIBUTION_SKIPPED)

    def _finish_slow(self, item: _Item, result: Result) -> None:
        try:
            self._finish_slow_inner(item, result)
        except BaseException as e:  # noqa: BLE001 - the case must still get its result
            result.message += f"\n(harness: writing/attributing the case failed: {type(e).__name__}: {e})"
        finally:
            with self._lock:
                self._resolve_locked(item, result)

    def _finish_slow_inner(self, item: _Item, result: Result) -> None:
        tmpdir = None
        path: Path | None = None
        values = _saved_tensors(item.case, item.values)  # generated once for every file written below
        if self.cases_dir is not None and result.verdict.failed:
            path = save_failure(item.case, result, self.cases_dir, values=values)
        if self.attribute and item.attribute and result.verdict is Verdict.DEVICE_FAULT:
            if path is None:
                tmpdir = tempfile.mkdtemp(prefix="harness-attr-", dir=self._tmp)
                path = save_failure(item.case, dataclasses.replace(result), tmpdir, values=values)
            result.attribution = self._attribution_of(path, result, None)
            if self.cases_dir is not None:
                save_failure(
                    item.case, result, self.cases_dir, values=values, name=Path(path).stem
                )  # rewrite with the attribution
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)

    # ---------------------------------------------------------------- internals: the loop
    def _loop_guarded(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - never leave a Future hanging
            import traceback

            msg = f"harness pool dispatcher crashed: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            with self._lock:
                items = list(self._pending)
                self._pending.clear()
                for w in self._workers:
                    items.extend(w.outstanding)
                    w.outstanding.clear()
                for item in items:
                    self._resolve_locked(item, Result(Verdict.ERROR, msg, op=item.case.op))
        finally:
            # this thread spawned the workers (their parent-death signal follows it): stop them before it ends
            self._stop_workers(STOP_TIMEOUT)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._ensure_workers()
                self._fail_waiting_cases()
                self._assign()
                waits: list[Any] = [self._wake_r]
                by_obj: dict[Any, _Worker] = {}
                for w in self._workers:
                    waits.append(w.conn)
                    waits.append(w.proc.sentinel)
                    by_obj[w.conn] = w
                    by_obj[w.proc.sentinel] = w
                deadline = self._next_deadline()
            wait_s = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            if self.start_method == "forkserver" and not _FORK_SERVER_READY.is_set():
                wait_s = min(wait_s, FORK_SERVER_POLL_S)  # workers start as soon as the server is ready
            ready = multiprocessing.connection.wait(waits, timeout=wait_s)
            with self._lock:
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 65536)
                    except OSError:
                        pass
                handled: set[int] = set()
                for obj in ready:
                    w = by_obj.get(obj)
                    if w is None or id(w) in handled or w.state == "dead":
                        continue
                    handled.add(id(w))
                    self._drain(w)
                    if not w.proc.is_alive():
                        w.proc.join(0.1)
                        if w.proc.exitcode is not None:
                            self._drain(w)
                            self._on_death(w)
                self._check_timeouts()

    def _assign(self) -> None:
        if not self._pending:
            return
        ready = [w for w in self._workers if w.state == "ready" and not w.spare]
        while self._pending and ready:
            ready.sort(key=lambda w: len(w.outstanding))
            w = ready[0]
            if len(w.outstanding) >= self.prefetch:
                break
            if w.outstanding and self._pending[0].blob is not None:
                # stored values can exceed the pipe's buffer: a send to a busy worker would block
                # this loop (and with it timeouts and results) until that worker reads
                ready.remove(w)
                continue
            if not w.proc.is_alive():  # died since the last wait: its death is handled there, not charged
                ready.remove(w)
                continue
            item = self._pending.popleft()
            try:
                w.conn.send(("run", item.id, item.case, item.blob, item.record_ops))
            except (OSError, ValueError, BrokenPipeError):
                self._pending.appendleft(item)
                ready.remove(w)
                continue
            item.sent_at, item.started_at = time.monotonic(), None
            w.outstanding.append(item)

    def _deadline_of(self, w: _Worker) -> float | None:
        """When ``w`` is overdue: its running case's timeout, or (not yet acknowledged) as long again for the
        worker to take the case it was sent; a starting worker's start timeout."""
        if w.state == "ready" and w.outstanding:
            item = w.outstanding[0]
            if item.started_at is not None:
                return item.started_at + item.timeout
            return max(item.sent_at, w.answered_at) + item.timeout
        if w.state == "starting":
            return w.started + self.start_timeout
        if w.state == "retiring":
            return w.retired_at + RETIRE_TIMEOUT
        return None

    def _next_deadline(self) -> float | None:
        deadlines = [d for d in map(self._deadline_of, self._workers) if d is not None]
        for dev in self.devices:  # the next retry of a failed start (none on a device given up, none while one starts)
            if (
                self._start_failures[dev]
                and self._pending
                and dev not in self.broken_devices
                and not any(w.device == dev and w.state == "starting" for w in self._workers)
            ):
                deadlines.append(self._next_start[dev])
        if self._down_since is not None:
            deadlines.extend(max(i.queued_at, self._down_since) + i.timeout for i in self._pending)
        return min(deadlines) if deadlines else None

    def _drain(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError, ValueError):
                return
            kind = msg[0]
            if kind == "ready":
                w.state = "ready"
                w.info = msg[1]
                self._start_failures[w.device] = 0
                self._first_failure.pop(w.device, None)
                self._down_since = None
                self._ready_cv.notify_all()
            elif kind == "init_error":
                w.init_error = msg[1]
            elif kind == "fork_unfit":
                w.fork_unfit = msg[1]
            elif kind in ("started", "result"):
                case_id = msg[1]
                if not w.outstanding or w.outstanding[0].id != case_id:  # pragma: no cover - protocol bug
                    raise RuntimeError(
                        f"worker {w.name} sent {kind!r} for case {case_id}, expected "
                        f"{w.outstanding[0].id if w.outstanding else None}"
                    )
                if kind == "started":
                    self._case_started(w, w.outstanding[0])
                    continue
                item = w.outstanding.popleft()
                w.cases_done += 1
                w.answered_at = time.monotonic()
                result = Result.from_json(msg[2])
                if result.verdict is Verdict.DEVICE_FAULT:
                    w.state = "retiring"
                    w.retired_at = time.monotonic()
                    self._lose(w, "device_fault", 0, op=item.case.op)
                self._finish(item, result)

    def _crash_result(self, w: _Worker, item: _Item, what: str, code: int | None) -> Result:
        log = self._log_tail(w)
        att = {"frame": _faulthandler_frame(log), "log": log[-1500:]} if log.strip() else None
        result = Result(
            Verdict.WORKER_CRASH,
            f"worker {w.name} (pid {w.proc.pid}) {_exit_text(code)} {what}",
            op=item.case.op,
            device=w.device,
            worker=w.name,
            attribution=att,
            env=dict(w.info),
            duration=time.monotonic() - (item.started_at or item.sent_at),
            layouts=item.case.describe_layouts(),
        )
        result.metrics["exitcode"] = code
        return result

    def _not_started(self, w: _Worker, reason: str) -> None:
        """``w`` is gone before it started the case it was sent: resend its cases, blaming none of them
        (unless the first has now lost ``MAX_RESENDS`` workers this way)."""
        item = w.outstanding[0] if w.outstanding else None
        if item is not None:
            item.resends += 1
        if item is not None and item.resends >= MAX_RESENDS:
            result = self._crash_result(
                w,
                item,
                f"after this case was sent and before it started it; "
                f"{item.resends} workers in a row did so (it may kill them as it arrives)",
                w.proc.exitcode,
            )
            self._lose(w, reason, 1, op=item.case.op)
            self._finish(item, result)
        else:
            self._lose(w, reason, 0)

    def _on_death(self, w: _Worker) -> None:
        code = w.proc.exitcode
        if (
            w.start_method == "forkserver"
            and not w.fork_unfit
            and code == _SERVER_GONE_EXIT
            and _fork_server_gone(within=1.0)
        ):
            # the server's death took its forked workers with it (their parent-death signal): no case is to blame
            self._give_up_forking(f"the fork server died ({_exit_text(code)} for its workers)")
            if w.state == "ready":  # a starting worker is no failed start, a retiring one has answered its case
                self._lose(w, "the fork server died", 0)
            self._reap(w)
            return
        if w.state == "starting" and w.fork_unfit:
            self._give_up_forking(w.fork_unfit)  # not a failed start: its replacement is a fresh interpreter
        elif w.state == "starting":
            why = w.init_error or f"worker {_exit_text(code)} while starting:\n{self._log_tail(w)[-1500:]}"
            self._start_failed(w, why, f"start failed ({_exit_text(code)})")
        elif w.state == "retiring":
            pass  # exited after a device fault, as it should
        elif w.outstanding and w.outstanding[0].started_at is not None:
            item = w.outstanding[0]
            result = self._crash_result(w, item, "while running this case", code)
            self._lose(w, f"crash ({_exit_text(code)})", 1, op=item.case.op)
            self._finish(item, result)
        elif w.outstanding:
            self._not_started(w, f"died between cases ({_exit_text(code)})")
        else:
            self._lose(w, f"died idle ({_exit_text(code)})", 0)
        self._reap(w)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            deadline = self._deadline_of(w)
            if deadline is None or now <= deadline:
                continue
            w.proc.kill()
            w.proc.join(5)
            if w.state == "ready":
                self._drain(w)
                item = w.outstanding[0] if w.outstanding else None
                if item is None:
                    self._lose(w, "killed after answering", 0)
                elif item.started_at is None:
                    self._not_started(w, f"did not take the case it was sent within {item.timeout:g} s")
                else:
                    result = Result(
                        Verdict.TIMEOUT,
                        f"ran past the {item.timeout:g} s case timeout; worker {w.name} was killed and replaced",
                        op=item.case.op,
                        device=w.device,
                        worker=w.name,
                        duration=now - item.started_at,
                        env=dict(w.info),
                        layouts=item.case.describe_layouts(),
                    )
                    self._lose(w, "timeout", 1, op=item.case.op)
                    self._finish(item, result)
            elif w.state == "starting":
                self._start_failed(w, f"worker did not start within {self.start_timeout:g} s", "start timeout")
            # retiring: it answered its device fault but did not exit
            self._reap(w)

    def _fail_waiting_cases(self) -> None:
        """While no device can start a worker, answer each queued case that has waited its timeout for one; every
        queued case at once when every device is given up on (``broken_devices``)."""
        given_up = all(d in self.broken_devices for d in self.devices) and not any(
            w.state in ("starting", "ready") for w in self._workers
        )  # no worker runs or will ever start: answer now
        if (self._down_since is None and not given_up) or not self._pending:
            return
        now = time.monotonic()
        keep: collections.deque[_Item] = collections.deque()
        while self._pending:
            item = self._pending.popleft()
            waited = now - (item.queued_at if self._down_since is None else max(item.queued_at, self._down_since))
            if waited < item.timeout and not given_up:
                keep.append(item)
                continue
            first = "; ".join(
                f"{d}: {self.broken_devices.get(d) or self._start_errors.get(d, '?').strip().splitlines()[0]}"
                for d in self.devices
            )
            detail = "\n".join(
                f"{d}: {self._start_failures[d]} failed start(s) in {now - self._first_failure.get(d, now):.1f} s, "
                + ("given up on (its GPU needs a reset)" if d in self.broken_devices else "retrying with back-off")
                + f"; last error:\n{self._start_errors.get(d, '?')[-1500:]}"
                for d in self.devices
            )
            self._resolve_locked(
                item,
                Result(
                    Verdict.ERROR,
                    f"worker start failed: {first}\n("
                    + (
                        "no worker will start on this pool's devices"
                        if given_up
                        else f"this case waited {waited:.1f} s, its timeout, for a worker"
                    )
                    + f"; the harness could not run it)\n{detail}",
                    op=item.case.op,
                ),
            )
        self._pending = keep


#: what an attribution rerun adds: the op (and call) named, its frames, the sanitizer's record and the method
_RERUN_KEYS = (
    "op",
    "frame",
    "ops_tail",
    "call",
    "call_frame",
    "kernel",
    "access",
    "host_frame",
    "extension",
    "launch_frame",
    "method",
    "sanitizer",
    "sanitizer_errors",
    "sanitizer_unusable",
    "log",
)


_PRELOAD_LOCK = threading.Lock()
#: set once a fork through this process's fork server has been answered: it has finished importing PRELOAD_MODULE
_FORK_SERVER_READY = threading.Event()
_FORK_WARMER: list[threading.Thread] = []  # the thread that waits for that answer (one per process)
_EXITING = threading.Event()  # set at interpreter exit: no fork server is started after it
#: seconds between a dispatcher's looks at whether the fork server is ready (only while it is not)
FORK_SERVER_POLL_S = 0.05


def _fork_server_ready() -> bool:
    """Whether a fork through the server is answered at once. Until it is, a thread (one per process) starts the
    server and forks a child that does nothing through it; the first fork waits
    until the server has imported :data:`PRELOAD_MODULE` (1.7 s on 2 idle cores, ~9 s on a loaded 16-core GPU
    host), and that wait must not hold a pool's lock. A server that fails to start or to fork counts as ready:
    the pool's own start then meets the failure and starts fresh interpreters instead."""
    if _FORK_SERVER_READY.is_set():
        return True
    with _PRELOAD_LOCK:
        if not _FORK_WARMER or not _FORK_WARMER[0].is_alive():
            if not _FORK_WARMER:
                atexit.register(_end_unready_fork_server)
            _FORK_WARMER[:] = [threading.Thread(target=_warm_fork_server, name="harness-fork-warm", daemon=True)]
            _FORK_WARMER[0].start()
    return _FORK_SERVER_READY.is_set()


def _end_unready_fork_server() -> None:
    """At exit: end a fork server still in its imports. It would finish them before it saw this process gone, and
    until then it holds this process's stdout and stderr open (a pipe reading them would wait for it).  SIGKILL: the
    server has forked nothing yet and holds nothing to save, and where this process was started with SIGTERM
    ignored the server inherits that, and a SIGTERM here waited out the whole import (the test's 40 s)."""
    _EXITING.set()
    from multiprocessing import forkserver

    with _PRELOAD_LOCK:  # a server start under way completes first; none begins after this
        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid and not _FORK_SERVER_READY.is_set():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _warm_fork_server() -> None:
    try:
        _fork_server_env()
        # a builtin as the child's work: it needs no import there (and importing harness.runner.preload here would
        # run the server's imports in this process)
        probe = multiprocessing.get_context("forkserver").Process(
            target=os.getpid, name="harness-fork-probe", daemon=True
        )
        probe.start()
        probe.join()
    except Exception:  # noqa: BLE001 - the pool's own start reports it (and falls back to fresh interpreters)
        pass
    finally:
        _FORK_SERVER_READY.set()


#: the environment the running fork server started with, when this process started it (pid -> environ)
_SERVER_ENVS: dict[int, dict[str, str]] = {}


#: the exit code multiprocessing gives a forked worker whose status its fork server could not report (it died)
_SERVER_GONE_EXIT = 255


def _fork_server_gone(within: float) -> bool:
    """Whether the fork server this process started has ended, or ends within ``within`` s (it is not reaped here:
    ``forkserver.ensure_running`` does that). Its workers' deaths can be seen while it is still exiting."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):  # no pidfd here: ask whether it still exists
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        return False
    try:
        return bool(select.select([fd], [], [], within)[0])
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _caller_files() -> dict[str, str | None]:
    """The files this process imports ``harness`` and ``torch`` from (a forked worker checks its server's)."""
    import importlib.util

    import harness

    torch_mod = sys.modules.get("torch")
    spec = None if torch_mod is not None else importlib.util.find_spec("torch")
    return {
        "harness": getattr(harness, "__file__", None),
        "torch": getattr(torch_mod, "__file__", None) if torch_mod is not None else (spec.origin if spec else None),
    }


def _fork_server_env() -> dict[str, str] | None:
    """Make sure the fork server runs, preloading :data:`PRELOAD_MODULE` (one server per process, shared by every
    pool, living as long as this process); the environment it started with when this process started it, else
    None (another component started it: the forked child checks its environment itself)."""
    from multiprocessing import forkserver

    with _PRELOAD_LOCK:
        if _EXITING.is_set():
            raise RuntimeError("the interpreter is exiting: no fork server is started")
        server = forkserver._forkserver  # the module's singleton; its preload list is read when it starts
        preload = list(getattr(server, "_preload_modules", ()))
        if PRELOAD_MODULE not in preload:
            forkserver.set_forkserver_preload([*preload, PRELOAD_MODULE])
        before = getattr(server, "_forkserver_pid", None)
        env = dict(os.environ)
        forkserver.ensure_running()
        pid = getattr(server, "_forkserver_pid", None)
        if pid is not None and pid != before:
            _SERVER_ENVS.clear()
            _SERVER_ENVS[pid] = env
            if before is not None:  # a restarted server imports again: not ready until a fork is answered
                _FORK_SERVER_READY.clear()
        return _SERVER_ENVS.get(pid) if pid is not None else None


def merge_attribution(first: Mapping[str, Any] | None, rerun: Result) -> dict[str, Any]:
    """Attribution of a device fault: where it surfaced first, plus what the blocking rerun named."""
    att = dict(first or {})
    ra = dict(rerun.attribution or {})
    att["rerun_verdict"] = rerun.verdict.value
    att["reproduced"] = rerun.verdict is Verdict.DEVICE_FAULT
    att["launch_blocking"] = True
    for key in _RERUN_KEYS:
        if ra.get(key):
            att[key] = ra[key]
    if not att["reproduced"]:
        att["note"] = (
            f"the rerun with CUDA_LAUNCH_BLOCKING=1 in a fresh process gave {rerun.verdict.value}"
            f" ({rerun.message.splitlines()[0] if rerun.message else ''}); the fault may depend on "
            "earlier cases or on timing"
        )
    return att
