"""GPU benchmarks of every installed attention backend on the Wan2.1 attention shapes.

Shapes (``harness.bench.wan_attention_shapes``): self-attention over 32760
video tokens with 12 (1.3B) and 40 (14B) heads, and cross-attention from those
tokens over 512 text and 257 image tokens; head_dim 128, bf16, batch 1.
Backends: every native or plug-in backend of ``harness.quant.backends``; one
that cannot run here skips with the registry's reason (package missing,
capability, ...), and the reference ``sdpa.math`` kernel skips where its score
matrix would not fit in free GPU memory.  Emulations are benchmarked on the CPU
(``test_bench_cpu.py``), not here.

Inputs are contiguous in the backend's first supported layout (varlen kernels
get one packed sequence), random normal, checked non-zero.  Throughput counts
the two attention GEMMs (4·B·H·Lq·Lk·d FLOP) against the bf16 matmul ceiling
measured in the same session, for every backend alike (also the INT8/FP8 Sage
kernels), so their ratios compare directly.
"""

from __future__ import annotations

import pytest
import torch

from harness.bench import (
    AttentionShape,
    assert_not_all_zero,
    random_tensor,
    record,
    rotate,
    rotation_count,
    run_benchmark,
    tensor_bytes,
    wan_attention_shapes,
)
from harness.quant.backends import BACKENDS, get_backend

SHAPES = wan_attention_shapes()
NATIVE = [name for name, b in BACKENDS.items() if b.kind != "emulated"]
#: Bytes per score element the MATH kernel keeps alive at once (scores, softmax in float32, probabilities).
MATH_BYTES_PER_SCORE = 12

pytestmark = pytest.mark.gpu


def _make_inputs(backend, shape: AttentionShape, device: torch.device, seed: int) -> tuple[tuple, dict]:
    """(q, k, v) contiguous in the backend's layout, and the keyword arguments its runner needs."""
    b, h, lq, lk, d = shape.batch, shape.heads, shape.q_tokens, shape.kv_tokens, shape.head_dim
    if backend.requires.varlen:
        if b != 1:
            raise ValueError("the varlen benchmark packs one sequence; use batch 1")
        q = random_tensor((lq, h, d), torch.bfloat16, device, seed)
        k = random_tensor((lk, h, d), torch.bfloat16, device, seed + 1)
        v = random_tensor((lk, h, d), torch.bfloat16, device, seed + 2)
        kw = {
            "cu_seqlens_q": torch.tensor([0, lq], dtype=torch.int32, device=device),
            "cu_seqlens_k": torch.tensor([0, lk], dtype=torch.int32, device=device),
            "max_seqlen_q": lq,
            "max_seqlen_k": lk,
        }
        return (q, k, v), kw
    layout = backend.requires.layouts[0]
    dims = (lambda n: (b, h, n, d)) if layout == "HND" else (lambda n: (b, n, h, d))
    q = random_tensor(dims(lq), torch.bfloat16, device, seed)
    k = random_tensor(dims(lk), torch.bfloat16, device, seed + 1)
    v = random_tensor(dims(lk), torch.bfloat16, device, seed + 2)
    return (q, k, v), {}


def _math_too_big(shape: AttentionShape, device: torch.device) -> str | None:
    need = shape.batch * shape.heads * shape.q_tokens * shape.kv_tokens * MATH_BYTES_PER_SCORE
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.8 * free:
        return (
            f"sdpa.math materialises the ({shape.batch}, {shape.heads}, {shape.q_tokens}, {shape.kv_tokens}) "
            f"score matrix: ~{need / 2**30:.0f} GiB, only {free / 2**30:.0f} GiB free"
        )
    return None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.key)
@pytest.mark.parametrize("backend_name", NATIVE)
def test_bench_attention(benchmark, backend_name, shape, cuda_device, gpu_ceilings, gpu_env, rounds_policy) -> None:
    """One attention backend on one Wan attention shape."""
    backend = get_backend(backend_name)
    ok, why = backend.available(cuda_device)
    if not ok:
        pytest.skip(f"{backend_name}: {why}")
    if backend_name == "sdpa.math" and (why := _math_too_big(shape, cuda_device)):
        pytest.skip(why)
    layout = "NHD" if backend.requires.varlen else backend.requires.layouts[0]
    first, kw = _make_inputs(backend, shape, cuda_device, seed=100)
    if problems := backend.check_inputs(*first, layout):
        pytest.skip(f"{backend_name} cannot take the Wan shape: {'; '.join(problems)}")
    sets = [first] + [
        _make_inputs(backend, shape, cuda_device, seed=100 + 10 * i)[0]
        for i in range(1, rotation_count(tensor_bytes(first), cuda_device))
    ]
    for i, s in enumerate(sets):
        assert_not_all_zero({f"set{i}.{n}": t for n, t in zip("qkv", s)})
    fn = rotate(lambda q, k, v: backend.run(q, k, v, layout, **kw), sets)
    warmup, rounds = rounds_policy.for_device(cuda_device)
    timing = run_benchmark(benchmark, fn, cuda_device, warmup=warmup, rounds=rounds)
    record(
        benchmark,
        timing,
        op=f"attn.{backend_name}",
        family="attention",
        shape_key=shape.key,
        shape={**shape.as_dict(), "layout": layout},
        ceilings=gpu_ceilings,
        ceiling="bf16_matmul",
        env=gpu_env,
        flops=shape.flops,
        backend=backend_name,
        input_sets=len(sets),
    )
