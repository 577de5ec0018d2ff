"""Fixtures of the benchmark suite: devices, per-session ceilings and environment, rounds policy.

GPU benchmarks are marked ``gpu`` (the root conftest skips them, naming what is
missing, without CUDA); capability gaps (FP8 needs compute capability >= 8.9)
are probed here at run time, inside the fixtures, never at import.  Ceilings
are measured once per session and only when a test asks for them, so a CPU-only
run never touches CUDA.

Rounds: ``HARNESS_BENCH_ROUNDS`` (timed rounds per GPU benchmark, default 10;
CPU benchmarks use a third of it, at least 3) and ``HARNESS_BENCH_WARMUP``
(default 3 on GPU, 1 on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from harness.bench import Ceilings, env_info, gpu_skip_reason, measure_ceilings
from harness.quant.linear import MIN_CAPABILITY


@dataclass(frozen=True)
class RoundsPolicy:
    """Warm-up and timed rounds per benchmark on each kind of device."""

    gpu_warmup: int
    gpu_rounds: int
    cpu_warmup: int
    cpu_rounds: int

    def for_device(self, device: torch.device | str) -> tuple[int, int]:
        """(warmup, rounds) for ``device``."""
        if torch.device(device).type == "cuda":
            return self.gpu_warmup, self.gpu_rounds
        return self.cpu_warmup, self.cpu_rounds


def _env_int(name: str, default: int, lo: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} is not an integer; unset it or pass e.g. {name}={default}") from None
    if value < lo:
        raise pytest.UsageError(f"{name}={value} must be >= {lo}")
    return value


@pytest.fixture(scope="session")
def rounds_policy() -> RoundsPolicy:
    rounds = _env_int("HARNESS_BENCH_ROUNDS", 10, 1)
    warmup = _env_int("HARNESS_BENCH_WARMUP", 3, 0)
    return RoundsPolicy(gpu_warmup=warmup, gpu_rounds=rounds, cpu_warmup=min(warmup, 1), cpu_rounds=max(3, rounds // 3))


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The CUDA device benchmarks run on; skips (naming why) without one."""
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def fp8_device(cuda_device: torch.device) -> torch.device:
    """A CUDA device with FP8 ``_scaled_mm`` (compute capability >= 8.9); skips naming the capability found."""
    reason = gpu_skip_reason(MIN_CAPABILITY, what="FP8 matmul")
    if reason:
        pytest.skip(reason)
    return cuda_device


@pytest.fixture(scope="session")
def gpu_ceilings(cuda_device: torch.device) -> Ceilings:
    """bf16/FP8 GEMM peaks and copy bandwidth of this GPU, measured once in this session."""
    c = measure_ceilings(cuda_device)
    torch.cuda.empty_cache()
    return c


@pytest.fixture(scope="session")
def gpu_env(cuda_device: torch.device) -> dict:
    return env_info(cuda_device)


@pytest.fixture(scope="session")
def benchmarks_disabled(request: pytest.FixtureRequest) -> bool:
    """``--benchmark-disable`` (the test suite's default): each body runs once and nothing is recorded."""
    return bool(request.config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="session")
def cpu_ceilings(benchmarks_disabled: bool) -> Ceilings:
    """Smoke-sized CPU ceilings (a 1024^3 GEMM, a 16 MiB copy), measured once in this session.

    Under ``--benchmark-disable`` (the test suite: each benchmark runs once, nothing is recorded) a 256^3 GEMM
    and one round: the same code paths and ratio arithmetic, without two minutes of CPU FP8 matmuls."""
    if benchmarks_disabled:
        return measure_ceilings("cpu", gemm_n=256, copy_mib=4, warmup=0, rounds=1)
    return measure_ceilings("cpu")


@pytest.fixture(scope="session")
def cpu_env() -> dict:
    return env_info("cpu")


@pytest.fixture(autouse=True)
def _release_gpu_memory(request: pytest.FixtureRequest):
    """Return cached blocks after each GPU benchmark so the next one's 75600-token inputs fit."""
    yield
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
