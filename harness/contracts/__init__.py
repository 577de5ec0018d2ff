"""Measured layout contracts shipped with the harness (data), for the guards of ``harness.guard``.

``attention.json`` holds the contracts of the raw attention targets (``attn.<backend>``) as the
GPU findings measured them (``docs/gpu-findings.md``, the regression corpus ``tests/cases``): one
H200, torch 2.11 / CUDA 13.0 / cuDNN 9.19, sageattention 1.0.6.  Each clause carries its device,
versions, counts and source.  ``safe_attention`` (``harness.quant.attention``) reads them; a
backend without a measured contract keeps the hand-written rules of ``harness.quant.backends``.
A matrix run's own ``contracts.json`` has the same schema (``harness.contract``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

__all__ = ["SHIPPED", "shipped_contracts", "measured_contract"]

SHIPPED = Path(__file__).with_name("attention.json")


@functools.lru_cache(maxsize=None)
def shipped_contracts() -> dict[str, Any]:
    """The shipped contracts document (validated once)."""
    from harness.contract import load_contracts

    return load_contracts(SHIPPED)


def measured_contract(op: str) -> dict[str, Any] | None:
    """The shipped contract of target ``op`` (e.g. ``"attn.sdpa.flash"``), or None where none was measured."""
    return shipped_contracts()["contracts"].get(op)
