"""Why CUDA finds no GPU where the driver lists some: a GPU that needs a reset, or GPUs hidden on purpose.

On an H200 (driver 580.159.04) a run with many device faults ended with the driver's GSP firmware not answering
(``Xid 119``: "Timeout after 45s of waiting for RPC response from GPU0 GSP") and then ``Xid 154``: "GPU recovery
action changed ... to GPU Reset Required".  From then on ``nvidia-smi`` still listed the GPU, but ``cuInit`` failed
with ``CUDA_ERROR_NO_DEVICE`` and torch said "No CUDA GPUs are available" in every new process -- which the
harness reported as "torch sees no GPU", as if there were none.  :func:`no_gpu_diagnosis` tells the two apart from
``nvidia-smi``'s reset status (no CUDA context is made; nothing is reset: that is for the GPU's administrator).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable

__all__ = ["driver_gpus", "no_gpu_diagnosis", "reset_diagnosis", "RESET_FIELDS"]

#: ``nvidia-smi --query-gpu`` fields of the reset status ('Yes' after an error the GPU cannot recover from alone)
RESET_FIELDS = ("reset_status.reset_required", "reset_status.drain_and_reset_recommended")


def _smi(args: list[str], timeout: float) -> tuple[int, str] | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.returncode, out.stdout


def driver_gpus(timeout: float = 15.0, run: Callable[[list[str], float], tuple[int, str] | None] = _smi) -> list[dict]:
    """The GPUs ``nvidia-smi`` lists: ``[{"index", "name", "reset_required", "drain_and_reset"}]``, the last two
    True, False or None (not reported by this driver); ``[]`` without the tool, a driver, or an answer in
    ``timeout`` s.  ``nvidia-smi`` ignores ``CUDA_VISIBLE_DEVICES``: these are all the machine's GPUs."""
    asked = run(["--query-gpu=index,name," + ",".join(RESET_FIELDS), "--format=csv,noheader"], timeout)
    with_reset = asked is not None and asked[0] == 0
    if not with_reset:  # a driver without the reset fields refuses the whole query: ask for the names alone
        asked = run(["--query-gpu=index,name", "--format=csv,noheader"], timeout)
        if asked is None or asked[0] != 0:
            return []
    gpus = []
    for line in asked[1].splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        flags: list[Any] = [_yes_no(c) for c in cells[2:4]] if with_reset else []
        flags += [None] * (2 - len(flags))
        gpus.append({"index": int(cells[0]), "name": cells[1], "reset_required": flags[0], "drain_and_reset": flags[1]})
    return gpus


def _yes_no(cell: str) -> bool | None:
    return {"yes": True, "no": False}.get(cell.strip().lower())


def _head(listed: list[dict], cuda_error: str | None) -> str:
    said = f" ({cuda_error.strip().splitlines()[0]})" if cuda_error and cuda_error.strip() else ""
    names = ", ".join(f"{g['index']}: {g['name']}" for g in listed)
    return f"nvidia-smi lists {len(listed)} GPU{'s' if len(listed) > 1 else ''} ({names}) but CUDA finds none{said}"


def _needs_reset(listed: list[dict], head: str) -> str | None:
    broken = [g for g in listed if g.get("reset_required") or g.get("drain_and_reset")]
    if not broken:
        return None
    which = ", ".join(str(g["index"]) for g in broken)
    return (
        f"{head}: GPU {which} needs a reset (nvidia-smi reset_status); it stays unusable for every process until "
        "its administrator resets it or the machine restarts; `dmesg | grep -i xid` names the fault that caused it"
    )


def no_gpu_diagnosis(
    cuda_error: str | None = None,
    *,
    gpus: Callable[[], list[dict]] = driver_gpus,
    environ: Any = os.environ,
) -> str | None:
    """Why CUDA finds no GPU although the driver lists some, in one line; None when the driver lists none either
    (then there is simply no GPU here) or cannot be asked.  ``cuda_error``: what CUDA or torch said, quoted."""
    listed = gpus()
    if not listed:
        return None
    head = _head(listed, cuda_error)
    reset = _needs_reset(listed, head)
    if reset:
        return reset
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"{head}: CUDA_VISIBLE_DEVICES={visible!r} hides them or names none that exists"
    return f"{head}: the driver reports no reset needed; `dmesg | grep -i xid` may say more"


def reset_diagnosis(cuda_error: str | None = None, *, gpus: Callable[[], list[dict]] = driver_gpus) -> str | None:
    """The line of :func:`no_gpu_diagnosis` when a GPU the driver lists needs a reset, else None (for a worker
    pool whose worker starts fail: only a GPU that needs a reset is given up on)."""
    listed = gpus()
    head = _head(listed, cuda_error).replace(" but CUDA finds none", ", and a worker could not start") if listed else ""
    return _needs_reset(listed, head) if listed else None
