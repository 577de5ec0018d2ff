"""Where fp8_linear's time goes on Wan-14B q/k/v/o at 32760 tokens: quantizer and GEMM variants (CUDA events)."""

import statistics
import torch
from harness.bench import cuda_time
from harness.quant._triton_quant import rowwise_quantize
from harness.quant.linear import fp8_linear_with_plan

M, K, N = 32760, 5120, 5120
dev = "cuda"
x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
w8 = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
one = torch.ones((), device=dev)
sa_row = torch.rand(M, 1, device=dev) + 0.5
sb_row = torch.rand(1, N, device=dev) + 0.5
xq = x.to(torch.float8_e4m3fn)
w_bf16 = w8.to(torch.bfloat16)  # converted once: the bf16 row times the matmul only


def t(fn, n=30):
    return statistics.median(cuda_time(fn, warmup=5, rounds=n))


rows = {
    "cast x.to(fp8)": lambda: x.to(torch.float8_e4m3fn),
    "triton rowwise quant": lambda: rowwise_quantize(x, K),
    "mm tensorwise": lambda: torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
    "mm rowwise": lambda: torch._scaled_mm(xq, w8.t(), scale_a=sa_row, scale_b=sb_row, out_dtype=torch.bfloat16),
    "mm tensorwise fast_accum": lambda: torch._scaled_mm(
        xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True
    ),
    "mm rowwise fast_accum": lambda: torch._scaled_mm(
        xq, w8.t(), scale_a=sa_row, scale_b=sb_row, out_dtype=torch.bfloat16, use_fast_accum=True
    ),
    "fp8_linear": lambda: fp8_linear_with_plan(x, w8, one),
    "bf16 F.linear": lambda: torch.nn.functional.linear(x, w_bf16),
}
for name, fn in rows.items():
    print(f"{name:28s} {t(fn):8.3f} ms")
print(fp8_linear_with_plan(x, w8, one).plan.describe())
