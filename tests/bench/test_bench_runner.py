"""Runner benchmarks: small cases per second through the pool, and time to recover from a fault.

Targets (issue 14, reported in ``benchmark.extra_info``, never asserted here): at least 1000 small cases/s
per GPU; with one case in ten a device fault, at least 100 cases/s; a fault costs at most 0.1 s (median) when
a spare exists.  A fresh interpreter with a CUDA context costs 5-7 s; a ready spare takes over at once.
The GPU variants use the pool's default worker count per GPU (:func:`harness.runner.devices.default_workers`),
as the matrix does.

CPU workers always run (under CI's ``--benchmark-disable`` each body runs once); the ``cuda``
variants run the same workload on every visible GPU. The parent process never initialises CUDA:
GPUs are counted by a probe subprocess. Cases use random (never all-zero) values.
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest

from harness.cases import Case
from harness.layouts import LayoutSpec
from harness.runner.devices import default_workers
from harness.runner.pool import WorkerPool, probe_cuda, probe_devices
from harness.values import ValueSpec
from harness.verdicts import Verdict


@functools.lru_cache(maxsize=4)
def _runner_env(cuda: bool) -> dict:
    """Device and versions for ``extra_info["env"]`` (the dashboard groups by it); CUDA is probed in a child."""
    if not cuda:
        from harness.bench import env_info

        return env_info("cpu")
    from harness.env import collect_env_subprocess

    env = collect_env_subprocess()
    keep = ("python", "torch", "cuda", "cudnn", "cublas", "driver", "triton", "device", "capability")
    return {**{k: env.get(k) for k in keep}, "device_type": "cuda"}


#: a small strided case: offset, padding (so the layout check runs), 8K elements
SMALL = LayoutSpec((64, 128), "float32", offset=3, pad=(0, 4))


def small_cases(n: int, op: str = "cpu.scale") -> list[Case]:
    return [Case(op=op, layouts={"x": SMALL}, values={"x": ValueSpec("normal", seed=i)}) for i in range(n)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def bench_devices(request) -> list[str]:
    if request.param == "cpu":
        return ["cpu"]
    found = probe_devices()
    if not found:
        pytest.skip(f"no CUDA device (probe: {probe_cuda().get('error') or 'torch sees 0 GPUs'})")
    return found


def test_bench_runner_throughput(benchmark, bench_devices):
    """Small cases/s through the whole pool (submit -> worker -> judged Result), all devices."""
    cuda = bench_devices[0].startswith("cuda")
    per_device = default_workers(bench_devices) if cuda else 2
    n = 4000 * len(bench_devices) if cuda else 300
    cases = small_cases(n)
    with WorkerPool(bench_devices, per_device, spares=0, attribute=False, prefetch=4) as pool:
        assert pool.wait_ready(300)
        pool.run(small_cases(4 * per_device * len(bench_devices)))  # first-call costs in every worker
        seconds: list[float] = []

        def round_() -> None:
            t0 = time.perf_counter()
            results = pool.run(cases)
            seconds.append(time.perf_counter() - t0)
            bad = [r for r in results if r.verdict is not Verdict.PASS]
            assert not bad, bad[0].format()  # a timing of failing cases would be meaningless

        benchmark.pedantic(round_, rounds=3, warmup_rounds=0, iterations=1)
        med = statistics.median(seconds)
        benchmark.extra_info.update(
            {
                "op": "runner.throughput",
                "family": "runner",
                "devices": bench_devices,
                "env": _runner_env(cuda),
                "workers_per_device": per_device,
                "cases": n,
                "seconds_median": med,
                "cases_per_s": n / med,
                "cases_per_s_per_device": n / med / len(bench_devices),
                "target_cases_per_s_per_gpu": 1000,
                "devices_used": sorted({r["device"] for r in pool.workers()}),
            }
        )


@pytest.mark.parametrize("spares", [0, 1], ids=["fresh-worker", "spare"])
def test_bench_runner_recovery(benchmark, bench_devices, spares):
    """Seconds from a device fault's result to the next case's result on a one-worker pool."""
    cuda = bench_devices[0].startswith("cuda")
    fault = Case(op="fault.device_assert" if cuda else "fault.sticky", layouts={"x": LayoutSpec((8,), "float32")})
    after = small_cases(1)[0]
    with WorkerPool(bench_devices[:1], 1, spares=spares, attribute=False) as pool:
        assert pool.wait_ready(300)
        recovery: list[float] = []

        def round_() -> None:
            assert pool.wait_ready(300)  # not timed: the pool is back to full strength, spares included
            r = pool.run_one(fault)
            assert r.verdict is Verdict.DEVICE_FAULT, r.format()
            t0 = time.perf_counter()
            nxt = pool.run_one(after)
            recovery.append(time.perf_counter() - t0)
            assert nxt.verdict is Verdict.PASS, nxt.format()

        benchmark.pedantic(round_, rounds=3 if cuda else 1, warmup_rounds=0, iterations=1)
        benchmark.extra_info.update(
            {
                "op": f"runner.recovery.{'spare' if spares else 'fresh'}",
                "family": "runner",
                "device": bench_devices[0],
                "env": _runner_env(cuda),
                "fault": fault.op,
                "spares": spares,
                "recovery_s_median": statistics.median(recovery),
                "recovery_s": recovery,
                "pool_recoveries_s": list(pool.recoveries),
                "target_recovery_s": 0.1 if spares else 10.0,
            }
        )


def test_bench_runner_throughput_with_faults(benchmark, bench_devices):
    """Small cases/s when one case in ten is a device fault (each one retires its worker), and the time each
    fault cost: from the loss to the next case starting on that device (the pool's ``recovery_log``)."""
    cuda = bench_devices[0].startswith("cuda")
    per_device = default_workers(bench_devices) if cuda else 2
    n = 300 * len(bench_devices) if cuda else 30  # every tenth case costs a fresh worker process (seconds)
    fault = Case(op="fault.device_assert" if cuda else "fault.sticky", layouts={"x": LayoutSpec((8,), "float32")})
    cases = [fault if i % 10 == 9 else c for i, c in enumerate(small_cases(n))]
    with WorkerPool(bench_devices, per_device, attribute=False, prefetch=4) as pool:
        assert pool.wait_ready(300)
        pool.run(small_cases(4 * per_device * len(bench_devices)))
        seconds: list[float] = []

        def round_() -> None:
            assert pool.wait_ready(300)  # not timed: back to full strength, spares included
            t0 = time.perf_counter()
            results = pool.run(cases)
            seconds.append(time.perf_counter() - t0)
            faults = [r for c, r in zip(cases, results) if c is fault]
            assert all(r.verdict is Verdict.DEVICE_FAULT for r in faults), faults[0].format()
            bad = [r for c, r in zip(cases, results) if c is not fault and r.verdict is not Verdict.PASS]
            assert not bad, bad[0].format()

        benchmark.pedantic(round_, rounds=1, warmup_rounds=0, iterations=1)
        med = statistics.median(seconds)
        lost = [e["seconds"] for e in pool.recovery_log if e.get("reason") == "device_fault"]
        benchmark.extra_info.update(
            {
                "op": "runner.throughput_with_faults",
                "family": "runner",
                "devices": bench_devices,
                "env": _runner_env(cuda),
                "workers_per_device": per_device,
                "spares": pool.spares,
                "max_spares": pool.max_spares,
                "cases": n,
                "faults": sum(1 for c in cases if c is fault),
                "seconds_median": med,
                "cases_per_s": n / med,
                "cases_per_s_per_device": n / med / len(bench_devices),
                "target_cases_per_s_per_gpu": 100,
                "fault_lost_s_median": statistics.median(lost) if lost else None,
                "fault_lost_s_max": max(lost) if lost else None,
                "target_fault_lost_s": 0.1,
            }
        )
