"""Attention backend registry: what each kernel needs, probed when asked, and how to call it.

Each backend is a frozen :class:`AttentionBackend` holding a :class:`Requirements` record
(device, compute capability, package and version, dtypes, head dims, layouts, last-dim
stride, pointer alignment, which inputs it may write, varlen) and a runner. Nothing is probed
at import: :meth:`AttentionBackend.available` checks the device, capability, torch build,
package, version and entry point when called (it may initialise CUDA -- call it in a worker,
never in the runner's parent process). Reasons are exact, e.g. "no CUDA device",
"needs compute capability 10.0 or 12.0, this GPU is 9.0", "package sageattention not
installed", "sageattention 1.0.4 installed, needs >= 1.0.6".

Backends (``BACKENDS``, in this order):

- ``sdpa`` (torch chooses), ``sdpa.flash``, ``sdpa.efficient``, ``sdpa.cudnn``, ``sdpa.math``:
  ``F.scaled_dot_product_attention``, the named kernel forced with ``sdpa_kernel``; HND.
- ``sage1.sageattn`` / ``sage1.sageattn_varlen``: SageAttention 1.x (Triton; fp16/bf16/fp32,
  head_dim 64/96/128, varlen 64/128, last-dim stride 1). **Writes ``k -= mean(k)`` into its
  ``k`` argument** when ``smooth_k`` (the default).
- ``sage2.*``: SageAttention 2.x entry points (``sageattn`` auto-dispatch,
  ``sageattn_qk_int8_pv_fp16_triton``, ``..._fp16_cuda`` (sm80 extension),
  ``..._fp8_cuda`` (sm89 extension: 8.9, 9.0, 12.0), ``..._fp8_cuda_sm90`` (9.0 only),
  ``sageattn_varlen``); fp16/bf16, head_dim <= 128 (padded internally), last-dim stride 1.
- ``sage3`` / ``sage3.no_block_mean``: ``sageattn3.sageattn3_blackwell`` with
  ``per_block_mean`` True/False. HND only, fp16/bf16, head_dim 64/128 (>= 256 silently falls
  back to SDPA). **Writes ``k -= mean(k)`` into its ``k`` argument** (its preprocessing does it
  in place). Capability: see :data:`SAGE3_CAPABILITIES`.
- ``flash_attn``: ``flash_attn.flash_attn_func`` (FlashAttention 2; NHD, fp16/bf16, head_dim <= 256).
- ``emu.exact``, ``emu.naive``, ``emu.sage1``, ``emu.sage2``, ``emu.sage2.sm90``, ``emu.sage3``:
  the emulations from :mod:`harness.reference`, on any device, always available.

``describe_all(device=None)`` gives ``{name: {"available", "reason", "requires", ...}}`` for
``python -m harness env --json``; :func:`format_table` renders it for the plain ``env``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from harness.capability import cuda_available, cuda_capability, format_capability

__all__ = [
    "SAGE3_CAPABILITIES",
    "Requirements",
    "AttentionBackend",
    "BACKENDS",
    "get_backend",
    "register_backend",
    "available_backends",
    "describe_all",
    "format_table",
    "parse_version",
    "BackendUnavailable",
]

#: Compute capabilities SageAttention 3 runs on. Its ``setup.py`` (thu-ml/SageAttention,
#: ``sageattention3_blackwell/setup.py``) builds only for the GPU it is built on and only for
#: (10, 0) -> sm_100a or (12, 0) -> sm_120a, raising "Unsupported GPU" otherwise; "a"
#: (architecture-specific) code runs on exactly that capability. quant-numerics.md says
#: 12.0/12.1; no public build targets 12.1, so 12.1 is left out until one does.
SAGE3_CAPABILITIES: tuple[tuple[int, int], ...] = ((10, 0), (12, 0))

_LAYOUTS = ("HND", "NHD")


class BackendUnavailable(RuntimeError):
    """Raised by :meth:`AttentionBackend.run` when the backend cannot run here; says why."""


# ---------------------------------------------------------------------------
# Probes (module-level so tests can monkeypatch them; nothing runs at import)


def _cuda_available() -> bool:
    return cuda_available()


def _capability(device: torch.device) -> tuple[int, int]:
    return cuda_capability(device)


def _installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a broken spec
        return False


def _import(name: str) -> Any:
    return importlib.import_module(name)


def parse_version(v: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "2.2.0+cu128" -> (2, 2, 0), "1.0.6.post1" -> (1, 0, 6)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(v))
    if not m:
        return ()
    return tuple(int(p) for p in m.group(1).split("."))


# ---------------------------------------------------------------------------
# Requirements and backends


@dataclass(frozen=True)
class Requirements:
    """What a backend needs. ``None`` means "no constraint"."""

    device: str = "any"  # "cuda" | "cpu" | "any"
    min_capability: Optional[tuple[int, int]] = None
    max_capability: Optional[tuple[int, int]] = None
    exact_capabilities: Optional[tuple[tuple[int, int], ...]] = None
    package: Optional[str] = None  # distribution name (version lookup)
    module: Optional[str] = None  # import name holding the entry point
    attr: Optional[str] = None  # entry point inside ``module``
    min_version: Optional[str] = None
    below_version: Optional[str] = None  # exclusive upper bound (e.g. the 1.x kernels: below 2.0)
    extra_modules: tuple[str, ...] = ()  # must be importable (compiled extensions, triton)
    torch_feature: Optional[str] = None  # "flash" | "efficient" | "cudnn": torch build support
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    head_dims: Optional[tuple[int, ...]] = None  # exact allowed set
    max_head_dim: Optional[int] = None
    head_dim_multiple: Optional[int] = None
    layouts: tuple[str, ...] = _LAYOUTS
    last_dim_stride_one: bool = False
    alignment: int = 0  # bytes every data pointer must be a multiple of (0: none)
    stride_alignment: Optional[int] = None  # bytes every non-unit stride must be a multiple of (None: = alignment)
    modifies_inputs: tuple[str, ...] = ()  # which of "q", "k", "v" it may write
    modifies_unless: Optional[tuple[str, Any]] = None  # (kwarg, value) that turns the writing off
    varlen: bool = False
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("min_capability", "max_capability"):
            if d[key] is not None:
                d[key] = format_capability(d[key])
        if d["exact_capabilities"] is not None:
            d["exact_capabilities"] = [format_capability(c) for c in d["exact_capabilities"]]
        if d["modifies_unless"] is not None:
            d["modifies_unless"] = list(d["modifies_unless"])
        for key in ("extra_modules", "dtypes", "layouts", "modifies_inputs"):
            d[key] = list(d[key])
        if d["head_dims"] is not None:
            d["head_dims"] = list(d["head_dims"])
        return d

    def mutated_inputs(self, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        """Which of q/k/v a call with ``kwargs`` writes to."""
        if self.modifies_unless is not None:
            key, value = self.modifies_unless
            if key in kwargs and kwargs[key] == value:
                return ()
        return self.modifies_inputs


Runner = Callable[..., Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention kernel, its requirements and how to call it.

    ``run(q, k, v, layout, **kw)`` calls the kernel with q/k/v in ``layout`` (one of
    ``requires.layouts``) and returns the output in the same layout. Common keywords:
    ``sm_scale`` (softmax scale, default 1/sqrt(d)), ``is_causal``; others go to the kernel.
    """

    name: str
    description: str
    requires: Requirements
    kind: str = "native"  # "native" | "emulated" | "plugin"
    runner: Optional[Runner] = field(default=None, compare=False, repr=False)

    # ---- availability
    def _device(self, device: Optional[Any]) -> torch.device:
        if device is not None:
            return torch.device(device)
        if self.requires.device == "cuda":
            return torch.device("cuda")
        if self.requires.device != "cpu" and _cuda_available():
            return torch.device("cuda")  # "any"-device backends are asked about the GPU when there is one
        return torch.device("cpu")

    def available(self, device: Optional[Any] = None) -> tuple[bool, str]:
        """Can this backend run on ``device`` (default: CUDA when present, except CPU-only backends)? -> (ok, reason)."""
        req = self.requires
        dev = self._device(device)
        if req.device == "cuda":
            if dev.type != "cuda":
                return False, f"needs a CUDA device, got {dev.type}"
            if not _cuda_available():
                return False, "no CUDA device"
        elif req.device == "cpu" and dev.type != "cpu":
            return False, f"runs on CPU only, got {dev.type}"
        elif dev.type == "cuda" and not _cuda_available():
            return False, "no CUDA device"
        if dev.type == "cuda" and (req.min_capability or req.max_capability or req.exact_capabilities):
            cap = _capability(dev)
            if req.exact_capabilities is not None and tuple(cap) not in req.exact_capabilities:
                want = " or ".join(format_capability(c) for c in req.exact_capabilities)
                return False, f"needs compute capability {want}, this GPU is {format_capability(cap)}"
            if req.min_capability is not None and tuple(cap) < req.min_capability:
                return (
                    False,
                    f"needs compute capability >= {format_capability(req.min_capability)}, this GPU is {format_capability(cap)}",
                )
            if req.max_capability is not None and tuple(cap) > req.max_capability:
                return (
                    False,
                    f"needs compute capability <= {format_capability(req.max_capability)}, this GPU is {format_capability(cap)}",
                )
        if req.torch_feature is not None and dev.type == "cuda":
            ok, why = _torch_feature(req.torch_feature)
            if not ok:
                return False, why
        if req.package is not None:
            ver = _installed_version(req.package)
            if ver is None or (req.module is not None and not _module_present(req.module)):
                return False, f"package {req.package} not installed"
            if req.min_version is not None and parse_version(ver) < parse_version(req.min_version):
                return False, f"{req.package} {ver} installed, needs >= {req.min_version}"
            if req.below_version is not None and parse_version(ver) >= parse_version(req.below_version):
                return False, (
                    f"{req.package} {ver} installed, this backend is the "
                    f"{parse_version(req.below_version)[0] - 1}.x kernel (needs < {req.below_version})"
                )
        elif req.module is not None and not _module_present(req.module):
            return False, f"module {req.module} not importable"
        for mod in req.extra_modules:
            if not _module_present(mod):
                why = f"module {mod} not installed"
                if req.package:
                    why += f" (needed by {req.package})"
                return False, why
        if req.module is not None and req.attr is not None:
            try:
                mod = _import(req.module)
            except Exception as e:  # noqa: BLE001 - an import failure is a reason, not a crash
                return (
                    False,
                    f"import {req.module} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                )
            if not hasattr(mod, req.attr):
                ver = f" {_installed_version(req.package)}" if req.package else ""
                return False, f"{req.module}{ver} has no {req.attr}"
        if self.kind == "emulated":
            return True, "emulation (runs anywhere)"
        where = f" on {dev.type}" + (
            f" (compute capability {format_capability(_capability(dev))})" if dev.type == "cuda" else ""
        )
        return True, f"available{where}"

    # ---- input checks (layouts are the safe wrapper's business; these are hard limits)
    def check_inputs(self, q: Tensor, k: Tensor, v: Tensor, layout: str) -> list[str]:
        """Reasons these inputs cannot go to the kernel at all (dtype, head dim, device); [] if fine.

        Layout problems a copy can fix (stride, alignment, HND/NHD) are not listed here: see
        :func:`harness.quant.attention.plan_attention`.
        """
        req = self.requires
        out: list[str] = []
        if layout not in _LAYOUTS and not req.varlen:
            out.append(f"layout={layout!r}; use 'HND' or 'NHD'")
        names = ("q", "k", "v")
        for n, t in zip(names, (q, k, v)):
            dn = str(t.dtype).replace("torch.", "")
            if dn not in req.dtypes:
                out.append(f"{n} dtype {dn} not supported by {self.name} (supports {', '.join(req.dtypes)})")
        d = q.shape[-1]
        if req.head_dims is not None and d not in req.head_dims:
            out.append(f"head_dim {d} not supported by {self.name} (supports {', '.join(map(str, req.head_dims))})")
        if req.max_head_dim is not None and d > req.max_head_dim:
            out.append(f"head_dim {d} exceeds {self.name}'s maximum {req.max_head_dim}")
        if req.head_dim_multiple and d % req.head_dim_multiple:
            out.append(f"head_dim {d} is not a multiple of {req.head_dim_multiple} ({self.name})")
        if req.device == "cuda" and q.device.type != "cuda":
            out.append(f"{self.name} needs CUDA tensors, got {q.device}")
        return out

    # ---- running
    def run(self, q: Tensor, k: Tensor, v: Tensor, layout: str = "HND", **kw: Any) -> Tensor:
        """Call the kernel as is (no layout fixing: use ``safe_attention`` for that)."""
        if layout not in self.requires.layouts:
            raise ValueError(
                f"{self.name} takes layouts {self.requires.layouts}, got {layout!r}; "
                "transpose dims 1 and 2 (a view) or use harness.quant.attention.safe_attention"
            )
        if self.runner is None:
            raise BackendUnavailable(f"{self.name} has no runner")
        return self.runner(q, k, v, layout, **kw)

    def to_dict(self, device: Optional[Any] = None) -> dict[str, Any]:
        ok, why = self.available(device)
        return {
            "available": ok,
            "reason": why,
            "kind": self.kind,
            "description": self.description,
            "requires": self.requires.to_dict(),
        }


def _torch_feature(feature: str) -> tuple[bool, str]:
    cuda = torch.backends.cuda
    if feature == "flash":
        fn = getattr(cuda, "is_flash_attention_available", None)
        if fn is not None and not fn():
            return False, "this torch build has no flash attention kernel"
    elif feature == "cudnn":
        if not torch.backends.cudnn.is_available():
            return False, "cuDNN not available in this torch build"
    return True, ""


# ---------------------------------------------------------------------------
# Runners


def _pop_scale(kw: dict[str, Any]) -> Optional[float]:
    s = kw.pop("sm_scale", None)
    if s is None:
        s = kw.pop("scale", None)
    return s


@contextlib.contextmanager
def _sdpa_forced(kernel: Optional[str]) -> Iterator[None]:
    if kernel is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, kernel)]):
        yield


def _sdpa_runner(kernel: Optional[str]) -> Runner:
    def run(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> Tensor:
        import torch.nn.functional as F

        scale = _pop_scale(kw)
        causal = bool(kw.pop("is_causal", False))
        if kw:
            raise TypeError(f"unexpected keyword(s) for SDPA: {sorted(kw)}")
        with _sdpa_forced(kernel):  # HND only: run() refuses any other layout for these backends
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    return run


def _sage_runner(module: str, attr: str, layout_kw: bool = True) -> Runner:
    def run(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> Tensor:
        fn = getattr(_import(module), attr)
        if "scale" in kw and "sm_scale" not in kw:
            kw["sm_scale"] = kw.pop("scale")
        if layout_kw:
            kw["tensor_layout"] = layout
        out = fn(q, k, v, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def _sage3_runner(per_block_mean: bool) -> Runner:
    def run(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> Tensor:
        fn = getattr(_import("sageattn3"), "sageattn3_blackwell")
        kw.pop("sm_scale", None)  # ignored by the kernel (it uses 1/sqrt(d)); the emulation honours it
        kw.pop("scale", None)
        return fn(q, k, v, is_causal=bool(kw.pop("is_causal", False)), per_block_mean=per_block_mean, **kw)

    return run


def _flash_attn_runner(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> Tensor:
    fn = getattr(_import("flash_attn"), "flash_attn_func")
    scale = _pop_scale(kw)
    causal = bool(kw.pop("is_causal", False))
    return fn(q, k, v, softmax_scale=scale, causal=causal, **kw)


def _emu_runner(kind: str, **fixed: Any) -> Runner:
    def run(q: Tensor, k: Tensor, v: Tensor, layout: str, **kw: Any) -> Tensor:
        kw = {**fixed, **kw}
        causal = kw.pop("is_causal", False)
        if causal:
            raise NotImplementedError(f"emu.{kind} has no causal mask (Wan attention is never causal)")
        scale = _pop_scale(kw)
        if kind in ("exact", "naive"):
            from harness.reference.attention import attention, naive_attention

            if kind == "naive":
                return naive_attention(q, k, v, layout, scale, **kw)
            out_dtype = kw.pop("out_dtype", q.dtype)
            return attention(q, k, v, layout, scale, **kw).to(out_dtype)
        from harness.reference import sage

        fn = {"sage1": sage.sage_v1, "sage2": sage.sage_v2, "sage3": sage.sage_v3}[kind]
        return fn(q, k, v, layout, sm_scale=scale, **kw)

    return run


# ---------------------------------------------------------------------------
# The registry

_HALF = ("float16", "bfloat16")
_SAGE1 = dict(
    package="sageattention",
    module="sageattention",
    min_version="1.0.6",
    below_version="2.0.0",
    extra_modules=("triton",),
    min_capability=(8, 0),
    device="cuda",
    last_dim_stride_one=True,
    alignment=16,
    modifies_inputs=("k",),
    modifies_unless=("smooth_k", False),
)
_SAGE2 = dict(
    package="sageattention",
    module="sageattention",
    min_version="2.0.0",
    device="cuda",
    dtypes=_HALF,
    max_head_dim=128,
    last_dim_stride_one=True,
    alignment=16,
)


def _b(name: str, description: str, runner: Runner, kind: str = "native", **req: Any) -> AttentionBackend:
    return AttentionBackend(name=name, description=description, requires=Requirements(**req), kind=kind, runner=runner)


BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        _b(
            "sdpa",
            "torch SDPA, kernel chosen by torch",
            _sdpa_runner(None),
            layouts=("HND",),
            alignment=16,
            notes="NHD inputs are passed as transposed views; alignment 16 because torch may pick the flash or "
            "efficient kernel, which fault on misaligned pointers (docs/gpu-findings.md)",
        ),
        _b(
            "sdpa.flash",
            "torch SDPA forced to FLASH_ATTENTION",
            _sdpa_runner("FLASH_ATTENTION"),
            device="cuda",
            min_capability=(8, 0),
            torch_feature="flash",
            dtypes=_HALF,
            max_head_dim=256,
            layouts=("HND",),
            last_dim_stride_one=True,
            alignment=16,
            notes="a 2- or 8-byte misaligned q/k/v is a sticky 'misaligned address' fault on H200 (docs/gpu-findings.md)",
        ),
        _b(
            "sdpa.efficient",
            "torch SDPA forced to EFFICIENT_ATTENTION",
            _sdpa_runner("EFFICIENT_ATTENTION"),
            device="cuda",
            min_capability=(5, 0),
            layouts=("HND",),
            last_dim_stride_one=True,
            alignment=16,
            notes="8-byte misaligned inputs are a sticky fault on H200 (docs/gpu-findings.md)",
        ),
        _b(
            "sdpa.cudnn",
            "torch SDPA forced to CUDNN_ATTENTION",
            _sdpa_runner("CUDNN_ATTENTION"),
            device="cuda",
            min_capability=(8, 0),
            torch_feature="cudnn",
            dtypes=_HALF,
            max_head_dim=256,
            layouts=("HND",),
            last_dim_stride_one=True,
            alignment=16,
            notes="2- and 8-byte misaligned q/k/v run without error on H200 but read memory outside the view "
            "(poison NaN reaches the output): silently wrong results (docs/gpu-findings.md)",
        ),
        _b(
            "sdpa.math",
            "torch SDPA forced to MATH (reference kernel)",
            _sdpa_runner("MATH"),
            dtypes=("float16", "bfloat16", "float32", "float64"),
            layouts=("HND",),
        ),
        _b(
            "sage1.sageattn",
            "SageAttention 1.x sageattn (Triton): INT8 QK, FP16 PV",
            _sage_runner("sageattention", "sageattn"),
            attr="sageattn",
            head_dims=(64, 96, 128),
            **_SAGE1,
        ),
        _b(
            "sage1.sageattn_varlen",
            "SageAttention 1.x sageattn_varlen (Triton), packed (tokens, heads, d)",
            _sage_runner("sageattention", "sageattn_varlen", layout_kw=False),
            attr="sageattn_varlen",
            head_dims=(64, 128),
            varlen=True,
            **_SAGE1,
        ),
        _b(
            "sage2.sageattn",
            "SageAttention 2.x sageattn (dispatches by architecture)",
            _sage_runner("sageattention", "sageattn"),
            attr="sageattn",
            exact_capabilities=((8, 0), (8, 6), (8, 9), (9, 0), (12, 0)),
            **_SAGE2,
        ),
        _b(
            "sage2.qk_int8_pv_fp16_triton",
            "SageAttention 2.x INT8 QK, FP16 PV (Triton)",
            _sage_runner("sageattention", "sageattn_qk_int8_pv_fp16_triton"),
            attr="sageattn_qk_int8_pv_fp16_triton",
            min_capability=(8, 0),
            extra_modules=("triton",),
            **_SAGE2,
        ),
        _b(
            "sage2.qk_int8_pv_fp16_cuda",
            "SageAttention 2.x INT8 QK, FP16 PV (CUDA, sm80 extension)",
            _sage_runner("sageattention", "sageattn_qk_int8_pv_fp16_cuda"),
            attr="sageattn_qk_int8_pv_fp16_cuda",
            min_capability=(8, 0),
            extra_modules=("sageattention._qattn_sm80",),
            **_SAGE2,
        ),
        _b(
            "sage2.qk_int8_pv_fp8_cuda",
            "SageAttention 2.x INT8 QK, FP8 PV (CUDA, sm89 extension)",
            _sage_runner("sageattention", "sageattn_qk_int8_pv_fp8_cuda"),
            attr="sageattn_qk_int8_pv_fp8_cuda",
            min_capability=(8, 9),
            extra_modules=("sageattention._qattn_sm89",),
            **_SAGE2,
        ),
        _b(
            "sage2.qk_int8_pv_fp8_cuda_sm90",
            "SageAttention 2.x INT8 QK, FP8 PV (CUDA, sm90 wgmma)",
            _sage_runner("sageattention", "sageattn_qk_int8_pv_fp8_cuda_sm90"),
            attr="sageattn_qk_int8_pv_fp8_cuda_sm90",
            exact_capabilities=((9, 0),),
            extra_modules=("sageattention._qattn_sm90",),
            **_SAGE2,
        ),
        _b(
            "sage2.sageattn_varlen",
            "SageAttention 2.x sageattn_varlen (Triton), packed (tokens, heads, d)",
            _sage_runner("sageattention", "sageattn_varlen", layout_kw=False),
            attr="sageattn_varlen",
            min_capability=(8, 0),
            extra_modules=("triton",),
            varlen=True,
            **_SAGE2,
        ),
        _b(
            "sage3",
            "SageAttention 3 sageattn3_blackwell (NVFP4), per_block_mean=True",
            _sage3_runner(True),
            device="cuda",
            exact_capabilities=SAGE3_CAPABILITIES,
            package="sageattn3",
            module="sageattn3",
            attr="sageattn3_blackwell",
            dtypes=_HALF,
            head_dims=(64, 128),
            layouts=("HND",),
            last_dim_stride_one=True,
            alignment=16,
            modifies_inputs=("k",),
            notes="sm_scale and attn_mask are ignored by the kernel; sequences are padded to 128 and copied",
        ),
        _b(
            "sage3.no_block_mean",
            "SageAttention 3 sageattn3_blackwell (NVFP4), per_block_mean=False",
            _sage3_runner(False),
            device="cuda",
            exact_capabilities=SAGE3_CAPABILITIES,
            package="sageattn3",
            module="sageattn3",
            attr="sageattn3_blackwell",
            dtypes=_HALF,
            head_dims=(64, 128),
            layouts=("HND",),
            last_dim_stride_one=True,
            alignment=16,
            modifies_inputs=("k",),
        ),
        _b(
            "flash_attn",
            "FlashAttention 2 flash_attn_func",
            _flash_attn_runner,
            device="cuda",
            min_capability=(8, 0),
            package="flash-attn",
            module="flash_attn",
            attr="flash_attn_func",
            dtypes=_HALF,
            max_head_dim=256,
            layouts=("NHD",),
            last_dim_stride_one=True,
            alignment=16,
        ),
        _b(
            "emu.exact",
            "exact attention (float64, harness.reference.attention)",
            _emu_runner("exact"),
            kind="emulated",
            module="harness.reference.attention",
            dtypes=("float16", "bfloat16", "float32", "float64"),
        ),
        _b(
            "emu.naive",
            "same-precision naive attention (harness.reference.naive_attention)",
            _emu_runner("naive"),
            kind="emulated",
            module="harness.reference.attention",
            dtypes=("float16", "bfloat16", "float32", "float64"),
        ),
        _b(
            "emu.sage1",
            "SageAttention 1 emulation (harness.reference.sage.sage_v1)",
            _emu_runner("sage1"),
            kind="emulated",
            module="harness.reference.sage",
            attr="sage_v1",
        ),
        _b(
            "emu.sage2",
            "SageAttention 2 emulation, sm89 path (sage_v2 defaults)",
            _emu_runner("sage2"),
            kind="emulated",
            module="harness.reference.sage",
            attr="sage_v2",
            dtypes=_HALF + ("float32",),
        ),
        _b(
            "emu.sage2.sm90",
            "SageAttention 2 emulation, sm90 path (q_warp=16, k_block=128, fp32+fp32)",
            _emu_runner("sage2", q_warp=16, k_block=128, pv_accum_dtype="fp32+fp32"),
            kind="emulated",
            module="harness.reference.sage",
            attr="sage_v2",
            dtypes=_HALF + ("float32",),
        ),
        _b(
            "emu.sage3",
            "SageAttention 3 emulation (harness.reference.sage.sage_v3)",
            _emu_runner("sage3"),
            kind="emulated",
            module="harness.reference.sage",
            attr="sage_v3",
            head_dim_multiple=16,
        ),
    )
}

#: Which emulation models each native backend's numerics (for drift bounds and for presets).
EMULATION_OF: dict[str, str] = {
    "sdpa": "emu.naive",
    "sdpa.flash": "emu.naive",
    "sdpa.efficient": "emu.naive",
    "sdpa.cudnn": "emu.naive",
    "sdpa.math": "emu.naive",
    "flash_attn": "emu.naive",
    "sage1.sageattn": "emu.sage1",
    "sage1.sageattn_varlen": "emu.sage1",
    "sage2.sageattn": "emu.sage2",
    "sage2.qk_int8_pv_fp16_triton": "emu.sage1",
    "sage2.qk_int8_pv_fp16_cuda": "emu.sage2",
    "sage2.qk_int8_pv_fp8_cuda": "emu.sage2",
    "sage2.qk_int8_pv_fp8_cuda_sm90": "emu.sage2.sm90",
    "sage2.sageattn_varlen": "emu.sage2",
    "sage3": "emu.sage3",
    "sage3.no_block_mean": "emu.sage3",
}
__all__ += ["EMULATION_OF", "emulation_for"]


def emulation_for(name: str, device: Optional[Any] = None) -> str:
    """The emulation modelling ``name`` on ``device``: ``EMULATION_OF``, refined where the kernel
    depends on the GPU (``sage2.sageattn`` runs the sm90 kernel on compute capability 9.0).
    Probes the capability only for that case (call it where CUDA may be initialised)."""
    emu = EMULATION_OF.get(name, "emu.naive" if name not in BACKENDS or BACKENDS[name].kind != "emulated" else name)
    if name == "sage2.sageattn" and device is not None and torch.device(device).type == "cuda" and _cuda_available():
        if tuple(_capability(torch.device(device))) == (9, 0):
            return "emu.sage2.sm90"
    return emu


def get_backend(name: str) -> AttentionBackend:
    """Look up a backend by name; the error lists the known names."""
    if isinstance(name, AttentionBackend):
        return name
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}") from None


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> AttentionBackend:
    """Add a backend (e.g. a plug-in) to the registry."""
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"expected an AttentionBackend, got {type(backend).__name__}")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"attention backend {backend.name!r} is already registered; pass replace=True")
    BACKENDS[backend.name] = backend
    return backend


def available_backends(device: Optional[Any] = None, *, kind: Optional[str] = None) -> list[str]:
    """Names of the backends that can run on ``device`` now (optionally of one ``kind``)."""
    out = []
    for name, b in BACKENDS.items():
        if kind is not None and b.kind != kind:
            continue
        try:
            ok, _ = b.available(device)
        except Exception:  # noqa: BLE001 - a probe that crashes means unavailable
            ok = False
        if ok:
            out.append(name)
    return out


def describe_all(device: Optional[Any] = None) -> dict[str, dict[str, Any]]:
    """``{name: {"available", "reason", "kind", "description", "requires"}}`` for every backend.

    ``device`` None: each backend is probed on its natural device (CUDA backends on the current
    CUDA device, the rest on CPU). A probe that raises is reported as unavailable with the error.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, b in BACKENDS.items():
        try:
            out[name] = b.to_dict(device)
        except Exception as e:  # noqa: BLE001 - describe, never crash the env command
            out[name] = {
                "available": False,
                "reason": f"probe failed: {type(e).__name__}: {e}",
                "kind": b.kind,
                "description": b.description,
                "requires": b.requires.to_dict(),
            }
    return out


def format_table(described: Optional[Mapping[str, Mapping[str, Any]]] = None, device: Optional[Any] = None) -> str:
    """A plain-text table (name, available, reason) of ``described`` (default: ``describe_all(device)``)."""
    described = describe_all(device) if described is None else described
    if not described:
        return "  (no attention backends)"
    w = max(len(n) for n in described)
    lines = [f"  {'backend':<{w}}  ok   reason"]
    for name, info in described.items():
        mark = "yes" if info.get("available") else "no"
        lines.append(f"  {name:<{w}}  {mark:<3}  {info.get('reason', '')}")
    return "\n".join(lines)
