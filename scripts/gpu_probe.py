"""Quick facts about the GPU machine that the harness relies on (prints JSON lines)."""

import json
import sys
import time

import torch

ONLY = sys.argv[1:]


def rec(name, fn):
    if ONLY and name not in ONLY and name != "versions":
        return
    t = time.time()
    try:
        r = fn()
        print(json.dumps({"probe": name, "ok": True, "result": r, "s": round(time.time() - t, 3)}, default=str))
    except Exception as e:
        print(json.dumps({"probe": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}))
    try:
        torch.cuda.synchronize()
    except Exception as e:
        print(json.dumps({"probe": name, "sticky": f"{type(e).__name__}: {str(e)[:200]}"}))
        sys.exit(3)


dev = "cuda"
rec(
    "versions",
    lambda: dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        name=torch.cuda.get_device_name(0),
        cap=torch.cuda.get_device_capability(0),
    ),
)


def mm(a_off=0, lda_pad=0, scale_rowwise=False, out_off=0):
    M, K, N = 64, 128, 96
    a_buf = torch.randn(M * (K + lda_pad) + a_off, device=dev).to(torch.float8_e4m3fn)
    a = a_buf[a_off:].view(M, K + lda_pad)[:, :K]
    b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn).t()
    if scale_rowwise:
        sa, sb = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
    else:
        sa, sb = torch.ones((), device=dev), torch.ones((), device=dev)
    r = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return str(tuple(r.shape))


rec("scaled_mm_ok", lambda: mm())
rec("scaled_mm_rowwise", lambda: mm(scale_rowwise=True))
rec("scaled_mm_a_off1", lambda: mm(a_off=1))
rec("scaled_mm_a_off8", lambda: mm(a_off=8))
rec("scaled_mm_a_off16", lambda: mm(a_off=16))
rec("scaled_mm_lda_odd", lambda: mm(lda_pad=1))
rec("scaled_mm_lda_16", lambda: mm(lda_pad=16))
rec(
    "fp8_cast_480",
    lambda: (
        torch.tensor([448.0, 464.0, 470.0, 480.0, 1e4, float("inf")], device=dev)
        .to(torch.float8_e4m3fn)
        .float()
        .tolist()
    ),
)


def sdpa(backend, off):
    from torch.nn.attention import sdpa_kernel, SDPBackend

    B, H, S, D = 1, 2, 77, 64
    buf = torch.randn(3 * B * H * S * D + off, device=dev, dtype=torch.bfloat16)
    q = buf[off : off + B * H * S * D].view(B, H, S, D)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    return float(o.float().abs().sum())


for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
    for off in (0, 1, 4, 8):
        rec(f"sdpa_{be}_off{off}", lambda: sdpa(be, off))


def sage(off, layout="HND"):
    from sageattention import sageattn

    B, H, S, D = 1, 2, 300, 128
    buf = torch.randn(B * H * S * D + off, device=dev, dtype=torch.bfloat16)
    q = buf[off:].view(B, H, S, D)
    o = sageattn(q, q, q, tensor_layout=layout)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float())
    return float(torch.nn.functional.cosine_similarity(o.float().flatten(), ref.flatten(), dim=0))


rec("sage_import", lambda: __import__("sageattention").__file__)
for off in (0, 8, 1):
    rec(f"sage_off{off}", lambda: sage(off))
