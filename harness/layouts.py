"""The layout model: a description of a strided view over a larger storage.

A :class:`LayoutSpec` says how a tensor of logical shape ``shape`` sits in
memory.  It is built in two stages, mirroring how model code produces views:

1. a *base* tensor of shape ``base_shape`` is cut out of a poisoned allocation:
   its dimensions are laid out in memory in the order ``perm`` (outermost
   first), each dimension is read every ``step`` elements, each dimension's
   allocated extent is ``step * size + pad`` (so strides are not the packed
   ones), ``broadcast`` dimensions have stride 0, and the first element sits
   ``offset`` elements into the storage;
2. the ``views`` (transpose, permute, flatten, unflatten, narrow, select,
   chunk) are applied to the base, exactly as ``torch`` would apply them.

Strides, offset and storage size are computed here analytically, without
torch, so layouts can be reasoned about (alignment, contiguity, span) before
anything is allocated.  :func:`materialize` builds the real tensor with those
strides and fills every storage element outside the view with a poison
pattern (a NaN with a distinctive payload for floating types, ``0xA5`` bytes
otherwise) so that a kernel reading or writing outside its view is caught by
:func:`poison_intact`.

Alignment is reported assuming the allocation itself is aligned to at least
256 bytes (the CUDA caching allocator hands out 512-byte aligned blocks; the
CPU allocator 64): a storage offset of ``o`` elements of ``s`` bytes gives a
data pointer aligned to the largest power of two dividing ``o * s``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "MAX_ALIGNMENT",
    "ViewOp",
    "LayoutSpec",
    "LayoutError",
    "materialize",
    "poison_intact",
    "poison_bytes",
    "data_ptr_alignment",
    "pow2_alignment",
    "describe_tensor",
    "dtype_from_name",
    "dtype_name",
    "DTYPES",
    "MAX_NDIM",
    "MAX_VIEWS",
]

#: Alignments are reported up to this many bytes (what the allocators guarantee at least on CUDA).
MAX_ALIGNMENT = 256
#: Most dims a layout (base or logical) may have, and most view ops: bounds on what a case file can ask for.
MAX_NDIM = 16
MAX_VIEWS = 32

_VIEW_ARITY = {
    "transpose": 2,  # (dim0, dim1)
    "permute": None,  # (*dims)
    "flatten": 2,  # (start_dim, end_dim)
    "unflatten": None,  # (dim, *sizes)
    "narrow": 3,  # (dim, start, length)
    "select": 2,  # (dim, index)
    "chunk": 3,  # (chunks, dim, index)
}


class LayoutError(ValueError):
    """A layout description is inconsistent; the message names the field and the fix."""


#: The dtypes a layout may have: every one materializes, poisons and round-trips through safetensors here.
#: Names are resolved from this table only (never ``getattr(torch, name)``, which would import submodules
#: such as ``torch._dynamo`` for a hostile name); quantized (``qint8``) and packed sub-byte dtypes
#: (``float4_e2m1fn_x2``) cannot be materialized element-wise and are refused when a case is loaded.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``, or the dtype itself) -> ``torch.bfloat16``, from :data:`DTYPES` only."""
    if isinstance(name, torch.dtype):
        if name in _NAMES:
            return name
        raise LayoutError(f"dtype {name} is not supported in a layout; supported: {', '.join(DTYPES)}")
    if not isinstance(name, str):
        raise LayoutError(f"dtype must be a dtype name string, got {type(name).__name__} {name!r}")
    dt = DTYPES.get(name.removeprefix("torch."))
    if dt is None:
        raise LayoutError(f"dtype {name!r} is not a supported dtype name; use one of: {', '.join(DTYPES)}")
    return dt


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (validated against :data:`DTYPES`)."""
    return _NAMES[dtype_from_name(dtype)]


def pow2_alignment(nbytes: int) -> int:
    """Largest power of two dividing ``nbytes``, capped at ``MAX_ALIGNMENT`` (which 0 also gives)."""
    if nbytes == 0:
        return MAX_ALIGNMENT
    return min(nbytes & -nbytes, MAX_ALIGNMENT)


@dataclass(frozen=True)
class ViewOp:
    """One view operation applied after the base layout, with torch's semantics.

    ``op`` is one of transpose, permute, flatten, unflatten, narrow, select,
    chunk; ``args`` are its integer arguments in torch's order (``chunk`` is
    ``(chunks, dim, index)``: take chunk ``index`` of ``x.chunk(chunks, dim)``;
    ``unflatten`` is ``(dim, *sizes)``).
    """

    op: str
    args: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.op not in _VIEW_ARITY:
            raise LayoutError(f"view op {self.op!r} unknown; use one of {sorted(_VIEW_ARITY)}")
        object.__setattr__(self, "args", tuple(int(a) for a in self.args))
        arity = _VIEW_ARITY[self.op]
        if arity is not None and len(self.args) != arity:
            raise LayoutError(f"view op {self.op} takes {arity} integer arguments, got {self.args}")

    @classmethod
    def transpose(cls, dim0: int, dim1: int) -> "ViewOp":
        return cls("transpose", (dim0, dim1))

    @classmethod
    def permute(cls, *dims: int) -> "ViewOp":
        return cls("permute", tuple(dims))

    @classmethod
    def flatten(cls, start_dim: int = 0, end_dim: int = -1) -> "ViewOp":
        return cls("flatten", (start_dim, end_dim))

    @classmethod
    def unflatten(cls, dim: int, sizes: Sequence[int]) -> "ViewOp":
        return cls("unflatten", (dim, *sizes))

    @classmethod
    def narrow(cls, dim: int, start: int, length: int) -> "ViewOp":
        return cls("narrow", (dim, start, length))

    @classmethod
    def select(cls, dim: int, index: int) -> "ViewOp":
        return cls("select", (dim, index))

    @classmethod
    def chunk(cls, chunks: int, dim: int, index: int) -> "ViewOp":
        return cls("chunk", (chunks, dim, index))

    def __str__(self) -> str:
        if self.op == "unflatten":
            return f"unflatten({self.args[0]}, {tuple(self.args[1:])})"
        if self.op == "chunk":
            c, d, i = self.args
            return f"chunk({c}, dim={d})[{i}]"
        return f"{self.op}({', '.join(map(str, self.args))})"

    def apply_torch(self, t: torch.Tensor) -> torch.Tensor:
        """Apply this op to a real tensor with torch's own view functions."""
        a = self.args
        if self.op == "transpose":
            return t.transpose(a[0], a[1])
        if self.op == "permute":
            return t.permute(*a)
        if self.op == "flatten":
            out = t.flatten(a[0], a[1])
            if out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                raise LayoutError(f"{self} copied instead of viewing")
            return out
        if self.op == "unflatten":
            return t.unflatten(a[0], a[1:])
        if self.op == "narrow":
            return t.narrow(a[0], a[1], a[2])
        if self.op == "select":
            return t.select(a[0], a[1])
        if self.op == "chunk":
            return t.chunk(a[0], a[1])[a[2]]
        raise AssertionError(self.op)  # pragma: no cover


def _norm_dim(dim: int, rank: int, what: str) -> int:
    if not -rank <= dim < rank:
        raise LayoutError(f"{what}: dim {dim} out of range for a rank-{rank} tensor")
    return dim % rank


def _apply_view(op: ViewOp, shape: list[int], strides: list[int], offset: int) -> tuple[list[int], list[int], int]:
    """Apply one view op to (shape, strides, offset) analytically, as torch does."""
    a = op.args
    rank = len(shape)
    if op.op == "transpose":
        d0, d1 = _norm_dim(a[0], rank, str(op)), _norm_dim(a[1], rank, str(op))
        shape[d0], shape[d1] = shape[d1], shape[d0]
        strides[d0], strides[d1] = strides[d1], strides[d0]
        return shape, strides, offset
    if op.op == "permute":
        dims = [_norm_dim(d, rank, str(op)) for d in a]
        if sorted(dims) != list(range(rank)):
            raise LayoutError(f"{op}: {a} is not a permutation of {rank} dims")
        return [shape[d] for d in dims], [strides[d] for d in dims], offset
    if op.op == "flatten":
        if rank == 0:
            return [1], [1], offset
        s, e = _norm_dim(a[0], rank, str(op)), _norm_dim(a[1], rank, str(op))
        if s > e:
            raise LayoutError(f"{op}: start_dim {s} is after end_dim {e}")
        # A view exists iff, ignoring size-1 dims, each dim's stride equals the next one's stride * size.
        live = [i for i in range(s, e + 1) if shape[i] != 1]
        for i, j in zip(live, live[1:]):
            if strides[i] != strides[j] * shape[j]:
                raise LayoutError(
                    f"{op} of this layout is not a view (dim {i} stride {strides[i]} != dim {j} stride "
                    f"{strides[j]} x size {shape[j]}): torch would copy; reorder the memory (perm) or drop the flatten"
                )
        size = math.prod(shape[s : e + 1])
        stride = strides[live[-1]] if live else 1
        return shape[:s] + [size] + shape[e + 1 :], strides[:s] + [stride] + strides[e + 1 :], offset
    if op.op == "unflatten":
        d = _norm_dim(a[0], rank, str(op))
        sizes = list(a[1:])
        if not sizes or any(x < 0 for x in sizes) or math.prod(sizes) != shape[d]:
            raise LayoutError(f"{op}: sizes {tuple(sizes)} do not multiply to dim {d}'s size {shape[d]}")
        new_strides = []
        acc = strides[d]
        for x in reversed(sizes):
            new_strides.append(acc)
            acc *= x
        new_strides.reverse()
        return shape[:d] + sizes + shape[d + 1 :], strides[:d] + new_strides + strides[d + 1 :], offset
    if op.op == "narrow":
        d = _norm_dim(a[0], rank, str(op))
        start, length = a[1], a[2]
        if start < 0 or length < 0 or start + length > shape[d]:
            raise LayoutError(f"{op}: [{start}, {start + length}) outside dim {d} of size {shape[d]}")
        shape[d] = length
        return shape, strides, offset + start * strides[d]
    if op.op == "select":
        d = _norm_dim(a[0], rank, str(op))
        idx = a[1]
        if not 0 <= idx < shape[d]:
            raise LayoutError(f"{op}: index {idx} outside dim {d} of size {shape[d]}")
        return shape[:d] + shape[d + 1 :], strides[:d] + strides[d + 1 :], offset + idx * strides[d]
    if op.op == "chunk":
        chunks, dim, idx = a
        d = _norm_dim(dim, rank, str(op))
        if chunks < 1:
            raise LayoutError(f"{op}: chunks must be >= 1, got {chunks}")
        csize = -(-shape[d] // chunks) if shape[d] else 0
        n_actual = -(-shape[d] // csize) if csize else 1
        if not 0 <= idx < n_actual:
            raise LayoutError(f"{op}: index {idx} but dim {d} of size {shape[d]} gives {n_actual} chunks")
        length = min(csize, shape[d] - idx * csize) if csize else 0
        shape[d] = length
        return shape, strides, offset + idx * csize * strides[d]
    raise AssertionError(op.op)  # pragma: no cover


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any, limit: int = 80) -> str:
    """``repr(x)`` cut to ``limit`` characters (an error message never echoes a whole hostile field)."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _tuple_or_none(x: Any) -> tuple[int, ...] | None:
    return None if x is None else tuple(int(v) for v in x)


@dataclass(frozen=True)
class LayoutSpec:
    """A strided view over a larger, poisoned storage.  Frozen, hashable, JSON-serializable.

    ``shape``: logical shape (after ``views``). ``dtype``: torch dtype name.
    ``base_shape``: shape before ``views`` (None: same as ``shape``).
    ``perm``: memory order of the base dims, outermost first (None: identity).
    ``step``: per base dim, the slicing step (None: all 1).
    ``pad``: per base dim, extra elements in the allocated extent (None: all 0).
    ``offset``: storage offset of the base, in elements.
    ``broadcast``: base dims with stride 0 (values must be constant along them).
    ``views``: view ops applied to the base, in order.
    """

    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    base_shape: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None
    step: tuple[int, ...] | None = None
    pad: tuple[int, ...] | None = None
    offset: int = 0
    broadcast: tuple[int, ...] = ()
    views: tuple[ViewOp, ...] = ()
    _geometry: tuple = field(init=False, repr=False, compare=False, hash=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("shape", tuple(int(s) for s in self.shape))
        set_("dtype", dtype_name(self.dtype))
        set_("base_shape", _tuple_or_none(self.base_shape))
        set_("perm", _tuple_or_none(self.perm))
        set_("step", _tuple_or_none(self.step))
        set_("pad", _tuple_or_none(self.pad))
        set_("offset", int(self.offset))
        set_("broadcast", tuple(sorted(int(d) for d in self.broadcast)))
        set_("views", tuple(v if isinstance(v, ViewOp) else ViewOp(v[0], tuple(v[1])) for v in self.views))
        if len(self.shape) > MAX_NDIM or (self.base_shape is not None and len(self.base_shape) > MAX_NDIM):
            raise LayoutError(f"a layout may have at most {MAX_NDIM} dims")
        if len(self.views) > MAX_VIEWS:
            raise LayoutError(f"a layout may have at most {MAX_VIEWS} view ops, got {len(self.views)}")
        if any(s < 0 for s in self.shape):
            raise LayoutError(f"shape {self.shape} has a negative size")
        base = self.base_shape if self.base_shape is not None else self.shape
        if self.base_shape is None and self.views:
            raise LayoutError("views need base_shape (the shape before the views)")
        n = len(base)
        if any(s < 0 for s in base):
            raise LayoutError(f"base_shape {base} has a negative size")
        if self.perm is not None and sorted(self.perm) != list(range(n)):
            raise LayoutError(f"perm {self.perm} is not a permutation of range({n}) (one entry per base dim)")
        if self.step is not None and (len(self.step) != n or any(s < 1 for s in self.step)):
            raise LayoutError(f"step {self.step} needs {n} entries, each >= 1")
        if self.pad is not None and (len(self.pad) != n or any(p < 0 for p in self.pad)):
            raise LayoutError(f"pad {self.pad} needs {n} entries, each >= 0")
        if self.offset < 0:
            raise LayoutError(f"offset {self.offset} must be >= 0 (elements)")
        if len(set(self.broadcast)) != len(self.broadcast) or any(not 0 <= d < n for d in self.broadcast):
            raise LayoutError(f"broadcast {self.broadcast} must be distinct base dims in range({n})")
        set_("_geometry", self._compute_geometry(base))
        if tuple(self._geometry[0]) != self.shape:
            raise LayoutError(
                f"views {[str(v) for v in self.views]} turn base_shape {base} into {tuple(self._geometry[0])}, "
                f"not shape {self.shape}"
            )

    def _compute_geometry(self, base: tuple[int, ...]) -> tuple:
        n = len(base)
        perm = self.perm or tuple(range(n))
        step = self.step or (1,) * n
        pad = self.pad or (0,) * n
        extent = [1 if d in self.broadcast else base[d] * step[d] + pad[d] for d in range(n)]
        alloc_stride = [0] * n
        acc = 1
        for d in reversed(perm):
            alloc_stride[d] = acc
            acc *= extent[d]
        numel_alloc = acc
        strides = [0 if d in self.broadcast else alloc_stride[d] * step[d] for d in range(n)]
        shape, offset = list(base), self.offset
        for op in self.views:
            shape, strides, offset = _apply_view(op, list(shape), list(strides), offset)
        return tuple(shape), tuple(strides), offset, self.offset + numel_alloc

    @classmethod
    def contiguous(cls, shape: Sequence[int], dtype: str | torch.dtype = "bfloat16") -> "LayoutSpec":
        """The plain layout: packed, row-major, offset 0."""
        return cls(tuple(shape), dtype_name(dtype))

    def replace(self, **changes: Any) -> "LayoutSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ queries
    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def strides(self) -> tuple[int, ...]:
        """Strides of the final view, in elements."""
        return self._geometry[1]

    def storage_offset(self) -> int:
        """Storage offset of the final view, in elements."""
        return self._geometry[2]

    def storage_numel(self) -> int:
        """Elements in the whole storage (offset + allocation)."""
        return self._geometry[3]

    def alignment(self) -> int:
        """Data-pointer alignment in bytes (power of two, capped at MAX_ALIGNMENT)."""
        return pow2_alignment(self.storage_offset() * self.itemsize)

    def last_stride(self) -> int | None:
        """Stride of the last dimension (None for a 0-d tensor)."""
        return self.strides()[-1] if self.shape else None

    def is_contiguous(self) -> bool:
        """torch's notion: row-major packed, ignoring size-1 dims (the offset does not matter)."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides())):
            if size == 1:
                continue
            if stride != expected:
                return self.numel == 0
            expected *= size
        return True

    def leading_dimension(self) -> int | None:
        """For a matrix (last two dims): the stride of the non-unit-stride dim.

        Row-major (last stride 1) gives the row stride, column-major the column
        stride; None when neither of the last two dims has stride 1 or rank < 2.
        """
        if self.ndim < 2:
            return None
        s_row, s_col = self.strides()[-2:]
        r, c = self.shape[-2:]
        if s_col == 1 or c == 1:
            return s_row
        if s_row == 1 or r == 1:
            return s_col
        return None

    def leading_dimension_alignment(self) -> int | None:
        """Byte alignment of the leading dimension (see :meth:`leading_dimension`)."""
        ld = self.leading_dimension()
        return None if ld is None else pow2_alignment(ld * self.itemsize)

    def span_bytes(self) -> int:
        """Bytes from the first to one past the last element the view touches."""
        if self.numel == 0:
            return 0
        return (sum((s - 1) * abs(st) for s, st in zip(self.shape, self.strides())) + 1) * self.itemsize

    def is_plain(self) -> bool:
        """Contiguous and 16-byte aligned: what every kernel accepts."""
        return self.is_contiguous() and self.alignment() >= 16

    def describe(self) -> str:
        """One line a human can read in a failure message."""
        parts = [f"{self.dtype}{list(self.shape)}", f"strides {self.strides()}", f"offset {self.storage_offset()}"]
        parts.append(f"ptr align {self.alignment()}B")
        flags = ["contiguous" if self.is_contiguous() else "non-contiguous"]
        if self.shape and self.last_stride() != 1:
            flags.append(f"last stride {self.last_stride()}")
        if any(st == 0 and sz > 1 for sz, st in zip(self.shape, self.strides())):
            flags.append("broadcast")
        parts.append(", ".join(flags))
        extra = []
        if self.views:
            extra.append(f"base {list(self.base_shape)} then " + " . ".join(map(str, self.views)))
        if self.perm and self.perm != tuple(range(len(self.perm))):
            extra.append(f"memory order {self.perm}")
        if self.step and any(s != 1 for s in self.step):
            extra.append(f"step {self.step}")
        if self.pad and any(self.pad):
            extra.append(f"pad {self.pad}")
        line = "; ".join(parts)
        return line + (f" [{'; '.join(extra)}]" if extra else "")

    def __str__(self) -> str:
        return self.describe()

    # ------------------------------------------------------------------ shrinking helpers
    def simplifications(self) -> Iterator[tuple[str, "LayoutSpec"]]:
        """Simpler layouts with the same logical shape and dtype, one property removed at a time.

        Yields ``(what was removed, spec)``; used by ``harness minimize``.  The
        end point of repeated simplification is ``LayoutSpec.contiguous``.
        Views are only dropped whole (they define the logical shape together
        with ``base_shape``), replaced by a plain base of the logical shape.
        """
        if self.views:
            yield "view ops", LayoutSpec(self.shape, self.dtype, offset=self.offset)
        candidates: list[tuple[str, dict]] = []
        if self.offset:
            candidates.append((f"offset {self.offset}", {"offset": 0}))
            if self.offset * self.itemsize % 16:  # the nearest 16-byte aligned offset below (itemsize <= 8)
                aligned = self.offset - (self.offset * self.itemsize % 16) // self.itemsize
                candidates.append(("misalignment", {"offset": aligned}))
        if self.broadcast:
            candidates.append(("broadcast", {"broadcast": ()}))
        if self.perm and self.perm != tuple(range(len(self.perm))):
            candidates.append(("permuted memory order", {"perm": None}))
        if self.step and any(s != 1 for s in self.step):
            candidates.append(("steps", {"step": None}))
        if self.pad and any(self.pad):
            candidates.append(("padding", {"pad": None}))
        for what, change in candidates:
            try:
                yield what, self.replace(**change)
            except LayoutError:
                continue

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.base_shape is not None:
            d["base_shape"] = list(self.base_shape)
        for k in ("perm", "step", "pad"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v)
        if self.offset:
            d["offset"] = self.offset
        if self.broadcast:
            d["broadcast"] = list(self.broadcast)
        if self.views:
            d["views"] = [{"op": v.op, "args": list(v.args)} for v in self.views]
        return d

    def to_json(self) -> str:
        """Compact JSON text; :meth:`from_json` inverts it exactly."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayoutSpec":
        if not isinstance(d, dict):
            raise LayoutError(f"a layout must be a JSON object, got {type(d).__name__}")
        allowed = {"shape", "dtype", "base_shape", "perm", "step", "pad", "offset", "broadcast", "views"}
        unknown = set(d) - allowed
        if unknown:
            raise LayoutError(f"unknown layout fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "shape" not in d:
            raise LayoutError("layout is missing 'shape'")

        def ints(key: str, most: int = MAX_NDIM) -> tuple[int, ...] | None:
            v = d.get(key)
            if v is None:
                return None
            if not isinstance(v, list) or not all(_is_int(x) for x in v):
                raise LayoutError(f"layout field {key!r} must be a list of integers, got {_short(v)}")
            if len(v) > most:
                raise LayoutError(f"layout field {key!r} has {len(v)} entries; at most {most} are supported")
            return tuple(v)

        views = d.get("views", [])
        if not isinstance(views, list):
            raise LayoutError(f"layout field 'views' must be a list, got {_short(views)}")
        if len(views) > MAX_VIEWS:
            raise LayoutError(f"layout has {len(views)} view ops; at most {MAX_VIEWS} are supported")
        ops = []
        for v in views:
            if (
                not isinstance(v, dict)
                or set(v) != {"op", "args"}
                or not isinstance(v["op"], str)
                or not isinstance(v["args"], list)
                or not all(_is_int(a) for a in v["args"])
                or len(v["args"]) > MAX_NDIM + 1
            ):
                raise LayoutError(f"each view must be {{'op': str, 'args': [int, ...]}}, got {_short(v)}")
            ops.append(ViewOp(v["op"], tuple(v["args"])))
        offset = d.get("offset", 0)
        if not _is_int(offset):
            raise LayoutError(f"layout field 'offset' must be an integer, got {_short(offset)}")
        dtype = d.get("dtype", "bfloat16")
        if not isinstance(dtype, str):
            raise LayoutError(f"layout field 'dtype' must be a dtype name string, got {_short(dtype)}")
        return cls(
            shape=ints("shape") or (),
            dtype=dtype,
            base_shape=ints("base_shape"),
            perm=ints("perm"),
            step=ints("step"),
            pad=ints("pad"),
            offset=offset,
            broadcast=ints("broadcast") or (),
            views=tuple(ops),
        )

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> "LayoutSpec":
        """Parse :meth:`to_json` output (or an already-decoded dict), validating every field."""
        if isinstance(text, dict):
            return cls.from_dict(text)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayoutError(f"layout JSON does not parse: {e}") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------- poison
_NAN_PATTERNS: dict[torch.dtype, bytes] = {
    # quiet NaNs with a payload that no arithmetic produces (torch's canonical NaNs differ)
    torch.float64: (0x7FF8A5A5A5A5A5A5).to_bytes(8, "little"),
    torch.float32: (0x7FC5A5A5).to_bytes(4, "little"),
    torch.float16: (0x7E5A).to_bytes(2, "little"),
    torch.bfloat16: (0x7FE5).to_bytes(2, "little"),
    torch.float8_e4m3fn: bytes([0x7F]),  # e4m3fn has a single NaN pattern per sign
    torch.float8_e5m2: bytes([0x7D]),
}


def poison_bytes(dtype: torch.dtype | str) -> bytes:
    """The byte pattern of one poisoned element of ``dtype``."""
    dt = dtype_from_name(dtype)
    if dt in _NAN_PATTERNS:
        return _NAN_PATTERNS[dt]
    if dt == torch.bool:
        return b"\x01"
    size = dt.itemsize
    return b"\xa5" * size


def _poison_pattern(dtype: torch.dtype | str, device: torch.device) -> torch.Tensor:
    """The bytes of one poisoned element of ``dtype``, as a uint8 tensor on ``device``."""
    return torch.frombuffer(bytearray(poison_bytes(dtype)), dtype=torch.uint8).to(device)


def _poisoned_storage(spec: LayoutSpec, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``spec.storage_numel()`` elements, every one poisoned (filled on ``device``)."""
    return _poison_pattern(spec.dtype, device).repeat(spec.storage_numel()).view(spec.torch_dtype)


def _collapsed(shape: Sequence[int], strides: Sequence[int]) -> tuple[list[int], list[int]]:
    """``shape`` with stride-0 dims reduced to size 1; also the dims that were broadcast."""
    bdims = [i for i, (sz, st) in enumerate(zip(shape, strides)) if st == 0 and sz > 1]
    return [1 if i in bdims else s for i, s in enumerate(shape)], bdims


def materialize(spec: LayoutSpec, values: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A tensor laid out as ``spec`` holding ``values`` (a tensor of the logical shape).

    Every storage element outside the view holds the poison pattern.  The
    result's strides and storage offset equal ``spec.strides()`` and
    ``spec.storage_offset()`` exactly.  ``values`` is read, never modified;
    it is converted to the spec's dtype (out-of-range values convert as torch's
    cast does on that device, which differs by version for FP8 — clamp first
    if that matters).  Along broadcast dims ``values`` must be constant.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor of shape {spec.shape}, got {type(values).__name__}")
    if tuple(values.shape) != spec.shape:
        raise LayoutError(f"values have shape {tuple(values.shape)}, the layout's logical shape is {spec.shape}")
    dev = torch.device(device) if device is not None else values.device
    if dev.type == "cuda" and values.device.type == "cpu" and _host_cast_ok(values.dtype, spec.torch_dtype):
        return _upload(spec, materialize(spec, values, "cpu"), dev)
    storage = _poisoned_storage(spec, dev)
    out = storage.as_strided(spec.shape, spec.strides(), spec.storage_offset())
    src = values.detach().to(device=dev, dtype=spec.torch_dtype)
    cstrides = spec.strides()
    cshape, bdims = _collapsed(spec.shape, cstrides)
    if bdims:
        index = tuple(slice(0, 1) if i in bdims else slice(None) for i in range(spec.ndim))
        first = src[index]
        # compare bytes: works for every dtype (FP8 included) and treats identical NaNs as equal
        same = torch.equal(first.expand(spec.shape).contiguous().view(torch.uint8), src.contiguous().view(torch.uint8))
        if not same:
            raise LayoutError(f"values vary along broadcast (stride-0) dims {bdims}; they must be constant there")
        src = first
    if spec.numel:
        storage.as_strided(cshape, cstrides, spec.storage_offset()).copy_(src)
    return out


def _host_cast_ok(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` values to ``dst`` on the host gives the device's bits: always, except into an FP8
    dtype (out-of-range values convert differently by device and version), which stays on the device."""
    return src == dst or dst.itemsize != 1 or not dst.is_floating_point


def _upload(spec: LayoutSpec, host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (materialized for ``spec`` on the CPU) on the CUDA ``device``: its whole storage in one copy
    that does not wait for the GPU (``non_blocking`` from pageable memory: the driver stages the bytes before
    it returns).  A blocking copy waits for the GPU every time, and several processes sharing a GPU take turns
    for every such wait."""
    raw = torch.empty(0, dtype=torch.uint8).set_(host.untyped_storage())
    on_dev = raw.to(device, non_blocking=True)
    return on_dev.view(spec.torch_dtype).as_strided(spec.shape, spec.strides(), spec.storage_offset())


def _view_mask(spec: LayoutSpec, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(spec.storage_numel(), dtype=torch.bool, device=device)
    strides = spec.strides()
    cshape, _ = _collapsed(spec.shape, strides)
    if spec.numel:
        mask.as_strided(cshape, strides, spec.storage_offset()).fill_(True)
    return mask


def poison_intact(tensor: torch.Tensor, spec: LayoutSpec) -> bool:
    """True when every storage element outside ``spec``'s view still holds the poison pattern.

    ``tensor`` must be what :func:`materialize` returned for ``spec`` (same storage).
    """
    storage = tensor.untyped_storage()
    if storage.nbytes() != spec.storage_numel() * spec.itemsize:
        raise LayoutError(
            f"tensor's storage holds {storage.nbytes()} bytes, the layout's {spec.storage_numel() * spec.itemsize}: "
            "not a tensor materialized from this spec"
        )
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage).view(-1, spec.itemsize)
    outside = ~_view_mask(spec, tensor.device)
    pattern = _poison_pattern(spec.dtype, tensor.device)
    return bool((raw[outside] == pattern).all())


def data_ptr_alignment(tensor: torch.Tensor) -> int:
    """The actual alignment in bytes of ``tensor.data_ptr()`` (power of two, capped at MAX_ALIGNMENT)."""
    return pow2_alignment(tensor.data_ptr())


def describe_tensor(tensor: torch.Tensor) -> str:
    """One line: dtype, shape, strides, storage offset, pointer alignment, contiguity, device."""
    flags = "contiguous" if tensor.is_contiguous() else "non-contiguous"
    return (
        f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}; strides {tuple(tensor.stride())}; "
        f"offset {tensor.storage_offset()}; ptr align {data_ptr_alignment(tensor)}B; {flags}; {tensor.device}"
    )
