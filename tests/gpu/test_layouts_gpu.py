"""The layout engine on a CUDA device: the same strides, real pointer alignment, poison checks on device memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.layouts import LayoutSpec, data_ptr_alignment, materialize, poison_intact
from harness.strategies import ALIGNMENT_CLASSES, layouts, offset_for_alignment

pytestmark = pytest.mark.gpu


@settings(max_examples=50)
@given(st.sampled_from(["bfloat16", "float8_e4m3fn", "float32"]), st.data())
def test_materialize_on_cuda_matches_spec_and_cpu(dtype: str, data) -> None:
    spec = data.draw(layouts((3, 40, 64), dtype, views=True))
    values = torch.randn(spec.shape).clamp(-400, 400)
    x = materialize(spec, values, device="cuda")
    y = materialize(spec, values, device="cpu")
    assert x.is_cuda and x.stride() == spec.strides() and x.storage_offset() == spec.storage_offset()
    assert torch.equal(
        x.cpu().view(torch.uint8) if x.element_size() == 1 else x.cpu(),
        y.view(torch.uint8) if y.element_size() == 1 else y,
    )
    assert poison_intact(x, spec)


@pytest.mark.parametrize("alignment", ALIGNMENT_CLASSES)
def test_pointer_alignment_classes_on_cuda(alignment: int) -> None:
    dtype = "float8_e4m3fn"  # 1-byte elements reach every class
    spec = LayoutSpec((16, 64), dtype, offset=offset_for_alignment(alignment, 1, 1))
    x = materialize(spec, torch.randn(spec.shape), device="cuda")
    real = data_ptr_alignment(x)  # the CUDA caching allocator aligns blocks to >= 256 bytes
    assert real == (alignment if alignment < 16 else spec.alignment())


def test_poison_catches_a_device_write_outside_the_view() -> None:
    spec = LayoutSpec((8, 16), "bfloat16", pad=(0, 4), offset=3)
    x = materialize(spec, torch.randn(spec.shape), device="cuda")
    assert poison_intact(x, spec)
    storage = torch.empty(0, dtype=torch.bfloat16, device="cuda").set_(x.untyped_storage())
    storage[spec.storage_offset() + 16] = 1.0  # first padding element after row 0
    assert not poison_intact(x, spec)
