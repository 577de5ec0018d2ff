"""Tensor geometry (shape, strides, dtype, pointer alignment) from a tensor or a LayoutSpec.

Private to ``harness.quant``: the copy decisions of ``linear`` and ``attention`` are made from
this, so they can be computed from layouts alone (meta tensors, ``LayoutSpec``) on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.layouts import data_ptr_alignment, pow2_alignment

__all__ = ["Geom"]


@dataclass(frozen=True)
class Geom:
    """What a kernel's layout requirements are checked against."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    itemsize: int
    ptr_align: int  # bytes, power of two, capped at 256
    offset: int  # storage offset in elements

    @classmethod
    def of(cls, x: Any) -> "Geom":
        """From a tensor (real data pointer; ``meta`` tensors assume an aligned base) or a LayoutSpec."""
        if isinstance(x, Tensor):
            if x.device.type == "meta":
                align = pow2_alignment(x.storage_offset() * x.element_size())
            else:
                align = data_ptr_alignment(x)
            return cls(tuple(x.shape), tuple(x.stride()), x.dtype, x.element_size(), align, x.storage_offset())
        if all(hasattr(x, a) for a in ("shape", "strides", "alignment", "torch_dtype", "itemsize")):
            return cls(tuple(x.shape), tuple(x.strides()), x.torch_dtype, x.itemsize, x.alignment(), x.storage_offset())
        raise TypeError(f"expected a torch.Tensor or a harness.layouts.LayoutSpec, got {type(x).__name__}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
