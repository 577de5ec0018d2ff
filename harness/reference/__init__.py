"""Ground truth every kernel is judged against: exact formats, metrics, attention, Sage emulations, Wan blocks.

Submodules: ``formats`` (FP8/FP4/NVFP4/MX rounding and the ``scaled_mm`` emulation),
``metrics`` (error metrics, ``Bound``, ``judge``), ``attention`` (exact tiled attention and
the same-precision naive run), ``sage`` (SageAttention 1/2/3 emulations), ``wan`` (Wan2.1
blocks with swappable linear/attention operators). Importing this package does no CUDA work.

Note: the package attribute ``attention`` is the *function*; ``import
harness.reference.attention as m`` therefore yields the function too. Import names from the
module directly (``from harness.reference.attention import plan_chunks``) or use
``harness.reference.attention_module``.
"""

from harness.reference import attention as _attention_mod
from harness.reference import formats, metrics, sage
from harness.reference.attention import attention, naive_attention

__all__ = ["attention", "naive_attention", "formats", "metrics", "sage", "wan", "attention_module"]

attention_module = _attention_mod


def __getattr__(name: str):
    # ``wan`` is imported on first use: it is larger and most callers only need the numerics.
    if name == "wan":
        import importlib

        return importlib.import_module("harness.reference.wan")
    raise AttributeError(f"module 'harness.reference' has no attribute {name!r}")
