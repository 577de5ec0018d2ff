"""Wan2.1 parameters with upstream key names: deterministic random init, safetensors load/save.

Keys follow the wrapper's module names (wan-blocks.md section 1), e.g.
``blocks.0.self_attn.q.weight`` (out, in), ``blocks.0.modulation`` (1, 6, C). Loading is
safetensors only (never pickle); every key and shape is checked against the expected set and
errors name the key, the expected shape and what was found.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from harness.reference.wan.config import MTV_EVERY, VARIANTS, WanConfig

__all__ = [
    "WeightError",
    "param_shapes",
    "block_has_motion",
    "detect_variant",
    "init_params",
    "load_params",
    "save_params",
    "validate_params",
]

PathLike = Union[str, "os.PathLike[str]"]


class WeightError(ValueError):
    """A state dict does not match the expected Wan parameters (names the keys at fault)."""


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; use one of {VARIANTS}")


def block_has_motion(index: int) -> bool:
    """MTV-Crafter motion attention lives in blocks 0, 4, 8, ... (section 1)."""
    return index % MTV_EVERY == 0


def _attn(prefix: str, C: int, kv_in: int, out: dict) -> None:
    for n, fan_in in (("q", C), ("k", kv_in), ("v", kv_in), ("o", C)):
        out[f"{prefix}.{n}.weight"] = (C, fan_in)
        out[f"{prefix}.{n}.bias"] = (C,)
    out[f"{prefix}.norm_q.weight"] = (C,)
    out[f"{prefix}.norm_k.weight"] = (C,)


def param_shapes(
    cfg: WanConfig, variant: str = "t2v", *, layers: Optional[int] = None, embeddings: bool = True
) -> dict[str, tuple[int, ...]]:
    """Every expected key and its shape for ``variant`` ("t2v", "i2v", "mtv", "humo", "multitalk").

    ``layers`` overrides ``cfg.layers`` (a few blocks are enough for tests); ``embeddings``
    adds the time/text(/CLIP) projections that feed the blocks.
    """
    _check_variant(variant)
    n_layers = cfg.layers if layers is None else layers
    if not isinstance(n_layers, int) or n_layers < 0:
        raise ValueError(f"layers={layers!r} must be a non-negative int")
    C, Fd = cfg.dim, cfg.ffn_dim
    i2v = variant in ("i2v", "mtv", "multitalk")
    s: dict[str, tuple[int, ...]] = {}
    if embeddings:
        s["time_embedding.0.weight"] = (C, cfg.freq_dim)
        s["time_embedding.0.bias"] = (C,)
        s["time_embedding.2.weight"] = (C, C)
        s["time_embedding.2.bias"] = (C,)
        s["time_projection.1.weight"] = (6 * C, C)
        s["time_projection.1.bias"] = (6 * C,)
        s["text_embedding.0.weight"] = (C, cfg.text_dim)
        s["text_embedding.0.bias"] = (C,)
        s["text_embedding.2.weight"] = (C, C)
        s["text_embedding.2.bias"] = (C,)
        if i2v:
            cd = cfg.clip_dim
            s["img_emb.proj.0.weight"] = (cd,)
            s["img_emb.proj.0.bias"] = (cd,)
            s["img_emb.proj.1.weight"] = (cd, cd)
            s["img_emb.proj.1.bias"] = (cd,)
            s["img_emb.proj.3.weight"] = (C, cd)
            s["img_emb.proj.3.bias"] = (C,)
            s["img_emb.proj.4.weight"] = (C,)
            s["img_emb.proj.4.bias"] = (C,)
    for i in range(n_layers):
        p = f"blocks.{i}"
        s[f"{p}.modulation"] = (1, 6, C)
        s[f"{p}.norm3.weight"] = (C,)
        s[f"{p}.norm3.bias"] = (C,)
        _attn(f"{p}.self_attn", C, C, s)
        _attn(f"{p}.cross_attn", C, C, s)
        if i2v:
            for n in ("k_img", "v_img"):
                s[f"{p}.cross_attn.{n}.weight"] = (C, C)
                s[f"{p}.cross_attn.{n}.bias"] = (C,)
            s[f"{p}.cross_attn.norm_k_img.weight"] = (C,)
        s[f"{p}.ffn.0.weight"] = (Fd, C)
        s[f"{p}.ffn.0.bias"] = (Fd,)
        s[f"{p}.ffn.2.weight"] = (C, Fd)
        s[f"{p}.ffn.2.bias"] = (C,)
        if variant == "mtv" and block_has_motion(i):
            s[f"{p}.norm4.weight"] = (C,)
            s[f"{p}.norm4.bias"] = (C,)
            _attn(f"{p}.motion_attn", C, C, s)
        if variant == "humo":
            w = f"{p}.audio_cross_attn_wrapper"
            s[f"{w}.norm1_audio.weight"] = (C,)
            s[f"{w}.norm1_audio.bias"] = (C,)
            _attn(f"{w}.audio_cross_attn", C, cfg.humo_audio_dim, s)
        if variant == "multitalk":
            s[f"{p}.norm_x.weight"] = (C,)
            s[f"{p}.norm_x.bias"] = (C,)
            a = f"{p}.audio_cross_attn"
            s[f"{a}.q_linear.weight"] = (C, C)
            s[f"{a}.q_linear.bias"] = (C,)
            s[f"{a}.kv_linear.weight"] = (2 * C, cfg.multitalk_audio_dim)
            s[f"{a}.kv_linear.bias"] = (2 * C,)
            s[f"{a}.proj.weight"] = (C, C)
            s[f"{a}.proj.bias"] = (C,)
    return s


def detect_variant(keys: Iterable[str]) -> str:
    """Variant from state-dict keys: motion_attn -> "mtv", audio_cross_attn_wrapper -> "humo",
    audio_cross_attn.q_linear -> "multitalk", cross_attn.k_img -> "i2v", else "t2v"."""
    ks = list(keys)
    if any(".motion_attn." in k for k in ks):
        return "mtv"
    if any(".audio_cross_attn_wrapper." in k for k in ks):
        return "humo"
    if any(".audio_cross_attn.q_linear." in k for k in ks):
        return "multitalk"
    if any(".cross_attn.k_img." in k for k in ks):
        return "i2v"
    return "t2v"


def _key_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def init_params(
    cfg: WanConfig,
    seed: int,
    variant: str = "t2v",
    *,
    layers: Optional[int] = None,
    embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Tensor]:
    """Deterministic random parameters: each key drawn from its own generator (seed, key).

    Linear weights ~ N(0, 1/fan_in); biases ~ N(0, 0.02^2); ``modulation`` ~ N(0, 1/C) (as
    upstream); norm weights ~ 1 + N(0, 0.1^2) and LayerNorm biases ~ N(0, 0.02^2) (not 1/0,
    so a swapped or skipped norm weight changes the output). Drawn in float64 on CPU, then
    cast, so values do not depend on the device. Adding keys never changes existing ones.
    """
    shapes = param_shapes(cfg, variant, layers=layers, embeddings=embeddings)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        g = torch.Generator().manual_seed(_key_seed(seed, key))
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        if key.endswith("modulation"):
            t = z / cfg.dim**0.5
        elif len(shape) == 2:
            t = z / shape[1] ** 0.5
        elif key.endswith(".bias"):
            t = 0.02 * z
        else:  # 1-D norm weight
            t = 1.0 + 0.1 * z
        out[key] = t.to(dtype=dtype, device=device)
    return out


def validate_params(
    params: Mapping[str, Tensor],
    cfg: WanConfig,
    variant: Optional[str] = None,
    *,
    layers: Optional[int] = None,
    embeddings: Optional[bool] = None,
) -> str:
    """Check keys, shapes and dtypes against ``param_shapes``; returns the variant used.

    ``variant=None`` detects it from the keys; ``embeddings=None`` expects the embedding keys
    only if any is present; ``layers=None`` counts the ``blocks.N`` present (must be 0..N-1).
    Raises ``WeightError`` listing missing keys, unexpected keys and shape mismatches by name.
    """
    keys = list(params)
    v = detect_variant(keys) if variant is None else variant
    _check_variant(v)
    if layers is None:
        idx = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        layers = (max(idx) + 1) if idx else 0
    if embeddings is None:
        embeddings = any(not k.startswith("blocks.") for k in keys)
    want = param_shapes(cfg, v, layers=layers, embeddings=embeddings)
    missing = [k for k in want if k not in params]
    unexpected = [k for k in keys if k not in want]
    bad_shape = [
        (k, want[k], tuple(params[k].shape)) for k in want if k in params and tuple(params[k].shape) != want[k]
    ]
    bad_type = [
        (k, params[k].dtype) for k in keys if isinstance(params[k], Tensor) and not params[k].dtype.is_floating_point
    ]
    not_tensor = [k for k in keys if not isinstance(params[k], Tensor)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    for k, w, g in bad_shape[:5]:
        problems.append(f"{k}: expected shape {w}, found {g}")
    if len(bad_shape) > 5:
        problems.append(f"... and {len(bad_shape) - 5} more shape mismatches")
    for k, dt in bad_type[:5]:
        problems.append(f"{k}: dtype {dt} is not floating point")
    for k in not_tensor[:5]:
        problems.append(f"{k}: not a tensor ({type(params[k]).__name__})")
    if problems:
        raise WeightError(
            f"state dict does not match Wan variant {v!r} (dim={cfg.dim}, layers={layers}): "
            + "; ".join(problems)
            + ". Check the config/variant, or pass layers=/embeddings= to match a partial dict."
        )
    return v


def save_params(
    params: Mapping[str, Tensor], path: PathLike, cfg: Optional[WanConfig] = None, variant: Optional[str] = None
) -> None:
    """Write ``params`` to a .safetensors file; config and variant go into its JSON metadata."""
    from safetensors.torch import save_file

    meta = {"format": "harness.wan.v1"}
    if cfg is not None:
        meta["wan_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
    if variant is not None:
        _check_variant(variant)
        meta["variant"] = variant
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    save_file(tensors, os.fspath(path), metadata=meta)


def load_params(
    source: Union[PathLike, Mapping[str, Tensor]],
    cfg: Optional[WanConfig] = None,
    variant: Optional[str] = None,
    *,
    layers: Optional[int] = None,
    embeddings: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, Tensor]:
    """Load and validate Wan parameters from a .safetensors path or a state dict.

    ``cfg`` may be omitted for files written by ``save_params`` (read from the metadata, as
    JSON, and validated field by field). A given ``cfg``/``variant`` that contradicts the
    metadata is an error. Returns a new dict (tensors cast to ``dtype``/``device`` if given).
    """
    meta: dict[str, str] = {}
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = os.fspath(source)
        if not path.endswith(".safetensors"):
            raise WeightError(f"{path!r}: only .safetensors files are loaded (never pickle/torch.load)")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no weights file at {path!r}")
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise WeightError(f"{path!r} is not a readable safetensors file: {exc}") from exc
    if "wan_config" in meta:
        try:
            file_cfg = WanConfig.from_dict(json.loads(meta["wan_config"]))
        except (ValueError, TypeError) as exc:
            raise WeightError(f"bad wan_config metadata: {exc}") from exc
        if cfg is not None and cfg != file_cfg:
            raise WeightError(f"config mismatch: file has {file_cfg}, caller passed {cfg}")
        cfg = file_cfg
    if cfg is None:
        raise WeightError("no config: pass cfg= (the file has no wan_config metadata)")
    if "variant" in meta:
        if variant is not None and variant != meta["variant"]:
            raise WeightError(f"variant mismatch: file says {meta['variant']!r}, caller passed {variant!r}")
        variant = meta["variant"]
    validate_params(raw, cfg, variant, layers=layers, embeddings=embeddings)
    out = {}
    for k, t in raw.items():
        t = t.detach()
        if dtype is not None or device is not None:
            t = t.to(dtype=dtype or t.dtype, device=device)
        else:
            t = t.clone()
        out[k] = t
    return out
