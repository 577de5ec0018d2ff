"""CUDA devices as a short-lived subprocess sees them (the parent never initialises CUDA), and device requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any, Sequence

from harness.runner.procs import _child_env

__all__ = [
    "probe_cuda",
    "probe_devices",
    "resolve_devices",
    "usable_cpus",
    "default_workers",
    "MAX_DEFAULT_GPU_WORKERS",
]

#: most active workers per GPU started by default (each a process with its own CUDA context and two CPU cores)
MAX_DEFAULT_GPU_WORKERS = 8

_PROBE_SRC = r"""
import json, sys
out = {"count": 0, "devices": [], "error": None, "torch": None, "cuda": None}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["count"] = n
    if not n and torch.version.cuda is not None:
        try:  # what CUDA says (e.g. "No CUDA GPUs are available"): the parent explains it from nvidia-smi
            torch.cuda.init()
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        uuid = getattr(p, "uuid", None)  # matches the GPU nvidia-smi lists (harness.runner.gpu_health)
        out["devices"].append({"index": i, "name": p.name, "capability": [p.major, p.minor],
                               "memory": p.total_memory, "uuid": str(uuid) if uuid is not None else None})
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
sys.stdout.write(json.dumps(out))
"""

_PROBE_CACHE: dict[str, Any] | None = None
_PROBE_LOCK = threading.Lock()


def probe_cuda(timeout: float = 120.0) -> dict[str, Any]:
    """CUDA devices as seen by a short-lived subprocess (this process never initialises CUDA).

    Returns ``{"count", "devices": [{"index", "name", "capability", "memory", "uuid"}], "error", "torch", "cuda"}``;
    cached for the life of the process. Honours ``CUDA_VISIBLE_DEVICES``.  When a CUDA torch finds no GPU,
    ``error`` says why where ``nvidia-smi`` can tell (:func:`harness.runner.gpu_health.no_gpu_diagnosis`: a GPU
    that needs a reset, or GPUs hidden by ``CUDA_VISIBLE_DEVICES``), else what CUDA said.
    """
    global _PROBE_CACHE
    with _PROBE_LOCK:
        if _PROBE_CACHE is None:
            try:
                cp = subprocess.run(
                    [sys.executable, "-c", _PROBE_SRC],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    env=_child_env(),
                )
                data = (
                    json.loads(cp.stdout)
                    if cp.stdout.strip()
                    else {"count": 0, "devices": [], "error": f"probe exited {cp.returncode}: {cp.stderr[-500:]}"}
                )
            except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
                data = {"count": 0, "devices": [], "error": f"probe failed: {type(e).__name__}: {e}"}
            if not data.get("devices") and data.get("cuda"):  # a CUDA torch that finds no GPU: say why if we can
                from harness.runner.gpu_health import no_gpu_diagnosis

                data["error"] = no_gpu_diagnosis(data.get("error")) or data.get("error")
            _PROBE_CACHE = data
        return dict(_PROBE_CACHE)


def probed_uuid(device: str) -> str | None:
    """The UUID of CUDA ``device`` ("cuda:N") as this process's device probe saw it, if it has run (never probes:
    a GPU that has failed since is no longer listed)."""
    cache = _PROBE_CACHE
    if cache is None or not device.startswith("cuda:") or not device[5:].isdigit():
        return None
    return next((d.get("uuid") for d in cache.get("devices", []) if d.get("index") == int(device[5:])), None)


def probe_devices() -> list[str]:
    """``["cuda:0", "cuda:1", ...]`` for the visible GPUs (empty without CUDA)."""
    return [f"cuda:{d['index']}" for d in probe_cuda()["devices"]]


def resolve_devices(devices: str | Sequence[str] | None) -> list[str]:
    """Normalise a device request: None -> every GPU, else ["cpu"]; "cuda" -> every GPU (error if none)."""
    if devices is None:
        return probe_devices() or ["cpu"]
    if isinstance(devices, str):
        if devices == "cuda":
            found = probe_devices()
            if not found:
                info = probe_cuda()
                raise ValueError(
                    f"devices='cuda' but no CUDA device is visible ({info.get('error') or 'count 0'}); "
                    "use devices='cpu' or check CUDA_VISIBLE_DEVICES"
                )
            return found
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    out = []
    for d in devices:
        d = str(d)
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"device {d!r} is not 'cpu' or 'cuda:N'; e.g. devices=['cuda:0', 'cuda:1']")
        out.append(d)
    if not out:
        raise ValueError("devices is empty; pass None (probe), 'cpu', 'cuda' or a list like ['cuda:0']")
    return out


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a CI runner's or a container's share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: host memory a GPU worker is allowed for by default, spares included (torch + a CUDA context: 2-3 GiB resident)
GPU_WORKER_HOST_GIB = 6.0


def host_memory_gib() -> float | None:
    """Physical memory of this machine in GiB (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def default_workers(devices: Sequence[str], size: str = "small") -> int:
    """Active workers per device when the user names none.

    CPU: half the cores, at most 4.  CUDA with small cases: two cores per worker, at most
    ``MAX_DEFAULT_GPU_WORKERS`` per GPU -- a small case keeps the GPU busy for well under a millisecond and
    its worker busy for milliseconds of Python (inputs, references, judging), so several workers share one GPU
    and a worker lost to a device fault costs only its share.  At most one worker per ``GPU_WORKER_HOST_GIB`` of
    host memory (each is a process holding torch and a CUDA context, and may have a spare).  Wan-sized cases (``size="wan"``): one worker per
    GPU, as each case needs a large part of the device's memory.
    """
    cpus = usable_cpus()
    if not devices or all(d == "cpu" for d in devices):
        return max(1, min(4, cpus // 2))
    if size != "small":
        return 1
    gpus = sum(1 for d in devices if d != "cpu")
    by_cpu = cpus // (2 * gpus)
    mem = host_memory_gib()
    by_mem = int(mem // (GPU_WORKER_HOST_GIB * gpus)) if mem else MAX_DEFAULT_GPU_WORKERS
    return max(1, min(MAX_DEFAULT_GPU_WORKERS, by_cpu, by_mem))
