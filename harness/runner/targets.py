"""Backward-compatible names for the targets package (``from harness.runner.targets import get_target``).

The :class:`Target` protocol and the registry live in :mod:`harness.targets.protocol`, the real ops in
:mod:`harness.targets` (registered by :func:`harness.targets.load_targets`; the lookups below load them
first), the CPU and fault-injection test doubles in :mod:`harness.targets.doubles` (registered only by
tests and the runner's workers: ``load_targets(include_doubles=True)``). New code imports from there.
"""

from __future__ import annotations

from harness.targets import all_targets, get_target, known_defect_of, load_targets, resolve_target
from harness.targets.doubles import simulated_fault_active, take_between_cases
from harness.targets.protocol import (
    BaseTarget,
    Target,
    TargetError,
    default_inputs,
    register_on_demand,
    register_target,
    unregister_target,
)

__all__ = [
    "Target",
    "BaseTarget",
    "register_target",
    "unregister_target",
    "get_target",
    "all_targets",
    "resolve_target",
    "load_targets",
    "known_defect_of",
    "TargetError",
    "default_inputs",
    "simulated_fault_active",
    "take_between_cases",
    "register_on_demand",
]
