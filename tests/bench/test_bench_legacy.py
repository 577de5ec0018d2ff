"""GPU benchmarks of the legacy FP8 forwards (``harness.quant.legacy``) against ``fp8_linear``.

Each legacy forward does its own extra work — an in-place clamp of the input,
casts to the other FP8 type, ``.contiguous()`` after every step, a fallback
path — on top of the one unavoidable quantizing cast.  The benchmark times the
legacy forward on a module holding an FP8 weight (built once, outside the
timed region) and records its time relative to ``fp8_linear`` on the same
input set, measured in interleaved blocks (``extra_info["vs_fp8_linear"]``).
``shape_key`` matches ``test_bench_linear.py`` so the dashboard lists legacy
forwards next to ``fp8_linear`` and bf16 for the same GEMM.

The forwards are faithful reproductions, defects included: the late-2025
WanVideoWrapper and ComfyUI forwards clamp the benchmark's own input in place
(a no-op on these N(0, 1) values, but a full read and write of the input —
part of the cost being measured).
"""

from __future__ import annotations

import pytest
import torch

from harness.bench import (
    assert_not_all_zero,
    interleaved_time,
    random_tensor,
    record,
    rotate,
    rotation_count,
    run_benchmark,
    tensor_bytes,
    wan_linear_shapes,
)
from harness.quant.convert import quantize_weight
from harness.quant.legacy import LEGACY_FORWARDS, last_path, make_fp8_module
from harness.quant.linear import fp8_linear

SHAPES = [s for s in wan_linear_shapes(tokens=(32760,)) if s.proj in ("qkvo", "ffn_up", "cross_kv")]

pytestmark = pytest.mark.gpu


def _input_set(shape, device: torch.device, seed: int) -> dict:
    x = random_tensor((1, shape.tokens, shape.in_features), torch.bfloat16, device, seed)
    w = random_tensor((shape.out_features, shape.in_features), torch.float32, device, seed + 1, std=0.02)
    w8, w_scale = quantize_weight(w)
    del w
    return {"x": x, "w8": w8, "w_scale": w_scale, "module": make_fp8_module(w8, w_scale)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.key)
@pytest.mark.parametrize("legacy", sorted(LEGACY_FORWARDS))
def test_bench_legacy(benchmark, legacy, shape, fp8_device, gpu_ceilings, gpu_env, rounds_policy) -> None:
    """One legacy FP8 forward on one Wan projection, and its cost relative to fp8_linear."""
    device = fp8_device
    lf = LEGACY_FORWARDS[legacy]
    first = _input_set(shape, device, 3000)
    n = rotation_count(tensor_bytes([first["x"], first["w8"]]), device)
    sets = [first] + [_input_set(shape, device, 3000 + 10 * i) for i in range(1, n)]
    for i, s in enumerate(sets):
        assert_not_all_zero({f"set{i}.x": s["x"], f"set{i}.w8": s["w8"], f"set{i}.module.weight": s["module"].weight})
    fns = {
        legacy: rotate(lambda s: lf.forward(s["module"], torch.bfloat16, s["x"]), [(s,) for s in sets]),
        "fp8_linear": rotate(lambda s: fp8_linear(s["x"], s["w8"], s["w_scale"]), [(s,) for s in sets]),
    }
    fns[legacy]()
    path = last_path()
    warmup, rounds = rounds_policy.for_device(device)
    timing = run_benchmark(benchmark, fns[legacy], device, warmup=warmup, rounds=rounds)
    t = interleaved_time(fns, device, warmup=warmup, rounds=max(2 * rounds, 10))
    vs = {
        "legacy_ms": t[legacy].median,
        "fp8_linear_ms": t["fp8_linear"].median,
        "ratio": t[legacy].median / t["fp8_linear"].median,
        "path": path,
    }
    record(
        benchmark,
        timing,
        op=f"legacy.{legacy}",
        family="legacy",
        shape_key=shape.key,
        shape=shape.as_dict(),
        ceilings=gpu_ceilings,
        ceiling="fp8_matmul",
        env=gpu_env,
        flops=shape.flops,
        vs_fp8_linear=vs,
        description=lf.description,
        input_sets=len(sets),
    )
