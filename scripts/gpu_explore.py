"""Run the operand-wise exploration (:mod:`harness.explore`) on real kernels through a worker pool.

    python scripts/gpu_explore.py --ops attn.sdpa.flash,attn.sdpa.cudnn --seed 0 --cases 80 --seconds 60 \
        --out explore.json

Each op is explored with its own seeded search; every case runs in the pool's isolated workers (a device
fault costs a worker, not the run).  Prints each op's distinct failure signatures (op, verdict, operand,
property) with their counts and the worst drift, and writes them all as JSON to ``--out``.  ``python -m harness
matrix`` runs the same exploration after its grid; this script runs it alone, per op, for a closer look.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", required=True, help="comma-separated target names")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=80, help="drawn cases per op (minimization comes on top)")
    p.add_argument("--seconds", type=float, default=60.0, help="time budget per op")
    p.add_argument("--case-timeout", type=float, default=60.0)
    p.add_argument("--minimize-runs", type=int, default=20, help="at most this many runs to shrink each signature")
    p.add_argument("--out", type=Path, required=True, help="a JSON file that does not exist yet")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"gpu_explore: --out {args.out} exists; name a new file (nothing was overwritten)", file=sys.stderr)
        return 2

    from harness.explore import explore
    from harness.runner.pool import WorkerPool
    from harness.targets import get_target

    results = {}
    with WorkerPool([args.device], workers_per_device=1, case_timeout=args.case_timeout, attribute=False) as pool:
        for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
            t0 = time.monotonic()
            res = explore(
                get_target(op),
                lambda c: pool.submit(c).result(),
                seed=args.seed,
                budget_cases=args.cases,
                budget_s=args.seconds,
                device=args.device,
                max_minimize_runs=args.minimize_runs,
            )
            results[op] = res.to_dict()
            print(
                f"{op}: {res.cases} cases + {res.minimize_runs} minimization runs in "
                f"{time.monotonic() - t0:.0f} s; verdicts {res.verdicts}"
            )
            for line in res.summary():
                print("   ", line)
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
