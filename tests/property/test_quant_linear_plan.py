"""fp8_linear's declared config, its immutable plan and the plan cache keyed by layout signature.

The cache is checked against fresh plans built from the same operands (the planner run without the
cache), over random layouts that persist in one cache across examples, so a key that misses a layout
feature returns a stale plan and fails; plan builds are counted by wrapping the planner itself.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.layouts import LayoutSpec, materialize
from harness.quant.fp8 import dispatch as D
from harness.quant.fp8 import plan as P
from harness.quant.fp8.cache import PlanCache
from harness.quant.linear import (
    Fp8LinearConfig,
    Fp8LinearError,
    clear_plan_cache,
    fp8_linear,
    fp8_linear_with_plan,
    last_plan,
    plan_cache_info,
    plan_operands,
    resolve_config,
    select_backend,
)
from harness.reference.formats import round_to_format, scaled_mm
from harness.strategies import layouts

E4M3 = torch.float8_e4m3fn


def make_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return round_to_format(torch.randn(n, k, generator=g) * 4, "e4m3").to(E4M3)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[P.LinearPlan]:
    """Every plan the planner builds during the test (the cache starts empty)."""
    seen: list[P.LinearPlan] = []
    real = P.build_plan

    def counting(*args: Any, **kwargs: Any) -> P.LinearPlan:
        plan = real(*args, **kwargs)
        seen.append(plan)
        return plan

    monkeypatch.setattr(P, "build_plan", counting)
    clear_plan_cache()
    yield seen
    clear_plan_cache()


def fresh_plan(
    x: torch.Tensor, w: torch.Tensor, ws: Any = None, xs: Any = None, bias: Any = None, **kwargs: Any
) -> P.LinearPlan:
    """The plan of one call built from scratch: resolve the config, select the backend, plan (no cache)."""
    cfg = resolve_config(x, w, ws, xs, bias, **kwargs)
    chosen, why = select_backend(x.device, cfg.weight_scaling, cfg.backend)
    return P.build_plan(x, w, ws, xs, bias, cfg, chosen, why)


# ---------------------------------------------------------------------------- the config

BAD_CONFIGS = [
    (dict(weight_scaling="channel"), r"weight_scaling='channel'; use one of \('tensorwise', 'rowwise'\)"),
    (dict(input_scaling="delayed"), r"input_scaling='delayed'; use one of \('dynamic', 'static'\)"),
    (dict(out_dtype=torch.int8), r"out_dtype=torch.int8; use torch.bfloat16"),
    (dict(backend="gpu"), r"backend='gpu'; use one of"),
    (dict(rules="strict"), r"rules='strict'; use None"),
    (dict(use_fast_accum=1), r"use_fast_accum=1; pass True or False"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS, ids=[next(iter(k)) for k, _ in BAD_CONFIGS])
def test_config_rejects_unknown_values_naming_value_and_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(Fp8LinearError, match=match):
        Fp8LinearConfig(**kwargs)


def test_config_is_frozen_and_hashable() -> None:
    cfg = Fp8LinearConfig(weight_scaling="rowwise")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_scaling = "tensorwise"  # type: ignore[misc]
    assert hash(cfg) == hash(Fp8LinearConfig(weight_scaling="rowwise")) and cfg != Fp8LinearConfig()


X = torch.randn(4, 32)
W8 = make_weight(16, 32)
CONTRADICTIONS = [
    (
        dict(weight=W8, weight_scale=torch.ones(16)),
        Fp8LinearConfig(weight_scaling="tensorwise"),
        r"weight_scale has shape \(16,\), which means rowwise scaling, but config.weight_scaling='tensorwise'; "
        r"pass a scalar weight_scale or use weight_scaling='rowwise'",
    ),
    (
        dict(weight=W8, weight_scale=torch.tensor(0.5)),
        Fp8LinearConfig(weight_scaling="rowwise"),
        r"weight_scale has shape \(\), which means tensorwise .* pass a \(16,\) weight_scale",
    ),
    (
        dict(weight=torch.randn(16, 32)),
        Fp8LinearConfig(weight_scaling="tensorwise"),
        r"the weight is torch.float32, which is quantized here rowwise; use weight_scaling='rowwise'",
    ),
    (
        dict(weight=W8),
        Fp8LinearConfig(input_scaling="static"),
        r"no input_scale was given; pass input_scale= or use input_scaling='dynamic'",
    ),
    (
        dict(weight=W8, input_scale=0.5),
        Fp8LinearConfig(),
        r"input_scale was given but config.input_scaling='dynamic'; drop input_scale or use input_scaling='static'",
    ),
    (
        dict(input=X.to(E4M3), weight=W8),
        Fp8LinearConfig(),
        r"input is float8_e4m3fn, already quantized .* use input_scaling='static'",
    ),
    (
        dict(weight=W8, backend="cpu"),
        Fp8LinearConfig(),
        r"backend='cpu' was passed together with config= \(config.backend='auto'\); set it in the config",
    ),
    (dict(weight=W8), "rowwise", r"config must be an Fp8LinearConfig, got str"),
]


@pytest.mark.parametrize("kwargs,config,match", CONTRADICTIONS, ids=[str(i) for i in range(len(CONTRADICTIONS))])
def test_operands_contradicting_an_explicit_config_are_rejected(kwargs: dict, config: Any, match: str) -> None:
    kwargs = {"input": X, **kwargs}
    with pytest.raises(Fp8LinearError, match=match):
        fp8_linear(**kwargs, config=config)


@pytest.mark.parametrize("weight_scale", [torch.tensor(0.25), torch.rand(16) + 0.5, None])
@pytest.mark.parametrize("input_scale", [None, 0.5])
def test_derived_config_is_the_declared_one(weight_scale: Any, input_scale: Any) -> None:
    """fp8_linear's arguments derive the same config a caller would declare, and the same call results."""
    derived = fp8_linear_with_plan(X, W8, weight_scale, input_scale=input_scale)
    declared_cfg = Fp8LinearConfig(
        weight_scaling="rowwise" if weight_scale is not None and weight_scale.numel() > 1 else "tensorwise",
        input_scaling="static" if input_scale is not None else "dynamic",
    )
    declared = fp8_linear_with_plan(X, W8, weight_scale, input_scale=input_scale, config=declared_cfg)
    assert derived.plan.config == dataclasses.replace(declared_cfg, out_dtype=torch.float32)
    assert declared.plan == derived.plan and torch.equal(declared.out, derived.out)


def test_rowwise_config_without_weight_scale_uses_unit_row_scales() -> None:
    """Declaring rowwise for an FP8 weight without scales: one unit scale per row, dynamic per-row input scales."""
    res = fp8_linear_with_plan(X, W8, config=Fp8LinearConfig(weight_scaling="rowwise", backend="emulate"))
    assert res.plan.scaling == "rowwise" and res.plan.input_scaling == "dynamic-row"
    assert torch.equal(res.scale_b, torch.ones(1, 16)) and res.scale_a.shape == (4, 1)
    ref = X.abs().amax(dim=1, keepdim=True) / 448  # amax / 448, nudged up one ULP where x / s would round past 448
    assert ((res.scale_a == ref) | (res.scale_a == torch.nextafter(ref, ref * 2))).all()
    assert float((X / res.scale_a).abs().max()) <= 448
    assert torch.equal(res.out, scaled_mm(res.a, res.b, res.scale_a, res.scale_b, out_dtype=torch.float32))


def test_plan_operands_takes_a_config() -> None:
    spec_x, spec_w = LayoutSpec((4, 40), "bfloat16"), LayoutSpec((24, 40), "float8_e4m3fn")
    plan = plan_operands(spec_x, spec_w, config=Fp8LinearConfig(weight_scaling="rowwise", out_dtype=torch.float32))
    assert plan.scaling == "rowwise" and plan.out_dtype == torch.float32 and plan.n_padded == 32
    with pytest.raises(Fp8LinearError, match="rules='none' was passed together with config="):
        plan_operands(spec_x, spec_w, rules="none", config=Fp8LinearConfig())


# ---------------------------------------------------------------------------- the immutable plan


def test_the_plan_is_frozen_and_the_one_seen_during_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """last_plan() already holds the call's final plan when the kernel runs: nothing replaces it afterwards."""
    if fp8_linear_with_plan(X, W8, torch.tensor(0.5)).plan.backend != "cpu":  # also runs the CPU probe first
        pytest.skip("torch's CPU _scaled_mm cannot run tensorwise scales here: the call never reaches the kernel")
    during: list[Any] = []
    real = D.call_scaled_mm

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        during.append(last_plan())
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "call_scaled_mm", spy)
    res = fp8_linear_with_plan(X, W8, torch.tensor(0.5), backend="cpu")
    assert during == [res.plan] and during[0] is res.plan is last_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.plan.quantizer = "triton-rowwise"  # type: ignore[misc]
    assert isinstance(res.plan.decisions, tuple) and isinstance(res.plan.epilogue, tuple)


def test_last_plan_is_per_thread() -> None:
    fp8_linear(X, W8)
    mine = last_plan()
    seen: list[Any] = []
    t = threading.Thread(target=lambda: seen.append(last_plan()))
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and seen == [None] and last_plan() is mine


# ---------------------------------------------------------------------------- the plan cache


def test_a_cached_layout_is_planned_once(builds: list) -> None:
    w, s = W8, torch.tensor(0.5)
    first = fp8_linear_with_plan(X, w, s)
    for _ in range(5):
        assert fp8_linear_with_plan(torch.randn(4, 32), w, s).plan is first.plan  # new values, same layout
    assert len(builds) == 1 and plan_cache_info().hits == 5
    fp8_linear(torch.randn(8, 32), w, s)  # another M
    fp8_linear(torch.randn(4, 64)[:, :32], w, s)  # another row stride
    fp8_linear(X, w, s, out_dtype=torch.bfloat16)  # another argument
    assert len(builds) == 4
    assert fp8_linear_with_plan(X, w, s).plan is first.plan and len(builds) == 4


def test_the_cache_is_bounded_lru(builds: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "PLAN_CACHE", PlanCache(maxsize=2))
    xs = [torch.randn(m, 32) for m in (1, 2, 3)]
    for x in xs:
        fp8_linear(x, W8)
    assert plan_cache_info().currsize == 2 and len(builds) == 3
    fp8_linear(xs[2], W8)  # most recent: still cached
    assert len(builds) == 3
    fp8_linear(xs[0], W8)  # evicted first: planned again
    assert len(builds) == 4
    with pytest.raises(ValueError, match="maxsize=0; pass an int >= 1"):
        PlanCache(maxsize=0)


def test_misaligned_offsets_that_name_different_values_get_their_own_plans(builds: list) -> None:
    """Two FP8 inputs with the same low address bits, at storage offsets 1 and 17: each plan names its own."""
    plans = []
    for offset in (1, 17, 1):
        spec = LayoutSpec((4, 32), "float8_e4m3fn", offset=offset)
        x = materialize(spec, round_to_format(torch.randn(4, 32), "e4m3"))
        plans.append(fp8_linear_with_plan(x, W8, input_scale=0.5, rules="cuda").plan)
    msgs = [" ".join(r.message for r in p.decision("input").reasons) for p in plans]
    assert "storage offset 1 " in msgs[0] and "storage offset 17 " in msgs[1] and plans[2] is plans[0]
    assert len(builds) == 2


def test_a_cached_call_still_checks_a_number_input_scale(builds: list) -> None:
    x8 = X.clamp(-448, 448).to(E4M3)
    fp8_linear(x8, W8, input_scale=0.5)
    with pytest.raises(Fp8LinearError, match=r"input_scale=-1.0 must be positive and finite"):
        fp8_linear(x8, W8, input_scale=-1.0)
    assert len(builds) == 1  # the same layout: the value check ran on the cached path


def test_the_cache_keeps_no_tensor_alive(builds: list) -> None:
    """Keys hold metadata only: the caller's tensors are freed when the caller drops them."""
    x, w, s = torch.randn(4, 32), make_weight(16, 32), torch.tensor(0.5)
    fp8_linear_with_plan(x, w, s)
    refs = [weakref.ref(t) for t in (x, w, s)]
    del x, w, s
    gc.collect()
    assert [r() for r in refs] == [None, None, None] and plan_cache_info().currsize == 1


def test_operands_that_are_not_tensors_are_not_cached(builds: list) -> None:
    with pytest.raises(Fp8LinearError, match="fp8_linear needs tensors"):
        fp8_linear(LayoutSpec((4, 32), "bfloat16"), W8)
    assert plan_cache_info().currsize == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_cached_plan_is_the_freshly_built_plan(data: Any) -> None:
    """Over random layouts sharing one cache, every call's plan equals a plan built from scratch for it."""
    k = data.draw(st.sampled_from([16, 24, 32]), label="K")
    n = data.draw(st.sampled_from([16, 24]), label="N")
    dtype = data.draw(st.sampled_from(["bfloat16", "float32", "float8_e4m3fn"]), label="input dtype")
    shape = data.draw(st.sampled_from([(3, k), (2, 2, k)]), label="input shape")
    spec = data.draw(layouts(shape, dtype, max_offset=20, views=True), label="input layout")
    vals = torch.randn(shape).clamp(-448, 448)
    x = materialize(spec, round_to_format(vals, "e4m3") if dtype == "float8_e4m3fn" else vals)
    weight_kind = data.draw(st.sampled_from(["fp8", "bf16"]), label="weight")
    wspec = data.draw(
        layouts((n, k), "float8_e4m3fn" if weight_kind == "fp8" else "bfloat16", max_offset=20), label="weight layout"
    )
    w = materialize(wspec, make_weight(n, k).float())
    ws = None
    if weight_kind == "fp8":
        ws = data.draw(st.sampled_from([None, "scalar", "row"]), label="weight scale")
        ws = None if ws is None else (torch.tensor(0.5) if ws == "scalar" else torch.rand(n)[None, :].t() + 0.5)
    xs = data.draw(st.sampled_from([None, 0.5, "tensor"]), label="input scale")
    if xs == "tensor":
        xs = torch.full((8,), 0.5)[data.draw(st.integers(0, 7), label="scale offset")]
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bspec = data.draw(layouts((n,), "bfloat16", max_offset=9), label="bias layout")
        bias = materialize(bspec, torch.randn(n))
    kwargs = dict(
        rules=data.draw(st.sampled_from([None, "cuda"]), label="rules"),
        out_dtype=data.draw(st.sampled_from([None, torch.bfloat16]), label="out dtype"),
    )
    res = fp8_linear_with_plan(x, w, ws, xs, bias, **kwargs)
    assert res.plan == fresh_plan(x, w, ws, xs, bias, **kwargs)
    assert fp8_linear_with_plan(x, w, ws, xs, bias, **kwargs).plan is res.plan  # and now it is cached


# ---------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["dynamic-tensor", "static", "rowwise"])
def test_a_planned_call_captures_in_a_cuda_graph(scheme: str) -> None:
    """After one warm-up call, fp8_linear records into a CUDA graph without re-planning, and replays it."""
    ok, why = D.scaled_mm_available("cuda")
    if not ok:
        pytest.skip(why)
    dev = torch.device("cuda")
    x = torch.randn(2, 64, 256, device=dev).to(torch.bfloat16)
    w8 = make_weight(192, 256).to(dev)
    ws = torch.rand(192, device=dev) + 0.5 if scheme == "rowwise" else torch.tensor([0.25], device=dev)
    xs = torch.tensor([0.05], device=dev) if scheme == "static" else None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on the capture stream (kernel compilation, the scale's one read)
        res = fp8_linear_with_plan(x, w8, ws, xs)
        fp8_linear(x, w8, ws, xs)
    torch.cuda.current_stream().wait_stream(stream)
    if scheme == "static" and res.plan.quantizer == "eager":
        pytest.skip(f"the eager static path reads its saturation back to the host ({res.plan.quantizer_reason})")
    misses = plan_cache_info().misses
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fp8_linear(x, w8, ws, xs)
    assert plan_cache_info().misses == misses  # captured from the cached plan
    x.copy_(torch.randn(2, 64, 256, device=dev).to(torch.bfloat16) * 3)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear(x, w8, ws, xs))  # same kernels on the same values: bitwise
