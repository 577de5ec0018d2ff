"""Operand-wise, coverage-guided exploration of one op's layouts, shapes and values (issue 16).

The layout classes of :mod:`harness.targets.layout_classes` are a fixed grid: they perturb the swept
tensor only (q, k and v together), at a few comfortable sizes.  This module draws cases the other
way: **every tensor operand is its own axis**.  A case is a :class:`Genome` -- sizes, a list of
:class:`Perturbation` records (one operand, one layout property each) and :class:`ValuePick`
records (one operand's values) -- turned into a :class:`~harness.cases.Case` by
:func:`build_case` through the target's own ``case_from_draw`` (so the target's fixed inputs,
parameters and plug-in adaptations stay what they are) and the operands it declares
(``target.operands(case)``, :class:`harness.targets.base.Operand`).

Layout properties (``Perturbation.kind``), each on one operand, expressed with
:class:`~harness.layouts.LayoutSpec`'s own fields and view ops:

- ``align`` (a): the data pointer aligned to exactly 1/2/4/8 bytes, or 16 (a non-zero aligned offset);
- ``checkpoint`` (bytes): a view into a larger byte buffer at an arbitrary byte offset, as a
  checkpoint loader hands a weight over (offset rounded up to whole elements, a row of slack after);
- ``step`` (dim, s): every s-th element along one dim -- size-1 dims included (a stride other than
  the packed one, which ``is_contiguous()`` ignores); on the last dim: last stride != 1;
- ``broadcast`` (dim): stride 0 along one dim (values constant there);
- ``perm`` (order): the memory order of the dims permuted (a transpose when two are swapped);
- ``pad`` (dim, p): the allocated extent of one dim padded (on the last dim: a padded leading dim);
- ``packed`` (dim, parts, index): chunk ``index`` of a buffer ``parts`` times wider along one dim
  (qkv / kv projections, gate/up weights);
- ``slice`` (dim, start, extra): a narrow of a buffer ``extra`` wider along one dim (K-slices);
- ``large_offset`` (): the view moved so its largest element offset is >= 2**31 (32-bit index
  arithmetic); rare, off by default, sized from the device's free memory and skipped with a
  reason where it does not fit (:func:`large_offset_plan`).

Sizes sit around kernel tiles (:data:`LINEAR_SIZES`, :data:`ATTENTION_SIZES`: multiples of 16/32/64/128
and one below/above, head dims the target declares plus 96 and unsupported ones, batch and heads of
1 and more, in-features that are not multiples of 64).  Values: the recipes of :mod:`harness.values`,
structured along one axis of one operand (an all-zero, constant or outlier token, channel, head,
batch entry, or 64/128-token block), FP8 edges, subnormals; NaN/inf only with ``allow_nonfinite``.  A
scalar operand (a linear's ``weight_scale`` / ``input_scale``) keeps the value its target gives it: as a
0-d tensor it is perturbed in its pointer only (``align``, ``checkpoint``).

The search (:func:`explore`) first sweeps (:func:`sweep_genomes`, interleaved with the rest): one property of one
operand at a time, every operand x every layout kind and structured value, at the default sizes and the other
rank / memory layout -- a random draw perturbs several operands at once, so a single (operand, property) pair is
rare among them.  It is seeded, reproducible (``random.Random(f"explore|{op}|{seed}")``), it
runs each drawn case through ``run(case) -> Result`` (``lambda c: run_case(c, "cpu")`` in-process,
``lambda c: pool.submit(c).result()`` with a :class:`~harness.runner.pool.WorkerPool`), keeps every
draw that reaches a new (coverage key, verdict) pair and mutates kept draws further.  The coverage
key is pluggable: :func:`cpu_coverage` (default: which operand properties a draw perturbed) or
:func:`kernel_coverage` (the GPU hook: the device kernels a case launched, read from
``result.metrics["kernels"]`` -- the profiler's kernel names, which the runner records for explored cases on
CUDA; without them the CPU key is used).  A score pushes each op toward its worst drift: a case's drift ratio
(``metrics["ratio"]`` = error / allowed) is its score, the best-scoring kept draw is the parent of half
the mutations, and a mutant that beats the best is kept even when its coverage key is not new.  This is
``hypothesis.target()``'s idea run in the loop itself: ``target()`` only works inside a ``@given`` test
whose engine owns every draw, and the matrix is a production driver with a pool and a time budget
(the same reason the layout classes draw from a ``random.Random``).

Every non-pass case (a verdict outside pass/unavailable, and ``rejected`` only for targets with
``accepts_all_layouts``) is reduced (:func:`minimize_genome`, the greedy keep-the-verdict loop of
:mod:`harness.runner.minimize` applied to the genome): whole operands' perturbations dropped one
operand at a time, then single perturbations and value picks, then each size moved to its default or
to smaller tile-boundary sizes.  The minimal draw gives the failure signature (op, verdict, operand,
property), e.g. ``("attn.x", "layout_noninvariance", "v", "v: pointer aligned to 2 B")``; each
signature is reported once (:class:`Finding`) with its minimal case and the count of raw cases under
it.  A raw case whose verdict and properties contain an already minimized signature's is counted
under it without being reduced again.

Use from the matrix::

    from harness.explore import explore
    res = explore(target, run, seed=0, budget_cases=200, budget_s=60.0)
    res.to_dict()   # JSON-able: findings (signature, count, minimal case), worst drift, counts

"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.cases import Case
from harness.layouts import LayoutError, LayoutSpec, ViewOp
from harness.values import ValueError_, ValueSpec
from harness.verdicts import Result, Verdict

__all__ = [
    "ATTENTION_SIZES",
    "EXPLORE_CLASS",
    "LARGE_OFFSET",
    "LAYOUT_KINDS",
    "LINEAR_SIZES",
    "BuiltCase",
    "ExploreResult",
    "ExploreStopped",
    "Finding",
    "Genome",
    "Perturbation",
    "ValuePick",
    "CLASS_FAMILIES",
    "build_case",
    "family_of",
    "reproduces",
    "cpu_coverage",
    "draw_genome",
    "explore",
    "free_device_bytes",
    "kernel_coverage",
    "large_offset_plan",
    "minimize_genome",
    "mutate",
    "signature",
    "size_class",
    "sweep_genomes",
]

#: ``case.params["layout_class"]`` of every explored case; its genome is in ``case.params["explore"]``.
EXPLORE_CLASS = "explore"
#: The largest element offset a ``large_offset`` draw reaches (past int32 index arithmetic).
LARGE_OFFSET = 2**31

LAYOUT_KINDS = ("align", "checkpoint", "step", "broadcast", "perm", "pad", "packed", "slice")
_SCALAR_KINDS = ("align", "checkpoint")
_ALIGNMENTS = (1, 2, 4, 8, 16)

#: Linear sizes, each list simplest first (the first entry is the default a minimal case returns to).
LINEAR_SIZES: dict[str, tuple[int, ...]] = {
    "rank": (2, 3),
    "batch": (1, 2, 3),
    "tokens": (16, 1, 2, 15, 17, 31, 32, 33, 63, 64, 65, 77, 127, 128, 129),
    "k": (64, 16, 32, 48, 63, 65, 80, 96, 100, 112, 127, 128, 129, 160, 192, 255, 256),
    "n": (64, 16, 32, 48, 63, 65, 96, 127, 128, 129),
}
#: Attention sizes; ``head_dim`` adds the target's declared head dims (first: its smallest).
ATTENTION_SIZES: dict[str, tuple[Any, ...]] = {
    "layout": ("HND", "NHD"),
    "batch": (1, 2, 3),
    "heads": (2, 1, 3, 4),
    "seq_q": (64, 1, 15, 16, 17, 31, 32, 33, 63, 65, 77, 127, 128, 129, 257),
    "seq_k": (64, 1, 15, 16, 17, 31, 32, 33, 63, 65, 77, 127, 128, 129, 257),
    "head_dim": (64, 96, 128, 32, 80, 256),
}


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Perturbation:
    """One layout property of one operand: ``kind`` (see the module doc) and its integer ``args``.

    Dims are counted from the end (-1 = the last dim) so a record keeps its meaning when a size
    changes the rank; :meth:`prop` names the dim as it is in the built case.
    """

    operand: str
    kind: str
    args: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS + ("large_offset",):
            raise ValueError(f"perturbation kind {self.kind!r} unknown; use one of {LAYOUT_KINDS + ('large_offset',)}")
        object.__setattr__(self, "args", tuple(int(a) for a in self.args))

    def to_dict(self) -> dict[str, Any]:
        return {"operand": self.operand, "kind": self.kind, "args": list(self.args)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Perturbation:
        return cls(str(d["operand"]), str(d["kind"]), tuple(d.get("args", ())))

    def prop(self, spec: LayoutSpec | None = None, axes: Sequence[str] = ()) -> str:
        """The property as a signature reads it, e.g. ``"v: pointer aligned to 2 B"``, ``"k: stride 0 on dim 2"``."""
        a, o = self.args, self.operand
        rank = spec.ndim if spec is not None else 0

        def dim(d: int) -> str:
            ab = d % rank if rank else d
            name = f" ({axes[ab]})" if 0 <= ab < len(axes) else ""
            one = " (size 1)" if spec is not None and rank and spec.shape[ab] == 1 else ""
            return f"dim {ab}{name}{one}"

        if self.kind == "align":
            return f"{o}: pointer aligned to {a[0]} B" if a[0] < 16 else f"{o}: non-zero 16 B-aligned offset"
        if self.kind == "checkpoint":
            isz = spec.itemsize if spec is not None else 1
            return f"{o}: view into a larger (checkpoint) buffer, pointer aligned to {_pow2(a[0] // isz * isz)} B"
        if self.kind == "step":
            return f"{o}: non-packed stride on {dim(a[0])}" + (" (last stride != 1)" if a[0] == -1 else "")
        if self.kind == "broadcast":
            return f"{o}: stride 0 on {dim(a[0])}"
        if self.kind == "perm":
            swapped = len(a) >= 2 and list(a) == list(range(len(a) - 2)) + [len(a) - 1, len(a) - 2]
            return f"{o}: last two dims transposed in memory" if swapped else f"{o}: memory order {tuple(a)}"
        if self.kind == "pad":
            return f"{o}: {dim(a[0])} padded" + (" (padded leading dimension)" if a[0] == -1 else "")
        if self.kind == "packed":
            return f"{o}: chunk of a packed buffer, {a[1]}x wider along {dim(a[0])}"
        if self.kind == "slice":
            return f"{o}: slice of a wider buffer along {dim(a[0])}"
        return f"{o}: largest element offset >= 2^31"


@dataclass(frozen=True)
class ValuePick:
    """One operand's values: a :mod:`harness.values` ``kind`` with ``params``; structured kinds along ``axis``."""

    operand: str
    kind: str
    axis: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"operand": self.operand, "kind": self.kind, "axis": self.axis, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValuePick:
        return cls(
            str(d["operand"]), str(d["kind"]), str(d.get("axis", "")), tuple(sorted(dict(d.get("params", {})).items()))
        )

    def prop(self) -> str:
        p = dict(self.params)
        if self.kind.endswith("_slice"):
            what = {"zero_slice": "all-zero", "constant_slice": "constant", "outlier_slice": "outlier"}[self.kind]
            n = int(p.get("length", 1))
            unit = f"{n}-{self.axis} block" if n > 1 else self.axis
            return f"{self.operand}: an {what} {unit}" if what[0] in "ao" else f"{self.operand}: a {what} {unit}"
        return f"{self.operand}: values {self.kind}"


@dataclass(frozen=True)
class Genome:
    """A drawn case before it is built: sizes, layout perturbations, value picks, a value seed."""

    sizes: tuple[tuple[str, Any], ...]
    perturbations: tuple[Perturbation, ...] = ()
    values: tuple[ValuePick, ...] = ()
    seed: int = 0

    def size(self, name: str) -> Any:
        return dict(self.sizes)[name]

    def with_sizes(self, **changes: Any) -> Genome:
        s = dict(self.sizes)
        s.update(changes)
        return dataclasses.replace(self, sizes=tuple(sorted(s.items())))

    def operands(self) -> set[str]:
        return {p.operand for p in self.perturbations} | {v.operand for v in self.values}

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": dict(self.sizes),
            "perturbations": [p.to_dict() for p in self.perturbations],
            "values": [v.to_dict() for v in self.values],
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Genome:
        return cls(
            tuple(sorted(dict(d["sizes"]).items())),
            tuple(Perturbation.from_dict(p) for p in d.get("perturbations", ())),
            tuple(ValuePick.from_dict(v) for v in d.get("values", ())),
            int(d.get("seed", 0)),
        )

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _pow2(n: int) -> int:
    return min(n & -n, 256) if n else 256


# ------------------------------------------------------------------------------------ building
@dataclass
class BuiltCase:
    """A genome built for a target: the case, the genome as applied (perturbations that did not fit the
    shapes dropped), and the operands' axes."""

    case: Case
    genome: Genome
    axes: dict[str, tuple[str, ...]]
    skipped: list[str] = field(default_factory=list)


def _linear_draw(sizes: Mapping[str, Any], seed: int, dtype: str) -> Any:
    from harness.targets.layout_classes import Draw

    rank, b, t, k, n = (int(sizes[x]) for x in ("rank", "batch", "tokens", "k", "n"))
    shape = (t, k) if rank == 2 else (b, t, k)
    return Draw(
        {"x": LayoutSpec.contiguous(shape, dtype)},
        {"x": ValueSpec("normal", seed)},
        {"in_features": k, "out_features": n},
    )


def _attention_draw(sizes: Mapping[str, Any], seed: int, dtype: str) -> Any:
    from harness.targets.layout_classes import Draw

    lay = str(sizes["layout"])
    b, h, sq, sk, d = (int(sizes[x]) for x in ("batch", "heads", "seq_q", "seq_k", "head_dim"))

    def shape(s: int) -> tuple[int, ...]:
        return (b, h, s, d) if lay == "HND" else (b, s, h, d)

    layouts = {n: LayoutSpec.contiguous(shape(sq if n == "q" else sk), dtype) for n in "qkv"}
    values = {n: ValueSpec("normal", (seed + i) % 2**31) for i, n in enumerate("qkv")}
    return Draw(
        layouts,
        values,
        {"tensor_layout": lay, "is_causal": False, "batch": b, "heads": h, "seq_q": sq, "seq_k": sk, "head_dim": d},
    )


def _operands(target: Any, case: Case) -> tuple[Any, ...]:
    from harness.targets.base import operands_of

    fn = getattr(target, "operands", None)
    return tuple(fn(case)) if callable(fn) else operands_of(getattr(target, "kind", ""), case)


def _fields(spec: LayoutSpec) -> dict[str, Any]:
    n = len(spec.base_shape if spec.base_shape is not None else spec.shape)
    return {
        "shape": spec.shape,
        "dtype": spec.dtype,
        "base_shape": list(spec.base_shape or spec.shape),
        "perm": spec.perm,
        "step": list(spec.step or (1,) * n),
        "pad": list(spec.pad or (0,) * n),
        "offset": spec.offset,
        "broadcast": set(spec.broadcast),
        "views": list(spec.views),
    }


def _spec(f: Mapping[str, Any]) -> LayoutSpec:
    return LayoutSpec(
        tuple(f["shape"]),
        f["dtype"],
        base_shape=tuple(f["base_shape"]) if f["views"] else None,
        perm=f["perm"],
        step=tuple(f["step"]) if any(s != 1 for s in f["step"]) else None,
        pad=tuple(f["pad"]) if any(f["pad"]) else None,
        offset=f["offset"],
        broadcast=tuple(sorted(f["broadcast"])),
        views=tuple(f["views"]),
    )


def _apply(spec: LayoutSpec, p: Perturbation, *, free_bytes: int | None) -> LayoutSpec:
    """``spec`` with perturbation ``p`` applied; LayoutError (or ValueError) when it does not fit."""
    from harness.targets.layout_classes import aligned_offset

    f = _fields(spec)
    rank = len(f["base_shape"])
    isz = spec.itemsize
    a = p.args

    def dim(d: int) -> int:
        if not rank or not -rank <= d < rank:
            raise LayoutError(f"{p.kind} on dim {d} of a rank-{rank} operand")
        return d % rank

    if p.kind == "align":
        if a[0] < isz:
            raise LayoutError(f"{a[0]} B alignment is impossible for {isz}-byte elements")
        f["offset"] = aligned_offset(a[0], isz, nonzero=a[0] >= 16)
    elif p.kind == "checkpoint":
        f["offset"] = a[0] // isz
        if rank:
            outer = (f["perm"] or tuple(range(rank)))[0]
            f["pad"][outer] += 1
    elif p.kind == "step":
        f["step"][dim(a[0])] = a[1]
    elif p.kind == "broadcast":
        f["broadcast"].add(dim(a[0]))
    elif p.kind == "perm":
        if len(a) != rank:
            raise LayoutError(f"memory order {a} does not fit rank {rank}")
        f["perm"] = tuple(a)
    elif p.kind == "pad":
        f["pad"][dim(a[0])] += a[1]
    elif p.kind in ("packed", "slice"):
        if f["views"]:
            raise LayoutError("one view family per operand")
        d = dim(a[0])
        size = f["base_shape"][d]
        if size == 0:
            raise LayoutError("empty dim")
        if p.kind == "packed":
            f["base_shape"][d] = size * a[1]
            f["views"] = [ViewOp.chunk(a[1], d, a[2])]
        else:
            f["base_shape"][d] = size + a[2]
            f["views"] = [ViewOp.narrow(d, min(a[1], a[2]), size)]
    elif p.kind == "large_offset":
        plan, why = large_offset_plan(_spec(f), free_bytes=free_bytes)
        if plan is None:
            raise LayoutError(why)
        return plan
    return _spec(f)


def build_case(target: Any, genome: Genome, *, free_bytes: int | None = None) -> BuiltCase:
    """The case ``genome`` stands for on ``target`` (a linear or attention target with ``case_from_draw``).

    Perturbations that do not fit the drawn shapes (a 1 B alignment of a bf16 tensor, a memory order of
    another rank, a second view family) are dropped and listed in ``skipped``; ``genome`` in the result
    holds only what was applied, so a signature never names a property the case does not have.
    """
    kind = getattr(target, "kind", "")
    sizes = dict(genome.sizes)
    dtype = str(getattr(target, "sweep_dtype", "bfloat16"))  # of the swept tensor (x, or q/k/v)
    if kind == "linear":
        draw = _linear_draw(sizes, genome.seed, dtype)
    elif kind == "attention":
        draw = _attention_draw(sizes, genome.seed, dtype)
    else:
        raise ValueError(
            f"target {getattr(target, 'name', target)!r} has kind {kind!r}; explore needs a 'linear' "
            "or 'attention' target with case_from_draw (harness.targets.base.ClassTarget)"
        )
    case = target.case_from_draw(draw, EXPLORE_CLASS, genome.seed)
    ops = {o.name: o for o in _operands(target, case)}
    layouts, values, params = dict(case.layouts), dict(case.values), dict(case.params)
    applied: list[Perturbation] = []
    skipped: list[str] = []
    for o in ops.values():  # a scalar given as a parameter gets a layout when a draw touches it
        if o.param and o.name not in layouts and o.name in genome.operands():
            layouts[o.name] = LayoutSpec.contiguous((), "float32")
            values[o.name] = ValueSpec("constant", 0, (("value", float(params[o.param])),))
            params[o.param] = None
    for p in genome.perturbations:
        if p.operand not in layouts or p.operand not in ops:
            skipped.append(f"{p.operand}: not an operand of this case")
            continue
        try:
            layouts[p.operand] = _apply(layouts[p.operand], p, free_bytes=free_bytes)
            applied.append(p)
        except (LayoutError, ValueError) as e:
            skipped.append(f"{p.prop()}: {e}")
    picks: list[ValuePick] = []
    for v in genome.values:
        o = ops.get(v.operand)
        if o is None or v.operand not in layouts:
            skipped.append(f"{v.operand}: not an operand of this case")
            continue
        prm = dict(v.params)
        if v.kind.endswith("_slice"):
            if v.axis not in o.axes:
                skipped.append(f"{v.prop()}: {v.operand} has no {v.axis} axis")
                continue
            prm["dim"] = o.axes.index(v.axis)
        try:
            vseed = (genome.seed + zlib.crc32(v.operand.encode())) % 2**31  # independent of the other picks
            values[v.operand] = ValueSpec(v.kind, vseed, tuple(prm.items()))
            picks.append(v)
        except ValueError_ as e:
            skipped.append(f"{v.prop()}: {e}")
    applied_g = dataclasses.replace(genome, perturbations=tuple(applied), values=tuple(picks))
    params["explore"] = applied_g.to_dict()
    params["layout_class"] = EXPLORE_CLASS
    built = BuiltCase(
        dataclasses.replace(case, layouts=layouts, values=values, params=params),
        applied_g,
        {n: o.axes for n, o in ops.items()},
        skipped,
    )
    built.case.note = "explored: " + ("; ".join(describe(applied_g, built)) or "the plain case")
    return built


def describe(genome: Genome, built: BuiltCase | None) -> list[str]:
    """The properties of ``genome``, one line each (sizes not included)."""
    out = []
    for p in genome.perturbations:
        spec = built.case.layouts.get(p.operand) if built is not None else None
        out.append(p.prop(spec, built.axes.get(p.operand, ()) if built is not None else ()))
    out += [v.prop() for v in genome.values]
    return out


# ------------------------------------------------------------------------------------ large offsets
def free_device_bytes(device: str) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``torch.cuda.mem_get_info``); None where unknown (CPU)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def large_offset_plan(
    spec: LayoutSpec, *, free_bytes: int | None, reach: int = LARGE_OFFSET
) -> tuple[LayoutSpec | None, str]:
    """``spec`` moved so its largest element offset is >= ``reach`` (2**31), or (None, why it cannot run).

    The base offset grows by whole 16-byte units, so the pointer alignment stays what it was.  The run
    needs about three times the storage (the view, the runner's snapshot of the storage, the op's own
    work); without ``free_bytes`` (CPU: the draw is off) or when that does not fit, the reason says so.
    """
    shape, strides = spec.shape, spec.strides()
    if not spec.numel:
        return None, "an empty operand has no element to move past 2^31"
    last = spec.storage_offset() + sum((s - 1) * abs(st) for s, st in zip(shape, strides))
    unit = max(1, 16 // spec.itemsize)
    delta = max(0, -(-(reach - last) // unit) * unit)
    moved = spec.replace(offset=spec.offset + delta)
    need = 3 * moved.storage_numel() * moved.itemsize
    if free_bytes is None:
        return None, (
            f"a largest element offset of {reach} needs {need / 2**30:.1f} GiB and the device's free "
            "memory is unknown (large-offset draws are for CUDA devices)"
        )
    if need > free_bytes:
        return None, (
            f"a largest element offset of {reach} needs {need / 2**30:.1f} GiB, the device has "
            f"{free_bytes / 2**30:.1f} GiB free"
        )
    return moved, ""


# ------------------------------------------------------------------------------------ drawing
def _sizes_for(target: Any, max_elements: int) -> dict[str, tuple[Any, ...]]:
    if target.kind == "linear":
        ranks = tuple(r for r in LINEAR_SIZES["rank"] if r in tuple(getattr(target, "ranks", (2, 3))))
        return {**LINEAR_SIZES, "rank": ranks or (2,)}
    declared = tuple(sorted(getattr(target, "head_dims", (64,))))
    dims = declared + tuple(d for d in ATTENTION_SIZES["head_dim"] if d not in declared)
    return {**ATTENTION_SIZES, "head_dim": dims}


def _fits(sizes: Mapping[str, Any], kind: str, max_elements: int) -> bool:
    if kind == "linear":
        b = sizes["batch"] if sizes["rank"] == 3 else 1
        return b * sizes["tokens"] * sizes["k"] <= max_elements and sizes["n"] * sizes["k"] <= max_elements
    per = sizes["batch"] * sizes["heads"] * sizes["head_dim"]
    return per * max(sizes["seq_q"], sizes["seq_k"]) <= max_elements


def _default_sizes(table: Mapping[str, Sequence[Any]], kind: str, max_elements: int) -> dict[str, Any]:
    """The first size of every list; where that is over ``max_elements``, sizes shrunk in a fixed order
    (tokens, out-features / sequence, heads, ...) to the next smaller power of two listed, so the default
    stays on whole tiles."""
    s = {k: v[0] for k, v in table.items()}
    order = ("tokens", "n", "batch", "k") if kind == "linear" else ("seq_q", "heads", "batch", "head_dim")
    for key in order:
        while not _fits(s, kind, max_elements):
            smaller = [o for o in table[key] if o < s[key] and o & (o - 1) == 0]
            if not smaller:
                break
            s[key] = max(smaller)
            if key == "seq_q":
                s["seq_k"] = s["seq_q"]
    if not _fits(s, kind, max_elements):
        raise ValueError(f"max_elements={max_elements} leaves no room for the smallest {kind} case")
    return s


def _draw_sizes(rng: random.Random, table: Mapping[str, Sequence[Any]], kind: str, max_elements: int) -> dict[str, Any]:
    for _ in range(50):
        s = {k: (v[0] if rng.random() < 0.4 else rng.choice(v)) for k, v in table.items()}
        if kind == "attention" and rng.random() < 0.6:
            s["seq_k"] = s["seq_q"]  # self-attention
        if _fits(s, kind, max_elements):
            return s
    return _default_sizes(table, kind, max_elements)


def _draw_perturbation(rng: random.Random, operand: str, rank: int, *, large: bool) -> Perturbation:
    if large and rng.random() > 0.98:  # comparisons are written so that random() -> 0 means 'simpler'
        return Perturbation(operand, "large_offset")
    kinds = (LAYOUT_KINDS if rank >= 2 else tuple(k for k in LAYOUT_KINDS if k != "perm")) if rank else _SCALAR_KINDS
    k = rng.choice(kinds)
    d = -rng.randint(1, rank) if rank else 0
    if k == "align":
        return Perturbation(operand, k, (rng.choice(_ALIGNMENTS),))
    if k == "checkpoint":
        return Perturbation(operand, k, (rng.choice((rng.randrange(1, 4096), rng.randrange(1, 64) * 16 + 2)),))
    if k == "step":
        return Perturbation(operand, k, (d, rng.choice((2, 3))))
    if k == "broadcast":
        return Perturbation(operand, k, (d,))
    if k == "perm":
        order = list(range(rank))
        if rng.random() >= 0.6:
            rng.shuffle(order)
        if order == sorted(order):
            order[-1], order[-2] = order[-2], order[-1]
        return Perturbation(operand, k, tuple(order))
    if k == "pad":
        return Perturbation(operand, k, (d, rng.choice((1, 3, 7, 8, 16))))
    if k == "packed":
        parts = rng.choice((2, 3))
        return Perturbation(operand, k, (d, parts, rng.randrange(parts)))
    extra = rng.choice((1, 3, 16, 64))
    return Perturbation(operand, k, (d, rng.randint(0, extra), extra))


_SLICE_KINDS = ("zero_slice", "constant_slice", "outlier_slice")
_TENSOR_KINDS = ("fp8_edge", "subnormal", "outliers")


def _draw_value(rng: random.Random, operand: str, axes: Sequence[str], *, allow_nonfinite: bool) -> ValuePick:
    """Three times in four a structured slice along one of the operand's ``axes``, else a per-tensor recipe."""
    whole = _TENSOR_KINDS + (("nonfinite",) if allow_nonfinite else ())
    k = rng.choice(_SLICE_KINDS if rng.random() < 0.75 else whole)
    if not k.endswith("_slice"):
        return ValuePick(operand, k)
    axis = rng.choice(tuple(axes))
    length = rng.choice((64, 128)) if axis == "token" and rng.random() > 0.7 else 1
    return ValuePick(operand, k, axis, (("length", length), ("start", rng.randrange(0, 256))))


def _base(target: Any, sizes: Mapping[str, Any], seed: int) -> BuiltCase:
    return build_case(target, Genome(tuple(sorted(sizes.items())), seed=seed))


def _round_robin(lists: Sequence[Sequence[Any]]) -> list[Any]:
    out: list[Any] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def _operand_sweep(base: BuiltCase, name: str, rng: random.Random) -> tuple[list[Any], list[Any]]:
    """(the common single properties of one operand -- layout variants and structured values --, the rest)."""
    rank = base.case.layouts[name].ndim if name in base.case.layouts else 0
    if rank == 0:  # a scalar scale: its pointer only
        first = [Perturbation(name, "align", (4,)), Perturbation(name, "checkpoint", (rng.randrange(1, 64) * 4,))]
        return first, [Perturbation(name, "align", (8,)), Perturbation(name, "align", (16,))]
    axes = base.axes[name]
    first: list[Any] = [Perturbation(name, "align", (2,)), Perturbation(name, "broadcast", (-2 if rank >= 2 else -1,))]
    first += [ValuePick(name, "outliers"), Perturbation(name, "step", (-1, 2))]
    first += [Perturbation(name, "perm", tuple(range(rank - 2)) + (rank - 1, rank - 2))] if rank >= 2 else []
    first += [ValuePick(name, "fp8_edge"), Perturbation(name, "broadcast", (-1,)), Perturbation(name, "pad", (-1, 8))]
    first += [ValuePick(name, "zero_slice", axes[-1], (("length", 1), ("start", rng.randrange(0, 256))))]
    first += [
        Perturbation(name, "packed", (-1, 3, 1)),
        Perturbation(name, "slice", (-1, 1, 3)),
        Perturbation(name, "checkpoint", (rng.randrange(1, 4096),)),
        ValuePick(name, "subnormal"),
    ]
    later: list[Any] = [Perturbation(name, "align", (a,)) for a in (4, 8, 1, 16)]
    for d in range(-rank, -1 if rank >= 2 else 0):
        if d != -2:
            later.append(Perturbation(name, "broadcast", (d,)))
        later += [Perturbation(name, "step", (d, 2)), Perturbation(name, "pad", (d, 3))]
        later += [Perturbation(name, "packed", (d, 2, 1)), Perturbation(name, "slice", (d, 1, 16))]
    for kind in _SLICE_KINDS:
        for axis in axes:
            if not (kind == "zero_slice" and axis == axes[-1]):
                later.append(ValuePick(name, kind, axis, (("length", 1), ("start", rng.randrange(0, 256)))))
    return first, later


#: Sizes the sweep is repeated at besides the defaults: the other rank of a linear, the other memory layout of
#: attention (code paths differ there: a defect of the 3-d path never shows on 2-d inputs).
_SWEEP_VARIANTS = {"linear": ("rank", 3), "attention": ("layout", "NHD")}


def sweep_genomes(target: Any, sizes: Mapping[str, Any], seed: int, rng: random.Random) -> list[Genome]:
    """One property of one operand at a time: every operand x every layout kind and structured value, on the
    default sizes and on the other rank (linear) or memory layout (attention); the common variants of every
    operand first, round-robin over the operands, then the other alignments, dims and value slices.

    Random draws perturb several operands at once, so any single (operand, property) pair is rare among them
    (one draw in a hundred or so); the sweep reaches each pair once, early, and each such find is already
    minimal.  :func:`explore` interleaves it with the random draws and mutations.
    """
    variants = [dict(sizes)]
    alt = _SWEEP_VARIANTS.get(getattr(target, "kind", ""))
    if alt is not None and alt[0] in sizes and sizes[alt[0]] != alt[1]:
        table = _sizes_for(target, 1 << 62)
        if alt[1] in table.get(alt[0], ()):
            variants.append(dict(sizes, **{alt[0]: alt[1]}))
    per_variant = []
    for sz in variants:
        base = _base(target, sz, seed)
        key = tuple(sorted(sz.items()))
        firsts, laters = zip(*(_operand_sweep(base, name, rng) for name in base.axes)) if base.axes else ((), ())
        items = _round_robin(firsts) + _round_robin(laters)
        per_variant.append(
            [
                Genome(key, (it,), (), seed) if isinstance(it, Perturbation) else Genome(key, (), (it,), seed)
                for it in items
            ]
        )
    return _round_robin(per_variant)


def draw_genome(
    rng: random.Random,
    target: Any,
    *,
    max_elements: int = 1 << 16,
    large: bool = False,
    allow_nonfinite: bool = False,
    p_operand: float = 0.35,
    p_values: float = 0.25,
) -> Genome:
    """A fresh draw: sizes around tiles, each operand perturbed on its own with probability ``p_operand``
    (one or two properties), and each operand's values, on their own, with probability ``p_values``."""
    table = _sizes_for(target, max_elements)
    sizes = _draw_sizes(rng, table, target.kind, max_elements)
    seed = rng.randrange(2**31)
    base = _base(target, sizes, seed)
    perts: list[Perturbation] = []
    for name in base.axes:
        if rng.random() > 1 - p_operand:
            rank = base.case.layouts[name].ndim if name in base.case.layouts else 0
            for _ in range(1 if rng.random() < 0.7 else 2):
                perts.append(_draw_perturbation(rng, name, rank, large=large))
    vals = [
        _draw_value(rng, name, axes, allow_nonfinite=allow_nonfinite)  # scalars (scales) keep their value
        for name, axes in base.axes.items()
        if axes and rng.random() > 1 - p_values
    ]
    return Genome(tuple(sorted(sizes.items())), tuple(perts), tuple(vals), seed)


def mutate(
    rng: random.Random,
    genome: Genome,
    target: Any,
    *,
    max_elements: int = 1 << 16,
    large: bool = False,
    allow_nonfinite: bool = False,
) -> Genome:
    """``genome`` changed in one place: a perturbation added or removed, a size or value pick changed."""
    table = _sizes_for(target, max_elements)
    base = _base(target, dict(genome.sizes), genome.seed)
    op = rng.random()
    if op < 0.35 or not genome.perturbations:
        name = rng.choice(sorted(base.axes))
        rank = base.case.layouts[name].ndim if name in base.case.layouts else 0
        return dataclasses.replace(
            genome, perturbations=genome.perturbations + (_draw_perturbation(rng, name, rank, large=large),)
        )
    if op < 0.5:
        i = rng.randrange(len(genome.perturbations))
        return dataclasses.replace(genome, perturbations=genome.perturbations[:i] + genome.perturbations[i + 1 :])
    if op < 0.75:
        for _ in range(20):
            key = rng.choice(sorted(table))
            g = genome.with_sizes(**{key: rng.choice(table[key])})
            if target.kind == "attention" and key == "seq_q" and rng.random() < 0.5:
                g = g.with_sizes(seq_k=g.size("seq_q"))
            if _fits(dict(g.sizes), target.kind, max_elements):
                return g
        return genome
    if op < 0.9 and any(base.axes.values()):
        name = rng.choice(sorted(n for n, axes in base.axes.items() if axes))
        return dataclasses.replace(
            genome, values=(_draw_value(rng, name, base.axes[name], allow_nonfinite=allow_nonfinite),)
        )
    return dataclasses.replace(genome, seed=rng.randrange(2**31))


# ------------------------------------------------------------------------------------ coverage and score
def cpu_coverage(built: BuiltCase, result: Result) -> Hashable:
    """The CPU coverage key: which (operand, property kind) pairs and value kinds the case perturbed."""
    g = built.genome
    return (
        tuple(sorted({(p.operand, p.kind) for p in g.perturbations})),
        tuple(sorted({(v.operand, v.kind, v.axis) for v in g.values})),
    )


def kernel_coverage(built: BuiltCase, result: Result) -> Hashable:
    """The GPU coverage key: the device kernels the case launched (``result.metrics["kernels"]``, profiler
    kernel names, when the runner records them), else :func:`cpu_coverage`."""
    kernels = result.metrics.get("kernels") if isinstance(result.metrics, dict) else None
    if kernels:
        return ("kernels",) + tuple(sorted(set(map(str, kernels))))
    return cpu_coverage(built, result)


def _score(result: Result) -> float:
    r = result.metrics.get("ratio") if isinstance(result.metrics, dict) else None
    return float(r) if isinstance(r, (int, float)) and math.isfinite(r) else 0.0


def _is_find(target: Any, verdict: Verdict, genome: Genome | None = None) -> bool:
    if verdict is Verdict.REJECTED:
        # a guarded op must take every layout -- but refusing a head dim it does not declare is honest
        if genome is not None and getattr(target, "kind", "") == "attention":
            hd = dict(genome.sizes).get("head_dim")
            if hd is not None and hd not in tuple(getattr(target, "head_dims", ()) or (hd,)):
                return False
        return bool(getattr(target, "accepts_all_layouts", False))
    return verdict.failed


# ------------------------------------------------------------------------------------ minimizing
class ExploreStopped(Exception):
    """Stop the search now: raised by :class:`_Runner` when ``should_stop`` says so, and by a ``run`` function that
    cannot run cases any more (its pool closed); what ran so far is still reported."""


class _Runner:
    """Runs built genomes through ``run`` with a memo (minimization paths meet the same genomes again)."""

    def __init__(self, target: Any, run: Callable[[Case], Result], free_bytes: int | None) -> None:
        self.target, self.run_fn, self.free_bytes = target, run, free_bytes
        self.memo: dict[str, tuple[BuiltCase, Result]] = {}
        self.runs = 0
        self.fresh = False  # whether the last call ran its case (False: answered from the memo)
        self.on_result: Callable[[BuiltCase, Result], None] | None = None
        self.should_stop: Callable[[], str] | None = None

    def __call__(self, genome: Genome) -> tuple[BuiltCase, Result]:
        built = build_case(self.target, genome, free_bytes=self.free_bytes)
        key = built.genome.key()
        hit = self.memo.get(key)
        self.fresh = hit is None
        if hit is None:
            if self.should_stop is not None and (why := self.should_stop()):
                raise ExploreStopped(why)
            self.runs += 1
            hit = self.memo[key] = (built, self.run_fn(built.case))
            if self.on_result is not None:
                self.on_result(*hit)
        return hit


def minimize_genome(
    genome: Genome,
    verdict: Verdict,
    runner: Callable[[Genome], tuple[BuiltCase, Result]],
    *,
    defaults: Mapping[str, Any],
    table: Mapping[str, Sequence[Any]],
    kind: str,
    max_elements: int,
    max_runs: int = 80,
) -> Genome:
    """The fewest perturbed operands, properties and value picks, and the simplest sizes, keeping ``verdict``.

    Greedy, as :func:`harness.runner.minimize.minimize`: each candidate is kept only if its verdict is
    still ``verdict``; passes repeat until nothing changes (or ``max_runs`` candidates ran).
    """
    cur = genome
    tried = 0
    stopped = False  # the runner's should_stop said stop: the reduction so far is the answer

    def keeps(g: Genome) -> bool:
        nonlocal tried, stopped
        if stopped or tried >= max_runs or not _fits(dict(g.sizes), kind, max_elements):
            return False
        tried += 1
        try:
            return runner(g)[1].verdict is verdict
        except ExploreStopped:
            stopped = True
            return False

    changed = True
    while changed and tried < max_runs and not stopped:
        changed = False
        for name in sorted(cur.operands()):  # 1. one operand's whole perturbation at a time
            cand = dataclasses.replace(
                cur,
                perturbations=tuple(p for p in cur.perturbations if p.operand != name),
                values=tuple(v for v in cur.values if v.operand != name),
            )
            if keeps(cand):
                cur, changed = cand, True
        for i in range(len(cur.perturbations) - 1, -1, -1):  # 2. single properties and value picks
            if i < len(cur.perturbations):
                cand = dataclasses.replace(cur, perturbations=cur.perturbations[:i] + cur.perturbations[i + 1 :])
                if keeps(cand):
                    cur, changed = cand, True
        for i, p in enumerate(cur.perturbations):  # a view that only misaligns the pointer -> that alignment
            if p.kind in ("checkpoint", "slice", "packed"):
                built = runner(cur)[0]
                spec = built.case.layouts.get(p.operand)
                if spec is not None and spec.alignment() < 16:
                    simpler = Perturbation(p.operand, "align", (spec.alignment(),))
                    cand = dataclasses.replace(
                        cur, perturbations=cur.perturbations[:i] + (simpler,) + cur.perturbations[i + 1 :]
                    )
                    if keeps(cand):
                        cur, changed = cand, True
        for i in range(len(cur.values) - 1, -1, -1):
            cand = dataclasses.replace(cur, values=cur.values[:i] + cur.values[i + 1 :])
            if keeps(cand):
                cur, changed = cand, True
        for key in sorted(defaults):  # 3. sizes: the default, else smaller tile-boundary sizes
            now = cur.size(key)
            if now == defaults[key]:
                continue
            options = [defaults[key]]
            if isinstance(now, int):
                options += sorted(v for v in table[key] if isinstance(v, int) and v < now and v != defaults[key])[:4]
            for v in options:
                cand = cur.with_sizes(**{key: v})
                if kind == "attention" and key == "seq_q" and cur.size("seq_k") == now:
                    cand = cand.with_sizes(seq_k=v)
                if keeps(cand):
                    cur, changed = cand, True
                    break
    return cur


_TILED = ("tokens", "k", "n", "seq_q", "seq_k", "head_dim")  # the sizes kernels tile


def size_class(v: int) -> str:
    """Where a size sits against tiles: "1", "a multiple of 128", "a multiple of 32, not of 64", ..."""
    if v == 1:
        return "1"
    for t in (128, 64, 32, 16):
        if v % t == 0:
            return f"a multiple of {t}" + (f", not of {2 * t}" if t < 128 else "")
    return "not a multiple of 16"


def signature(op: str, verdict: Verdict, built: BuiltCase, defaults: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(op, verdict, operand, property) of a minimal case: the operands it still perturbs (``shape`` for sizes
    that had to stay off their defaults) and what about them."""
    props = describe(built.genome, built)
    operands = sorted(built.genome.operands())
    sizes = [(k, v) for k, v in sorted(built.genome.sizes) if defaults.get(k) != v]
    if sizes:
        operands.append("shape")
        props += [f"shape: {k} = {v}" + (f" ({size_class(v)})" if k in _TILED else "") for k, v in sizes]
    return (op, verdict.value, "+".join(operands) or "-", "; ".join(props) or "the plain case")


# ------------------------------------------------------------------------------------ the corpus
_X = ("x",)  # what the linear grid sweeps: the activation only
_QKV = ("q", "k", "v")  # what the attention grid sweeps: q, k and v together


def _kinds(built: BuiltCase, *kinds: str, on: Sequence[str]) -> bool:
    return any(p.kind in kinds and p.operand in on for p in built.genome.perturbations)


def _misaligned(on: Sequence[str]) -> Callable[[BuiltCase], bool]:
    """Some operand in ``on`` has its data pointer aligned to fewer than 16 bytes (whichever view made it so)."""

    def check(built: BuiltCase) -> bool:
        return any(
            spec is not None and spec.alignment() < 16
            for spec in (built.case.layouts.get(p.operand) for p in built.genome.perturbations if p.operand in on)
        )

    return check


def _values(built: BuiltCase, *kinds: str, on: Sequence[str]) -> bool:
    return any(v.kind in kinds and v.operand in on for v in built.genome.values)


def _short_tile(built: BuiltCase) -> bool:
    sizes = dict(built.genome.sizes)
    return any(isinstance(sizes.get(k), int) and sizes[k] % 64 for k in ("seq_q", "seq_k"))


_WIDER = ("packed", "slice", "checkpoint", "align")
_EDGES = ("fp8_edge", "outliers", "outlier_slice")

#: Per layout class of the grid (:mod:`harness.targets.layout_classes`): what an explored case must have to stand
#: for a finding of that class -- the property family on an operand the grid's class sweeps (the activation ``x``
#: of a linear, q/k/v of attention), not the exact view (an explored case perturbs one operand where the grid
#: perturbed them all).  A class listed as None is matched on op and verdict alone.
CLASS_FAMILIES: dict[str, tuple[str, Callable[[BuiltCase], bool]] | None] = {
    "contiguous": None,
    "hnd_contiguous": None,
    "nhd_contiguous": None,
    "2d": None,
    "3d": None,
    "4d": None,
    "offset_16": None,
    "seq_512": None,  # a multiple of every tile: the op and verdict decide
    "transposed": ("a transposed x", lambda b: _kinds(b, "perm", on=_X)),
    "transposed_view": ("a transposed / permuted q, k or v", lambda b: _kinds(b, "perm", on=_QKV)),
    "flatten_permuted": ("a permuted or strided x", lambda b: _kinds(b, "perm", "step", "pad", on=_X)),
    "last_stride_2": ("x with a last stride != 1", lambda b: _kinds(b, "step", "perm", on=_X)),
    "last_stride_ne_1": ("q, k or v with a last stride != 1", lambda b: _kinds(b, "step", "perm", on=_QKV)),
    "padded_rows": ("a padded or strided x", lambda b: _kinds(b, "pad", "step", on=_X)),
    "broadcast": ("a stride-0 x", lambda b: _kinds(b, "broadcast", on=_X)),
    "packed_slice": ("x as a view into a wider buffer", lambda b: _kinds(b, *_WIDER, on=_X)),
    "packed_qkv": ("q, k or v as a view into a wider buffer", lambda b: _kinds(b, *_WIDER, on=_QKV)),
    "mtv_scrambled_k": ("a non-packed k", lambda b: _kinds(b, *LAYOUT_KINDS, on=("k",))),
    "values_beyond_448": ("x with values at or past the FP8 range", lambda b: _values(b, *_EDGES, on=_X)),
    "outliers": ("x with outlier values", lambda b: _values(b, *_EDGES, on=_X)),
    **{f"offset_{n}": ("an x pointer aligned to < 16 B", _misaligned(_X)) for n in (1, 2, 4, 8)},
    **{f"misaligned_ptr_{n}": ("a q, k or v pointer aligned to < 16 B", _misaligned(_QKV)) for n in (2, 4, 8)},
    **{f"seq_{n}": ("a sequence length off the 64-token tile", _short_tile) for n in (77, 113, 257)},
}


def reproduces(op: str, layout_class: str, verdict: str, built: BuiltCase, result: Result) -> bool:
    """Whether an explored case (``built`` with its ``result``) stands for the corpus finding
    ``op|layout_class|verdict``: the same op and verdict, and the property family of the class
    (:data:`CLASS_FAMILIES`)."""
    if built.case.op != op or result.verdict.value != verdict:
        return False
    fam = CLASS_FAMILIES.get(layout_class)
    return fam is None or fam[1](built)


def family_of(layout_class: str) -> str:
    """What :func:`reproduces` asks of an explored case for ``layout_class``, in words."""
    fam = CLASS_FAMILIES.get(layout_class)
    return fam[0] if fam is not None else "the same op and verdict"


# ------------------------------------------------------------------------------------ results
@dataclass
class Finding:
    """One failure signature with its minimal case and the count of raw cases under it."""

    op: str
    verdict: str
    operand: str
    property: str
    count: int
    minimal: dict[str, Any]
    genome: dict[str, Any]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExploreResult:
    """What :func:`explore` found on one op (every field JSON-able through :meth:`to_dict`)."""

    op: str
    seed: int
    cases: int = 0
    minimize_runs: int = 0
    elapsed_s: float = 0.0
    stopped: str = ""
    findings: list[Finding] = field(default_factory=list)
    worst: dict[str, Any] | None = None
    coverage: int = 0
    kept: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    #: perturbation kind -> {"count", "example"}: draws that did not fit and were dropped (a large-offset draw
    #: that the device's free memory cannot hold says so here)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)

    def signatures(self) -> list[tuple[str, str, str, str]]:
        return [(f.op, f.verdict, f.operand, f.property) for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["findings"] = [f.to_dict() for f in self.findings]
        return d

    def summary(self) -> list[str]:
        """Lines a report can print: one per signature, then the worst drift."""
        lines = [
            (
                f"{self.op}: {self.cases} cases (+{self.minimize_runs} to minimize), {len(self.findings)} "
                f"signature(s), stopped: {self.stopped}"
            )
        ]
        for f in self.findings:
            lines.append(f"  {f.verdict} x{f.count} [{f.operand}] {f.property}")
        if self.worst:
            lines.append(f"  worst drift ratio {self.worst['ratio']:.3g}: {self.worst['note']}")
        return lines


def _covers(minimal: Genome, verdict: Verdict, raw: Genome, raw_verdict: Verdict, defaults: Mapping[str, Any]) -> bool:
    """``raw`` has every property of the minimal case (its perturbations, value picks, off-default sizes)."""
    sizes = dict(raw.sizes)
    return (
        raw_verdict is verdict
        and set(minimal.perturbations) <= set(raw.perturbations)
        and set(minimal.values) <= set(raw.values)
        and all(sizes.get(k) == v for k, v in minimal.sizes if defaults.get(k) != v)
    )


def _dropped(asked: Genome, built: BuiltCase) -> list[str]:
    """The kinds of what ``build_case`` dropped, in the order of ``built.skipped``."""
    kept_p, kept_v = list(built.genome.perturbations), list(built.genome.values)
    out = []
    for p in asked.perturbations:
        if p in kept_p:
            kept_p.remove(p)
        else:
            out.append(p.kind)
    for v in asked.values:
        if v in kept_v:
            kept_v.remove(v)
        else:
            out.append(f"values:{v.kind}")
    return out


def explore(
    target: Any,
    run: Callable[[Case], Result],
    *,
    seed: int = 0,
    budget_cases: int = 200,
    budget_s: float | None = None,
    coverage: Callable[[BuiltCase, Result], Hashable] = cpu_coverage,
    max_elements: int = 1 << 16,
    large_offset: bool = False,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    minimize: bool = True,
    max_minimize_runs: int = 80,
    on_result: Callable[[BuiltCase, Result], None] | None = None,
    should_stop: Callable[[], str] | None = None,
    sweep: bool = True,
    free_bytes: int | None = None,
) -> ExploreResult:
    """Explore ``target`` with ``budget_cases`` drawn cases (and at most ``budget_s`` seconds); see the module doc.

    ``run(case) -> Result`` runs one case.  ``large_offset``: allow the rare >= 2**31-offset draw (sized from
    ``device``'s free memory, or ``free_bytes`` when given; on CPU it is skipped with its reason).  Minimization runs come on top of the
    case budget (``max_minimize_runs`` per signature).  ``on_result(built, result)`` sees every case that ran
    (drawn and minimization runs alike; the matrix counts and keeps them).  ``should_stop()`` returns a reason
    (non-empty) to stop at once -- the matrix's deadline or a signal; what ran so far is still minimized within
    the same check (no new runs once it says stop) and reported.
    """
    pending: list[Genome] = []  # the sweep's genomes not drawn yet
    if not isinstance(budget_cases, int) or budget_cases < 1:
        raise ValueError(f"budget_cases={budget_cases!r} must be an integer >= 1")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s={budget_s!r} must be > 0 seconds (or None)")
    op = getattr(target, "name", str(target))
    rng = random.Random(f"explore|{op}|{seed}")
    res = ExploreResult(op=op, seed=seed)
    # a caller that must not touch the device itself (the pool's parent) passes what it knows
    free = (free_bytes if free_bytes is not None else free_device_bytes(device)) if large_offset else None
    table = _sizes_for(target, max_elements)
    defaults = _default_sizes(table, target.kind, max_elements)
    runner = _Runner(target, run, free)
    runner.on_result, runner.should_stop = on_result, should_stop
    t0 = time.monotonic()
    seen: set[tuple[Hashable, str]] = set()
    corpus: list[tuple[float, Genome]] = []
    raw: list[tuple[Genome, Verdict]] = []
    best = -1.0
    res.stopped = "budget_cases"
    i = -1
    while runner.runs < budget_cases:
        i += 1
        if i >= 4 * budget_cases:
            res.stopped = "no new draws (every draw already ran)"
            break
        if budget_s is not None and i > 0 and time.monotonic() - t0 > budget_s:  # the plain control always runs
            res.stopped = "budget_s"
            break
        kw = {"max_elements": max_elements, "large": large_offset, "allow_nonfinite": allow_nonfinite}
        if i == 0:
            g = Genome(tuple(sorted(defaults.items())), seed=rng.randrange(2**31))  # the plain control first
            pending = sweep_genomes(target, defaults, g.seed, rng) if sweep else []
        elif pending and rng.random() < 0.75:  # one operand's one property at a time, interleaved with the search
            g = pending.pop(0)
        elif corpus and rng.random() < 0.5:
            parent = max(corpus, key=lambda e: e[0])[1] if rng.random() < 0.5 else rng.choice(corpus)[1]
            g = mutate(rng, parent, target, **kw)
        else:
            g = draw_genome(rng, target, **kw)
        try:
            built, r = runner(g)
        except ExploreStopped as e:
            res.stopped = str(e)
            break
        if not runner.fresh:
            continue
        for p, why in zip(_dropped(g, built), built.skipped):
            entry = res.skipped.setdefault(p, {"count": 0, "example": why})
            entry["count"] += 1
        res.cases += 1
        res.verdicts[r.verdict.value] = res.verdicts.get(r.verdict.value, 0) + 1
        if r.verdict in (Verdict.UNAVAILABLE, Verdict.UNSUPPORTED) and i == 0:  # every case would say so
            res.stopped = f"{r.verdict.value}: {r.message.splitlines()[0] if r.message else ''}"
            break
        score = _score(r)
        key = (coverage(built, r), r.verdict.value)
        if key not in seen or score > best:
            seen.add(key)
            corpus.append((score, built.genome))
        if score > best:
            best = score
            res.worst = {
                "ratio": score,
                "verdict": r.verdict.value,
                "genome": built.genome.to_dict(),
                "case": built.case.to_dict(),
                "note": built.case.note,
            }
        if _is_find(target, r.verdict, built.genome):
            raw.append((built.genome, r.verdict))
    res.coverage, res.kept = len(seen), len(corpus)
    cases_runs = runner.runs
    found: list[tuple[Genome, Verdict, Finding]] = []
    by_sig: dict[tuple[str, str, str, str], Finding] = {}
    for g, v in raw:
        hit = next((f for mg, mv, f in found if _covers(mg, mv, g, v, defaults)), None)
        if hit is not None:
            hit.count += 1
            continue
        mg = (
            minimize_genome(
                g,
                v,
                runner,
                defaults=defaults,
                table=table,
                kind=target.kind,
                max_elements=max_elements,
                max_runs=max_minimize_runs,
            )
            if minimize
            else g
        )
        built, r = runner(mg)  # ran already (a reduction step or the raw draw): from the memo
        if r.verdict is not v:  # the reduction could not keep the verdict (a flaky op): report the raw case
            built, r = runner(g)
            mg = built.genome
        sig = signature(op, v, built, defaults)
        f = by_sig.get(sig)
        if f is None:
            f = by_sig[sig] = Finding(
                *sig,
                count=0,
                minimal=built.case.to_dict(),
                genome=mg.to_dict(),
                message=(r.message or "").splitlines()[0] if r.message else "",
            )
            res.findings.append(f)
        f.count += 1
        found.append((mg, v, f))
    res.minimize_runs = runner.runs - cases_runs
    res.elapsed_s = time.monotonic() - t0
    return res
