"""The write-up's claims about ``CUDA error: misaligned address``, each turned into an experiment.

``python -m harness claims [--device auto|cpu|cuda] [--out DIR] [--format text|md|html|json] [--scenarios]``

Each claim has a ``measure(ctx) -> evidence`` (JSON-able numbers, measured on the current device)
and a ``decide(evidence) -> (status, why, settle)``: ``confirmed``, ``refuted`` or ``not testable
here`` (then ``settle`` names the device that would settle it). Verdicts come from the
measurements only; the tests drive ``decide`` with planted evidence for every outcome.

Anything that may fault the GPU runs isolated: layout sweeps of the forwards go through the
harness's worker pool (fault isolation, one Result per case; failing cases are written to
``DIR/cases``), and the poisoned-context probe runs in a child interpreter, so a sticky CUDA
error cannot poison the claims run. On the CPU the same sweeps run in this process (a CPU kernel
cannot leave a sticky fault).

``--scenarios`` appends the write-up's scenarios (:mod:`harness.scenarios`), each judged against
the emulation of its formats.
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness._jsonfile import atomic_write_text

__all__ = [
    "CONFIRMED",
    "REFUTED",
    "UNTESTABLE",
    "Claim",
    "ClaimResult",
    "ClaimContext",
    "CLAIMS",
    "OVERHEAD_TARGET",
    "run_claim",
    "run_claims",
    "format_results",
    "add_parser",
]

CONFIRMED, REFUTED, UNTESTABLE = "confirmed", "refuted", "not testable here"
#: "almost free" / "no slowdown": the project's overhead target for guards (issue 13: within 2 % of the bare op).
OVERHEAD_TARGET = 0.02
_ANY_CUDA = "any CUDA GPU (python -m harness claims --device cuda)"
_FP8_GPU = "a CUDA GPU with FP8 matmul (compute capability 8.9 or 9.0+, e.g. H100/H200)"
_BLACKWELL = "a Blackwell GPU (compute capability 10.0 or 12.0) with sageattn3 installed"
#: the layout classes of the linear sweep that carry a layout property (views model code hands over)
_VIEW_CLASSES = (
    "transposed",
    "last_stride_2",
    "padded_rows",
    "offset_1",
    "offset_2",
    "offset_8",
    "packed_slice",
    "flatten_permuted",
    "broadcast",
)

Decision = tuple[str, str, str]  # (status, why, settle)


# ----------------------------------------------------------------------------------- framework


@dataclass
class ClaimContext:
    """Where the experiments run: ``device`` ("cpu" or "cuda:N"), ``out`` (case files), sweep size."""

    device: str = "cpu"
    out: Optional[Path] = None
    per_class: int = 1
    classes: Optional[tuple[str, ...]] = None  # restrict the linear sweeps (tests)
    timing_rounds: int = 20  # CUDA; the CPU takes 5 (its timings only compare host costs)
    pool: Optional[bool] = None  # run the sweeps in the worker pool (default: on CUDA only)
    _sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Claim:
    """One claim of the write-up and its experiment."""

    id: str
    text: str
    measure: Callable[[ClaimContext], dict[str, Any]]
    decide: Callable[[dict[str, Any]], Decision]


@dataclass
class ClaimResult:
    """A claim's verdict with its evidence and case files."""

    id: str
    claim: str
    status: str
    why: str
    settle: str
    device: str
    evidence: dict[str, Any]
    cases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "claim": self.claim,
            "status": self.status,
            "why": self.why,
            "settle": self.settle,
            "device": self.device,
            "evidence": self.evidence,
            "cases": list(self.cases),
        }


class _OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active (a metadata read that dispatches nothing launches nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _views(device: str) -> list[tuple[str, torch.Tensor]]:
    """One activation per layout class in ``_VIEW_CLASSES`` (strided, misaligned, stride-0, ...), on ``device``."""
    from harness.runner.targets import default_inputs, get_target

    factories = get_target("fp8_linear").layout_classes()
    return [
        (name, default_inputs(factories[name].build(0), device)["x"]) for name in _VIEW_CLASSES if name in factories
    ]  # offset_1 exists only for 1-byte dtypes


def _metadata_reads(t: torch.Tensor) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("device", lambda: t.device),
        ("shape", lambda: t.shape),
        ("dtype", lambda: t.dtype),
        ("stride", lambda: t.stride()),
        ("is_contiguous", lambda: t.is_contiguous()),
        ("int(shape[0])", lambda: int(t.shape[0])),
        ("shape[0]", lambda: t.shape[0]),
    ]


def _read_all(views: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Read every metadata field of every view; count reads, errors and dispatched ops."""
    reads, errors, ops = 0, [], []
    types = Counter()
    for name, t in views:
        for what, fn in _metadata_reads(t):
            rec = _OpRecorder()
            try:
                with rec:
                    v = fn()
                if what == "shape[0]":
                    types[type(v).__name__] += 1
            except Exception as e:  # noqa: BLE001 - an error here is the evidence
                errors.append(f"{name}.{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            reads += 1
            ops.extend(rec.ops)
    return {
        "reads": reads,
        "errors": errors,
        "dispatched_ops": len(ops),
        "ops": sorted(set(ops)),
        "shape0_types": dict(types),
    }


_POISON_CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from harness.claims import _views, _read_all
from harness.layouts import LayoutSpec, materialize
dev = sys.argv[1]
views = _views(dev)
torch.cuda.synchronize(dev)
rep = {"fault": None, "launch_error": None}
try:  # a real misaligned-address fault: SDPA's flash kernel on 2-byte-aligned q/k/v (docs/gpu-findings.md)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (materialize(LayoutSpec((1, 2, 64, 64), "bfloat16", offset=1), torch.randn(1, 2, 64, 64), device=dev)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, k, v)
    rep["fault"] = "sdpa flash, 2-byte aligned q/k/v"
except Exception as e:
    rep["launch_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
if rep["fault"] is None:  # fallback: an out-of-bounds gather (device-side assert), also sticky
    try:
        idx = torch.tensor([1 << 20], device=dev)
        torch.zeros(4, device=dev)[idx]
        rep["fault"] = "out-of-bounds index (device-side assert)"
    except Exception as e:  # the first attempt already poisoned the context: it surfaced at this launch
        rep["fault"], rep["fallback_error"] = "sdpa flash (error reported at launch)", f"{type(e).__name__}: {e}"
rep["metadata_after_fault"] = _read_all(views)  # the faulty kernel is queued or done; nothing synchronised yet
rep["surfaced_at"] = None
for what, fn in (("torch.cuda.synchronize()", lambda: torch.cuda.synchronize(dev)),
                 ("a kernel launch (torch.ones(1) + 1)", lambda: torch.ones(1, device=dev) + 1)):
    try:
        fn()
    except Exception as e:
        rep["surfaced_at"], rep["error"] = what, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        break
rep["fault_triggered"] = rep["surfaced_at"] is not None
if rep["fault_triggered"]:  # the context is known to be poisoned now: read again, then check it is sticky
    rep["metadata_after_error"] = _read_all(views)
    try:
        torch.ones(1, device=dev) + 1
        torch.cuda.synchronize(dev)
        rep["sticky"] = False
    except Exception:
        rep["sticky"] = True
print(json.dumps(rep))
"""


def _child(code: str, *args: str, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    cp = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = cp.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"child_failed": f"exit {cp.returncode}: {cp.stderr.strip()[-800:]}"}


def _run_cases(ctx: ClaimContext, op: str) -> dict[str, Any]:
    """Sweep target ``op`` through its layout classes (cached per op): verdict per class, failing cases saved."""
    if op in ctx._sweeps:
        return ctx._sweeps[op]
    from harness.runner.pool import save_failure
    from harness.runner.targets import get_target

    target = get_target(op)
    ok, why = target.available(ctx.device)
    if not ok:
        ctx._sweeps[op] = {"available": False, "reason": why}
        return ctx._sweeps[op]
    cells = [
        (name, f.build(i))
        for name, f in target.layout_classes().items()
        if ctx.classes is None or name in ctx.classes
        for i in range(ctx.per_class)
    ]
    if ctx.cuda if ctx.pool is None else ctx.pool:
        from harness.runner.pool import WorkerPool

        with WorkerPool(devices=[ctx.device], case_timeout=120) as pool:
            results = pool.run([c for _, c in cells])
    else:
        from harness.runner.execute import run_case

        results = [run_case(c, ctx.device) for _, c in cells]
    by_class: dict[str, Counter] = defaultdict(Counter)
    failing: dict[str, list[str]] = defaultdict(list)
    cases = []
    misaligned = 0
    for (name, case), res in zip(cells, results):
        by_class[name][res.verdict.value] += 1
        misaligned += "misaligned" in (res.message or "").lower()
        if res.verdict.failed:
            failing[res.verdict.value].append(name)
            if ctx.out is not None:
                cases.append(str(save_failure(case, res, ctx.out / "cases")))
    ctx._sweeps[op] = {
        "available": True,
        "cases_run": len(cells),
        "verdicts": dict(sum(by_class.values(), Counter())),
        "failing": {v: sorted(set(n)) for v, n in failing.items()},
        "by_class": {n: dict(c) for n, c in by_class.items()},
        "case_files": cases,
        "misaligned_messages": misaligned,
    }
    return ctx._sweeps[op]


def _failing(sweeps: dict[str, Any]) -> list[str]:
    out = []
    for op, s in sweeps.items():
        for verdict, classes in (s.get("failing") or {}).items():
            out.append(f"{op}: {verdict} in {', '.join(classes)}")
    return out


# ----------------------------------------------------------------------------------- the claims
# 1. metadata reads


def _m_metadata(ctx: ClaimContext) -> dict[str, Any]:
    healthy = _read_all(_views(ctx.device))
    poisoned = _child(_POISON_CHILD, ctx.device) if ctx.cuda else None
    return {"device": ctx.device, "healthy": healthy, "poisoned": poisoned}


def _d_metadata(ev: dict[str, Any]) -> Decision:
    h, p = ev["healthy"], ev.get("poisoned")
    if h["errors"]:
        return CONFIRMED, f"{len(h['errors'])} of {h['reads']} metadata reads raised: {h['errors'][0]}", ""
    for key in ("metadata_after_fault", "metadata_after_error"):
        e = ((p or {}).get(key) or {}).get("errors")
        if e:
            return CONFIRMED, f"after a device fault, {len(e)} metadata reads raised: {e[0]}", ""
    base = (
        f"{h['reads']} reads of .device/.shape/.dtype/.stride()/.is_contiguous() on strided, misaligned and "
        f"stride-0 views raised nothing and dispatched {h['dispatched_ops']} aten ops (metadata lives on the host)"
    )
    if h["dispatched_ops"]:
        return UNTESTABLE, base + "; a read that dispatches an op could launch a kernel: rerun on CUDA", _ANY_CUDA
    if p is None:
        return UNTESTABLE, base + "; a misaligned-address error exists only on CUDA", _ANY_CUDA
    if p.get("child_failed") or not p.get("fault_triggered"):
        return (
            UNTESTABLE,
            base + f"; but no device fault could be produced to poison the context "
            f"({p.get('child_failed') or p.get('launch_error') or 'the fault did not surface'})",
            _ANY_CUDA,
        )
    n = p["metadata_after_fault"]["reads"] + (p.get("metadata_after_error") or {}).get("reads", 0)
    sticky = " (sticky: later launches fail too)" if p.get("sticky") else ""
    return (
        REFUTED,
        base + f"; after a real fault ({p['fault']}) {n} more reads, before and after the error was "
        f"reported, raised nothing; the error surfaced at {p['surfaced_at']}: {p['error']}{sticky} -- the line "
        "that shows the error is the first synchronising or launching call after the faulty kernel, not the "
        "metadata read",
        "",
    )


# 2. .contiguous() makes fp8_linear_forward safe

_FIXED_OPS = ("legacy.user_fixed", "legacy.user_fixed.scaled_input")


def _m_contiguous_fp8(ctx: ClaimContext) -> dict[str, Any]:
    from harness.layouts import LayoutSpec, data_ptr_alignment, materialize

    spec = LayoutSpec((4, 64), "bfloat16", offset=1)
    x = materialize(spec, torch.randn(spec.shape), device=ctx.device)
    y = x.contiguous()
    misaligned = {
        "is_contiguous": x.is_contiguous(),
        "contiguous_returns_self": y is x,
        "alignment_before": data_ptr_alignment(x),
        "alignment_after": data_ptr_alignment(y),
    }
    sweeps = {op: _run_cases(ctx, op) for op in (*_FIXED_OPS, "legacy.wanvideo_late2025")}
    return {"misaligned_contiguous_view": misaligned, "sweeps": sweeps}


def _d_contiguous_fp8(ev: dict[str, Any]) -> Decision:
    fixed = {op: ev["sweeps"][op] for op in _FIXED_OPS if op in ev["sweeps"]}
    if not any(s.get("available") for s in fixed.values()):
        why = "; ".join(f"{op}: {s.get('reason')}" for op, s in fixed.items())
        return UNTESTABLE, f"the forwards cannot run here ({why})", _FP8_GPU
    m = ev["misaligned_contiguous_view"]
    note = (
        f" (and .contiguous() of a contiguous view whose pointer is {m['alignment_before']}-byte aligned returns "
        f"{'the same tensor' if m['contiguous_returns_self'] else 'a copy'}, still {m['alignment_after']}-byte "
        "aligned)"
    )
    bad = _failing(fixed)
    before = ev["sweeps"].get("legacy.wanvideo_late2025", {})
    if before.get("available"):
        note += "; before the fix (wanvideo_late2025): " + (
            "; ".join(e.removeprefix(": ") for e in _failing({"": before})) or "no failures"
        )
    if bad:
        return REFUTED, "with input.contiguous() first the forward still fails: " + "; ".join(bad) + note, ""
    n = sum(s.get("cases_run", 0) for s in fixed.values())
    return CONFIRMED, f"all {n} cases of the fixed forward passed in every layout class" + note, ""


# 3. every x.flatten(2) before the output projection needs .contiguous()

_FLATTEN_LAYOUTS = ("nhd_contiguous", "hnd_output_transposed_back", "sequence_major", "misaligned_2b")


def _attn_output(kind: str, device: str, b: int = 2, s: int = 7, h: int = 2, d: int = 32) -> torch.Tensor:
    """A (B, S, H, d) attention output laid out as model code leaves it."""
    from harness.layouts import LayoutSpec, ViewOp, materialize

    vals = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(1))
    spec = {
        "nhd_contiguous": LayoutSpec.contiguous((b, s, h, d), "bfloat16"),
        "hnd_output_transposed_back": LayoutSpec(
            (b, s, h, d), "bfloat16", base_shape=(b, h, s, d), views=(ViewOp.transpose(1, 2),)
        ),
        "sequence_major": LayoutSpec((b, s, h, d), "bfloat16", perm=(1, 0, 2, 3)),
        "misaligned_2b": LayoutSpec((b, s, h, d), "bfloat16", offset=1),
    }[kind]
    return materialize(spec, vals, device=device)


def _flatten_ops(device: str) -> dict[str, Any]:
    from harness.quant.legacy import LEGACY_FORWARDS, legacy_op
    from harness.quant.linear import fp8_linear, scaled_mm_available

    ops: dict[str, Any] = {"fp8_linear": fp8_linear}
    for name in LEGACY_FORWARDS:
        if scaled_mm_available(device, mixed=name == "wanvideo_early2025")[0]:
            ops[f"legacy.{name}"] = legacy_op(name)
    return ops


def _m_flatten(ctx: ClaimContext) -> dict[str, Any]:
    if ctx.cuda:
        return _child(
            "import json, sys; from harness.claims import _flatten_probe; "
            "print(json.dumps(_flatten_probe(sys.argv[1])))",
            ctx.device,
        )
    return _flatten_probe(ctx.device)


def _flatten_probe(device: str) -> dict[str, Any]:
    """Each op on ``x.flatten(2)`` and on ``x.flatten(2).contiguous()`` for each attention-output layout."""
    from harness.quant.convert import quantize_weight

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).to(device)
    w8, sw = quantize_weight(w)
    rows = []
    for kind in _FLATTEN_LAYOUTS:
        for op_name, op in _flatten_ops(device).items():
            x = _attn_output(kind, device)
            f = x.flatten(2)
            row = {
                "layout": kind,
                "op": op_name,
                "flatten_is_view": f.data_ptr() == x.data_ptr(),
                "flatten_contiguous": f.is_contiguous(),
            }
            outs = {}
            for label, inp in (("as_is", f), ("contiguous", f.contiguous())):
                try:
                    outs[label] = op(inp, w8, weight_scale=sw, out_dtype=torch.bfloat16)
                except Exception as e:  # noqa: BLE001 - a rejection is the evidence
                    outs[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            a, c = outs["as_is"], outs["contiguous"]
            row["as_is_error"] = a if isinstance(a, str) else None
            row["contiguous_error"] = c if isinstance(c, str) else None
            row["bitwise_equal"] = (
                isinstance(a, torch.Tensor)
                and isinstance(c, torch.Tensor)
                and torch.equal(a.float().nan_to_num(7), c.float().nan_to_num(7))
            )
            rows.append(row)
    return {"rows": rows}


def _needs(row: dict[str, Any]) -> bool:
    return row["as_is_error"] is not None or (row["contiguous_error"] is None and not row["bitwise_equal"])


def _d_flatten(ev: dict[str, Any]) -> Decision:
    rows = ev.get("rows")
    if not rows:
        return UNTESTABLE, f"the probe did not run ({ev.get('child_failed', 'no ops')})", _ANY_CUDA
    needed = sorted({(r["layout"], r["op"]) for r in rows if _needs(r)})
    free = sorted({r["layout"] for r in rows} - {lay for lay, _ in needed})
    ops = sorted({r["op"] for r in rows})
    if free:
        views = [r["layout"] for r in rows if r["flatten_is_view"] and not r["flatten_contiguous"]]
        return (
            REFUTED,
            f"for {', '.join(free)} every output projection ({', '.join(ops)}) gave bitwise the same "
            "result with and without .contiguous()"
            + (f"; needed only for {needed}" if needed else "")
            + (
                "; flatten(2) is a non-contiguous view only for "
                + ", ".join(sorted(set(views)))
                + " and those still gave identical results"
                if views and not needed
                else ""
            ),
            "",
        )
    return CONFIRMED, f"every attention-output layout needed .contiguous() for some projection: {needed}", ""


# 4. Sage 3 needs q.contiguous().transpose(1,2).contiguous()

_SAGE3_UPSTREAM = (
    "upstream (thu-ml/SageAttention #357, fixed by PR #370) attributes sageattn3_blackwell's "
    "misaligned address on sm_120 to the kernel's TMA descriptors, not to the caller's layout"
)


def _m_sage3(ctx: ClaimContext) -> dict[str, Any]:
    from harness.layouts import LayoutSpec, ViewOp, materialize
    from harness.quant.backends import get_backend

    b, h, s, d = 1, 2, 128, 128
    g = torch.Generator().manual_seed(3)
    vals = [torch.randn(b, h, s, d, generator=g) for _ in range(3)]
    nhd = LayoutSpec((b, h, s, d), "bfloat16", base_shape=(b, s, h, d), views=(ViewOp.transpose(1, 2),))
    specs = {
        "hnd_contiguous": LayoutSpec.contiguous((b, h, s, d), "bfloat16"),
        "nhd_transposed_view": nhd,
        "misaligned_2b": LayoutSpec((b, h, s, d), "bfloat16", offset=1),
    }
    emu = get_backend("emu.sage3")
    outs = {}
    for name, spec in specs.items():
        q, k, v = (materialize(spec, t, device=ctx.device) for t in vals)
        outs[name] = emu.run(q, k, v, "HND").float()
        if name == "nhd_transposed_view":  # the write-up's recipe on the same NHD tensors
            rq, rk, rv = (t.transpose(1, 2).contiguous().transpose(1, 2).contiguous() for t in (q, k, v))
            outs["writeup_recipe"] = emu.run(rq, rk, rv, "HND").float()
    ref = outs["hnd_contiguous"]
    emulation = {
        n: {"bitwise_equal_to_contiguous": torch.equal(o, ref), "max_abs_diff": float((o - ref).abs().max())}
        for n, o in outs.items()
    }
    ok, why = get_backend("sage3").available(ctx.device)
    real: dict[str, Any] = {"available": ok, "reason": why}
    if ok:
        real["sweep"] = _run_cases(ctx, "attn.sage3")
    return {"emulation": emulation, "real": real}


#: verdicts that say nothing about the layout: Sage 3 writes its k in place (the key mean) in every layout
_NOT_LAYOUT = ("pass", "input_mutation")


def _d_sage3(ev: dict[str, Any]) -> Decision:
    emu = ev["emulation"]
    same = all(e["bitwise_equal_to_contiguous"] for e in emu.values())
    emu_line = (
        f"the emulation of Sage 3's NVFP4 math gives bitwise the same output for all {len(emu)} layouts "
        "(incl. the recipe): the format itself does not care about the layout"
        if same
        else "the emulation differs between layouts: "
        + ", ".join(f"{n} {e['max_abs_diff']:.3g}" for n, e in emu.items())
    )
    real = ev["real"]
    if not real["available"]:
        return UNTESTABLE, f"the kernel cannot run here ({real['reason']}); {emu_line}; {_SAGE3_UPSTREAM}", _BLACKWELL
    sweep = real["sweep"]
    by = sweep.get("by_class", {})
    recipe_ok = all(v in _NOT_LAYOUT for v in by.get("hnd_contiguous", {"none": 1}))
    others = sorted(n for n, c in by.items() if n != "hnd_contiguous" and any(v not in _NOT_LAYOUT for v in c))
    if not recipe_ok:
        return REFUTED, f"the recipe's layout (contiguous HND) itself fails: {by.get('hnd_contiguous')}; {emu_line}", ""
    if not others:
        return REFUTED, f"not needed: every layout class passed ({sweep['cases_run']} cases); {emu_line}", ""
    return CONFIRMED, f"contiguous HND passes while {', '.join(others)} fail; {emu_line}", ""


# 5. int(x.shape[0]) makes shape access safe


def _m_int_shape(ctx: ClaimContext) -> dict[str, Any]:
    views = _views(ctx.device)
    same = all(int(t.shape[0]) is t.shape[0] or int(t.shape[0]) == t.shape[0] for _, t in views)
    return {"reads": _read_all(views), "int_equals_shape0": same, "views": len(views)}


def _d_int_shape(ev: dict[str, Any]) -> Decision:
    types = ev["reads"]["shape0_types"]
    if set(types) != {"int"}:
        return UNTESTABLE, f"x.shape[0] had types {types} here (traced or symbolic?): rerun in eager mode", _ANY_CUDA
    if ev["reads"]["errors"]:
        return CONFIRMED, f"shape reads raised: {ev['reads']['errors'][0]}", ""
    n = sum(types.values())
    why = (
        f"x.shape[0] already is a Python int (in {n} of {n} reads on {ev['views']} strided/misaligned views), "
        f"int() returns the same value, and the reads dispatched {ev['reads']['dispatched_ops']} ops: nothing "
        "for int() to make safe (see the metadata claim)"
    )
    return REFUTED, why, ""


# 6. the ComfyUI-style forward is the safe reference implementation

_COMFY_OPS = ("legacy.comfyui", "legacy.comfyui.scaled_input")


def _scaled_mm_returns(device: str) -> Optional[str]:
    """What ``torch._scaled_mm`` returns here ("Tensor" or "tuple"), or None when it cannot run."""
    from harness.quant.linear import scaled_mm_available

    if not scaled_mm_available(device)[0]:
        return None
    a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    return type(torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)).__name__


def _m_comfy(ctx: ClaimContext) -> dict[str, Any]:
    return {
        "sweeps": {op: _run_cases(ctx, op) for op in (*_COMFY_OPS, "fp8_linear")},
        "scaled_mm_returns": _scaled_mm_returns(ctx.device),
        "torch": torch.__version__,
    }


def _d_comfy(ev: dict[str, Any]) -> Decision:
    comfy = {op: ev["sweeps"][op] for op in _COMFY_OPS}
    if not any(s.get("available") for s in comfy.values()):
        return UNTESTABLE, "; ".join(f"{op}: {s.get('reason')}" for op, s in comfy.items()), _FP8_GPU
    bad = _failing(comfy)
    robust = ev["sweeps"].get("fp8_linear", {})
    ref = f"; the harness's fp8_linear: {robust.get('verdicts')}" if robust.get("available") else ""
    if ev.get("scaled_mm_returns") == "Tensor":
        ref += f"; its tuple unwrap is dead code on torch {ev.get('torch')} (_scaled_mm returns a Tensor)"
    if bad:
        return REFUTED, "the ComfyUI-style forward fails: " + "; ".join(bad) + ref, ""
    n = sum(s.get("cases_run", 0) for s in comfy.values())
    return CONFIRMED, f"all {n} cases passed in every layout and value class" + ref, ""


# 7. .contiguous() is almost free on a contiguous tensor


def _m_contiguous_free(ctx: ClaimContext) -> dict[str, Any]:
    from harness.bench import host_time, time_fn
    from harness.quant.convert import quantize_weight
    from harness.quant.legacy import legacy_op
    from harness.quant.linear import scaled_mm_available

    ok, why = scaled_mm_available(ctx.device)
    if not ok:
        return {"unavailable": f"the FP8 forward cannot run here: {why}"}
    m, k, n = (32760, 5120, 5120) if ctx.cuda else (64, 256, 256)
    x = torch.randn(m, k, device=ctx.device).to(torch.bfloat16)
    w8, sw = quantize_weight(torch.randn(n, k, device=ctx.device))
    fixed = legacy_op("user_fixed")  # the forward the write-up puts .contiguous() in front of
    rec = _OpRecorder()
    with rec:
        y = x.contiguous()
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.cuda else (lambda: None)
    sync()
    r = ctx.timing_rounds if ctx.cuda else min(ctx.timing_rounds, 5)
    t_contig = host_time(lambda: x.contiguous(), warmup=3, rounds=r)
    fwd = time_fn(lambda: fixed(x, w8, weight_scale=sw), ctx.device, warmup=1, rounds=r)
    xt = x.t()
    copy = time_fn(lambda: xt.contiguous(), ctx.device, warmup=3, rounds=r)
    import statistics

    return {
        "shape": [m, k],
        "returns_self": y is x,
        "same_data_ptr": y.data_ptr() == x.data_ptr(),
        "dispatched_ops": rec.ops,
        "contiguous_ms": statistics.median(t_contig),
        "contiguous_timer": "perf_counter",
        "forward_ms": fwd.median,
        "forward_timer": fwd.timer,
        "noncontiguous_copy_ms": copy.median,
        "ratio": statistics.median(t_contig) / fwd.median,
        "target": OVERHEAD_TARGET,
    }


def _d_contiguous_free(ev: dict[str, Any]) -> Decision:
    if "unavailable" in ev:
        return UNTESTABLE, ev["unavailable"], _FP8_GPU
    if not ev["returns_self"] or ev["dispatched_ops"]:
        return (
            REFUTED,
            (
                f"on a contiguous tensor .contiguous() returned {'self' if ev['returns_self'] else 'a copy'} "
                f"and dispatched {ev['dispatched_ops']}"
            ),
            "",
        )
    line = (
        f"returns self (no copy, no op dispatched); {ev['contiguous_ms'] * 1e3:.2f} us of host time a call = "
        f"{ev['ratio']:.2%} of the FP8 linear it precedes ({ev['forward_ms']:.3f} ms, {ev['shape']}); a "
        f"non-contiguous input is copied ({ev['noncontiguous_copy_ms']:.3f} ms)"
    )
    if ev["ratio"] <= ev["target"]:
        return CONFIRMED, line + f", within the {ev['target']:.0%} overhead target", ""
    return REFUTED, line + f", above the {ev['target']:.0%} overhead target", ""


# 8. "no CUDA alignment error, normal video, no slowdown, normal memory"


def _fwd_cost(device: str, rounds: int) -> dict[str, Any]:
    """Time and peak memory of the fixed (user_fixed) and unfixed (late 2025) forwards at a Wan-14B q/k/v/o shape."""
    from harness.bench import interleaved_time
    from harness.quant.convert import quantize_weight
    from harness.quant.legacy import get_legacy, make_fp8_module

    x = torch.randn(1, 32760, 5120, device=device).to(torch.bfloat16)
    w8, sw = quantize_weight(torch.randn(5120, 5120, device=device))
    mod = make_fp8_module(w8, sw)
    forwards = {name: get_legacy(name).forward for name in ("user_fixed", "wanvideo_late2025")}
    fns = {name: (lambda f=f: f(mod, torch.bfloat16, x)) for name, f in forwards.items()}
    t = interleaved_time(fns, device, warmup=3, rounds=rounds)
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - base
    return {
        "median_ms": {n: v.median for n, v in t.items()},
        "peak_extra_bytes": peaks,
        "input_bytes": x.numel() * x.element_size(),
    }


def _m_after(ctx: ClaimContext) -> dict[str, Any]:
    from harness.quant.blocks import QuantizedBlockConfig
    from harness.scenarios import run_scenario

    ev: dict[str, Any] = {"device": ctx.device}
    ev["alignment"] = _run_cases(ctx, "legacy.user_fixed") if ctx.cuda else None
    cfg = QuantizedBlockConfig(
        name="fixed-forward-block",
        linear="legacy.user_fixed",
        attention="sdpa",
        description="3-D input block, every quantized linear through the user's fixed forward",
    )
    ev["video"] = run_scenario(cfg, ctx.device).to_dict()
    ev["cost"] = _fwd_cost(ctx.device, ctx.timing_rounds) if ctx.cuda else None
    return ev


def _d_after(ev: dict[str, Any]) -> Decision:
    parts: dict[str, tuple[str, str]] = {}
    a = ev.get("alignment")
    if a is None:
        parts["no CUDA alignment error"] = (UNTESTABLE, "CPU kernels have no alignment faults")
    elif not a.get("available"):
        parts["no CUDA alignment error"] = (UNTESTABLE, a.get("reason", ""))
    else:
        faults = a["verdicts"].get("device_fault", 0)
        mis = a.get("misaligned_messages", 0)
        parts["no CUDA alignment error"] = (
            REFUTED if faults or mis else CONFIRMED,
            (
                f"{faults} device faults and {mis} 'misaligned' errors in {a['cases_run']} cases of the fixed forward "
                "over every layout class"
            ),
        )
    v = ev["video"]
    vs = {"pass": CONFIRMED, "fail": REFUTED}.get(v["status"], UNTESTABLE)
    parts["normal video"] = (vs, f"a Wan block with the fixed forward: {v['reason']}")
    c = ev.get("cost")
    if c is None:
        parts["no slowdown"] = (UNTESTABLE, "CPU timings say nothing about the CUDA forward")
        parts["normal memory"] = (UNTESTABLE, "CUDA peak memory needs a CUDA device")
    else:
        fx, un = c["median_ms"]["user_fixed"], c["median_ms"]["wanvideo_late2025"]
        slow = fx / un - 1
        parts["no slowdown"] = (
            CONFIRMED if slow <= OVERHEAD_TARGET else REFUTED,
            f"fixed {fx:.3f} ms vs unfixed {un:.3f} ms ({slow:+.1%}; target {OVERHEAD_TARGET:.0%})",
        )
        extra = c["peak_extra_bytes"]["user_fixed"] - c["peak_extra_bytes"]["wanvideo_late2025"]
        parts["normal memory"] = (
            CONFIRMED if extra <= c["input_bytes"] else REFUTED,
            (
                f"peak {extra / 2**20:+.1f} MiB against the unfixed forward (allowed: one copy "
                f"of the input, {c['input_bytes'] / 2**20:.0f} MiB)"
            ),
        )
    why = "; ".join(f"{k}: {s} ({w})" for k, (s, w) in parts.items())
    statuses = {s for s, _ in parts.values()}
    if REFUTED in statuses:
        return REFUTED, why, ""
    if statuses == {CONFIRMED}:
        return CONFIRMED, why, ""
    return UNTESTABLE, why, _FP8_GPU


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "metadata-read",
        "reading input.device (or .shape, .dtype) of a non-contiguous CUDA tensor can raise a misaligned-address error",
        _m_metadata,
        _d_metadata,
    ),
    Claim(
        "contiguous-first",
        "calling input.contiguous() first makes fp8_linear_forward safe",
        _m_contiguous_fp8,
        _d_contiguous_fp8,
    ),
    Claim(
        "flatten-contiguous",
        "every x.flatten(2) before an output projection needs .contiguous()",
        _m_flatten,
        _d_flatten,
    ),
    Claim(
        "sage3-transpose",
        "q.contiguous().transpose(1,2).contiguous() is what Sage3 FP4/FP8 attention needs",
        _m_sage3,
        _d_sage3,
    ),
    Claim("int-shape", "int(x.shape[0]) makes shape access safe", _m_int_shape, _d_int_shape),
    Claim(
        "comfyui-reference",
        "the QwenImage/ComfyUI-style forward (clamp, scale_input, tuple output, 2-D "
        "unsqueeze) is the safe reference implementation",
        _m_comfy,
        _d_comfy,
    ),
    Claim(
        "contiguous-free",
        ".contiguous() is almost free when the tensor is already contiguous",
        _m_contiguous_free,
        _d_contiguous_free,
    ),
    Claim(
        "after-fixes",
        "after these fixes: no CUDA alignment error, normal video, no slowdown, normal memory",
        _m_after,
        _d_after,
    ),
)


def run_claim(claim: Claim, ctx: ClaimContext) -> ClaimResult:
    """Measure and decide one claim; an experiment that raises is "not testable here" naming the error."""
    try:
        ev = claim.measure(ctx)
        status, why, settle = claim.decide(ev)
    except Exception as e:  # noqa: BLE001 - one broken experiment must not hide the others
        ev, status, settle = {}, UNTESTABLE, _ANY_CUDA
        why = f"the experiment raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    cases = sorted({p for s in _walk_sweeps(ev) for p in s.get("case_files", [])})
    return ClaimResult(claim.id, claim.text, status, why, settle, ctx.device, ev, cases)


def _walk_sweeps(ev: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(ev, dict):
        if "case_files" in ev:
            out.append(ev)
        for v in ev.values():
            out.extend(_walk_sweeps(v))
    return out


def run_claims(ctx: ClaimContext, ids: Optional[Sequence[str]] = None) -> list[ClaimResult]:
    """Every claim (or those in ``ids``) on ``ctx.device``."""
    known = {c.id for c in CLAIMS}
    unknown = sorted(set(ids or ()) - known)
    if unknown:
        raise ValueError(f"unknown claim id(s) {unknown}; known: {sorted(known)}")
    return [run_claim(c, ctx) for c in CLAIMS if not ids or c.id in ids]


# ----------------------------------------------------------------------------------- output


def _json_default(o: Any) -> Any:
    return str(o)


def format_results(
    results: Sequence[ClaimResult],
    fmt: str = "text",
    *,
    env: Optional[dict[str, Any]] = None,
    scenarios: Optional[Sequence[Any]] = None,
) -> str:
    """The claims (and scenarios) table as text, Markdown (for an issue thread), HTML or JSON."""
    env = env or {}
    scen = [s.to_dict() for s in scenarios or ()]
    if fmt == "json":
        return json.dumps(
            {"env": env, "claims": [r.to_dict() for r in results], "scenarios": scen}, indent=2, default=_json_default
        )
    where = ", ".join(f"{k} {env[k]}" for k in ("device", "capability", "torch", "cuda", "sageattention") if env.get(k))
    rows = [
        (
            r.claim,
            r.status,
            r.why + (f". Settled by: {r.settle}." if r.settle else ""),
            ", ".join(r.cases[:3]) + (f" (+{len(r.cases) - 3})" if len(r.cases) > 3 else ""),
        )
        for r in results
    ]
    srows = [
        (s["name"], s["status"], s["reason"] + ("; " + "; ".join(s["substitutions"]) if s["substitutions"] else ""))
        for s in scen
    ]
    if fmt == "html":
        esc = html.escape
        out = [
            f"<h3>The write-up's claims, measured</h3><p>{esc(where)}</p>",
            "<table><tr><th>claim</th><th>verdict</th><th>evidence</th><th>case files</th></tr>",
        ]
        out += [
            f"<tr><td>{esc(a)}</td><td><b>{esc(b)}</b></td><td>{esc(c)}</td><td>{esc(d)}</td></tr>"
            for a, b, c, d in rows
        ]
        out.append("</table>")
        if srows:
            out.append("<h3>Scenarios</h3><table><tr><th>scenario</th><th>verdict</th><th>evidence</th></tr>")
            out += [f"<tr><td>{esc(a)}</td><td><b>{esc(b)}</b></td><td>{esc(c)}</td></tr>" for a, b, c in srows]
            out.append("</table>")
        return "\n".join(out)
    if fmt == "md":

        def cell(t: str) -> str:
            return t.replace("|", "\\|").replace("\n", " ")

        out = [
            "### The write-up's claims, measured",
            "",
            f"Measured on: {where}",
            "",
            "| claim | verdict | evidence | case files |",
            "|---|---|---|---|",
        ]
        out += [f"| {cell(a)} | **{b}** | {cell(c)} | {cell(d)} |" for a, b, c, d in rows]
        if srows:
            out += [
                "",
                "### The write-up's scenarios (quantized Wan blocks vs the emulation of their formats)",
                "",
                "| scenario | verdict | evidence |",
                "|---|---|---|",
            ]
            out += [f"| {cell(a)} | **{b}** | {cell(c)} |" for a, b, c in srows]
        return "\n".join(out) + "\n"
    out = [f"claims measured on {where}"]
    for a, b, c, d in rows:
        out += [f"[{b}] {a}", f"    {c}"] + ([f"    cases: {d}"] if d else [])
    for a, b, c in srows:
        out += [f"[{b}] scenario {a}", f"    {c}"]
    return "\n".join(out) + "\n"


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    from harness.runner.pool import probe_devices

    found = probe_devices()
    if device == "auto":
        return found[0] if found else "cpu"
    if device == "cuda":
        if not found:
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
        return found[0]
    if device.startswith("cuda:") and device in found:
        return device
    raise ValueError(f"--device {device!r}: use auto, cpu, cuda or one of {found or 'no GPUs here'}")


def _write(
    out: Path,
    results: Sequence[ClaimResult],
    env: dict[str, Any],
    scen: Optional[Sequence[Any]],
    fmts: Sequence[str] = ("json", "md", "html"),
) -> None:
    """Write the tables into ``out`` (each file replaced atomically, so a kill never leaves half a file)."""
    for fmt in fmts:
        atomic_write_text(out / f"claims.{fmt}", format_results(results, fmt, env=env, scenarios=scen))


def _cmd(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(
            f"error: --out {out} exists and is not an empty directory; pick a new one (nothing was overwritten)",
            file=sys.stderr,
        )
        return 2
    if args.per_class < 1:
        print(f"error: --per-class {args.per_class}: pass an integer >= 1", file=sys.stderr)
        return 2
    try:
        device = _resolve_device(args.device)
        ids = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        selected = [c for c in CLAIMS if not ids or c.id in ids]
        unknown = sorted(set(ids or ()) - {c.id for c in CLAIMS})
        if unknown:
            raise ValueError(f"unknown claim id(s) {unknown}; known: {sorted(c.id for c in CLAIMS)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = ClaimContext(device=device, out=out, per_class=args.per_class)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    from harness.env import collect_env_subprocess

    env = collect_env_subprocess() if device != "cpu" else {"device": "cpu", "torch": torch.__version__}
    results: list[ClaimResult] = []
    for claim in selected:
        results.append(run_claim(claim, ctx))
        if out is not None:  # an interrupted run keeps every claim measured so far
            _write(out, results, env, None, ("json",))
    scen = None
    if args.scenarios:
        from harness.scenarios import run_scenarios

        scen = run_scenarios(device)
    sys.stdout.write(format_results(results, args.format, env=env, scenarios=scen))
    if out is not None:
        _write(out, results, env, scen)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "claims",
        help="test the write-up's claims on this device: confirmed / refuted / not testable here",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (the first GPU, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--out", help="write claims.{json,md,html} and the failing cases' files here (a new or empty dir)")
    p.add_argument("--format", choices=("text", "md", "html", "json"), default="text", help="what to print")
    p.add_argument("--only", help="comma-separated claim ids: " + ", ".join(c.id for c in CLAIMS))
    p.add_argument("--per-class", type=int, default=2, help="cases per layout class in the forwards' sweeps")
    p.add_argument(
        "--scenarios",
        action="store_true",
        help="also run the write-up's scenarios as quantized Wan blocks judged against the emulation of their formats",
    )
    p.set_defaults(func=_cmd)
