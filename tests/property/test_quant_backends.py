"""Attention backend registry: exact skip reasons (probes monkeypatched), descriptions, no CUDA at import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from harness.quant import backends as B
from harness.quant.backends import (
    BACKENDS,
    EMULATION_OF,
    AttentionBackend,
    Requirements,
    describe_all,
    format_table,
    get_backend,
    parse_version,
    register_backend,
)

from helpers import hard_permutation_attention


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A pretend CUDA machine: capability and installed packages set per test; nothing real is probed."""
    state = {"cap": (9, 0), "versions": {}, "modules": set(), "attrs": {}}
    monkeypatch.setattr(B, "_cuda_available", lambda: True)
    monkeypatch.setattr(B, "_capability", lambda dev: state["cap"])
    monkeypatch.setattr(B, "_installed_version", lambda dist: state["versions"].get(dist))
    monkeypatch.setattr(B, "_module_present", lambda name: name in state["modules"])

    class _Mod:
        def __init__(self, attrs):
            self.__dict__.update({a: (lambda *x, **k: None) for a in attrs})

    monkeypatch.setattr(B, "_import", lambda name: _Mod(state["attrs"].get(name, ())))
    return state


def test_no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "_cuda_available", lambda: False)
    assert get_backend("sage1.sageattn").available() == (False, "no CUDA device")
    assert get_backend("sdpa.flash").available("cuda") == (False, "no CUDA device")
    assert get_backend("sdpa.flash").available("cpu") == (False, "needs a CUDA device, got cpu")
    ok, why = get_backend("emu.sage3").available()
    assert ok and "emulation" in why


def test_capability_reasons_are_exact(fake_gpu) -> None:
    fake_gpu["cap"] = (9, 0)
    assert get_backend("sage3").available() == (False, "needs compute capability 10.0 or 12.0, this GPU is 9.0")
    fake_gpu["cap"] = (8, 6)
    assert get_backend("sage2.qk_int8_pv_fp8_cuda").available() == (
        False,
        "needs compute capability >= 8.9, this GPU is 8.6",
    )
    assert get_backend("sage2.qk_int8_pv_fp8_cuda_sm90").available() == (
        False,
        "needs compute capability 9.0, this GPU is 8.6",
    )
    fake_gpu["cap"] = (7, 5)
    assert get_backend("sage1.sageattn").available() == (False, "needs compute capability >= 8.0, this GPU is 7.5")


def test_package_and_version_reasons(fake_gpu) -> None:
    fake_gpu["cap"] = (9, 0)
    sage1 = get_backend("sage1.sageattn")
    assert sage1.available() == (False, "package sageattention not installed")
    fake_gpu["versions"]["sageattention"] = "1.0.4"
    fake_gpu["modules"] |= {"sageattention", "triton"}
    assert sage1.available() == (False, "sageattention 1.0.4 installed, needs >= 1.0.6")
    fake_gpu["versions"]["sageattention"] = "2.2.0+cu128"
    assert sage1.available() == (
        False,
        "sageattention 2.2.0+cu128 installed, this backend is the 1.x kernel (needs < 2.0.0)",
    )
    fake_gpu["versions"]["sageattention"] = "1.0.6"
    fake_gpu["modules"].discard("triton")
    assert sage1.available() == (False, "module triton not installed (needed by sageattention)")
    fake_gpu["modules"].add("triton")
    assert sage1.available() == (False, "sageattention 1.0.6 has no sageattn")
    fake_gpu["attrs"]["sageattention"] = ("sageattn", "sageattn_varlen")
    ok, why = sage1.available()
    assert ok and "compute capability 9.0" in why


def test_sage2_entry_points_need_their_extension(fake_gpu) -> None:
    fake_gpu["cap"] = (9, 0)
    fake_gpu["versions"]["sageattention"] = "2.1.1"
    fake_gpu["modules"] |= {"sageattention"}
    fake_gpu["attrs"]["sageattention"] = ("sageattn_qk_int8_pv_fp8_cuda_sm90",)
    be = get_backend("sage2.qk_int8_pv_fp8_cuda_sm90")
    assert be.available() == (False, "module sageattention._qattn_sm90 not installed (needed by sageattention)")
    fake_gpu["modules"].add("sageattention._qattn_sm90")
    assert be.available()[0]
    fake_gpu["versions"]["sageattention"] = "1.0.6"
    assert be.available() == (False, "sageattention 1.0.6 installed, needs >= 2.0.0")


def test_sage3_on_blackwell(fake_gpu) -> None:
    fake_gpu["cap"] = (12, 0)
    be = get_backend("sage3")
    assert be.available() == (False, "package sageattn3 not installed")
    fake_gpu["versions"]["sageattn3"] = "1.0.0"
    fake_gpu["modules"].add("sageattn3")
    fake_gpu["attrs"]["sageattn3"] = ("sageattn3_blackwell",)
    assert be.available()[0]


def test_version_parsing() -> None:
    assert parse_version("2.2.0+cu128torch2.8") == (2, 2, 0)
    assert parse_version("1.0.6.post1") == (1, 0, 6)
    assert parse_version("v3") == (3,)
    assert parse_version("dev") == ()


def test_requirements_declare_what_the_kernels_need() -> None:
    s1 = get_backend("sage1.sageattn").requires
    assert s1.head_dims == (64, 96, 128) and s1.last_dim_stride_one and s1.dtypes == ("float16", "bfloat16", "float32")
    assert get_backend("sage1.sageattn_varlen").requires.head_dims == (64, 128)
    assert s1.mutated_inputs({}) == ("k",) and s1.mutated_inputs({"smooth_k": False}) == ()
    assert get_backend("sage3").requires.layouts == ("HND",) and get_backend("sage3").requires.modifies_inputs == ("k",)
    assert get_backend("flash_attn").requires.layouts == ("NHD",)
    assert get_backend("sage2.qk_int8_pv_fp16_cuda").requires.max_head_dim == 128
    for name in BACKENDS:
        if BACKENDS[name].kind == "native":
            assert name in EMULATION_OF and EMULATION_OF[name] in BACKENDS, name


def test_check_inputs_names_the_value() -> None:
    q = torch.zeros(1, 2, 16, 80, dtype=torch.bfloat16)
    probs = get_backend("sage1.sageattn").check_inputs(q, q, q, "HND")
    assert any("head_dim 80 not supported by sage1.sageattn (supports 64, 96, 128)" in p for p in probs)
    q32 = torch.zeros(1, 2, 16, 64)
    probs = get_backend("sage2.sageattn").check_inputs(q32, q32, q32, "HND")
    assert any("q dtype float32 not supported by sage2.sageattn" in p for p in probs)
    assert get_backend("emu.exact").check_inputs(q32, q32, q32, "HND") == []


def test_describe_all_and_table() -> None:
    d = describe_all()
    assert set(d) == set(BACKENDS)
    for name, info in d.items():
        assert set(info) >= {"available", "reason", "requires", "kind"} and isinstance(info["reason"], str)
        json.dumps(info)  # serializable for env --json
    assert d["emu.exact"]["available"] is True
    assert d["sage3"]["requires"]["exact_capabilities"] == ["10.0", "12.0"]
    table = format_table(d)
    for name in BACKENDS:
        assert name in table
    line = next(l for l in table.splitlines() if l.strip().startswith("emu.exact"))
    assert "yes" in line


def test_a_probe_that_crashes_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(B, "_cuda_available", boom)
    d = describe_all()
    assert d["sdpa.flash"]["available"] is False and "driver exploded" in d["sdpa.flash"]["reason"]


@pytest.mark.parametrize("name", ["sdpa", "sdpa.math", "emu.naive"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_cpu_backends_run_and_agree_with_exact(name: str, layout: str) -> None:
    """SDPA / naive on CPU vs exact float64 attention: within 2x the naive run's error + a rounding floor."""
    from harness.reference.attention import attention, naive_attention
    from harness.reference.metrics import Bound, judge

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 64, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(3))
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    be = get_backend(name)
    run_layout = layout if layout in be.requires.layouts else "HND"
    args = (q, k, v) if run_layout == layout else tuple(t.transpose(1, 2) for t in (q, k, v))
    out = be.run(*args, run_layout)
    if run_layout != layout:
        out = out.transpose(1, 2)
    exact = attention(q, k, v, layout)
    naive = naive_attention(q, k, v, layout)
    bound = Bound.derived(2.0, exact, torch.bfloat16, why="2 x same-precision naive error (FlashAttention's rule)")
    j = judge(out.double(), exact, naive.double(), bound)
    assert j.passed, str(j)


@pytest.mark.parametrize("name", ["emu.sage1", "emu.sage2", "emu.sage3", "emu.naive", "emu.exact"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_emulated_backends_give_the_known_answer_of_a_hard_permutation(name: str, layout: str) -> None:
    q, k, v, want = hard_permutation_attention(heads=1, seq=64, head_dim=128, seed=1)
    if layout == "NHD":
        q, k, v, want = (t.transpose(1, 2).contiguous() for t in (q, k, v, want))
    out = get_backend(name).run(q, k, v, layout)
    assert out.shape == want.shape
    assert torch.equal(out.float(), want.float()), f"{name}: {(out.float() - want.float()).abs().max()}"


def test_register_backend_refuses_duplicates() -> None:
    be = AttentionBackend("test.dup", "dup", Requirements(), runner=lambda q, k, v, layout, **kw: q)
    register_backend(be)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_backend(be)
        assert register_backend(be, replace=True) is be
    finally:
        BACKENDS.pop("test.dup", None)
    with pytest.raises(KeyError, match="unknown attention backend 'nope'"):
        get_backend("nope")


def test_importing_never_touches_cuda() -> None:
    """Import every harness.quant module and use the lazy exports with every CUDA entry point booby-trapped."""
    code = textwrap.dedent("""
        import torch
        def trap(*a, **k):
            raise SystemExit("CUDA touched at import: " + repr(a))
        for name in ("is_available", "device_count", "get_device_capability", "init", "current_device",
                     "get_device_properties"):
            setattr(torch.cuda, name, trap)
        import harness.quant as q
        import harness.quant.linear, harness.quant.backends, harness.quant.attention, harness.quant.legacy
        import harness.quant.plugins, harness.quant.convert, harness.quant.blocks
        q.fp8_linear, q.BACKENDS, q.safe_attention, q.convert_to_fp8, q.PRESETS, q.load_linear
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
