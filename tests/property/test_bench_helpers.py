"""Tests of the benchmark helpers (``harness.bench``): timing plumbing, throughput, ceilings, shapes, guards.

CPU only and fast; the CUDA-event paths are exercised by ``tests/bench`` on a GPU.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.bench import (
    SCHEMA,
    SPEED_TARGET,
    Ceiling,
    Ceilings,
    Timing,
    assert_not_all_zero,
    attention_flops,
    host_time,
    interleaved_time,
    linear_flops,
    measure_ceilings,
    random_tensor,
    record,
    rotate,
    rotation_count,
    run_benchmark,
    wan_attention_shapes,
    wan_linear_shapes,
)
from harness.reference.wan.config import WAN_PRESETS


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs pedantic rounds like it does, keeps extra_info."""

    def __init__(self, disabled: bool = False) -> None:
        self.disabled = disabled
        self.extra_info: dict = {}
        self.calls: list[tuple[int, int]] = []

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        self.calls.append((rounds, warmup_rounds))
        if self.disabled:
            return target()
        for _ in range(warmup_rounds + rounds):
            result = target()
        return result


# --------------------------------------------------------------------------- shapes
def test_bench_wan_linear_shapes_cover_the_issue() -> None:
    """q/k/v/o, FFN up/down at 32760 and 75600 tokens and cross k/v at 512, for 1.3B and 14B."""
    keys = {s.key: (s.tokens, s.in_features, s.out_features) for s in wan_linear_shapes()}
    assert keys["wan14B.ffn_up.L75600"] == (75600, 5120, 13824)
    assert keys["wan14B.ffn_down.L32760"] == (32760, 13824, 5120)
    assert keys["wan1.3B.qkvo.L75600"] == (75600, 1536, 1536)
    assert keys["wan1.3B.ffn_up.L32760"] == (32760, 1536, 8960)
    assert keys["wan14B.cross_kv.L512"] == (512, 5120, 5120)
    assert len(keys) == 2 * (3 * 2 + 1)


def test_bench_wan_attention_shapes_cover_the_issue() -> None:
    got = {(s.kind, s.heads, s.q_tokens, s.kv_tokens, s.head_dim) for s in wan_attention_shapes()}
    assert got == {
        (kind, h, 32760, lk, 128)
        for h in (12, 40)
        for kind, lk in (("self", 32760), ("cross_text", 512), ("cross_image", 257))
    }


def test_bench_flop_counts() -> None:
    # the issue's own figure: bf16 14B FFN up at 75600 tokens is ~10.7 TFLOP per call
    assert linear_flops(75600, 5120, 13824) / 1e12 == pytest.approx(10.70, abs=0.01)
    cfg = WAN_PRESETS["14B"]
    assert attention_flops(1, cfg.heads, 32760, 32760, 128) == 4 * 40 * 32760 * 32760 * 128


def test_bench_unknown_model_is_named() -> None:
    with pytest.raises(ValueError, match="unknown Wan model '7B'"):
        wan_linear_shapes(models=("7B",))


def test_bench_speed_target_numbers() -> None:
    assert SPEED_TARGET.min_speedup_vs_bf16 == 1.5 and SPEED_TARGET.max_overhead_vs_bare == 0.05
    assert "1.56" in SPEED_TARGET.why


# --------------------------------------------------------------------------- timing plumbing
@given(times=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=50))
def test_bench_timing_stats(times) -> None:
    t = Timing(tuple(times), "perf_counter", 0)
    assert t.median == statistics.median(times) and t.min == min(times) and t.max == max(times)
    d = t.as_dict()
    assert d["rounds"] == len(times) and d["min"] <= d["median"] <= d["max"]


def test_bench_timing_needs_rounds() -> None:
    with pytest.raises(ValueError, match="at least one round"):
        Timing((), "perf_counter", 0)


@pytest.mark.parametrize("warmup, rounds, match", [(-1, 3, "warmup=-1"), (0, 0, "rounds=0"), (1, 2.0, "rounds=2.0")])
def test_bench_bad_rounds_named(warmup, rounds, match) -> None:
    with pytest.raises(ValueError, match=match):
        host_time(lambda: None, warmup=warmup, rounds=rounds)


def test_bench_run_benchmark_drops_warmup_rounds() -> None:
    """Enabled: pytest-benchmark runs warmup + rounds; only the timed rounds are returned."""
    calls = []
    fb = FakeBenchmark()
    t = run_benchmark(fb, lambda: calls.append(1), "cpu", warmup=2, rounds=5)
    assert len(calls) == 7 and len(t.times_ms) == 5 and t.warmup == 2 and t.timer == "perf_counter"
    assert fb.calls == [(5, 2)]


def test_bench_run_benchmark_disabled_runs_once() -> None:
    calls = []
    t = run_benchmark(FakeBenchmark(disabled=True), lambda: calls.append(1), "cpu", warmup=2, rounds=5)
    assert len(calls) == 1 and len(t.times_ms) == 1 and t.warmup == 0


class _FakeEvent:
    """CPU stand-in for torch.cuda.Event: record() stamps perf_counter, elapsed_time() in ms."""

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "timing events must be created with enable_timing=True"
        self.t: float | None = None

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        assert self.t is not None, "synchronize() on an event that was never recorded"

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.t - self.t) * 1e3


def test_bench_run_benchmark_cuda_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path: pytest-benchmark's synchronous rounds, then a back-to-back pass of as many rounds."""
    import harness.bench as hb

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    calls = []
    fb = FakeBenchmark()
    t = hb.run_benchmark(fb, lambda: calls.append(1), "cuda", warmup=2, rounds=5)
    assert fb.calls == [(5, 2)]
    assert len(calls) == (2 + 5) + (1 + 5), "pytest-benchmark rounds, then 1 warm-up + 5 back-to-back rounds"
    assert t.timer == "cuda_event" and len(t.times_ms) == 5 and len(t.sync_times_ms) == 5
    assert "sync_call_median" in t.as_dict()
    calls.clear()
    t = hb.run_benchmark(FakeBenchmark(disabled=True), lambda: calls.append(1), "cuda", warmup=2, rounds=5)
    assert len(calls) == 1 and len(t.times_ms) == 1 and t.sync_times_ms == ()
    order: list[str] = []
    res = hb.interleaved_time(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cuda", warmup=1, rounds=4, blocks=2
    )
    assert {k: (v.timer, len(v.times_ms)) for k, v in res.items()} == {"a": ("cuda_event", 4), "b": ("cuda_event", 4)}
    assert order == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 2


@given(rounds=st.integers(1, 20), blocks=st.integers(1, 6), warmup=st.integers(0, 3))
def test_bench_interleaved_time_counts(rounds, blocks, warmup) -> None:
    """Every callable gets warmup + 1 discarded rounds, then exactly ``rounds`` timed ones, in alternation."""
    order: list[str] = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b")}
    t = interleaved_time(fns, "cpu", warmup=warmup, rounds=rounds, blocks=blocks)
    assert {k: len(v.times_ms) for k, v in t.items()} == {"a": rounds, "b": rounds}
    assert order.count("a") == order.count("b") == warmup + 1 + rounds
    timed = order[2 * (warmup + 1) :]
    # blocks alternate: the timed sequence switches callable at most 2*blocks - 1 times
    switches = sum(1 for x, y in zip(timed, timed[1:]) if x != y)
    assert switches <= 2 * min(blocks, rounds) - 1


def test_bench_rotate_cycles() -> None:
    seen = []
    f = rotate(lambda x: seen.append(x), [(1,), (2,), (3,)])
    for _ in range(7):
        f()
    assert seen == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="at least one input set"):
        rotate(lambda: None, [])


def test_bench_rotation_on_cpu_is_one_set() -> None:
    assert rotation_count(1, "cpu") == 1
    with pytest.raises(ValueError, match="bytes_per_set=0"):
        rotation_count(0, "cpu")


def test_bench_rotation_spans_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 50 MiB L2, a 10 MiB set is cycled 20x -> capped at 16; a 400 MiB set needs no rotation."""
    import harness.bench as hb

    monkeypatch.setattr(hb, "l2_cache_bytes", lambda device: 50 * 2**20)
    assert rotation_count(10 * 2**20, "cuda") == 16
    assert rotation_count(40 * 2**20, "cuda") == 5
    assert rotation_count(400 * 2**20, "cuda") == 1


# --------------------------------------------------------------------------- guards
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_bench_all_zero_input_is_refused(dtype) -> None:
    z = torch.zeros(4, 8, dtype=dtype)
    with pytest.raises(AssertionError, match="'x'.*all zeros"):
        assert_not_all_zero({"ok": torch.ones(3), "x": z})


def test_bench_negative_zero_fp8_counts_as_zero() -> None:
    neg = torch.full((4, 8), -0.0).to(torch.float8_e4m3fn)
    assert neg.view(torch.uint8).unique().tolist() == [0x80]
    with pytest.raises(AssertionError, match="all zeros"):
        assert_not_all_zero({"neg": neg})


def test_bench_nonzero_views_pass() -> None:
    x = random_tensor((16, 16), torch.float32, "cpu", 0).to(torch.float8_e4m3fn)
    assert_not_all_zero({"t": x.t(), "empty_ok_elsewhere": torch.ones(1)})
    with pytest.raises(AssertionError, match="empty"):
        assert_not_all_zero({"e": torch.empty(0)})


def test_bench_random_tensor_is_seeded_and_nonzero() -> None:
    a = random_tensor((64,), torch.bfloat16, "cpu", 7)
    assert torch.equal(a, random_tensor((64,), torch.bfloat16, "cpu", 7))
    assert not torch.equal(a, random_tensor((64,), torch.bfloat16, "cpu", 8))
    assert a.dtype == torch.bfloat16 and int(torch.count_nonzero(a)) > 0


# --------------------------------------------------------------------------- record
def _ceilings() -> Ceilings:
    return Ceilings(
        "dev",
        {
            "bf16_matmul": Ceiling("bf16_matmul", "TFLOP/s", 100.0, "test"),
            "fp8_matmul": Ceiling("fp8_matmul", "TFLOP/s", None, "test", "no FP8 here"),
            "copy": Ceiling("copy", "GB/s", 1000.0, "test"),
        },
    )


def test_bench_record_throughput_and_ratio() -> None:
    fb = FakeBenchmark()
    t = Timing((2.0, 1.0, 3.0), "cuda_event", 3)  # median 2 ms
    info = record(
        fb,
        t,
        op="bf16_linear",
        family="linear",
        shape_key="k",
        shape={"M": 1},
        ceilings=_ceilings(),
        ceiling="bf16_matmul",
        env={"device": "dev"},
        flops=100 * 10**9,
        note="x",
    )
    assert info is not fb.extra_info and fb.extra_info == info
    assert info["schema"] == SCHEMA and info["note"] == "x"
    assert info["throughput"] == {"value": pytest.approx(50.0), "unit": "TFLOP/s"}  # 1e11 FLOP / 2 ms
    assert info["ceiling_ratio"] == pytest.approx(0.5)
    assert info["device_ms"]["median"] == 2.0 and info["device_ms"]["timer"] == "cuda_event"
    g = record(
        FakeBenchmark(),
        t,
        op="q",
        family="quantize",
        shape_key="k",
        shape={},
        ceilings=_ceilings(),
        ceiling="copy",
        env={},
        nbytes=4 * 10**9,
    )
    assert g["throughput"] == {"value": pytest.approx(2000.0), "unit": "GB/s"}
    assert g["ceiling_ratio"] == pytest.approx(2.0)


def test_bench_record_unmeasured_ceiling_gives_no_ratio() -> None:
    info = record(
        FakeBenchmark(),
        Timing((1.0,), "cuda_event", 0),
        op="fp8_linear",
        family="linear",
        shape_key="k",
        shape={},
        ceilings=_ceilings(),
        ceiling="fp8_matmul",
        env={},
        flops=10**9,
    )
    assert info["ceiling_ratio"] is None and info["ceiling"]["reason"] == "no FP8 here"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flops=1, nbytes=1), "exactly one of flops"),
        (dict(), "exactly one of flops"),
        (dict(nbytes=10, ceiling="bf16_matmul"), "in TFLOP/s but this result is in GB/s"),
        (dict(flops=10, ceiling="tensor_core_peak"), "no ceiling 'tensor_core_peak'"),
    ],
)
def test_bench_record_rejects_mismatches(kwargs, match) -> None:
    kw = {"ceiling": "copy", **kwargs}
    with pytest.raises((ValueError, KeyError), match=match):
        record(
            FakeBenchmark(),
            Timing((1.0,), "perf_counter", 0),
            op="o",
            family="f",
            shape_key="k",
            shape={},
            ceilings=_ceilings(),
            env={},
            **kw,
        )


def test_bench_cpu_ceilings_are_measured() -> None:
    c = measure_ceilings("cpu", gemm_n=128, copy_mib=1, warmup=0, rounds=1)
    assert set(c.items) == {"bf16_matmul", "fp8_matmul", "copy"}
    for item in c.items.values():
        assert (item.value is not None and item.value > 0) or item.reason, item
    assert c.get("copy").unit == "GB/s" and c.get("bf16_matmul").unit == "TFLOP/s"
