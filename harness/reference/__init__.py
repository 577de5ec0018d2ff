"""Ground truth every kernel is judged against: exact formats, metrics, attention, Sage emulations, Wan blocks.

Submodules: ``formats`` (FP8/FP4/NVFP4/MX rounding and ``scaled_mm`` emulation), ``metrics``
(error metrics, ``Bound``, ``judge``). Importing this package does no CUDA work.
"""

from harness.reference import formats, metrics

__all__ = ["formats", "metrics"]
