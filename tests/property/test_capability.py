"""The one capability check: exact reasons from faked torch probes, one device-info schema."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import capability as C


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> dict:
    state = {"available": True, "cap": (8, 6)}
    monkeypatch.setattr(C, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["available"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["cap"])
    return state


def test_require_cuda_reasons_are_exact(gpu) -> None:
    assert C.require_cuda((8, 9), "FP8 matmul") == "FP8 matmul needs compute capability >= 8.9, found 8.6"
    assert C.require_cuda((8, 0), "FP8 matmul") is None
    assert C.require_cuda(None, "op", device="cpu") == "op needs a CUDA device, got 'cpu'"
    gpu["available"] = False
    assert C.require_cuda((8, 9), "op", device="cuda:1") == "op needs a CUDA device: no CUDA device"
    assert C.require_cuda((8, 9)) == "no CUDA device"


def test_capability_is_asked_once_per_index(gpu) -> None:
    assert C.cuda_capability("cuda:0") == (8, 6)
    gpu["cap"] = (9, 0)
    assert C.cuda_capability("cuda:0") == (8, 6)  # cached: it cannot change within a process
    assert C.cuda_capability("cuda:1") == (9, 0)


def test_cpu_device_info_is_frozen_and_names_the_build() -> None:
    info = C.device_info("cpu")
    assert (info.type, info.capability, info.capability_text, info.torch) == ("cpu", None, None, torch.__version__)
    assert info.as_dict()["device"] == "cpu" and info.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # type: ignore[misc]


def test_no_cuda_reason_names_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert C.no_cuda_reason() == f"no CUDA device: torch {torch.__version__} is a CPU-only build"


def test_cuda_device_info_reads_the_device_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    props = types.SimpleNamespace(
        name="NVIDIA H200",
        major=9,
        minor=0,
        total_memory=150 * 2**30,
        L2_cache_size=60 * 2**20,
        multi_processor_count=132,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    info = C.device_info("cuda:1")
    assert (info.device, info.type, info.name, info.capability, info.capability_text) == (
        "cuda:1",
        "cuda",
        "NVIDIA H200",
        (9, 0),
        "9.0",
    )
    assert (info.memory_bytes, info.l2_bytes, info.multiprocessors) == (150 * 2**30, 60 * 2**20, 132)
