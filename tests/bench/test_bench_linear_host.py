"""Host time per ``fp8_linear`` call: the cached plan against planning every call (issue 14.4).

- ``test_bench_linear_host_cpu``: a small shape on the CPU, where kernels run synchronously, so a
  call's wall time is its host time: the whole call with the plan cached or re-planned each time,
  and the planning step alone (signature + cache lookup against a full build).
- ``test_bench_linear_host_gpu``: Wan-14B cross-attention k/v (512 tokens, 5120 -> 5120) on an FP8
  GPU: the host time of ``calls`` calls issued back to back (``perf_counter`` around the loop, after a
  synchronisation and before the next, so queued device work is not counted), with CUDA events around
  the same region for the device time; cached, uncached, replay of the call captured in a CUDA graph,
  and the bare cast + ``_scaled_mm`` floor. The target is <= 15 us per call (reported, not asserted).

Results go to ``extra_info["host_us"]`` (median, min, max over rounds); benchmarks never assert
accuracy, only that the timed path was the intended one (the plan cache's hit and miss counts).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import pytest
import torch

from harness.bench import (
    LinearShape,
    assert_not_all_zero,
    bare_fp8_linear,
    cuda_graph_replay,
    random_tensor,
    run_benchmark,
)
from harness.quant.convert import quantize_weight
from harness.quant.fp8 import dispatch as D
from harness.quant.fp8.cache import plan_key
from harness.quant.linear import E4M3_MAX, clear_plan_cache, fp8_linear, plan_cache_info

#: issue 14.4: host time per call once planned
HOST_TARGET_US = 15.0
CPU_SHAPE = LinearShape("small", "proj", 4, 16, 16)  # tiny: the kernels cost little next to the Python around them
GPU_SHAPE = LinearShape("14B", "cross_kv", 512, 5120, 5120)
GPU_CALLS = 50  # per round: a few hundred launches, well inside the device queue


def _operands(shape: LinearShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = random_tensor((1, shape.tokens, shape.in_features), torch.bfloat16, device, seed=31)
    w = random_tensor((shape.out_features, shape.in_features), torch.float32, device, seed=32, std=0.02)
    w8, w_scale = quantize_weight(w)
    assert_not_all_zero({"x": x, "w8": w8})
    return x, w8, w_scale.reshape(1)


def _summary(us: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(us), "min": min(us), "max": max(us), "rounds": len(us)}


@pytest.mark.parametrize("op", ["fp8_linear.cached", "fp8_linear.uncached", "plan.lookup", "plan.build"])
def test_bench_linear_host_cpu(benchmark, op, rounds_policy, cpu_env) -> None:
    """Host time of one call on the CPU: cached plan vs planning each call, and the planning step alone."""
    device = torch.device("cpu")
    x, w8, ws = _operands(CPU_SHAPE, device)
    args = (None, None, "auto", None, False)  # config, out_dtype, backend, rules, use_fast_accum
    fp8_linear(x, w8, ws)  # plan once (and run the CPU probe)
    fns: dict[str, Callable[[], Any]] = {
        "fp8_linear.cached": lambda: fp8_linear(x, w8, ws),
        "fp8_linear.uncached": lambda: (clear_plan_cache(), fp8_linear(x, w8, ws)),
        "plan.lookup": lambda: D.PLAN_CACHE.get(plan_key(x, w8, ws, None, None, args)),
        "plan.build": lambda: D._prepare(x, w8, ws, None, None, None, None, "auto", None, False),
    }
    before = plan_cache_info()
    warmup, rounds = rounds_policy.for_device(device)
    timing = run_benchmark(benchmark, fns[op], device, warmup=warmup, rounds=rounds)
    after = plan_cache_info()
    if op in ("fp8_linear.cached", "plan.lookup"):
        assert after.misses == before.misses and after.hits > before.hits, (before, after)  # timed the cached path
    elif op == "fp8_linear.uncached":
        assert after.hits == 0 and after.misses >= 1, after  # every timed call planned from scratch
    benchmark.extra_info.update(
        {
            "op": op,
            "family": "host",
            "shape_key": f"cpu.host.{CPU_SHAPE.key}",
            "shape": CPU_SHAPE.as_dict(),
            "host_us": _summary([t * 1e3 for t in timing.times_ms]),
            "timer": timing.timer,
            "env": dict(cpu_env),
        }
    )


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
@pytest.mark.parametrize("op", ["fp8_linear.cached", "fp8_linear.uncached", "fp8_linear.graph", "scaled_mm_bare"])
def test_bench_linear_host_gpu(benchmark, op, scheme, fp8_device, rounds_policy, gpu_env) -> None:
    """Host microseconds per call, ``GPU_CALLS`` calls back to back; device time from CUDA events alongside."""
    x, w8, ws = _operands(GPU_SHAPE, fp8_device)
    xs = (x.abs().amax().float() / E4M3_MAX).reshape(1) if scheme == "static" else None
    x2d = x.reshape(-1, GPU_SHAPE.in_features)
    one = torch.ones((), dtype=torch.float32, device=fp8_device)
    call = {
        "fp8_linear.cached": lambda: fp8_linear(x, w8, ws, xs),
        "fp8_linear.uncached": lambda: (clear_plan_cache(), fp8_linear(x, w8, ws, xs)),
        "fp8_linear.graph": None,
        "scaled_mm_bare": lambda: bare_fp8_linear(x2d, w8, xs if xs is not None else one, ws),
    }[op]
    if op == "fp8_linear.graph":
        call = cuda_graph_replay(lambda: fp8_linear(x, w8, ws, xs))
    call()
    host_us: list[float] = []
    device_us: list[float] = []

    def one_round() -> None:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(GPU_CALLS):
            call()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        host_us.append((t1 - t0) * 1e6 / GPU_CALLS)
        device_us.append(start.elapsed_time(end) * 1e3 / GPU_CALLS)

    warmup, rounds = rounds_policy.for_device(fp8_device)
    before = plan_cache_info()
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
    after = plan_cache_info()
    if op == "fp8_linear.cached":
        assert after.misses == before.misses, (before, after)  # timed the cached path only
    timed = host_us[-rounds:] if len(host_us) > rounds else host_us
    summary = _summary(timed)
    benchmark.extra_info.update(
        {
            "op": op,
            "scheme": scheme,
            "family": "host",
            "shape_key": f"host.{GPU_SHAPE.key}",
            "shape": GPU_SHAPE.as_dict(),
            "calls_per_round": GPU_CALLS,
            "host_us": summary,
            "device_us": _summary(device_us[-len(timed) :]),
            "host_target_us": HOST_TARGET_US,
            "meets_host_target": summary["median"] <= HOST_TARGET_US,
            "env": dict(gpu_env),
        }
    )
