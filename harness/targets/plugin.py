"""What the plug-in targets share: ``plugin.<spec>`` (FP8 linears) and ``plugin_attn.<spec>`` (attention).

A plug-in target resolves the user's object through :mod:`harness.quant.plugins` inside the
worker, once per target instance.  A plug-in that does not resolve is ``unsupported`` (its
``run`` raises the :class:`~harness.quant.plugins.PluginError`, a
:class:`~harness.verdicts.Unsupported`) -- unless what its import lacks is another package,
which is ``unavailable`` (cannot run here).  Every case records the plug-in's
:meth:`~harness.quant.plugins.Plugin.describe` in ``case.params["plugin"]``.
"""

from __future__ import annotations

from typing import Any, Mapping

from harness.quant.plugins import (
    LINEAR_GROUP,
    Plugin,
    PluginError,
    describe_unresolved,
    probe,
    resolve,
)
from harness.targets.protocol import register_target

__all__ = ["PluginTarget", "probe_plugin", "register_plugin_target"]


class PluginTarget:
    """Mixin put before a :class:`~harness.targets.base.ClassTarget` for a user's plug-in."""

    spec: str = ""
    #: ``harness.quant.plugins.LINEAR_GROUP`` or ``ATTENTION_GROUP``
    plugin_group: str = ""
    #: ``Plugin.describe()`` when known without importing the plug-in here (set from the matrix's probe)
    plugin_info: dict[str, Any] | None = None

    def available(self, device: str) -> tuple[bool, str]:
        try:
            self.plugin()
        except PluginError as e:
            if e.missing:
                return False, str(e)
            # otherwise not "unavailable": run() raises the same error, and the verdict is unsupported
        return True, ""

    def plugin(self) -> Plugin:
        """The resolved plug-in, once per target instance (a failure is not kept: it raises again)."""
        plugin = self.__dict__.get("_resolved")
        if plugin is None:
            plugin = self.__dict__["_resolved"] = resolve(self.spec, self.plugin_group)
        return plugin

    def info(self) -> dict[str, Any]:
        """``plugin_info``, else the plug-in resolved in this process and described; one that does not resolve
        is described as taking everything (its cases then say why it cannot be called: ``unsupported``)."""
        if self.plugin_info is not None:
            return dict(self.plugin_info)
        try:
            return self.plugin().describe()
        except PluginError:
            return describe_unresolved(self.spec, "linear" if self.plugin_group == LINEAR_GROUP else "attention")


def probe_plugin(spec: str, group: str) -> dict[str, Any]:
    """:func:`harness.quant.plugins.probe` (a subprocess), its failure as a one-line ValueError."""
    try:
        return probe(spec, group)
    except PluginError as e:
        msg = str(e)
        raise ValueError(msg if repr(spec) in msg else f"plug-in {spec!r} cannot be loaded: {msg}") from None


def register_plugin_target(
    base: type, name: str, spec: str, info: Mapping[str, Any] | None, probe: bool, doc: str, **attrs: Any
) -> str:
    """Register a subclass of ``base`` (a :class:`PluginTarget`) as ``name`` for ``spec``; returns ``name``.

    ``info``: the plug-in's ``describe()`` when known; ``probe=True`` gets it from :func:`probe_plugin`
    (raising ValueError, one line, when the plug-in does not load). ``attrs``: more class attributes.
    """
    if probe and info is None:
        info = probe_plugin(spec, base.plugin_group)
    safe = spec.replace(".", "_").replace(":", "__")
    cls = type(
        f"{base.__name__}_{safe}",
        (base,),
        {
            "name": name,
            "spec": spec,
            "description": doc,
            "__doc__": doc,
            "plugin_info": dict(info) if info is not None else None,
            **attrs,
        },
    )
    register_target(cls, replace=True)
    return name
