"""Measurements behind docs/scale.md: merging many shard outputs, and example-database traffic on a local Redis.

    python scripts/scale_bench.py merge --shards 200 1000 [--cells 714] [--fail-frac 0.05] [--out scale.json]
    python scripts/scale_bench.py redis [--saves 2000] [--out redis.json]

``merge``: writes N synthetic shard outputs of one ``--cells``-cell run (summary.json via the real
``write_reports``, a JSON + 256 KiB safetensors-sized example case per failing cell), then times
``python -m harness merge`` on them in a subprocess and reads its peak RSS (``ru_maxrss`` of the child).
``redis``: starts Debian's ``redis-server`` on a free port (127.0.0.1, no persistence), times
``RedisExampleDatabase.save`` / ``fetch`` round trips, and runs a real failing and a real passing Hypothesis
test in subprocesses to count the keys, bytes and Redis commands one test run costs.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.report import write_reports  # noqa: E402
from harness.shard import cell_key, shard_of  # noqa: E402


def _cells(n: int) -> list[list[str]]:
    ops = max(1, round(n**0.5 * 1.5))
    out: list[list[str]] = []
    i = 0
    while len(out) < n:
        out.append([f"op{i % ops:03d}", f"class{i // ops:03d}"])
        i += 1
    return out


def _synthetic_shards(root: Path, n_shards: int, all_cells: list[list[str]], fail_frac: float) -> list[Path]:
    dirs = []
    blob = os.urandom(256 * 1024)
    for i in range(1, n_shards + 1):
        d = root / f"shard{i:04d}"
        (d / "cases").mkdir(parents=True)
        rows = []
        for op, cls in (c for c in all_cells if shard_of(cell_key(*c), n_shards) == i):
            failing = (hash_frac := (shard_of(cell_key(op, cls), 10_000) / 10_000)) < fail_frac
            ex = {}
            if failing:
                stem = f"{op}-{cls}-drift"
                (d / "cases" / f"{stem}.json").write_text(json.dumps({"op": op, "pad": "x" * 3000}))
                (d / "cases" / f"{stem}.safetensors").write_bytes(blob)
                ex = {"drift": f"cases/{stem}.json"}
            rows.append(
                {
                    "op": op,
                    "kind": "linear",
                    "layout_class": cls,
                    "status": "fail" if failing else "pass",
                    "cases": 20,
                    "counts": {"drift": 2, "pass": 18} if failing else {"pass": 20},
                    "reason": "",
                    "worst": {
                        "metric": "max_abs",
                        "err": 0.1,
                        "allowed": 0.05 if failing else 1.0,
                        "ratio": 2.0 if failing else hash_frac,
                        "why": "derived bound",
                        "verdict": "drift" if failing else "pass",
                        "case": ex.get("drift"),
                    },
                    "examples": ex,
                    "messages": {"drift": "err 0.1 > allowed 0.05"} if failing else {},
                    "failing": ["drift"] if failing else [],
                    "new": [],
                    "known": ["drift"] if failing else [],
                    "kernel_defects": {},
                }
            )
        s = {
            "schema_version": 1,
            "kind": "harness.matrix.summary",
            "started_at": "2026-12-01T02:17:00+00:00",
            "duration_s": 600.0,
            "budget_s": 600.0,
            "budget_exhausted": True,
            "completed": True,
            "size": "small",
            "seed": 20261201,
            "workers": 1,
            "device": {
                "used": "cuda",
                "name": "NVIDIA H200",
                "capability": "9.0",
                "torch": "2.13.0",
                "cuda": "13.0",
                "cudnn": 91900,
                "devices_used": ["cuda:0"],
            },
            "totals": {
                "pass": sum(r["counts"].get("pass", 0) for r in rows),
                "drift": sum(r["counts"].get("drift", 0) for r in rows),
            },
            "cases_by_device": {"cuda:0": sum(r["cases"] for r in rows)},
            "cells": rows,
            "unavailable": [],
            "new_failures": [],
            "shard": {"index": i, "count": n_shards, "harness": "0.1.0", "cells": len(rows), "all_cells": all_cells},
        }
        write_reports(s, d)
        dirs.append(d)
    return dirs


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_merge(shard_counts: list[int], cells: int, fail_frac: float) -> list[dict]:
    results = []
    all_cells = _cells(cells)
    for n in shard_counts:
        with tempfile.TemporaryDirectory(prefix="scale-merge-") as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            dirs = _synthetic_shards(root / "in", n, all_cells, fail_frac)
            gen_s = time.perf_counter() - t0
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "harness", "merge", *map(str, dirs), "--out", str(root / "m")],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
            wall = time.perf_counter() - t0
            peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if p.returncode != 0:
                raise SystemExit(f"merge of {n} shards failed ({p.returncode}): {p.stderr.strip()}")
            summary = json.loads((root / "m" / "summary.json").read_text())
            results.append(
                {
                    "shards": n,
                    "cells": cells,
                    "failing_cells": sum(c["status"] == "fail" for c in summary["cells"]),
                    "input_bytes": _du(root / "in"),
                    "input_summary_bytes": sum((d / "summary.json").stat().st_size for d in dirs),
                    "merged_bytes": _du(root / "m"),
                    "merged_summary_bytes": (root / "m" / "summary.json").stat().st_size,
                    "merge_wall_s": round(wall, 2),
                    "merge_peak_rss_mib": round(max(peak_kib, before) / 1024, 1),
                    "generate_s": round(gen_s, 1),
                }
            )
    return results


# ------------------------------------------------------------------ redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis():
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed (Debian: apt-get install -y redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.ping()
            return proc, client, f"redis://127.0.0.1:{port}"
        except redis.exceptions.ConnectionError:
            try:
                proc.wait(timeout=0.05)
                raise SystemExit("redis-server exited at start")
            except subprocess.TimeoutExpired:
                pass
    proc.kill()
    raise SystemExit("redis-server did not answer PING in 20 s")


_PROPERTY = textwrap.dedent("""
    import sys
    from hypothesis import given, strategies as st
    from harness.profiles import load_profile
    load_profile("nightly")
    LIMIT = int(sys.argv[1])
    @given(st.lists(st.integers(0, 10**9), min_size=1, max_size=20))
    def test_prop(xs):
        assert sum(xs) < LIMIT
    try:
        test_prop()
    except AssertionError:
        sys.exit(1)
""")


def _commands(client) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items() if k not in ("cmdstat_info",))


def bench_redis(saves: int) -> dict:
    from hypothesis.extra.redis import RedisExampleDatabase

    proc, client, url = _start_redis()
    try:
        db = RedisExampleDatabase(client)
        key = b"scale-bench"
        lat_save, lat_fetch = [], []
        for i in range(saves):
            v = os.urandom(64) + i.to_bytes(4, "big")
            t0 = time.perf_counter()
            db.save(key, v)
            lat_save.append(time.perf_counter() - t0)
        for _ in range(200):
            t0 = time.perf_counter()
            n = sum(1 for _ in db.fetch(key))
            lat_fetch.append(time.perf_counter() - t0)
        small = RedisExampleDatabase(client, key_prefix=b"small:")
        for i in range(10):
            small.save(key, os.urandom(64))
        lat_fetch10 = []
        for _ in range(500):
            t0 = time.perf_counter()
            list(small.fetch(key))
            lat_fetch10.append(time.perf_counter() - t0)
        client.flushdb()

        runs = {}
        with tempfile.TemporaryDirectory(prefix="scale-redis-") as tmp:
            script = Path(tmp) / "prop.py"
            script.write_text(_PROPERTY)
            env = dict(os.environ, PYTHONPATH=str(REPO), HARNESS_HYPOTHESIS_DB=f"{url}/0")
            for name, limit in (("failing_first_run", 10**9), ("failing_replay", 10**9), ("passing_after_fix", 10**12)):
                c0 = _commands(client)
                t0 = time.perf_counter()
                r = subprocess.run(
                    [sys.executable, str(script), str(limit)],
                    cwd=tmp,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                wall = time.perf_counter() - t0
                keys = client.keys("hypothesis-example:*")
                cmds = _commands(client) - c0 - 1  # less the KEYS just above
                runs[name] = {
                    "exit": r.returncode,
                    "wall_s": round(wall, 2),
                    "redis_commands": cmds,
                    "keys_after": len(keys),
                    "values_after": sum(client.scard(k) for k in keys),
                    "bytes_after": sum(client.memory_usage(k) or 0 for k in keys),
                }
        mem = client.info("memory")["used_memory"]
        return {
            "save_ms": {
                "p50": round(statistics.median(lat_save) * 1e3, 3),
                "p99": round(sorted(lat_save)[int(0.99 * len(lat_save))] * 1e3, 3),
            },
            "fetch_ms": {
                "values": n,
                "p50": round(statistics.median(lat_fetch) * 1e3, 3),
                "p99": round(sorted(lat_fetch)[int(0.99 * len(lat_fetch))] * 1e3, 3),
            },
            "fetch10_ms": {
                "p50": round(statistics.median(lat_fetch10) * 1e3, 3),
                "p99": round(sorted(lat_fetch10)[int(0.99 * len(lat_fetch10))] * 1e3, 3),
            },
            "runs": runs,
            "server_used_memory_bytes": mem,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--shards", type=int, nargs="+", default=[200, 1000])
    m.add_argument("--cells", type=int, default=714, help="cells of the whole run (714: every target here)")
    m.add_argument("--fail-frac", type=float, default=0.05)
    m.add_argument("--out", type=Path)
    r = sub.add_parser("redis")
    r.add_argument("--saves", type=int, default=2000)
    r.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = bench_merge(args.shards, args.cells, args.fail_frac) if args.what == "merge" else bench_redis(args.saves)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
