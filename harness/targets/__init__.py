"""Real op targets for the runner: FP8 linears and attention backends, each with its layout classes.

Importing this package registers every target in :mod:`harness.runner.targets`' registry (the
registry imports it lazily on the first lookup).  Nothing here initialises CUDA: availability is
probed by each target's ``available(device)`` inside the worker.

User plug-ins listed in the ``HARNESS_PLUGINS`` (FP8 linears, targets ``plugin.<spec>``) and
``HARNESS_ATTN_PLUGINS`` (attention, ``plugin_attn.<spec>``) environment variables (comma-separated
``package.module:attr`` or entry-point names) are registered too, so spawned workers, which inherit
the environment, know them; ``python -m harness matrix --plugin/--attn-plugin`` sets them.
"""

from __future__ import annotations

import os

from harness.targets import attention as _attention  # noqa: F401  (registers the attention targets)
from harness.targets import linear as _linear  # noqa: F401  (registers the linear targets)
from harness.targets.base import LAYOUT_CLASS_PARAM, CaseFactory, ClassTarget
from harness.targets.layout_classes import ATTENTION_CLASSES, LINEAR_CLASSES, Context, LayoutClass, classes_for
from harness.targets.attention import register_attention_plugin
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
    "register_attention_plugin",
    "register_env_plugins",
    "PLUGINS_ENV",
    "ATTN_PLUGINS_ENV",
]

#: Environment variable listing FP8 linear plug-ins (``pkg.mod:attr``, comma-separated) to register on import.
PLUGINS_ENV = "HARNESS_PLUGINS"
#: The same for attention plug-ins (targets ``plugin_attn.<spec>``).
ATTN_PLUGINS_ENV = "HARNESS_ATTN_PLUGINS"


def register_env_plugins() -> list[str]:
    """Register every plug-in named in ``$HARNESS_PLUGINS`` / ``$HARNESS_ATTN_PLUGINS``; returns the target names."""
    def specs(var: str) -> list[str]:
        return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]

    return [register_plugin(s) for s in specs(PLUGINS_ENV)] + [register_attention_plugin(s)
                                                                 for s in specs(ATTN_PLUGINS_ENV)]


register_env_plugins()
