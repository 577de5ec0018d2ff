"""Test harness for quantized attention and FP8 linear kernels in Wan2.1.

Nothing here touches CUDA at import time: capabilities are probed when asked.
"""

__version__ = "0.1.0"
