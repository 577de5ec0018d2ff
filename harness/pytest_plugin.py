"""pytest plugin: worker pools as fixtures, case files for failures, attribution in the report.

Enabled by the repository's ``conftest.py`` (``pytest_plugins = ["harness.pytest_plugin"]``).

Options (group "harness"):
  --harness-cases-dir DIR        where failing cases are written (default: harness-cases)
  --harness-case-timeout S       seconds per case before its worker is killed (default 120)
  --harness-devices LIST         "cpu", "cuda", "cuda:0,cuda:1" (default: every visible GPU)
  --harness-workers-per-device N active workers per device (default 1)
  --harness-sanitizer            attribute every device fault under compute-sanitizer (default: auto)
  --harness-no-attribute         skip the CUDA_LAUNCH_BLOCKING=1 rerun of device faults

Fixtures: ``pool`` (session; GPU workers; skips with the reason when there is no CUDA
device -- probed in a subprocess, this process never initialises CUDA), ``cpu_pool``
(session; CPU workers), ``case_runner`` / ``cpu_case_runner`` (a :class:`CaseRunner`
bound to the current test).

Helpers for test code: :func:`run_in_pool` and :func:`assert_case_passes`. On failure the
case is written to ``<cases dir>/<test id>.json`` (+ ``.safetensors``) and an AssertionError
carries the verdict, the numbers, the layouts, the path and the replay command.

Hypothesis: every failing example overwrites the same file (named after the test), and
Hypothesis replays the shrunk example last, so the file left behind is the minimal one.
Attribution of a device fault (a fresh ``CUDA_LAUNCH_BLOCKING=1`` process, 5-7 s on a GPU)
is therefore deferred to the end of the failing test and done once, for that final case;
it is added to the report as a "harness attribution" section and written into the case file.
Tests that drive the pool from Hypothesis should use ``deadline=None`` (a replaced worker
takes seconds).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pytest

from harness.verdicts import Result, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case
    from harness.runner.pool import WorkerPool

__all__ = [
    "CaseRunner",
    "run_in_pool",
    "assert_case_passes",
    "get_pool",
    "cases_dir",
    "pytest_addoption",
    "pytest_configure",
]


class _Session:
    """Per-pytest-process state: options, lazily started pools, the current test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cases_dir = Path(config.getoption("--harness-cases-dir"))
        self.case_timeout = float(config.getoption("--harness-case-timeout"))
        self.devices = config.getoption("--harness-devices")
        self.workers_per_device = int(config.getoption("--harness-workers-per-device"))
        # attribution reruns under compute-sanitizer: always when asked, else wherever it is installed (auto)
        self.sanitizer: bool | None = True if config.getoption("--harness-sanitizer") else None
        self.attribute = not config.getoption("--harness-no-attribute")
        self.pools: dict[str, "WorkerPool"] = {}
        self.lock = threading.Lock()
        self.current: str | None = None
        #: nodeid -> (case path, device) of the last device fault written by that test
        self.pending_attribution: dict[str, tuple[str, str]] = {}

    def gpu_devices(self) -> list[str] | None:
        """GPU devices for the ``pool`` fixture, or None (with the skip reason) when there are none."""
        from harness.runner.pool import probe_devices, resolve_devices

        if self.devices:
            devs = resolve_devices(self.devices)
            return devs if any(d.startswith("cuda") for d in devs) else None
        return probe_devices() or None

    def pool(self, kind: str) -> "WorkerPool":
        from harness.runner.pool import WorkerPool, probe_cuda

        with self.lock:
            if kind not in self.pools:
                if kind == "gpu":
                    devs = self.gpu_devices()
                    if devs is None:
                        info = probe_cuda()
                        pytest.skip(
                            f"no CUDA device (probed in a subprocess: "
                            f"{info.get('error') or 'torch ' + str(info.get('torch')) + ' sees 0 GPUs'})"
                        )
                else:
                    devs = ["cpu"]
                # attribution is done once per failing test, at report time (see the module doc)
                self.pools[kind] = WorkerPool(
                    devs,
                    self.workers_per_device,
                    case_timeout=self.case_timeout,
                    attribute=False,
                    sanitizer=self.sanitizer,
                )
            return self.pools[kind]

    def close(self) -> None:
        with self.lock:
            pools, self.pools = dict(self.pools), {}
        for p in pools.values():
            p.close(cancel_pending=True)


_SESSION: _Session | None = None
#: sessions of enclosing pytest runs (pytester runs pytest inside pytest, in-process)
_OUTER: list[_Session | None] = []


def _session() -> _Session:
    if _SESSION is None:
        raise RuntimeError(
            "the harness pytest plugin is not active: add pytest_plugins = ['harness.pytest_plugin'] to conftest.py"
        )
    return _SESSION


# ------------------------------------------------------------------------------ hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("harness")
    g.addoption(
        "--harness-cases-dir",
        default="harness-cases",
        help="directory for failing cases (JSON + safetensors); default: harness-cases",
    )
    g.addoption(
        "--harness-case-timeout",
        type=float,
        default=120.0,
        help="seconds per case before its worker is killed and the verdict is timeout (default 120)",
    )
    g.addoption(
        "--harness-devices",
        default=None,
        help='devices for the pool fixture: "cpu", "cuda", "cuda:0,cuda:1" (default: every visible GPU)',
    )
    g.addoption("--harness-workers-per-device", type=int, default=1, help="active workers per device (default 1)")
    g.addoption(
        "--harness-sanitizer",
        action="store_true",
        default=False,
        help="attribute every device fault under compute-sanitizer --tool memcheck (default: on CUDA whenever it "
        "is installed and works)",
    )
    g.addoption(
        "--harness-no-attribute",
        action="store_true",
        default=False,
        help="do not rerun device faults with CUDA_LAUNCH_BLOCKING=1 to name the faulting op",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION
    timeout = config.getoption("--harness-case-timeout")
    if timeout is not None and timeout <= 0:
        raise pytest.UsageError(f"--harness-case-timeout={timeout} must be > 0 seconds")
    wpd = config.getoption("--harness-workers-per-device")
    if wpd is not None and wpd < 1:
        raise pytest.UsageError(f"--harness-workers-per-device={wpd} must be >= 1")
    _OUTER.append(_SESSION)
    _SESSION = _Session(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _SESSION
    if _SESSION is not None and _SESSION.config is config:
        _SESSION.close()
        _SESSION = _OUTER.pop() if _OUTER else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SESSION is not None:
        _SESSION.current = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    s = _SESSION
    if s is None or report.when != "call":
        return
    pending = s.pending_attribution.pop(item.nodeid, None)
    if pending is None or not report.failed or not s.attribute:
        return
    path, device = pending
    try:
        text = _attribute_case(path, device, s.sanitizer, s.case_timeout)
    except Exception as e:  # the report must survive a failed attribution
        text = f"attribution failed: {type(e).__name__}: {e}"
    report.sections.append(("harness attribution", text))


def _attribute_case(path: str, device: str, sanitizer: bool | None, timeout: float) -> str:
    """Rerun a written device-fault case with CUDA_LAUNCH_BLOCKING=1; rewrite it with the attribution."""
    import dataclasses

    from harness.cases import load_case, save_case
    from harness.runner.pool import attribution_rerun, merge_attribution

    rerun = attribution_rerun(path, device, sanitizer=sanitizer, case_timeout=timeout)
    case, tensors = load_case(path)
    verdict = dict(case.verdict)
    att = merge_attribution(verdict.get("attribution"), rerun)
    verdict["attribution"] = {k: v for k, v in att.items() if k != "log"}
    save_case(dataclasses.replace(case, verdict=verdict), path, tensors=tensors or None)
    from harness.report import attribution_text

    lines = [f"faulting op: {att.get('op') or '?'} (rerun with CUDA_LAUNCH_BLOCKING=1: {rerun.verdict.value})"]
    if att.get("method"):
        lines.insert(0, attribution_text(att))
    for key in ("frame", "surfaced_at", "note"):
        if att.get(key):
            lines.append(f"{key}: {att[key]}")
    if att.get("ops_tail"):
        lines.append("last ops: " + " -> ".join(att["ops_tail"]))
    if att.get("sanitizer"):
        lines.append("compute-sanitizer:\n" + str(att["sanitizer"]))
    lines.append(f"case file (updated): {path}")
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"harness runner: failing cases -> {config.getoption('--harness-cases-dir')}/, "
        f"case timeout {config.getoption('--harness-case-timeout'):g} s"
    ]


# ------------------------------------------------------------------------------ helpers


def get_pool(device: str = "auto") -> "WorkerPool":
    """The session's pool: "gpu" (skips the test without CUDA), "cpu", or "auto" (GPU if present)."""
    s = _session()
    if device == "auto":
        device = "gpu" if s.gpu_devices() else "cpu"
    if device in ("gpu", "cuda"):
        return s.pool("gpu")
    if device == "cpu":
        return s.pool("cpu")
    raise ValueError(f"device={device!r}; use 'auto', 'gpu' or 'cpu'")


def cases_dir() -> Path:
    """Where this session writes failing cases (``--harness-cases-dir``)."""
    return _session().cases_dir


def _test_stem(nodeid: str | None) -> str:
    base = nodeid or "case"
    return re.sub(r"[^A-Za-z0-9-]+", "_", base).strip("_")[:150] or "case"


def run_in_pool(case: "Case", *, device: str = "auto", pool: "WorkerPool | None" = None, **submit_kw: Any) -> Result:
    """Run one case through the session pool (or ``pool``) and return its Result (no assertion)."""
    p = pool or get_pool(device)
    return p.submit(case, **submit_kw).result()


class CaseRunner:
    """Runs cases for one test: :meth:`run`, :meth:`assert_passes`. Created by the ``case_runner`` fixtures."""

    def __init__(self, pool: "WorkerPool", nodeid: str | None, cases_dir_: Path) -> None:
        self.pool = pool
        self.nodeid = nodeid
        self.cases_dir = cases_dir_

    def run(self, case: "Case", **submit_kw: Any) -> Result:
        return self.pool.submit(case, **submit_kw).result()

    def assert_passes(
        self,
        case: "Case",
        *,
        allow: Iterable[Verdict | str] = (Verdict.PASS,),
        name: str | None = None,
        **submit_kw: Any,
    ) -> Result:
        """Run ``case``; unless its verdict is in ``allow``, write it and raise AssertionError with the numbers."""
        __tracebackhide__ = True
        allowed = {Verdict.parse(v) if not isinstance(v, Verdict) else v for v in allow}
        result = self.run(case, **submit_kw)
        if result.verdict in allowed:
            return result
        from harness.runner.pool import save_failure

        stem = name or _test_stem(self.nodeid)
        path = save_failure(case, result, self.cases_dir, values=submit_kw.get("values"), name=stem)
        s = _SESSION
        if s is not None and self.nodeid and result.verdict is Verdict.DEVICE_FAULT:
            s.pending_attribution[self.nodeid] = (str(path), result.device or "cpu")
        want = "/".join(sorted(v.value for v in allowed))
        raise AssertionError(f"harness: expected {want}, got {result.verdict.value}\n{result.format()}")


def assert_case_passes(
    case: "Case",
    *,
    device: str = "auto",
    pool: "WorkerPool | None" = None,
    allow: Iterable[Verdict | str] = (Verdict.PASS,),
    name: str | None = None,
    **submit_kw: Any,
) -> Result:
    """Run ``case`` in the session pool; on a verdict outside ``allow`` write the case file (named after
    the current test, so Hypothesis' final shrunk example is what stays) and raise AssertionError whose
    message has the verdict, numbers, layouts, case path and replay command."""
    __tracebackhide__ = True
    s = _session()
    runner = CaseRunner(pool or get_pool(device), s.current, s.cases_dir)
    return runner.assert_passes(case, allow=allow, name=name, **submit_kw)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def pool() -> "WorkerPool":
    """GPU worker pool for the session (skips, naming what is missing, without a CUDA device)."""
    return _session().pool("gpu")


@pytest.fixture(scope="session")
def cpu_pool() -> "WorkerPool":
    """CPU worker pool for the session (for CPU targets and the runner's own tests)."""
    return _session().pool("cpu")


@pytest.fixture
def case_runner(request: pytest.FixtureRequest, pool: "WorkerPool") -> CaseRunner:
    """A :class:`CaseRunner` on the GPU pool, writing failures under the test's name."""
    return CaseRunner(pool, request.node.nodeid, _session().cases_dir)


@pytest.fixture
def cpu_case_runner(request: pytest.FixtureRequest, cpu_pool: "WorkerPool") -> CaseRunner:
    """A :class:`CaseRunner` on the CPU pool, writing failures under the test's name."""
    return CaseRunner(cpu_pool, request.node.nodeid, _session().cases_dir)
