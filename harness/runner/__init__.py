"""The runner: worker pool, fault isolation, per-case execution and verdicts, replay and minimize.

- ``targets``: backward-compatible names for :mod:`harness.targets` (the Target protocol and registry live there).
- ``execute``: ``run_case`` -- build inputs, run, judge; what a worker does per case.
- ``worker``: the worker process loop and the one-shot ``python -m harness.runner.worker``.
- ``pool``: ``WorkerPool`` -- spawned workers per device, replaced after faults; attribution. It re-exports
  the names of the modules below, so ``from harness.runner.pool import ...`` keeps working for all of them.
- ``devices``: ``probe_cuda`` / ``probe_devices`` / ``resolve_devices`` (a subprocess looks; the parent never
  touches CUDA).
- ``casefiles``: ``save_failure`` / ``replay_command`` / ``case_values`` -- a failing case written to disk.
- ``fresh``: ``run_in_fresh_process`` / ``attribution_rerun`` (``CUDA_LAUNCH_BLOCKING=1``, compute-sanitizer).
- ``procs``: child processes' environment, temp folders, exit and SIGTERM hooks, ``remove_stale_tmp``.
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
    "probe_cuda": "harness.runner.devices",
    "probe_devices": "harness.runner.devices",
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
