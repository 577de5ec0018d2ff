"""What every real op target shares: layout classes turned into ``Case`` factories.

A target of kind "linear" or "attention" sweeps one tensor role (the
activation, or q/k/v) through the layout classes of
:mod:`harness.targets.layout_classes`; everything else about its inputs
(weights, bias, scales) is fixed by the target.  :class:`CaseFactory` is what
``Target.layout_classes()`` returns for each class: calling it gives the
Hypothesis strategy the protocol asks for; :meth:`CaseFactory.build` gives
case ``index`` of the cell deterministically (what the matrix uses).

Each case records its layout class in ``case.params["layout_class"]``; the
matrix groups results and the regression corpus matches failures by it.

``ClassTarget.operands(case)`` declares every tensor operand of a case (:class:`Operand`: the
input name, its role, the names of its logical dims), so :mod:`harness.explore` can perturb each
one on its own axis -- the weights, scales and bias of a linear too, not only the swept tensor.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Callable, Mapping

import torch

from harness.capability import require_cuda
from harness.cases import Case
from harness.targets.protocol import BaseTarget, default_inputs
from harness.targets.layout_classes import Context, Draw, LayoutClass, classes_for

__all__ = [
    "CaseFactory",
    "ClassTarget",
    "LAYOUT_CLASS_PARAM",
    "size_preset",
    "need_cuda_capability",
    "materialize_inputs",
    "Operand",
    "operands_of",
]

#: The ``case.params`` key holding the layout class a case was drawn from.
LAYOUT_CLASS_PARAM = "layout_class"


def size_preset() -> str:
    """``HARNESS_SIZE`` ("small" default, or "wan"): the size preset Hypothesis strategies draw from."""
    return os.environ.get("HARNESS_SIZE", "small")


def _max_elements(size: str) -> int:
    from harness.strategies import max_elements

    if "HARNESS_MAX_ELEMENTS" in os.environ or size == "small":
        return max_elements()
    return 1 << 26  # "wan": big enough for (2, 1560, 5120) activations and 1560-token attention


class CaseFactory:
    """One (target, layout class) cell: cases by index, or a Hypothesis strategy of cases.

    ``factory()`` -> strategy (``st.randoms(use_true_random=False)`` mapped through the class's
    draw: shrinks toward the smallest example of the class).  ``factory.build(i)`` -> case ``i``
    of the cell, the same on every machine (``random.Random`` seeded with the string
    ``"{target}|{class}|{i}"``).
    """

    def __init__(self, target: "ClassTarget", lclass: LayoutClass) -> None:
        self.target = target
        self.lclass = lclass

    @property
    def name(self) -> str:
        return self.lclass.name

    @property
    def doc(self) -> str:
        return self.lclass.doc

    def from_rng(self, rng: random.Random, *, size: str | None = None) -> Case:
        """A case drawn from ``rng`` (a ``random.Random`` or Hypothesis' random)."""
        ctx = self.target.context(size or size_preset())
        draw = self.lclass(rng, ctx)
        seed = rng.randrange(2**31)
        return self.target.case_from_draw(draw, self.lclass.name, seed)

    def build(self, index: int, *, size: str = "small") -> Case:
        """Case ``index`` (>= 0) of this cell, deterministic."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index={index!r} must be an int >= 0")
        rng = random.Random(f"{self.target.name}|{self.lclass.name}|{index}")
        return self.from_rng(rng, size=size)

    def __call__(self) -> Any:
        from hypothesis import strategies as st

        return st.randoms(use_true_random=False).map(self.from_rng)

    def __repr__(self) -> str:
        return f"<CaseFactory {self.target.name} x {self.lclass.name}>"


@dataclasses.dataclass(frozen=True)
class Operand:
    """One tensor operand of a target's cases.

    ``name``: the input's name in ``case.layouts`` (the linear activation is ``"x"``, role ``"input"``).
    ``role``: what it is to the op (input, weight, weight_scale, input_scale, bias, q, k, v, out).
    ``axes``: a name per logical dim (batch, frame, token, head, channel, out_channel), as many as the
    operand has dims (``()`` for a scalar).
    ``param``: the ``case.params`` key that holds the operand as a number when the target passes it
    that way (the linears' scalar ``weight_scale`` / ``input_scale``); to give it a layout, set that key
    to None and add the layout (the target then materializes it like any input).
    """

    name: str
    role: str
    axes: tuple[str, ...] = ()
    param: str | None = None


_ACT_AXES = {2: ("token", "channel"), 3: ("batch", "token", "channel"), 4: ("batch", "frame", "token", "channel")}
_ATT_AXES = {"HND": ("batch", "head", "token", "channel"), "NHD": ("batch", "token", "head", "channel")}


def operands_of(kind: str, case: Case) -> tuple[Operand, ...]:
    """The operands a case of op ``kind`` ("linear", "attention") has; other kinds: every layout, axes by
    position only (the last dim is the channel)."""
    if kind == "linear":
        out = []
        if "x" in case.layouts:
            out.append(Operand("x", "input", _ACT_AXES.get(case.layouts["x"].ndim, ())))
        if "weight" in case.layouts:
            out.append(Operand("weight", "weight", ("out_channel", "channel")))
        for key in ("weight_scale", "input_scale"):
            if key in case.layouts:
                out.append(Operand(key, key, tuple(f"dim{i}" for i in range(case.layouts[key].ndim))))
            elif case.params.get(key) is not None:
                out.append(Operand(key, key, (), param=key))
        if "bias" in case.layouts:
            out.append(Operand("bias", "bias", ("out_channel",)))
        return tuple(out)
    if kind == "attention":
        axes = _ATT_AXES.get(str(case.params.get("tensor_layout", "HND")), ())
        return tuple(
            Operand(n, n, axes if case.layouts[n].ndim == 4 else ())
            for n in ("q", "k", "v", "out")
            if n in case.layouts
        )
    return tuple(
        Operand(n, "input", tuple(f"dim{i}" for i in range(s.ndim - 1)) + (("channel",) if s.ndim else ()))
        for n, s in case.layouts.items()
    )


class ClassTarget(BaseTarget):
    """A :class:`BaseTarget` whose layout classes come from ``layout_classes.classes_for(kind, ctx)``.

    Subclasses set ``name``, ``kind``, ``sweep_dtype`` (dtype of the swept tensors) and implement
    ``case_from_draw`` (add the fixed inputs and parameters to a class's draw), ``run``,
    ``reference``, ``bound`` and ``layout_bound``.

    ``accepts_all_layouts``: True for ops that promise to handle any layout (the robust FP8 linear,
    the layout-safe attention wrapper); the matrix then counts a ``rejected`` verdict as a failure.
    """

    sweep_dtype: str = "bfloat16"
    ranks: tuple[int, ...] = (2, 3, 4)
    head_dims: tuple[int, ...] = (64, 128)
    accepts_all_layouts: bool = False

    def context(self, size: str = "small") -> Context:
        return Context(
            dtype=self.sweep_dtype,
            size=size,
            ranks=self.ranks,
            head_dims=self.head_dims,
            max_elements=_max_elements(size),
        )

    def layout_classes(self) -> dict[str, Callable[[], Any]]:
        return {name: CaseFactory(self, lc) for name, lc in classes_for(self.kind, self.context()).items()}

    def operands(self, case: Case) -> tuple[Operand, ...]:
        """Every tensor operand of ``case`` (:func:`operands_of` for this target's kind).  No built-in
        target takes an ``out`` tensor today; one that does adds an ``out`` layout and declares it here."""
        return operands_of(self.kind, case)

    def case_from_draw(self, draw: Draw, class_name: str, seed: int) -> Case:  # pragma: no cover - abstract
        raise NotImplementedError

    def _case(
        self,
        draw: Draw,
        class_name: str,
        seed: int,
        *,
        layouts: Mapping[str, Any] = (),
        values: Mapping[str, Any] = (),
        params: Mapping[str, Any] = (),
        backend: str = "",
    ) -> Case:
        p = dict(draw.params)
        p.update(params)
        p[LAYOUT_CLASS_PARAM] = class_name
        lay = dict(draw.layouts)
        lay.update(layouts)
        val = dict(draw.values)
        val.update(values)
        return Case(
            op=self.name,
            layouts=lay,
            values=val,
            backend=backend,
            params=p,
            seed=seed,
            note=f"layout class {class_name}",
        )


def materialize_inputs(
    case: Case, device: str, values: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``harness.targets.protocol.default_inputs``, plus broadcast (stride-0) layouts of 1-byte float dtypes.

    Local shim: ``harness.layouts.materialize`` checks that values are constant along broadcast
    dims with ``torch.equal``, which torch 2.13 does not implement for FP8 on the CPU.  Such
    inputs are materialized as ``uint8`` with the same bytes (same strides and offset; the poison
    around the view is 0xA5 bytes instead of the FP8 NaN) and viewed back as FP8.
    """
    shim = {n for n, s in case.layouts.items() if s.broadcast and s.torch_dtype.is_floating_point and s.itemsize == 1}
    if not shim:
        return default_inputs(case, device, values)

    vals = dict(values or {})
    layouts = dict(case.layouts)
    for n in shim:
        spec = layouts[n]
        v = vals.get(n)
        if v is None:
            v = case.value_spec(n).generate(spec.shape, spec.torch_dtype)
        vals[n] = v.to(spec.torch_dtype).view(torch.uint8)
        layouts[n] = spec.replace(dtype="uint8")
    out = default_inputs(dataclasses.replace(case, layouts=layouts), device, vals)
    for n in shim:
        out[n] = out[n].view(case.layouts[n].torch_dtype)
    return out


def need_cuda_capability(device: str, minimum: tuple[int, int], what: str) -> tuple[bool, str]:
    """(ok, reason) for a CUDA-only op needing compute capability ``minimum`` (probed now, in the worker)."""
    reason = require_cuda(minimum, what, device=device)
    return reason is None, reason or ""
