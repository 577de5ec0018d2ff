"""How many workers a device gets when the user names none (``harness.runner.devices.default_workers``)."""

from __future__ import annotations

import pytest

from harness.runner import devices as D


@pytest.mark.parametrize(
    "devs, size, cpus, mem_gib, want",
    [
        (["cpu"], "small", 2, 8, 1),  # half the cores
        (["cpu"], "small", 16, 64, 4),  # at most 4 on CPU
        (["cuda:0"], "small", 16, 128, 8),  # two cores per worker, at most 8 per GPU
        (["cuda:0"], "small", 16, 32, 5),  # host memory: one per 6 GiB
        (["cuda:0"], "small", 6, 128, 3),  # few cores
        (["cuda:0", "cuda:1"], "small", 16, 512, 4),  # the cores shared by two GPUs
        (["cuda:0"], "wan", 64, 512, 1),  # Wan-sized cases: one per GPU
        (["cuda:0"], "small", 1, 4, 1),  # never 0
        (["cuda:0"], "small", 16, None, 8),  # memory unknown: the cores decide
    ],
)
def test_default_workers(monkeypatch, devs, size, cpus, mem_gib, want) -> None:
    monkeypatch.setattr(D, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(D, "host_memory_gib", lambda: mem_gib)
    assert D.default_workers(devs, size) == want


def test_host_memory_is_read_from_the_machine() -> None:
    mem = D.host_memory_gib()
    assert mem is None or mem > 0.1
    assert D.usable_cpus() >= 1
