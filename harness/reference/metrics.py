"""Error metrics, derived bounds and the one verdict function every test uses.

Metrics compare an output ``out`` against a reference ``ref`` of the same shape and are
computed in float64 (in chunks, so huge attention outputs do not need a float64 copy).
Bounds are never typed in: a ``Bound`` is ``k * reference_error + floor`` where the
reference error comes from an emulation of the quantization format or a same-precision
naive run, and the floor is derived from the output dtype (``rounding_floor``) or from a
summation error analysis (``summation_bound``). ``judge`` applies a bound and returns a
``Judgement`` whose ``str`` carries every number a failure report needs.

Error-like metric names accepted by ``Bound``: "max_abs", "mean_abs", "rmse", "rel_l1",
"cos_dist" (1 - cosine similarity).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from harness.reference.formats import FORMATS

__all__ = [
    "ERROR_METRICS",
    "rel_l1",
    "rmse",
    "cosine",
    "sqnr_db",
    "max_abs",
    "mean_abs",
    "ulp",
    "ulp_distance",
    "rounding_floor",
    "summation_bound",
    "fp8_tensor_core_bound",
    "scaled_mm_kernel_bound",
    "TENSOR_CORE_FP8_ACCUM_BITS",
    "ErrorReport",
    "error_report",
    "Bound",
    "BoundCheck",
    "Judgement",
    "judge",
]

ERROR_METRICS = ("max_abs", "mean_abs", "rmse", "rel_l1", "cos_dist")

_CHUNK = 1 << 22  # elements per float64 chunk (32 MiB)
#: at most this many elements in all, tensors on a GPU are judged on host copies: a copy each instead of ~30
#: tiny kernels and a sync, on a GPU whose pool workers' kernels serialise (measured on an H200: 1 to 8 workers on
#: one GPU all gave ~400 small cases/s); the host's cores do run side by side
HOST_JUDGE_ELEMENTS = 1 << 15


def on_host_if_small(*ts: Tensor) -> tuple[Tensor, ...]:
    """``ts`` unchanged, or host copies of them when any is on a device and together they hold at most
    ``HOST_JUDGE_ELEMENTS`` elements (the originals are never touched)."""
    if all(t.device.type == "cpu" for t in ts) or sum(t.numel() for t in ts) > HOST_JUDGE_ELEMENTS:
        return ts
    return tuple(t.detach().cpu() for t in ts)


DTypeLike = Union[torch.dtype, str]


def _check_pair(out: Tensor, ref: Tensor) -> None:
    for t, n in ((out, "out"), (ref, "ref")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if out.shape != ref.shape:
        raise ValueError(
            f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}; "
            "compare tensors of the same logical shape (convert layouts first)"
        )


def _flat_chunks(out: Tensor, ref: Tensor):
    o, r = on_host_if_small(out.detach().reshape(-1), ref.detach().reshape(-1))
    if r.device != o.device:
        r = r.to(o.device)
    for i in range(0, o.numel(), _CHUNK):
        yield o[i : i + _CHUNK].to(torch.float64), r[i : i + _CHUNK].to(torch.float64)


def _sums(out: Tensor, ref: Tensor, finite_only: bool) -> dict[str, float]:
    """One chunked pass: the sums every metric is made of."""
    s = dict(
        n=0,
        abs_d=0.0,
        sq_d=0.0,
        abs_r=0.0,
        sq_r=0.0,
        sq_o=0.0,
        dot=0.0,
        max_d=0.0,
        nonfinite_out=0,
        nonfinite_ref=0,
        nonfinite_mismatch=0,
    )
    f64 = torch.float64
    for o, r in _flat_chunks(out, ref):
        fo, fr = torch.isfinite(o), torch.isfinite(r)
        # positions where exactly one side is finite, or both are non-finite but differ
        # (NaN vs inf, +inf vs -inf)
        both_nf = ~fo & ~fr
        differ = both_nf & ~((o == r) | (torch.isnan(o) & torch.isnan(r)))
        if finite_only:  # zeros where either side is non-finite: they add nothing to any sum or to the max
            m = fo & fr
            o, r = torch.where(m, o, 0.0), torch.where(m, r, 0.0)
            n = m.sum()
        else:
            n = torch.full((), o.numel(), dtype=torch.int64, device=o.device)  # a fill, not a host-to-device copy
        d = o - r
        ad = d.abs()
        # every sum of the chunk in one tensor: one device-to-host copy (one sync on CUDA) instead of eleven
        vals = torch.stack(
            [
                (~fo).sum().to(f64),
                (~fr).sum().to(f64),
                ((fo ^ fr).sum() + differ.sum()).to(f64),
                n.to(f64),
                ad.sum(),
                (d * d).sum(),
                r.abs().sum(),
                (r * r).sum(),
                (o * o).sum(),
                (o * r).sum(),
                ad.max() if ad.numel() else torch.zeros((), dtype=f64, device=ad.device),
            ]
        ).tolist()
        nf_o, nf_r, nf_mis, n_kept, abs_d, sq_d, abs_r, sq_r, sq_o, dot, md = vals
        s["nonfinite_out"] += int(nf_o)
        s["nonfinite_ref"] += int(nf_r)
        s["nonfinite_mismatch"] += int(nf_mis)
        s["n"] += int(n_kept)
        if n_kept:
            s["abs_d"] += abs_d
            s["sq_d"] += sq_d
            s["abs_r"] += abs_r
            s["sq_r"] += sq_r
            s["sq_o"] += sq_o
            s["dot"] += dot
            s["max_d"] = md if math.isnan(md) else max(s["max_d"], md)
    return s


def _rel_l1(s: dict) -> float:
    if s["abs_r"] == 0:
        return 0.0 if s["abs_d"] == 0 else math.inf
    return s["abs_d"] / s["abs_r"]


def _rmse(s: dict) -> float:
    return math.sqrt(s["sq_d"] / s["n"]) if s["n"] else 0.0


def _cosine(s: dict) -> float:
    no, nr = math.sqrt(s["sq_o"]), math.sqrt(s["sq_r"])
    if no == 0 and nr == 0:
        return 1.0
    if no == 0 or nr == 0:
        return 0.0
    return max(-1.0, min(1.0, s["dot"] / (no * nr)))


def _sqnr(s: dict) -> float:
    nr, nd = math.sqrt(s["sq_r"]), math.sqrt(s["sq_d"])
    if nd == 0:
        return math.inf
    if nr == 0:
        return -math.inf
    return 20.0 * math.log10(nr / nd)


def rel_l1(out: Tensor, ref: Tensor) -> float:
    """Relative L1 error ``sum|o - r| / sum|r|`` (0 if both are 0, inf if only ``ref`` is)."""
    _check_pair(out, ref)
    return _rel_l1(_sums(out, ref, False))


def rmse(out: Tensor, ref: Tensor) -> float:
    """Root-mean-square error ``sqrt(mean((o - r)^2))``."""
    _check_pair(out, ref)
    return _rmse(_sums(out, ref, False))


def cosine(out: Tensor, ref: Tensor) -> float:
    """Cosine similarity of the flattened tensors (1 if both are all-zero, 0 if one is)."""
    _check_pair(out, ref)
    return _cosine(_sums(out, ref, False))


def sqnr_db(out: Tensor, ref: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||r|| / ||o - r||)`` in dB; +inf when equal."""
    _check_pair(out, ref)
    return _sqnr(_sums(out, ref, False))


def max_abs(out: Tensor, ref: Tensor) -> float:
    """Largest absolute elementwise difference (NaN if any difference is NaN)."""
    _check_pair(out, ref)
    return _sums(out, ref, False)["max_d"]


def mean_abs(out: Tensor, ref: Tensor) -> float:
    """Mean absolute elementwise difference."""
    _check_pair(out, ref)
    s = _sums(out, ref, False)
    return s["abs_d"] / s["n"] if s["n"] else 0.0


# ---------------------------------------------------------------------------
# ULPs and derived floors

# (mantissa bits, exponent of the smallest normal) for the dtypes outputs come in.
_FLOAT_PARAMS: dict[str, tuple[int, int]] = {
    "float64": (52, -1022),
    "float32": (23, -126),
    "bfloat16": (7, -126),
    "float16": (10, -14),
    **{name: (f.man_bits, f.emin) for name, f in FORMATS.items()},
    **{f.torch_dtype_name: (f.man_bits, f.emin) for f in FORMATS.values() if f.torch_dtype_name},
}


def _dtype_name(dtype: DTypeLike) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in _FLOAT_PARAMS:
        raise ValueError(f"no ULP model for dtype {dtype!r}; use one of {sorted(_FLOAT_PARAMS)}")
    return name


def ulp(x: Tensor, dtype: DTypeLike) -> Tensor:
    """Spacing of ``dtype`` at ``|x|``: ``2**(max(floor(log2|x|), emin) - mantissa_bits)``, float64.

    This is the gap to the next value away from zero; round-to-nearest errs by at most half of it.
    """
    man, emin = _FLOAT_PARAMS[_dtype_name(dtype)]
    a = x.detach().to(torch.float64).abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    _, e2 = torch.frexp(a)
    e = torch.clamp(e2 - 1, min=emin)
    return torch.ldexp(torch.ones_like(a), e - man)


def ulp_distance(a: Tensor, b: Tensor, dtype: DTypeLike) -> Tensor:
    """Elementwise number of ``dtype`` steps between ``a`` and ``b`` after rounding both to ``dtype``.

    Counts representable values via the ordered bit patterns (so crossing zero and binade
    boundaries counts correctly; +0 and -0 are 0 apart). int64; -1 where either is NaN.
    FP8 names round with ``harness.reference.formats`` (saturating), others with torch casts.
    """
    _check_pair(a, b)
    name = _dtype_name(dtype)
    fmt = {"float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}.get(name, name)
    if fmt in ("e4m3", "e5m2", "e2m1"):
        from harness.reference.formats import representable_values, round_to_format

        table = representable_values(fmt, dtype=torch.float64)
        zero = int((table < 0).sum())

        def ordered(t: Tensor) -> Tensor:
            r = round_to_format(t.detach().to(torch.float64), fmt)
            idx = torch.searchsorted(table, torch.where(torch.isnan(r), torch.zeros_like(r), r))
            return idx - zero
    else:
        tdt = getattr(torch, name)
        width = tdt.itemsize * 8
        idt = {64: torch.int64, 32: torch.int32, 16: torch.int16}[width]

        def ordered(t: Tensor) -> Tensor:
            bits = t.detach().to(tdt).contiguous().view(idt).to(torch.int64)
            if width < 64:
                bits = bits & ((1 << width) - 1)
                sign = (bits >> (width - 1)) & 1
                mag = bits & ((1 << (width - 1)) - 1)
            else:
                sign = (bits < 0).to(torch.int64)
                mag = bits & 0x7FFFFFFFFFFFFFFF
            return torch.where(sign.bool(), -mag, mag)

    oa, ob = ordered(a), ordered(b)
    b_dev = ob.to(oa.device)
    dist = (oa - b_dev).abs()
    nan = torch.isnan(a.detach()).to(oa.device) | torch.isnan(b.detach()).to(oa.device)
    return torch.where(nan, torch.full_like(dist, -1), dist)


def _half_ulps(x: Tensor, dtype: DTypeLike) -> Tensor:
    """The most a cast of float64 ``x`` to ``dtype`` moves each element: half a ULP, plus half a float32 ULP
    when ``dtype`` is narrower than float32 (the cast goes through float32, so it can round twice)."""
    h = 0.5 * ulp(x, dtype)
    if _FLOAT_PARAMS[_dtype_name(dtype)][0] < _FLOAT_PARAMS["float32"][0]:
        h = h + 0.5 * ulp(x, torch.float32)
    return h


def rounding_floor(ref: Tensor, dtype: DTypeLike, metric: str = "max_abs") -> float:
    """Error that merely rounding the exact ``ref`` to ``dtype`` may cause, in ``metric`` units.

    "max_abs": half an ULP at ``max|ref|``; "mean_abs": mean of half-ULPs; "rmse": RMS of
    half-ULPs; "rel_l1": sum of half-ULPs / sum|ref|; "cos_dist": ``u**2/2`` with ``u`` the
    unit roundoff (a relative perturbation <= u changes the cosine by <= u**2/2), plus the
    float64 evaluation noise of the cosine.

    For a ``dtype`` narrower than float32 each half-ULP also counts half a float32 ULP: torch casts
    float64 to such dtypes through float32 (``32 + 2**-6 + 2**-30`` becomes 32 in float16, an error
    just over half a float16 ULP), and a kernel accumulating in float32 rounds twice the same way.
    """
    if metric not in ERROR_METRICS:
        raise ValueError(f"metric={metric!r}; use one of {ERROR_METRICS}")
    man, _ = _FLOAT_PARAMS[_dtype_name(dtype)]
    r = ref.detach()
    if metric == "cos_dist":
        # rounding each element perturbs it by a relative eps <= u, which moves the cosine by
        # at most u**2/2; add the float64 evaluation noise of the cosine itself (tree sums).
        u = 2.0 ** -(man + 1)
        evaluation = 4 * math.log2(max(r.numel(), 2)) * 2.0**-53
        return u * u / 2 + evaluation
    if metric == "max_abs":
        finite = r[torch.isfinite(r)] if r.numel() else r
        if finite.numel() == 0:
            return 0.0
        amax = finite.abs().max().to(torch.float64).reshape(1)
        return float(_half_ulps(amax, dtype)[0])
    tot = 0.0
    tot_sq = 0.0
    tot_r = 0.0
    n = 0
    flat = r.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        c = flat[i : i + _CHUNK].to(torch.float64)
        c = c[torch.isfinite(c)]
        h = _half_ulps(c, dtype)
        tot += float(h.sum())
        tot_sq += float((h * h).sum())
        tot_r += float(c.abs().sum())
        n += c.numel()
    if n == 0:
        return 0.0
    if metric == "mean_abs":
        return tot / n
    if metric == "rmse":
        return math.sqrt(tot_sq / n)
    return tot / tot_r if tot_r > 0 else 0.0


def summation_bound(abs_sum: Union[Tensor, float], n: int, dtype: DTypeLike = torch.float32) -> Union[Tensor, float]:
    """Worst-case error of summing ``n`` terms in ``dtype`` in any order: ``gamma_n * sum|terms|``.

    ``gamma_n = n*u / (1 - n*u)`` with ``u`` the unit roundoff (Higham, Accuracy and Stability
    of Numerical Algorithms, 2nd ed., section 3.1). ``abs_sum`` is ``sum|terms|`` (e.g.
    ``|A| @ |B|`` for a matmul); raises if ``n*u >= 1`` (the bound is vacuous).
    """
    man, _ = _FLOAT_PARAMS[_dtype_name(dtype)]
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return abs_sum * _gamma(n, 2.0 ** -(man + 1), f"n={n} terms in {dtype}", "; sum in a wider dtype")


def _gamma(n: int, u: float, what: str, hint: str = "") -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``; ``n u >= 1`` gives no useful bound (an error naming ``what``)."""
    nu = n * u
    if nu >= 1:
        raise ValueError(f"{what}: n*u={nu:.3g} >= 1, no useful bound{hint}")
    return nu / (1 - nu)


#: Mantissa bits the FP8 tensor-core accumulator keeps on Hopper (sm90): DeepSeek-V3 technical
#: report, section 3.3.2, "limited to retaining around 14 bits"; cuBLASLt (without fast
#: accumulation) promotes the partial sums to float32 every 4 WGMMAs, i.e. every 128 products.
TENSOR_CORE_FP8_ACCUM_BITS = 14
TENSOR_CORE_FP8_PROMOTE_INTERVAL = 128


def fp8_tensor_core_bound(
    abs_sum: Union[Tensor, float],
    k: int,
    *,
    accum_bits: int = TENSOR_CORE_FP8_ACCUM_BITS,
    promote_interval: int = TENSOR_CORE_FP8_PROMOTE_INTERVAL,
) -> Union[Tensor, float]:
    """Worst-case accumulation error of a K-long FP8 dot product on Hopper tensor cores.

    Within each run of ``promote_interval`` products the accumulator keeps ``accum_bits``
    mantissa bits (unit roundoff ``2**-accum_bits``); the runs are summed in float32.  So the
    error is at most ``(gamma_m(2**-accum_bits) + gamma_(ceil(K/m)+1)(2**-24)) * sum|a*b|`` with
    ``m = min(K, promote_interval)`` (Higham's gamma, as :func:`summation_bound`).  A float32
    emulation of the same products (``harness.reference.formats.scaled_mm``) is within
    ``summation_bound(.., K, float32)`` of exact, so a kernel/emulation comparison adds both.
    """
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    m = max(1, min(k, promote_interval))
    g_acc = _gamma(m, 2.0**-accum_bits, f"promote_interval {m} x 2**-{accum_bits}")
    runs = -(-k // m) + 1
    return abs_sum * (g_acc + _gamma(runs, 2.0**-24, f"{runs} float32 partial sums"))


def scaled_mm_kernel_bound(
    a: Tensor, b: Tensor, emulated: Tensor, out_dtype: DTypeLike, *, tensor_core: bool = False
) -> Tensor:
    """Per element, how far a ``_scaled_mm`` kernel may sit from its float32 emulation on the same operands.

    ``a`` (M, K), ``b`` (K, N): the dequantized operands (scales applied, float64). The emulation sums
    the K exact products and two scale multiplies in float32, within ``gamma_(K+2) |A||B|`` of exact.
    A float32-accumulating kernel is within as much, so twice that apart; with ``tensor_core`` the
    kernel's side is :func:`fp8_tensor_core_bound` instead (Hopper).  Both round once to
    ``out_dtype``: one ULP of ``emulated`` more.
    """
    abs_sum = a.abs() @ b.abs()
    k = a.shape[1]
    emulation = summation_bound(abs_sum, k + 2, torch.float32)
    kernel = fp8_tensor_core_bound(abs_sum, k) if tensor_core else emulation
    return emulation + kernel + ulp(emulated.reshape(abs_sum.shape), out_dtype)


# ---------------------------------------------------------------------------
# Reports, bounds, verdicts


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class ErrorReport:
    """All metrics of ``out`` vs ``ref``, computed over elements finite in both.

    ``nonfinite_out`` / ``nonfinite_ref`` count NaN/inf elements of each;
    ``nonfinite_mismatch`` counts positions where they disagree (one finite and the other not,
    or NaN vs inf, or opposite infinities) -- a failure regardless of the metrics.
    """

    max_abs: float
    mean_abs: float
    rmse: float
    rel_l1: float
    cosine: float
    sqnr_db: float
    numel: int
    nonfinite_out: int
    nonfinite_ref: int
    nonfinite_mismatch: int = 0
    shape: tuple[int, ...] = field(default=())

    @property
    def cos_dist(self) -> float:
        return 1.0 - self.cosine

    def metric(self, name: str) -> float:
        """An error-like metric by name (see ``ERROR_METRICS``)."""
        if name not in ERROR_METRICS:
            raise ValueError(f"metric={name!r}; use one of {ERROR_METRICS}")
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (non-finite floats as "inf"/"-inf"/"nan")."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return _jsonable(d)

    def __str__(self) -> str:
        s = (
            f"max_abs={self.max_abs:.4g} mean_abs={self.mean_abs:.4g} rmse={self.rmse:.4g} "
            f"rel_l1={self.rel_l1:.4g} cos={self.cosine:.6f} sqnr={self.sqnr_db:.2f}dB "
            f"n={self.numel}"
        )
        if self.nonfinite_out or self.nonfinite_ref:
            s += f" nonfinite(out={self.nonfinite_out}, ref={self.nonfinite_ref}, mismatched={self.nonfinite_mismatch})"
        return s


def error_report(out: Tensor, ref: Tensor) -> ErrorReport:
    """Compute an ``ErrorReport`` of ``out`` against ``ref`` in one chunked float64 pass."""
    _check_pair(out, ref)
    s = _sums(out, ref, True)
    return ErrorReport(
        max_abs=s["max_d"],
        mean_abs=(s["abs_d"] / s["n"] if s["n"] else 0.0),
        rmse=_rmse(s),
        rel_l1=_rel_l1(s),
        cosine=_cosine(s),
        sqnr_db=_sqnr(s),
        numel=out.numel(),
        nonfinite_out=s["nonfinite_out"],
        nonfinite_ref=s["nonfinite_ref"],
        nonfinite_mismatch=s["nonfinite_mismatch"],
        shape=tuple(out.shape),
    )


@dataclass(frozen=True)
class BoundCheck:
    """Outcome of ``Bound.check``: ``err`` against ``allowed``; ``ratio = err / allowed``."""

    passed: bool
    err: float
    allowed: float
    ratio: float
    why: str
    metric: str = "max_abs"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "EXCEEDED"
        return f"{self.metric}={self.err:.4g} allowed={self.allowed:.4g} ratio={self.ratio:.3g} {verdict} ({self.why})"


@dataclass(frozen=True)
class Bound:
    """Allowed error ``k * ref_err + floor`` in ``metric`` units, with the reason it is what it is.

    ``ref_err`` is the error of an emulation (or a same-precision naive run) against the exact
    reference; ``floor`` covers rounding the exact result to the output dtype. Construct the
    floor with ``rounding_floor``/``summation_bound``, never as a literal.
    """

    k: float
    floor: float
    why: str
    metric: str = "max_abs"

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float)) and math.isfinite(self.k) and self.k >= 0):
            raise ValueError(f"Bound.k={self.k!r} must be a finite number >= 0")
        if not (isinstance(self.floor, (int, float)) and math.isfinite(self.floor) and self.floor >= 0):
            raise ValueError(f"Bound.floor={self.floor!r} must be a finite number >= 0")
        if not isinstance(self.why, str) or not self.why.strip():
            raise ValueError("Bound.why must say where the bound comes from (non-empty string)")
        if self.metric not in ERROR_METRICS:
            raise ValueError(f"Bound.metric={self.metric!r}; use one of {ERROR_METRICS}")

    def limit(self, ref_err: Optional[float]) -> float:
        """``k * ref_err + floor``; ``ref_err=None`` (no emulated run) gives the floor alone."""
        if ref_err is None:
            return float(self.floor)
        if math.isnan(ref_err):
            raise ValueError("ref_err is NaN: the emulated/naive reference itself is broken")
        return float(self.k * ref_err + self.floor)

    def check(self, err: float, ref_err: Optional[float]) -> BoundCheck:
        """Is ``err <= limit(ref_err)``? NaN/inf errors never pass."""
        allowed = self.limit(ref_err)
        err = float(err)
        if allowed > 0:
            ratio = err / allowed
        else:
            ratio = 0.0 if err == 0 else math.inf
        passed = math.isfinite(err) and err <= allowed
        return BoundCheck(passed=passed, err=err, allowed=allowed, ratio=ratio, why=self.why, metric=self.metric)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def exact(cls, why: str = "bitwise equality expected") -> "Bound":
        """A bound that admits no error at all."""
        return cls(k=0.0, floor=0.0, why=why)

    @classmethod
    def derived(cls, k: float, ref: Tensor, out_dtype: DTypeLike, why: str, metric: str = "max_abs") -> "Bound":
        """``k * ref_err`` plus the rounding floor of ``ref`` in ``out_dtype`` for ``metric``."""
        floor = rounding_floor(ref, out_dtype, metric)
        return cls(
            k=k,
            floor=floor,
            metric=metric,
            why=f"{why}; floor = {metric} of rounding to {_dtype_name(out_dtype)} ({floor:.3g})",
        )


@dataclass(frozen=True)
class Judgement:
    """Verdict of ``judge``: passed or not, the numbers behind it, and a one-line reason."""

    passed: bool
    reason: str
    check: BoundCheck
    report: ErrorReport
    ref_report: Optional[ErrorReport]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "check": self.check.to_dict(),
            "report": self.report.to_dict(),
            "ref_report": None if self.ref_report is None else self.ref_report.to_dict(),
        }

    def __str__(self) -> str:
        lines = [
            f"{'PASS' if self.passed else 'FAIL'}: {self.reason}",
            f"  bound : {self.check}",
            f"  out   : {self.report}",
        ]
        if self.ref_report is not None:
            lines.append(f"  refrun: {self.ref_report}")
        return "\n".join(lines)


def judge(out: Tensor, exact: Tensor, emulated_or_naive: Optional[Tensor], bound: Bound) -> Judgement:
    """Judge a kernel output against the exact reference under ``bound``.

    ``exact``: the high-precision reference on the same (already quantized) inputs.
    ``emulated_or_naive``: the emulated quantization scheme or same-precision naive run whose
    own error against ``exact`` scales the bound (None: the floor alone). Fails where the
    output's NaN/inf pattern differs from the reference's, when the emulated/naive run itself
    is non-finite where ``exact`` is not (it cannot vouch for a bound then), on NaN metrics, or when the ``bound.metric`` error exceeds the limit.
    """
    rep = error_report(out, exact)
    ref_rep = error_report(emulated_or_naive, exact) if emulated_or_naive is not None else None
    ref_err = ref_rep.metric(bound.metric) if ref_rep is not None else None
    if ref_rep is not None and (ref_rep.nonfinite_mismatch or math.isnan(ref_err)):
        # a broken reference run must not widen the bound: judge on the floor alone and fail
        chk = bound.check(rep.metric(bound.metric), None)
        return Judgement(
            False,
            "the emulated/naive reference run is broken against exact "
            f"({ref_rep.nonfinite_mismatch} non-finite mismatches, {bound.metric}="
            f"{ref_err}); fix the reference before judging",
            chk,
            rep,
            ref_rep,
        )
    chk = bound.check(rep.metric(bound.metric), ref_err)
    if rep.nonfinite_mismatch:
        return Judgement(
            False,
            f"{rep.nonfinite_mismatch} position(s) where the output's "
            "finiteness differs from the reference's (NaN/inf)",
            chk,
            rep,
            ref_rep,
        )
    if chk.passed:
        reason = f"{bound.metric} {chk.err:.4g} <= {chk.allowed:.4g}"
    else:
        reason = f"{bound.metric} {chk.err:.4g} > allowed {chk.allowed:.4g} (x{chk.ratio:.3g})"
    return Judgement(chk.passed, reason, chk, rep, ref_rep)
