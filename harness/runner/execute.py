"""Run one case in this process and judge it: what a worker does for every case.

``run_case`` builds the inputs inside the process (poisoned storage and all),
snapshots every input's whole storage, runs the target's references and the
op, checks the device is still healthy, then judges in a fixed order:

    unavailable -> error (inputs/reference) -> rejected | oom | device_fault (op raised)
    -> device_fault (health check) -> input_mutation -> nonfinite
    -> layout_noninvariance -> drift -> pass

A *device fault* is told apart from a clean rejection by the health check
after the exception: a tiny op plus a synchronize. A sticky CUDA error (illegal
address, misaligned address, device-side assert) fails it; a clean Python
error (a shape check, ``CUBLAS_STATUS_NOT_SUPPORTED``) does not. Because every
case ends with a synchronizing health check, an asynchronous fault can never
leak into the next case.

With ``record_ops=True`` (used by attribution reruns under
``CUDA_LAUNCH_BLOCKING=1``) a ``TorchDispatchMode`` records the aten ops the
target calls; the op that raised is named in ``Result.attribution``.
"""

from __future__ import annotations

import collections
import functools
import linecache
import os
import platform
import time
import traceback
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.capability import device_info as probe_device
from harness.verdicts import INPUT_MUTATION_PREFIX, Result, Unsupported, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from harness.cases import Case

__all__ = [
    "run_case",
    "device_healthy",
    "device_info",
    "OpRecorder",
    "classify_exception",
    "is_oom",
]

_THIS = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "CUDA_ERROR_OUT_OF_MEMORY")


class OpRecorder(TorchDispatchMode):
    """Records the ops the code under it calls; ``failed`` is the op that raised (innermost seen).

    Triton kernels do not go through torch's dispatcher; when Triton is importable a launch
    hook records them too, as ``triton::<kernel name>``.
    """

    def __init__(self, keep: int = 12) -> None:
        super().__init__()
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.failed: str | None = None
        self.count = 0
        self._triton_restore: Any = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.tail.append(name)
        self.count += 1
        try:
            return func(*args, **(kwargs or {}))
        except BaseException:
            if self.failed is None:
                self.failed = name
            raise

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

    def changes(self, inputs: Mapping[str, torch.Tensor], allowed: tuple[str, ...] = ()) -> list[_Change]:
        """What changed, input by input (empty: nothing); ``allowed``: inputs whose values may change."""
        found: list[_Change] = []
        for n, t in inputs.items():
            now_storage = _storage_bytes(t)
            if now_storage.numel() == self.storage[n].numel() and torch.equal(now_storage, self.storage[n]):
                continue
            now_view = _view_bytes(t)
            if torch.equal(now_view, self.view[n]):
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
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _nonfinite_where_ref_finite(out: torch.Tensor, exact: torch.Tensor) -> tuple[int, list[int]]:
    bad = ~torch.isfinite(out) & torch.isfinite(exact.to(out.device))
    n = int(bad.sum())
    if not n:
        return 0, []
    first = int(bad.reshape(-1).nonzero()[0])
    return n, [int(i) for i in torch.unravel_index(torch.tensor(first), out.shape)]


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


def kernel_names(events: Any) -> list[str]:
    """The sorted, unique names of the device kernels among profiler ``events`` (``FunctionEvent``s):
    events on a CUDA device whose kineto activity is a kernel (memory copies and sets, GPU annotations left out;
    an event without an activity type counts as a kernel)."""
    from torch.autograd import DeviceType

    names = set()
    for ev in events:
        activity = str(getattr(ev, "activity_type", "") or "").lower()
        if getattr(ev, "device_type", None) == DeviceType.CUDA and (not activity or "kernel" in activity) and ev.name:
            names.add(str(ev.name))
    return sorted(names)


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
            st.kernels = kernel_names(prof.events())
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
    snap = _Snapshot(inputs)

    try:
        exact, emulated = target.reference(inputs, params)
    except Exception as e:
        verdict, why = classify_exception(e, device)
        if verdict is Verdict.REJECTED:
            verdict = Verdict.ERROR
        return st.result(
            verdict,
            f"the reference failed (not the op under test): {type(e).__name__}: "
            f"{_first_line(e)}" + (f"\nhealth check: {why}" if why else ""),
        )
    ref_changes = snap.changes(inputs)
    if ref_changes:
        return st.result(
            Verdict.ERROR, "the reference mutated its inputs (harness bug): " + "; ".join(c.text for c in ref_changes)
        )

    # same values, packed at offset 0, copied before the op can touch them (for the layout check)
    contig = _contiguous_copies(inputs) if _needs_layout_check(inputs) else None

    # ---- the op under test
    recorder = OpRecorder() if record_ops else None
    attribution: dict[str, Any] | None = None
    try:
        if recorder is not None:
            with recorder:
                out = target.run(inputs, params)
        else:
            out = record_kernels(st, lambda: target.run(inputs, params))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        verdict, why = classify_exception(e, device)
        attribution = {"surfaced_at": _frame_of(e), "launch_blocking": _launch_blocking()}
        if recorder is not None:
            op, note = recorder.culprit()
            attribution.update(op=op, frame=_frame_of(e), ops_tail=list(recorder.tail))
            if note:
                attribution["note"] = note
        msg = f"{type(e).__name__}: {str(e).strip()}"
        if verdict is Verdict.DEVICE_FAULT:
            msg += f"\nhealth check after the op: {why}"
        return st.result(verdict, msg, attribution=attribution)

    healthy, why = device_healthy(device)
    if not healthy:
        attribution = {
            "surfaced_at": "health check after the op returned (asynchronous fault)",
            "launch_blocking": _launch_blocking(),
        }
        if recorder is not None:
            attribution.update(
                op=recorder.tail[-1] if recorder.tail else "",
                ops_tail=list(recorder.tail),
                note="the op returned normally; the last op it launched is named",
            )
        return st.result(
            Verdict.DEVICE_FAULT, f"the op returned, then the device failed: {why}", attribution=attribution
        )

    if not isinstance(out, torch.Tensor):
        return st.result(Verdict.ERROR, f"{target.name}.run returned {type(out).__name__}, expected a Tensor")

    # ---- input mutation
    changes = snap.changes(inputs, tuple(getattr(target, "mutates", ()) or ()))
    if changes:
        return st.result(
            Verdict.INPUT_MUTATION,
            INPUT_MUTATION_PREFIX + "; ".join(c.text for c in changes),
            mutated_inputs=[c.name for c in changes],
            poison_written=[c.name for c in changes if c.poison],
        )

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
    if contig is not None:
        try:
            out_c = target.run(contig, params)
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
        healthy, why = device_healthy(device)
        if not healthy:
            return st.result(Verdict.DEVICE_FAULT, f"the contiguous rerun left the device broken: {why}")
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
