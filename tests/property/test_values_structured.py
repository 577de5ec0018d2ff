"""Structured value recipes: a zero, constant or outlier slice along one dim of one tensor, and ``constant``."""

from __future__ import annotations

import pytest
import torch

from harness.values import KINDS, STRUCTURED_KINDS, ValueError_, ValueSpec

SHAPE = (2, 3, 130, 16)  # (batch, heads, tokens, channel)


@pytest.mark.parametrize("dim", range(4))
@pytest.mark.parametrize("kind", ["zero_slice", "constant_slice", "outlier_slice"])
def test_the_slice_has_its_property_and_nothing_else_does(kind: str, dim: int) -> None:
    length = 64 if dim == 2 else 1
    vs = ValueSpec.from_dict({"kind": kind, "seed": 5, "params": {"dim": dim, "start": 1, "length": length}})
    x = vs.generate(SHAPE)
    plain = ValueSpec("normal", 5).generate(SHAPE)
    inside = [slice(None)] * 4
    inside[dim] = slice(1, 1 + length)
    inside = tuple(inside)
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[inside] = False
    assert torch.equal(x[outside], plain[outside]), "only the slice differs from the normal recipe"
    if kind == "zero_slice":
        assert (x[inside] == 0).all()
    elif kind == "constant_slice":
        assert (x[inside] == 1.5).all()
    else:
        assert torch.allclose(x[inside], plain[inside] * 1000)
    assert ValueSpec.from_json(vs.to_json()) == vs


def test_start_wraps_and_the_slice_is_cut_at_the_end() -> None:
    vs = ValueSpec("zero_slice", 1, (("dim", 2), ("start", 130 + 120), ("length", 64)))
    x = vs.generate(SHAPE)
    zero_tokens = (x == 0).all(-1).all(0).all(0)
    assert zero_tokens.nonzero().flatten().tolist() == list(range(120, 130))


def test_constant_fills_everything_and_keeps_a_scale_exact() -> None:
    x = ValueSpec("constant", 0, (("value", 2.0**-4),)).generate((), torch.float32)
    assert x.shape == () and float(x) == 2.0**-4


def test_structured_kinds_are_finite_and_listed() -> None:
    assert set(STRUCTURED_KINDS) <= set(KINDS)
    for kind in STRUCTURED_KINDS:
        assert torch.isfinite(ValueSpec(kind, 3).generate((4, 8), torch.bfloat16).float()).all()


@pytest.mark.parametrize(
    "params,text",
    [
        ({"dim": -1}, "'dim' of kind 'zero_slice' must be an integer >= 0"),
        ({"length": 1.5}, "'length' of kind 'zero_slice' must be an integer >= 0"),
        ({"start": True}, "'start' of kind 'zero_slice' must be an integer >= 0"),
        ({"axis": 0}, "params ['axis'] unknown for kind 'zero_slice'"),
    ],
)
def test_malformed_params_are_refused_with_the_field_named(params, text) -> None:
    with pytest.raises(ValueError_, match=text.replace("[", r"\[").replace("]", r"\]")):
        ValueSpec.from_dict({"kind": "zero_slice", "params": params})


def test_a_dim_the_tensor_does_not_have_is_one_clear_error() -> None:
    vs = ValueSpec("outlier_slice", 0, (("dim", 3),))
    with pytest.raises(ValueError_, match=r"dim=3, but the tensor has 2 dims \(shape \[4, 8\]\)"):
        vs.generate((4, 8))
    with pytest.raises(ValueError_, match="'factor' of kind 'outlier_slice' must be a finite number"):
        ValueSpec.from_dict({"kind": "outlier_slice", "params": {"factor": "inf"}})
