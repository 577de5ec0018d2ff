#!/usr/bin/env python3
"""Peak GPU memory and wall time of the reference attention at Wan-14B self-attention size.

Runs ``harness.reference.attention`` on CUDA for (1, 40, 32760, 128) float32 (random normal
inputs, HND), measures ``torch.cuda.max_memory_allocated()`` and synchronised wall time, spot
checks a few output rows against a float64 softmax, prints one JSON line and exits:
0 = peak within the limit and spot check passed, 1 = over the limit or wrong, 2 = no CUDA.

    python scripts/gpu_reference_memory.py [--heads 40 --tokens 32760 --head-dim 128
        --compute-dtype float32 --limit-gib 16 --budget-mib 1024 --layout HND]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--compute-dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--layout", choices=["HND", "NHD"], default="HND")
    ap.add_argument("--limit-gib", type=float, default=16.0)
    ap.add_argument("--budget-mib", type=int, default=1024, help="workspace budget passed to attention()")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from harness.reference.attention import attention, plan_chunks

    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device", "torch": torch.__version__}))
        return 2
    dev = torch.device("cuda")
    dt = getattr(torch, args.compute_dtype)
    b, h, s, d = args.batch, args.heads, args.tokens, args.head_dim
    budget = args.budget_mib << 20

    # warm up kernels and the cuBLAS workspace on a small problem so they are not in the peak
    w = torch.randn(1, 2, 256, d, device=dev, dtype=dt)
    attention(w, w, w, compute_dtype=dt)
    torch.cuda.synchronize()

    g = torch.Generator(device=dev).manual_seed(args.seed)
    shape = (b, h, s, d) if args.layout == "HND" else (b, s, h, d)
    q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=dt) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = attention(q, k, v, layout=args.layout, compute_dtype=dt, memory_budget=budget)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()

    plan = plan_chunks(b, h, s, s, d, d, compute_dtype=dt, memory_budget=budget)
    e = torch.empty((), dtype=dt).element_size()
    predicted = 4 * b * h * s * d * e + plan.workspace_bytes  # q, k, v, output + workspace

    # spot check: 8 query rows of head 0 against a float64 softmax over all keys
    qh = q if args.layout == "HND" else q.transpose(1, 2)
    kh = k if args.layout == "HND" else k.transpose(1, 2)
    vh = v if args.layout == "HND" else v.transpose(1, 2)
    oh = out if args.layout == "HND" else out.transpose(1, 2)
    rows = torch.linspace(0, s - 1, 8, device=dev).long()
    sc = (qh[0, 0, rows].double() @ kh[0, 0].double().T) / math.sqrt(d)
    ref = torch.softmax(sc, dim=-1) @ vh[0, 0].double()
    spot = (oh[0, 0, rows].double() - ref).abs().max().item()
    # float32 evaluation bound (see tests/property/test_ref_attention.py): 2|v|max(2 dS + 2 gamma_s)
    u = 2.0**-24 if dt == torch.float32 else 2.0**-53
    qk = (qh[0, 0, rows].double().abs() @ kh[0, 0].double().abs().T).max().item() / math.sqrt(d)
    ds = (d + 1) * u / (1 - (d + 1) * u) * qk + u * qk
    spot_bound = 2 * vh[0, 0].abs().max().item() * (2 * ds + 2 * (s + 1) * u / (1 - (s + 1) * u) + 4 * u)

    limit = int(args.limit_gib * 2**30)
    finite = bool(torch.isfinite(out).all().item())
    ok = peak <= limit and finite and spot <= spot_bound
    print(
        json.dumps(
            {
                "ok": ok,
                "shape": list(shape),
                "layout": args.layout,
                "compute_dtype": args.compute_dtype,
                "peak_bytes": peak,
                "peak_gib": round(peak / 2**30, 3),
                "limit_gib": args.limit_gib,
                "predicted_bytes": predicted,
                "peak_over_predicted": round(peak / predicted, 4),
                "wall_s": round(wall, 3),
                "plan": plan.__dict__,
                "finite": finite,
                "spot_max_abs": spot,
                "spot_bound": spot_bound,
                "device": torch.cuda.get_device_name(dev),
                "torch": torch.__version__,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
