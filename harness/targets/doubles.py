"""Test doubles: simple CPU targets and fault injectors, for testing the runner itself.

``cpu.matmul`` / ``cpu.scale`` make the runner testable end to end without a GPU; every ``fault.*``
target behaves like ``cpu.scale`` except for its one fault (a segfault, a hang, a sticky device
error, an input write, ...).  Importing this module registers nothing: :func:`register_doubles` does,
called by the test suite and by the runner's worker processes (``harness.runner.worker``), so they
never appear among the production targets (``harness.targets.load_targets()``).

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

from harness.reference.metrics import Bound
from harness.targets.protocol import BaseTarget, all_targets, register_target

__all__ = [
    "DOUBLES",
    "DOUBLE_PREFIXES",
    "register_doubles",
    "doubles_on_demand",
    "simulated_fault_active",
    "take_between_cases",
]

#: target-name prefixes of the doubles
DOUBLE_PREFIXES = ("cpu.", "fault.")


# --------------------------------------------------------------------------- CPU test targets


def _naive_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same-precision matmul summed in a different order (broadcast multiply, then sum over K)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


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
        return Bound.derived(
            2.0,
            exact,
            inputs["a"].dtype,
            why="matmul error <= 2 x same-precision naive matmul error (FlashAttention rule)",
        )

    def layout_bound(self, inputs, params, exact):
        # A different layout may change the blocking, hence the summation order: allow what the
        # naive run's reordering costs, plus the rounding floor.
        return Bound.derived(
            2.0, exact, inputs["a"].dtype, why="layouts may change summation order; same slack as a reordered naive run"
        )


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


class SegfaultTarget(_FaultTarget):
    """Dereferences a null pointer: the worker dies with SIGSEGV."""

    name = "fault.segfault"

    def run(self, inputs, params):
        import ctypes

        ctypes.string_at(0)
        return self.clean(inputs["x"])  # pragma: no cover


class HangTarget(_FaultTarget):
    """Blocks (sleeping, not spinning) for ``params["seconds"]`` (default 3600) before answering."""

    name = "fault.hang"

    def run(self, inputs, params):
        deadline = time.monotonic() + float(params.get("seconds", 3600))
        while time.monotonic() < deadline:  # sleep in slices so a stray signal does not end it early
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return self.clean(inputs["x"])


class ExitTarget(_FaultTarget):
    """Ends the worker with ``os._exit(params["code"])`` (default 3), skipping every cleanup."""

    name = "fault.exit"

    def run(self, inputs, params):
        os._exit(int(params.get("code", 3)))


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
            "Tried to allocate 1024.00 GiB (simulated by fault.oom: the allocator refused the request)"
        )


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


class ExitBetweenCasesTarget(_FaultTarget):
    """Passes, and arms the worker to ``os._exit(params["code"])`` (default 0) when the next case reaches
    it, before it starts that case: a worker that dies while idle (the next case is innocent)."""

    name = "fault.exit_between_cases"

    def run(self, inputs, params):
        _BETWEEN_CASES[:] = [("exit", int(params.get("code", 0)))]
        return self.clean(inputs["x"])


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


_STICKY_MESSAGE = (
    "CUDA error: an illegal memory access was encountered (simulated by fault.sticky in "
    "harness_fault::bad_kernel)\nCUDA kernel errors might be asynchronously reported at some "
    "other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
    "passing CUDA_LAUNCH_BLOCKING=1"
)


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


class NanTarget(_FaultTarget):
    """Returns ``x * 2`` with its first element replaced by NaN."""

    name = "fault.nan"

    def run(self, inputs, params):
        out = self.clean(inputs["x"]).clone()
        if out.numel():
            out[(0,) * out.dim()] = float("nan")
        return out


class FlakyNanTarget(_FaultTarget):
    """Like ``fault.nan`` on one call in ``params["every"]`` (default 2: the 1st, 3rd, ...) of this instance,
    ``x * 2`` on the others: a kernel whose NaN comes and goes between runs of the same inputs (verdict
    ``nondeterministic``). The runner calls it twice per case, so with ``every=6`` two cases in six see the NaN."""

    name = "fault.flaky_nan"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, inputs, params):
        self.calls += 1
        out = self.clean(inputs["x"])
        if (self.calls - 1) % int(params.get("every", 2)) == 0 and out.numel():
            out[(0,) * out.dim()] = float("nan")
        return out


def _flip_low_bit(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a fresh tensor) with the lowest bit of its first element flipped, in place; returned."""
    if t.numel():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        t.reshape(-1)[:1].view(ints).bitwise_xor_(1)
    return t


class FlipBitsTarget(_FaultTarget):
    """``x * 2`` with the lowest bit of its first element flipped on every other call of this instance (the 2nd,
    4th, ...), like a reduction whose order changes between runs; declares ``deterministic = False`` (the
    opt-out), so the runner does not call it twice and judges it by its bound: one such flip, which its
    emulated run (``x * 2`` with that bit flipped) also makes."""

    name = "fault.flip_bits_opted_out"
    deterministic = False

    def __init__(self) -> None:
        self.calls = 0

    def run(self, inputs, params):
        self.calls += 1
        out = self.clean(inputs["x"])
        return _flip_low_bit(out) if self.calls % 2 == 0 else out

    def reference(self, inputs, params):
        exact, _ = super().reference(inputs, params)
        return exact, _flip_low_bit(exact.clone())

    def bound(self, inputs, params, exact):
        return Bound.derived(1.0, exact, exact.dtype, why="at most the one bit flip its emulated run makes")

    def layout_bound(self, inputs, params, exact):
        return self.bound(inputs, params, exact)


class DriftTarget(_FaultTarget):
    """Returns ``x * 2 * (1 + params["rel"])`` (default rel 1e-2): finite but beyond the exact bound."""

    name = "fault.drift"

    def run(self, inputs, params):
        return self.clean(inputs["x"]) * (1 + float(params.get("rel", 1e-2)))


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


class RejectTarget(_FaultTarget):
    """Refuses non-contiguous inputs with a clear ``ValueError`` (the good behaviour)."""

    name = "fault.reject"

    def run(self, inputs, params):
        x = inputs["x"]
        if not x.is_contiguous():
            raise ValueError(
                f"fault.reject: x must be contiguous, got strides {tuple(x.stride())}; call .contiguous() first"
            )
        return self.clean(x)


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


#: every double, in registration order
DOUBLES: tuple[type[BaseTarget], ...] = (
    MatmulTarget,
    ScaleTarget,
    SegfaultTarget,
    HangTarget,
    ExitTarget,
    OomTarget,
    OomKillTarget,
    KilledTarget,
    ExitBetweenCasesTarget,
    StallBetweenCasesTarget,
    StickyTarget,
    MutateTarget,
    PoisonWriteTarget,
    NanTarget,
    FlakyNanTarget,
    FlipBitsTarget,
    DriftTarget,
    LayoutTarget,
    RejectTarget,
    ReferenceErrorTarget,
    DeviceAssertTarget,
    IllegalAddressTarget,
)


def register_doubles() -> list[str]:
    """Register every double not registered yet (idempotent); returns their names."""
    have = all_targets()
    for cls in DOUBLES:
        if cls.name not in have:
            register_target(cls)
    return [cls.name for cls in DOUBLES]


def doubles_on_demand(name: str) -> None:
    """On-demand factory (``harness.targets.protocol.register_on_demand``): a lookup of a ``cpu.*`` /
    ``fault.*`` name registers the doubles."""
    if name.startswith(DOUBLE_PREFIXES):
        register_doubles()
