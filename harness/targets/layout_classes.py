"""Named layout classes the matrix sweeps, per op kind (linear inputs, attention q/k/v).

A *layout class* is one way model code hands a tensor to a kernel: a transposed
view, a pointer misaligned by 2 bytes, a chunk of a packed projection, a
sequence length that misses the kernel's tile, ...  Each class is a function
``draw(rng, ctx) -> Draw``: given a ``random.Random``-like source and a
:class:`Context` (dtype, size preset, allowed ranks/head dims), it returns the
input layouts, value recipes and parameters of one example.

Why a ``random.Random`` and not a Hypothesis strategy: the matrix is a
production driver, it needs cases from a seed, deterministically, without
Hypothesis' test-time machinery (``strategy.example()`` is not for that).
The same ``draw`` function serves both worlds:

- the matrix calls it with ``random.Random(f"{target}|{class}|{index}")``
  (string seeds hash the same on every machine), so case *i* of a cell is
  always the same case;
- tests get a Hypothesis strategy with ``st.randoms(use_true_random=False)``
  mapped through ``draw``: every ``rng`` call becomes a Hypothesis choice, so
  examples shrink.  Every choice here is ordered simplest-first (an index into
  a list whose first entry is the smallest size, batch 1, offset variant 0),
  so a failing example shrinks toward the smallest tensor that still has the
  class's layout property.

The layout families themselves (an alignment class's offset, a chunk of a
packed projection, a transpose view, heads split from a (packed) projection)
are built once, by the spec builders below (:func:`aligned_offset`,
:func:`packed_chunk`, :func:`swapped_view`, :func:`head_view`), from drawn
parameters.  The Hypothesis strategies of :mod:`harness.strategies` call the
same builders; a class here, like a strategy there, only draws parameters.
This module does not import Hypothesis.

Sizes: ``Context.size = "small"`` (default, CPU friendly, capped by
``HARNESS_MAX_ELEMENTS``) or ``"wan"`` (Wan2.1 widths and token counts, for
GPU runs).  Linear widths are multiples of 16, as ``torch._scaled_mm`` needs K
and N to be.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

from harness.layouts import LayoutSpec, ViewOp, dtype_from_name
from harness.values import ValueSpec

__all__ = [
    "Context",
    "Draw",
    "LayoutClass",
    "LINEAR_CLASSES",
    "ATTENTION_CLASSES",
    "classes_for",
    "SIZE_PRESETS",
    "ALIGNMENT_CLASSES",
    "aligned_offset",
    "packed_chunk",
    "swapped_view",
    "head_view",
]

_SEED_RANGE = 2**31  # value-recipe seeds; shrink toward 0


@dataclass(frozen=True)
class Context:
    """What a layout class may draw for one target.

    ``dtype``: element dtype of the swept tensor(s) (activation or q/k/v).
    ``size``: "small" or "wan" (see ``SIZE_PRESETS``).
    ``ranks``: activation ranks the op accepts (linear; e.g. (2,) for raw ``_scaled_mm``).
    ``head_dims``: head dims the backend supports (attention).
    ``max_elements``: cap on the elements of one swept tensor.
    """

    dtype: str = "bfloat16"
    size: str = "small"
    ranks: tuple[int, ...] = (2, 3, 4)
    head_dims: tuple[int, ...] = (64, 128)
    max_elements: int = 1 << 16

    def __post_init__(self) -> None:
        if self.size not in SIZE_PRESETS:
            raise ValueError(f"size={self.size!r} unknown; use one of {sorted(SIZE_PRESETS)}")
        dtype_from_name(self.dtype)
        if not self.ranks or any(r not in (2, 3, 4) for r in self.ranks):
            raise ValueError(f"ranks={self.ranks!r} must be a non-empty subset of (2, 3, 4)")
        if not self.head_dims or any(d < 1 for d in self.head_dims):
            raise ValueError(f"head_dims={self.head_dims!r} must be positive integers")
        if self.max_elements < 1:
            raise ValueError(f"max_elements={self.max_elements} must be >= 1")

    @property
    def itemsize(self) -> int:
        return dtype_from_name(self.dtype).itemsize

    @property
    def preset(self) -> dict[str, tuple[int, ...]]:
        return SIZE_PRESETS[self.size]


#: Sizes per preset, each list ordered simplest (smallest) first: shrinking goes there.
SIZE_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "small": {
        "k": (16, 32, 64, 128),  # in_features, multiple of 16
        "n": (16, 32, 48, 64),  # out_features, multiple of 16
        "tokens": (1, 7, 16, 33, 77),  # odd counts miss every tile
        "batch": (1, 2),
        "heads": (1, 2),
        "seq": (16, 64, 100),
        "frames": (2, 3),
    },
    "wan": {
        "k": (1536, 5120),
        "n": (1536, 5120),
        "tokens": (77, 512, 1560),
        "batch": (1, 2),
        "heads": (2, 12),
        "seq": (512, 1560),
        "frames": (2, 3),
    },
}


class Draw(NamedTuple):
    """One example of a layout class: input layouts and value recipes by name, plus op parameters."""

    layouts: dict[str, LayoutSpec]
    values: dict[str, ValueSpec]
    params: dict[str, Any]


@dataclass(frozen=True)
class LayoutClass:
    """A named layout class: ``draw(rng, ctx) -> Draw``, for op ``kind``, applicable when ``applies(ctx)``."""

    name: str
    kind: str
    doc: str
    draw: Callable[[random.Random, Context], Draw]
    applies: Callable[[Context], bool] = field(default=lambda ctx: True)

    def __call__(self, rng: random.Random, ctx: Context) -> Draw:
        if not self.applies(ctx):
            raise ValueError(f"layout class {self.name!r} does not apply to {ctx}")
        return self.draw(rng, ctx)


def _pick(rng: random.Random, options: Sequence[Any]) -> Any:
    """``options[i]`` with i drawn uniformly; under Hypothesis it shrinks to ``options[0]``."""
    return options[rng.randint(0, len(options) - 1)]


def _seed(rng: random.Random) -> int:
    return rng.randrange(_SEED_RANGE)


def _fit(options: Sequence[int], budget: float) -> tuple[int, ...]:
    """Options that fit ``budget`` (always at least the smallest)."""
    fit = tuple(o for o in options if o <= budget)
    return fit or (min(options),)


# ------------------------------------------------------------------------------------ layout families
# Spec builders from already-drawn parameters, shared with harness.strategies: each family is written here once.

#: Pointer alignment classes (bytes) a kernel can be handed: misaligned by 1, 2, 4, 8, or aligned at 16.
ALIGNMENT_CLASSES = (1, 2, 4, 8, 16)


def aligned_offset(alignment: int, itemsize: int, k: int = 0, *, nonzero: bool = False) -> int:
    """The ``k``-th smallest element offset whose data pointer is aligned to exactly ``alignment`` bytes.

    ``alignment=16`` means "aligned to at least 16" (multiples of 16 bytes,
    from 0; ``nonzero=True`` skips 0).  ValueError when the alignment is not a
    class or impossible for the element size (a 2-byte tensor cannot be 1-byte aligned).
    """
    if alignment not in ALIGNMENT_CLASSES:
        raise ValueError(f"alignment={alignment!r} must be one of {ALIGNMENT_CLASSES}")
    if alignment < itemsize:
        raise ValueError(
            f"alignment={alignment} bytes is impossible for {itemsize}-byte elements: a storage offset moves the "
            f"pointer in steps of {itemsize} bytes; use one of {[a for a in ALIGNMENT_CLASSES if a >= itemsize]}"
        )
    if alignment == 16:
        return (k + nonzero) * (16 // itemsize)
    return (alignment // itemsize) * (2 * k + 1)


def packed_chunk(shape: Sequence[int], dtype: str, parts: int, index: int, **extras: object) -> LayoutSpec:
    """Chunk ``index`` of ``parts`` of a packed (..., parts * C) projection: ``x.chunk(parts, -1)[index]``.

    ``extras`` (perm, step, pad, offset, broadcast) apply to the packed base.
    """
    shape = tuple(shape)
    return LayoutSpec(
        shape, dtype, base_shape=shape[:-1] + (shape[-1] * parts,), views=(ViewOp.chunk(parts, -1, index),), **extras
    )  # type: ignore[arg-type]


def swapped_view(shape: Sequence[int], dtype: str, dim0: int, dim1: int, **extras: object) -> LayoutSpec:
    """``base.transpose(dim0, dim1)`` of a contiguous base whose dims ``dim0`` and ``dim1`` are swapped."""
    shape = tuple(shape)
    base = list(shape)
    base[dim0], base[dim1] = shape[dim1], shape[dim0]
    return LayoutSpec(shape, dtype, base_shape=tuple(base), views=(ViewOp.transpose(dim0, dim1),), **extras)  # type: ignore[arg-type]


def head_view(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    dtype: str,
    tensor_layout: str,
    *,
    packed_index: int | None,
    offset: int = 0,
) -> LayoutSpec:
    """q/k/v as model code makes them: a (b, s, C) projection split into heads, transposed for HND.

    ``packed_index`` = i takes part i of one packed (b, s, 3C) qkv projection.
    """
    c = heads * head_dim
    if packed_index is None:
        base = (batch, seq, c)
        ops: tuple[ViewOp, ...] = (ViewOp.unflatten(-1, (heads, head_dim)),)
    else:
        base = (batch, seq, 3 * c)
        ops = (ViewOp.unflatten(-1, (3, heads, head_dim)), ViewOp.select(2, packed_index))
    if tensor_layout == "HND":
        ops = ops + (ViewOp.transpose(1, 2),)
        shape = (batch, heads, seq, head_dim)
    else:
        shape = (batch, seq, heads, head_dim)
    return LayoutSpec(shape, dtype, base_shape=base, views=ops, offset=offset)


# ------------------------------------------------------------------------------------ linear


class _Act(NamedTuple):
    shape: tuple[int, ...]
    k: int
    n: int


def _act_shape(
    rng: random.Random,
    ctx: Context,
    rank: int | None = None,
    *,
    min_batch: int = 1,
    min_tokens: int = 1,
    k_options: Sequence[int] | None = None,
) -> _Act:
    """Draw (shape, K, N) of an activation of ``rank`` (default: the largest rank the op accepts, <= 3)."""
    p = ctx.preset
    if rank is None:
        rank = 3 if 3 in ctx.ranks else max(ctx.ranks)
    k = _pick(rng, tuple(k_options or p["k"]))
    n = _pick(rng, p["n"])
    per_token = k
    batch = _pick(rng, tuple(b for b in p["batch"] if b >= min_batch) or (max(p["batch"]),)) if rank >= 3 else 1
    frames = _pick(rng, p["frames"]) if rank == 4 else 1
    tokens = _pick(
        rng, _fit(tuple(t for t in p["tokens"] if t >= min_tokens), ctx.max_elements / (per_token * batch * frames))
    )
    shape = {2: (tokens, k), 3: (batch, tokens, k), 4: (batch, frames, tokens, k)}[rank]
    return _Act(shape, k, n)


def _linear_draw(spec: LayoutSpec, act: _Act, values: ValueSpec) -> Draw:
    return Draw({"x": spec}, {"x": values}, {"in_features": act.k, "out_features": act.n})


def _normal(rng: random.Random) -> ValueSpec:
    return ValueSpec("normal", _seed(rng))


def _lin_contiguous(rng, ctx):
    a = _act_shape(rng, ctx)
    return _linear_draw(LayoutSpec.contiguous(a.shape, ctx.dtype), a, _normal(rng))


def _lin_transposed(rng, ctx):
    a = _act_shape(rng, ctx, min_tokens=2)
    n = len(a.shape)
    perm = tuple(range(n - 2)) + (n - 1, n - 2)  # K outer, tokens inner: a column-major activation
    return _linear_draw(LayoutSpec(a.shape, ctx.dtype, perm=perm), a, _normal(rng))


def _lin_last_stride_2(rng, ctx):
    a = _act_shape(rng, ctx)
    step = (1,) * (len(a.shape) - 1) + (2,)
    return _linear_draw(LayoutSpec(a.shape, ctx.dtype, step=step), a, _normal(rng))


def _lin_padded_rows(rng, ctx):
    a = _act_shape(rng, ctx, min_tokens=2)  # one row has no leading dimension to pad
    pad = (0,) * (len(a.shape) - 1) + (_pick(rng, (1, 3, 7)),)  # odd leading dimension K + pad
    return _linear_draw(LayoutSpec(a.shape, ctx.dtype, pad=pad), a, _normal(rng))


def _lin_offset(nbytes: int) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _act_shape(rng, ctx)
        off = aligned_offset(nbytes, ctx.itemsize, rng.randint(0, 2), nonzero=True)
        return _linear_draw(LayoutSpec(a.shape, ctx.dtype, offset=off), a, _normal(rng))

    return draw


def _lin_packed_slice(rng, ctx):
    a = _act_shape(rng, ctx, min_tokens=2)  # the row stride shows only from the second row on
    parts = _pick(rng, (3, 2))  # qkv or kv projection
    index = rng.randint(0, parts - 1)
    return _linear_draw(packed_chunk(a.shape, ctx.dtype, parts, index), a, _normal(rng))


def _lin_flatten_permuted(rng, ctx):
    # (B, S, H, d) heads laid out sequence-major in memory (S, B, H, d), merged with flatten(2):
    # a view (torch would copy if the heads themselves were permuted), strides (C, B*C, 1).
    rank = 3 if 3 in ctx.ranks else max(ctx.ranks)
    a = _act_shape(rng, ctx, rank, min_batch=2, min_tokens=2)
    b, s, k = a.shape[0], a.shape[-2], a.k
    d = 16 if k < 64 else 64
    heads = k // d
    base = (b, s, heads, d) if rank == 3 else (b, a.shape[1], s, heads, d)
    perm = (1, 0, 2, 3) if rank == 3 else (1, 2, 0, 3, 4)
    spec = LayoutSpec(a.shape, ctx.dtype, base_shape=base, perm=perm, views=(ViewOp.flatten(rank - 1, rank),))
    return _linear_draw(spec, a, _normal(rng))


def _lin_broadcast(rng, ctx):
    rank = 3 if 3 in ctx.ranks else max(ctx.ranks)
    a = _act_shape(rng, ctx, rank, min_batch=2, min_tokens=2)
    dim = _pick(rng, (0, 1) if rank >= 3 else (0,))  # expanded batch, or one token expanded over the sequence
    return _linear_draw(LayoutSpec(a.shape, ctx.dtype, broadcast=(dim,)), a, _normal(rng))


def _lin_rank(rank: int) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _act_shape(rng, ctx, rank, min_batch=2 if rank >= 3 else 1)
        return _linear_draw(LayoutSpec.contiguous(a.shape, ctx.dtype), a, _normal(rng))

    return draw


def _lin_values(kind: str, params: dict[str, Any]) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _act_shape(rng, ctx)
        return _linear_draw(
            LayoutSpec.contiguous(a.shape, ctx.dtype), a, ValueSpec(kind, _seed(rng), tuple(params.items()))
        )

    return draw


def _rank_ok(*ranks: int) -> Callable[[Context], bool]:
    return lambda ctx: any(r in ctx.ranks for r in ranks)


def _offset_ok(nbytes: int) -> Callable[[Context], bool]:
    return lambda ctx: nbytes >= ctx.itemsize


def _high_rank(ctx: Context) -> bool:
    return any(r >= 3 for r in ctx.ranks)


LINEAR_CLASSES: dict[str, LayoutClass] = {
    c.name: c
    for c in [
        LayoutClass("contiguous", "linear", "packed row-major activation, offset 0 (the control)", _lin_contiguous),
        LayoutClass(
            "transposed",
            "linear",
            "last two dims swapped in memory: column-major activation, last stride != 1",
            _lin_transposed,
        ),
        LayoutClass(
            "last_stride_2",
            "linear",
            "every other element of the channel dim (step 2): last stride 2",
            _lin_last_stride_2,
        ),
        LayoutClass(
            "padded_rows", "linear", "rows padded by an odd count: odd leading dimension K + 1/3/7", _lin_padded_rows
        ),
        *[
            LayoutClass(
                f"offset_{b}",
                "linear",
                (
                    f"storage offset so the data pointer is exactly {b}-byte aligned"
                    if b < 16
                    else "non-zero storage offset keeping 16-byte alignment (the aligned control)"
                ),
                _lin_offset(b),
                _offset_ok(b),
            )
            for b in (1, 2, 4, 8, 16)
        ],
        LayoutClass(
            "packed_slice",
            "linear",
            "chunk i of a packed (..., 2K or 3K) kv/qkv projection: row stride 2K/3K, offset i*K",
            _lin_packed_slice,
        ),
        LayoutClass(
            "flatten_permuted",
            "linear",
            "flatten(2) of (B, S, H, d) heads stored sequence-major (S, B, H, d): batch stride C, token stride B*C",
            _lin_flatten_permuted,
            _high_rank,
        ),
        LayoutClass(
            "broadcast", "linear", "stride-0 batch or token dim (an expanded modulation / embedding)", _lin_broadcast
        ),
        LayoutClass("2d", "linear", "contiguous (tokens, K)", _lin_rank(2), _rank_ok(2)),
        LayoutClass("3d", "linear", "contiguous (B, S, K), B = 2", _lin_rank(3), _rank_ok(3)),
        LayoutClass("4d", "linear", "contiguous (B, F, S, K), B = 2", _lin_rank(4), _rank_ok(4)),
        LayoutClass(
            "values_beyond_448",
            "linear",
            "contiguous; a quarter of the values at 448, 464, 480 and 1e4 (beyond FP8 E4M3's max)",
            _lin_values("fp8_edge", {"beyond": True}),
        ),
        LayoutClass(
            "outliers",
            "linear",
            "contiguous; two channels scaled by 100-1000 (DiT activation outliers)",
            _lin_values("outliers", {}),
        ),
    ]
}


# ------------------------------------------------------------------------------------ attention


class _Att(NamedTuple):
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    layout: str


def _att_sizes(
    rng: random.Random,
    ctx: Context,
    *,
    layout: str | None = None,
    seq: int | None = None,
    min_batch: int = 1,
    min_heads: int = 1,
) -> _Att:
    p = ctx.preset
    lay = layout or _pick(rng, ("HND", "NHD"))
    d = _pick(rng, tuple(sorted(ctx.head_dims)))
    batch = _pick(rng, tuple(b for b in p["batch"] if b >= min_batch) or (max(p["batch"]),))
    heads = _pick(rng, tuple(h for h in p["heads"] if h >= min_heads) or (max(p["heads"]),))
    if seq is None:
        s = _pick(rng, _fit(p["seq"], ctx.max_elements / (batch * heads * d)))
        return _Att(batch, heads, s, s, d, lay)
    return _Att(batch, heads, seq, seq, d, lay)


def _logical(a: _Att, seq: int) -> tuple[int, ...]:
    return (a.batch, a.heads, seq, a.head_dim) if a.layout == "HND" else (a.batch, seq, a.heads, a.head_dim)


def _att_draw(a: _Att, specs: dict[str, LayoutSpec], rng: random.Random) -> Draw:
    values = {n: ValueSpec("normal", _seed(rng)) for n in "qkv"}
    return Draw(
        specs,
        values,
        {
            "tensor_layout": a.layout,
            "is_causal": False,
            "batch": a.batch,
            "heads": a.heads,
            "seq_q": a.seq_q,
            "seq_k": a.seq_k,
            "head_dim": a.head_dim,
        },
    )


def _att_contiguous(layout: str) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _att_sizes(rng, ctx, layout=layout)
        return _att_draw(
            a, {n: LayoutSpec.contiguous(_logical(a, a.seq_q if n == "q" else a.seq_k), ctx.dtype) for n in "qkv"}, rng
        )

    return draw


def _att_transposed_view(rng, ctx):
    # SDPA-style: (B, S, H, d) projections viewed as (B, H, S, d) with transpose(1, 2).
    a = _att_sizes(rng, ctx, layout="HND", min_heads=2)
    specs = {n: swapped_view(_logical(a, a.seq_q if n == "q" else a.seq_k), ctx.dtype, 1, 2) for n in "qkv"}
    return _att_draw(a, specs, rng)


def _att_packed_qkv(rng, ctx):
    # q, k, v = slices i = 0, 1, 2 of one (B, S, 3C) projection, split into heads (NHD; HND adds a transpose).
    a = _att_sizes(rng, ctx)
    specs = {
        n: head_view(a.batch, a.seq_q, a.heads, a.head_dim, ctx.dtype, a.layout, packed_index=i)
        for i, n in enumerate("qkv")
    }
    return _att_draw(a, specs, rng)


def _att_misaligned(nbytes: int) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _att_sizes(rng, ctx)
        specs = {
            n: LayoutSpec(
                _logical(a, a.seq_q if n == "q" else a.seq_k),
                ctx.dtype,
                offset=aligned_offset(nbytes, ctx.itemsize, rng.randint(0, 2), nonzero=True),
            )
            for n in "qkv"
        }
        return _att_draw(a, specs, rng)

    return draw


def _att_last_stride(rng, ctx):
    a = _att_sizes(rng, ctx)
    specs = {n: LayoutSpec(_logical(a, a.seq_q if n == "q" else a.seq_k), ctx.dtype, step=(1, 1, 1, 2)) for n in "qkv"}
    return _att_draw(a, specs, rng)


def _att_seq(seq: int) -> Callable[[random.Random, Context], Draw]:
    def draw(rng, ctx):
        a = _att_sizes(rng, ctx, seq=seq)
        return _att_draw(a, {n: LayoutSpec.contiguous(_logical(a, seq), ctx.dtype) for n in "qkv"}, rng)

    return draw


def _att_mtv(rng, ctx):
    # MTV-Crafter motion attention: K is (B, S, C) memory reinterpreted as (B, H, S, d) and axis-swapped
    # to (B, S, H, d): non-contiguous, passed to attention as NHD; q and v are ordinary NHD projections.
    a = _att_sizes(rng, ctx, layout="NHD", min_heads=2)
    shape = (a.batch, a.seq_q, a.heads, a.head_dim)
    specs = {
        "q": LayoutSpec.contiguous(shape, ctx.dtype),
        "k": swapped_view(shape, ctx.dtype, 1, 2),
        "v": LayoutSpec.contiguous(shape, ctx.dtype),
    }
    return _att_draw(a, specs, rng)


def _att_seq_ok(seq: int) -> Callable[[Context], bool]:
    return lambda ctx: seq * min(ctx.head_dims) <= ctx.max_elements * 4


ATTENTION_CLASSES: dict[str, LayoutClass] = {
    c.name: c
    for c in [
        LayoutClass(
            "hnd_contiguous",
            "attention",
            "separate contiguous (B, H, S, d) tensors (the control)",
            _att_contiguous("HND"),
        ),
        LayoutClass("nhd_contiguous", "attention", "separate contiguous (B, S, H, d) tensors", _att_contiguous("NHD")),
        LayoutClass(
            "transposed_view",
            "attention",
            "(B, S, H, d) projections viewed as HND with transpose(1, 2), as before SDPA",
            _att_transposed_view,
        ),
        LayoutClass(
            "packed_qkv",
            "attention",
            "q, k, v = slices of one packed (B, S, 3C) projection (token stride 3C)",
            _att_packed_qkv,
        ),
        *[
            LayoutClass(
                f"misaligned_ptr_{b}",
                "attention",
                f"q, k, v data pointers exactly {b}-byte aligned",
                _att_misaligned(b),
                _offset_ok(b),
            )
            for b in (2, 4, 8)
        ],
        LayoutClass(
            "last_stride_ne_1", "attention", "every other element of head_dim: last stride 2", _att_last_stride
        ),
        *[
            LayoutClass(
                f"seq_{s}",
                "attention",
                f"{s} tokens for q and k/v (misses 64/128-token tiles)"
                if s % 64
                else f"{s} tokens for q and k/v (T5 text length; whole tiles)",
                _att_seq(s),
                _att_seq_ok(s),
            )
            for s in (77, 113, 257, 512)
        ],
        LayoutClass(
            "mtv_scrambled_k",
            "attention",
            "MTV-Crafter K: (B, S, C) memory reinterpreted as (B, H, S, d) and axis-swapped to NHD (non-contiguous)",
            _att_mtv,
        ),
    ]
}


def classes_for(kind: str, ctx: Context) -> dict[str, LayoutClass]:
    """The layout classes of op ``kind`` ("linear" | "attention") that apply under ``ctx``."""
    table = {"linear": LINEAR_CLASSES, "attention": ATTENTION_CLASSES}.get(kind)
    if table is None:
        raise ValueError(f"kind={kind!r} has no layout classes; use 'linear' or 'attention'")
    return {n: c for n, c in table.items() if c.applies(ctx)}
