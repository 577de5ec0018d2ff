"""Why CUDA finds no GPU where the driver lists some: a GPU that needs a reset, or GPUs hidden on purpose.

On an H200 (driver 580.159.04) a run with many device faults ended with the driver's GSP firmware not answering
(``Xid 119``: "Timeout after 45s of waiting for RPC response from GPU0 GSP") and then ``Xid 154``: "GPU recovery
action changed ... to GPU Reset Required".  From then on ``nvidia-smi`` still listed the GPU (``nvidia-smi -q``:
"GPU Recovery Action: Reset"), but ``cuInit`` failed with ``CUDA_ERROR_NO_DEVICE`` and torch said "No CUDA GPUs
are available" in every new process -- which the harness reported as "torch sees no GPU", as if there were none.
:func:`no_gpu_diagnosis` tells the two apart from what ``nvidia-smi`` reports (no CUDA context is made; nothing is
reset: that is for the GPU's administrator).

What ``nvidia-smi`` reports: ``gpu_recovery_action`` where the driver knows the field (NVML's recovery action: None,
Reset, Reboot, Drain P2P, Drain and Reset, ...), else ``reset_status.reset_required`` (older drivers).  Neither is
assumed: each query is tried in turn, and a GPU whose driver answers neither has an unknown status, never a healthy
one.  ``nvidia-smi`` ignores ``CUDA_VISIBLE_DEVICES`` and numbers the GPUs its own way, so a CUDA device is matched
to its GPU by UUID, and without a UUID only on a machine with one GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable

__all__ = ["driver_gpus", "no_gpu_diagnosis", "reset_diagnosis", "run_nvidia_smi", "QUERIES"]

#: the ``--query-gpu`` field lists tried in turn (a driver refuses a whole query with a field it does not know)
QUERIES = (
    ("index", "uuid", "gpu_recovery_action", "name"),
    ("index", "uuid", "reset_status.reset_required", "name"),
    ("index", "uuid", "name"),
)
#: answers that report nothing (the field is not supported here, or could not be read)
_UNREPORTED = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown", "[unknown error]"}

Run = Callable[[list[str], float], "tuple[int, str] | None"]


def run_nvidia_smi(args: list[str], timeout: float) -> tuple[int, str] | None:
    """``nvidia-smi ARGS`` -> (exit code, stdout); None without the tool or when it did not answer in time."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.returncode, out.stdout


def _status(field: str, cell: str) -> tuple[bool | None, str]:
    """(needs a reset: True / False / None for not reported, the driver's words) of one status cell.

    A recovery action counts only when it names a reset or a reboot (NVML: Reset, Reboot, Drain and Reset, Bus
    Reset, System Reboot; "[GPU requires reset]"); "None" is healthy; anything else (Drain P2P, "[GPU is lost]",
    "[Insufficient Permissions]") reports nothing this module can act on."""
    text = cell.strip()
    low = text.lower()
    if low in _UNREPORTED:
        return None, ""
    if field == "gpu_recovery_action":
        if low == "none":
            return False, text
        return (True, text) if ("reset" in low or "reboot" in low) else (None, text)
    return {"yes": True, "no": False}.get(low), text


def driver_gpus(timeout: float = 15.0, run: Run = run_nvidia_smi) -> list[dict]:
    """The GPUs ``nvidia-smi`` lists: ``[{"index", "uuid", "name", "needs_reset", "status"}]``; ``needs_reset`` is
    True, False or None (the driver reported no status), ``status`` the driver's words (e.g. "Reset").  ``[]``
    without the tool or a driver; a query that does not answer within ``timeout`` s is not followed by another.
    Lines of GPUs the tool could not read are left out; the others count even when it exits non-zero."""
    found: list[dict] = []
    for fields in QUERIES:
        asked = run(["--query-gpu=" + ",".join(fields), "--format=csv,noheader"], timeout)
        if asked is None:
            return found  # no tool, or it hung: asking again would only wait again
        code, out = asked
        gpus = []
        for line in out.splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) < len(fields) or not cells[0].isdigit():
                continue
            name = ", ".join(cells[len(fields) - 1 :])  # the name is last: a comma in it does not shift the rest
            needs, status = _status(fields[2], cells[2]) if len(fields) == 4 else (None, "")
            gpus.append(
                {"index": int(cells[0]), "uuid": cells[1], "name": name, "needs_reset": needs, "status": status}
            )
        if any(g["needs_reset"] is not None for g in gpus):
            return gpus
        found = found or gpus  # listed, but this field reported nothing: the next query may
        if not gpus and code == 0:
            return found  # the driver answered and lists no GPU
    return found


def _same_uuid(a: str | None, b: str | None) -> bool:
    def norm(u: str) -> str:
        u = u.strip().lower()
        return u[4:] if u.startswith("gpu-") else u

    return bool(a and b) and norm(a) == norm(b)


def _head(listed: list[dict], cuda_error: str | None, what: str) -> str:
    said = f" ({cuda_error.strip().splitlines()[0]})" if cuda_error and cuda_error.strip() else ""
    names = ", ".join(f"{g['index']}: {g['name']}" for g in listed)
    return f"nvidia-smi lists {len(listed)} GPU{'s' if len(listed) > 1 else ''} ({names}){what}{said}"


def _needs_reset(gpus: list[dict], head: str) -> str | None:
    broken = [g for g in gpus if g["needs_reset"]]
    if not broken:
        return None
    which = "; ".join(
        f"GPU {g['index']} needs {'a reboot' if 'reboot' in g['status'].lower() else 'a reset'}"
        + (f" (nvidia-smi: {g['status']})" if g["status"] else "")
        for g in broken
    )
    return (
        f"{head}: {which}; it stays unusable for every process until its administrator resets it or the machine "
        "restarts; `dmesg | grep -i xid` names the fault that caused it"
    )


def no_gpu_diagnosis(
    cuda_error: str | None = None,
    *,
    gpus: Callable[[], list[dict]] = driver_gpus,
    environ: Any = os.environ,
) -> str | None:
    """Why CUDA finds no GPU although the driver lists some, in one line; None when the driver lists none either
    (then there is simply no GPU here) or cannot be asked.  ``cuda_error``: what CUDA or torch said, quoted.
    ``CUDA_VISIBLE_DEVICES`` set is named first: hidden GPUs are not this process's to diagnose."""
    listed = gpus()
    if not listed:
        return None
    head = _head(listed, cuda_error, " but CUDA finds none")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"{head}: CUDA_VISIBLE_DEVICES={visible!r} hides them or names none that exists"
    reset = _needs_reset(listed, head)
    if reset:
        return reset
    if all(g["needs_reset"] is None for g in listed):
        return f"{head}: this driver reports no recovery action or reset status; `dmesg | grep -i xid` may say more"
    return f"{head}: the driver reports no reset needed; `dmesg | grep -i xid` may say more"


def reset_diagnosis(
    cuda_error: str | None = None, *, uuid: str | None = None, gpus: Callable[[], list[dict]] = driver_gpus
) -> str | None:
    """For a worker pool whose worker starts fail on one CUDA device: the line saying that device's GPU needs a
    reset, or None.  ``uuid``: the device's GPU (from the device probe); without it only a machine with a single GPU
    is judged -- another GPU that needs a reset says nothing about this device.  Under MIG torch reports the
    instance's UUID, which matches no GPU here: such a device is never given up (the safe way to be wrong)."""
    listed = gpus()
    mine = [g for g in listed if _same_uuid(g.get("uuid"), uuid)] if uuid else (listed if len(listed) == 1 else [])
    if not mine:
        return None
    return _needs_reset(mine, _head(mine, cuda_error, ", and a worker could not start there"))
