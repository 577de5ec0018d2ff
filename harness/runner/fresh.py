"""Runs of a case file in a fresh interpreter (``python -m harness.runner.worker``): plain, with
``CUDA_LAUNCH_BLOCKING=1`` and op recording (the attribution rerun of a device fault), or under
``compute-sanitizer``; cancellable; a crash is told by its exit code and its faulthandler frame.

An attribution rerun runs under ``compute-sanitizer --tool memcheck`` when a :class:`SanitizerPolicy` says
so (by default: on CUDA, whenever the tool is installed and has not failed on this machine); its report is
parsed (:mod:`harness.runner.sanitizer`) into the faulting kernel, the access and the frame that launched
it. Where the tool is absent or cannot check the program, the rerun names the call after which the device
first failed (the worker synchronises after every call, :func:`harness.runner.execute.run_case`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from typing import Any, Mapping

from harness.runner.procs import _child_env, _drop_tmp, _make_tmp
from harness.runner.sanitizer import parse_memcheck, sanitizer_unusable
from harness.verdicts import Result, Verdict

__all__ = [
    "DEFAULT_CASE_TIMEOUT",
    "Cancelled",
    "SANITIZER_METHOD",
    "SanitizerPolicy",
    "attribution_rerun",
    "find_sanitizer",
    "repeat_in_fresh_process",
    "run_in_fresh_process",
]

#: seconds a case may run before its worker is killed (override per pool or per submit)
DEFAULT_CASE_TIMEOUT = 120.0
#: ``attribution["method"]`` when compute-sanitizer named the faulting kernel
SANITIZER_METHOD = "compute-sanitizer memcheck"


def find_sanitizer() -> str | None:
    """Path of ``compute-sanitizer`` ($PATH, $CUDA_HOME/bin, /usr/local/cuda/bin), or None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (killed: the kernel's OOM killer, a memory limit, or a timeout)",
            "SIGSEGV": " (segmentation fault)",
            "SIGABRT": " (abort)",
            "SIGBUS": " (bus error)",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with status {code}"


_LIB_DIRS = tuple(p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")} if p)


def _faulthandler_frame(log: str) -> str:
    """The innermost non-library Python frame of a faulthandler dump (``File "x.py", line 3 in f``), or ''.

    faulthandler lists the most recent call first; frames in the standard library and in
    torch are skipped (the interesting one is the target's code that made the call).
    """
    lines = log.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("Fatal Python error") or ln.startswith("Current thread") or ln.startswith("Thread 0x"):
            frames = [f.strip() for f in lines[i + 1 :] if f.strip().startswith("File ")]
            for f in frames:
                path = f.split('"')[1] if f.count('"') >= 2 else ""
                if path and not path.startswith(_LIB_DIRS) and f"{os.sep}torch{os.sep}" not in path:
                    return _with_code(f, path)
            return frames[0] if frames else ""
    return ""


def _with_code(frame_line: str, path: str) -> str:
    """Append the source line to a faulthandler frame (``File "x.py", line 3 in f: code``)."""
    import linecache

    try:
        lineno = int(frame_line.split(", line ")[1].split()[0])
    except (IndexError, ValueError):
        return frame_line
    code = linecache.getline(path, lineno).strip()
    return f"{frame_line}: {code}" if code else frame_line


class Cancelled(RuntimeError):
    """A fresh-process run was stopped through its ``cancel`` event (its pool is closing)."""


def run_in_fresh_process(
    case_path: str | os.PathLike,
    device: str = "cpu",
    *,
    launch_blocking: bool = False,
    record_ops: bool = True,
    sanitizer: bool = False,
    timeout: float = DEFAULT_CASE_TIMEOUT,
    cancel: threading.Event | None = None,
) -> Result:
    """Run a case file in a new interpreter (``python -m harness.runner.worker``) and return its Result.

    ``launch_blocking`` sets ``CUDA_LAUNCH_BLOCKING=1`` so a faulting kernel raises at its own launch;
    ``sanitizer`` runs it under ``compute-sanitizer --tool memcheck`` (its report goes into
    ``attribution["sanitizer"]``, parsed into ``kernel``, ``access``, ``launch_frame``, ``method``). A crash or timeout of that process becomes ``worker_crash`` /
    ``timeout``. ``cancel``: when it is set the process is killed and :class:`Cancelled` raised.
    """
    tmp = _make_tmp("fresh")
    try:
        return _run_fresh(tmp, case_path, device, launch_blocking, record_ops, sanitizer, timeout, cancel)[-1]
    finally:
        _drop_tmp(tmp)


def repeat_in_fresh_process(
    case_path: str | os.PathLike,
    device: str,
    repeat: int,
    *,
    timeout: float = DEFAULT_CASE_TIMEOUT,
    cancel: threading.Event | None = None,
) -> list[Result]:
    """Run a case file ``repeat`` times in one new interpreter (each run judged by ``run_case``); one Result
    per run, in order. A device fault ends the runs (the context is gone); a crash or timeout of the process
    is the last Result, after those of the runs that finished. ``timeout``: per run."""
    tmp = _make_tmp("fresh")
    try:
        return _run_fresh(tmp, case_path, device, False, False, False, timeout * repeat, cancel, repeat=repeat)
    finally:
        _drop_tmp(tmp)


def _read_results(path: str) -> list[Result]:
    """The Results a worker wrote to ``path``: one Result, or ``{"runs": [...]}`` (``--repeat``); [] if none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return [Result.from_json(r) for r in data["runs"]]
    return [Result.from_json(data)]


def _run_fresh(
    tmp: str,
    case_path: str | os.PathLike,
    device: str,
    launch_blocking: bool,
    record_ops: bool,
    sanitizer: bool,
    timeout: float,
    cancel: threading.Event | None,
    repeat: int | None = None,
) -> list[Result]:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, "-m", "harness.runner.worker", "--case", str(case_path), "--device", device, "--result", out]
    if repeat is not None:
        cmd += ["--repeat", str(repeat)]
    if record_ops:
        cmd.append("--record-ops")
    san_note = None
    if sanitizer:
        tool = find_sanitizer()
        if tool is None:
            san_note = "compute-sanitizer was asked for but is not installed ($PATH, $CUDA_HOME/bin)"
        else:
            cmd = [tool, "--tool", "memcheck", "--print-limit", "20", "--error-exitcode", "0"] + cmd
    env = _child_env({"CUDA_LAUNCH_BLOCKING": "1"} if launch_blocking else None)
    t0 = time.perf_counter()
    try:
        cp = _run_cancellable(cmd, env, timeout, cancel)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr or b""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        done = _read_results(out) if repeat is not None else []
        return done + [
            Result(
                Verdict.TIMEOUT,
                f"fresh process ran past {timeout:.0f} s" + (f" after {len(done)} of {repeat} runs" if repeat else ""),
                device=device,
                duration=time.perf_counter() - t0,
                worker="fresh",
                attribution={"log": tail[-2000:]} if tail else None,
            )
        ]
    done = _read_results(out)
    complete = bool(done) and (
        repeat is None or len(done) >= repeat or done[-1].verdict is Verdict.DEVICE_FAULT or cp.returncode == 0
    )
    if complete:
        r = done.pop()
    else:
        log = (cp.stderr or "")[-3000:]
        code = cp.returncode if cp.returncode < 128 else -(cp.returncode - 128)  # a shell's 128+N
        att: dict[str, Any] = {"frame": _faulthandler_frame(log), "log": log[-1500:]}
        if code == 1 and "Traceback (most recent call last)" in log:
            att["harness_broken"] = True  # a Python error before the case ran: this checkout cannot run it
        r = Result(
            Verdict.WORKER_CRASH,
            f"fresh process {_exit_text(code)} before writing a result"
            + (f" (after {len(done)} of {repeat} runs)" if repeat else ""),
            device=device,
            duration=time.perf_counter() - t0,
            worker="fresh",
            attribution=att,
        )
    if sanitizer:
        r.attribution = _with_sanitizer(r.attribution, san_note, cp.stdout + "\n" + cp.stderr)
    return done + [r]


def _with_sanitizer(attribution: Mapping[str, Any] | None, note: str | None, text: str) -> dict[str, Any]:
    """The attribution of a run under compute-sanitizer: its raw report (``sanitizer``) and, parsed, the
    faulting ``kernel``, its ``access``, the ``host_frame`` and ``launch_frame`` that launched it,
    ``sanitizer_errors``; or ``sanitizer_unusable``: why the tool could not check the program here."""
    att = dict(attribution or {})
    if note:  # asked for, not installed: the run went without it
        att["sanitizer"] = note
        return att
    att["sanitizer"] = _sanitizer_report(text)
    report = parse_memcheck(text)
    why = sanitizer_unusable(text, report)
    if why:
        att["sanitizer_unusable"] = why
        return att
    first = report.first if report is not None else None
    att["sanitizer_errors"] = report.total if report is not None else 0
    if first is None or not first.kernel:
        return att
    ext = first.extension_frame
    att["kernel"] = first.kernel
    att["access"] = first.access()
    if ext is not None:
        att["host_frame"] = ext.text()
        att["extension"] = ext.python_module
    # the Python frame of the call the worker saw fail beats a host frame: it names the caller's line
    launch = att.get("call_frame") or first.python_frame or (ext.text() if ext is not None else None)
    if launch:
        att["launch_frame"] = launch
    att["method"] = SANITIZER_METHOD
    return att


def _default_attribution_timeout(case_timeout: float, sanitizer: bool) -> float:
    """Seconds an attribution rerun may take: twice the case's (at least 120 s: a fresh CUDA context), ten
    times that under compute-sanitizer."""
    return max(120.0, 2 * float(case_timeout)) * (10 if sanitizer else 1)


class SanitizerPolicy:
    """Whether attribution reruns run under compute-sanitizer: ``mode`` True (always, where installed),
    False (never) or None (auto: on CUDA devices whenever the tool is found). Once a sanitized rerun shows
    that the tool cannot check programs here (:func:`~harness.runner.sanitizer.sanitizer_unusable`), later
    reruns go without it; ``unusable`` says why."""

    def __init__(self, mode: bool | None = None) -> None:
        if mode not in (True, False, None):
            raise ValueError(f"sanitizer={mode!r} must be True, False or None (auto: use it when installed)")
        self.mode = mode
        self.unusable: str | None = None
        self.worked = False

    def use(self, device: str) -> bool:
        """Run this device's next attribution rerun under compute-sanitizer?"""
        if self.mode is False or self.unusable:
            return False
        if self.mode is True:
            return True
        return str(device).startswith("cuda") and find_sanitizer() is not None

    def note(self, rerun: Result) -> str | None:
        """Remember what a sanitized rerun showed; returns why the tool is unusable, or None."""
        why = (rerun.attribution or {}).get("sanitizer_unusable")
        if why:
            self.unusable = str(why)
        else:
            self.worked = True
        return why


def attribution_rerun(
    case_path: str | os.PathLike,
    device: str,
    *,
    sanitizer: bool | None | SanitizerPolicy = False,
    case_timeout: float = DEFAULT_CASE_TIMEOUT,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> Result:
    """The case rerun in a fresh process with ``CUDA_LAUNCH_BLOCKING=1`` and op recording, to name what
    faults: under compute-sanitizer as ``sanitizer`` decides (True, False, None = auto, or a pool's
    :class:`SanitizerPolicy`, which remembers a tool that does not work here); when the tool turns out
    unusable, the case is rerun without it (``attribution["sanitizer_unusable"]`` says why). ``timeout``
    defaults to twice the case's (at least 120 s), ten times that under the sanitizer."""
    policy = sanitizer if isinstance(sanitizer, SanitizerPolicy) else SanitizerPolicy(sanitizer)
    use = policy.use(device)
    kw = dict(launch_blocking=True, record_ops=True, cancel=cancel)
    r = run_in_fresh_process(
        case_path, device, sanitizer=use, timeout=timeout or _default_attribution_timeout(case_timeout, use), **kw
    )
    if not use or find_sanitizer() is None:
        return r
    why = policy.note(r)
    if not why:
        return r
    plain = run_in_fresh_process(
        case_path, device, sanitizer=False, timeout=timeout or _default_attribution_timeout(case_timeout, False), **kw
    )
    att = dict(plain.attribution or {})
    att["sanitizer_unusable"] = why
    att["sanitizer"] = (r.attribution or {}).get("sanitizer", "")
    plain.attribution = att
    return plain


#: process groups of the fresh runs going on now (their leader's pid): ended with this process (SIGTERM)
_LIVE_GROUPS: set[int] = set()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # gone already
        pass


def kill_live_runs() -> None:
    """End every fresh run still going, whole process groups (this process is about to exit)."""
    for pgid in list(_LIVE_GROUPS):
        _kill_group(pgid)


def _run_cancellable(
    cmd: list[str], env: Mapping[str, str], timeout: float, cancel: threading.Event | None
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` that ``cancel`` can stop.

    The command runs in its own process group, and a cancel or timeout kills the whole group: ``compute-sanitizer``
    runs the case in a child of its own, which would otherwise go on holding the output pipes (and the caller, and
    its GPU) until its case ended. Ctrl-C reaches the caller, which cancels; SIGTERM ends them (:func:`kill_live_runs`).
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before it started")
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as proc:
        _LIVE_GROUPS.add(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    out, err = proc.communicate(timeout=0.2)
                    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
                except subprocess.TimeoutExpired:
                    cancelled = cancel is not None and cancel.is_set()
                    if cancelled or time.monotonic() >= deadline:
                        _kill_group(proc.pid)
                        out, err = proc.communicate()
                        if cancelled:
                            raise Cancelled("killed: cancelled while running") from None
                        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
                except KeyboardInterrupt:  # Ctrl-C reaches this process only: end the run with it
                    _kill_group(proc.pid)
                    raise
        finally:
            _LIVE_GROUPS.discard(proc.pid)


def _sanitizer_report(text: str) -> str:
    keep = [ln for ln in text.splitlines() if ln.startswith("=========")]
    return "\n".join(keep[-60:]) if keep else text[-3000:]
