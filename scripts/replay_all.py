"""Replay every case file under a directory in fresh processes and check each keeps its verdict.

    python scripts/replay_all.py matrix-out/cases [--jobs 8] [--out replay.json]

Each case runs as ``python -m harness replay CASE --expect <its recorded verdict>`` (a fresh
interpreter and CUDA context per case, as a colleague replaying it would run it).  Prints a table
and exits 1 when any case changed verdict (125 = could not run here, 2 = a harness-side problem such as an
unreadable case file: both reported separately, 2 also makes the exit status 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path


def replay(path: Path, timeout: float) -> dict:
    from harness._jsonfile import read_json

    try:  # bounded and regular-file-only, as every case loader (a FIFO or a huge file must not hang this loop)
        case = read_json(path, ValueError, label=str(path), kind="a case file")
        want = str(((case.get("verdict") if isinstance(case, dict) else None) or {}).get("verdict", "pass"))
    except (ValueError, AttributeError) as e:
        return {"case": path.name, "op": None, "expected": None, "rc": 2, "s": 0.0, "tail": [str(e)]}
    t0 = time.time()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "harness", "replay", str(path), "--expect", want, "--no-attribute"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, tail = p.returncode, (p.stdout + p.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, ["replay timed out"]
    return {
        "case": path.name,
        "op": case.get("op"),
        "expected": want,
        "rc": rc,
        "s": round(time.time() - t0, 1),
        "tail": tail,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", type=Path)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    paths = sorted(args.cases.glob("*.json"))
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(lambda p: replay(p, args.timeout), paths))
    same = sum(r["rc"] == 0 for r in results)
    cannot = [r for r in results if r["rc"] == 125]
    harness = [r for r in results if r["rc"] == 2]
    changed = [r for r in results if r["rc"] not in (0, 2, 125)]
    print(
        f"replayed {len(results)} cases: {same} same verdict, {len(changed)} changed, {len(cannot)} cannot run here, "
        f"{len(harness)} harness-side problems"
    )
    for r in changed + harness + cannot:
        print(f"  rc={r['rc']} {r['case']} ({r['op']}, expected {r['expected']}): {' | '.join(r['tail'])[:300]}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 1 if changed or harness else 0


if __name__ == "__main__":
    sys.exit(main())
