"""CPU benchmarks that always run: layout materialization, the FP8 and Sage emulations, CPU ``_scaled_mm``.

Small shapes (256 tokens of the Wan-1.3B width): under CI's ``--benchmark-disable``
each body runs once (the CPU FP8 GEMMs on 16 tokens) and the file takes a few seconds;
with ``--benchmark-enable`` they give the dashboard a CPU trend.  Benchmarks never assert accuracy (that
lives in the property tests); they assert only what makes a timing valid.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.bench import (
    AttentionShape,
    LinearShape,
    assert_not_all_zero,
    bare_fp8_linear,
    random_tensor,
    record,
    run_benchmark,
)
from harness.layouts import LayoutSpec, ViewOp, materialize
from harness.quant.backends import get_backend
from harness.quant.convert import quantize_weight
from harness.quant.linear import E4M3_MAX, fp8_linear
from harness.reference import formats

DEVICE = torch.device("cpu")
TOKENS = 256
SHAPE = LinearShape("1.3B", "qkvo", TOKENS, 1536, 1536)
#: the linear benchmarks' shape under --benchmark-disable: the same weight, 16 tokens (CPU FP8 ``_scaled_mm`` runs
#: at ~40 MFLOP/s here, so the 256-token GEMM alone takes 17-29 s a call)
SMOKE_SHAPE = LinearShape("1.3B", "qkvo", 16, 1536, 1536)

LAYOUTS = {
    "contiguous": LayoutSpec((TOKENS, 1536), "bfloat16"),
    "offset1": LayoutSpec((TOKENS, 1536), "bfloat16", offset=1),
    "transposed": LayoutSpec((TOKENS, 1536), "bfloat16", base_shape=(1536, TOKENS), views=(ViewOp.transpose(0, 1),)),
    "padded_rows": LayoutSpec((TOKENS, 1536), "bfloat16", pad=(0, 16)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bench_cpu_materialize(benchmark, layout, rounds_policy, cpu_ceilings, cpu_env) -> None:
    """materialize(): poisoned storage plus a strided copy; memory-bound, so GB/s against the copy ceiling."""
    spec = LAYOUTS[layout]
    values = random_tensor(spec.shape, torch.bfloat16, DEVICE, seed=11)
    assert_not_all_zero({"values": values})
    warmup, rounds = rounds_policy.for_device(DEVICE)
    out = None

    def fn():
        nonlocal out
        out = materialize(spec, values)

    timing = run_benchmark(benchmark, fn, DEVICE, warmup=warmup, rounds=rounds)
    assert out.stride() == spec.strides() and out.storage_offset() == spec.storage_offset()
    # poison fill of the whole storage + read of the values + write of the view
    nbytes = spec.storage_numel() * spec.itemsize + 2 * values.numel() * values.element_size()
    record(
        benchmark,
        timing,
        op=f"materialize.{layout}",
        family="layout",
        shape_key=f"cpu.materialize.{layout}",
        shape={"shape": list(spec.shape), "layout": spec.describe()},
        ceilings=cpu_ceilings,
        ceiling="copy",
        env=cpu_env,
        nbytes=nbytes,
    )


def test_bench_cpu_quantize_emulation(benchmark, rounds_policy, cpu_ceilings, cpu_env) -> None:
    """Row-wise E4M3 quantization emulation (float64, exact rounding): GB/s over the bf16 input + fp8 output."""
    x = random_tensor((SHAPE.tokens, SHAPE.in_features), torch.bfloat16, DEVICE, seed=12)
    assert_not_all_zero({"x": x})
    warmup, rounds = rounds_policy.for_device(DEVICE)
    timing = run_benchmark(
        benchmark, lambda: formats.quantize(x, "e4m3", granularity="row"), DEVICE, warmup=warmup, rounds=rounds
    )
    record(
        benchmark,
        timing,
        op="emulate.quantize_e4m3_row",
        family="emulation",
        shape_key=f"cpu.quantize.{SHAPE.key}",
        shape=SHAPE.as_dict(),
        ceilings=cpu_ceilings,
        ceiling="copy",
        env=cpu_env,
        nbytes=x.numel() * (2 + 1),
    )


def _fp8_operands(shape: LinearShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 activation, FP8 weight (N, K) and its float32 per-tensor scale (amax / 448, ``quantize_weight``)."""
    x = random_tensor((shape.tokens, shape.in_features), torch.bfloat16, DEVICE, seed=13)
    w = random_tensor((shape.out_features, shape.in_features), torch.float32, DEVICE, seed=14, std=0.02)
    w8, w_scale = quantize_weight(w)
    return x, w8, w_scale


def test_bench_cpu_scaled_mm_emulation(benchmark, rounds_policy, cpu_ceilings, cpu_env) -> None:
    """The float32 emulation of ``_scaled_mm`` (harness.reference.formats.scaled_mm)."""
    x, w8, w_scale = _fp8_operands(SHAPE)
    x8 = x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert_not_all_zero({"x8": x8, "w8": w8})
    one = torch.ones((), dtype=torch.float32)
    warmup, rounds = rounds_policy.for_device(DEVICE)
    timing = run_benchmark(
        benchmark, lambda: formats.scaled_mm(x8, w8.t(), one, w_scale), DEVICE, warmup=warmup, rounds=rounds
    )
    record(
        benchmark,
        timing,
        op="emulate.scaled_mm",
        family="emulation",
        shape_key=SHAPE.key,
        shape=SHAPE.as_dict(),
        ceilings=cpu_ceilings,
        ceiling="bf16_matmul",
        env=cpu_env,
        flops=SHAPE.flops,
    )


def _bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


@pytest.mark.parametrize("op", ["bf16_linear", "scaled_mm_bare", "fp8_linear"])
def test_bench_cpu_linear(benchmark, op, rounds_policy, cpu_ceilings, cpu_env, benchmarks_disabled) -> None:
    """bf16 ``F.linear`` against a bare cast + CPU ``_scaled_mm`` (and ``fp8_linear``) on one small Wan-1.3B projection
    (fewer tokens when benchmarks are disabled: the body runs once, untimed)."""
    shape = SMOKE_SHAPE if benchmarks_disabled else SHAPE
    x, w8, w_scale = _fp8_operands(shape)
    if op == "bf16_linear":
        w = (w8.float() * w_scale).to(torch.bfloat16)
        fn, inputs, ceiling = (lambda: _bf16_linear(x, w)), {"x": x, "w": w}, "bf16_matmul"
    elif op == "fp8_linear":
        fn, inputs, ceiling = (lambda: fp8_linear(x, w8, w_scale)), {"x": x, "w8": w8}, "fp8_matmul"
    else:
        one = torch.ones((), dtype=torch.float32)
        fn, inputs, ceiling = (lambda: bare_fp8_linear(x, w8, one, w_scale)), {"x": x, "w8": w8}, "fp8_matmul"
    assert_not_all_zero(inputs)
    warmup, rounds = rounds_policy.for_device(DEVICE)
    timing = run_benchmark(benchmark, fn, DEVICE, warmup=warmup, rounds=rounds)
    record(
        benchmark,
        timing,
        op=op,
        family="linear",
        shape_key=shape.key,
        shape=shape.as_dict(),
        ceilings=cpu_ceilings,
        ceiling=ceiling,
        env=cpu_env,
        flops=shape.flops,
    )


ATTN = AttentionShape("1.3B", "self", 1, 2, 256, 256, 128)


@pytest.mark.parametrize("backend_name", ["emu.naive", "emu.sage1", "emu.sage2", "emu.sage3"])
def test_bench_cpu_attention_emulation(benchmark, backend_name, rounds_policy, cpu_ceilings, cpu_env) -> None:
    """The attention emulations (harness.reference via the backend registry) on a small bf16 shape."""
    backend = get_backend(backend_name)
    ok, why = backend.available("cpu")
    if not ok:
        pytest.skip(f"{backend_name}: {why}")
    q, k, v = (
        random_tensor((ATTN.batch, ATTN.heads, ATTN.q_tokens, ATTN.head_dim), torch.bfloat16, DEVICE, seed)
        for seed in (21, 22, 23)
    )
    assert_not_all_zero({"q": q, "k": k, "v": v})
    warmup, rounds = rounds_policy.for_device(DEVICE)
    timing = run_benchmark(benchmark, lambda: backend.run(q, k, v, "HND"), DEVICE, warmup=warmup, rounds=rounds)
    record(
        benchmark,
        timing,
        op=f"attn.{backend_name}",
        family="emulation",
        shape_key=ATTN.key,
        shape=ATTN.as_dict(),
        ceilings=cpu_ceilings,
        ceiling="bf16_matmul",
        env=cpu_env,
        flops=ATTN.flops,
        backend=backend_name,
    )
