"""Runs of a case file in a fresh interpreter (``python -m harness.runner.worker``): plain, with
``CUDA_LAUNCH_BLOCKING=1`` and op recording (the attribution rerun of a device fault), or under
``compute-sanitizer``; cancellable; a crash is told by its exit code and its faulthandler frame."""

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
from harness.verdicts import Result, Verdict

__all__ = [
    "DEFAULT_CASE_TIMEOUT",
    "Cancelled",
    "attribution_rerun",
    "find_sanitizer",
    "run_in_fresh_process",
    "repeat_in_fresh_process",
]

#: seconds a case may run before its worker is killed (override per pool or per submit)
DEFAULT_CASE_TIMEOUT = 120.0


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
    ``attribution["sanitizer"]``). A crash or timeout of that process becomes ``worker_crash`` /
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
        att = dict(r.attribution or {})
        att["sanitizer"] = san_note or _sanitizer_report(cp.stdout + "\n" + cp.stderr)
        r.attribution = att
    return done + [r]


def _default_attribution_timeout(case_timeout: float, sanitizer: bool) -> float:
    """Seconds an attribution rerun may take: twice the case's (at least 120 s: a fresh CUDA context), ten
    times that under compute-sanitizer."""
    return max(120.0, 2 * float(case_timeout)) * (10 if sanitizer else 1)


def attribution_rerun(
    case_path: str | os.PathLike,
    device: str,
    *,
    sanitizer: bool = False,
    case_timeout: float = DEFAULT_CASE_TIMEOUT,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> Result:
    """The case rerun in a fresh process with ``CUDA_LAUNCH_BLOCKING=1`` and op recording, to name the op
    that faults (optionally under compute-sanitizer); ``timeout`` defaults to twice the case's (at least 120 s), ten times that under the sanitizer."""
    return run_in_fresh_process(
        case_path,
        device,
        launch_blocking=True,
        record_ops=True,
        sanitizer=sanitizer,
        timeout=timeout or _default_attribution_timeout(case_timeout, sanitizer),
        cancel=cancel,
    )


def _run_cancellable(
    cmd: list[str], env: Mapping[str, str], timeout: float, cancel: threading.Event | None
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` that ``cancel`` can stop."""
    if cancel is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if cancel.is_set():
        raise Cancelled("cancelled before it started")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        deadline = time.monotonic() + timeout
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                if cancel.is_set() or time.monotonic() >= deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    if cancel.is_set():
                        raise Cancelled("killed: cancelled while running") from None
                    raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None


def _sanitizer_report(text: str) -> str:
    keep = [ln for ln in text.splitlines() if ln.startswith("=========")]
    return "\n".join(keep[-60:]) if keep else text[-3000:]
