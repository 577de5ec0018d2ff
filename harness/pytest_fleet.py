"""pytest over machines and GPUs: ``--harness-shard I/N`` and one GPU per pytest-xdist worker.

- ``pytest --harness-shard I/N`` keeps the collected items whose node id falls in shard I of N
  (:mod:`harness.shard`: SHA-256 of the node id, the same split on every machine); the rest are
  deselected.  The N runs are disjoint and together run every item.
- ``pytest -n auto`` (pytest-xdist, ``pip install 'harness[xdist]'``) on a GPU host starts one worker
  per GPU, and each worker sees only its own GPU: before anything in the worker initialises CUDA,
  ``CUDA_VISIBLE_DEVICES`` is set to entry ``k mod G`` of the GPUs handed out (worker ``gwk``; more
  workers than GPUs share them round-robin).  The GPUs handed out are the entries of the inherited
  ``CUDA_VISIBLE_DEVICES`` when it is set (indices, UUIDs or MIG ids, verbatim), else ``0 .. G-1`` with
  G from ``nvidia-smi -L`` (a subprocess: no CUDA context here).  ``HARNESS_GPU_COUNT=G`` overrides the
  count (testing the mapping on a CPU machine, or using fewer GPUs).  Every worker loads the same
  Hypothesis profile, so they share its example database (``HARNESS_HYPOTHESIS_DB``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import pytest

from harness.shard import ShardError, parse_shard

__all__ = ["GPU_COUNT_ENV", "worker_index", "gpus_to_hand_out", "device_for_worker", "nvidia_smi_gpu_count"]

GPU_COUNT_ENV = "HARNESS_GPU_COUNT"
_WORKER = re.compile(r"gw(\d+)")


def worker_index(worker_id: str | None) -> int | None:
    """``"gw3"`` -> 3; None for the controller or a run without xdist."""
    m = _WORKER.fullmatch(worker_id or "")
    return int(m.group(1)) if m else None


def nvidia_smi_gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without the tool or a driver); creates no CUDA context."""
    from harness.runner.gpu_health import run_nvidia_smi

    asked = run_nvidia_smi(["-L"], 30)
    return sum(1 for line in asked[1].splitlines() if line.startswith("GPU ")) if asked and asked[0] == 0 else 0


def gpus_to_hand_out(env: Mapping[str, str], count: Callable[[], int] = nvidia_smi_gpu_count) -> list[str]:
    """The GPUs the workers share out: ``HARNESS_GPU_COUNT``, else ``CUDA_VISIBLE_DEVICES``, else ``count()``."""
    raw = env.get(GPU_COUNT_ENV)
    if raw is not None and raw.strip():
        if not raw.strip().isdigit():
            raise ValueError(f"{GPU_COUNT_ENV}={raw!r} must be a whole number of GPUs (e.g. {GPU_COUNT_ENV}=8)")
        return [str(i) for i in range(int(raw))]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(count())]


def device_for_worker(worker_id: str | None, gpus: list[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value of worker ``worker_id`` (None: leave the environment alone)."""
    k = worker_index(worker_id)
    if k is None or not gpus:
        return None
    return gpus[k % len(gpus)]


# ------------------------------------------------------------------ pytest hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("harness").addoption(
        "--harness-shard",
        default=None,
        metavar="I/N",
        help="run only shard I of N (1 <= I <= N) of the collected tests, by a stable hash of each node id",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--harness-shard")
    if spec is not None:
        try:
            config._harness_shard = parse_shard(spec)  # type: ignore[attr-defined]
        except ShardError as e:
            raise pytest.UsageError(f"--harness-shard: {e}") from None
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker_index(worker) is None:
        return
    try:
        device = device_for_worker(worker, gpus_to_hand_out(os.environ))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` on a GPU host: one worker per GPU (None: xdist's own default, one per CPU)."""
    try:
        n = len(gpus_to_hand_out(os.environ))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    return n or None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = getattr(config, "_harness_shard", None)
    if shard is None:
        return
    keep = [it for it in items if shard.holds(it.nodeid)]
    drop = [it for it in items if not shard.holds(it.nodeid)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    shard = getattr(config, "_harness_shard", None)
    return [f"harness: test shard {shard} (--harness-shard)"] if shard is not None else []
