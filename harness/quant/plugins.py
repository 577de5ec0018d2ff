"""Plug-in point: test your own FP8 linear or attention with the harness.

A plug-in is named either ``"package.module:attr"`` (``attr`` may be dotted: ``"pkg.mod:Cls.method"``)
or by the name of an entry point in the group ``harness.fp8_linear`` (linears) or
``harness.attention`` (attention), e.g. in your ``pyproject.toml``::

    [project.entry-points."harness.fp8_linear"]
    my_linear = "mypkg.fp8:linear_forward"

Three calling conventions are accepted for linears, detected from the object:

``"op"`` -- a plain function taking the tensors::

    def my_linear(input, weight, weight_scale=None, input_scale=None, bias=None, out_dtype=None) -> Tensor

  Only ``input`` and ``weight`` are required; the optional arguments are passed *by name*, and only
  those the function declares (or all of them, to ``**kwargs``): the matrix and the Hypothesis
  strategies then draw only cases the function can take (no ``weight_scale`` parameter: cases
  with an unscaled weight; no ``bias``: cases without bias), and a case file that needs an
  argument it lacks gets the verdict ``unsupported``. ``out_dtype`` is dropped when it is the
  input's own dtype.

``"module"`` -- a patched ``nn.Linear``: a module *class* (constructed as
  ``cls(in_features, out_features, bias=...)``) or a module *instance* (re-used: its ``weight``,
  ``bias``, ``scale_weight`` and ``scale_input`` are replaced for every call, so pass a throwaway
  one). The harness stores the FP8 weight as ``weight`` and the scales as ``scale_weight`` /
  ``scale_input`` (the names scaled FP8 checkpoints use) and calls ``module(input)``.

``"forward"`` -- a WanVideoWrapper-style ``fp8_linear_forward(module, base_dtype, input)``:
  detected when the function takes three positional parameters and the second is named
  ``base_dtype``/``original_dtype``/``dtype``/``compute_dtype`` (or the first
  ``module``/``cls``/``self``/``layer``/``m``). It is called with a module holding the FP8
  weight as above.

Attention plug-ins are plain functions ``fn(q, k, v, ...)``; if they declare ``tensor_layout``
or ``layout`` the harness passes "HND"/"NHD" through it, otherwise they are treated as HND
(SDPA-style) and NHD inputs are handed over as transposed views.

How a failure is told apart: the harness binds the arguments to the plug-in's signature
(``inspect.Signature.bind``) *before* calling it. A binding that fails, a name that does not
import, a missing attribute or an object no convention fits raises :class:`PluginError` /
:class:`PluginCallError`, both :class:`harness.verdicts.Unsupported` (verdict ``unsupported``, a
failure of the run); an exception raised from inside the call is the kernel's own refusal
(``rejected``). A module imports with the current directory on ``sys.path`` (as ``python -m``
puts it there), so a kernel in the directory the harness is started from needs no PYTHONPATH.

:func:`load_linear` / :func:`load_attention` return a callable in the harness's own convention
(``fp8_linear``'s, or ``(q, k, v, layout="HND", **kw)``); :func:`resolve` returns the
:class:`Plugin` with the detected convention. Resolution happens when called (inside a worker),
never at import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from harness.verdicts import Unsupported

__all__ = [
    "LINEAR_GROUP",
    "ATTENTION_GROUP",
    "PluginError",
    "PluginCallError",
    "Plugin",
    "load_object",
    "entry_point_names",
    "detect_convention",
    "resolve",
    "describe_unresolved",
    "probe",
    "load_linear",
    "load_attention",
]

LINEAR_GROUP = "harness.fp8_linear"
ATTENTION_GROUP = "harness.attention"
_GROUPS = (LINEAR_GROUP, ATTENTION_GROUP)
_FORWARD_SECOND = {"base_dtype", "original_dtype", "dtype", "compute_dtype", "orig_dtype"}
_FORWARD_FIRST = {"module", "cls", "self", "layer", "m", "mod"}
_LINEAR_OPTIONAL = ("weight_scale", "input_scale", "bias", "out_dtype")


class PluginError(Unsupported, ImportError):
    """A plug-in name that does not resolve, or an object no convention fits; the message says which.

    ``missing``: the module a plug-in's own import needs that is not installed here (None when the
    plug-in itself is missing or broken) -- the one import failure that means "cannot run here".
    """

    def __init__(self, message: str, *, missing: Optional[str] = None) -> None:
        super().__init__(message)
        self.missing = missing


class PluginCallError(Unsupported, TypeError):
    """The plug-in's signature does not take the arguments this case needs (found by binding, before the call)."""


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # type: ignore[union-attr]  # Python < 3.10


def entry_point_names(group: str = LINEAR_GROUP) -> list[str]:
    """Names of the installed entry points in ``group``."""
    if group not in _GROUPS:
        raise ValueError(f"group={group!r}; use {LINEAR_GROUP!r} or {ATTENTION_GROUP!r}")
    return sorted(ep.name for ep in _entry_points(group))


def load_object(spec: str) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the object."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(p.strip() for p in spec.split(":")):
        raise PluginError(f"plug-in {spec!r} must be named 'package.module:attr' (e.g. 'mypkg.fp8:linear')")
    mod_name, attr = spec.split(":")
    try:
        _cwd_on_path()
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if not e.name or e.name == mod_name or mod_name.startswith(f"{e.name}."):
            raise PluginError(
                f"plug-in {spec!r}: no module named {mod_name!r} (run from the directory that holds "
                "it, or put that directory on PYTHONPATH)"
            ) from e
        if e.name.split(".")[0] != mod_name.split(".")[0]:  # another package, not installed here: cannot run here
            raise PluginError(
                f"plug-in {spec!r}: module {mod_name!r} needs {e.name!r}, which is not installed here", missing=e.name
            ) from e
        raise PluginError(f"plug-in {spec!r}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any import failure is reported with the plug-in name
        raise PluginError(f"plug-in {spec!r}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"plug-in {spec!r}: {getattr(obj, '__name__', obj)!s} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _cwd_on_path() -> None:
    """Put the current directory on ``sys.path`` (first, where ``python -m`` puts it) unless it is there."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def _signature(fn: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: cannot be checked, called as is
        return None


def _bind(name: str, sig: Optional[inspect.Signature], how: str, args: tuple, kwargs: dict) -> None:
    """Raise :class:`PluginCallError` unless ``args``/``kwargs`` bind to ``sig`` (nothing is called)."""
    if sig is None:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise PluginCallError(f"plug-in {name!r} cannot be called as {how}: {e} (its signature: {sig})") from None


def _linear_takes(sig: Optional[inspect.Signature]) -> tuple[str, ...]:
    """The optional ``fp8_linear`` arguments a function with signature ``sig`` can be given by name."""
    if sig is None or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return _LINEAR_OPTIONAL
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(k for k in _LINEAR_OPTIONAL if k in sig.parameters and sig.parameters[k].kind in ok)


def _layout_kw(sig: Optional[inspect.Signature]) -> Optional[str]:
    params = sig.parameters if sig is not None else {}
    return "tensor_layout" if "tensor_layout" in params else ("layout" if "layout" in params else None)


def _positional_params(fn: Callable) -> Optional[list[inspect.Parameter]]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return [
        p
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]


def detect_convention(obj: Any, group: str = LINEAR_GROUP) -> str:
    """``"op"``, ``"module"`` or ``"forward"`` (linears); ``"op"`` for attention. Raises PluginError otherwise."""
    if group == ATTENTION_GROUP:
        if isinstance(obj, nn.Module) or callable(obj):
            return "op"
        raise PluginError(f"attention plug-in {obj!r} is not callable")
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, type):
        if issubclass(obj, nn.Module):
            return "module"
        raise PluginError(
            f"plug-in class {obj.__name__} is not an nn.Module subclass; pass a function or a Linear class"
        )
    if not callable(obj):
        raise PluginError(f"plug-in {obj!r} is not callable")
    params = _positional_params(obj)
    if params is None:
        return "op"
    names = [p.name for p in params]
    if len(names) >= 3 and (names[1] in _FORWARD_SECOND or names[0] in _FORWARD_FIRST):
        return "forward"
    if len(names) < 2 and not any(
        p.kind == inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(obj).parameters.values()
    ):
        raise PluginError(
            f"plug-in {getattr(obj, '__name__', obj)!s} takes {len(names)} positional argument(s) {names}; a linear "
            "plug-in is op(input, weight, ...), a forward fn(module, base_dtype, input) or an nn.Linear"
        )
    return "op"


@dataclass(frozen=True)
class Plugin:
    """A resolved plug-in: where it came from, its group, its detected convention and the object."""

    name: str
    group: str
    convention: str
    obj: Any

    @property
    def kind(self) -> str:
        """``"linear"`` or ``"attention"``."""
        return "linear" if self.group == LINEAR_GROUP else "attention"

    def takes(self) -> tuple[str, ...]:
        """Optional arguments the plug-in can be given: for a linear ``op``, those of ``weight_scale``,
        ``input_scale``, ``bias``, ``out_dtype`` it declares (all four for ``module``/``forward``, which
        read them from the module); for attention, the layout keyword it declares (if any)."""
        if self.group == ATTENTION_GROUP:
            kw = _layout_kw(_signature(self.obj))
            return (kw,) if kw else ()
        return _linear_takes(_signature(self.obj)) if self.convention == "op" else _LINEAR_OPTIONAL

    def describe(self) -> dict[str, Any]:
        """What a case file records about the plug-in: ``{"spec", "kind", "convention", "takes"}``."""
        return {"spec": self.name, "kind": self.kind, "convention": self.convention, "takes": list(self.takes())}

    def as_linear_op(self) -> Callable[..., Tensor]:
        """The plug-in as ``op(input, weight, weight_scale=None, input_scale=None, bias=None, out_dtype=None)``."""
        if self.group != LINEAR_GROUP:
            raise PluginError(f"plug-in {self.name!r} is an attention plug-in, not a linear")
        if self.convention == "op":
            return _wrap_op(self.name, self.obj)
        if self.convention == "forward":
            return _wrap_forward(self.name, self.obj)
        return _wrap_module(self.name, self.obj)

    def as_attention_op(self) -> Callable[..., Tensor]:
        """The plug-in as ``op(q, k, v, layout="HND", **kw)`` returning the output in ``layout``."""
        if self.group != ATTENTION_GROUP:
            raise PluginError(f"plug-in {self.name!r} is a linear plug-in, not attention")
        return _wrap_attention(self.name, self.obj)


def resolve(spec: Any, group: str = LINEAR_GROUP) -> Plugin:
    """Resolve ``"package.module:attr"``, an entry-point name in ``group``, or an object itself."""
    if group not in _GROUPS:
        raise ValueError(f"group={group!r}; use {LINEAR_GROUP!r} or {ATTENTION_GROUP!r}")
    if isinstance(spec, str):
        if ":" in spec:
            obj = load_object(spec)
        else:
            eps = [ep for ep in _entry_points(group) if ep.name == spec]
            if not eps:
                raise PluginError(
                    f"plug-in {spec!r} is neither 'package.module:attr' nor an entry point in group {group!r} "
                    f"(installed: {entry_point_names(group) or 'none'})"
                )
            try:
                _cwd_on_path()
                obj = eps[0].load()
            except Exception as e:  # noqa: BLE001
                raise PluginError(
                    f"entry point {spec!r} ({eps[0].value}) in {group!r} failed to load: {type(e).__name__}: {e}"
                ) from e
        name = spec
    else:
        obj, name = spec, getattr(spec, "__qualname__", type(spec).__name__)
    return Plugin(name=name, group=group, convention=detect_convention(obj, group), obj=obj)


def describe_unresolved(spec: str, kind: str) -> dict[str, Any]:
    """:meth:`Plugin.describe` of a plug-in that does not resolve here: convention unknown, taking everything."""
    return {
        "spec": spec,
        "kind": kind,
        "convention": "unknown",
        "takes": list(_LINEAR_OPTIONAL) if kind == "linear" else [],
    }


def load_linear(spec: Any) -> Callable[..., Tensor]:
    """Resolve a linear plug-in and return it in the ``fp8_linear`` calling convention."""
    return resolve(spec, LINEAR_GROUP).as_linear_op()


def load_attention(spec: Any) -> Callable[..., Tensor]:
    """Resolve an attention plug-in and return it as ``op(q, k, v, layout="HND", **kw)``."""
    return resolve(spec, ATTENTION_GROUP).as_attention_op()


# ---------------------------------------------------------------------------
# Adapters to the harness conventions


def _wrap_op(name: str, fn: Callable) -> Callable[..., Tensor]:
    sig = _signature(fn)
    takes = _linear_takes(sig)

    def op(
        input: Tensor,
        weight: Tensor,
        weight_scale: Optional[Tensor] = None,
        input_scale: Any = None,
        bias: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        given = dict(weight_scale=weight_scale, input_scale=input_scale, bias=bias, out_dtype=out_dtype)
        kwargs = {}
        for key, value in given.items():
            if value is None or (key == "out_dtype" and key not in takes and value == input.dtype):
                continue  # out_dtype = the input's dtype is what a function without the parameter returns anyway
            if key not in takes:
                raise PluginCallError(
                    f"plug-in {name!r} takes no {key!r} argument, but this case needs one (its signature: {sig})"
                )
            kwargs[key] = value
        _bind(name, sig, "op(input, weight, ...)", (input, weight), kwargs)
        return fn(input, weight, **kwargs)

    op.__name__ = f"plugin_{getattr(fn, '__name__', 'op')}"
    return op


def _holder(weight: Tensor, weight_scale: Optional[Tensor], input_scale: Any, bias: Optional[Tensor]) -> nn.Module:
    from harness.quant.legacy import make_fp8_module

    return make_fp8_module(weight, weight_scale, input_scale, bias, copy=False)


def _wrap_forward(name: str, fn: Callable) -> Callable[..., Tensor]:
    sig = _signature(fn)

    def op(
        input: Tensor,
        weight: Tensor,
        weight_scale: Optional[Tensor] = None,
        input_scale: Any = None,
        bias: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        module = _holder(weight, weight_scale, input_scale, bias)
        args = (module, out_dtype or input.dtype, input)
        _bind(name, sig, "fn(module, base_dtype, input)", args, {})
        return fn(*args)

    op.__name__ = f"plugin_{getattr(fn, '__name__', 'forward')}"
    return op


def _load_into(module: nn.Module, src: nn.Module) -> nn.Module:
    """Put ``src``'s FP8 weight, bias and scales on ``module`` (attribute replacement, no copy of data)."""
    for attr in ("weight", "bias"):
        val = getattr(src, attr)
        if attr in module._parameters or isinstance(val, nn.Parameter) or val is None:
            module._parameters.pop(attr, None)
            module.__dict__.pop(attr, None)
            if val is None:
                setattr(module, attr, None)
            else:
                module.register_parameter(attr, nn.Parameter(val.detach(), requires_grad=False))
    for attr in ("scale_weight", "scale_input"):
        module._buffers.pop(attr, None)
        module.__dict__[attr] = getattr(src, attr)
    if hasattr(module, "in_features"):
        module.in_features = src.in_features
        module.out_features = src.out_features
    return module


def _construct(name: str, cls: type, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """``cls(in_features, out_features, bias=..., device="meta")`` (no allocation), or without ``device``."""
    sig = _signature(cls)
    args = (in_features, out_features)
    meta = {"bias": bias, "device": "meta"}
    try:
        _bind(name, sig, "cls(in_features, out_features, bias=..., device=...)", args, meta)
    except PluginCallError:
        _bind(name, sig, "cls(in_features, out_features, bias=...)", args, {"bias": bias})
        return cls(*args, bias=bias)
    try:
        return cls(*args, **meta)
    except TypeError:  # a **kwargs constructor handing device= on to something that refuses it
        return cls(*args, bias=bias)


def _wrap_module(name: str, target: Any) -> Callable[..., Tensor]:
    def op(
        input: Tensor,
        weight: Tensor,
        weight_scale: Optional[Tensor] = None,
        input_scale: Any = None,
        bias: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tensor:
        src = _holder(weight, weight_scale, input_scale, bias)
        if isinstance(target, type):
            module = _construct(name, target, src.in_features, src.out_features, bias is not None)
        else:
            module = target
        _load_into(module, src)
        _bind(name, _signature(module.forward), "module(input)", (input,), {})
        out = module(input)
        return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)

    op.__name__ = f"plugin_{getattr(target, '__name__', type(target).__name__)}"
    return op


def _wrap_attention(name: str, fn: Callable) -> Callable[..., Tensor]:
    sig = _signature(fn)
    layout_kw = _layout_kw(sig)

    def op(q: Tensor, k: Tensor, v: Tensor, layout: str = "HND", **kw: Any) -> Tensor:
        if layout not in ("HND", "NHD"):
            raise ValueError(f"layout={layout!r}; use 'HND' or 'NHD'")
        if layout_kw is not None:
            kw = {layout_kw: layout, **kw}
        elif layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        _bind(name, sig, "fn(q, k, v" + "".join(f", {key}=..." for key in kw) + ")", (q, k, v), kw)
        out = fn(q, k, v, **kw)
        return out.transpose(1, 2) if layout_kw is None and layout == "NHD" else out

    op.__name__ = f"plugin_{getattr(fn, '__name__', 'attention')}"
    return op


# ---------------------------------------------------------------------------
# Probing a plug-in from a process that must not import user code


def probe(spec: str, group: str = LINEAR_GROUP, *, timeout: float = 120.0) -> dict[str, Any]:
    """Resolve ``spec`` in a short-lived subprocess (run in the current directory); its :meth:`Plugin.describe`.

    Raises :class:`PluginError` with the subprocess's one-line reason when it does not resolve. The
    matrix uses this to fail fast, and to learn the signature, without importing user code itself.
    """
    import json
    import subprocess

    if group not in _GROUPS:
        raise ValueError(f"group={group!r}; use {LINEAR_GROUP!r} or {ATTENTION_GROUP!r}")
    from harness.runner.pool import _child_env

    cmd = [sys.executable, "-m", "harness.quant.plugins", spec, group]
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        raise PluginError(f"plug-in {spec!r}: importing it took longer than {timeout:g} s") from None
    lines = cp.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):  # the last line was the plug-in's own output
        answer = {}
    if cp.returncode == 0 and isinstance(answer.get("plugin"), dict):
        return answer["plugin"]
    why = answer.get("error") or (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
    raise PluginError(str(why), missing=answer.get("missing"))


def _probe_main(argv: list[str]) -> int:
    import json

    spec, group = argv
    try:
        info = resolve(spec, group).describe()
    except PluginError as e:
        print(json.dumps({"error": str(e), "missing": e.missing}))
        return 1
    print(json.dumps({"plugin": info}))
    return 0


if __name__ == "__main__":  # python -m harness.quant.plugins SPEC GROUP: what probe() runs
    sys.exit(_probe_main(sys.argv[1:]))
