"""The direct Triton launcher (``harness.quant._triton_quant._Launcher``) against a stand-in for Triton's API.

On CPU there is no Triton kernel to launch, so a fake ``JITFunction`` records what it is called with: the first
launch per key must go through Triton's ``kernel[grid](..., num_warps=, **constexprs)`` and later ones through the
compiled kernel's ``[grid](*args, *constexprs in signature order)``; anything Triton specializes on (a pointer's
alignment, a scalar's value, a constexpr) must make a new key. The GPU test checks the real kernels' bits.
"""

from __future__ import annotations

import torch

from harness.quant import _triton_quant as TQ


class FakeCompiled:
    def __init__(self, log: list) -> None:
        self.log = log
        self.function = object()

    def __getitem__(self, grid):
        assert len(grid) == 3, grid  # Triton's CompiledKernel reads grid[0], grid[1] and grid[2]
        return lambda *args: self.log.append(("direct", grid, args))


class FakeJit:
    arg_names = ("x_ptr", "n", "BLOCK", "FLAT")  # FLAT declared after BLOCK

    def __init__(self) -> None:
        self.log: list = []
        self.compiled = FakeCompiled(self.log)

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            self.log.append(("triton", grid, args, num_warps, constexprs))
            return self.compiled

        return launch


def test_the_first_launch_binds_and_later_ones_go_direct_with_constexprs_in_signature_order(monkeypatch) -> None:
    monkeypatch.delenv(TQ.DIRECT_LAUNCH_ENV, raising=False)
    jit = FakeJit()
    launch = TQ._Launcher(lambda: jit)
    x = torch.zeros(64)
    launch((4,), x, 64, num_warps=4, FLAT=True, BLOCK=16)  # keyword order differs from the signature's
    launch((4,), x, 64, num_warps=4, FLAT=True, BLOCK=16)
    assert [e[0] for e in jit.log] == ["triton", "direct"]
    assert jit.log[1] == ("direct", (4, 1, 1), (x, 64, 16, True))  # BLOCK before FLAT, as declared


def test_anything_triton_specializes_on_makes_a_new_key(monkeypatch) -> None:
    monkeypatch.delenv(TQ.DIRECT_LAUNCH_ENV, raising=False)
    jit = FakeJit()
    launch = TQ._Launcher(lambda: jit)
    base = torch.zeros(65)
    aligned, shifted = base[:64], base[1:65]  # 4 bytes apart: different pointer low bits
    calls = [
        ((4,), (aligned, 64), dict(BLOCK=16, FLAT=True), 4),
        ((4,), (shifted, 64), dict(BLOCK=16, FLAT=True), 4),  # pointer alignment
        ((4,), (aligned, 63), dict(BLOCK=16, FLAT=True), 4),  # a scalar's value
        ((4,), (aligned, 64), dict(BLOCK=32, FLAT=True), 4),  # a constexpr
        ((4,), (aligned, 64), dict(BLOCK=16, FLAT=True), 8),  # num_warps
        ((8,), (aligned, 64), dict(BLOCK=16, FLAT=True), 4),  # the grid
        ((4,), (aligned.double(), 64), dict(BLOCK=16, FLAT=True), 4),  # a dtype
    ]
    for grid, args, cx, nw in calls:
        launch(grid, *args, num_warps=nw, **cx)
    assert [e[0] for e in jit.log] == ["triton"] * len(calls)  # none reused another's entry
    launch((4,), shifted, 64, num_warps=4, BLOCK=16, FLAT=True)
    assert jit.log[-1][0] == "direct"


def test_the_environment_switch_and_an_unusable_return_keep_tritons_own_path(monkeypatch) -> None:
    jit = FakeJit()
    monkeypatch.setenv(TQ.DIRECT_LAUNCH_ENV, "0")
    launch = TQ._Launcher(lambda: jit)
    x = torch.zeros(8)
    for _ in range(2):
        launch((1,), x, 8, num_warps=1, BLOCK=8, FLAT=False)
    assert [e[0] for e in jit.log] == ["triton", "triton"]
    monkeypatch.delenv(TQ.DIRECT_LAUNCH_ENV)
    jit.compiled = None  # a Triton whose launch returns nothing usable
    launch2 = TQ._Launcher(lambda: jit)
    for _ in range(2):
        launch2((1,), x, 8, num_warps=1, BLOCK=8, FLAT=False)
    assert [e[0] for e in jit.log][-2:] == ["triton", "triton"]
