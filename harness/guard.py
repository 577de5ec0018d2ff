"""Guards generated from layout contracts: check each operand, repair exactly what violates the contract.

``guard(op, contract)`` wraps ``op`` (any callable taking tensors) with the measured contract of
:mod:`harness.contract` (one op's entry of ``contracts.json``, or a shipped one under
``harness/contracts/``).  On each call the wrapper checks every operand the contract names:

- a clause about the pointer (``alignment``) or the strides (``last_stride_one``, ``no_stride0``,
  ``stride_alignment``, ``ld_dense``, ``size1_canonical``, ``contiguous``) violated -> **one** copy
  into a fresh dense buffer whose pointer has the alignment the contract needs (``.contiguous()``
  cannot do this: a contiguous view with a misaligned pointer comes back unchanged);
- an input the op writes (``writes``) -> a fresh copy, so the caller's tensor is never modified;
- a clause a copy cannot satisfy (``dtype``, ``last_dim`` / head dim, ``last_dim_multiple``) ->
  :class:`GuardError`, one line naming the operand, the value and the clause's evidence.

Operands that comply are passed through as they are (the same tensor objects: no copy).  Value
clauses (``values``) and op-level size clauses (from case parameters) are not checked: the first
would need a pass over the data, the second are not about an operand.  Every repair is a
:class:`Repair` (operand, action, why) returned by :meth:`Guarded.call` and kept per thread in
:attr:`Guarded.last_repairs`; :meth:`Guarded.plan` computes them from metadata alone (tensors,
``meta`` tensors, ``LayoutSpec``) without running the op.

A fresh ``torch.empty`` is aligned by the allocator: at least 64 bytes on the CPU (checked by
``tests/property/test_guard.py``), at least 256 bytes from the CUDA caching allocator, whose blocks
are multiples of 512 bytes (checked by ``tests/gpu/test_guard_gpu.py``).  :func:`aligned_empty`
checks the pointer it got and over-allocates when a contract needs more, so nothing here relies on
either.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from harness.contract import FEATURES, clause_line, operand_facts
from harness.layouts import data_ptr_alignment, dtype_name, pow2_alignment

__all__ = [
    "GuardError",
    "Repair",
    "Guarded",
    "guard",
    "contract_check",
    "aligned_empty",
    "aligned_copy",
    "layout_facts",
    "COPY_FEATURES",
    "FATAL_FEATURES",
]

#: features a fresh dense, aligned copy satisfies
COPY_FEATURES = frozenset(
    {"alignment", "last_stride_one", "no_stride0", "stride_alignment", "ld_dense", "size1_canonical", "contiguous"}
)
#: features no copy can change: the guard raises
FATAL_FEATURES = frozenset({"dtype", "last_dim", "last_dim_multiple"})


class GuardError(ValueError):
    """An operand violates a clause no copy can satisfy (dtype, head dim); the message says which."""


@dataclass(frozen=True)
class Repair:
    """What the guard did to one operand: ``action`` is ``"copy"`` (fresh dense aligned buffer);
    ``why`` lists every clause it satisfies (with the contract's evidence) and any write protection."""

    operand: str
    action: str
    why: str

    def __str__(self) -> str:
        return f"{self.operand}: {self.action} ({self.why})"

    def to_dict(self) -> dict[str, str]:
        return {"operand": self.operand, "action": self.action, "why": self.why}


class _Layout:
    """The LayoutSpec queries ``operand_facts`` reads, for a tensor or a Geom-like record."""

    def __init__(self, shape: Sequence[int], strides: Sequence[int], itemsize: int, align: int, dtype: Any) -> None:
        self.shape, self._strides, self.itemsize, self._align = tuple(shape), tuple(strides), itemsize, align
        self.dtype = dtype_name(dtype)

    def strides(self) -> tuple[int, ...]:
        return self._strides

    def alignment(self) -> int:
        return self._align

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self._strides)):
            if size == 1:
                continue
            if stride != expected:
                return any(s == 0 for s in self.shape)
            expected *= size
        return True


def layout_facts(x: Any) -> dict[str, Any]:
    """:func:`harness.contract.operand_facts` of a tensor (its real data pointer; ``meta``: from the
    storage offset), a ``LayoutSpec`` or a ``harness.quant._geom.Geom``."""
    if isinstance(x, Tensor):
        align = (
            pow2_alignment(x.storage_offset() * x.element_size()) if x.device.type == "meta" else data_ptr_alignment(x)
        )
        return operand_facts(_Layout(x.shape, x.stride(), x.element_size(), align, x.dtype))
    if hasattr(x, "ptr_align"):
        return operand_facts(_Layout(x.shape, x.strides, x.itemsize, x.ptr_align, x.dtype))
    return operand_facts(x)


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: Any, alignment: int = 16) -> Tensor:
    """A fresh contiguous tensor whose data pointer is a multiple of ``alignment`` bytes."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if t.numel() == 0 or t.device.type == "meta" or data_ptr_alignment(t) >= alignment:
        return t
    item = t.element_size()
    buf = torch.empty(t.numel() + alignment // item, dtype=dtype, device=device)
    skip = (-buf.data_ptr()) % alignment // item
    return buf[skip : skip + t.numel()].view(tuple(shape))


def aligned_copy(t: Tensor, alignment: int = 16) -> Tensor:
    """A fresh dense copy of ``t`` aligned to ``alignment`` bytes (never a view of ``t``)."""
    out = aligned_empty(t.shape, t.dtype, t.device, alignment)
    out.copy_(t)
    return out


def _violates(clause: Mapping[str, Any], value: Any) -> bool:
    kind, bound = clause["kind"], clause["bound"]
    if kind == "min":
        return value < bound
    if kind == "max":
        return value > bound
    return value not in bound


def _evidence(clause: Mapping[str, Any]) -> str:
    v = clause["violated"]
    by = ", ".join(f"{k} {n}" for k, n in v.get("by_verdict", {}).items())
    where = clause.get("measured_on") or {}
    on = ", ".join(str(where[k]) for k in ("device", "name", "torch") if where.get(k))
    return f"measured: {v.get('failed', 0)} of {v.get('cases', 0)} violating cases failed ({by})" + (
        f" on {on}" if on else ""
    )


def contract_check(
    contract: Mapping[str, Any], name: str, x: Any, *, op_name: str = "op", writes: bool = True
) -> list[str]:
    """Why operand ``name`` (a tensor, meta tensor, ``LayoutSpec`` or ``Geom``) needs a copy under
    ``contract`` ([] when it complies; ``writes`` False: leave write protection out); raises
    :class:`GuardError` for a clause no copy can satisfy."""
    facts = layout_facts(x)
    why = []
    for cl in contract.get("preconditions", ()):
        if cl.get("operand") != name or cl.get("feature") not in FEATURES or cl["feature"] == "values":
            continue
        value = facts.get(cl["feature"])
        if value is None or not _violates(cl, value):
            continue
        if cl["feature"] in FATAL_FEATURES:
            raise GuardError(
                f"{op_name}: {name} has {cl['feature']} {value!r}, outside its measured contract "
                f"'{cl['text']}' ({_evidence(cl)}); a copy cannot change that: "
                "convert the input or use another backend"
            )
        why.append(f"{cl['text']} violated ({cl['feature']} is {value!r}; {_evidence(cl)})")
    w = next((w for w in contract.get("writes", ()) if w.get("operand") == name), None)
    if w is not None and writes:
        why.append(
            f"{op_name} writes to its {name} input (measured: written in {w['written']} of "
            f"{w['checked']} checked cases); copied to protect the caller's tensor"
        )
    return why


class Guarded:
    """``op`` behind the checks and repairs of ``contract`` (see the module docstring)."""

    def __init__(
        self,
        op: Callable[..., Any],
        contract: Mapping[str, Any],
        *,
        name: str | None = None,
        operands: Sequence[str] | None = None,
    ) -> None:
        self.op = op
        self.contract = contract
        self.name = name or str(contract.get("op") or getattr(op, "__name__", "op"))
        self.clauses: dict[str, list[dict[str, Any]]] = {}
        for cl in contract.get("preconditions", []):
            if cl.get("operand") and cl["feature"] in FEATURES and cl["feature"] != "values":
                self.clauses.setdefault(cl["operand"], []).append(cl)
        self.writes = {w["operand"]: w for w in contract.get("writes", [])}
        try:
            self._sig: inspect.Signature | None = inspect.signature(op)
        except (TypeError, ValueError):
            self._sig = None
        named = set(self.clauses) | set(self.writes)
        order = list(self._sig.parameters) if self._sig is not None else []
        self.operands = (
            tuple(operands)
            if operands is not None
            else tuple([n for n in order if n in named] + sorted(named - set(order)))
        )
        self._local = threading.local()
        functools.update_wrapper(self, op, updated=())

    # ---- checks (metadata only)
    def check(self, name: str, x: Any, *, writes: bool | None = None) -> list[str]:
        """Reasons operand ``name`` needs a copy ([] when it complies); raises :class:`GuardError`."""
        return contract_check(self.contract, name, x, op_name=self.name, writes=writes is None or writes)

    def _alignment_needed(self, name: str) -> int:
        need = [
            int(cl["bound"])
            for cl in self.clauses.get(name, ())
            if cl["feature"] == "alignment" and cl["kind"] == "min"
        ]
        return max([16, *need])

    def _bind(self, args: tuple, kwargs: dict) -> Any:
        if self._sig is None:
            raise TypeError(f"{self.name}: the op's signature cannot be inspected; pass operands=... to guard()")
        return self._sig.bind(*args, **kwargs)

    def plan(self, *args: Any, **kwargs: Any) -> list[Repair]:
        """The repairs a call with these arguments would make (tensors, meta tensors or LayoutSpecs)."""
        bound = self._bind(args, kwargs)
        return [
            Repair(n, "copy", "; ".join(why))
            for n in self.operands
            if n in bound.arguments
            for why in [self.check(n, bound.arguments[n])]
            if why
        ]

    # ---- calls
    def call(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Repair]]:
        """Run the op on repaired operands; returns (output, repairs)."""
        bound = self._bind(args, kwargs)
        repairs = []
        for n in self.operands:
            x = bound.arguments.get(n)
            if not isinstance(x, Tensor):
                continue
            why = self.check(n, x)
            if why:
                fixed = aligned_copy(x, self._alignment_needed(n))
                still = self.check(n, fixed, writes=False)
                if still:
                    raise GuardError(
                        f"{self.name}: {n} violates its contract even as a fresh dense copy: " + "; ".join(still)
                    )
                bound.arguments[n] = fixed
                repairs.append(Repair(n, "copy", "; ".join(why)))
        self._local.repairs = repairs
        return self.op(*bound.args, **bound.kwargs), repairs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)[0]

    @property
    def last_repairs(self) -> list[Repair]:
        """The repairs of this thread's last call ([] before the first)."""
        return list(getattr(self._local, "repairs", []))

    def describe(self) -> list[str]:
        """The clauses this guard enforces, with their evidence."""
        lines = [f"guard for {self.name}:"]
        for n in self.operands:
            lines += [f"  {n}: {clause_line(cl)}" for cl in self.clauses.get(n, ())]
            if n in self.writes:
                w = self.writes[n]
                lines.append(f"  {n}: written in {w['written']} of {w['checked']} checked cases: copied first")
        return lines


def guard(
    op: Callable[..., Any],
    contract: Mapping[str, Any],
    *,
    name: str | None = None,
    operands: Sequence[str] | None = None,
) -> Guarded:
    """``op`` wrapped by the checks and repairs of its measured ``contract`` (one op's contract dict).

    ``operands``: the parameter names to check (default: every operand the contract names);
    arguments are matched to them by ``op``'s signature.
    """
    if not isinstance(contract, Mapping) or "preconditions" not in contract or "writes" not in contract:
        raise TypeError(
            "contract must be one op's contract (an entry of contracts.json['contracts'], "
            "see harness.contract.infer_contract)"
        )
    return Guarded(op, contract, name=name, operands=operands)
