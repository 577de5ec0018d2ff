"""Real op targets for the runner: FP8 linears and attention backends, each with its layout classes.

Importing this package registers every target in :mod:`harness.runner.targets`' registry (the
registry imports it lazily on the first lookup).  Nothing here initialises CUDA: availability is
probed by each target's ``available(device)`` inside the worker.

User plug-ins are targets ``plugin.<spec>`` (FP8 linears) and ``plugin_attn.<spec>`` (attention),
``<spec>`` being ``package.module:attr`` or an entry-point name.  A lookup of such a name registers
it on demand (:func:`plugin_target_on_demand`), so a case file names its plug-in by itself: ``show``,
``replay``, ``minimize`` and ``git bisect run`` need nothing else.  Plug-ins listed in the
``HARNESS_PLUGINS`` / ``HARNESS_ATTN_PLUGINS`` environment variables (comma-separated) are
registered on import too.
"""

from __future__ import annotations

import os

from harness.targets import attention as _attention  # noqa: F401  (registers the attention targets)
from harness.targets import linear as _linear  # noqa: F401  (registers the linear targets)
from harness.runner.targets import register_on_demand
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
    "plugin_target_on_demand",
    "PLUGIN_PREFIXES",
    "PLUGINS_ENV",
    "ATTN_PLUGINS_ENV",
]

#: Environment variable listing FP8 linear plug-ins (``pkg.mod:attr``, comma-separated) to register on import.
PLUGINS_ENV = "HARNESS_PLUGINS"
#: The same for attention plug-ins (targets ``plugin_attn.<spec>``).
ATTN_PLUGINS_ENV = "HARNESS_ATTN_PLUGINS"


#: target-name prefix -> how a plug-in of that kind is registered
PLUGIN_PREFIXES = {"plugin.": register_plugin, "plugin_attn.": register_attention_plugin}


def plugin_target_on_demand(name: str) -> str | None:
    """Register the plug-in target ``name`` (``plugin.<spec>`` / ``plugin_attn.<spec>``); its name, or None
    when ``name`` is no well-formed plug-in target name. Nothing is imported: the worker resolves it."""
    for prefix, register in PLUGIN_PREFIXES.items():
        if name.startswith(prefix):
            try:
                return register(name[len(prefix):])
            except ValueError:
                return None
    return None


def register_env_plugins() -> list[str]:
    """Register every plug-in named in ``$HARNESS_PLUGINS`` / ``$HARNESS_ATTN_PLUGINS``; returns the target names."""
    def specs(var: str) -> list[str]:
        return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]

    return [register_plugin(s) for s in specs(PLUGINS_ENV)] + [register_attention_plugin(s)
                                                                 for s in specs(ATTN_PLUGINS_ENV)]


register_on_demand(plugin_target_on_demand)
register_env_plugins()
