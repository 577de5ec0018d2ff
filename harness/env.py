"""What this machine is: device, compute capability, library versions, attention backends.

``collect_env()`` is what case files record and what ``python -m harness env``
prints.  CUDA is probed only when this is called (never at import).  Code
that must not initialise CUDA in its own process (the runner's parent) calls
``collect_env_subprocess()``, which asks a short-lived child instead, or ``collect_env_isolated()``, which
asks the child only when this torch could initialise a GPU at all.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import platform
import subprocess
import sys
from typing import Any

import torch

from harness.capability import device_info

__all__ = ["collect_env", "collect_env_subprocess", "collect_env_isolated", "format_env", "add_parser"]


def _pkg_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cublas_version() -> str | None:
    """cuBLAS version: from the pip package if torch uses one, else from the library torch loaded."""
    v = _pkg_version("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12", "nvidia-cublas-cu11")
    if v:
        return v
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcublas.so" in line and "Lt" not in line}
    except OSError:
        return None
    for lib in libs:
        try:
            cublas = ctypes.CDLL(lib)
            vals = []
            for prop in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
                out = ctypes.c_int()
                if cublas.cublasGetProperty(prop, ctypes.byref(out)) != 0:
                    break
                vals.append(out.value)
            if len(vals) == 3:
                return ".".join(map(str, vals))
        except (OSError, AttributeError):
            continue
    return None


def _driver_version() -> str | None:
    from harness.runner.gpu_health import run_nvidia_smi

    asked = run_nvidia_smi(["--query-gpu=driver_version", "--format=csv,noheader"], 20)
    return asked[1].strip().splitlines()[0] if asked and asked[0] == 0 and asked[1].strip() else None


def collect_env(*, backends: bool = True) -> dict[str, Any]:
    """Versions and devices, JSON-able.  Initialises CUDA when a GPU is present."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "triton": _pkg_version("triton", "pytorch-triton"),
        "sageattention": _pkg_version("sageattention"),
        "flash_attn": _pkg_version("flash-attn", "flash_attn"),
        "cpu_scaled_mm": hasattr(torch, "_scaled_mm"),
        "fp8_dtypes": all(hasattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2")),
        "devices": [],
    }
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        for i in range(torch.cuda.device_count()):
            d = device_info(f"cuda:{i}")
            env["devices"].append(
                {
                    "index": i,
                    "name": d.name,
                    "capability": d.capability_text,
                    "memory_gib": round((d.memory_bytes or 0) / 2**30, 1),
                    "multiprocessors": d.multiprocessors,
                }
            )
        torch.zeros(1, device="cuda") @ torch.zeros(1, 1, device="cuda").squeeze(1)  # loads cuBLAS
        env["cublas"] = _cublas_version()
        env["driver"] = _driver_version()
        env["device"] = env["devices"][0]["name"]
        env["capability"] = env["devices"][0]["capability"]
    else:
        env["cudnn"] = None
        env["cublas"] = None
        env["driver"] = None
        env["device"] = "cpu"
        env["capability"] = None
    if backends:
        env["backends"] = _describe_backends()
    return env


def _describe_backends() -> dict[str, Any]:
    from harness.quant import backends as registry

    return registry.describe_all()


def collect_env_subprocess(timeout: float = 120.0, *, backends: bool = False) -> dict[str, Any]:
    """:func:`collect_env` run in a child interpreter, so this process never initialises CUDA."""
    code = f"import json, harness.env as e; print(json.dumps(e.collect_env(backends={backends!r}), default=str))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"environment probe failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_build() -> bool:
    """Whether this torch was built for a GPU (CUDA or ROCm); a CPU-only build cannot initialise one."""
    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def collect_env_isolated(timeout: float = 120.0, *, backends: bool = False) -> dict[str, Any]:
    """:func:`collect_env` without initialising a GPU in this process: in a child interpreter
    (:func:`collect_env_subprocess`) when this torch is built for a GPU, else here -- a CPU-only build has no GPU
    to initialise, and the child would only import torch a second time (~2.5 s of CPU on 2 cores)."""
    if gpu_build():
        return collect_env_subprocess(timeout=timeout, backends=backends)
    return json.loads(json.dumps(collect_env(backends=backends), default=str))  # the child's JSON, without it


def format_env(env: dict[str, Any]) -> str:
    keys = [
        "device",
        "capability",
        "driver",
        "torch",
        "cuda",
        "cudnn",
        "cublas",
        "triton",
        "sageattention",
        "flash_attn",
        "python",
    ]
    lines = [f"{k:>14}: {env.get(k)}" for k in keys]
    for d in env.get("devices", []):
        lines.append(
            f"{'gpu ' + str(d['index']):>14}: {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB, "
            f"{d['multiprocessors']} SMs)"
        )
    be = env.get("backends")
    if be:
        from harness.quant.backends import format_table

        lines += ["", "attention backends:", format_table(be)]
    return "\n".join(lines)


def _cmd_env(args: argparse.Namespace) -> int:
    env = collect_env(backends=True)
    if args.json:
        print(json.dumps(env, indent=2, sort_keys=True, default=str))
    else:
        print(format_env(env))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("env", help="device, capability, library versions and attention backends")
    p.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (the 'backends' key lists each attention backend with available/reason)",
    )
    p.set_defaults(func=_cmd_env)
