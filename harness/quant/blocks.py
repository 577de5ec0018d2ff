"""Wan2.1 blocks with quantized operators: FP8 (or NVFP4) linears and a chosen attention backend.

The block math is ``harness.reference.wan.wan_block`` (float32 orchestration); this module only
supplies its two operators:

- **linear** ``(x, weight, bias, name)``: layers whose name contains a ``keep`` keyword (the
  ``convert_to_fp8`` list) run in the activation dtype; the others quantize their weight once
  (cached per name; ``weight_scaling`` "tensor", "row" or "none" = unscaled checkpoint) and run
  ``kind``: ``"fp8"`` (``fp8_linear``), ``"legacy.<name>"`` (a ``harness.quant.legacy`` forward),
  ``"plugin:<pkg.mod:attr>"`` (a plug-in), ``"nvfp4"`` (NVFP4 x NVFP4, emulated: no native FP4
  GEMM is wired here), ``"bf16"`` (plain linear in the activation dtype) or ``"exact"``. With
  ``input_rank=2`` every quantized linear is fed a 2-D ``(B*L, C)`` view of its input (the
  "2-d input" scenario), with 3 the block's own 3-D tensors.
- **attention** ``(q, k, v)`` on NHD: the backend for the block part that called it. Parts are
  ``self_attn``, ``cross_attn``, ``audio_cross_attn`` (MultiTalk), ``motion_attn`` (MTV) and
  ``audio_cross_attn_wrapper`` (HuMo); each attention call is routed by the part of the
  linear that ran just before it (every Wan sub-block computes its q/k/v projections right
  before its attention call). Inputs go through ``safe_attention`` unless ``safe=False``.

Inputs are cast to ``act_dtype`` (bfloat16 by default) before each operator and outputs cast
back, as the bf16 model does. Presets (:data:`PRESETS`) name the scenarios users report (the
write-up's attention mode names are accepted too: :data:`PRESET_ALIASES`);
:func:`resolve_preset` says what can run on a device and, with ``emulate_missing=True``,
replaces an unavailable backend by its emulation (reporting each substitution and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.quant.backends import EMULATION_OF, get_backend
from harness.quant.convert import DEFAULT_KEEP, quantize_weight

__all__ = [
    "PARTS",
    "CONFIGS",
    "QuantizedBlockConfig",
    "PRESETS",
    "PRESET_ALIASES",
    "preset_config",
    "ResolvedPreset",
    "resolve_preset",
    "QuantizedBlock",
    "make_block",
    "make_linear_op",
    "make_attention_op",
    "nvfp4_linear_emulated",
    "part_of",
]

PARTS = ("self_attn", "cross_attn", "audio_cross_attn", "motion_attn", "audio_cross_attn_wrapper")
_LINEAR_KINDS = ("fp8", "nvfp4", "bf16", "exact")


def _configs() -> dict[str, Any]:
    from harness.reference.wan.config import TINY, WAN_1_3B, WAN_14B

    return {"small": TINY, "tiny": TINY, "1.3b": WAN_1_3B, "14b": WAN_14B}


class _LazyConfigs(Mapping[str, Any]):
    """``CONFIGS["1.3b" | "14b" | "small"]`` -> WanConfig (imported on first use)."""

    def __getitem__(self, key: str) -> Any:
        c = _configs()
        if key not in c:
            raise KeyError(f"unknown Wan config {key!r}; use one of {sorted(c)}")
        return c[key]

    def __iter__(self):
        return iter(_configs())

    def __len__(self) -> int:
        return len(_configs())


CONFIGS: Mapping[str, Any] = _LazyConfigs()


def part_of(name: str) -> str:
    """The block part of a linear's qualified name: "blocks.3.self_attn.q" -> "self_attn"."""
    bits = name.split(".")
    if len(bits) >= 3 and bits[0] == "blocks":
        return bits[2]
    return bits[0]


@dataclass(frozen=True)
class QuantizedBlockConfig:
    """Operators for a quantized Wan block; per-part overrides map a part (see ``PARTS``) to a choice."""

    name: str = "custom"
    description: str = ""
    linear: str = "fp8"
    linear_overrides: Mapping[str, str] = field(default_factory=dict)
    weight_scaling: str = "tensor"  # "tensor" | "row" | "none"
    input_rank: int = 3  # 2: feed linears (B*L, C); 3: (B, L, C)
    attention: str = "sdpa"  # a backend name, or candidates "a|b" (the first available one runs)
    attention_overrides: Mapping[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = DEFAULT_KEEP
    variant: str = "t2v"  # which Wan variant's parameters the scenario needs
    config: str = "small"
    act_dtype: torch.dtype = torch.bfloat16
    safe: bool = True  # route attention through safe_attention

    def __post_init__(self) -> None:
        for kind in (self.linear, *self.linear_overrides.values()):
            _check_linear_kind(kind)
        for choice in (self.attention, *self.attention_overrides.values()):
            for b in choice.split("|"):
                get_backend(b)  # raises with the known names
        for part in (*self.linear_overrides, *self.attention_overrides):
            if part not in PARTS:
                raise ValueError(f"unknown block part {part!r}; use one of {PARTS}")
        if self.weight_scaling not in ("tensor", "row", "none"):
            raise ValueError(f"weight_scaling={self.weight_scaling!r}; use 'tensor', 'row' or 'none'")
        if self.input_rank not in (2, 3):
            raise ValueError(f"input_rank={self.input_rank!r}; use 2 or 3")
        if self.config not in ("small", "tiny", "1.3b", "14b"):
            raise ValueError(f"config={self.config!r}; use 'small', '1.3b' or '14b'")

    def linear_for(self, part: str) -> str:
        return self.linear_overrides.get(part, self.linear)

    def attention_for(self, part: str) -> str:
        return self.attention_overrides.get(part, self.attention)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "linear": self.linear,
            "linear_overrides": dict(self.linear_overrides),
            "weight_scaling": self.weight_scaling,
            "input_rank": self.input_rank,
            "attention": self.attention,
            "attention_overrides": dict(self.attention_overrides),
            "keep": list(self.keep),
            "variant": self.variant,
            "config": self.config,
            "act_dtype": str(self.act_dtype).replace("torch.", ""),
            "safe": self.safe,
        }


def _check_linear_kind(kind: str) -> None:
    if kind in _LINEAR_KINDS or kind.startswith("plugin:"):
        return
    if kind.startswith("legacy."):
        from harness.quant.legacy import get_legacy

        get_legacy(kind)
        return
    raise ValueError(
        f"unknown linear kind {kind!r}; use one of {_LINEAR_KINDS}, 'legacy.<name>' or 'plugin:<package.module:attr>'"
    )


# SageAttention 3 ships one inference kernel, FP4 (sageattn3_blackwell); its paper's 8-bit part is
# for training. The FP8 attention that exists for inference is SageAttention 2's INT8-QK / FP8-PV
# kernel, so "sage3-fp8" resolves to that (sm90 entry point on Hopper, the sm89 one elsewhere).
PRESETS: dict[str, QuantizedBlockConfig] = {
    p.name: p
    for p in (
        QuantizedBlockConfig(
            name="fp8+sage3-fp8",
            linear="fp8",
            attention="sage2.qk_int8_pv_fp8_cuda_sm90|sage2.qk_int8_pv_fp8_cuda",
            description="FP8 linears + 8-bit attention (INT8 QK, FP8 PV: SageAttention 2's FP8 kernel; "
            "SageAttention 3's only inference kernel is FP4)",
        ),
        QuantizedBlockConfig(
            name="fp4+sage3-fp4",
            linear="nvfp4",
            attention="sage3",
            description="NVFP4 linears (emulated) + SageAttention 3 FP4 attention (Blackwell 10.0/12.0)",
        ),
        QuantizedBlockConfig(
            name="infinitetalk",
            linear="fp8",
            attention="sage1.sageattn",
            variant="multitalk",
            description="InfiniteTalk/MultiTalk path: I2V block with MultiTalk audio attention, FP8 linears, "
            "SageAttention 1 (audio attention gets non-contiguous packed K/V)",
        ),
        QuantizedBlockConfig(
            name="2d-input",
            linear="fp8",
            input_rank=2,
            attention="sdpa",
            description="FP8 linears fed 2-D (B*L, C) inputs",
        ),
        QuantizedBlockConfig(
            name="3d-input",
            linear="fp8",
            input_rank=3,
            attention="sdpa",
            description="FP8 linears fed the block's 3-D (B, L, C) inputs",
        ),
        QuantizedBlockConfig(
            name="scaled-weights",
            linear="fp8",
            weight_scaling="tensor",
            attention="sdpa",
            description="FP8 weights with a per-tensor scale (scaled checkpoints)",
        ),
        QuantizedBlockConfig(
            name="unscaled-weights",
            linear="fp8",
            weight_scaling="none",
            attention="sdpa",
            description="FP8 weights cast without a scale (unscaled checkpoints; |w| > 448 saturates)",
        ),
    )
}


#: The write-up's attention mode names (WanVideoWrapper's ``attention_mode``) -> preset. Its plain
#: ``sageattn_3`` is SageAttention 3's only inference kernel, the FP4 one.
PRESET_ALIASES: dict[str, str] = {
    "sageattn_3": "fp4+sage3-fp4",
    "sageattn_3_fp4": "fp4+sage3-fp4",
    "sageattn_3_fp8": "fp8+sage3-fp8",
}


def preset_config(preset: Union[str, QuantizedBlockConfig]) -> QuantizedBlockConfig:
    """The config of a preset name or alias (a config passes through); the error lists the known names."""
    if isinstance(preset, QuantizedBlockConfig):
        return preset
    name = PRESET_ALIASES.get(preset, preset)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)} (aliases: {', '.join(PRESET_ALIASES)})")
    return PRESETS[name]


@dataclass(frozen=True)
class ResolvedPreset:
    """What a config runs on ``device``: per-part linear and attention, substitutions and why."""

    config: QuantizedBlockConfig
    device: str
    attention: dict[str, str]  # part -> backend that will run
    linear: dict[str, str]  # part -> linear kind that will run
    substitutions: tuple[str, ...]
    runnable: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "device": self.device,
            "attention": dict(self.attention),
            "linear": dict(self.linear),
            "substitutions": list(self.substitutions),
            "runnable": self.runnable,
            "reason": self.reason,
        }


def _linear_available(kind: str, device: torch.device) -> tuple[bool, str]:
    if kind in ("bf16", "exact", "nvfp4"):
        return True, ""
    if kind == "fp8":
        return True, ""  # fp8_linear picks cuda / cpu / emulate per call
    if kind.startswith("plugin:"):
        try:
            from harness.quant.plugins import load_linear

            load_linear(kind.removeprefix("plugin:"))
        except Exception as e:  # noqa: BLE001
            return False, f"plug-in {kind!r} cannot be loaded: {e}"
        return True, ""
    # legacy forwards call torch._scaled_mm directly (early 2025 with an E5M2 input cast)
    from harness.quant.linear import scaled_mm_available

    ok, why = scaled_mm_available(device, mixed=kind == "wanvideo_early2025")
    return (True, "") if ok else (False, f"{kind} calls torch._scaled_mm: {why}")


def resolve_preset(
    preset: Union[str, QuantizedBlockConfig],
    device: Optional[Union[str, torch.device]] = None,
    *,
    emulate_missing: bool = False,
) -> ResolvedPreset:
    """Check what ``preset`` needs on ``device`` (default: CUDA if present, else CPU).

    An unavailable attention backend is replaced by its emulation (``EMULATION_OF``) when
    ``emulate_missing``; otherwise the result is not runnable and ``reason`` says why.
    Probes run now (may initialise CUDA: call it in a worker).
    """
    cfg = preset_config(preset)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    subs: list[str] = []
    problems: list[str] = []
    attn: dict[str, str] = {}
    lin: dict[str, str] = {}
    for part in PARTS:
        candidates = cfg.attention_for(part).split("|")
        whys = []
        name = None
        for cand in candidates:
            ok, why = get_backend(cand).available(dev)
            if ok:
                name = cand
                break
            whys.append(f"{cand}: {why}")
        if name is None:
            first = candidates[0]
            emu = EMULATION_OF.get(first)
            if emulate_missing and emu is not None:
                subs.append(f"{part}: {first} -> {emu} ({'; '.join(whys)})")
                name = emu
            else:
                problems.append(f"{part} attention {'; '.join(whys)}")
                name = first
        attn[part] = name
        kind = cfg.linear_for(part)
        ok, why = _linear_available(kind, dev)
        if not ok:
            problems.append(f"{part} linear {kind}: {why}")
        lin[part] = kind
    if cfg.linear == "nvfp4":
        subs.append("linears: nvfp4 -> emulated NVFP4 (no native FP4 GEMM is wired in harness.quant)")
    uniq = tuple(dict.fromkeys(problems))
    return ResolvedPreset(
        config=cfg,
        device=str(dev),
        attention=attn,
        linear=lin,
        substitutions=tuple(subs),
        runnable=not uniq,
        reason="; ".join(uniq) if uniq else "runnable",
    )


# ---------------------------------------------------------------------------
# Operators


def nvfp4_linear_emulated(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T + b`` with x and W quantized NVFP4 along K (16-blocks, E4M3 scales), float32 result."""
    from harness.reference.formats import dequantize, quantize_nvfp4

    k = x.shape[-1]
    if k % 16:
        raise ValueError(f"NVFP4 linear needs K divisible by 16 (one scale per 16 elements), got K={k}")
    xq = dequantize(quantize_nvfp4(x.reshape(-1, k).to(torch.float32), axis=-1))
    wq = dequantize(quantize_nvfp4(weight.to(torch.float32), axis=-1))
    out = xq @ wq.T
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*x.shape[:-1], weight.shape[0])


LinearFn = Callable[[Tensor, Tensor, Optional[Tensor], str], Tensor]
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class _Route:
    part: str = "self_attn"
    linear_calls: list = field(default_factory=list)  # (name, kind, action)
    attention_calls: list = field(default_factory=list)  # (part, backend, actions)


def _emulated_linear(kind: str, x: Tensor, w8: Tensor, sw: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """The documented scheme of linear ``kind`` on the same FP8 weight, emulated (the op's target's ``emulated``)."""
    if kind.startswith("plugin:"):
        raise ValueError(f"no emulation is known for plug-in linear {kind!r}; judge it with an FP8 preset instead")
    from harness.runner.targets import get_target

    target = get_target("fp8_linear" if kind == "fp8" else kind)
    inputs = {"x": x, "weight": w8, "bias": bias}
    if sw is not None and target.weight_scale is not None:  # early 2025 ignores a stored scale (ones scales)
        inputs["weight_scale"] = sw.reshape(1, -1) if sw.numel() > 1 else sw  # rowwise: _scaled_mm's (1, N)
    return target.emulated(inputs)


def make_linear_op(cfg: QuantizedBlockConfig, route: Optional[_Route] = None, *, emulate: bool = False) -> LinearFn:
    """The block's linear operator for ``cfg`` (weights quantized once per name and cached).

    ``emulate``: run each quantized linear's documented scheme through the format emulation
    (``harness.reference.formats``) on the same quantized weight instead of the kernel.
    """
    cache: dict[tuple[str, int], tuple[Tensor, Optional[Tensor]]] = {}
    route = route if route is not None else _Route()
    ops: dict[str, Callable[..., Tensor]] = {}

    def op_for(kind: str) -> Callable[..., Tensor]:
        if kind not in ops:
            if kind == "fp8":
                from harness.quant.linear import fp8_linear

                ops[kind] = fp8_linear
            elif kind.startswith("legacy."):
                from harness.quant.legacy import legacy_op

                ops[kind] = legacy_op(kind)
            else:
                from harness.quant.plugins import load_linear

                ops[kind] = load_linear(kind.removeprefix("plugin:"))
        return ops[kind]

    def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str) -> Tensor:
        part = part_of(name)
        if part in PARTS:
            route.part = part
        kind = cfg.linear_for(part)
        hit = next((kw for kw in cfg.keep if kw in name), None)
        act = cfg.act_dtype
        if kind == "exact":
            from harness.reference.wan.blocks import exact_linear

            route.linear_calls.append((name, "exact", "exact"))
            return exact_linear(x, weight, bias, name)
        if hit is not None or kind == "bf16":
            route.linear_calls.append((name, "bf16", f"kept ({hit})" if hit else "bf16"))
            y = F.linear(x.to(act), weight.to(act), None if bias is None else bias.to(act))
            return y.to(x.dtype)
        if kind == "nvfp4":
            route.linear_calls.append((name, "nvfp4", "emulated"))
            return nvfp4_linear_emulated(x.to(act), weight, bias).to(x.dtype)
        key = (name, weight.data_ptr())
        if key not in cache:
            cache[key] = quantize_weight(weight.to(act), cfg.weight_scaling)
        w8, sw = cache[key]
        xa = x.to(act)
        lead = xa.shape[:-1]
        if cfg.input_rank == 2 and xa.dim() != 2:
            xa = xa.reshape(-1, xa.shape[-1])
        b = None if bias is None else bias.to(act)
        if emulate:
            y = _emulated_linear(kind, xa, w8, sw, b).to(act)
        else:
            y = op_for(kind)(xa, w8, weight_scale=sw, bias=b, out_dtype=act)
        route.linear_calls.append((name, kind, f"{xa.dim()}-D input" + (", emulated" if emulate else "")))
        return y.reshape(*lead, y.shape[-1]).to(x.dtype)

    return linear


def make_attention_op(
    backends: Mapping[str, str],
    cfg: QuantizedBlockConfig,
    route: Optional[_Route] = None,
    backend_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> AttentionFn:
    """The block's attention operator: NHD q/k/v -> backend of the calling part (see module docstring).

    ``backend_kwargs``: backend name -> extra keywords for its calls (e.g. an emulation's defect switch).
    """
    route = route if route is not None else _Route()
    extra = backend_kwargs or {}

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        name = backends.get(route.part, cfg.attention)
        act = cfg.act_dtype
        be = get_backend(name)
        qa, ka, va = (t.to(act) if t.dtype != act else t for t in (q, k, v))
        if cfg.safe:
            from harness.quant.attention import safe_attention

            out, actions = safe_attention(be, qa, ka, va, "NHD", **extra.get(name, {}))
        else:
            kw = dict(extra.get(name, {}))
            layout = "NHD" if "NHD" in be.requires.layouts else be.requires.layouts[0]
            if layout == "NHD":
                out = be.run(qa, ka, va, "NHD", **kw)
            else:
                out = be.run(qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), layout, **kw).transpose(1, 2)
            actions = []
        route.attention_calls.append((route.part, name, [str(a) for a in actions]))
        return out.to(q.dtype)

    return attention


class QuantizedBlock:
    """A Wan block with quantized operators; call it like ``wan_block`` minus the operators.

    ``block(x, e, params, index, cfg=None, **kwargs)`` -> ``wan_block(..., linear=..., attention=...)``;
    ``block.reference(...)`` runs the exact float32/64 block on the same arguments.
    ``block.trace`` lists the last call's linear and attention decisions.
    """

    def __init__(self, resolved: ResolvedPreset) -> None:
        self.resolved = resolved
        self.config = resolved.config
        self._route = _Route()
        self.linear = make_linear_op(self.config, self._route)
        self.attention = make_attention_op(resolved.attention, self.config, self._route)

    @property
    def wan_config(self) -> Any:
        return CONFIGS[self.config.config]

    @property
    def trace(self) -> dict[str, Any]:
        return {"linear": list(self._route.linear_calls), "attention": list(self._route.attention_calls)}

    def __call__(
        self, x: Tensor, e: Tensor, params: Mapping[str, Tensor], index: int, cfg: Any = None, **kwargs: Any
    ) -> Tensor:
        from harness.reference.wan.blocks import wan_block

        self._route.linear_calls.clear()
        self._route.attention_calls.clear()
        self._route.part = "self_attn"
        return wan_block(
            x, e, params, index, cfg or self.wan_config, linear=self.linear, attention=self.attention, **kwargs
        )

    def reference(
        self, x: Tensor, e: Tensor, params: Mapping[str, Tensor], index: int, cfg: Any = None, **kwargs: Any
    ) -> Tensor:
        from harness.reference.wan.blocks import wan_block

        return wan_block(x, e, params, index, cfg or self.wan_config, **kwargs)

    def emulated(
        self,
        x: Tensor,
        e: Tensor,
        params: Mapping[str, Tensor],
        index: int,
        cfg: Any = None,
        *,
        emulation_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
        **kwargs: Any,
    ) -> Tensor:
        """The block with every operator replaced by the emulation of its formats (same quantized weights).

        Linears: their scheme through ``harness.reference.formats``; attention: the emulation
        modelling the backend that ran (``emulation_for``), called with ``emulation_kwargs[name]``
        when given (e.g. ``{"emu.sage1": {"tail_keys_score_zero": True}}``: a known kernel defect).
        The drift bound of a real run scales with this run's error against :meth:`reference`.
        """
        from harness.quant.backends import emulation_for
        from harness.reference.wan.blocks import wan_block

        route = _Route()
        backends = {part: emulation_for(name, self.resolved.device) for part, name in self.resolved.attention.items()}
        linear = make_linear_op(self.config, route, emulate=True)
        attention = make_attention_op(backends, self.config, route, emulation_kwargs)
        return wan_block(x, e, params, index, cfg or self.wan_config, linear=linear, attention=attention, **kwargs)


def make_block(
    preset: Union[str, QuantizedBlockConfig],
    device: Optional[Union[str, torch.device]] = None,
    *,
    emulate_missing: bool = False,
    **overrides: Any,
) -> QuantizedBlock:
    """A :class:`QuantizedBlock` for a preset name or config (``overrides`` replace config fields).

    Raises ``RuntimeError`` naming what is missing when the preset cannot run on ``device``
    and ``emulate_missing`` is False.
    """
    cfg = preset_config(preset)
    if overrides:
        cfg = replace(cfg, **overrides)
    resolved = resolve_preset(cfg, device, emulate_missing=emulate_missing)
    if not resolved.runnable:
        raise RuntimeError(
            f"preset {cfg.name!r} cannot run on {resolved.device}: {resolved.reason} "
            "(pass emulate_missing=True to use the emulations)"
        )
    return QuantizedBlock(resolved)
