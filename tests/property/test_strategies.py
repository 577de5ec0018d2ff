"""The strategies: what they generate, what they shrink to, how they validate their arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from harness.layouts import LayoutSpec, data_ptr_alignment, materialize
from harness.strategies import (
    ALIGNMENT_CLASSES,
    SPECIAL_SEQ_LENS,
    activations,
    attention_inputs,
    layouts,
    offset_for_alignment,
    seq_lens,
    value_specs,
)
from harness.values import FINITE_KINDS, ValueSpec

# Shrinking from random draws can stop in a local minimum (seen once among this session's eight full runs: a transposed layout instead
# of offset=1): the draws are derandomized, so each shrink target is checked from the same start every run.
FIND = settings(database=None, max_examples=2000, derandomize=True)


def minimal(strategy, condition=lambda x: True):
    return find(strategy, condition, settings=FIND)


# --------------------------------------------------------------------------- shrink targets
def test_layouts_shrink_to_the_plain_contiguous_layout() -> None:
    strategy = layouts((4, 8, 16), "bfloat16", views=True, broadcast=True)
    assert minimal(strategy) == LayoutSpec.contiguous((4, 8, 16), "bfloat16")
    # the simplest layout that is anything but plain is one element of misalignment, nothing else
    assert minimal(strategy, lambda s: not s.is_plain()) == LayoutSpec((4, 8, 16), "bfloat16", offset=1)
    # the simplest non-contiguous one adds exactly one property (which one depends on the shrink path)
    spec = minimal(strategy, lambda s: not s.is_contiguous())
    extras = [
        spec.perm is not None,
        spec.step is not None,
        spec.pad is not None,
        spec.broadcast != (),
        spec.views != (),
    ]
    assert spec.offset == 0 and sum(extras) == 1, spec


def test_misaligned_layout_shrinks_to_offset_one_and_nothing_else() -> None:
    spec = minimal(layouts((4, 8), "bfloat16", views=True), lambda s: s.alignment() < 16)
    assert spec == LayoutSpec((4, 8), "bfloat16", offset=1)


def test_non_contiguous_layout_shrinks_to_a_single_extra() -> None:
    spec = minimal(layouts((4, 8), "float32"), lambda s: not s.is_contiguous())
    extras = [spec.perm is not None, spec.step is not None, spec.pad is not None]
    assert sum(extras) == 1 and spec.offset == 0, spec


@pytest.mark.parametrize("alignment", ALIGNMENT_CLASSES)
def test_alignment_classes_shrink_to_their_smallest_offset(alignment: int) -> None:
    dtype = "float8_e4m3fn"
    spec = minimal(layouts((2, 32), dtype, alignment=alignment))
    assert spec.offset == offset_for_alignment(alignment, 1)
    assert spec.alignment() == (alignment if alignment < 16 else 256)


def test_value_specs_shrink_to_normal_seed_zero() -> None:
    assert minimal(value_specs()) == ValueSpec("normal", 0)


def test_seq_lens_shrink_to_one_and_list_block_missing_lengths() -> None:
    assert minimal(seq_lens()) == 1
    for n in (77, 113, 239, 257, 512, 4093):
        assert n in SPECIAL_SEQ_LENS


def test_activations_shrink_to_rank_two_smallest_contiguous() -> None:
    act = minimal(activations())
    assert act.spec.ndim == 2 and act.spec.is_plain() and act.spec.shape == (1, 16)
    assert act.values == ValueSpec("normal", 0)


def test_attention_inputs_shrink_to_one_head_hnd_unpacked() -> None:
    a = minimal(attention_inputs(), lambda a: a.k.alignment() < 16)
    assert (a.tensor_layout, a.batch, a.heads, a.seq_q, a.head_dim, a.packed) == ("HND", 1, 1, 1, 64, False)
    assert a.q.offset == 0 and a.v.offset == 0 and a.k.offset == 1


# --------------------------------------------------------------------------- generated properties
@given(st.sampled_from(ALIGNMENT_CLASSES), st.sampled_from(["float8_e4m3fn", "bfloat16", "float32"]), st.data())
def test_alignment_class_is_exact_on_the_real_pointer(alignment: int, dtype: str, data) -> None:
    itemsize = getattr(torch, dtype).itemsize
    if alignment < itemsize:
        with pytest.raises(InvalidArgument, match="impossible"):
            data.draw(layouts((4, 16), dtype, alignment=alignment))
        return
    spec = data.draw(layouts((4, 16), dtype, alignment=alignment, permute=False))
    x = materialize(spec, torch.ones(spec.shape))
    real = data_ptr_alignment(x)
    if alignment < 16:
        assert real == alignment
    else:
        assert real >= 16


@given(attention_inputs())
def test_attention_inputs_are_consistent_views(a) -> None:
    assert a.tensor_layout in ("HND", "NHD")
    for name, spec, seq in (("q", a.q, a.seq_q), ("k", a.k, a.seq_kv), ("v", a.v, a.seq_kv)):
        expect = (
            (a.batch, a.heads, seq, a.head_dim) if a.tensor_layout == "HND" else (a.batch, seq, a.heads, a.head_dim)
        )
        assert spec.shape == expect, name
        assert spec.last_stride() == 1
        token_dim = 2 if a.tensor_layout == "HND" else 1
        width = a.heads * a.head_dim * (3 if a.packed else 1)
        if seq > 1:
            assert spec.strides()[token_dim] == width  # a view of a (b, s, width) projection
    if a.seq_q != a.seq_kv:
        # a text/image context, unless the size cap leaves room for less than 77 tokens
        assert (a.seq_kv in (77, 257, 512) or a.seq_kv < 77) and not a.packed


@given(activations(kinds=FINITE_KINDS))
def test_activations_are_wan_shaped_and_materialize(act) -> None:
    assert act.spec.ndim in (2, 3) and act.spec.shape[-1] == act.dim
    x = materialize(act.spec, act.values.generate(act.spec.shape))
    assert x.shape[-1] == act.dim and bool(torch.isfinite(x.float()).all())


@given(value_specs(kinds=FINITE_KINDS), st.sampled_from([(4, 64), (2, 130, 32)]))
def test_value_kinds_have_their_property(vs: ValueSpec, shape) -> None:
    x = vs.generate(shape, torch.float32)
    assert torch.equal(x, vs.generate(shape, torch.float32)), "same recipe, same values"
    rows = x.reshape(-1, shape[-1])
    if vs.kind == "outliers":
        assert rows.abs().amax(0).max() >= 50 * rows.abs().amax(0).median()
    elif vs.kind == "zero_blocks":
        assert (rows == 0).all(1).sum() >= 2
    elif vs.kind == "constant_rows":
        assert (rows == 1.5).all(1).sum() >= 2
    elif vs.kind == "fp8_edge":
        assert (x.abs() > 448).any()
    elif vs.kind == "subnormal":
        a = x.abs()
        fp8_sub = (a > 0) & (a < 2.0**-6) & (torch.remainder(a, 2.0**-9) == 0)  # E4M3 subnormals
        own_sub = (a > 0) & (a < torch.finfo(torch.float32).tiny)  # float32's own
        assert fp8_sub.any() and own_sub.any()
    assert torch.isfinite(x).all()


def test_nonfinite_values_only_on_request() -> None:
    with pytest.raises(InvalidArgument, match="allow_nonfinite"):
        value_specs(kinds=["nonfinite"])
    x = ValueSpec("nonfinite", 1).generate((64, 64))
    assert torch.isinf(x).any() and torch.isnan(x).any()


def test_fp8_targets_never_get_out_of_range_values() -> None:
    x = ValueSpec("fp8_edge", 3).generate((64, 64), torch.float8_e4m3fn)
    assert torch.isfinite(x.float()).all() and x.float().abs().max() == 448


# --------------------------------------------------------------------------- argument validation
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: layouts((2, -1)), "shape"),
        (lambda: layouts((2, 2), "bfloat17"), "bfloat17"),
        (lambda: layouts((2, 2), max_step=0), "max_step=0"),
        (lambda: layouts((2, 2), max_offset=-3), "max_offset=-3"),
        (lambda: layouts((2, 2), "bfloat16", alignment=3), "alignment=3"),
        (lambda: layouts((2, 2), "bfloat16", alignment=1), "impossible for 2-byte"),
        (lambda: value_specs(kinds=["gaussian"]), "gaussian"),
        (lambda: value_specs(kinds=[]), "empty"),
        (lambda: seq_lens(max_len=0), "max_len=0"),
        (lambda: activations(rank=4), "rank=4"),
        (lambda: activations(dims=[8960], max_numel=100), "HARNESS_MAX_ELEMENTS"),
        (lambda: attention_inputs(tensor_layout="BHSD"), "BHSD"),
        (lambda: attention_inputs(head_dims=()), "head_dims"),
    ],
)
def test_bad_arguments_are_named(make, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        minimal(make())


def test_size_cap_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HARNESS_MAX_ELEMENTS", "lots")
    with pytest.raises(InvalidArgument, match="HARNESS_MAX_ELEMENTS"):
        minimal(activations())
    monkeypatch.setenv("HARNESS_MAX_ELEMENTS", "4096")
    act = minimal(activations(), lambda a: a.spec.shape[0] > 1)
    assert act.spec.numel <= 4096
