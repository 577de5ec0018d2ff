"""Verdicts and results: what happened when one case ran, with the numbers.

A :class:`Result` travels from a worker process to the parent as a plain dict
(``to_json``) and is what reports, the pytest plugin and ``harness replay``
print. Every failure carries numbers (max/mean error, the allowed bound, their
ratio, SQNR), the layouts involved and a one-line replay command.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Mapping

__all__ = [
    "Verdict",
    "Result",
    "BENIGN",
    "Unsupported",
    "format_number",
    "INPUT_MUTATION_PREFIX",
    "POOL_CLOSED",
    "mutations_from_message",
]

#: how an ``input_mutation`` message starts; then "name: what changed" entries joined by "; "
INPUT_MUTATION_PREFIX = "the op wrote into its inputs: "


def mutations_from_message(message: str) -> tuple[list[str], list[str]]:
    """(inputs written, those of them whose poison was written) as an ``input_mutation`` message states them.

    Only for results that predate ``Result.mutated_inputs`` / ``Result.poison_written`` (which say it as
    data); ([], []) for a message that is not an input-mutation message.
    """
    text = message.strip().splitlines()[0] if message and message.strip() else ""
    if not text.startswith(INPUT_MUTATION_PREFIX):
        return [], []
    entries = [e for e in text[len(INPUT_MUTATION_PREFIX) :].split("; ") if e]
    names = list(dict.fromkeys(e.split(": ", 1)[0] for e in entries))
    poison = list(dict.fromkeys(e.split(": ", 1)[0] for e in entries if "(the poison)" in e))
    return names, poison


#: how the message of a case a closing pool answered without running it starts (verdict ``error``)
POOL_CLOSED = "the pool was closed"


class Verdict(str, enum.Enum):
    """Outcome of one case. The value is the stable string written to files."""

    PASS = "pass"
    #: the op raised a Python exception and the device context is still healthy
    REJECTED = "rejected"
    #: a sticky device error (illegal address, misaligned address, device-side assert)
    DEVICE_FAULT = "device_fault"
    #: the case ran past the per-case timeout; the worker was killed
    TIMEOUT = "timeout"
    #: out of memory (``torch.OutOfMemoryError`` or a failed host allocation)
    OOM = "oom"
    #: the output is further from the exact reference than the target's bound allows
    DRIFT = "drift"
    #: NaN/inf in the output where the exact reference is finite
    NONFINITE = "nonfinite"
    #: an input's values, or the poisoned storage around a view, changed
    INPUT_MUTATION = "input_mutation"
    #: the same values in the contiguous layout give a different result
    LAYOUT_NONINVARIANCE = "layout_noninvariance"
    #: a second, identical call on the same (unmodified) inputs in the same process gave a bitwise different output
    NONDETERMINISTIC = "nondeterministic"
    #: the target cannot run on this device (missing capability or package)
    UNAVAILABLE = "unavailable"
    #: the worker process died (segfault, exit, OOM kill)
    WORKER_CRASH = "worker_crash"
    #: the harness or the target's own reference raised: not the kernel's verdict
    ERROR = "error"
    #: the harness could not call the op as this case needs: a plug-in's signature/convention does not fit,
    #: or it failed to import (a failure of the run, never the op's own refusal)
    UNSUPPORTED = "unsupported"

    def __str__(self) -> str:  # "drift", not "Verdict.DRIFT"
        return self.value

    @property
    def failed(self) -> bool:
        """True for every verdict except pass and unavailable."""
        return self not in (Verdict.PASS, Verdict.UNAVAILABLE)

    @property
    def kills_worker(self) -> bool:
        """True when the worker that produced this verdict cannot be reused."""
        return self in (Verdict.DEVICE_FAULT, Verdict.TIMEOUT, Verdict.WORKER_CRASH)

    @classmethod
    def parse(cls, text: str) -> "Verdict":
        """``Verdict`` from its string, with an error that lists the valid names."""
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            names = ", ".join(v.value for v in cls)
            raise ValueError(f"unknown verdict {text!r}; expected one of: {names}") from None


class Unsupported(Exception):
    """Raised by a target, before the op runs, when it cannot call the op as the case needs: verdict ``unsupported``.

    Never raised from inside the op: an exception the op itself raises is its own refusal (``rejected``).
    """


#: verdicts that say the kernel behaved: it passed, refused cleanly, or cannot run here
BENIGN = frozenset({Verdict.PASS, Verdict.REJECTED, Verdict.UNAVAILABLE})


def format_number(x: Any) -> str:
    """Short, stable text for a metric value (``3.1e-03``, ``inf``, ``12``)."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0.0:
            return "0"
        if 1e-3 <= abs(x) < 1e4:
            return f"{x:.4g}"
        return f"{x:.3e}"
    return str(x)


def _jsonable(x: Any) -> Any:
    """Plain JSON types only (floats that are nan/inf become strings)."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return format_number(x)
        return x
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # 0-d tensors / numpy scalars
        try:
            return _jsonable(x.item())
        except Exception:  # pragma: no cover - exotic objects
            pass
    return str(x)


def _unjson_float(x: Any) -> Any:
    if x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unjson_float(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson_float(v) for v in x]
    return x


@dataclasses.dataclass
class Result:
    """What one case did.

    ``metrics``: measured numbers (``max_abs``, ``mean_abs``, ``sqnr_db``, ``ratio``, ...).
    ``bound``: the bound applied (``k``, ``floor``, ``allowed``, ``why``).
    ``attribution``: who faulted (``op``, ``frame``, ``ops_tail``, ``launch_blocking``; from the rerun
    ``method``, ``launch_frame``, and under compute-sanitizer ``kernel``, ``access``, ``sanitizer``).
    ``layouts``: input name -> ``LayoutSpec.describe()``.
    ``replay``: one-line command that reruns the case (set once the case is on disk).
    ``mutated_inputs``: the inputs the op wrote (verdict ``input_mutation``), in input order;
    ``poison_written``: those of them whose storage outside the view (the poison) changed. Results
    written before these fields existed load with both empty (their message still says it).
    """

    verdict: Verdict
    message: str = ""
    op: str = ""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    bound: dict[str, Any] = dataclasses.field(default_factory=dict)
    attribution: dict[str, Any] | None = None
    duration: float = 0.0
    worker: str = ""
    device: str = ""
    layouts: dict[str, str] = dataclasses.field(default_factory=dict)
    case_path: str | None = None
    replay: str | None = None
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    mutated_inputs: list[str] = dataclasses.field(default_factory=list)
    poison_written: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, Verdict):
            self.verdict = Verdict.parse(self.verdict)

    @property
    def passed(self) -> bool:
        """True iff the verdict is ``pass``."""
        return self.verdict is Verdict.PASS

    def to_json(self) -> dict[str, Any]:
        """A dict of plain JSON types (nan/inf written as strings)."""
        return _jsonable(dataclasses.asdict(self))

    def dumps(self) -> str:
        """``to_json`` as a JSON string."""
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Result":
        """Inverse of :meth:`to_json`; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Result.from_json needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown Result fields {extra}; known: {sorted(known)}")
        if "verdict" not in data:
            raise ValueError("Result JSON has no 'verdict'")
        kw = {k: _unjson_float(v) for k, v in data.items()}
        return cls(**kw)

    def summary(self) -> str:
        """One line: verdict, op, headline numbers."""
        parts = [f"{self.verdict.value}", self.op or "?"]
        m = self.metrics
        for key in ("max_abs", "allowed", "ratio", "sqnr_db"):
            if key in m:
                parts.append(f"{key}={format_number(m[key])}")
        if self.attribution and self.attribution.get("op"):
            parts.append(f"faulting op={self.attribution['op']}")
        head = " ".join(parts)
        msg = self.message.splitlines()[0] if self.message else ""
        return f"{head}: {msg}" if msg else head

    def format(self) -> str:
        """Multi-line report for failure messages: numbers, bound, layouts, attribution, replay."""
        lines = [
            f"[{self.verdict.value}] {self.op}  on {self.device or '?'} ({self.worker or '?'}, "
            f"{self.duration * 1e3:.1f} ms)"
        ]
        if self.message:
            lines.extend("  " + ln for ln in self.message.splitlines())
        if self.metrics:
            lines.append(
                "  metrics: "
                + ", ".join(
                    f"{k}={format_number(v)}"
                    for k, v in sorted(self.metrics.items())
                    if not isinstance(v, (dict, list))
                )
            )
        if self.bound:
            why = self.bound.get("why")
            nums = ", ".join(f"{k}={format_number(v)}" for k, v in sorted(self.bound.items()) if k != "why")
            lines.append(f"  bound: {nums}" + (f"  (why: {why})" if why else ""))
        for name, desc in sorted(self.layouts.items()):
            lines.append(f"  layout {name}: {desc}")
        if self.attribution:
            a = self.attribution
            if a.get("kernel") or a.get("method"):
                from harness.report import attribution_text

                lines.append(f"  attribution: {attribution_text(a)}")
            if a.get("op"):
                lines.append(
                    f"  faulting op: {a['op']}" + (" (CUDA_LAUNCH_BLOCKING=1)" if a.get("launch_blocking") else "")
                )
            if a.get("frame"):
                lines.append(f"  at: {a['frame']}")
            if a.get("surfaced_at"):
                lines.append(f"  error surfaced at: {a['surfaced_at']}")
            if a.get("ops_tail"):
                lines.append("  last ops: " + " -> ".join(a["ops_tail"]))
            if a.get("note"):
                lines.append(f"  note: {a['note']}")
            if a.get("sanitizer"):
                lines.append("  compute-sanitizer:")
                lines.extend("    " + ln for ln in str(a["sanitizer"]).splitlines()[-20:])
        if self.case_path:
            lines.append(f"  case file: {self.case_path}")
        if self.replay:
            lines.append(f"  replay: {self.replay}")
        return "\n".join(lines)
