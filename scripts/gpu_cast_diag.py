"""The static-scale E4M3 cast on Wan-14B activations: the package's row kernel against a flat (1-D) variant
and torch's own cast, per block size and warp count (CUDA events, medians).  Also checks the variants are
bitwise the package kernel.

    python scripts/gpu_cast_diag.py
"""

import statistics

import torch
import triton
import triton.language as tl

from harness.bench import cuda_time
from harness.quant._triton_quant import scaled_cast


@triton.jit
def _flat_cast(x_ptr, s_ptr, q_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(s_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q0 = tl.math.div_rn(x, s)
    q = tl.minimum(tl.maximum(q0, -448.0), 448.0)
    q = tl.where(q0 != q0, q0, q)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


def flat(x, s, block, warps):
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    _flat_cast[(triton.cdiv(n, block),)](x, s, q, n, BLOCK=block, num_warps=warps)
    return q


def t(fn, n=40):
    return statistics.median(cuda_time(fn, warmup=5, rounds=n))


for m, k in ((32760, 5120), (32760, 13824)):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 300
    s = torch.full((1,), 0.75, device="cuda")
    ref = scaled_cast(x, s, k)
    gb = x.numel() * 3 / 1e9
    rows = {
        "torch x.to(fp8) (no scale)": lambda: x.to(torch.float8_e4m3fn),
        "package scaled_cast (rows)": lambda: scaled_cast(x, s, k),
    }
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 1:
                continue
            rows[f"flat BLOCK={block} warps={warps}"] = lambda b=block, w=warps: flat(x, s, b, w)
            same = torch.equal(flat(x, s, block, warps).view(torch.uint8), ref.view(torch.uint8))
            assert same, f"flat {block}/{warps} differs from the package kernel"
    print(f"--- {m} x {k} bf16 -> e4m3 ({gb:.3f} GB moved)")
    for name, fn in rows.items():
        ms = t(fn)
        print(f"{name:32s} {ms * 1e3:8.1f} us  {gb / ms * 1e3:7.0f} GB/s")
