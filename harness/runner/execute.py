"""Run one case in this process and judge it: what a worker does for every case.

``run_case`` builds the inputs inside the process (poisoned storage and all),
snapshots every input's whole storage, runs the target's references and the
op, checks the device is still healthy, then judges in a fixed order:

    unavailable -> error (inputs/reference) -> rejected | oom | device_fault (op raised)
    -> device_fault (health check) -> input_mutation -> nondeterministic
    -> nonfinite -> layout_noninvariance -> drift -> pass

*Nondeterministic*: the op is called a second time on the same, just verified
unmodified inputs and the two outputs must be bitwise equal (NaN equal to NaN
at the same place); targets with ``deterministic = False`` skip that call.

A *device fault* is told apart from a clean rejection by the health check
after the exception: a tiny op plus a synchronize. A sticky CUDA error (illegal
address, misaligned address, device-side assert) fails it; a clean Python
error (a shape check, ``CUBLAS_STATUS_NOT_SUPPORTED``) does not. Because every
case ends with a synchronizing health check, an asynchronous fault can never
leak into the next case.

With ``record_ops=True`` (used by attribution reruns under
``CUDA_LAUNCH_BLOCKING=1``) a ``TorchDispatchMode`` records the aten ops the
target calls, and a :class:`LaunchChecker` synchronises and checks the device
after every aten op and every C-level call made from Python (extension ops bound
with pybind11 never pass the dispatcher); the first call after which the device
fails is named in ``Result.attribution`` (``op``, ``call_frame``, ``method``).
Without ``record_ops`` none of this is installed: it costs nothing.
"""

from __future__ import annotations

import collections
import functools
import linecache
import os
import platform
import sys
import sysconfig
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.capability import device_info as probe_device
from harness.reference.metrics import HOST_JUDGE_ELEMENTS, on_host_if_small
from harness.verdicts import INPUT_MUTATION_PREFIX, Result, Unsupported, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case

__all__ = [
    "run_case",
    "device_healthy",
    "device_info",
    "OpRecorder",
    "LaunchChecker",
    "launch_check",
    "SYNC_METHOD",
    "GUESS_METHOD",
    "classify_exception",
    "is_oom",
]

_THIS = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "CUDA_ERROR_OUT_OF_MEMORY")
#: ``attribution["method"]`` when the rerun named the call after which the device first failed
SYNC_METHOD = "synchronize after every launch (CUDA_LAUNCH_BLOCKING=1, no compute-sanitizer)"
#: ``attribution["method"]`` when nothing caught the fault at a call: the last op launched is named
GUESS_METHOD = "last op before the fault (guess)"


class OpRecorder(TorchDispatchMode):
    """Records the ops the code under it calls; ``failed`` is the op that raised (innermost seen).

    Triton kernels do not go through torch's dispatcher; when Triton is importable a launch
    hook records them too, as ``triton::<kernel name>``.
    """

    def __init__(self, keep: int = 12, checker: "LaunchChecker | None" = None) -> None:
        super().__init__()
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.failed: str | None = None
        self.count = 0
        self.checker = checker
        self._triton_restore: Any = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.tail.append(name)
        self.count += 1
        try:
            out = func(*args, **(kwargs or {}))
        except BaseException:
            if self.failed is None:
                self.failed = name
            if self.checker is not None:
                self.checker.after(name, _caller_frame)
            raise
        if self.checker is not None:
            self.checker.after(name, _caller_frame)
        return out

    def _triton_launch(self, metadata: Any) -> None:
        try:
            data = metadata if isinstance(metadata, dict) else metadata.get()  # Triton's LazyDict
            name = data.get("name") if isinstance(data, dict) else None
        except Exception:  # noqa: BLE001 - a hook must never break the launch
            name = None
        self.tail.append(f"triton::{name or '?'}")

    def __enter__(self) -> "OpRecorder":
        self._triton_restore = _install_triton_hook(self._triton_launch)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            if self._triton_restore is not None:
                self._triton_restore()
                self._triton_restore = None

    def culprit(self) -> tuple[str, str]:
        """(the op to blame, a note): the op that raised; else the Triton kernel launched last."""
        last = self.tail[-1] if self.tail else ""
        if self.failed is None:
            return (last, "raised outside torch's dispatcher; last launch named") if last else ("", "")
        tail = list(self.tail)
        if self.failed.startswith("aten::") and len(tail) >= 2 and tail[-2].startswith("triton::"):
            return self.failed, (
                f"{tail[-2]} ran just before and Triton does not check its launches for errors: "
                "it is the likely culprit"
            )
        return self.failed, ""


def launch_check(device: str) -> Callable[[], str | None]:
    """The device check a :class:`LaunchChecker` runs after each call: a synchronize on CUDA (a sticky
    error raises there), returning the error text or None; on CPU there is nothing to synchronize."""
    if not _is_cuda(device):
        return lambda: None

    def check() -> str | None:
        try:
            torch.cuda.synchronize(device)
            return None
        except BaseException as e:  # noqa: BLE001 - any failure here is the answer
            return f"{type(e).__name__}: {_first_line(e)}"

    return check


class LaunchChecker:
    """Checks the device after every C-level call made from Python and every aten op (through
    :class:`OpRecorder`); ``call`` is the first after which ``check`` reported an error, ``frame`` its
    caller's line, ``error`` the check's text.

    C-level calls are seen through ``sys.setprofile`` (``c_return``/``c_exception`` events): builtin and
    pybind11 functions such as an extension's ``transpose_pad_permute_cuda``. Calls of the ``builtins``
    module (``len``, ``list.append``) and calls made from torch's own Python code are not checked: they
    launch nothing, or the dispatcher's op check sees what they launch.
    """

    def __init__(self, check: Callable[[], str | None]) -> None:
        self.check = check
        self.call: str | None = None
        self.frame = ""
        self.error = ""
        self.checks = 0
        self._busy = False
        self._old: Any = None

    def after(self, name: str, frame: str | Callable[[], str]) -> None:
        """Run the check after ``name`` (called from ``frame``, or a function that finds it); the first
        failure names it."""
        if self.call is not None or self._busy:
            return
        self._busy = True  # the check's own calls (and finding the frame) are not checked
        try:
            self.checks += 1
            err = self.check()
            if err:
                self.call, self.frame, self.error = name, frame() if callable(frame) else frame, err
        finally:
            self._busy = False

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if self.call is not None or self._busy or event not in ("c_return", "c_exception"):
            return
        path = frame.f_code.co_filename
        if path == _THIS or path.startswith(_TORCH_DIR) or _in_stdlib(path):
            return
        name = _c_call_name(arg)
        if name is None:
            return
        self.after(name, lambda: _launch_frame(frame))

    def __enter__(self) -> "LaunchChecker":
        self._old = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(self._old)


def _c_call_name(fn: Any) -> str | None:
    """``module.qualname`` of a C function the profiler saw called; None for the ``builtins`` module's."""
    owner = getattr(fn, "__objclass__", None) or (
        type(fn.__self__) if getattr(fn, "__self__", None) is not None and not _is_module(fn.__self__) else None
    )
    mod = getattr(fn, "__module__", None) or (getattr(owner, "__module__", None) if owner is not None else None)
    if mod is None and _is_module(getattr(fn, "__self__", None)):
        mod = fn.__self__.__name__
    if mod == "builtins" or (owner is not None and getattr(owner, "__module__", None) == "builtins"):
        return None
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{qual}" if mod else str(qual)


_STDLIB = tuple({p for p in (sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")) if p})


def _in_stdlib(path: str) -> bool:
    """Python's own library (not the site-packages that may lie inside it)."""
    return path.startswith(_STDLIB) and "-packages" not in path


def _is_module(x: Any) -> bool:
    return type(x).__name__ == "module"


def _frame_text(frame: Any, lineno: int) -> str:
    code = linecache.getline(frame.f_code.co_filename, lineno).strip()
    return f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}" + (f": {code}" if code else "")


_TRITON_PART = f"{os.sep}triton{os.sep}"


def _launch_frame(frame: Any) -> str:
    """The line that launched it: ``frame`` or, when that is Triton's or the standard library's, the first
    frame outside them (a Triton launcher's caller)."""
    f = frame
    while f is not None and (_TRITON_PART in f.f_code.co_filename or _in_stdlib(f.f_code.co_filename)):
        f = f.f_back
    f = f or frame
    return _frame_text(f, f.f_lineno)


def _caller_frame() -> str:
    """The innermost frame on the stack outside torch and this module: whoever called the aten op."""
    f: Any = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if not (path == _THIS or path.startswith(_TORCH_DIR) or f.f_locals.get("__tracebackhide__")):
            return _frame_text(f, f.f_lineno)
        f = f.f_back
    return ""


class _Recording:
    """What an attribution rerun installs around the op: the op recorder and the launch checker."""

    def __init__(self, device: str) -> None:
        self.checker = LaunchChecker(launch_check(device))
        self.recorder = OpRecorder(checker=self.checker)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.recorder, self.checker:
            return fn(*args)

    def attribution(self, exc: BaseException | None) -> dict[str, Any]:
        """``op`` (the call named), ``call_frame``/``launch_frame``, ``ops_tail``, ``method`` and ``note``."""
        rec, chk = self.recorder, self.checker
        att: dict[str, Any] = {"ops_tail": list(rec.tail)}
        if exc is not None:
            att["frame"] = _frame_of(exc)
        if chk.call is not None:
            att.update(op=chk.call, call=chk.call, call_frame=chk.frame, launch_frame=chk.frame, method=SYNC_METHOD)
            att["note"] = f"the device check after this call failed: {chk.error}"
            last = rec.tail[-1] if rec.tail else ""
            if last.startswith("triton::") and "::" not in chk.call:
                # the call was Triton's launcher: the kernel its launch hook recorded is the one it launched
                att["op"] = last
                att["note"] += f" ({last} was launched by it)"
            return att
        if exc is None:
            att.update(op=rec.tail[-1] if rec.tail else "", method=GUESS_METHOD)
            att["note"] = "the op returned normally; the last op it launched is named"
            return att
        op, note = rec.culprit()
        att.update(op=op, method=SYNC_METHOD if rec.failed is not None else GUESS_METHOD)
        if note:
            att["note"] = note
        return att


def _install_triton_hook(hook: Any) -> Any:
    """Set Triton's launch-enter hook (``triton.knobs`` or ``CompiledKernel``); returns an undo, or None."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - Triton is optional
        return None
    try:
        from triton import knobs

        rt = knobs.runtime
        old = rt.launch_enter_hook
        rt.launch_enter_hook = hook
        return lambda: setattr(rt, "launch_enter_hook", old)
    except Exception:  # noqa: BLE001 - older Triton
        pass
    try:
        from triton.compiler import CompiledKernel

        old = getattr(CompiledKernel, "launch_enter_hook", None)
        CompiledKernel.launch_enter_hook = hook
        return lambda: setattr(CompiledKernel, "launch_enter_hook", old)
    except Exception:  # noqa: BLE001
        return None


def _op_name(func: Any) -> str:
    schema = getattr(func, "_schema", None)
    if schema is not None:
        overload = schema.overload_name
        return f"{schema.name}.{overload}" if overload else schema.name
    return str(func)


def is_oom(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError``, ``MemoryError``, or an allocator's out-of-memory RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def device_healthy(device: str) -> tuple[bool, str]:
    """A tiny op and a synchronize on ``device``: (healthy, the error if not).

    A sticky CUDA error makes every later call fail, this one included.
    """
    try:
        t = torch.ones(2, device=device)
        t.add_(1)
        if _is_cuda(device):
            torch.cuda.synchronize(device)
        if float(t.sum().item()) != 4.0:
            return False, "health check computed a wrong value (1+1 != 2): the device context is corrupt"
        return True, ""
    except BaseException as e:  # noqa: BLE001 - any failure here means the context is gone
        return False, f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@functools.lru_cache(maxsize=None)
def device_info(device: str) -> dict[str, Any]:
    """Versions and device identity recorded with every result (called in the worker)."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if _is_cuda(device):
        try:
            d = probe_device(f"cuda:{torch.device(device).index or 0}")
            info["device_name"] = d.name
            info["capability"] = d.capability_text
            info["cuda"] = d.cuda
            info["device_type"] = "cuda"
        except Exception as e:  # pragma: no cover - reported, not fatal
            info["device_error"] = _first_line(e)
    else:
        info["device_type"] = "cpu"
        info["device_name"] = probe_device("cpu").name
    return info


def _frame_of(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this module: ``file:line in func: code``.

    Frames that set ``__tracebackhide__ = True`` (pytest's convention) are skipped too.
    """
    chosen = None
    last = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        last = (frame, lineno)
        path = os.path.abspath(frame.f_code.co_filename)
        if (
            path == _THIS
            or path.startswith(_TORCH_DIR)
            or frame.f_code.co_name == "__torch_dispatch__"
            or frame.f_locals.get("__tracebackhide__")
        ):
            continue
        chosen = (frame, lineno)
    chosen = chosen or last
    if chosen is None:
        return ""
    frame, lineno = chosen
    code = linecache.getline(frame.f_code.co_filename, lineno).strip()
    return f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}" + (f": {code}" if code else "")


def classify_exception(exc: BaseException, device: str) -> tuple[Verdict, str]:
    """Verdict for an exception raised by the op: oom, device_fault (health check fails), unsupported (the
    target could not call the op as the case needs: :class:`~harness.verdicts.Unsupported`) or rejected."""
    healthy, why = device_healthy(device)
    if not healthy:
        return Verdict.DEVICE_FAULT, why
    if isinstance(exc, Unsupported):
        return Verdict.UNSUPPORTED, ""
    if is_oom(exc):
        if _is_cuda(device):
            try:
                torch.cuda.empty_cache()  # hand the failed attempt's cached blocks back for the next case
            except Exception:  # noqa: BLE001
                pass
        return Verdict.OOM, ""
    return Verdict.REJECTED, ""


# ------------------------------------------------------------------------------ snapshots


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole untyped storage of ``t`` as a 1-D uint8 tensor (a view, not a copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _view_bytes(t: torch.Tensor) -> torch.Tensor:
    """The view's own bytes in logical order (a copy), for telling value changes from poison changes."""
    c = t.detach().contiguous() if t.numel() else t.detach().reshape(-1)
    return c.reshape(-1).view(torch.uint8) if c.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


class _Change(NamedTuple):
    """One input the op wrote: ``name``, whether its storage outside the view (the poison) changed, what
    changed in words."""

    name: str
    poison: bool
    text: str


class _Snapshot:
    def __init__(self, inputs: Mapping[str, torch.Tensor]) -> None:
        self.storage = {n: _storage_bytes(t).clone() for n, t in inputs.items()}
        self.view = {n: _view_bytes(t).clone() for n, t in inputs.items()}

    def _poison_changed(self, n: str, t: torch.Tensor, now_storage: torch.Tensor) -> bool:
        if now_storage.numel() != self.storage[n].numel():
            return True  # the storage itself was replaced or resized
        mask = torch.ones(now_storage.numel(), dtype=torch.bool, device=t.device)
        _view_mask_of(t, mask)
        return not torch.equal(now_storage[mask], self.storage[n][mask])

    def restore(self, inputs: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> None:
        """Put back the snapshotted storage of the inputs ``names`` (those the op may overwrite) where it changed."""
        for n in names:
            if n in inputs:
                now = _storage_bytes(inputs[n])
                if now.numel() == self.storage[n].numel() and not torch.equal(now, self.storage[n]):
                    now.copy_(self.storage[n])

    def changes(self, inputs: Mapping[str, torch.Tensor], allowed: tuple[str, ...] = ()) -> list[_Change]:
        """What changed, input by input (empty: nothing); ``allowed``: inputs whose values may change."""
        found: list[_Change] = []
        for n, t in inputs.items():
            now_storage = _storage_bytes(t)
            if now_storage.numel() == self.storage[n].numel() and torch.equal(now_storage, self.storage[n]):
                continue
            now_view = _view_bytes(t)
            if torch.equal(now_view, self.view[n]):
                if now_storage.numel() != self.storage[n].numel():  # set_ / resize_: the tensor has another storage
                    found.append(
                        _Change(
                            n,
                            True,
                            f"{n}: its storage was replaced or resized ({self.storage[n].numel()} -> "
                            f"{now_storage.numel()} bytes), the values in its view unchanged",
                        )
                    )
                    continue
                nbad = int((now_storage != self.storage[n]).sum())
                found.append(
                    _Change(n, True, f"{n}: {nbad} byte(s) of storage outside the view (the poison) were written")
                )
                continue
            poison = self._poison_changed(n, t, now_storage)
            if n in allowed:  # the op may overwrite the values; does the poison still hold?
                if poison:
                    found.append(_Change(n, True, f"{n}: storage outside the view (the poison) was written"))
                continue
            elem = t.element_size()
            diff = (now_view != self.view[n]).view(-1, elem).any(1).nonzero()
            first = int(diff[0]) if diff.numel() else -1
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), t.shape)) if first >= 0 else ()
            found.append(
                _Change(
                    n, poison, f"{n}: {diff.numel()} of its {t.numel()} values changed (first at index {list(idx)})"
                )
            )
        return found


def _view_mask_of(t: torch.Tensor, mask_bytes: torch.Tensor) -> None:
    """Clear in ``mask_bytes`` (one bool per storage byte) the bytes the view ``t`` covers."""
    elem = t.element_size()
    n_elems = mask_bytes.numel() // elem
    m = mask_bytes[: n_elems * elem].view(n_elems, elem)
    shape = [1 if st == 0 else s for s, st in zip(t.shape, t.stride())]
    if t.numel():
        m.as_strided((*shape, elem), (*[st * elem for st in t.stride()], 1), t.storage_offset() * elem).fill_(False)


# ------------------------------------------------------------------------------ judging helpers


def _needs_layout_check(inputs: Mapping[str, torch.Tensor]) -> bool:
    for t in inputs.values():
        if (
            not t.is_contiguous()
            or t.storage_offset() != 0
            or _storage_bytes(t).numel() != t.numel() * t.element_size()
        ):
            return True
    return False


def _contiguous_copies(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh, packed, offset-0 copies with the same values (stride-0 dims materialized)."""
    return {n: t.clone(memory_format=torch.contiguous_format) for n, t in inputs.items()}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    a, b = on_host_if_small(a, b)
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _nonfinite_where_ref_finite(out: torch.Tensor, exact: torch.Tensor) -> tuple[int, list[int]]:
    out, exact = on_host_if_small(out, exact)
    bad = ~_finite(out) & _finite(exact.to(out.device))  # _finite: FP8 outputs too
    n = int(bad.sum())
    if not n:
        return 0, []
    first = int(bad.reshape(-1).nonzero()[0])
    return n, [int(i) for i in torch.unravel_index(torch.tensor(first), out.shape)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same width (flat), for a bitwise comparison."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    flat = t.detach().contiguous().reshape(-1)
    size = t.element_size()
    if size in ints:
        return flat.view(ints[size])
    return flat.view(torch.uint8).view(-1, size)  # complex128 and wider: one row of bytes per element


def _finite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite`` (widened first for the FP8 dtypes, which it does not take)."""
    return torch.isfinite(t.float() if t.is_floating_point() and t.element_size() == 1 else t)


def _nonfinite_count(t: torch.Tensor) -> int:
    return int((~_finite(t)).sum()) if t.is_floating_point() or t.is_complex() else 0


def _differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the elements whose bits differ (NaN at the same place in both counts as equal)."""
    ne = _bits(a) != _bits(b)
    if ne.dim() == 2:
        ne = ne.any(1)
    if a.is_floating_point() or a.is_complex():
        ne &= ~(torch.isnan(a.detach()).reshape(-1) & torch.isnan(b.detach()).reshape(-1))
    return ne


def _shares_storage(t: torch.Tensor, others: Any) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == ptr for o in others)


def _determinism_check(
    st: "_Case",
    target: Any,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    out: torch.Tensor,
    snap: "_Snapshot",
    recording: "_Recording | None",
) -> Result | None:
    """Call the op a second time on the same inputs (just verified unmodified; one it may overwrite, ``mutates``,
    gets its values back first): a Result when the output is not bitwise the first one (``nondeterministic``)
    or the call faults, raises or writes an input; None when it is the same, or the target declares
    ``deterministic = False``.

    The first output is copied only when the second call could overwrite it (it is a view of an input); an op
    that hands back the same buffer both times is called once more against a copy of the second output.
    """
    if not getattr(target, "deterministic", True):
        return None
    device, second = st.device, _SECOND
    mutable = tuple(getattr(target, "mutates", ()) or ())
    first = out.clone() if _shares_storage(out, inputs.values()) else out
    for attempt in range(2):
        snap.restore(inputs, mutable)  # an input the op may overwrite gets its values back: the same inputs
        try:
            again = recording.run(target.run, inputs, params) if recording is not None else target.run(inputs, params)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            return _second_call_raised(st, e, recording)
        healthy, why = device_healthy(device)
        if not healthy:
            return st.result(
                Verdict.DEVICE_FAULT,
                f"the first call passed the health check; {second} returned, then the device failed: {why}",
                attribution={"surfaced_at": f"health check after {second}", "launch_blocking": _launch_blocking()},
            )
        if not isinstance(again, torch.Tensor):
            return st.result(Verdict.ERROR, f"{target.name}.run returned {type(again).__name__} on {second}")
        changes = snap.changes(inputs, mutable)
        if changes:
            return _mutated(st, changes, _BY_SECOND)
        if attempt == 0 and first is out and again.numel() and _shares_storage(again, (out,)):
            first = again.clone()  # the op reuses its output buffer: the first output is gone; compare 2 and 3
            continue
        break
    return _compare_runs(st, *on_host_if_small(first, again))  # judged from here on; the op is done with them


_SECOND = "the second, identical call"
_BY_SECOND = f"\n(written by {_SECOND}; the first left the inputs intact)"


def _second_call_raised(st: "_Case", e: BaseException, recording: "_Recording | None" = None) -> Result:
    verdict, why = classify_exception(e, st.device)
    attribution: dict[str, Any] = {"surfaced_at": _frame_of(e), "launch_blocking": _launch_blocking()}
    if recording is not None:
        attribution.update(recording.attribution(e))
    msg = f"the first call returned; {_SECOND} on the same inputs raised {type(e).__name__}: {str(e).strip()}"
    if verdict is Verdict.REJECTED:  # the op took these inputs once: refusing them now is not a refusal
        return st.result(Verdict.NONDETERMINISTIC, msg, attribution=attribution)
    if verdict is Verdict.DEVICE_FAULT:
        msg += f"\nhealth check after the op: {why}"
    return st.result(verdict, msg, attribution=attribution)


def _compare_runs(st: "_Case", first: torch.Tensor, again: torch.Tensor) -> Result | None:
    """None when the second call's output is bitwise the first's (NaN equal to NaN at the same place), else the
    ``nondeterministic`` Result."""
    second = _SECOND
    counts = [_nonfinite_count(first), _nonfinite_count(again)]
    if tuple(first.shape) != tuple(again.shape) or first.dtype != again.dtype:
        return st.result(
            Verdict.NONDETERMINISTIC,
            f"{second} on the same inputs returned shape {tuple(again.shape)} {again.dtype}, "
            f"the first {tuple(first.shape)} {first.dtype}",
            metrics={"differing": max(first.numel(), again.numel()), "numel": first.numel(), "nonfinite_runs": counts},
        )
    ne = _differing(first, again)
    n = int(ne.sum())
    if not n:
        return None
    at = [int(i) for i in torch.unravel_index(ne.nonzero()[0, 0].cpu(), first.shape)] if first.dim() else []
    msg = (
        f"{second} on the same inputs gave a different output: {n} of {first.numel()} elements differ bitwise "
        f"(first at index {at})"
    )
    if first.is_floating_point() or first.is_complex():
        where = int((_finite(first) ^ _finite(again)).sum())
        if where:  # one run had NaN/inf where the other did not
            msg += f"; run 1: {counts[0]} NaN/inf, run 2: {counts[1]} NaN/inf ({where} place(s) finite in one only)"
    return st.result(
        Verdict.NONDETERMINISTIC, msg, metrics={"differing": n, "numel": first.numel(), "nonfinite_runs": counts}
    )


class _Case:
    """Mutable state of one run_case call (keeps run_case readable)."""

    def __init__(self, case: "Case", device: str, worker: str) -> None:
        self.case = case
        self.device = device
        self.worker = worker
        self.t0 = time.perf_counter()
        self.op = case.op
        self.layouts = case.describe_layouts()
        self.kernels: list[str] | None = None  # set by record_kernels (explored cases on CUDA)

    def result(self, verdict: Verdict, message: str = "", **kw: Any) -> Result:
        if self.kernels is not None:
            kw["metrics"] = {**kw.get("metrics", {}), "kernels": self.kernels}
        env = {}
        try:
            env = dict(device_info(self.device))
        except Exception:  # pragma: no cover
            pass
        return Result(
            verdict=verdict,
            message=message,
            op=self.op,
            duration=time.perf_counter() - self.t0,
            worker=self.worker,
            device=self.device,
            layouts=self.layouts,
            env=env,
            **kw,
        )


def run_case(
    case: "Case",
    device: str = "cpu",
    *,
    values: Mapping[str, torch.Tensor] | None = None,
    record_ops: bool = False,
    worker: str = "",
) -> Result:
    """Run ``case`` on ``device`` in this process and return its judged :class:`Result`.

    ``values``: stored input values (contiguous, logical shapes) overriding the case's recipes.
    ``record_ops``: record aten ops to name the one that raised (attribution reruns).
    Never raises for anything the op or the target does; a harness bug becomes verdict ``error``.
    """
    st = _Case(case, device, worker)
    try:
        return _run(st, values, record_ops)
    except BaseException as e:  # noqa: BLE001 - the harness must answer for every case
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        healthy, why = device_healthy(device)
        if not healthy:
            return st.result(
                Verdict.DEVICE_FAULT,
                f"{type(e).__name__}: {_first_line(e)}\nhealth check: {why}",
                attribution={"surfaced_at": _frame_of(e), "launch_blocking": _launch_blocking()},
            )
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
        return st.result(Verdict.ERROR, f"harness error while judging: {type(e).__name__}: {e}\n{tb}")


def _cuda_profiler() -> Any:
    """A ``torch.profiler.profile`` recording device (CUDA) activity only."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def _event_field(ev: Any, field: str) -> Any:
    """``ev.<field>`` of a ``FunctionEvent`` (an attribute) or a raw kineto event (a method); None if absent."""
    value = getattr(ev, field, None)
    return value() if callable(value) else value


def kernel_names(events: Any) -> list[str]:
    """The sorted, unique names of the device kernels among profiler ``events``: ``FunctionEvent``s, or the raw
    kineto events of the profiler's result (:func:`profiler_events`), which have the same fields as methods.
    Events on a CUDA device whose kineto activity is a kernel count (memory copies and sets, GPU annotations left
    out; an event without an activity type counts as a kernel unless its name says it is a copy or set)."""
    from torch.autograd import DeviceType

    names = set()
    for ev in events:
        activity = str(_event_field(ev, "activity_type") or "").lower()
        name = str(_event_field(ev, "name") or "")
        if not activity and name.startswith(("Memcpy", "Memset")):  # a torch without activity types: by name
            continue
        if _event_field(ev, "device_type") == DeviceType.CUDA and (not activity or "kernel" in activity) and name:
            names.add(name)
    return sorted(names)


def profiler_events(prof: Any) -> Any:
    """The events of a stopped ``torch.profiler.profile``: its raw kineto events where torch keeps them
    (``prof.profiler.kineto_results``), else ``prof.events()``.

    ``events()`` builds a ``FunctionEvent`` per record and their tree in Python: 38 ms for 200 CPU ops here,
    against 5 ms for profiling them and reading the raw events -- per explored case on CUDA, where an emulation
    launches hundreds of kernels.  The raw events carry the name, device and activity :func:`kernel_names` reads."""
    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is not None and callable(getattr(raw, "events", None)):
        return raw.events()
    return prof.events()


def record_kernels(st: "_Case", call: Any, profiler: Any = _cuda_profiler) -> Any:
    """``call()``, and for an explored case on CUDA (``"explore" in case.params``) the device kernels it
    launched, in ``st.kernels`` (the result's ``metrics["kernels"]``, the coverage key of
    :func:`harness.explore.kernel_coverage`).  On CPU, or for any other case, just ``call()``.

    A profiler that fails to start or stop records nothing (``kernel_coverage`` falls back to its CPU key)
    and never hides the op's own exception.
    """
    if "explore" not in st.case.params or not _is_cuda(st.device):
        return call()
    try:
        prof = profiler()
        prof.start()
    except Exception:  # noqa: BLE001 - profiling is coverage only; the op still runs
        return call()
    try:
        return call()
    finally:
        try:
            prof.stop()
            st.kernels = kernel_names(profiler_events(prof))
        except Exception:  # noqa: BLE001 - e.g. a sticky device fault: the op's verdict stands
            st.kernels = None


def _launch_blocking() -> bool:
    return os.environ.get("CUDA_LAUNCH_BLOCKING") == "1"


def _run(st: _Case, values: Mapping[str, torch.Tensor] | None, record_ops: bool) -> Result:
    from harness.targets import TargetError, resolve_target

    case, device = st.case, st.device
    try:
        target = resolve_target(case)
    except TargetError as e:
        return st.result(Verdict.UNAVAILABLE, str(e))
    st.op = target.name
    try:
        ok, why = target.available(device)
    except Exception as e:
        ok, why = False, f"availability probe raised {type(e).__name__}: {_first_line(e)}"
    if not ok:
        return st.result(Verdict.UNAVAILABLE, f"{target.name} cannot run on {device}: {why}")

    params = dict(case.params)
    try:
        inputs = target.make_inputs(case, device, values)
    except Exception as e:
        verdict, why = classify_exception(e, device)
        if verdict is Verdict.REJECTED:
            verdict = Verdict.ERROR
        return st.result(
            verdict,
            f"building the inputs failed: {type(e).__name__}: {_first_line(e)}"
            + (f"\nhealth check: {why}" if why else ""),
        )
    if not record_ops and one_sync_fits(inputs, device):
        return _run_one_sync(st, target, inputs, params)
    snap = _Snapshot(inputs)

    try:
        exact, emulated = target.reference(inputs, params)
    except Exception as e:
        return _reference_failed(st, e)
    ref_changes = snap.changes(inputs)
    if ref_changes:
        return _reference_mutated(st, ref_changes)

    # same values, packed at offset 0, copied before the op can touch them (for the layout check)
    contig = _contiguous_copies(inputs) if _needs_layout_check(inputs) else None

    # ---- the op under test
    recording = _Recording(device) if record_ops else None
    attribution: dict[str, Any] | None = None
    try:
        if recording is not None:
            out = recording.run(target.run, inputs, params)
        else:
            out = record_kernels(st, lambda: target.run(inputs, params))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        return _first_call_raised(st, e, recording)

    healthy, why = device_healthy(device)
    if not healthy:
        attribution = {
            "surfaced_at": "health check after the op returned (asynchronous fault)",
            "launch_blocking": _launch_blocking(),
        }
        if recording is not None:
            attribution.update(recording.attribution(None))
        return st.result(
            Verdict.DEVICE_FAULT, f"the op returned, then the device failed: {why}", attribution=attribution
        )

    if not isinstance(out, torch.Tensor):
        return st.result(Verdict.ERROR, f"{target.name}.run returned {type(out).__name__}, expected a Tensor")

    # ---- input mutation
    changes = snap.changes(inputs, tuple(getattr(target, "mutates", ()) or ()))
    if changes:
        return _mutated(st, changes)

    # ---- determinism: a second, identical call
    again = _determinism_check(st, target, inputs, params, out, snap, recording)
    if again is not None:
        return again

    def contiguous_rerun() -> torch.Tensor:
        out_c = target.run(contig, params)
        healthy, why = device_healthy(device)
        if not healthy:
            raise _RerunBrokeDevice(why)
        return out_c

    return _judge_outputs(st, target, inputs, params, out, exact, emulated, contiguous_rerun if contig else None)


class _RerunBrokeDevice(Exception):
    """The contiguous rerun returned and the health check after it failed (``args[0]``: why)."""


def _reference_failed(st: _Case, e: BaseException) -> Result:
    verdict, why = classify_exception(e, st.device)
    if verdict is Verdict.REJECTED:
        verdict = Verdict.ERROR
    return st.result(
        verdict,
        f"the reference failed (not the op under test): {type(e).__name__}: "
        f"{_first_line(e)}" + (f"\nhealth check: {why}" if why else ""),
    )


def _reference_mutated(st: _Case, changes: list[_Change]) -> Result:
    return st.result(
        Verdict.ERROR, "the reference mutated its inputs (harness bug): " + "; ".join(c.text for c in changes)
    )


def _first_call_raised(st: _Case, e: BaseException, recording: "_Recording | None" = None) -> Result:
    verdict, why = classify_exception(e, st.device)
    attribution = {"surfaced_at": _frame_of(e), "launch_blocking": _launch_blocking()}
    if recording is not None:
        attribution.update(recording.attribution(e))
    msg = f"{type(e).__name__}: {str(e).strip()}"
    if verdict is Verdict.DEVICE_FAULT:
        msg += f"\nhealth check after the op: {why}"
    return st.result(verdict, msg, attribution=attribution)


def _mutated(st: _Case, changes: list[_Change], suffix: str = "") -> Result:
    return st.result(
        Verdict.INPUT_MUTATION,
        INPUT_MUTATION_PREFIX + "; ".join(c.text for c in changes) + suffix,
        mutated_inputs=[c.name for c in changes],
        poison_written=[c.name for c in changes if c.poison],
    )


def _judge_outputs(
    st: _Case,
    target: Any,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    out: torch.Tensor,
    exact: torch.Tensor,
    emulated: torch.Tensor | None,
    contiguous_rerun: Callable[[], torch.Tensor] | None,
) -> Result:
    """Shape -> nonfinite -> drift (computed) -> layout invariance -> drift/pass, once the op's calls are done
    and its inputs are known intact.  ``contiguous_rerun``: the op on the same values packed at offset 0 (None:
    the inputs are packed already); it raises what that call raised, or :class:`_RerunBrokeDevice`."""
    device = st.device
    if tuple(out.shape) != tuple(exact.shape):
        return st.result(
            Verdict.DRIFT, f"output shape {tuple(out.shape)} differs from the reference's {tuple(exact.shape)}"
        )

    # ---- nonfinite where the reference is finite
    n_bad, first = _nonfinite_where_ref_finite(out, exact)
    if n_bad:
        return st.result(
            Verdict.NONFINITE,
            f"{n_bad} NaN/inf output value(s) where the exact reference is finite (first at index {first})",
            metrics={"nonfinite": n_bad, "numel": out.numel()},
        )

    # ---- drift (computed now, reported after the layout check)
    from harness.reference.metrics import error_report, judge

    bound = target.bound(inputs, params, exact)
    j = judge(out, exact, emulated, bound)
    rep = j.report
    metrics: dict[str, Any] = {
        "max_abs": rep.max_abs,
        "mean_abs": rep.mean_abs,
        "rmse": rep.rmse,
        "rel_l1": rep.rel_l1,
        "cosine": rep.cosine,
        "sqnr_db": rep.sqnr_db,
        "numel": rep.numel,
        "err": j.check.err,
        "allowed": j.check.allowed,
        "ratio": j.check.ratio,
    }
    if j.ref_report is not None:
        metrics["ref_err"] = j.ref_report.metric(bound.metric)
        metrics["ref_sqnr_db"] = j.ref_report.sqnr_db
    bound_d = {"k": bound.k, "floor": bound.floor, "metric": bound.metric, "why": bound.why, "allowed": j.check.allowed}

    # ---- layout invariance: the same values, packed and at offset 0
    if contiguous_rerun is not None:
        try:
            out_c = contiguous_rerun()
        except _RerunBrokeDevice as e:
            return st.result(Verdict.DEVICE_FAULT, f"the contiguous rerun left the device broken: {e.args[0]}")
        except Exception as e:
            verdict, why = classify_exception(e, device)
            if verdict is Verdict.DEVICE_FAULT:
                return st.result(verdict, f"the contiguous rerun faulted: {type(e).__name__}: {_first_line(e)}")
            return st.result(
                Verdict.LAYOUT_NONINVARIANCE,
                f"the op accepted the strided layout but rejected the "
                f"same values packed: {type(e).__name__}: {_first_line(e)}",
                metrics=metrics,
            )
        lb = target.layout_bound(inputs, params, exact)
        if lb is None:
            if not _bitwise_equal(out, out_c):
                d = error_report(out, out_c) if out.shape == out_c.shape else None
                if d is not None:
                    metrics.update(layout_max_abs=d.max_abs, layout_mean_abs=d.mean_abs)
                return st.result(
                    Verdict.LAYOUT_NONINVARIANCE,
                    "the same values in the contiguous layout give a different result (bitwise "
                    "equality expected)"
                    + (f": max_abs {d.max_abs:.4g}, mean_abs {d.mean_abs:.4g}" if d is not None else ""),
                    metrics=metrics,
                    bound={"k": 0.0, "floor": 0.0, "why": "bitwise equal expected"},
                )
        else:
            d = error_report(out, out_c)
            ref_err = (
                metrics.get("ref_err")
                if lb.metric == bound.metric
                else (j.ref_report.metric(lb.metric) if j.ref_report is not None else None)
            )
            chk = lb.check(d.metric(lb.metric), ref_err)
            metrics.update(layout_err=chk.err, layout_allowed=chk.allowed, layout_ratio=chk.ratio)
            if not chk.passed or d.nonfinite_mismatch:
                return st.result(
                    Verdict.LAYOUT_NONINVARIANCE,
                    f"the same values in the contiguous layout differ by {lb.metric} {chk.err:.4g} > "
                    f"allowed {chk.allowed:.4g} (x{chk.ratio:.3g})",
                    metrics=metrics,
                    bound={"k": lb.k, "floor": lb.floor, "metric": lb.metric, "why": lb.why, "allowed": chk.allowed},
                )

    if not j.passed:
        return st.result(Verdict.DRIFT, j.reason, metrics=metrics, bound=bound_d)
    return st.result(Verdict.PASS, j.reason, metrics=metrics, bound=bound_d)


# ------------------------------------------------------------------------------ the one-sync path

#: storage elements of all a case's inputs together up to which it takes the one-sync path by default: the size
#: below which outputs are judged on host copies (``metrics.HOST_JUDGE_ELEMENTS``).  For such a case the waits are
#: most of its time on the GPU; on one H200 the matrix's attention cases (about 10^5 elements an input) ran slower
#: on the path than with a wait after each call (15.9 against 24.8 cases/s, two 45 s runs one after the other).
ONE_SYNC_ELEMENTS = HOST_JUDGE_ELEMENTS


def _on(t: torch.Tensor, device: str) -> bool:
    """Whether ``t`` lives on ``device`` ("cuda" means the current CUDA device)."""
    want = torch.device(device)
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", torch.cuda.current_device())
    return t.device == want


def one_sync_fits(inputs: Mapping[str, torch.Tensor], device: str) -> bool:
    """Whether the case takes the one-sync path (:func:`_run_one_sync`): every input a tensor on ``device``
    whose storage is whole elements, and by default a CUDA device and at most ``ONE_SYNC_ELEMENTS`` storage
    elements in all.  ``$HARNESS_ONE_SYNC``: ``0`` never (every case waits for the device after every call, as
    attribution reruns always do); ``1`` every such case of any size on any device, the CPU included (the test
    suite compares the two paths that way)."""
    mode = os.environ.get("HARNESS_ONE_SYNC", "")
    if mode == "0" or (mode != "1" and not _is_cuda(device)):
        return False
    total = 0
    for t in inputs.values():
        if not isinstance(t, torch.Tensor) or not _on(t, device):
            return False
        nbytes = t.untyped_storage().nbytes()
        if nbytes % t.element_size():
            return False
        total += nbytes // t.element_size()
    return mode == "1" or total <= ONE_SYNC_ELEMENTS


class _HostCopies:
    """Device tensors copied to the host in stream order: ``add(t)`` copies ``t`` on the device (what it holds
    once the work queued before it has run) and returns its index; ``wait()`` synchronizes the device -- the
    health check: a sticky fault raises there -- then brings every copy back in one transfer and returns
    whether the device was healthy.  ``host`` then holds the host tensors, contiguous, in the order added.

    No pinned memory: a pinned block freed once the context is broken aborts the process (its free calls into
    CUDA from a destructor), which would turn a device fault into a worker crash."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.host: list[torch.Tensor] = []
        self._parts: list[torch.Tensor] = []
        self.probe = torch.ones(2, device=device)
        self.probe.add_(1)

    def add(self, t: torch.Tensor) -> int:
        self._parts.append(t.detach().clone(memory_format=torch.contiguous_format))
        return len(self._parts) - 1

    def wait(self) -> tuple[bool, str]:
        """(healthy, the error if not); when healthy, ``host`` holds the copies.  A failure that leaves the
        device healthy is the harness's own and is raised."""
        i = self.add(self.probe)
        on_dev = [p.device.type != "cpu" for p in self._parts]  # a reference may have been computed on the host
        try:
            if _is_cuda(self.device):
                torch.cuda.synchronize(self.device)
            flat = [p.reshape(-1).view(torch.uint8) for p, d in zip(self._parts, on_dev) if d]
            blob = torch.cat(flat).cpu() if flat else None
        except BaseException:  # noqa: BLE001 - a broken context fails here; anything else is re-raised
            healthy, why = device_healthy(self.device)
            if healthy:
                raise
            return False, why
        self.host, at = [], 0
        for p, d in zip(self._parts, on_dev):
            if not d:
                self.host.append(p)
                continue
            n = p.numel() * p.element_size()
            self.host.append(blob[at : at + n].clone().view(p.dtype).reshape(p.shape))
            at += n
        if float(self.host[i].sum()) != 4.0:
            return False, "health check computed a wrong value (1+1 != 2): the device context is corrupt"
        return True, ""


class _Checkpoint(NamedTuple):
    """An input as it was at one point: the index of its storage's copy, and its view (dtype, shape, strides,
    offset) then -- an op may re-view an input or give it another storage (``set_``, ``resize_``)."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _checkpoint(copies: "_HostCopies", inputs: Mapping[str, torch.Tensor]) -> dict[str, _Checkpoint]:
    return {
        n: _Checkpoint(copies.add(_storage_bytes(t)), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        for n, t in inputs.items()
    }


def _host_view(c: _Checkpoint, host: list[torch.Tensor]) -> torch.Tensor:
    """The checkpointed view over the host copy of its storage's bytes."""
    raw = host[c.index]
    usable = raw[: raw.numel() - raw.numel() % c.dtype.itemsize]  # a storage resized to a partial element
    return usable.view(c.dtype).as_strided(c.shape, c.stride, c.offset)


def _run_one_sync(st: _Case, target: Any, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Result:
    """The case with one wait for the device: the reference, the op's first and second calls and the contiguous
    rerun are queued back to back, every input's storage is copied to the host after each of them, and all of it
    is judged on the host after a single synchronize (which is the health check).

    Several processes sharing one GPU take turns for every wait (measured on one H200 with 8 processes: about
    7300 waits/s in all, against 44-79 thousand for one process), so a case that waited a dozen times was
    bounded by the GPU's turn-taking, not by its kernels.  The verdicts and their order are those of the
    per-call path (``run_case``'s docstring).  What differs: a fault which surfaces only at the wait is charged
    to the op's calls together (the attribution rerun, on the per-call path, names the call); the second call
    and the contiguous rerun are made even when the first call's verdict is already decided (an input it wrote),
    so a fault or a hang in them is what the case reports; and the checkpoints are copied in the current
    stream's order -- an op that leaves work on a side stream it did not join is judged as that stream sees it.
    """
    device = st.device
    copies = _HostCopies(device)
    before = _checkpoint(copies, inputs)
    mutable = tuple(n for n in (getattr(target, "mutates", ()) or ()) if n in inputs)
    originals = {n: _storage_bytes(inputs[n]).clone() for n in mutable}  # put back before the second call
    try:
        exact, emulated = target.reference(inputs, params)
    except Exception as e:
        return _reference_failed(st, e)
    after_ref = _checkpoint(copies, inputs)
    i_exact = copies.add(exact)
    i_emulated = copies.add(emulated) if isinstance(emulated, torch.Tensor) else None
    contig = _contiguous_copies(inputs) if _needs_layout_check(inputs) else None
    snap: Any = None  # the inputs as they were before anything ran, on the host (set by settle)

    def at(points: dict[str, _Checkpoint]) -> dict[str, torch.Tensor]:
        return {n: _host_view(c, copies.host) for n, c in points.items()}

    def settle(calls: str = "the op") -> Result | None:
        """The wait, then the reference's own check: what comes before any verdict on the op's first call."""
        nonlocal snap
        healthy, why = copies.wait()
        if not healthy:
            return st.result(
                Verdict.DEVICE_FAULT,
                f"{calls} returned, then the device failed: {why}",
                attribution={
                    "surfaced_at": f"health check after {calls} returned (asynchronous fault)",
                    "launch_blocking": _launch_blocking(),
                },
            )
        snap = _Snapshot(at(before))
        ref_changes = snap.changes(at(after_ref))
        return _reference_mutated(st, ref_changes) if ref_changes else None

    # ---- the op's calls, queued without waiting
    try:
        out = record_kernels(st, lambda: target.run(inputs, params))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        settled = settle()
        if settled is not None and settled.verdict is not Verdict.DEVICE_FAULT:
            return settled
        return _first_call_raised(st, e)  # a broken device: classify_exception says so, with the op's error
    if not isinstance(out, torch.Tensor):
        return settle() or st.result(
            Verdict.ERROR, f"{target.name}.run returned {type(out).__name__}, expected a Tensor"
        )
    i_out = copies.add(out)
    after_first = _checkpoint(copies, inputs)
    deterministic = getattr(target, "deterministic", True)
    second_raised: BaseException | None = None
    again: Any = None
    after_second: dict[str, _Checkpoint] = {}
    if deterministic:
        for n in mutable:
            now = _storage_bytes(inputs[n])
            if now.numel() == originals[n].numel():  # an input the op may overwrite gets its values back
                now.copy_(originals[n])
        try:
            again = target.run(inputs, params)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            second_raised = e
        if isinstance(again, torch.Tensor):
            i_again = copies.add(again)
            after_second = _checkpoint(copies, inputs)
    rerun_raised: BaseException | None = None
    i_contig: int | None = None
    if contig is not None and second_raised is None:
        try:
            out_c = target.run(contig, params)
        except Exception as e:
            rerun_raised = e
        else:
            i_contig = copies.add(out_c) if isinstance(out_c, torch.Tensor) else None
            if i_contig is None:
                rerun_raised = TypeError(f"{target.name}.run returned {type(out_c).__name__}, expected a Tensor")

    # ---- one wait; from here on everything is on the host
    settled = settle("the op's calls" if deterministic or contig is not None else "the op")
    if settled is not None:
        return settled
    host = copies.host
    changes = snap.changes(at(after_first), mutable)
    if changes:
        return _mutated(st, changes)
    if deterministic:
        if second_raised is not None:
            return _second_call_raised(st, second_raised)
        if not isinstance(again, torch.Tensor):
            return st.result(Verdict.ERROR, f"{target.name}.run returned {type(again).__name__} on {_SECOND}")
        changes = snap.changes(at(after_second), mutable)
        if changes:
            return _mutated(st, changes, _BY_SECOND)
        differ = _compare_runs(st, host[i_out], host[i_again])
        if differ is not None:
            return differ

    def contiguous_rerun() -> torch.Tensor:
        if rerun_raised is not None:
            raise rerun_raised
        return host[i_contig]

    emulated_h = host[i_emulated] if i_emulated is not None else emulated
    return _judge_outputs(
        st, target, inputs, params, host[i_out], host[i_exact], emulated_h, contiguous_rerun if contig else None
    )
