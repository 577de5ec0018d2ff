"""What a guard costs: its overhead on compliant Wan-14B attention inputs, each repaired layout, and the check alone.

GPU (skips without CUDA, naming why): Wan-14B self-attention (1, 40, 32760, 128) bf16 HND through
``safe_attention`` (the guard generated from the backend's measured contract) against the bare
kernel, timed in interleaved blocks with CUDA events, medians.  On compliant inputs the guard only
reads metadata: the target is a guarded/bare ratio within 2% (asserted; the ratio goes to
``extra_info["guard"]``).  For each repaired layout (2-byte misaligned pointer, last-dim stride 2,
a view of NHD memory for an HND kernel) the ratio to the bare compliant call is recorded: the
price of the copy the kernel needs.

CPU (always runs): the check alone (``Guarded.plan`` on q/k/v) on the same shapes as meta tensors
(no data), microseconds per call.
"""

from __future__ import annotations

import pytest
import torch

from harness.bench import (
    interleaved_time,
    random_tensor,
    record,
    run_benchmark,
    wan_attention_shapes,
)
from harness.contracts import measured_contract
from harness.guard import guard
from harness.layouts import LayoutSpec, materialize
from harness.quant.attention import safe_attention
from harness.quant.backends import get_backend

SHAPE = next(s for s in wan_attention_shapes(("14B",)) if s.kind == "self")
GUARD_TARGET = 0.02  # the budget: a guard on compliant inputs within 2% of the bare op
GPU_BACKENDS = ["sdpa.flash", "sdpa.cudnn", "sdpa.efficient", "sdpa"]


def _dims() -> tuple[int, int, int, int]:
    return SHAPE.batch, SHAPE.heads, SHAPE.q_tokens, SHAPE.head_dim


def _layouts() -> dict[str, LayoutSpec]:
    b, h, s, d = _dims()
    return {
        "misaligned_ptr_2": LayoutSpec((b, h, s, d), "bfloat16", offset=1),
        "last_stride_2": LayoutSpec((b, h, s, d), "bfloat16", step=(1, 1, 1, 2)),
        "nhd_memory_view": LayoutSpec((b, h, s, d), "bfloat16", perm=(0, 2, 1, 3)),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
def test_bench_guard_overhead(benchmark, backend_name, cuda_device, gpu_ceilings, gpu_env, rounds_policy) -> None:
    backend = get_backend(backend_name)
    ok, why = backend.available(cuda_device)
    if not ok:
        pytest.skip(f"{backend_name}: {why}")
    b, h, s, d = _dims()
    q, k, v = (random_tensor((b, h, s, d), torch.bfloat16, cuda_device, seed=200 + i) for i in range(3))
    _, actions = safe_attention(backend, q, k, v, "HND")
    assert actions == [], [str(a) for a in actions]  # compliant: the guard copies nothing
    fns = {"bare": lambda: backend.run(q, k, v, "HND"), "guarded": lambda: safe_attention(backend, q, k, v, "HND")}
    repaired = {}
    for name, spec in _layouts().items():
        x = [materialize(spec, t) for t in (q, k, v)]
        _, acts = safe_attention(backend, *x, "HND")
        if any(a.is_copy for a in acts):
            repaired[name] = [str(a) for a in acts]
            fns[name] = (lambda xs: lambda: safe_attention(backend, *xs, "HND"))(x)
    warmup, rounds = rounds_policy.for_device(cuda_device)
    timing = run_benchmark(benchmark, fns["guarded"], cuda_device, warmup=warmup, rounds=rounds)
    t = interleaved_time(fns, cuda_device, warmup=warmup, rounds=max(3 * rounds, 15))
    med = {n: t[n].median for n in fns}
    ratio = med["guarded"] / med["bare"]
    info = {
        "medians_ms": med,
        "guarded_over_bare": ratio,
        "target": 1 + GUARD_TARGET,
        "repaired_over_bare": {n: med[n] / med["bare"] for n in repaired},
        "repairs": repaired,
        "contract": f"attn.{backend_name}" if measured_contract(f"attn.{backend_name}") else "hand-written rules",
    }
    record(
        benchmark,
        timing,
        op=f"safe_attn.{backend_name}",
        family="guard",
        shape_key=SHAPE.key,
        shape={**SHAPE.as_dict(), "layout": "HND"},
        ceilings=gpu_ceilings,
        ceiling="bf16_matmul",
        env=gpu_env,
        flops=SHAPE.flops,
        guard=info,
    )
    assert ratio <= 1 + GUARD_TARGET, (
        f"guarded {backend_name} is {ratio:.4f}x the bare kernel on compliant Wan-14B inputs, over the "
        f"{GUARD_TARGET:.0%} budget (medians {med})"
    )


def test_bench_guard_check_cpu(benchmark, rounds_policy, cpu_env) -> None:
    """The contract check alone on Wan-14B q/k/v metadata (meta tensors: no data is touched)."""
    contract = measured_contract("attn.sdpa.flash")
    assert contract is not None and contract["preconditions"]
    g = guard(get_backend("sdpa.flash").runner, contract, operands=("q", "k", "v"))
    b, h, s, d = _dims()
    q, k, v = (torch.empty((b, h, s, d), dtype=torch.bfloat16, device="meta") for _ in range(3))
    mis = torch.empty(b * h * s * d + 1, dtype=torch.bfloat16, device="meta")[1:].view(b, h, s, d)
    assert g.plan(q, k, v, "HND") == [] and [r.operand for r in g.plan(mis, k, v, "HND")] == ["q"]
    warmup, rounds = rounds_policy.for_device("cpu")
    timing = run_benchmark(benchmark, lambda: g.plan(q, k, v, "HND"), "cpu", warmup=warmup, rounds=rounds)
    benchmark.extra_info.update(
        {
            "op": "guard.plan",
            "family": "guard",
            "shape_key": SHAPE.key,
            "shape": SHAPE.as_dict(),
            "device_ms": timing.as_dict(),
            "env": dict(cpu_env),
        }
    )
