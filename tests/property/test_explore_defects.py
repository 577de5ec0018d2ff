"""The exploration finds kernels' single defects on CPU, and names each by its minimal signature.

Each test kernel below is a correct op (the target's own emulated scheme, on packed copies of its
inputs, so it passes every layout, size and value) with ONE defect: tied to one operand's layout,
to a size at a tile boundary, or to a structured value.  They are registered as targets here only.
:func:`harness.explore.explore` gets the target, a fixed seed and a bounded number of cases --
nothing about the defect -- and must report the signature the defect stands for, each once, with
no finding that blames another operand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.explore import explore
from harness.runner.execute import run_case
from harness.runner.targets import register_target
from harness.targets.attention import AttentionTarget
from harness.targets.linear import LinearTarget


def _packed(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in inputs.items()}


class _TestLinear(LinearTarget):
    """The emulated FP8 scheme itself (dynamic per-tensor E4M3 input), called on packed copies."""

    kind = "linear"
    ranks = (2, 3)

    def available(self, device: str) -> tuple[bool, str]:
        return True, ""

    def defect(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return x

    def call(self, x: torch.Tensor, inputs: Any) -> torch.Tensor:
        ins = _packed(dict(inputs))
        ins["x"] = self.defect(ins["x"], ins)
        return self.emulated(ins)


class KTailLinear(_TestLinear):
    """Drops the K tail: only whole 64-wide K blocks are summed."""

    name = "test_explore.k_tail"

    def defect(self, x, inputs):
        k = x.shape[-1]
        if k % 64:
            x = x.clone()
            x[..., k // 64 * 64 :] = 0
        return x


class ChannelAmaxLinear(_TestLinear):
    """Normalizes each input channel by its amax over the tokens and back: an all-zero channel gives 0/0."""

    name = "test_explore.channel_amax"

    def defect(self, x, inputs):
        xf = x.float()
        amax = xf.abs().reshape(-1, x.shape[-1]).amax(0)
        return ((xf / amax) * amax).to(x.dtype)


class PlainLinear(_TestLinear):
    """No defect: the control (the exploration must report nothing)."""

    name = "test_explore.plain_linear"


class VAlign2Attention(AttentionTarget):
    """Naive attention on packed copies, but reads v one element late when v's pointer is exactly 2-byte aligned."""

    name = "test_explore.v_align2"
    backend_name = ""
    head_dims = (64, 128)

    def available(self, device):
        return True, ""

    def call(self, q, k, v, layout):
        from harness.quant.backends import get_backend

        shifted = v.data_ptr() % 4 == 2
        q, k, v = (t.contiguous() for t in (q, k, v))
        if shifted:  # a vectorized load that rounds the pointer: every element read from its neighbour
            v = torch.roll(v, 1, dims=-1)
        return get_backend("emu.naive").run(q, k, v, layout=layout)


@pytest.fixture(autouse=True)
def _defect_targets() -> None:
    """Registered for each test only (the shared registry fixture removes them afterwards): at import they
    would leak into other modules' target lists, e.g. test_targets' "every CPU target passes plainly"."""
    for cls in (KTailLinear, ChannelAmaxLinear, PlainLinear, VAlign2Attention):
        register_target(cls, replace=True)


def _run(case):
    return run_case(case, "cpu")


def _explore(target, budget: int):
    return explore(target(), _run, seed=0, budget_cases=budget, max_elements=2048, max_minimize_runs=40)


def test_v_alignment_defect_is_found_and_blames_v_only() -> None:
    res = _explore(VAlign2Attention, 160)
    sigs = res.signatures()
    assert (VAlign2Attention.name, "layout_noninvariance", "v", "v: pointer aligned to 2 B") in sigs, res.summary()
    assert all(op == "v" for _, _, op, _ in sigs), res.summary()
    f = next(f for f in res.findings if f.property == "v: pointer aligned to 2 B")
    assert f.minimal["layouts"]["q"] == {"shape": f.minimal["layouts"]["q"]["shape"], "dtype": "bfloat16"}
    assert f.minimal["layouts"]["v"]["offset"] * 2 % 4 == 2  # the minimal case is the plain case + v's offset


def test_k_tail_defect_is_found_as_a_size_signature() -> None:
    res = _explore(KTailLinear, 60)
    sigs = res.signatures()
    assert sigs and all(op == "shape" for _, _, op, _ in sigs), res.summary()
    assert (KTailLinear.name, "drift", "shape", "shape: k = 16 (a multiple of 16, not of 32)") in sigs, res.summary()
    f = res.findings[0]
    assert f.minimal["params"]["in_features"] % 64 and f.count >= 2
    assert res.worst is not None and res.worst["ratio"] > 1


def test_zero_channel_defect_is_found_as_a_structured_value() -> None:
    res = _explore(ChannelAmaxLinear, 200)
    sigs = res.signatures()
    assert (ChannelAmaxLinear.name, "nonfinite", "x", "x: an all-zero channel") in sigs, res.summary()
    assert all(op.startswith("x") for _, _, op, _ in sigs), res.summary()


def test_the_defect_free_control_gives_no_finding() -> None:
    res = _explore(PlainLinear, 60)
    assert res.findings == [], res.summary()
    assert res.verdicts == {"pass": res.cases}


@pytest.mark.parametrize("target", [KTailLinear])
def test_the_same_seed_gives_the_same_exploration(target) -> None:
    a, b = _explore(target, 25).to_dict(), _explore(target, 25).to_dict()
    a.pop("elapsed_s"), b.pop("elapsed_s")
    assert a == b
