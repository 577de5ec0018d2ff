"""The layout engine against torch itself: strides, offsets, values, poison, serialization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from harness.layouts import (
    LayoutError,
    LayoutSpec,
    ViewOp,
    data_ptr_alignment,
    describe_tensor,
    materialize,
    poison_bytes,
    poison_intact,
)
from harness.strategies import layouts, value_specs

DTYPES = ["float32", "bfloat16", "float16", "float8_e4m3fn", "int8"]

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def specs(draw, broadcast: bool = True) -> LayoutSpec:
    shape = draw(shapes, label="shape")
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    return draw(layouts(shape, dtype, views=True, broadcast=broadcast), label="spec")


def _values_for(spec: LayoutSpec, seed: int) -> torch.Tensor:
    """Values of the logical shape, constant along the spec's stride-0 dims."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-8, 8, spec.shape, generator=g).float()
    for d, (size, stride) in enumerate(zip(spec.shape, spec.strides())):
        if stride == 0 and size > 1:
            v = v.narrow(d, 0, 1).expand_as(v)
    return v.contiguous()


def _build_with_torch_ops(spec: LayoutSpec) -> torch.Tensor:
    """The same layout built independently with torch's own view functions (never as_strided)."""
    base = spec.base_shape or spec.shape
    n = len(base)
    perm = spec.perm or tuple(range(n))
    step = spec.step or (1,) * n
    pad = spec.pad or (0,) * n
    extent = [1 if d in spec.broadcast else base[d] * step[d] + pad[d] for d in range(n)]
    buf = torch.zeros(spec.offset + math.prod(extent), dtype=torch.float32)
    t = buf[spec.offset :].view([extent[d] for d in perm])
    t = t.permute([perm.index(d) for d in range(n)])
    index = tuple(slice(None) if d in spec.broadcast else slice(0, base[d] * step[d], step[d]) for d in range(n))
    t = t[index]
    t = t.expand(base) if spec.broadcast else t
    for op in spec.views:
        t = op.apply_torch(t)
    return t


@given(specs(), st.integers(0, 2**16))
def test_materialized_strides_offset_and_values_match_the_spec(spec: LayoutSpec, seed: int) -> None:
    values = _values_for(spec, seed)
    x = materialize(spec, values)
    note(spec.describe())
    assert tuple(x.shape) == spec.shape
    assert x.stride() == spec.strides()
    assert x.storage_offset() == spec.storage_offset()
    assert x.untyped_storage().nbytes() == spec.storage_numel() * spec.itemsize
    assert x.dtype == spec.torch_dtype
    assert torch.equal(x.float(), values.to(spec.torch_dtype).float())
    assert poison_intact(x, spec)


@given(specs())
def test_analytic_geometry_agrees_with_torch_view_functions(spec: LayoutSpec) -> None:
    t = _build_with_torch_ops(spec)
    assert tuple(t.shape) == spec.shape
    assert t.storage_offset() == spec.storage_offset()
    live = [i for i, s in enumerate(spec.shape) if s > 1]  # a size-1 dim's stride is meaningless
    assert [t.stride(i) for i in live] == [spec.strides()[i] for i in live]
    assert t.is_contiguous() == spec.is_contiguous()


@given(specs())
def test_json_round_trip_is_lossless(spec: LayoutSpec) -> None:
    again = LayoutSpec.from_json(spec.to_json())
    assert again == spec
    assert hash(again) == hash(spec)
    assert again.strides() == spec.strides() and again.storage_offset() == spec.storage_offset()


@given(specs(broadcast=False), st.integers(0, 2**16))
def test_poison_survives_read_only_ops_and_catches_writes_outside_the_view(spec: LayoutSpec, seed: int) -> None:
    x = materialize(spec, _values_for(spec, seed))
    _ = x.float().sum(), x.clone(), x.contiguous(), x.to(torch.float32) * 2
    assert poison_intact(x, spec)
    outside = spec.storage_numel() - spec.numel
    if outside == 0:
        return
    # find one storage element outside the view and scribble on it, as an out-of-bounds kernel would
    mask = torch.zeros(spec.storage_numel(), dtype=torch.bool)
    mask.as_strided(spec.shape, spec.strides(), spec.storage_offset()).fill_(True)
    victim = int((~mask).nonzero()[0])
    raw = torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage()).view(-1, spec.itemsize)
    raw[victim] = raw[victim] ^ 0x01
    assert not poison_intact(x, spec)


@given(specs(broadcast=False), value_specs())
def test_materialize_never_modifies_values(spec: LayoutSpec, vs) -> None:
    values = vs.generate(spec.shape, torch.float32)
    before = values.clone()
    materialize(spec, values)
    assert torch.equal(values, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 8, 16, 24, 32])
def test_alignment_query_matches_the_real_pointer(dtype: str, offset: int) -> None:
    spec = LayoutSpec((4, 16), dtype, offset=offset)
    x = materialize(spec, torch.ones(4, 16))
    real = data_ptr_alignment(x)
    if spec.alignment() < 64:  # the CPU allocator guarantees 64-byte aligned storage
        assert real == spec.alignment()
    else:
        assert real >= 64


def test_contiguous_does_not_fix_a_misaligned_contiguous_view() -> None:
    spec = LayoutSpec((8, 64), "bfloat16", offset=1)
    x = materialize(spec, torch.randn(8, 64))
    assert spec.is_contiguous() and spec.alignment() == 2
    y = x.contiguous()
    assert y.data_ptr() == x.data_ptr() and data_ptr_alignment(y) == 2
    z = x.to(torch.float8_e4m3fn)  # a dtype change always allocates: the copy is aligned
    assert data_ptr_alignment(z) >= 16


VIEW_TABLE = [
    # (description, spec, expected strides, expected offset)
    (
        "transpose of packed",
        LayoutSpec((3, 4), "float32", base_shape=(4, 3), views=(ViewOp.transpose(0, 1),)),
        (1, 3),
        0,
    ),
    (
        "chunk 1 of packed qkv",
        LayoutSpec((2, 5, 8), "float32", base_shape=(2, 5, 24), views=(ViewOp.chunk(3, -1, 1),)),
        (120, 24, 1),
        8,
    ),
    (
        "flatten(2) of heads from a packed qkv",
        LayoutSpec(
            (2, 5, 8),
            "float32",
            base_shape=(2, 5, 24),
            views=(ViewOp.unflatten(-1, (3, 2, 4)), ViewOp.select(2, 2), ViewOp.flatten(2, 3)),
        ),
        (120, 24, 1),
        16,
    ),
    (
        "HND transpose of a head split",
        LayoutSpec(
            (1, 2, 5, 4), "float32", base_shape=(1, 5, 8), views=(ViewOp.unflatten(-1, (2, 4)), ViewOp.transpose(1, 2))
        ),
        (40, 4, 8, 1),
        0,
    ),
    ("narrow", LayoutSpec((4, 3), "float32", base_shape=(4, 10), views=(ViewOp.narrow(1, 5, 3),)), (10, 1), 5),
    ("column-major storage", LayoutSpec((3, 4), "float32", perm=(1, 0)), (1, 3), 0),
    ("stepped and padded", LayoutSpec((3, 4), "float32", step=(1, 2), pad=(0, 1), offset=2), (9, 2), 2),
    ("broadcast rows", LayoutSpec((3, 4), "float32", broadcast=(0,)), (0, 1), 0),
]


@pytest.mark.parametrize("what,spec,strides,offset", VIEW_TABLE, ids=[r[0] for r in VIEW_TABLE])
def test_view_table(what: str, spec: LayoutSpec, strides: tuple, offset: int) -> None:
    assert spec.strides() == strides
    assert spec.storage_offset() == offset
    t = _build_with_torch_ops(spec)
    assert t.stride() == strides and t.storage_offset() == offset


def test_flatten_that_would_copy_is_rejected_with_the_reason() -> None:
    with pytest.raises(LayoutError, match="not a view"):
        LayoutSpec((1, 5, 8), "float32", base_shape=(1, 2, 5, 4), views=(ViewOp.transpose(1, 2), ViewOp.flatten(2, 3)))


BAD_SPECS = [
    (dict(shape=(2, 3), perm=(0, 0)), "not a permutation"),
    (dict(shape=(2, 3), step=(0, 1)), "step"),
    (dict(shape=(2, 3), pad=(1,)), "pad"),
    (dict(shape=(2, 3), offset=-1), "offset"),
    (dict(shape=(2, 3), broadcast=(2,)), "broadcast"),
    (dict(shape=(2, 3), dtype="bfloat17"), "bfloat17"),
    (dict(shape=(2, 3), views=(ViewOp.transpose(0, 1),)), "base_shape"),
    (dict(shape=(2, 3), base_shape=(2, 6), views=(ViewOp.chunk(3, -1, 0),)), "not shape"),
    (dict(shape=(2, 2), base_shape=(2, 6), views=(ViewOp.chunk(3, -1, 5),)), "index 5"),
]


@pytest.mark.parametrize("kwargs,match", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_name_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        LayoutSpec(**kwargs)


@pytest.mark.parametrize(
    "payload,match",
    [
        ("{", "does not parse"),
        ('{"dtype": "float32"}', "missing 'shape'"),
        ('{"shape": [2], "colour": 1}', "unknown layout fields"),
        ('{"shape": ["2"]}', "list of integers"),
        ('{"shape": [2], "views": [{"op": "explode", "args": []}]}', "explode"),
    ],
)
def test_from_json_validates(payload: str, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        LayoutSpec.from_json(payload)


def test_values_must_match_the_logical_shape_and_broadcast() -> None:
    with pytest.raises(LayoutError, match="logical shape"):
        materialize(LayoutSpec((2, 3), "float32"), torch.zeros(3, 2))
    with pytest.raises(LayoutError, match="broadcast"):
        materialize(LayoutSpec((2, 3), "float32", broadcast=(0,)), torch.randn(2, 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2"])
def test_float_poison_is_a_nan_no_arithmetic_produces(dtype: str) -> None:
    dt = getattr(torch, dtype)
    p = torch.frombuffer(bytearray(poison_bytes(dt)), dtype=dt)
    assert torch.isnan(p.float()).all()
    canonical = torch.tensor([float("nan")]).to(dt) if dt.itemsize > 1 else None
    if canonical is not None:  # FP8 E4M3FN has only one NaN pattern, so a distinct payload is impossible there
        assert bytes(canonical.view(torch.uint8).tolist()) != poison_bytes(dt)


def test_describe_mentions_what_matters() -> None:
    spec = LayoutSpec((2, 5, 8), "bfloat16", base_shape=(2, 5, 24), views=(ViewOp.chunk(3, -1, 1),), offset=1)
    text = spec.describe()
    for needle in ("bfloat16[2, 5, 8]", "strides (120, 24, 1)", "offset 9", "ptr align 2B", "non-contiguous", "chunk"):
        assert needle in text, (needle, text)
    x = materialize(spec, torch.randn(2, 5, 8))
    line = describe_tensor(x)
    assert "offset 9" in line and "ptr align 2B" in line


def test_leading_dimension_and_span() -> None:
    row = LayoutSpec((4, 16), "bfloat16", pad=(0, 3))
    assert row.leading_dimension() == 19 and row.leading_dimension_alignment() == 2
    col = LayoutSpec((4, 16), "bfloat16", perm=(1, 0))
    assert col.leading_dimension() == 4
    assert LayoutSpec((4, 16), "float32").span_bytes() == 4 * 16 * 4
    assert row.span_bytes() == ((4 - 1) * 19 + 15 + 1) * 2


@given(specs())
def test_simplifications_end_at_the_plain_layout(spec: LayoutSpec) -> None:
    current, seen = spec, 0
    while True:
        options = list(current.simplifications())
        if not options:
            break
        _, current = options[0]
        assert current.shape == spec.shape and current.dtype == spec.dtype
        seen += 1
        assert seen < 20, "simplification does not terminate"
    assert current == LayoutSpec.contiguous(spec.shape, spec.dtype)
