"""Value distributions that stress quantized kernels, generated deterministically from a seed.

A :class:`ValueSpec` is a small JSON-serializable recipe (kind, seed, params);
:meth:`ValueSpec.generate` turns it into a contiguous tensor.  Generation runs
on the CPU in float32 with its own ``torch.Generator`` so the same spec gives
the same values on every machine, then converts and moves the result.

Kinds (the last dimension is the channel / reduction dimension):

- ``normal``: standard normal times ``std`` (default 1).
- ``outliers``: standard normal with ``n_channels`` channels scaled by factors
  in ``[lo, hi]`` (default 100–1000), as in real diffusion-transformer activations.
- ``zero_blocks``: standard normal with all-zero rows and an all-zero block of
  ``block`` rows (default 128, at most half the rows) — amax = 0 for those scale groups.
- ``constant_rows``: standard normal with some rows set to one constant.
- ``fp8_edge``: magnitudes near and beyond the E4M3 limit 448: exact 448, the
  rounding boundary 464, 480 (where torch 2.11's cast turns to NaN), 1e4;
  ``beyond=False`` keeps everything within ±448.
- ``subnormal``: FP8 E4M3 subnormals (multiples of 2^-9 below 2^-6) mixed with
  the target dtype's own subnormals and zeros.
- ``nonfinite``: standard normal with +inf, -inf and NaN sprinkled in (only when a test asks).

Structured kinds (:data:`STRUCTURED_KINDS`): standard normal except along one axis of the
tensor, where the slice ``[start, start + length)`` of logical dim ``dim`` (a token, a channel,
a head, a batch entry, or a 64/128-token block; ``start`` is taken modulo the dim's size and the
slice is cut at its end) is

- ``zero_slice``: all zero (amax = 0 for every scale group that slice is: what per-channel and
  per-block quantizers divide by);
- ``constant_slice``: one constant ``value`` (default 1.5: amax = |value|, zero variance);
- ``outlier_slice``: multiplied by ``factor`` (default 1000).

``constant`` fills the whole tensor with ``value`` (default 1.0): a scale operand passed as a
tensor keeps the value its target chose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["KINDS", "FINITE_KINDS", "STRUCTURED_KINDS", "ValueSpec", "ValueError_"]

FINITE_KINDS = ("normal", "outliers", "zero_blocks", "constant_rows", "fp8_edge", "subnormal")
#: finite kinds whose special values sit along one axis (``*_slice``), or everywhere (``constant``)
STRUCTURED_KINDS = ("zero_slice", "constant_slice", "outlier_slice", "constant")
KINDS = FINITE_KINDS + STRUCTURED_KINDS + ("nonfinite",)

_PARAMS: dict[str, dict[str, Any]] = {
    "normal": {"std": 1.0},
    "outliers": {"n_channels": 2, "lo": 100.0, "hi": 1000.0},
    "zero_blocks": {"zero_rows": 2, "block": 128},
    "constant_rows": {"rows": 2, "value": 1.5},
    "fp8_edge": {"beyond": True},
    "subnormal": {},
    "nonfinite": {"fraction": 0.01},
    "zero_slice": {"dim": 0, "start": 0, "length": 1},
    "constant_slice": {"dim": 0, "start": 0, "length": 1, "value": 1.5},
    "outlier_slice": {"dim": 0, "start": 0, "length": 1, "factor": 1000.0},
    "constant": {"value": 1.0},
}


class ValueError_(ValueError):
    """A value recipe is malformed; the message names the field."""


@dataclass(frozen=True)
class ValueSpec:
    """A deterministic value recipe: ``kind`` (see module doc), ``seed``, optional ``params``."""

    kind: str = "normal"
    seed: int = 0
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError_(f"value kind {self.kind!r} unknown; use one of {KINDS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError_(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        params = dict(self.params) if not isinstance(self.params, dict) else self.params
        unknown = set(params) - set(_PARAMS[self.kind])
        if unknown:
            raise ValueError_(
                f"params {sorted(unknown)} unknown for kind {self.kind!r}; allowed: {sorted(_PARAMS[self.kind])}"
            )
        object.__setattr__(self, "params", tuple(sorted(params.items())))

    def param(self, name: str) -> Any:
        return dict(self.params).get(name, _PARAMS[self.kind][name])

    # -------------------------------------------------------------- generation
    def generate(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape``; identical for identical (spec, shape) on any machine.

        FP8 target dtypes are produced by clamping to the format's range first
        when the kind is finite and ``beyond`` is off; with ``fp8_edge`` and
        ``beyond=True`` the float32 values are returned unclamped only for
        non-FP8 dtypes (an FP8 cast of an out-of-range value differs by torch
        version, so out-of-range FP8 values are never produced here).
        """
        shape = tuple(int(s) for s in shape)
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        rows = x.view(-1, shape[-1]) if shape and x.numel() else None
        k = self.kind
        if k == "normal":
            x.mul_(float(self.param("std")))
        elif k == "outliers" and rows is not None:
            n = min(int(self.param("n_channels")), shape[-1])
            chans = torch.randperm(shape[-1], generator=g)[:n]
            lo, hi = float(self.param("lo")), float(self.param("hi"))
            factors = lo + (hi - lo) * torch.rand(n, generator=g)
            rows[:, chans] *= factors
        elif k == "zero_blocks" and rows is not None:
            nrows = rows.shape[0]
            zr = torch.randperm(nrows, generator=g)[: min(int(self.param("zero_rows")), nrows)]
            rows[zr] = 0
            block = min(int(self.param("block")), max(1, nrows // 2))
            start = int(torch.randint(0, nrows - block + 1, (1,), generator=g))
            rows[start : start + block] = 0
        elif k == "constant_rows" and rows is not None:
            nrows = rows.shape[0]
            cr = torch.randperm(nrows, generator=g)[: min(int(self.param("rows")), nrows)]
            rows[cr] = float(self.param("value"))
        elif k == "fp8_edge":
            beyond = bool(self.param("beyond"))
            edges = torch.tensor([448.0, 464.0, 480.0, 1e4] if beyond else [448.0, 440.0, 416.0, 384.0])
            pick = torch.randint(0, len(edges), shape, generator=g)
            mag = edges[pick] * (1 + 0.01 * torch.rand(shape, generator=g) * (0 if not beyond else 1))
            sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            mask = torch.rand(shape, generator=g) < 0.25
            x = torch.where(mask, sign * mag, x * 64)
            if not beyond:
                x = x.clamp(-448.0, 448.0)
        elif k == "subnormal":
            fp8_sub = torch.randint(-7, 8, shape, generator=g).float() * 2.0**-9
            tiny = torch.finfo(dtype).tiny if dtype.is_floating_point and dtype.itemsize > 1 else 2.0**-6
            own_sub = torch.randint(-3, 4, shape, generator=g).float() * (tiny / 4)
            choice = torch.randint(0, 3, shape, generator=g)
            x = torch.where(choice == 0, fp8_sub, torch.where(choice == 1, own_sub, x * 2.0**-8))
        elif k in ("zero_slice", "constant_slice", "outlier_slice"):
            idx = self._slice(shape)
            if k == "zero_slice":
                x[idx] = 0.0
            elif k == "constant_slice":
                x[idx] = float(self.param("value"))
            else:
                x[idx] *= float(self.param("factor"))
        elif k == "constant":
            x.fill_(float(self.param("value")))
        elif k == "nonfinite":
            frac = float(self.param("fraction"))
            u = torch.rand(shape, generator=g)
            x = torch.where(u < frac / 3, torch.tensor(math.inf), x)
            x = torch.where((u >= frac / 3) & (u < 2 * frac / 3), torch.tensor(-math.inf), x)
            x = torch.where((u >= 2 * frac / 3) & (u < frac), torch.tensor(math.nan), x)
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and k != "nonfinite":
            lim = torch.finfo(dtype).max
            x = x.clamp(-lim, lim)
        return x.to(dtype=dtype, device=device)

    def _slice(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The index of a structured kind's slice in a tensor of ``shape`` (see the module doc)."""
        dim = int(self.param("dim"))
        if dim >= len(shape):
            raise ValueError_(
                f"value kind {self.kind!r} has dim={dim}, but the tensor has {len(shape)} dims "
                f"(shape {list(shape)}); use a dim in range({len(shape)})"
            )
        size = shape[dim]
        start = int(self.param("start")) % size if size else 0
        stop = min(size, start + int(self.param("length")))
        return (slice(None),) * dim + (slice(start, stop),)

    # -------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "seed": self.seed}
        if self.params:
            d["params"] = dict(self.params)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ValueSpec":
        if not isinstance(d, dict):
            raise ValueError_(f"a value spec must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"kind", "seed", "params"}
        if unknown:
            raise ValueError_(f"unknown value-spec fields {sorted(unknown)}; allowed: kind, seed, params")
        kind = d.get("kind", "normal")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError_(f"value kind {str(kind)[:40]!r} unknown; use one of {KINDS}")
        params = d.get("params", {})
        if not isinstance(params, dict):
            raise ValueError_(f"value-spec 'params' must be an object, got {type(params).__name__}")
        for name, v in params.items():
            default = _PARAMS[kind].get(name)
            if default is None:
                continue  # __post_init__ names the unknown parameter
            ok = (
                isinstance(v, bool)
                if isinstance(default, bool)
                else isinstance(v, int) and not isinstance(v, bool) and v >= 0
                if isinstance(default, int)
                else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            )
            if not ok:
                want = (
                    "true or false"
                    if isinstance(default, bool)
                    else "an integer >= 0"
                    if isinstance(default, int)
                    else "a finite number"
                )
                raise ValueError_(f"value-spec param {name!r} of kind {kind!r} must be {want}, got {str(v)[:40]!r}")
        return cls(kind=kind, seed=d.get("seed", 0), params=tuple(params.items()))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> "ValueSpec":
        if isinstance(text, dict):
            return cls.from_dict(text)
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError_(f"value-spec JSON does not parse: {e}") from None

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind}(seed={self.seed}{', ' + p if p else ''})"
