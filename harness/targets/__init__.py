"""Real op targets for the runner: FP8 linears and attention backends, each with its layout classes.

Importing this package registers every target in :mod:`harness.runner.targets`' registry (the
registry imports it lazily on the first lookup).  Nothing here initialises CUDA: availability is
probed by each target's ``available(device)`` inside the worker.

User plug-ins (``package.module:attr`` FP8 linears) listed in the ``HARNESS_PLUGINS`` environment
variable (comma-separated) are registered as ``plugin.<spec>`` too, so spawned workers, which
inherit the environment, know them.
"""

from __future__ import annotations

import os

from harness.targets import attention as _attention  # noqa: F401  (registers the attention targets)
from harness.targets import linear as _linear  # noqa: F401  (registers the linear targets)
from harness.targets.base import LAYOUT_CLASS_PARAM, CaseFactory, ClassTarget
from harness.targets.layout_classes import ATTENTION_CLASSES, LINEAR_CLASSES, Context, LayoutClass, classes_for
from harness.targets.linear import register_plugin

__all__ = [
    "ATTENTION_CLASSES",
    "LINEAR_CLASSES",
    "LAYOUT_CLASS_PARAM",
    "CaseFactory",
    "ClassTarget",
    "Context",
    "LayoutClass",
    "classes_for",
    "register_plugin",
    "register_env_plugins",
    "PLUGINS_ENV",
]

#: Environment variable listing plug-in specs (``pkg.mod:attr``, comma-separated) to register on import.
PLUGINS_ENV = "HARNESS_PLUGINS"


def register_env_plugins() -> list[str]:
    """Register every plug-in named in ``$HARNESS_PLUGINS``; returns the target names."""
    specs = [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]
    return [register_plugin(s) for s in specs]


register_env_plugins()
