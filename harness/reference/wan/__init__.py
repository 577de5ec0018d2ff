"""Wan2.1 float32 reference blocks: configs, block functions with swappable operators, weights.

``config`` (``WanConfig``, presets), ``blocks`` (primitives and blocks; pass ``linear=`` or
``attention=`` to swap an operator), ``weights`` (upstream key names, deterministic init,
validated safetensors load/save).
"""

from harness.reference.wan import blocks, config, weights
from harness.reference.wan.blocks import exact_attention, exact_linear, wan_block
from harness.reference.wan.config import (
    GRID_480P,
    GRID_720P,
    TINY,
    TOKENS_480P,
    TOKENS_720P,
    WAN_1_3B,
    WAN_14B,
    WanConfig,
)
from harness.reference.wan.weights import init_params, load_params, save_params

__all__ = [
    "blocks",
    "config",
    "weights",
    "WanConfig",
    "WAN_1_3B",
    "WAN_14B",
    "TINY",
    "TOKENS_480P",
    "TOKENS_720P",
    "GRID_480P",
    "GRID_720P",
    "wan_block",
    "exact_linear",
    "exact_attention",
    "init_params",
    "load_params",
    "save_params",
]
