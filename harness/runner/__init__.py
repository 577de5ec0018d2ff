"""The runner: worker pool, fault isolation, per-case execution and verdicts, replay and minimize.

- ``targets``: backward-compatible names for :mod:`harness.targets` (the Target protocol and registry live there).
- ``execute``: ``run_case`` -- build inputs, run, judge; what a worker does per case.
- ``worker``: the worker process loop and the one-shot ``python -m harness.runner.worker``.
- ``pool``: ``WorkerPool`` -- spawned workers per device, replaced after faults; attribution.
- ``replay`` / ``minimize``: the ``python -m harness replay|minimize`` commands.

Names are imported lazily, so ``import harness.runner`` stays cheap and never touches CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "WorkerPool",
    "run_case",
    "Target",
    "BaseTarget",
    "register_target",
    "get_target",
    "all_targets",
    "probe_cuda",
    "probe_devices",
]

_WHERE = {
    "WorkerPool": "harness.runner.pool",
    "probe_cuda": "harness.runner.pool",
    "probe_devices": "harness.runner.pool",
    "run_case": "harness.runner.execute",
    "Target": "harness.runner.targets",
    "BaseTarget": "harness.runner.targets",
    "register_target": "harness.runner.targets",
    "get_target": "harness.runner.targets",
    "all_targets": "harness.runner.targets",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'harness.runner' has no attribute {name!r}")
