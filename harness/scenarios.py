"""The write-up's scenarios run as quantized Wan blocks and judged against the emulation of their formats.

Each scenario is a preset of :mod:`harness.quant.blocks` (FP4 + ``sageattn_3_fp4``, FP8 +
``sageattn_3_fp8``, InfiniteTalk, 2-D / 3-D linear inputs, scaled / unscaled checkpoints). One
run = the block at the tiny Wan config (head_dim 128, as the kernels need) on one device:

- ``out``: the block with the preset's operators (the real kernels where they can run);
- ``exact``: the float32 block with exact operators and the unquantized weights;
- ``emulated``: the block with every operator replaced by the emulation of its formats on the
  same quantized weights (:meth:`QuantizedBlock.emulated`).

Verdict: ``max_abs(out - exact) <= K x max_abs(emulated - exact) + floor`` (the FlashAttention
rule the op targets use, ``floor`` = rounding the exact block once to the activation dtype).
A scenario that cannot run as asked is ``skipped`` with the exact reason. On the CPU the
missing kernels are replaced by their emulations (each substitution is listed), so there the
verdict judges the CPU FP8 kernels and the block mechanics, not the attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from harness.reference.metrics import Bound, Judgement, judge

if TYPE_CHECKING:
    from harness.quant.blocks import QuantizedBlockConfig

__all__ = [
    "SCENARIOS",
    "K_BOUND",
    "KNOWN_DEFECTS",
    "ScenarioResult",
    "judge_outputs",
    "scenario_inputs",
    "run_scenario",
    "run_scenarios",
]

#: The write-up's scenarios (preset names of ``harness.quant.blocks.PRESETS``).
SCENARIOS: tuple[str, ...] = (
    "fp4+sage3-fp4",
    "fp8+sage3-fp8",
    "infinitetalk",
    "2d-input",
    "3d-input",
    "scaled-weights",
    "unscaled-weights",
)
#: A block may be this many times as far from the exact one as the emulation of its formats.
K_BOUND = 2.0
_GRID = (2, 2, 2)


@dataclass
class ScenarioResult:
    """One scenario on one device: ``status`` "pass" | "fail" | "skipped", why, and the numbers."""

    name: str
    device: str
    status: str
    reason: str
    substitutions: list[str] = field(default_factory=list)
    operators: dict[str, Any] = field(default_factory=dict)
    judgement: Optional[dict[str, Any]] = None
    known_defect: Optional[str] = None  # a failure the emulation of a known kernel defect explains

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "status": self.status,
            "reason": self.reason,
            "substitutions": list(self.substitutions),
            "operators": dict(self.operators),
            "judgement": self.judgement,
            "known_defect": self.known_defect,
        }


def judge_outputs(out: Tensor, exact: Tensor, emulated: Tensor, act_dtype: torch.dtype, name: str) -> Judgement:
    """The scenario verdict: ``out`` against ``exact`` with a bound scaled by ``emulated``'s error."""
    bound = Bound.derived(
        K_BOUND,
        exact,
        act_dtype,
        why=f"{name}: max_abs <= {K_BOUND:g} x the error of the block with every operator "
        "emulated in its formats, against the exact float32 block",
    )
    return judge(out, exact, emulated, bound)


def scenario_inputs(variant: str, device: str, seed: int = 0, tokens: int = 8) -> dict[str, Any]:
    """Tiny-config block inputs for ``variant`` (x, e, params, kwargs), deterministic from ``seed``."""
    from harness.reference.wan import TINY, init_params
    from harness.reference.wan.blocks import time_modulation

    if tokens != _GRID[0] * _GRID[1] * _GRID[2]:
        raise ValueError(f"tokens={tokens} must equal the grid {_GRID}'s {_GRID[0] * _GRID[1] * _GRID[2]}")
    params = init_params(TINY, seed, variant, layers=1, device=device)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x = rnd(1, tokens, TINY.dim)
    _, e = time_modulation(torch.tensor([500.0], device=device), params, TINY)
    kw: dict[str, Any] = dict(grid=_GRID, context=rnd(1, TINY.text_len, TINY.dim))
    if variant in ("i2v", "multitalk", "mtv"):
        kw["context_img"] = rnd(1, TINY.image_tokens, TINY.dim)
    if variant == "multitalk":
        kw["multitalk_audio"] = rnd(_GRID[0], TINY.multitalk_audio_tokens, TINY.multitalk_audio_dim)
    return dict(x=x, e=e, params=params, kw=kw)


def run_scenario(
    name: Union[str, "QuantizedBlockConfig"],
    device: str = "cpu",
    *,
    emulate_missing: Optional[bool] = None,
    seed: int = 0,
) -> ScenarioResult:
    """Run scenario ``name`` (a preset name, an alias or a config) on ``device`` and judge it.

    ``emulate_missing``: replace unavailable attention kernels by their emulations (default:
    on the CPU only; on a GPU a missing kernel skips the scenario with the reason).
    """
    from harness.quant.blocks import QuantizedBlock, preset_config, resolve_preset

    cfg = preset_config(name)
    name = name if isinstance(name, str) else cfg.name
    if emulate_missing is None:
        emulate_missing = torch.device(device).type == "cpu"
    resolved = resolve_preset(cfg, device, emulate_missing=emulate_missing)
    ops = {"attention": dict(resolved.attention), "linear": dict(resolved.linear)}
    if not resolved.runnable:
        return ScenarioResult(
            name, device, "skipped", f"cannot run on {device}: {resolved.reason}", list(resolved.substitutions), ops
        )
    block = QuantizedBlock(resolved)
    inp = scenario_inputs(cfg.variant, device, seed)
    args = (inp["x"], inp["e"], inp["params"], 0)
    out = block(*args, **inp["kw"])
    ran = {p: b for p, b, _ in block.trace["attention"]}
    exact = block.reference(*args, **inp["kw"])
    emulated = block.emulated(*args, **inp["kw"])
    j = judge_outputs(out, exact, emulated, cfg.act_dtype, cfg.name)
    ops["attention"] = ran
    reason = j.reason
    if torch.equal(out, emulated):
        reason += " (every operator ran its emulation here: this checks the block's mechanics, not a kernel)"
    known = None
    if not j.passed:
        known = _known_defect(block, ran, out, exact, args, inp["kw"], cfg)
        if known:
            reason += f"; {known}"
    return ScenarioResult(
        name, device, "pass" if j.passed else "fail", reason, _compact(resolved.substitutions), ops, j.to_dict(), known
    )


#: Kernel defects (docs/gpu-findings.md) as switches of the emulation that models them.
KNOWN_DEFECTS: dict[str, tuple[dict[str, Any], str]] = {
    "emu.sage1": (
        {"tail_keys_score_zero": True},
        "SageAttention 1.0.6's short last key tile (padded keys scored 0, not -inf, when keys % 64 != 0)",
    ),
}


def _known_defect(
    block: Any, ran: dict[str, str], out: Tensor, exact: Tensor, args: tuple, kw: dict, cfg: Any
) -> Optional[str]:
    """A known kernel defect that explains a failed bound: ``out`` passes against the emulation with the defect on."""
    from harness.quant.backends import emulation_for

    emus = {emulation_for(b, block.resolved.device) for b in ran.values()}
    switches = {e: KNOWN_DEFECTS[e][0] for e in emus if e in KNOWN_DEFECTS}
    if not switches:
        return None
    with_defect = block.emulated(*args, emulation_kwargs=switches, **kw)
    if not judge_outputs(out, exact, with_defect, cfg.act_dtype, cfg.name).passed:
        return None
    names = "; ".join(KNOWN_DEFECTS[e][1] for e in switches)
    return f"within the bound of the emulation with the known kernel defect on: {names} -- a kernel defect, not layout"


def _compact(subs: tuple[str, ...]) -> list[str]:
    """``part: a -> b (why)`` lines merged over the parts that share the substitution."""
    parts: dict[str, list[str]] = {}
    for s in subs:
        head, sep, rest = s.partition(": ")
        if sep and head.isidentifier():
            parts.setdefault(rest, []).append(head)
        else:
            parts.setdefault(s, [])
    return [f"{'/'.join(ps)}: {rest}" if ps else rest for rest, ps in parts.items()]


def run_scenarios(
    device: str = "cpu", names: tuple[str, ...] = SCENARIOS, *, emulate_missing: Optional[bool] = None
) -> list[ScenarioResult]:
    """Every scenario in ``names`` on ``device``; a harness error in one becomes a "fail" naming it."""
    out = []
    for n in names:
        try:
            out.append(run_scenario(n, device, emulate_missing=emulate_missing))
        except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
            out.append(ScenarioResult(n, device, "fail", f"the scenario raised {type(e).__name__}: {e}"))
    return out
