"""The worker process: runs cases one at a time and answers with a Result for each.

Two ways in:

- :func:`worker_main` is the target of the pool's spawned processes. It sets
  up the device once (CUDA context, the imports a first case would pay for, a
  warm-up case), says ``ready``, then loops: receive ``("run", case_id, case,
  values_bytes, record_ops)``, acknowledge it with ``("started", case_id)`` (the
  pool's case timer starts there, and a worker that dies before it has not
  started the case), run it with :func:`harness.runner.execute.run_case`, send
  ``("result", case_id, result_dict)``. After a device fault it sends the
  result and exits: its context is gone. ``("stop",)`` ends it with status 0;
  its parent's death with ``EXIT_PARENT_GONE`` (it watches the parent's sentinel).
- ``python -m harness.runner.worker --case CASE.json --device cuda:0 --result OUT.json``
  runs one case file in a fresh interpreter (attribution reruns with
  ``CUDA_LAUNCH_BLOCKING=1``, ``compute-sanitizer``, ``harness replay``) and writes
  the Result as JSON; with ``--repeat N`` it runs the case N times in that one process (``harness replay``
  of a ``nondeterministic`` case) and writes ``{"runs": [Result, ...]}``.

Messages travel over a ``multiprocessing`` pipe between our own processes;
tensors inside them are safetensors bytes, never pickled tensors.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
from typing import Any, Collection, Mapping

__all__ = [
    "worker_main",
    "encode_values",
    "decode_values",
    "main",
    "EXIT_DEVICE_FAULT",
    "EXIT_INIT_FAILED",
    "EXIT_PARENT_GONE",
    "FAIL_STARTS_ENV",
    "WARM_IMPORTS",
    "NATIVE_IMPORT_ENV",
    "SELF_SET_ENV",
    "fork_unfit",
    "import_time_env_changes",
]

#: exit code of a worker that retired itself after a sticky device error
EXIT_DEVICE_FAULT = 17
#: exit code of a worker whose setup failed (the error was sent to the parent first)
EXIT_INIT_FAILED = 18
#: exit code of a worker that found its parent process gone
EXIT_PARENT_GONE = 19
#: test hook: a file holding a count N; the next N worker starts fail (each takes one), then starts succeed
FAIL_STARTS_ENV = "HARNESS_FAIL_WORKER_STARTS"
#: imported before a worker reports ready, so no case pays for them inside its timed window
#: (``torch._dynamo`` alone is 1-4 s: torch imports it on the first dispatch-mode error or compile)
WARM_IMPORTS = (
    "torch._dynamo",
    "harness.reference",
    "harness.reference.wan",
    "harness.targets.protocol",
    "harness.runner.execute",
    "harness.cases",
)


#: environment variables that native libraries the fork server loads (torch's C++ core, OpenMP, MKL, the C runtime,
#: Python itself) may read as they load, where Python cannot see it: a forked worker whose caller changed one of them
#: since the server started would not see the change, so it is started fresh instead. The variables that Python code
#: read during the server's imports are recorded (``harness.runner.preload.READ_AT_IMPORT``) and count too. CUDA's
#: own variables are not among them: the driver reads them when the child creates its context.
NATIVE_IMPORT_ENV = ("TORCH_", "PYTORCH_", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "MALLOC_", "PYTHON")
#: variables torch itself writes into the environment, with its own default, when it first needs them (inductor's
#: cache folder): one that was unset when the server started and is set now is not the caller's change
SELF_SET_ENV = frozenset({"TORCHINDUCTOR_CACHE_DIR"})


def fork_unfit(env: Mapping[str, str], files: Mapping[str, str | None] | None = None) -> str | None:
    """Why this process, forked from the pool's fork server, cannot stand in for a fresh interpreter started with
    ``env`` (None when it can): the server initialised the CUDA driver (a forked child cannot use it), a variable
    read at import time differs between ``env`` and the server's start, or the server imported a module from
    another file than the caller would (``files``: module name -> the caller's file for it, e.g. another checkout)."""
    from harness.runner import preload

    if preload.CUDA_INITIALIZED:
        return "the fork server had initialised the CUDA driver (a forked process cannot use it)"
    for name, want in (files or {}).items():
        mod = sys.modules.get(name)
        have = getattr(mod, "__file__", None) if mod is not None else None
        if have is not None and want is not None and os.path.realpath(have) != os.path.realpath(want):
            return f"the fork server imported {name} from {have}, the caller's is {want}"
    changed = import_time_env_changes(preload.SERVER_ENV, env, preload.READ_AT_IMPORT)
    if changed:
        return f"{', '.join(changed[:5])} changed since the fork server started (read when torch is imported)"
    return None


def import_time_env_changes(before: Mapping[str, str], now: Mapping[str, str], read: Collection[str] = ()) -> list[str]:
    """The variables that differ between two environments and that an import reads: those in ``read`` and those of
    :data:`NATIVE_IMPORT_ENV` (``PYTHONPATH`` aside: the child gets the caller's ``sys.path``; and a
    :data:`SELF_SET_ENV` variable torch set since), sorted."""
    return sorted(
        k
        for k in set(before) | set(now)
        if before.get(k) != now.get(k)
        and (k in read or k.startswith(NATIVE_IMPORT_ENV))
        and k != "PYTHONPATH"
        and not (k in SELF_SET_ENV and k not in before)
    )


def _apply_env(env: Mapping[str, str]) -> None:
    """Make this process's environment ``env`` (a forked worker takes its caller's, not the server's)."""
    for k in [k for k in os.environ if k not in env]:
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


def encode_values(values: Mapping[str, Any] | None) -> bytes | None:
    """Tensors -> safetensors bytes (contiguous CPU copies; the originals are not touched)."""
    if not values:
        return None
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in values.items()})


def decode_values(blob: bytes | None) -> dict[str, Any] | None:
    """Inverse of :func:`encode_values`."""
    if not blob:
        return None
    from safetensors.torch import load

    return load(blob)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the thread that spawned it goes away (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort
        pass


def _watch_parent() -> None:
    """Exit (``EXIT_PARENT_GONE``) as soon as the parent process dies, even mid-case (a daemon thread
    waits on the parent's sentinel; ``_die_with_parent`` covers a GIL held in native code on Linux)."""
    import multiprocessing
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        sys.stderr.flush()
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="harness-parent-watch", daemon=True).start()


def _injected_start_failure() -> None:
    """Raise when ``$HARNESS_FAIL_WORKER_STARTS`` names a file whose count is above 0 (and take one)."""
    path = os.environ.get(FAIL_STARTS_ENV)
    if not path:
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return  # the cause went away
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read().strip()
        left = int(text) if text.isdigit() else 0
        if left <= 0:
            return
        f.seek(0)
        f.truncate()
        f.write(str(left - 1))
    raise RuntimeError(f"start failure injected by ${FAIL_STARTS_ENV}={path} ({left - 1} more to come)")


def _redirect_stderr(log_path: str | None) -> None:
    if not log_path:
        faulthandler.enable()
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    faulthandler.enable(file=sys.stderr, all_threads=False)


def _setup_device(device: str) -> dict[str, Any]:
    import torch

    from harness.runner.execute import device_healthy, device_info

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        torch.cuda.set_device(idx)
    ok, why = device_healthy(device)
    if not ok:
        raise RuntimeError(f"device {device} failed its first health check: {why}")
    info = dict(device_info(device))
    info["pid"] = os.getpid()
    return info


def _warm_up(device: str) -> None:
    """Import what a first case would (``WARM_IMPORTS``, every registered target) and run one tiny case,
    so imports and first-call costs are paid before the worker reports ready."""
    import importlib

    for mod in WARM_IMPORTS:
        importlib.import_module(mod)
    from harness.targets import load_targets

    load_targets(include_doubles=True)  # the real ops, env plug-ins, and the test doubles tests submit
    from harness.cases import Case
    from harness.layouts import LayoutSpec
    from harness.runner.execute import run_case

    r = run_case(Case(op="cpu.scale", layouts={"x": LayoutSpec((2, 3), "float32", offset=1)}), device)
    if r.verdict.value != "pass":
        raise RuntimeError(f"warm-up case failed on {device}: {r.verdict.value}: {r.message}")


def worker_main(
    conn: Any,
    device: str,
    name: str,
    log_path: str | None = None,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    files: Mapping[str, str | None] | None = None,
) -> None:
    """Loop of a pool worker (the target of its ``spawn`` or ``forkserver`` process). Never returns normally;
    exits the process.

    ``threads``: torch intra-op threads for this worker (the pool divides the cores among its
    workers; oversubscribed OpenMP threads spin and make small cases 50x slower).
    ``env``: given when the worker was forked from the pool's fork server: the caller's environment at the start,
    applied before anything reads it; ``files``: the caller's files for the preloaded modules. When the fork cannot
    stand in for a fresh interpreter
    (:func:`fork_unfit`) the worker says ``("fork_unfit", why)`` and exits; the pool then starts fresh ones.
    """
    _redirect_stderr(log_path)
    _die_with_parent()
    _watch_parent()
    if env is not None:
        why = fork_unfit(env, files)
        if why is not None:
            conn.send(("fork_unfit", why))
            os._exit(EXIT_INIT_FAILED)
        _apply_env(env)
    try:
        _injected_start_failure()
        if threads:
            import torch

            torch.set_num_threads(threads)
        info = _setup_device(device)
        _warm_up(device)
        from harness.runner.execute import run_case
        from harness.targets.doubles import take_between_cases
        from harness.verdicts import Verdict
    except BaseException as e:  # noqa: BLE001 - report, then exit
        import traceback

        try:
            conn.send(("init_error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
        finally:
            os._exit(EXIT_INIT_FAILED)
    conn.send(("ready", info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # parent went away
        kind = msg[0]
        if kind == "stop":
            conn.close()
            sys.stderr.flush()
            os._exit(0)
        if kind != "run":  # pragma: no cover - protocol error
            print(f"worker {name}: unknown message {kind!r}", file=sys.stderr)
            continue
        _, case_id, case, blob, record_ops = msg
        armed = take_between_cases()  # fault.exit/stall_between_cases: this case is received, not started
        if armed is not None and armed[0] == "exit":
            os._exit(int(armed[1]))
        if armed is not None:
            time.sleep(armed[1])
        try:
            conn.send(("started", case_id))
        except (BrokenPipeError, OSError):
            os._exit(0)
        result = run_case(case, device, values=decode_values(blob), record_ops=record_ops, worker=name)
        try:
            conn.send(("result", case_id, result.to_json()))
        except (BrokenPipeError, OSError):
            os._exit(0)
        if result.verdict is Verdict.DEVICE_FAULT:
            # the context is unusable: exit without running CUDA teardown, which may hang
            sys.stderr.flush()
            os._exit(EXIT_DEVICE_FAULT)


# ------------------------------------------------------------------------------ one-shot CLI


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run one case file in this (fresh) interpreter; write the Result JSON to ``--result``."""
    p = argparse.ArgumentParser(prog="python -m harness.runner.worker", description=main.__doc__)
    p.add_argument("--case", required=True, help="CASE.json (its .safetensors sibling is used when present)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--result", required=True, help="where to write the Result as JSON")
    p.add_argument("--record-ops", action="store_true", help="record aten ops to name the one that faults")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help='run the case N times in this process; --result then holds {"runs": [Result, ...]}, rewritten after '
        "each run (a device fault ends the runs: the context is gone)",
    )
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error(f"--repeat {args.repeat}: give a whole number of runs >= 1")
    faulthandler.enable()
    _die_with_parent()
    from harness.cases import load_case
    from harness.runner.execute import run_case
    from harness.targets import load_targets
    from harness.verdicts import Result, Verdict

    t0 = time.perf_counter()
    load_targets(include_doubles=True)  # as a pool worker does: a case may name a test double
    try:
        case, tensors = load_case(args.case)
    except Exception as e:
        r = Result(Verdict.ERROR, f"cannot load case {args.case}: {e}", device=args.device)
    else:
        if args.device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(torch.device(args.device).index or 0)
        runs: list[Any] = []
        for _ in range(args.repeat or 1):
            r = run_case(
                case, args.device, values=tensors or None, record_ops=args.record_ops, worker=f"fresh pid {os.getpid()}"
            )
            if args.repeat is not None:
                runs.append(r.to_json())
                _write_json(args.result, {"runs": runs})  # what ran is kept if a later run crashes
            if r.verdict is Verdict.DEVICE_FAULT:
                break
    r.duration = time.perf_counter() - t0 if r.duration == 0 else r.duration
    if args.repeat is None:
        _write_json(args.result, r.to_json())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_DEVICE_FAULT if r.verdict is Verdict.DEVICE_FAULT else 0)


if __name__ == "__main__":
    sys.exit(main())
