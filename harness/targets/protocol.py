"""The :class:`Target` protocol, its defaults (:class:`BaseTarget`) and the registry of targets by name.

A target wraps one op under test (an FP8 linear forward, an attention backend, a fault injector).
The runner builds its inputs from a :class:`~harness.cases.Case` *inside the worker*, runs it, and
judges the output against the target's own references and bounds.

This module is the bottom of the targets package: it imports nothing from ``harness.runner`` nor the
op modules, and registers nothing.  The real ops are registered by :func:`harness.targets.load_targets`;
the CPU and fault-injection test doubles by :func:`harness.targets.doubles.register_doubles` (tests and
the runner's worker processes opt in).  The lookups here (:func:`get_target`, :func:`all_targets`) see
what is registered now, plus what an on-demand factory (:func:`register_on_demand`) adds for a name.

Nothing here touches CUDA at import time; ``available`` is called in the worker.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from harness.reference.metrics import Bound

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case
    from harness.verdicts import Result

__all__ = [
    "Target",
    "BaseTarget",
    "TargetError",
    "default_inputs",
    "register_target",
    "unregister_target",
    "register_on_demand",
    "get_target",
    "all_targets",
    "resolve_target",
    "known_defect_of",
    "LOAD_ERRORS",
]


class TargetError(LookupError):
    """Unknown target name, or a malformed target registration."""


@runtime_checkable
class Target(Protocol):
    """What the runner needs from an op under test.

    ``name``: registry key, e.g. "fp8_linear", "legacy.comfyui", "attn.sdpa.flash", "fault.segfault".
    ``kind``: "linear" | "attention" | "fault" | "cpu-test".
    ``mutates``: names of inputs whose *values* the op may legitimately overwrite (the poison
    around every view must still be intact).
    ``deterministic``: the op gives bitwise the same output for the same inputs in the same process (default
    True: the runner calls it a second time and a different output is verdict ``nondeterministic``); False
    skips that second call (an op that is nondeterministic by design, e.g. atomics in its reduction).

    Optional: ``known_defect(case, result) -> str | None`` (see :meth:`BaseTarget.known_defect`).
    """

    name: str
    kind: str
    mutates: tuple[str, ...]
    deterministic: bool

    def available(self, device: str) -> tuple[bool, str]:
        """(can run on ``device``, reason naming what is missing). Probed in the worker."""
        ...

    def make_inputs(
        self, case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Input tensors laid out as ``case.layouts``; ``values`` (contiguous, logical shape) override recipes."""
        ...

    def run(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
        """The op under test."""
        ...

    def reference(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exact, emulated-or-naive) on the same (already quantized) inputs; never mutates them."""
        ...

    def bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor) -> Bound:
        """Allowed error of ``run`` against ``exact``: ``k * err(emulated) + floor`` (metric and why inside)."""
        ...

    def layout_bound(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor
    ) -> Bound | None:
        """Allowed difference between two layouts of the same values, as ``k * err(emulated) + floor``
        (the same ``ref_err`` as the drift bound); None: bitwise equal expected."""
        ...

    def layout_classes(self) -> dict[str, Callable[[], Any]]:
        """Layout class name -> zero-argument callable returning a Hypothesis strategy of ``Case``."""
        ...


def _broadcast_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[int]:
    return [i for i, (sz, st) in enumerate(zip(shape, strides)) if st == 0 and sz > 1]


def default_inputs(
    case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Materialize every layout of ``case`` on ``device``.

    Values come from ``values[name]`` when given (stored tensors of a case file), else from
    ``case.values[name]`` (a recipe), else from a normal recipe seeded by ``case.seed`` and the
    input's position. Values are made constant along stride-0 (broadcast) dims, as a broadcast
    view can only hold such values. ``values`` are never modified.
    """
    from harness.layouts import materialize

    out: dict[str, torch.Tensor] = {}
    for name, spec in case.layouts.items():
        if values is not None and name in values:
            v = values[name]
        else:
            v = case.value_spec(name).generate(spec.shape, spec.torch_dtype)
        bdims = _broadcast_dims(spec.shape, spec.strides())
        if bdims:
            idx = tuple(slice(0, 1) if d in bdims else slice(None) for d in range(len(spec.shape)))
            v = v[idx].expand(spec.shape)
        out[name] = materialize(spec, v, device)
    return out


class BaseTarget:
    """Defaults for the :class:`Target` protocol; subclasses set ``name``/``kind`` and override ``run`` etc."""

    name: str = ""
    kind: str = "cpu-test"
    mutates: tuple[str, ...] = ()
    deterministic: bool = True
    description: str = ""

    def available(self, device: str) -> tuple[bool, str]:
        return True, ""

    def make_inputs(
        self, case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return default_inputs(case, device, values)

    def run(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError(f"target {self.name!r} does not implement run()")

    def reference(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(f"target {self.name!r} does not implement reference()")

    def bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor) -> Bound:
        return Bound.exact(f"{self.name}: no bound declared, bitwise equality expected")

    def layout_bound(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor
    ) -> Bound | None:
        return None

    def layout_classes(self) -> dict[str, Callable[[], Any]]:
        return {}

    def known_defect(self, case: "Case", result: "Result") -> str | None:
        """A named defect of the op itself (not of the layout) that explains ``result`` on ``case``, or None.

        Decided from structured data only (the case's layouts and params, ``result.verdict``,
        ``result.mutated_inputs`` / ``result.poison_written``), never from the message text.
        """
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.kind})>"


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Target] = {}
_LOCK = threading.Lock()
_ON_DEMAND: list[Callable[[str], Any]] = []
#: module -> "Type: message" for target modules :func:`harness.targets.load_targets` could not import
#: (named in the unknown-target error; the other targets keep working)
LOAD_ERRORS: dict[str, str] = {}


def register_on_demand(factory: Callable[[str], Any]) -> Callable[[str], Any]:
    """Add ``factory(name)``, called by :func:`get_target` for a name nothing registered: it registers
    the target ``name`` stands for (e.g. ``plugin.<spec>``: a user plug-in named in a case file) or
    does nothing. Returns ``factory``."""
    with _LOCK:
        if factory not in _ON_DEMAND:
            _ON_DEMAND.append(factory)
    return factory


def register_target(target: Any = None, *, replace: bool = False) -> Any:
    """Register a target instance (or class, instantiated with no arguments). Usable as a decorator.

    A second target with the same name is an error unless ``replace=True``.
    Returns what it was given, so ``@register_target`` leaves the class in place.
    """
    if target is None:
        return lambda t: register_target(t, replace=replace)
    inst = target() if isinstance(target, type) else target
    missing = [
        a
        for a in (
            "name",
            "kind",
            "run",
            "reference",
            "available",
            "make_inputs",
            "bound",
            "layout_bound",
            "layout_classes",
        )
        if not hasattr(inst, a)
    ]
    if missing:
        raise TargetError(f"{inst!r} is not a Target: missing {missing} (subclass harness.targets.protocol.BaseTarget)")
    if not isinstance(inst.name, str) or not inst.name:
        raise TargetError(f"{inst!r} needs a non-empty string 'name'")
    if not hasattr(inst, "mutates"):
        inst.mutates = ()
    if not hasattr(inst, "deterministic"):
        inst.deterministic = True
    with _LOCK:
        if inst.name in _REGISTRY and not replace and type(_REGISTRY[inst.name]) is not type(inst):
            raise TargetError(
                f"target {inst.name!r} is already registered ({_REGISTRY[inst.name]!r}); "
                "pick another name or pass replace=True"
            )
        _REGISTRY[inst.name] = inst
    return target


def unregister_target(name: str) -> Target | None:
    """Remove the target registered as ``name``; returns it (None when there was none)."""
    with _LOCK:
        return _REGISTRY.pop(name, None)


def all_targets() -> dict[str, Target]:
    """Every target registered now, by name (see :func:`harness.targets.load_targets` for the real ops)."""
    with _LOCK:
        return dict(sorted(_REGISTRY.items()))


def get_target(name: str) -> Target:
    """The target registered as ``name`` (or that an on-demand factory registers for it); the error lists
    the known names and the target modules that failed to import."""
    with _LOCK:
        t = _REGISTRY.get(name)
        factories = list(_ON_DEMAND) if t is None else []
    if t is not None:
        return t
    for factory in factories:
        factory(name)
    with _LOCK:
        t = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if t is None:
        msg = f"unknown target {name!r}; registered: {', '.join(known)}"
        if LOAD_ERRORS:
            msg += "; failed to import: " + "; ".join(f"{m} ({e})" for m, e in LOAD_ERRORS.items())
        raise TargetError(msg)
    return t


def resolve_target(case: "Case") -> Target:
    """The target a case names: ``case.op`` (falling back to ``f"{op}.{backend}"``)."""
    try:
        return get_target(case.op)
    except TargetError:
        if case.backend:
            try:
                return get_target(f"{case.op}.{case.backend}")
            except TargetError:
                pass
        raise


def known_defect_of(case: "Case", result: "Result") -> str | None:
    """The named defect of the case's own target that explains ``result`` (its ``known_defect``), or None
    (also for a target that is not registered or declares no known defects)."""
    try:
        target = resolve_target(case)
    except TargetError:
        return None
    method = getattr(target, "known_defect", None)
    return method(case, result) if method is not None else None
