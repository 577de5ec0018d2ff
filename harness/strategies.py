"""Hypothesis strategies over layouts, values and Wan-shaped inputs.

Every strategy draws the logical shape first and then the layout *extras*
(offset, memory order, steps, padding, broadcast, view ops) as independent
draws that shrink to zero / identity / absent.  So a failing example shrinks
toward the plain contiguous, 16-byte aligned, small tensor, and the minimal
example shows only the layout property that matters.

Shrink targets (asserted in ``tests/property/test_strategies.py``):

- :func:`layouts` -> ``LayoutSpec.contiguous(shape, dtype)`` (offset 0, no
  perm/step/pad/broadcast/views); with ``alignment=a`` -> the smallest offset
  whose pointer alignment is exactly ``a`` bytes (``a // itemsize`` elements).
- :func:`value_specs` -> ``ValueSpec("normal", seed=0)``.
- :func:`seq_lens` -> the smallest listed length (1).
- :func:`activations` -> rank 2, the smallest dim, the shortest sequence, contiguous.
- :func:`attention_inputs` -> batch 1, 1 head, the smallest head dim and
  sequence, HND, separate contiguous q/k/v.

The layout families are built by the spec builders of
:mod:`harness.targets.layout_classes` (``aligned_offset`` behind
:func:`offset_for_alignment`, ``packed_chunk``, ``swapped_view``,
``head_view``), the ones the matrix's layout classes use: a strategy here only
draws their parameters, with Hypothesis.

Arguments are keyword-only and validated up front; errors name the value and
how to fix it (as Hypothesis' own strategies do).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.layouts import LayoutSpec, dtype_from_name, dtype_name
from harness.targets.layout_classes import ALIGNMENT_CLASSES, aligned_offset, head_view, packed_chunk, swapped_view
from harness.values import FINITE_KINDS, KINDS, ValueSpec

__all__ = [
    "ALIGNMENT_CLASSES",
    "SPECIAL_SEQ_LENS",
    "WAN_DIMS",
    "SMALL_DIMS",
    "max_elements",
    "layouts",
    "value_specs",
    "seq_lens",
    "activations",
    "Activation",
    "attention_inputs",
    "AttentionInputs",
    "offset_for_alignment",
    "explored_cases",
]

#: Sequence lengths users meet: text contexts (77 CLIP-L, 512 T5), CLIP image tokens (257), tile-missing lengths.
SPECIAL_SEQ_LENS = (1, 16, 64, 77, 113, 128, 239, 257, 512, 1560, 4093)

#: Wan widths: model dims and FFN dims of 1.3B and 14B.
WAN_DIMS = (1536, 5120, 8960, 13824)

#: Scaled-down widths with the same structure (multiples of the 128 head dim where it matters).
SMALL_DIMS = (16, 64, 128, 256, 384)

_DEFAULT_MAX_ELEMENTS = 1 << 16


def max_elements() -> int:
    """The size cap for generated tensors: ``HARNESS_MAX_ELEMENTS`` or 65536 (CPU-friendly)."""
    raw = os.environ.get("HARNESS_MAX_ELEMENTS")
    if raw is None:
        return _DEFAULT_MAX_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"HARNESS_MAX_ELEMENTS={raw!r} is not an integer") from None
    if value < 1:
        raise InvalidArgument(f"HARNESS_MAX_ELEMENTS={value} must be >= 1")
    return value


_env_max_elements = max_elements  # explored_cases' keyword of the same name hides the function


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be an integer")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidArgument(f"{name}={value} must be {rng}")
    return value


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InvalidArgument(f"shape={shape!r} must be a tuple of non-negative integers")
    return tuple(shape)


def _check_dtype(dtype: object) -> str:
    try:
        return dtype_name(dtype)  # type: ignore[arg-type]
    except ValueError as e:
        raise InvalidArgument(f"dtype={dtype!r}: {e}") from None


def _itemsize(dtype: str) -> int:
    return dtype_from_name(dtype).itemsize


def offset_for_alignment(alignment: int, itemsize: int, k: int = 0) -> int:
    """The ``k``-th smallest element offset whose data pointer is aligned to exactly ``alignment`` bytes.

    ``alignment=16`` means "aligned to at least 16" (offsets that are multiples
    of 16 bytes, starting with 0).  Raises when the alignment is impossible for
    the element size (a 2-byte bf16 tensor cannot be 1-byte aligned).
    """
    try:
        return aligned_offset(alignment, itemsize, k)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


@st.composite
def layouts(
    draw: st.DrawFn,
    shape: Sequence[int],
    dtype: str | torch.dtype = "bfloat16",
    *,
    max_offset: int = 64,
    max_step: int = 3,
    max_pad: int = 16,
    permute: bool = True,
    broadcast: bool = False,
    views: bool = False,
    alignment: int | None = None,
) -> LayoutSpec:
    """``LayoutSpec``s of logical ``shape``: offsets, memory orders, steps, padding, optional broadcast and views.

    ``alignment`` pins the pointer alignment class (1, 2, 4, 8 bytes misaligned
    or 16 aligned); None lets the offset range freely over ``[0, max_offset]``.
    ``views=True`` also draws real view recipes that produce ``shape``: a chunk
    of a packed last dimension (``x.chunk(k, -1)[i]`` of a (..., k*C) projection)
    and, for rank >= 3, a transpose of the memory's last two dims.
    ``broadcast=True`` lets dims have stride 0 (values must be constant there).
    Shrinks to ``LayoutSpec.contiguous(shape, dtype)``.
    """
    shape = _check_shape(shape)
    dt = _check_dtype(dtype)
    _check_int("max_offset", max_offset, 0)
    _check_int("max_step", max_step, 1)
    _check_int("max_pad", max_pad, 0)
    isz = _itemsize(dt)
    if alignment is not None:
        offset_for_alignment(alignment, isz)  # validates
    n = len(shape)

    if alignment is None:
        offset = draw(st.integers(0, max_offset), label="offset")
    else:
        k = draw(st.integers(0, max(0, max_offset // max(1, 32 // isz))), label="alignment_k")
        offset = offset_for_alignment(alignment, isz, k)

    # the family the extras apply to: plain, or a view recipe (whose base keeps the rank)
    make: Callable[..., LayoutSpec] = LayoutSpec
    if views and n >= 1 and draw(st.booleans(), label="use_view"):
        recipe = draw(st.sampled_from(["packed_chunk", "transposed"] if n >= 2 else ["packed_chunk"]), label="recipe")
        if recipe == "packed_chunk":
            parts = draw(st.integers(2, 3), label="packed_parts")
            index = draw(st.integers(0, parts - 1), label="packed_index")
            if shape[-1]:
                make = partial(packed_chunk, parts=parts, index=index)
        else:
            make = partial(swapped_view, dim0=-1, dim1=-2)

    perm = None
    if permute and n >= 2 and draw(st.booleans(), label="permuted"):
        p = tuple(draw(st.permutations(range(n)), label="perm"))
        perm = None if p == tuple(range(n)) else p
    step = None
    if max_step > 1 and n and draw(st.booleans(), label="stepped"):
        s = tuple(draw(st.lists(st.integers(1, max_step), min_size=n, max_size=n), label="step"))
        step = s if any(x != 1 for x in s) else None
    pad = None
    if max_pad and n and draw(st.booleans(), label="padded"):
        p2 = tuple(draw(st.lists(st.integers(0, max_pad), min_size=n, max_size=n), label="pad"))
        pad = p2 if any(p2) else None
    bdims: tuple[int, ...] = ()
    if broadcast and n and draw(st.booleans(), label="broadcast"):
        bdims = tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n), label="broadcast_dims")))
    return make(shape, dt, perm=perm, step=step, pad=pad, offset=offset, broadcast=bdims)


def value_specs(*, kinds: Sequence[str] | None = None, allow_nonfinite: bool = False) -> st.SearchStrategy[ValueSpec]:
    """``ValueSpec``s over ``kinds`` (default: every finite kind; ``nonfinite`` only if ``allow_nonfinite``).

    Shrinks to ``ValueSpec("normal", 0)`` (the first kind listed, seed 0).
    """
    if kinds is None:
        kinds = KINDS if allow_nonfinite else FINITE_KINDS
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgument("kinds=() is empty; pass at least one of " + ", ".join(KINDS))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InvalidArgument(f"kinds contains unknown {bad}; use any of {KINDS}")
    if "nonfinite" in kinds and not allow_nonfinite:
        raise InvalidArgument("kinds includes 'nonfinite'; also pass allow_nonfinite=True to ask for inf/nan")
    return st.builds(ValueSpec, kind=st.sampled_from(kinds), seed=st.integers(0, 2**31 - 1))


def seq_lens(*, max_len: int | None = None, special_only: bool = False) -> st.SearchStrategy[int]:
    """Sequence lengths: the listed ones that miss tile boundaries (77, 113, 239, 257, 512, 4093, ...) or any length.

    Shrinks to 1.  ``max_len`` caps them (default: no cap).
    """
    if max_len is not None:
        _check_int("max_len", max_len, 1)
    special = [s for s in SPECIAL_SEQ_LENS if max_len is None or s <= max_len]
    listed = st.sampled_from(special)
    if special_only:
        return listed
    return st.one_of(listed, st.integers(1, max_len or 8192))


class Activation(NamedTuple):
    """A Wan-shaped activation: its layout, its values and the model width it came from."""

    spec: LayoutSpec
    values: ValueSpec
    dim: int


@st.composite
def activations(
    draw: st.DrawFn,
    *,
    rank: int | None = None,
    dims: Sequence[int] | None = None,
    dtype: str | torch.dtype = "bfloat16",
    max_batch: int = 2,
    max_numel: int | None = None,
    kinds: Sequence[str] | None = None,
    alignment: int | None = None,
    views: bool = True,
) -> Activation:
    """2-D (tokens, dim) or 3-D (batch, tokens, dim) activations in any layout.

    ``dims`` defaults to the scaled-down widths; pass ``WAN_DIMS`` on a GPU.
    Combinations above ``max_numel`` (default :func:`max_elements`) are not
    drawn.  Shrinks to rank 2, the smallest dim, 1 token, contiguous, normal values.
    """
    if rank is not None and rank not in (2, 3):
        raise InvalidArgument(f"rank={rank!r} must be 2, 3 or None (either)")
    dims = tuple(dims) if dims is not None else SMALL_DIMS
    if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
        raise InvalidArgument(f"dims={dims!r} must be positive integers")
    _check_int("max_batch", max_batch, 1)
    cap = max_numel if max_numel is not None else max_elements()
    _check_int("max_numel", cap, 1)
    fitting = sorted(d for d in dims if d <= cap)
    if not fitting:
        raise InvalidArgument(f"no dim in {dims} fits max_numel={cap}; raise HARNESS_MAX_ELEMENTS or pass smaller dims")
    r = rank if rank is not None else draw(st.sampled_from([2, 3]), label="rank")
    dim = draw(st.sampled_from(fitting), label="dim")
    batch = draw(st.integers(1, max_batch), label="batch") if r == 3 else 1
    tokens = min(draw(seq_lens(max_len=8192), label="tokens"), max(1, cap // (dim * batch)))
    shape = (batch, tokens, dim) if r == 3 else (tokens, dim)
    spec = draw(layouts(shape, dtype, alignment=alignment, views=views), label="layout")
    values = draw(value_specs(kinds=kinds), label="values")
    return Activation(spec, values, dim)


class AttentionInputs(NamedTuple):
    """q/k/v layouts for one attention call, with the sizes that produced them."""

    q: LayoutSpec
    k: LayoutSpec
    v: LayoutSpec
    tensor_layout: str  # "HND" (b, h, s, d) or "NHD" (b, s, h, d)
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    values: ValueSpec
    packed: bool


@st.composite
def attention_inputs(
    draw: st.DrawFn,
    *,
    tensor_layout: str | None = None,
    head_dims: Sequence[int] = (64, 128),
    dtype: str | torch.dtype = "bfloat16",
    max_batch: int = 2,
    max_heads: int = 4,
    max_numel: int | None = None,
    cross: bool | None = None,
    packed: bool | None = None,
    alignment: int | None = None,
    kinds: Sequence[str] | None = None,
) -> AttentionInputs:
    """q, k, v layouts in HND or NHD, as views of projections the way Wan code makes them.

    Draws self-attention (q, k, v from one sequence, optionally slices of one
    packed qkv projection) or cross-attention (k/v over a context of 77, 257 or
    512 tokens).  ``alignment`` misaligns every operand's pointer by that class.
    Shrinks to HND, batch 1, 1 head, the smallest head dim, 1 token, separate
    contiguous projections.
    """
    if tensor_layout is not None and tensor_layout not in ("HND", "NHD"):
        raise InvalidArgument(f"tensor_layout={tensor_layout!r} must be 'HND', 'NHD' or None")
    head_dims = tuple(head_dims)
    if not head_dims or any(not isinstance(d, int) or d < 1 for d in head_dims):
        raise InvalidArgument(f"head_dims={head_dims!r} must be positive integers")
    _check_int("max_batch", max_batch, 1)
    _check_int("max_heads", max_heads, 1)
    dt = _check_dtype(dtype)
    cap = max_numel if max_numel is not None else max_elements()
    isz = _itemsize(dt)
    if alignment is not None:
        offset_for_alignment(alignment, isz)

    # structural choices first, sizes after: each shrinks independently of the others
    layout = tensor_layout or draw(st.sampled_from(["HND", "NHD"]), label="tensor_layout")
    # both flags are always drawn so the choice sequence keeps its shape when either shrinks
    is_cross = cross if cross is not None else draw(st.booleans(), label="cross")
    want_packed = packed if packed is not None else draw(st.booleans(), label="packed")
    use_packed = (not is_cross) and want_packed
    head_dim = draw(st.sampled_from(sorted(head_dims)), label="head_dim")
    batch = draw(st.integers(1, max_batch), label="batch")
    heads = draw(st.integers(1, max_heads), label="heads")
    per_token = batch * heads * head_dim * 3
    max_len = max(1, cap // per_token)
    # lengths are drawn from fixed ranges and then capped, so shrinking a size never reinterprets them
    seq_q = min(draw(seq_lens(max_len=8192), label="seq_q"), max_len)
    ctx_len = draw(st.sampled_from((77, 257, 512)), label="seq_kv")
    if ctx_len > max_len:  # the largest real context length that fits the size cap
        ctx_len = max([c for c in (77, 257, 512) if c <= max_len], default=max_len)
    seq_kv = ctx_len if is_cross else seq_q

    def off(label: str) -> int:
        if alignment is None:
            return draw(st.integers(0, 32), label=label)
        return offset_for_alignment(alignment, isz, draw(st.integers(0, 2), label=label))

    specs = []
    for i, name in enumerate("qkv"):
        seq = seq_q if name == "q" else seq_kv
        specs.append(
            head_view(
                batch,
                seq,
                heads,
                head_dim,
                dt,
                layout,
                packed_index=i if use_packed else None,
                offset=off(f"offset_{name}"),
            )
        )
    values = draw(value_specs(kinds=kinds), label="values")
    return AttentionInputs(
        specs[0], specs[1], specs[2], layout, batch, heads, seq_q, seq_kv, head_dim, values, bool(use_packed)
    )


def explored_cases(
    target: object, *, max_elements: int | None = None, allow_nonfinite: bool = False
) -> st.SearchStrategy:
    """``Case``s of ``target`` (a linear or attention target) drawn as :func:`harness.explore.draw_genome`
    draws them: every operand perturbed on its own, sizes at tile boundaries, structured values.

    Each case carries its genome in ``case.params["explore"]``.  The draws come from
    ``st.randoms(use_true_random=False)``, so a failing example shrinks toward the default sizes and
    fewer perturbed operands.
    """
    from harness.explore import build_case, draw_genome

    cap = max_elements if max_elements is not None else _env_max_elements()
    _check_int("max_elements", cap, 1)
    return st.randoms(use_true_random=False).map(
        lambda rng: build_case(target, draw_genome(rng, target, max_elements=cap, allow_nonfinite=allow_nonfinite)).case
    )
