"""What this device can run: one device-info record and one CUDA capability check.

Every capability gate in the harness (targets, attention backends, FP8 dispatch, benchmarks,
the ``gpu`` marker) asks here, so a skip reason reads the same wherever it comes from:
``"FP8 matmul needs compute capability >= 8.9, found 8.6"``. Nothing is probed at import:
each function asks torch when called (``torch.cuda.is_available()`` creates no CUDA context).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "DeviceInfo",
    "cuda_available",
    "cuda_capability",
    "device_info",
    "format_capability",
    "no_cuda_reason",
    "require_cuda",
]

Capability = tuple[int, int]

# The compute capability of a device index cannot change within a process.
_CAPABILITY: dict[int, Capability] = {}


@dataclass(frozen=True)
class DeviceInfo:
    """Identity of one device and the library versions that run on it."""

    device: str  # as given: "cuda:0", "cpu"
    type: str  # torch.device(device).type
    name: str  # "NVIDIA H200", the CPU model, ...
    capability: Capability | None  # CUDA compute capability, None off CUDA
    torch: str
    cuda: str | None  # torch.version.cuda (None on a CPU-only build)
    cudnn: int | None  # torch.backends.cudnn.version(), e.g. 91900
    memory_bytes: int | None = None
    l2_bytes: int | None = None
    multiprocessors: int | None = None

    @property
    def capability_text(self) -> str | None:
        """``"9.0"``, or None off CUDA."""
        return format_capability(self.capability) if self.capability is not None else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_capability(cap: Capability | tuple[int, ...]) -> str:
    """``(8, 9)`` -> ``"8.9"``."""
    return ".".join(str(int(x)) for x in cap)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (no context is created)."""
    return torch.cuda.is_available()


def cuda_capability(device: str | torch.device = "cuda") -> Capability:
    """The compute capability of a CUDA ``device`` (the current one for a bare ``"cuda"``), asked once per index."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        major, minor = torch.cuda.get_device_capability(index)
        cap = _CAPABILITY[index] = (int(major), int(minor))
    return cap


def no_cuda_reason() -> str | None:
    """Why nothing CUDA can run in this process (naming the torch build), or None when it can."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
    if not cuda_available():
        why = _no_gpu_diagnosis()
        return f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU" + (
            f"; {why}" if why else ""
        )
    return None


@functools.cache
def _no_gpu_diagnosis() -> str | None:
    """:func:`harness.runner.gpu_health.no_gpu_diagnosis` with what CUDA says, once per process (it runs nvidia-smi)."""
    from harness.runner.gpu_health import no_gpu_diagnosis

    try:
        torch.cuda.init()
        said = None
    except Exception as e:  # noqa: BLE001 - the message is the point
        said = f"{type(e).__name__}: {e}"
    return no_gpu_diagnosis(said)


def require_cuda(
    min_capability: tuple[int, int] | None = None,
    what: str | None = None,
    *,
    device: str | torch.device = "cuda",
) -> str | None:
    """The exact reason ``what`` cannot run on ``device``, or None when it can.

    ``"{what} needs a CUDA device, got 'cpu'"``, ``"{what} needs a CUDA device: no CUDA device"``
    (just ``"no CUDA device"`` without ``what``) or ``"{what} needs compute capability >= 8.9,
    found 8.6"``.
    """
    subject = f"{what} " if what else ""
    if str(device).split(":", 1)[0] != "cuda":
        return f"{subject}needs a CUDA device, got {str(device)!r}"
    if not cuda_available():
        return f"{what} needs a CUDA device: no CUDA device" if what else "no CUDA device"
    if min_capability is not None:
        cap = cuda_capability(device)
        if cap < tuple(min_capability):
            return (
                f"{subject}needs compute capability >= {format_capability(min_capability)}, "
                f"found {format_capability(cap)}"
            )
    return None


def device_info(device: str | torch.device = "cuda") -> DeviceInfo:
    """The :class:`DeviceInfo` of ``device``, probed now."""
    dev = torch.device(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    common = {
        "device": str(device),
        "type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return DeviceInfo(
            name=props.name,
            capability=(int(props.major), int(props.minor)),
            memory_bytes=int(props.total_memory),
            l2_bytes=int(getattr(props, "L2_cache_size", 0)),
            multiprocessors=int(props.multi_processor_count),
            **common,
        )
    return DeviceInfo(name=_cpu_name() if dev.type == "cpu" else dev.type, capability=None, **common)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
