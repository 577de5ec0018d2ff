"""The ops the runner drives, as targets: the protocol and registry, the real ops, the test doubles.

- :mod:`harness.targets.protocol`: the :class:`~harness.targets.protocol.Target` protocol,
  :class:`~harness.targets.protocol.BaseTarget` and the registry (imports nothing else of the package).
- :mod:`harness.targets.linear` / :mod:`harness.targets.attention`: the real op targets (FP8 linears,
  attention backends), each with its layout classes (:mod:`harness.targets.base`,
  :mod:`harness.targets.layout_classes`); :mod:`harness.targets.plugin`: user plug-ins as targets.
- :mod:`harness.targets.doubles`: CPU and fault-injection test doubles, registered only on request.

Loading is explicit: :func:`load_targets` imports the real op modules once (each registers its
targets), adds the plug-in on-demand factory and registers ``$HARNESS_PLUGINS`` /
``$HARNESS_ATTN_PLUGINS``; ``include_doubles=True`` registers the test doubles too (the test suite and
the runner's worker processes ask for them).  :func:`get_target`, :func:`all_targets`,
:func:`resolve_target` and :func:`known_defect_of` here load first; the ones in ``protocol`` do not.
Importing this package imports only ``protocol``; the other names are loaded on first use.
Nothing here initialises CUDA: availability is probed by each target's ``available(device)`` in the worker.

User plug-ins are targets ``plugin.<spec>`` (FP8 linears) and ``plugin_attn.<spec>`` (attention),
``<spec>`` being ``package.module:attr`` or an entry-point name.  A lookup of such a name registers
it on demand (:func:`plugin_target_on_demand`), so a case file names its plug-in by itself: ``show``,
``replay``, ``minimize`` and ``git bisect run`` need nothing else.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

from harness.targets import protocol as _protocol
from harness.targets.protocol import (
    LOAD_ERRORS,
    BaseTarget,
    Target,
    TargetError,
    default_inputs,
    register_on_demand,
    register_target,
    unregister_target,
)

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case
    from harness.verdicts import Result

__all__ = [
    "load_targets",
    "get_target",
    "all_targets",
    "resolve_target",
    "known_defect_of",
    "Target",
    "BaseTarget",
    "TargetError",
    "default_inputs",
    "register_target",
    "unregister_target",
    "register_on_demand",
    "TARGET_MODULES",
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

#: Environment variable listing FP8 linear plug-ins (``pkg.mod:attr``, comma-separated) to register on load.
PLUGINS_ENV = "HARNESS_PLUGINS"
#: The same for attention plug-ins (targets ``plugin_attn.<spec>``).
ATTN_PLUGINS_ENV = "HARNESS_ATTN_PLUGINS"
#: the modules holding the real op targets; importing one registers its targets
TARGET_MODULES: tuple[str, ...] = ("harness.targets.attention", "harness.targets.linear")

#: names loaded from a submodule on first use (so importing the package stays light)
_LAZY = {
    "ATTENTION_CLASSES": "harness.targets.layout_classes",
    "LINEAR_CLASSES": "harness.targets.layout_classes",
    "Context": "harness.targets.layout_classes",
    "LayoutClass": "harness.targets.layout_classes",
    "classes_for": "harness.targets.layout_classes",
    "LAYOUT_CLASS_PARAM": "harness.targets.base",
    "CaseFactory": "harness.targets.base",
    "ClassTarget": "harness.targets.base",
    "register_plugin": "harness.targets.linear",
    "register_attention_plugin": "harness.targets.attention",
}

_LOAD_LOCK = threading.RLock()
_LOADED = False


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "PLUGIN_PREFIXES":
        return _plugin_prefixes()
    raise AttributeError(f"module 'harness.targets' has no attribute {name!r}")


def _plugin_prefixes() -> dict[str, Callable[[str], str]]:
    """Target-name prefix -> how a plug-in of that kind is registered."""
    from harness.targets.attention import register_attention_plugin
    from harness.targets.linear import register_plugin

    return {"plugin.": register_plugin, "plugin_attn.": register_attention_plugin}


def plugin_target_on_demand(name: str) -> str | None:
    """Register the plug-in target ``name`` (``plugin.<spec>`` / ``plugin_attn.<spec>``); its name, or None
    when ``name`` is no well-formed plug-in target name. Nothing is imported: the worker resolves it."""
    if not name.startswith(("plugin.", "plugin_attn.")):
        return None
    for prefix, register in _plugin_prefixes().items():
        if name.startswith(prefix):
            try:
                return register(name[len(prefix) :])
            except ValueError:
                return None
    return None


def register_env_plugins() -> list[str]:
    """Register every plug-in named in ``$HARNESS_PLUGINS`` / ``$HARNESS_ATTN_PLUGINS``; returns the target names."""
    from harness.targets.attention import register_attention_plugin
    from harness.targets.linear import register_plugin

    def specs(var: str) -> list[str]:
        return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]

    return [register_plugin(s) for s in specs(PLUGINS_ENV)] + [
        register_attention_plugin(s) for s in specs(ATTN_PLUGINS_ENV)
    ]


def load_targets(*, include_doubles: bool = False) -> dict[str, Target]:
    """Register the real op targets (once), and the test doubles with ``include_doubles``; every target by name.

    A module of :data:`TARGET_MODULES` (or a ``$HARNESS_PLUGINS`` entry) that fails is recorded in
    ``protocol.LOAD_ERRORS`` and named in the unknown-target error; the other targets keep working.
    """
    global _LOADED
    with _LOAD_LOCK:
        if not _LOADED:
            _LOADED = True
            for mod in TARGET_MODULES:
                try:
                    importlib.import_module(mod)
                except Exception as e:  # a broken op module must not take the others down with it
                    LOAD_ERRORS[mod] = f"{type(e).__name__}: {e}"
            register_on_demand(plugin_target_on_demand)
            try:
                register_env_plugins()
            except Exception as e:  # noqa: BLE001 - a bad $HARNESS_PLUGINS entry is named, not fatal
                LOAD_ERRORS[f"${PLUGINS_ENV}/${ATTN_PLUGINS_ENV}"] = f"{type(e).__name__}: {e}"
    if include_doubles:
        from harness.targets.doubles import register_doubles

        register_doubles()
    return _protocol.all_targets()


def all_targets() -> dict[str, Target]:
    """Every registered target by name, after :func:`load_targets`."""
    return load_targets()


def get_target(name: str) -> Target:
    """:func:`harness.targets.protocol.get_target` after :func:`load_targets`."""
    load_targets()
    return _protocol.get_target(name)


def resolve_target(case: "Case") -> Target:
    """:func:`harness.targets.protocol.resolve_target` after :func:`load_targets`."""
    load_targets()
    return _protocol.resolve_target(case)


def known_defect_of(case: "Case", result: "Result") -> str | None:
    """:func:`harness.targets.protocol.known_defect_of` after :func:`load_targets`: the named defect of the
    case's target that explains ``result``, or None."""
    load_targets()
    return _protocol.known_defect_of(case, result)
