"""Attention targets: every backend of ``harness.quant.backends``, raw and through the layout-safe wrapper.

Two targets per backend ``B`` (``sdpa``, ``sdpa.flash``, ``sage1.sageattn``, ``emu.sage1``, ...):

- ``attn.B``: the kernel called as is, with the swept q/k/v.  When the class's layout (HND/NHD)
  is not one the backend takes, q/k/v are handed over as ``transpose(1, 2)`` *views* (what model
  code does before SDPA) and the output is transposed back, so the kernel still sees the swept
  strides.  Varlen backends get q/k/v ``reshape``d to packed ``(B*S, H, d)`` tokens (a view
  whenever the layout allows, a copy otherwise) with ``cu_seqlens`` of equal-length sequences.
- ``safe_attn.B``: the same backend through ``harness.quant.attention.safe_attention``, which
  promises to accept every layout (a ``rejected`` verdict counts as a failure in the matrix).

Inputs: ``q``, ``k``, ``v`` (bf16, the swept layouts).  References on exactly those values
(attention inputs are not quantized before the kernel; quantization is the kernel's):

- *exact*: :func:`harness.reference.attention.attention` in float64;
- *emulated*: the emulation that models the backend (``backends.EMULATION_OF``: the Sage
  emulations for Sage kernels, the same-precision naive attention for SDPA / FlashAttention); an
  emulation target's own "emulated" run is itself on packed copies of the inputs.

Drift bound: ``max_abs <= 2 x max_abs(emulated - exact) + floor`` (FlashAttention's rule against
its same-precision naive run), ``floor`` = half an output-dtype ULP at ``max|exact|``.

Layout bound: a kernel may choose another code path (SDPA's dispatcher falls back to the math
kernel for some strides; a copy may change tiling), so two layouts of the same values may differ
by as much as the drift bound allows: ``2 x emulated error + floor``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from harness.cases import Case
from harness.quant.plugins import ATTENTION_GROUP
from harness.reference.metrics import Bound
from harness.targets.protocol import register_target
from harness.targets.base import ClassTarget, materialize_inputs
from harness.targets.layout_classes import Draw
from harness.targets.plugin import PluginTarget, register_plugin_target

__all__ = [
    "AttentionTarget",
    "SafeAttentionTarget",
    "PluginAttentionTarget",
    "ATTENTION_TARGETS",
    "register_backend_targets",
    "register_attention_plugin",
]

_K_BOUND = 2.0
_DTYPE = "bfloat16"


def _backend(name: str) -> Any:
    from harness.quant.backends import get_backend

    return get_backend(name)


def _swap(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


class AttentionTarget(ClassTarget):
    """``attn.<backend>``: one registry backend called directly (see module docstring)."""

    kind = "attention"
    sweep_dtype = _DTYPE
    backend_name = ""
    #: layouts / head dims the backend takes (read from its Requirements when the class is made)
    backend_layouts: tuple[str, ...] = ("HND", "NHD")
    varlen = False

    # ---- cases
    def case_from_draw(self, draw: Draw, class_name: str, seed: int) -> Case:
        return self._case(draw, class_name, seed, params={"backend": self.backend_name}, backend=self.backend_name)

    def make_inputs(
        self, case: Case, device: str, values: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return materialize_inputs(case, device, values)

    def available(self, device: str) -> tuple[bool, str]:
        try:
            b = _backend(self.backend_name)
        except (ImportError, KeyError) as e:
            return False, f"attention backend {self.backend_name!r} not importable: {e}"
        ok, why = b.available(device)
        if not ok:
            return False, why
        if _DTYPE not in b.requires.dtypes:
            return False, f"{self.backend_name} does not take {_DTYPE} (takes {', '.join(b.requires.dtypes)})"
        return True, ""

    # ---- the op
    def invoke(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, **kw: Any) -> torch.Tensor:
        """Call the backend on tensors already in a layout it takes (raw: no fixing at all)."""
        return _backend(self.backend_name).run(q, k, v, layout=layout, **kw)

    def call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
        if self.varlen:
            nq, nk, nv = (x if layout == "NHD" else _swap(x) for x in (q, k, v))
            bsz, s_q = nq.shape[0], nq.shape[1]
            s_k = nk.shape[1]
            dev = q.device
            cu_q = torch.arange(0, bsz + 1, dtype=torch.int32, device=dev) * s_q
            cu_k = torch.arange(0, bsz + 1, dtype=torch.int32, device=dev) * s_k
            flat = [x.reshape(-1, *x.shape[2:]) for x in (nq, nk, nv)]  # a view when the strides allow
            o = self.invoke(*flat, "NHD", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=s_q, max_seqlen_k=s_k)
            o = o.reshape(bsz, s_q, *o.shape[1:])
            return o if layout == "NHD" else _swap(o)
        if layout in self.backend_layouts:
            return self.invoke(q, k, v, layout)
        other = "HND" if layout == "NHD" else "NHD"
        return _swap(self.invoke(_swap(q), _swap(k), _swap(v), other))

    def run(self, inputs, params):
        return self.call(inputs["q"], inputs["k"], inputs["v"], params["tensor_layout"])

    # ---- references
    def reference(self, inputs, params):
        from harness.reference.attention import attention

        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        layout = params["tensor_layout"]
        exact = attention(q, k, v, layout)
        return exact, self.emulated(q, k, v, layout)

    def emulated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
        from harness.quant.backends import EMULATION_OF

        if self.backend_name.startswith("emu."):
            # an emulation judged against itself on packed copies: drift = what the layout costs it
            q, k, v = (x.contiguous() for x in (q, k, v))
            return _backend(self.backend_name).run(q, k, v, layout=layout)
        emu = _backend(EMULATION_OF.get(self.backend_name, "emu.naive"))
        return emu.run(q, k, v, layout=layout)

    def bound(self, inputs, params, exact):
        from harness.quant.backends import EMULATION_OF

        emu = (
            self.backend_name
            if self.backend_name.startswith("emu.")
            else EMULATION_OF.get(self.backend_name, "emu.naive")
        )
        return Bound.derived(
            _K_BOUND,
            exact,
            inputs["q"].dtype,
            why=f"{self.name}: max_abs <= {_K_BOUND:g} x the error of {emu} on the same inputs "
            "against exact float64 attention (FlashAttention's rule)",
        )

    def layout_bound(self, inputs, params, exact):
        return Bound.derived(
            _K_BOUND,
            exact,
            inputs["q"].dtype,
            why="a layout may change the kernel's code path or tiling: the same slack as the drift "
            f"bound ({_K_BOUND:g} x emulated error + rounding floor)",
        )

    # ---- named kernel defects (not about layout)
    def declared_writes(self) -> tuple[str, ...]:
        """The inputs the backend declares it writes (``harness.quant.backends`` ``modifies_inputs``, with the
        kwargs the targets pass, i.e. none); () when it declares none or is not in the registry."""
        from harness.quant.backends import BACKENDS

        b = BACKENDS.get(self.backend_name)
        return tuple(b.requires.mutated_inputs({})) if b is not None else ()

    def known_defect(self, case: Case, result: Any) -> str | None:
        """A defect of the kernel itself (not of the layout) that explains ``result`` on ``case``, or None.

        * ``drift`` -- SageAttention 1.0.6 (``sage1.*``) gives the padded keys of a short last key tile
          (``s_k % 64 != 0``) a score of 0 instead of -inf, so they take softmax weight: the output drifts
          beyond the emulation's bound and matches ``emu.sage1`` with ``tail_keys_score_zero=True``
          (measured on an H200, torch 2.11, docs/gpu-findings.md).  Wan's 32760-token self-attention
          (32760 % 64 = 56) and 257-token CLIP context are affected.
        * ``input_mutation`` -- the backend declares that it writes some inputs (:meth:`declared_writes`;
          SageAttention 1 and 3 subtract the key mean in place, in every layout).  Explained only when the
          inputs written (``result.mutated_inputs``) are all declared ones and no poison around a view
          changed (``result.poison_written``): anything else is a different defect.
        """
        verdict = getattr(result.verdict, "value", result.verdict)
        if verdict == "drift":
            return self.short_key_tile(case)
        written = self.declared_writes() if verdict == "input_mutation" else ()
        names = set(getattr(result, "mutated_inputs", None) or ())
        if written and names and names <= set(written) and not getattr(result, "poison_written", None):
            return (
                f"{self.backend_name} writes its {', '.join(sorted(names))} input in place, as its backend "
                f"declares (modifies_inputs={list(written)}); safe_attn.{self.backend_name} copies it first"
            )
        return None

    def short_key_tile(self, case: Case) -> str | None:
        """SageAttention 1's short last key tile, when ``case`` has one (``s_k % 64 != 0``); else None."""
        if not self.backend_name.startswith("sage1.") or "k" not in case.layouts:
            return None
        k = case.layouts["k"]
        s_k = k.shape[2] if case.params.get("tensor_layout") == "HND" else k.shape[1]
        if s_k % 64:
            return f"SageAttention 1.x short last key tile (s_k % 64 = {s_k % 64}): padded keys scored 0, not -inf"
        return None


class SafeAttentionTarget(AttentionTarget):
    """``safe_attn.<backend>``: the backend through ``harness.quant.attention.safe_attention``, the guard
    generated from the backend's measured contract (``harness/contracts``; hand-written rules where none)."""

    accepts_all_layouts = True

    def declared_writes(self) -> tuple[str, ...]:
        return ()  # the wrapper must copy an input its kernel writes: a write is never explained here

    def available(self, device):
        try:
            from harness.quant.attention import safe_attention  # noqa: F401
        except ImportError as e:
            return False, f"layout-safe wrapper harness.quant.attention.safe_attention not importable: {e}"
        return super().available(device)

    def invoke(self, q, k, v, layout, **kw):
        from harness.quant.attention import safe_attention

        out, _actions = safe_attention(self.backend_name, q, k, v, layout, **kw)
        return out

    def call(self, q, k, v, layout):
        if self.varlen:
            return super().call(q, k, v, layout)
        return self.invoke(q, k, v, layout)  # the wrapper takes either layout and fixes what the kernel needs


class PluginAttentionTarget(PluginTarget, AttentionTarget):
    """A user's attention function (``package.module:attr`` or a ``harness.attention`` entry point),
    resolved inside the worker (see :mod:`harness.targets.plugin`) and judged like SDPA (against the
    same-precision naive attention)."""

    plugin_group = ATTENTION_GROUP
    backend_layouts = ("HND", "NHD")  # the plug-in adapter takes either (transposed views for HND-only code)

    def _resolve(self):
        """The plug-in as ``op(q, k, v, layout, **kw)``, resolved once per target instance (failures raise again)."""
        fn = self.__dict__.get("_fn")
        if fn is None:
            fn = self.__dict__["_fn"] = self.plugin().as_attention_op()
        return fn

    def case_from_draw(self, draw, class_name, seed):
        case = super().case_from_draw(draw, class_name, seed)
        return dataclasses.replace(case, params={**case.params, "plugin": self.info()})

    def invoke(self, q, k, v, layout, **kw):
        return self._resolve()(q, k, v, layout, **kw)


def register_attention_plugin(spec: str, info: Mapping[str, Any] | None = None, *, probe: bool = False) -> str:
    """Register the attention plug-in ``spec`` as target ``plugin_attn.<spec>``; returns the target name.

    ``info`` / ``probe``: as for :func:`harness.targets.linear.register_plugin`.
    """
    if not isinstance(spec, str) or not spec.strip() or spec.count(":") > 1:
        raise ValueError(f"attention plug-in {spec!r} must be 'package.module:attr' or an entry-point name")
    return register_plugin_target(
        PluginAttentionTarget,
        f"plugin_attn.{spec}",
        spec,
        info,
        probe,
        f"user attention {spec}",
        backend_name=f"plugin:{spec}",
    )


ATTENTION_TARGETS: dict[str, type[AttentionTarget]] = {}


def register_backend_targets() -> list[str]:
    """Register ``attn.B`` and ``safe_attn.B`` for every backend in the registry now; returns new names."""
    from harness.quant.backends import BACKENDS

    new = []
    for bname, b in BACKENDS.items():
        req = b.requires
        dims = tuple(
            d
            for d in (64, 128)
            if (req.head_dims is None or d in req.head_dims)
            and (req.max_head_dim is None or d <= req.max_head_dim)
            and (not req.head_dim_multiple or d % req.head_dim_multiple == 0)
        ) or (64,)
        for prefix, base in (("attn", AttentionTarget), ("safe_attn", SafeAttentionTarget)):
            name = f"{prefix}.{bname}"
            if name in ATTENTION_TARGETS:
                continue
            doc = f"{b.description} ({'through safe_attention' if prefix == 'safe_attn' else 'called as is'})"
            cls = type(
                f"{prefix}_{bname}".replace(".", "_"),
                (base,),
                {
                    "name": name,
                    "backend_name": bname,
                    "head_dims": dims,
                    "varlen": bool(req.varlen),
                    "backend_layouts": tuple(req.layouts),
                    "description": doc,
                    "__doc__": doc,
                },
            )
            register_target(cls)
            ATTENTION_TARGETS[name] = cls
            new.append(name)
    return new


try:
    register_backend_targets()
except ImportError:  # pragma: no cover - the backend registry is part of the package; keep linear targets alive
    pass
