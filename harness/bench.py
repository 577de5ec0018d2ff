"""Timing, throughput and ceilings for the benchmark suite (``tests/bench``).

**How time is measured.**  On CUDA a round is bracketed by two CUDA events on
the current stream and its time is the events' ``elapsed_time``; a result is
the *median* over many rounds after warm-up rounds that are thrown away.  Each
GPU benchmark is timed twice, on the same inputs:

1. under pytest-benchmark (``benchmark.pedantic``), one *synchronous* call per
   round: pytest-benchmark's timer is host-side, so the timed callable waits on
   its end event before returning.  pytest-benchmark's statistics therefore
   hold the latency of one synchronous call (Python and launch overhead plus
   device work), and the event times of those rounds are kept as
   ``device_ms["sync_call_median"]``;
2. then back to back (:func:`cuda_time`: events around each call, one
   synchronisation at the end), as a model's forward issues them: the GPU queue
   stays full, host overhead hides behind device work unless it is the
   bottleneck, and the event times are the steady-state device time per call.
   These are ``extra_info["device_ms"]`` and what throughputs, ceiling ratios,
   speed-ups, speed targets and the dashboard use.

On the CPU rounds are timed with ``time.perf_counter`` under pytest-benchmark only.

**Caches.**  Inputs are larger than the last-level cache or rotated among
several input sets (:func:`rotation_count`) so a round never finds its operands
already in L2; :func:`assert_not_all_zero` guards every timed input (zeros make
tensor cores and memory compression look faster than they are).

**Ceilings.**  :func:`measure_ceilings` times, once per session, the bf16
matmul and FP8 ``_scaled_mm`` peaks on a large square GEMM with random data and
the device-to-device copy bandwidth; every result states its ratio to the
matching ceiling measured in the same run, so a slower runner does not read as
a regression of the kernel.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from harness.capability import cuda_available, device_info, require_cuda
from harness.reference.wan.config import TOKENS_480P, TOKENS_720P, WAN_14B, WAN_PRESETS, WanConfig

__all__ = [
    "SCHEMA",
    "Timing",
    "Ceiling",
    "Ceilings",
    "SpeedTarget",
    "SPEED_TARGET",
    "WanConfig",
    "WAN_CONFIGS",
    "VIDEO_TOKENS",
    "TEXT_TOKENS",
    "IMAGE_TOKENS",
    "LinearShape",
    "AttentionShape",
    "wan_linear_shapes",
    "wan_attention_shapes",
    "linear_flops",
    "attention_flops",
    "cuda_time",
    "host_time",
    "time_fn",
    "interleaved_time",
    "run_benchmark",
    "measure_ceilings",
    "env_info",
    "gpu_skip_reason",
    "l2_cache_bytes",
    "rotation_count",
    "rotate",
    "assert_not_all_zero",
    "bare_fp8_linear",
    "tensor_bytes",
    "random_tensor",
    "record",
]

#: Version tag of the ``extra_info`` written by :func:`record` (the dashboard checks it).
SCHEMA = "harness.bench/1"


# --------------------------------------------------------------------------- Wan shapes
#: The model sizes benchmarked, by name (the one ``WanConfig``, from ``harness.reference.wan.config``).
WAN_CONFIGS: Mapping[str, WanConfig] = WAN_PRESETS
#: Video tokens of 81 frames at 480x832 (grid 21x30x52) and at 720x1280 (21x45x80).
VIDEO_TOKENS: tuple[int, ...] = (TOKENS_480P, TOKENS_720P)
#: T5 text tokens (cross-attention context) and CLIP image tokens (I2V).
TEXT_TOKENS = WAN_14B.text_len
IMAGE_TOKENS = WAN_14B.image_tokens


@dataclass(frozen=True)
class LinearShape:
    """One projection GEMM: ``tokens`` rows times a ``in_features -> out_features`` weight."""

    model: str
    proj: str
    tokens: int
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        """Stable id shared by every implementation of this GEMM (fp8, bf16, legacy...)."""
        return f"wan{self.model}.{self.proj}.L{self.tokens}"

    @property
    def flops(self) -> int:
        return linear_flops(self.tokens, self.in_features, self.out_features)

    def as_dict(self) -> dict[str, Any]:
        return {"M": self.tokens, "K": self.in_features, "N": self.out_features, "model": self.model, "proj": self.proj}


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, q_tokens, kv_tokens, head_dim)."""

    model: str
    kind: str  # "self" | "cross_text" | "cross_image"
    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    head_dim: int = 128

    @property
    def key(self) -> str:
        return f"wan{self.model}.{self.kind}.H{self.heads}.Lq{self.q_tokens}.Lk{self.kv_tokens}"

    @property
    def flops(self) -> int:
        return attention_flops(self.batch, self.heads, self.q_tokens, self.kv_tokens, self.head_dim)

    def as_dict(self) -> dict[str, Any]:
        return {
            "B": self.batch,
            "H": self.heads,
            "Lq": self.q_tokens,
            "Lk": self.kv_tokens,
            "d": self.head_dim,
            "model": self.model,
            "kind": self.kind,
        }


def linear_flops(m: int, k: int, n: int) -> int:
    """Multiply-adds of an (m, k) @ (k, n) product, counted as 2 FLOP each."""
    return 2 * m * k * n


def attention_flops(b: int, h: int, lq: int, lk: int, d: int) -> int:
    """FLOP of softmax(QK^T)V without masking: two GEMMs of 2*lq*lk*d each, per head."""
    return 4 * b * h * lq * lk * d


def wan_linear_shapes(
    models: Iterable[str] = ("1.3B", "14B"), tokens: Iterable[int] = VIDEO_TOKENS
) -> list[LinearShape]:
    """The projection GEMMs of the Wan blocks at the given video token counts.

    q/k/v/o (and the cross-attention q) are the same C->C GEMM, so one ``qkvo``
    entry stands for all of them; ``ffn_up`` C->ffn and ``ffn_down`` ffn->C;
    ``cross_kv`` is the cross-attention k/v projection C->C over the 512 text
    tokens (independent of the video token count, listed once).
    """
    out: list[LinearShape] = []
    tokens = tuple(tokens)
    for name in models:
        if name not in WAN_CONFIGS:
            raise ValueError(f"unknown Wan model {name!r}; use one of {sorted(WAN_CONFIGS)}")
        cfg = WAN_CONFIGS[name]
        for L in tokens:
            if L < 1:
                raise ValueError(f"tokens must be >= 1, got {L}")
            out.append(LinearShape(name, "qkvo", L, cfg.dim, cfg.dim))
            out.append(LinearShape(name, "ffn_up", L, cfg.dim, cfg.ffn_dim))
            out.append(LinearShape(name, "ffn_down", L, cfg.ffn_dim, cfg.dim))
        out.append(LinearShape(name, "cross_kv", TEXT_TOKENS, cfg.dim, cfg.dim))
    return out


def wan_attention_shapes(
    models: Iterable[str] = ("1.3B", "14B"), tokens: int = VIDEO_TOKENS[0]
) -> list[AttentionShape]:
    """Self-attention over ``tokens`` video tokens and cross-attention from them over 512 text / 257 image tokens."""
    out: list[AttentionShape] = []
    for name in models:
        cfg = WAN_CONFIGS[name]
        out.append(AttentionShape(name, "self", 1, cfg.heads, tokens, tokens, cfg.head_dim))
        out.append(AttentionShape(name, "cross_text", 1, cfg.heads, tokens, TEXT_TOKENS, cfg.head_dim))
        out.append(AttentionShape(name, "cross_image", 1, cfg.heads, tokens, IMAGE_TOKENS, cfg.head_dim))
    return out


# --------------------------------------------------------------------------- speed target
@dataclass(frozen=True)
class SpeedTarget:
    """The issue-4 speed target for ``fp8_linear`` on Wan-14B projections (a bound with its why)."""

    min_speedup_vs_bf16: float
    max_overhead_vs_bare: float
    why: str


SPEED_TARGET = SpeedTarget(
    min_speedup_vs_bf16=1.5,
    max_overhead_vs_bare=0.05,
    why=(
        "raw FP8 GEMM is ~1.7x bf16 on H100/H200 at these shapes; one bandwidth-bound quantization pass "
        "over the activation (read bf16, write fp8) caps an honest fp8_linear near 1.56x, so 1.5x leaves "
        "room for noise but not for a second pass; versus a bare cast + _scaled_mm of the same input the "
        "layout checks and scale handling may cost at most 5%"
    ),
)


# --------------------------------------------------------------------------- timing
def _check_rounds(warmup: int, rounds: int) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}; pass a non-negative int (rounds thrown away before timing)")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}; pass an int >= 1 (timed rounds, the median is reported)")


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class Timing:
    """Per-round times in milliseconds of one measurement, warm-up excluded.

    ``sync_times_ms``: on CUDA under pytest-benchmark, the device time of each
    synchronous call (see the module docstring); empty otherwise.
    """

    times_ms: tuple[float, ...]
    timer: str  # "cuda_event" | "perf_counter"
    warmup: int
    sync_times_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.times_ms:
            raise ValueError("a Timing needs at least one round")

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        d = {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "rounds": len(self.times_ms),
            "warmup": self.warmup,
            "timer": self.timer,
        }
        if self.sync_times_ms:
            d["sync_call_median"] = statistics.median(self.sync_times_ms)
        return d


def cuda_time(fn: Callable[[], Any], *, warmup: int = 3, rounds: int = 20) -> list[float]:
    """Device time in ms of each of ``rounds`` calls of ``fn`` (CUDA events), after ``warmup`` calls.

    Calls are queued back to back on the current stream with an event pair
    around each; one synchronisation at the end.  Take the median of the result.
    """
    _check_rounds(warmup, rounds)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    ends[-1].synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def host_time(fn: Callable[[], Any], *, warmup: int = 1, rounds: int = 5) -> list[float]:
    """Wall time in ms of each of ``rounds`` calls of ``fn`` (``perf_counter``), after ``warmup`` calls (CPU work)."""
    _check_rounds(warmup, rounds)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int, rounds: int) -> Timing:
    """:func:`cuda_time` on a CUDA device, :func:`host_time` otherwise, as a :class:`Timing`."""
    if _is_cuda(device):
        return Timing(tuple(cuda_time(fn, warmup=warmup, rounds=rounds)), "cuda_event", warmup)
    return Timing(tuple(host_time(fn, warmup=warmup, rounds=rounds)), "perf_counter", warmup)


def interleaved_time(
    fns: Mapping[str, Callable[[], Any]], device: torch.device | str, *, warmup: int, rounds: int, blocks: int = 3
) -> dict[str, Timing]:
    """Time several callables in alternating blocks (A B C A B C ...) so clock or thermal drift hits all alike.

    Each callable gets ``warmup`` rounds first, then ``rounds`` timed rounds split over ``blocks`` blocks.
    Use it for ratios that a test asserts (speed targets, realignment overhead).
    """
    _check_rounds(warmup, rounds)
    if not fns:
        raise ValueError("interleaved_time needs at least one callable")
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks={blocks!r}; pass an int >= 1")
    per_block = [rounds // blocks + (1 if i < rounds % blocks else 0) for i in range(blocks)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        time_fn(fn, device, warmup=warmup, rounds=1)
    for n in per_block:
        if n == 0:
            continue
        for name, fn in fns.items():
            times[name].extend(time_fn(fn, device, warmup=0, rounds=n).times_ms)
    timer = "cuda_event" if _is_cuda(device) else "perf_counter"
    return {name: Timing(tuple(t), timer, warmup) for name, t in times.items()}


class _RoundRecorder:
    """The callable handed to ``benchmark.pedantic``: runs ``fn`` once and records its time.

    On CUDA it waits on its end event, so pytest-benchmark's host timer sees the device work too.
    """

    def __init__(self, fn: Callable[[], Any], cuda: bool) -> None:
        self.fn = fn
        self.cuda = cuda
        self.times: list[float] = []

    def __call__(self) -> Any:
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            out = self.fn()
            e.record()
            e.synchronize()
            self.times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            out = self.fn()
            self.times.append((time.perf_counter() - t0) * 1e3)
        return out


def run_benchmark(
    benchmark: Any, fn: Callable[[], Any], device: torch.device | str, *, warmup: int, rounds: int
) -> Timing:
    """Time ``fn`` under a pytest-benchmark fixture (``benchmark.pedantic``) and, on CUDA, back to back.

    Returns the back-to-back CUDA-event rounds (with the synchronous-call event
    times in ``sync_times_ms``) on CUDA, the pytest-benchmark rounds on the CPU.
    With benchmarks disabled (``--benchmark-disable``, the CPU CI default)
    pytest-benchmark calls ``fn`` exactly once and nothing else is timed; the
    returned :class:`Timing` then holds that single cold round and must not be
    used to judge speed.
    """
    _check_rounds(warmup, rounds)
    cuda = _is_cuda(device)
    if cuda:
        torch.cuda.synchronize()
    rec = _RoundRecorder(fn, cuda)
    benchmark.pedantic(rec, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if getattr(benchmark, "disabled", False):
        return Timing(tuple(rec.times), "cuda_event" if cuda else "perf_counter", 0)
    if not cuda:
        return Timing(tuple(rec.times[warmup:]), "perf_counter", warmup)
    steady = cuda_time(fn, warmup=1, rounds=rounds)
    return Timing(tuple(steady), "cuda_event", warmup, sync_times_ms=tuple(rec.times[warmup:]))


# --------------------------------------------------------------------------- inputs
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes spanned by the tensors' elements (numel x itemsize; views count their logical size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def l2_cache_bytes(device: torch.device | str) -> int:
    """The device's L2 size in bytes (``L2_cache_size``); 0 on the CPU, where inputs are not rotated."""
    if not _is_cuda(device):
        return 0
    return device_info(device).l2_bytes or 0


def rotation_count(bytes_per_set: int, device: torch.device | str, *, factor: float = 4.0, max_sets: int = 16) -> int:
    """How many distinct input sets to cycle through so one cycle spans ``factor`` x L2.

    1 when a single set already does (the big Wan shapes) or on the CPU.
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set={bytes_per_set}; pass the bytes one input set occupies (> 0)")
    if max_sets < 1:
        raise ValueError(f"max_sets={max_sets}; pass >= 1")
    l2 = l2_cache_bytes(device)
    return max(1, min(max_sets, math.ceil(factor * l2 / bytes_per_set))) if l2 else 1


def rotate(fn: Callable[..., Any], sets: Sequence[Sequence[Any]]) -> Callable[[], Any]:
    """A no-argument callable that calls ``fn(*sets[i])`` with i cycling through the sets."""
    if not sets:
        raise ValueError("rotate needs at least one input set")
    state = {"i": 0}

    def call() -> Any:
        args = sets[state["i"]]
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*args)

    return call


def bare_fp8_linear(
    x2d: torch.Tensor,
    w8: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The floor of any FP8 forward of a high-precision input: one cast, one ``_scaled_mm``.

    ``x2d``: (M, K) row-major, values already inside the E4M3 range (no scaling
    pass, no clamp, no layout checks); ``w8``: (N, K) row-major float8_e4m3fn;
    ``scale_a``/``scale_b``: float32 tensorwise scales.  What ``fp8_linear`` is
    measured against for the issue-4 "within 5%" target.
    """
    return torch._scaled_mm(x2d.to(torch.float8_e4m3fn), w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def bare_fp8_linear_dynamic(
    x2d: torch.Tensor, w8: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The floor of a dynamic-scale FP8 forward written the plain PyTorch way: ``amax(|x|) / 448`` as the scale,
    one division and cast, one ``_scaled_mm`` (no zero-amax guard, no overflow nudge, no layout checks).  What
    ``fp8_linear`` with a dynamic scale is measured against."""
    scale_a = (x2d.abs().amax().float() / 448.0).reshape(1)
    a8 = (x2d / scale_a).to(torch.float8_e4m3fn)
    return torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def cuda_graph_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after two warm-up calls on the capture stream); returns the replay.
    The graph holds its tensors' addresses: replaying it reruns ``fn`` on the very inputs it was captured on."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def assert_not_all_zero(tensors: Mapping[str, torch.Tensor]) -> None:
    """Fail (naming the tensor) if any timed input is all zeros — benchmarks never time on zeros."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.numel() == 0:
            raise AssertionError(f"benchmark input {name!r} is empty; time on real data")
        if t.element_size() == 1 and t.dtype.is_floating_point:
            bits = t.view(torch.uint8) if t.is_contiguous() else t.contiguous().view(torch.uint8)
            nonzero = int(torch.count_nonzero(bits & 0x7F))  # +0 and -0 are 0x00 / 0x80
        else:
            nonzero = int(torch.count_nonzero(t))
        if nonzero == 0:
            raise AssertionError(
                f"benchmark input {name!r} ({t.dtype}, shape {tuple(t.shape)}) is all zeros; "
                "zeros make GEMMs and copies look faster than on real data — fill it with random values"
            )


# --------------------------------------------------------------------------- environment
def env_info(device: torch.device | str) -> dict[str, Any]:
    """Device name, compute capability and library versions, for every result's ``extra_info``.

    The versions come from :func:`harness.env.collect_env` (torch, CUDA, cuDNN, cuBLAS, driver,
    Triton, SageAttention, flash-attn); the device fields describe ``device`` itself.
    """
    from harness.env import collect_env  # noqa: PLC0415

    dev = torch.device(device)
    env = collect_env(backends=False)
    keep = ("python", "torch", "cuda", "cudnn", "cublas", "driver", "triton", "sageattention", "flash_attn")
    info: dict[str, Any] = {k: env.get(k) for k in keep}
    d = device_info(dev)
    info["device_type"] = d.type
    info["device"] = d.name
    info["capability"] = d.capability_text
    if d.type == "cuda":
        info["l2_bytes"] = d.l2_bytes or 0
        info["memory_gib"] = round((d.memory_bytes or 0) / 2**30, 1)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def gpu_skip_reason(min_capability: tuple[int, int] | None = None, *, what: str = "this benchmark") -> str | None:
    """Why a GPU benchmark cannot run here (None when it can); probed now, never at import."""
    if not cuda_available():
        return "no CUDA device"
    return require_cuda(min_capability, what)


# --------------------------------------------------------------------------- ceilings
@dataclass(frozen=True)
class Ceiling:
    """A measured peak: ``value`` in ``unit`` (None with a ``reason`` when it cannot be measured here)."""

    name: str
    unit: str
    value: float | None
    how: str
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "value": self.value, "how": self.how, "reason": self.reason}


@dataclass(frozen=True)
class Ceilings:
    """The session's ceilings by name: ``bf16_matmul``, ``fp8_matmul`` (TFLOP/s), ``copy`` (GB/s)."""

    device: str
    items: Mapping[str, Ceiling] = field(default_factory=dict)

    def get(self, name: str) -> Ceiling:
        if name not in self.items:
            raise KeyError(f"no ceiling {name!r}; measured: {sorted(self.items)}")
        return self.items[name]

    def as_dict(self) -> dict[str, Any]:
        return {name: c.as_dict() for name, c in self.items.items()}


def random_tensor(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str, seed: int, *, std: float = 1.0
) -> torch.Tensor:
    """Seeded standard-normal data (times ``std``) generated *on* ``device`` (fast at Wan sizes).

    Benchmarks only: correctness tests use :class:`harness.values.ValueSpec`, whose CPU
    generation is bit-reproducible across machines but far too slow for 10^9 elements.
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, device=dev, dtype=torch.float32)
    if std != 1.0:
        x.mul_(std)
    return x.to(dtype)


def measure_ceilings(
    device: torch.device | str,
    *,
    gemm_n: int | None = None,
    copy_mib: int | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
) -> Ceilings:
    """Measure the bf16 matmul, FP8 ``_scaled_mm`` and copy ceilings of ``device`` (median of rounds).

    Defaults: on CUDA an 8192^3 GEMM (~1.1 TFLOP, random normal data) and a
    512 MiB copy (10x an H100/H200 L2), 3 warm-up and 10 timed rounds; on the
    CPU a 1024^3 GEMM and a 16 MiB copy, 1 and 3 rounds (a smoke-sized ceiling
    for the CPU trend, not a peak).  Copy bandwidth counts read + write bytes.
    The FP8 ceiling is None, with the reason, below compute capability 8.9.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = gemm_n or (8192 if cuda else 1024)
    mib = copy_mib or (512 if cuda else 16)
    warmup = (3 if cuda else 1) if warmup is None else warmup
    rounds = (10 if cuda else 3) if rounds is None else rounds
    flops = linear_flops(n, n, n)
    items: dict[str, Ceiling] = {}

    a = random_tensor((n, n), torch.bfloat16, dev, 1)
    b = random_tensor((n, n), torch.bfloat16, dev, 2)
    t = time_fn(functools.partial(torch.matmul, a, b), dev, warmup=warmup, rounds=rounds)
    items["bf16_matmul"] = Ceiling("bf16_matmul", "TFLOP/s", flops / (t.median * 1e-3) / 1e12, f"bf16 matmul {n}^3")

    how8 = f"fp8 e4m3 _scaled_mm {n}^3, tensorwise scales, bf16 out"
    from harness.quant.linear import MIN_CAPABILITY  # noqa: PLC0415

    reason = gpu_skip_reason(MIN_CAPABILITY, what="FP8 _scaled_mm") if cuda else None
    if reason is None:
        try:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn)  # (N, K) row-major; .t() is the column-major (K, N) operand
            one = torch.ones((), device=dev, dtype=torch.float32)
            fn = lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
            t8 = time_fn(fn, dev, warmup=warmup, rounds=rounds)
            items["fp8_matmul"] = Ceiling("fp8_matmul", "TFLOP/s", flops / (t8.median * 1e-3) / 1e12, how8)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a CPU build without _scaled_mm
            reason = f"_scaled_mm failed: {str(exc).splitlines()[0]}"
    if reason is not None:
        items["fp8_matmul"] = Ceiling("fp8_matmul", "TFLOP/s", None, how8, reason)
    del a, b

    numel = mib * 2**20 // 2
    src = random_tensor((numel,), torch.bfloat16, dev, 3)
    dst = torch.empty_like(src)
    tc = time_fn(lambda: dst.copy_(src), dev, warmup=warmup, rounds=rounds)
    items["copy"] = Ceiling(
        "copy", "GB/s", 2 * numel * 2 / (tc.median * 1e-3) / 1e9, f"copy_ of {mib} MiB (read + write counted)"
    )
    name = device_info(dev).name
    return Ceilings(device=name, items=items)


# --------------------------------------------------------------------------- result record
def record(
    benchmark: Any,
    timing: Timing,
    *,
    op: str,
    family: str,
    shape_key: str,
    shape: Mapping[str, Any],
    ceilings: Ceilings,
    ceiling: str,
    env: Mapping[str, Any],
    flops: int | None = None,
    nbytes: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Fill ``benchmark.extra_info`` with the timing, throughput and ratio to the named ceiling.

    Pass ``flops`` for compute-bound work (throughput in TFLOP/s) or ``nbytes``
    (the bytes the step must move at least) for memory-bound work (GB/s); the
    ceiling's unit must match.  ``op`` names the implementation, ``shape_key``
    the computation (shared by fp8 and bf16 runs of one GEMM, which is how the
    dashboard pairs them for the speed-up).  Returns the dict it wrote.
    """
    if (flops is None) == (nbytes is None):
        raise ValueError("pass exactly one of flops= (compute-bound) or nbytes= (memory-bound)")
    seconds = timing.median * 1e-3
    if flops is not None:
        value, unit = flops / seconds / 1e12, "TFLOP/s"
    else:
        value, unit = nbytes / seconds / 1e9, "GB/s"
    ceil = ceilings.get(ceiling)
    if ceil.unit != unit:
        raise ValueError(f"ceiling {ceiling!r} is in {ceil.unit} but this result is in {unit}; pick a matching ceiling")
    info: dict[str, Any] = {
        "schema": SCHEMA,
        "op": op,
        "family": family,
        "shape_key": shape_key,
        "shape": dict(shape),
        "device_ms": timing.as_dict(),
        "flops": flops,
        "bytes": nbytes,
        "throughput": {"value": value, "unit": unit},
        "ceiling": ceil.as_dict(),
        "ceiling_ratio": (value / ceil.value) if ceil.value else None,
        "ceilings": ceilings.as_dict(),
        "env": dict(env),
    }
    info.update(extra)
    benchmark.extra_info.update(info)
    return info
