"""Child processes of the runner: the environment they inherit, the temp folders they write in, and what
happens to those (and to live pools) when this process exits or gets SIGTERM."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Mapping

from harness._jsonfile import pid_alive

__all__ = ["remove_stale_tmp"]

_REPO_ROOT = str(Path(__file__).resolve().parents[2])

#: temp folders of this process's pools and fresh runs (``harness-pool-<pid>-*``, ``harness-fresh-<pid>-*``)
_TMP_PREFIXES = ("harness-pool-", "harness-fresh-")


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


# ------------------------------------------------------------------------------ temp folders and exit

#: the live :class:`~harness.runner.pool.WorkerPool` objects (closed at exit, their workers ended on SIGTERM)
_LIVE_POOLS: weakref.WeakSet[Any] = weakref.WeakSet()
_LIVE_TMP: set[str] = set()
_HOOKS_LOCK = threading.Lock()
_HOOKS_INSTALLED: set[str] = set()


def _make_tmp(kind: str) -> str:
    """A temp folder named after this process (``harness-{kind}-<pid>-XXXX``); removed by ``_drop_tmp``, at exit
    and on SIGTERM, or by the next pool once this process is dead (``remove_stale_tmp``)."""
    _install_exit_hooks()
    path = tempfile.mkdtemp(prefix=f"harness-{kind}-{os.getpid()}-")
    _LIVE_TMP.add(path)
    return path


def _drop_tmp(path: str) -> None:
    _LIVE_TMP.discard(path)
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(root: str | os.PathLike | None = None) -> list[str]:
    """Remove the ``harness-pool-<pid>-*`` / ``harness-fresh-<pid>-*`` folders under ``root`` (the temp dir) that
    belong to this user and whose process is gone (killed by SIGKILL, so it could not clean up); returns them."""
    removed: list[str] = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(root or tempfile.gettempdir()))
    except OSError:
        return removed
    for e in entries:
        prefix = next((p for p in _TMP_PREFIXES if e.name.startswith(p)), None)
        pid_text = e.name[len(prefix) :].split("-", 1)[0] if prefix else ""
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not e.is_dir(follow_symlinks=False) or (uid is not None and st.st_uid != uid) or pid_alive(int(pid_text)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


def _install_exit_hooks() -> None:
    """Once per process: close live pools at exit; on SIGTERM (when it would just kill this process) end their
    workers and remove the temp folders first, then die of SIGTERM as before. A SIGTERM handler the program set
    itself is left alone (it decides; the pools close when it unwinds)."""
    with _HOOKS_LOCK:
        if "atexit" not in _HOOKS_INSTALLED:
            _HOOKS_INSTALLED.add("atexit")
            atexit.register(_close_all_at_exit)
        if "sigterm" not in _HOOKS_INSTALLED and threading.current_thread() is threading.main_thread():
            _HOOKS_INSTALLED.add("sigterm")  # decided once: a handler set later by the program is its own
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)


def _close_all_at_exit() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close(cancel_pending=True, timeout=5)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    for path in list(_LIVE_TMP):
        _drop_tmp(path)


def _on_sigterm(signum: int, frame: Any) -> None:
    for pool in list(_LIVE_POOLS):
        pool._end_workers_now()
    from harness.runner.fresh import kill_live_runs

    kill_live_runs()  # attribution reruns and replays run in process groups of their own
    for path in list(_LIVE_TMP):
        _drop_tmp(path)
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
