"""Layout-safe attention: give each backend the q/k/v it needs with the fewest copies.

``safe_attention(backend, q, k, v, layout, **kw) -> (out, actions)`` is the guard of
:mod:`harness.guard` generated from the backend's **measured** contract (``attn.<backend>`` in
``harness/contracts/attention.json``: SDPA flash / efficient / cuDNN / unforced need 16-byte
aligned q/k/v, flash / efficient / cuDNN and Sage 1 need last-dim stride 1, Sage 1.0.6 writes
``k``), plus the HND/NHD transpose the backend's API needs.  Where no contract was measured (Sage 2,
Sage 3, flash-attn, plug-ins), or a contract's evidence does not cover a requirement (Sage 1's
pointer alignment, every backend's stride alignment), the hand-written rule of the backend's
:class:`~harness.quant.backends.Requirements` still applies, and the action's ``why`` says so.
It fixes, per tensor, and records every action:

- a layout the backend does not take (HND vs NHD) -> ``transpose`` of dims 1 and 2, **a view**
  (no copy); the output is transposed back the same way;
- last-dim stride != 1 where the backend needs 1, a data pointer or a non-unit stride that is
  not a multiple of the backend's (stride) alignment (16 bytes for the CUDA kernels), or a backend that
  writes to this input (SageAttention 1 with ``smooth_k`` and SageAttention 3 do ``k -= mean(k)``
  in place) -> **one** fresh copy that fixes all of them at once.

Note ``.contiguous()`` cannot realign: a contiguous view whose data pointer is misaligned is
returned unchanged. The copy here is a fresh allocation whose pointer is checked
(:func:`harness.guard.aligned_copy`). What cannot be fixed by a copy (dtype, head dim, device)
raises :class:`UnsupportedInput` naming the value.

:func:`plan_attention` computes the actions from metadata alone (tensors, meta tensors), so
the decisions are testable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from torch import Tensor

from harness.quant._geom import Geom
from harness.quant.backends import AttentionBackend, get_backend

__all__ = ["Action", "UnsupportedInput", "plan_attention", "safe_attention", "aligned_copy"]

_LAYOUTS = ("HND", "NHD")


class UnsupportedInput(ValueError):
    """The inputs cannot go to this backend even after copies (dtype, head dim, device, layout name)."""


@dataclass(frozen=True)
class Action:
    """One thing the wrapper did: ``tensor`` ("q", "k", "v", "out"), ``action`` and ``why``.

    ``action``: ``"transpose"`` (a view between HND and NHD, no data moved) or ``"copy"`` (a
    fresh, aligned, contiguous copy; ``why`` lists every requirement it satisfies).
    """

    tensor: str
    action: str
    why: str

    @property
    def is_copy(self) -> bool:
        return self.action == "copy"

    def __str__(self) -> str:
        return f"{self.tensor}: {self.action} ({self.why})"

    def to_dict(self) -> dict[str, str]:
        return {"tensor": self.tensor, "action": self.action, "why": self.why}


def aligned_copy(t: Tensor, alignment: int = 16) -> Tensor:
    """A fresh contiguous copy of ``t`` whose data pointer is ``alignment``-byte aligned."""
    from harness.guard import aligned_copy as _aligned

    return _aligned(t, alignment)


def measured_contract(be: AttentionBackend) -> dict[str, Any] | None:
    """The shipped measured contract of ``attn.<backend>`` (``harness/contracts``), or None."""
    from harness.contracts import measured_contract as _measured

    return _measured(f"attn.{be.name}")


def _target_layout(be: AttentionBackend, layout: str) -> str:
    return layout if layout in be.requires.layouts else be.requires.layouts[0]


def _swap12(g: Geom) -> Geom:
    sh, st = list(g.shape), list(g.strides)
    sh[1], sh[2] = sh[2], sh[1]
    st[1], st[2] = st[2], st[1]
    return Geom(tuple(sh), tuple(st), g.dtype, g.itemsize, g.ptr_align, g.offset)


def _hand_reasons(g: Geom, be: AttentionBackend) -> list[tuple[str, str]]:
    """The hand-written rules of ``be.requires`` this geometry misses, as (contract feature, why)."""
    req = be.requires
    why: list[tuple[str, str]] = []
    if req.last_dim_stride_one and g.shape and g.shape[-1] > 1 and g.strides[-1] != 1:
        why.append(("last_stride_one", f"last-dim stride is {g.strides[-1]}, {be.name} needs 1"))
    if req.alignment and g.ptr_align < req.alignment:
        why.append(
            (
                "alignment",
                f"data pointer is {g.ptr_align}-byte aligned (storage offset {g.offset}), "
                f"{be.name} needs {req.alignment}",
            )
        )
    stride_al = req.alignment if req.stride_alignment is None else req.stride_alignment
    if stride_al:
        for dim, (size, stride) in enumerate(zip(g.shape, g.strides)):
            if size > 1 and stride not in (0, 1) and (stride * g.itemsize) % stride_al:
                why.append(
                    (
                        "stride_alignment",
                        f"dim {dim} stride is {stride} elements = {stride * g.itemsize} "
                        f"bytes, not a multiple of {stride_al}",
                    )
                )
                break
    return why


def _copy_reasons(name: str, g: Geom, be: AttentionBackend, writes: bool, writes_off: bool = False) -> list[str]:
    """Why tensor ``name`` needs a copy: the measured contract's clauses (``harness.guard``), and the
    hand-written rules for whatever the contract does not cover (every rule when there is none).

    ``writes``: the backend declares it writes ``name`` with these kwargs; ``writes_off``: the kwargs
    turn its writing off (``smooth_k=False``), so a write measured with the default kwargs does not apply."""
    from harness.contract import measured_features
    from harness.guard import GuardError, contract_check

    contract = measured_contract(be)
    if contract is None:
        why = [f"{text} (hand-written rule: no measured contract for {be.name})" for _, text in _hand_reasons(g, be)]
        if writes:
            why.append(
                f"{be.name} writes to its {name} input (e.g. k -= mean(k)); copied to protect the caller's "
                "tensor (declared in harness.quant.backends)"
            )
        return why
    try:
        why = contract_check(contract, name, g, op_name=be.name, writes=not writes_off)
    except GuardError as e:
        raise UnsupportedInput(str(e)) from None
    covered = measured_features(contract, name)
    why += [
        f"{text} (hand-written rule: {feature} not measured for {be.name})"
        for feature, text in _hand_reasons(g, be)
        if feature not in covered
    ]
    if writes and not any(w.get("operand") == name for w in contract.get("writes", ())):
        why.append(
            f"{be.name} writes to its {name} input (declared in harness.quant.backends, not measured); "
            "copied to protect the caller's tensor"
        )
    return why


def _copy_alignment(be: AttentionBackend, name: str) -> int:
    contract = measured_contract(be) or {}
    bounds = [
        int(c["bound"])
        for c in contract.get("preconditions", ())
        if c.get("operand") == name and c["feature"] == "alignment" and c["kind"] == "min"
    ]
    return max([16, be.requires.alignment, *bounds])


def plan_attention(
    backend: Union[str, AttentionBackend],
    q: Any,
    k: Any,
    v: Any,
    layout: str = "HND",
    **kw: Any,
) -> list[Action]:
    """The actions :func:`safe_attention` would take for these inputs (metadata only, no data read).

    Accepts tensors (any device, including ``meta``) or ``harness.layouts.LayoutSpec``s.

    ``q``/``k``/``v`` in ``layout`` ("HND" (b, h, s, d) or "NHD" (b, s, h, d)); ``kw`` matter
    only where they change what the backend writes (``smooth_k=False`` for SageAttention 1).
    """
    be = get_backend(backend)
    if be.requires.varlen:
        layout_ok = True
    else:
        if layout not in _LAYOUTS:
            raise UnsupportedInput(f"layout={layout!r}; use 'HND' (b, h, s, d) or 'NHD' (b, s, h, d)")
        layout_ok = layout in be.requires.layouts
    actions: list[Action] = []
    target = layout if layout_ok else _target_layout(be, layout)
    swapped = not layout_ok
    written = be.requires.mutated_inputs(kw)
    writes_off = bool(be.requires.modifies_inputs) and not written
    for name, t in (("q", q), ("k", k), ("v", v)):
        g = Geom.of(t)
        if swapped:
            actions.append(Action(name, "transpose", f"{be.name} takes {target} only; {layout} -> {target} as a view"))
            g = _swap12(g)
        reasons = _copy_reasons(name, g, be, name in written, writes_off)
        if reasons:
            actions.append(Action(name, "copy", "; ".join(reasons)))
    if swapped:
        actions.append(Action("out", "transpose", f"{target} -> {layout} as a view"))
    return actions


def safe_attention(
    backend: Union[str, AttentionBackend],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: str = "HND",
    **kw: Any,
) -> tuple[Tensor, list[Action]]:
    """Run ``backend`` on q/k/v given in ``layout``, copying only what it needs; returns (out, actions).

    The output is in ``layout``. The caller's tensors are never written (inputs a backend
    writes to are copied first). Raises :class:`UnsupportedInput` for what a copy cannot fix.
    """
    be = get_backend(backend)
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if not be.requires.varlen:
        if layout not in _LAYOUTS:
            raise UnsupportedInput(f"layout={layout!r}; use 'HND' (b, h, s, d) or 'NHD' (b, s, h, d)")
        for n, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise UnsupportedInput(f"{n} has shape {tuple(t.shape)}; {layout} attention needs 4-D tensors")
    problems = be.check_inputs(q, k, v, layout)
    if problems:
        raise UnsupportedInput("; ".join(problems))
    actions = plan_attention(be, q, k, v, layout, **kw)
    swapped = any(a.tensor == "out" for a in actions)
    target = _target_layout(be, layout) if swapped else layout
    copies = {a.tensor for a in actions if a.is_copy}
    fixed = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if swapped:
            t = t.transpose(1, 2)
        if name in copies:
            t = aligned_copy(t, _copy_alignment(be, name))
        fixed.append(t)
    out = be.run(fixed[0], fixed[1], fixed[2], target, **kw)
    if swapped:
        out = out.transpose(1, 2)
    return out, actions
