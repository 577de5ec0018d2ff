"""The ops under test: FP8 linear, conversion, legacy forwards, plug-ins, attention backends, quantized blocks.

Submodules (one concern each): ``linear`` (``fp8_linear`` and its copy planning; implemented in ``fp8``), ``convert``
(``convert_to_fp8`` / ``revert_fp8``), ``legacy`` (reproductions of public FP8 forwards),
``plugins`` (user ops by name or entry point), ``backends`` (attention backend registry),
``attention`` (layout-safe attention wrapper), ``blocks`` (Wan blocks with quantized operators).

Names are imported lazily on first access, so ``import harness.quant`` costs nothing and
never touches CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    # linear
    "fp8_linear",
    "fp8_linear_with_plan",
    "plan_operands",
    "copy_reasons",
    "last_plan",
    "LinearPlan",
    "LinearResult",
    "Fp8LinearError",
    "Fp8LinearConfig",
    # convert
    "convert_to_fp8",
    "revert_fp8",
    "FP8Linear",
    "DEFAULT_KEEP",
    "ConversionReport",
    # legacy and plug-ins
    "LEGACY_FORWARDS",
    "legacy_op",
    "get_legacy",
    "load_linear",
    "load_attention",
    "resolve_plugin",
    # attention
    "BACKENDS",
    "get_backend",
    "describe_all",
    "format_table",
    "safe_attention",
    "plan_attention",
    # blocks
    "PRESETS",
    "resolve_preset",
    "QuantizedBlockConfig",
    "make_block",
]

_WHERE = {
    "fp8_linear": "linear",
    "fp8_linear_with_plan": "linear",
    "plan_operands": "linear",
    "copy_reasons": "linear",
    "last_plan": "linear",
    "LinearPlan": "linear",
    "LinearResult": "linear",
    "Fp8LinearError": "linear",
    "Fp8LinearConfig": "linear",
    "convert_to_fp8": "convert",
    "revert_fp8": "convert",
    "FP8Linear": "convert",
    "DEFAULT_KEEP": "convert",
    "ConversionReport": "convert",
    "LEGACY_FORWARDS": "legacy",
    "legacy_op": "legacy",
    "get_legacy": "legacy",
    "load_linear": "plugins",
    "load_attention": "plugins",
    "resolve_plugin": ("plugins", "resolve"),
    "BACKENDS": "backends",
    "get_backend": "backends",
    "describe_all": "backends",
    "format_table": "backends",
    "safe_attention": "attention",
    "plan_attention": "attention",
    "PRESETS": "blocks",
    "resolve_preset": "blocks",
    "QuantizedBlockConfig": "blocks",
    "make_block": "blocks",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'harness.quant' has no attribute {name!r}")
    mod_name, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f"harness.quant.{mod_name}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
