"""Targets: the ops the runner can drive, behind one small protocol, plus a registry.

A target wraps one op under test (an FP8 linear forward, an attention backend,
a fault injector). The runner builds its inputs from a :class:`~harness.cases.Case`
*inside the worker*, runs it, and judges the output against the target's own
references and bounds. Real op targets live in ``harness.targets`` (imported
lazily on the first registry lookup); this module holds the protocol, the
registry, a default base class, simple CPU targets (so the runner is testable
end to end without a GPU) and the fault-injection targets used to test the
runner itself.

Nothing here touches CUDA at import time; ``available`` is called in the worker.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from harness.reference.metrics import Bound

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case

__all__ = [
    "Target",
    "BaseTarget",
    "register_target",
    "get_target",
    "all_targets",
    "resolve_target",
    "TargetError",
    "default_inputs",
    "simulated_fault_active",
    "EXTERNAL_TARGET_MODULES",
    "register_on_demand",
]

#: modules imported on the first registry lookup; each registers its targets on import
EXTERNAL_TARGET_MODULES: tuple[str, ...] = ("harness.targets",)


class TargetError(LookupError):
    """Unknown target name, or a malformed target registration."""


@runtime_checkable
class Target(Protocol):
    """What the runner needs from an op under test.

    ``name``: registry key, e.g. "fp8_linear", "legacy.comfyui", "attn.sdpa.flash", "fault.segfault".
    ``kind``: "linear" | "attention" | "fault" | "cpu-test".
    ``mutates``: names of inputs whose *values* the op may legitimately overwrite (the poison
    around every view must still be intact).
    """

    name: str
    kind: str
    mutates: tuple[str, ...]

    def available(self, device: str) -> tuple[bool, str]:
        """(can run on ``device``, reason naming what is missing). Probed in the worker."""
        ...

    def make_inputs(self, case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        """Input tensors laid out as ``case.layouts``; ``values`` (contiguous, logical shape) override recipes."""
        ...

    def run(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
        """The op under test."""
        ...

    def reference(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exact, emulated-or-naive) on the same (already quantized) inputs; never mutates them."""
        ...

    def bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor) -> Bound:
        """Allowed error of ``run`` against ``exact``: ``k * err(emulated) + floor`` (metric and why inside)."""
        ...

    def layout_bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor
                     ) -> Bound | None:
        """Allowed difference between two layouts of the same values, as ``k * err(emulated) + floor``
        (the same ``ref_err`` as the drift bound); None: bitwise equal expected."""
        ...

    def layout_classes(self) -> dict[str, Callable[[], Any]]:
        """Layout class name -> zero-argument callable returning a Hypothesis strategy of ``Case``."""
        ...


def _broadcast_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[int]:
    return [i for i, (sz, st) in enumerate(zip(shape, strides)) if st == 0 and sz > 1]


def default_inputs(case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
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
    description: str = ""

    def available(self, device: str) -> tuple[bool, str]:
        return True, ""

    def make_inputs(self, case: "Case", device: str, values: Mapping[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        return default_inputs(case, device, values)

    def run(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError(f"target {self.name!r} does not implement run()")

    def reference(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(f"target {self.name!r} does not implement reference()")

    def bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor) -> Bound:
        return Bound.exact(f"{self.name}: no bound declared, bitwise equality expected")

    def layout_bound(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], exact: torch.Tensor
                     ) -> Bound | None:
        return None

    def layout_classes(self) -> dict[str, Callable[[], Any]]:
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.kind})>"


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Target] = {}
_LOCK = threading.Lock()
_EXTERNAL_LOADED = False
_EXTERNAL_ERRORS: dict[str, str] = {}
_ON_DEMAND: list[Callable[[str], Any]] = []


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
    missing = [a for a in ("name", "kind", "run", "reference", "available", "make_inputs", "bound",
                           "layout_bound", "layout_classes") if not hasattr(inst, a)]
    if missing:
        raise TargetError(f"{inst!r} is not a Target: missing {missing} (subclass harness.runner.targets.BaseTarget)")
    if not isinstance(inst.name, str) or not inst.name:
        raise TargetError(f"{inst!r} needs a non-empty string 'name'")
    if not hasattr(inst, "mutates"):
        inst.mutates = ()
    with _LOCK:
        if inst.name in _REGISTRY and not replace and type(_REGISTRY[inst.name]) is not type(inst):
            raise TargetError(f"target {inst.name!r} is already registered ({_REGISTRY[inst.name]!r}); "
                              "pick another name or pass replace=True")
        _REGISTRY[inst.name] = inst
    return target


def _load_external() -> None:
    global _EXTERNAL_LOADED
    if _EXTERNAL_LOADED:
        return
    _EXTERNAL_LOADED = True
    for mod in EXTERNAL_TARGET_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod and not mod.startswith(f"{e.name}."):
                _EXTERNAL_ERRORS[mod] = f"{type(e).__name__}: {e}"
        except Exception as e:  # a broken plug-in must not take the built-in targets down with it
            _EXTERNAL_ERRORS[mod] = f"{type(e).__name__}: {e}"


def all_targets() -> dict[str, Target]:
    """Every registered target by name (built-ins and ``harness.targets``)."""
    _load_external()
    with _LOCK:
        return dict(sorted(_REGISTRY.items()))


def get_target(name: str) -> Target:
    """The target registered as ``name``; the error lists the known names."""
    with _LOCK:
        t = _REGISTRY.get(name)
    if t is not None:
        return t
    _load_external()
    with _LOCK:
        t = _REGISTRY.get(name)
        factories = list(_ON_DEMAND) if t is None else []
    for factory in factories:
        factory(name)
    with _LOCK:
        t = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if t is None:
        msg = f"unknown target {name!r}; registered: {', '.join(known)}"
        if _EXTERNAL_ERRORS:
            msg += "; failed to import: " + "; ".join(f"{m} ({e})" for m, e in _EXTERNAL_ERRORS.items())
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


# --------------------------------------------------------------------------- CPU test targets


def _naive_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same-precision matmul summed in a different order (broadcast multiply, then sum over K)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


@register_target
class MatmulTarget(BaseTarget):
    """``a @ b`` in the inputs' dtype; judged FlashAttention-style against a same-precision naive run.

    inputs: ``a`` (..., M, K), ``b`` (..., K, N), float dtypes.
    """

    name = "cpu.matmul"
    kind = "cpu-test"

    def run(self, inputs, params):
        return torch.matmul(inputs["a"], inputs["b"])

    def reference(self, inputs, params):
        a, b = inputs["a"], inputs["b"]
        exact = torch.matmul(a.double(), b.double())
        naive = _naive_matmul(a, b)
        return exact, naive

    def bound(self, inputs, params, exact):
        return Bound.derived(2.0, exact, inputs["a"].dtype,
                             why="matmul error <= 2 x same-precision naive matmul error (FlashAttention rule)")

    def layout_bound(self, inputs, params, exact):
        # A different layout may change the blocking, hence the summation order: allow what the
        # naive run's reordering costs, plus the rounding floor.
        return Bound.derived(2.0, exact, inputs["a"].dtype,
                             why="layouts may change summation order; same slack as a reordered naive run")


@register_target
class ScaleTarget(BaseTarget):
    """``x * 2`` (exact in binary floating point): bitwise equality with the exact reference and across layouts."""

    name = "cpu.scale"
    kind = "cpu-test"

    def run(self, inputs, params):
        return inputs["x"] * 2

    def reference(self, inputs, params):
        x = inputs["x"]
        return (x.double() * 2).to(x.dtype), None

    def bound(self, inputs, params, exact):
        return Bound.exact("multiplying by 2 is exact in binary floating point")


# --------------------------------------------------------------------------- fault injection
#
# Each fault target behaves like cpu.scale (x * 2, exact) except for its one fault, so a case
# that does not trigger the fault passes. They run on any device; ``fault.device_assert`` and
# ``fault.illegal_address`` need CUDA and provoke real sticky errors.


class _FaultTarget(BaseTarget):
    kind = "fault"

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def run(self, inputs, params):
        return self.clean(inputs["x"])

    def reference(self, inputs, params):
        x = inputs["x"]
        return (x.double() * 2).to(x.dtype), None

    def bound(self, inputs, params, exact):
        return Bound.exact("multiplying by 2 is exact in binary floating point")


@register_target
class SegfaultTarget(_FaultTarget):
    """Dereferences a null pointer: the worker dies with SIGSEGV."""

    name = "fault.segfault"

    def run(self, inputs, params):
        import ctypes

        ctypes.string_at(0)
        return self.clean(inputs["x"])  # pragma: no cover


@register_target
class HangTarget(_FaultTarget):
    """Blocks (sleeping, not spinning) for ``params["seconds"]`` (default 3600) before answering."""

    name = "fault.hang"

    def run(self, inputs, params):
        deadline = time.monotonic() + float(params.get("seconds", 3600))
        while time.monotonic() < deadline:  # sleep in slices so a stray signal does not end it early
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return self.clean(inputs["x"])


@register_target
class ExitTarget(_FaultTarget):
    """Ends the worker with ``os._exit(params["code"])`` (default 3), skipping every cleanup."""

    name = "fault.exit"

    def run(self, inputs, params):
        os._exit(int(params.get("code", 3)))


@register_target
class OomTarget(_FaultTarget):
    """Raises ``torch.OutOfMemoryError`` as an allocator would; the worker stays healthy.

    ``params["real"]``: ask the device's allocator for ``params["bytes"]`` (default 2**50, a PiB,
    which every allocator refuses at once without touching memory) instead of simulating.
    """

    name = "fault.oom"

    def run(self, inputs, params):
        if params.get("real"):
            x = inputs["x"]
            torch.empty(int(params.get("bytes", 2**50)), dtype=torch.uint8, device=x.device)
            return self.clean(x)  # pragma: no cover - the allocation above never succeeds
        raise torch.OutOfMemoryError(
            "Tried to allocate 1024.00 GiB (simulated by fault.oom: the allocator refused the request)")


@register_target
class OomKillTarget(_FaultTarget):
    """Caps the worker's address space (RLIMIT_AS), allocates past the cap, then dies by SIGKILL
    the way the kernel's OOM killer ends a process.

    The cap is the current virtual size plus ``params["headroom_mib"]`` (default 64), so the
    allocation (``params["alloc_gib"]``, default 4) fails at once and never touches the host's
    memory. Linux only; elsewhere (no RLIMIT_AS) it only sends SIGKILL.
    """

    name = "fault.oom_kill"

    def run(self, inputs, params):
        try:
            import resource

            with open("/proc/self/statm") as f:
                vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            cap = vsize + int(params.get("headroom_mib", 64)) * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
            n = int(float(params.get("alloc_gib", 4)) * 2**30)
            torch.empty(n, dtype=torch.uint8).fill_(1)
        except (RuntimeError, MemoryError, OSError, ImportError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # pragma: no cover - SIGKILL is not deliverable late
        return self.clean(inputs["x"])  # pragma: no cover


@register_target
class KilledTarget(_FaultTarget):
    """Another process sends the worker SIGKILL while it runs this case (``kill -9`` by an operator
    or a job scheduler)."""

    name = "fault.killed"

    def run(self, inputs, params):
        import subprocess

        subprocess.run(["kill", "-KILL", str(os.getpid())], check=False)
        time.sleep(60)  # pragma: no cover - the signal ends the process first
        return self.clean(inputs["x"])  # pragma: no cover


_BETWEEN_CASES: list[tuple[str, float]] = []


def take_between_cases() -> tuple[str, float] | None:
    """What ``fault.exit_between_cases`` / ``fault.stall_between_cases`` armed in this process (once): ``("exit",
    code)`` or ``("stall", seconds)``, else None. The pool worker asks after it receives a case and before it
    acknowledges it: the worker then dies (or hangs) between cases, with the next case already in its pipe."""
    return _BETWEEN_CASES.pop() if _BETWEEN_CASES else None


@register_target
class ExitBetweenCasesTarget(_FaultTarget):
    """Passes, and arms the worker to ``os._exit(params["code"])`` (default 0) when the next case reaches
    it, before it starts that case: a worker that dies while idle (the next case is innocent)."""

    name = "fault.exit_between_cases"

    def run(self, inputs, params):
        _BETWEEN_CASES[:] = [("exit", int(params.get("code", 0)))]
        return self.clean(inputs["x"])


@register_target
class StallBetweenCasesTarget(_FaultTarget):
    """Passes (after sleeping ``params["run_seconds"]``, default 0), and arms the worker to sleep
    ``params["seconds"]`` (default 3600) when the next case reaches it, before it starts that case: a worker
    stuck between cases (the next case is innocent)."""

    name = "fault.stall_between_cases"

    def run(self, inputs, params):
        time.sleep(float(params.get("run_seconds", 0)))
        _BETWEEN_CASES[:] = [("stall", float(params.get("seconds", 3600)))]
        return self.clean(inputs["x"])


# ---- simulated sticky device error -------------------------------------------------------

_SIM_LOCK = threading.Lock()
_SIM_STATE: dict[str, Any] = {"mode": None, "message": ""}
_SIM_LIB: Any = None


class _PoisonedContext(torch.utils._python_dispatch.TorchDispatchMode):
    """Once entered (and never left), every later tensor op raises, like a broken CUDA context."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise RuntimeError(self.message)


def simulated_fault_active() -> bool:
    """True once ``fault.sticky`` has poisoned this process (every later tensor op raises)."""
    return _SIM_STATE["mode"] is not None


def _arm_simulated_fault(message: str) -> None:
    with _SIM_LOCK:
        if _SIM_STATE["mode"] is None:
            mode = _PoisonedContext(message)
            mode.__enter__()  # deliberately never exited: the "context" stays broken
            _SIM_STATE["mode"] = mode
            _SIM_STATE["message"] = message


_STICKY_MESSAGE = ("CUDA error: an illegal memory access was encountered (simulated by fault.sticky in "
                   "harness_fault::bad_kernel)\nCUDA kernel errors might be asynchronously reported at some "
                   "other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
                   "passing CUDA_LAUNCH_BLOCKING=1")


def _bad_kernel_impl(x: torch.Tensor) -> torch.Tensor:
    __tracebackhide__ = True  # stands for a C++ kernel: attribution names its caller's line
    out = x.clone()
    _arm_simulated_fault(_STICKY_MESSAGE)  # the context is broken either way
    if os.environ.get("CUDA_LAUNCH_BLOCKING") == "1":
        # synchronous launches: the error is raised by the op that caused it
        raise RuntimeError(_STICKY_MESSAGE.split("\n")[0])
    return out  # asynchronous: the *next* op sees the error


def _bad_kernel_op() -> Any:
    """``torch.ops.harness_fault.bad_kernel``, defined on first use (keeps import free of side effects)."""
    global _SIM_LIB
    with _SIM_LOCK:
        if _SIM_LIB is None:
            lib = torch.library.Library("harness_fault", "DEF")
            lib.define("bad_kernel(Tensor x) -> Tensor")
            lib.impl("bad_kernel", _bad_kernel_impl, "CompositeExplicitAutograd")
            _SIM_LIB = lib
    return torch.ops.harness_fault.bad_kernel


@register_target
class StickyTarget(_FaultTarget):
    """Simulates an asynchronous sticky device fault.

    ``harness_fault::bad_kernel`` "launches" and returns; from then on every tensor op in the
    worker raises a CUDA-style error (the context is broken), so the error surfaces at the
    *next*, innocent op (``aten::add``) -- as a real asynchronous fault does. With
    ``CUDA_LAUNCH_BLOCKING=1`` the bad kernel raises itself, which is what attribution uses.
    """

    name = "fault.sticky"

    def run(self, inputs, params):
        x = inputs["x"]
        y = x * 2  # innocent
        z = _bad_kernel_op()(y)  # guilty, but returns normally (asynchronous)
        return z + 0  # innocent; this is where the error surfaces


@register_target
class MutateTarget(_FaultTarget):
    """Writes into its input's values (like an in-place clamp on the caller's tensor)."""

    name = "fault.mutate"

    def run(self, inputs, params):
        x = inputs["x"]
        out = self.clean(x)
        if x.numel():
            idx = (0,) * x.dim()
            x[idx] = x[idx] + 1
        return out


@register_target
class PoisonWriteTarget(_FaultTarget):
    """Writes one element of storage just outside its view (before it, or after its last element)."""

    name = "fault.poison_write"

    def run(self, inputs, params):
        x = inputs["x"]
        out = self.clean(x)
        storage_numel = x.untyped_storage().nbytes() // x.element_size()
        last = x.storage_offset() + sum((s - 1) * st for s, st in zip(x.shape, x.stride())) if x.numel() else 0
        flat = x.new_empty(0).set_(x.untyped_storage(), 0, (storage_numel,), (1,))
        if x.storage_offset() > 0:
            flat[x.storage_offset() - 1] = 0
        elif last + 1 < storage_numel:
            flat[last + 1] = 0
        return out


@register_target
class NanTarget(_FaultTarget):
    """Returns ``x * 2`` with its first element replaced by NaN."""

    name = "fault.nan"

    def run(self, inputs, params):
        out = self.clean(inputs["x"]).clone()
        if out.numel():
            out[(0,) * out.dim()] = float("nan")
        return out


@register_target
class DriftTarget(_FaultTarget):
    """Returns ``x * 2 * (1 + params["rel"])`` (default rel 1e-2): finite but beyond the exact bound."""

    name = "fault.drift"

    def run(self, inputs, params):
        return self.clean(inputs["x"]) * (1 + float(params.get("rel", 1e-2)))


@register_target
class LayoutTarget(_FaultTarget):
    """Result depends on the layout: a non-zero storage offset adds 1 to every element.

    The same values in the contiguous layout give ``x * 2``; so the minimal failing case
    is the plain layout with only the offset kept.
    """

    name = "fault.layout"

    def run(self, inputs, params):
        x = inputs["x"]
        out = self.clean(x)
        return out + 1 if x.storage_offset() != 0 else out


@register_target
class RejectTarget(_FaultTarget):
    """Refuses non-contiguous inputs with a clear ``ValueError`` (the good behaviour)."""

    name = "fault.reject"

    def run(self, inputs, params):
        x = inputs["x"]
        if not x.is_contiguous():
            raise ValueError(f"fault.reject: x must be contiguous, got strides {tuple(x.stride())}; "
                             "call .contiguous() first")
        return self.clean(x)


@register_target
class ReferenceErrorTarget(_FaultTarget):
    """Its reference raises: the verdict is ``error`` (a harness/target bug, not the kernel's)."""

    name = "fault.reference_error"

    def reference(self, inputs, params):
        raise ArithmeticError("fault.reference_error: the reference implementation itself failed")


def _need_cuda(device: str) -> tuple[bool, str]:
    if not str(device).startswith("cuda"):
        return False, f"needs a CUDA device, got {device!r}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


@register_target
class DeviceAssertTarget(_FaultTarget):
    """A real sticky CUDA error: an out-of-bounds gather trips a device-side assert (``aten::index``).

    The index kernel checks bounds on the device; the assert is asynchronous and leaves the
    context unusable (every later CUDA call fails), so the worker must be replaced.
    """

    name = "fault.device_assert"

    def available(self, device):
        return _need_cuda(device)

    def run(self, inputs, params):
        x = inputs["x"]
        y = x * 2
        bad = torch.tensor([y.numel() + 2**20], device=x.device)
        z = y.reshape(-1)[bad]  # device-side assert: index out of bounds
        return z.sum() + y  # innocent; the error may surface here or at the health check


@register_target
class IllegalAddressTarget(_FaultTarget):
    """A real sticky CUDA error from a Triton kernel storing far outside its buffer.

    Needs Triton; ``params["offset"]`` (elements, default 2**36) is added to the store address.
    """

    name = "fault.illegal_address"

    def available(self, device):
        ok, why = _need_cuda(device)
        if not ok:
            return ok, why
        try:
            import triton  # noqa: F401
        except Exception as e:
            return False, f"needs triton ({type(e).__name__}: {e})"
        return True, ""

    def run(self, inputs, params):
        x = inputs["x"]
        y = (x * 2).contiguous()
        kernel = _oob_kernel()
        kernel[(1,)](y, int(params.get("offset", 2**36)))  # asynchronous launch
        return y + 0


_tl: Any = None
_OOB_KERNEL: Any = None


def _oob_store_kernel(ptr, offset):  # compiled by triton.jit in _oob_kernel()
    _tl.store(ptr + offset, 1.0)


def _oob_kernel() -> Any:
    """The Triton kernel behind fault.illegal_address, compiled on first use (Triton is optional)."""
    global _tl, _OOB_KERNEL
    if _OOB_KERNEL is None:
        import triton
        import triton.language as tl

        _tl = tl
        _OOB_KERNEL = triton.jit(_oob_store_kernel)
    return _OOB_KERNEL
