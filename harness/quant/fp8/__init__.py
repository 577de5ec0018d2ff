"""The FP8 E4M3 linear, one concern per module; its public face is :mod:`harness.quant.linear`.

``config`` (constants, :class:`Fp8LinearError`, the frozen :class:`Fp8LinearConfig`), ``plan`` (copy
reasons, operand decisions, the immutable ``LinearPlan``), ``quantize`` (amax, dynamic scales, E4M3
casts), ``cache`` (layout signature, bounded LRU of plans), ``dispatch`` (capability probes, backend
selection, ``_scaled_mm``, ``fp8_linear``). Importing it never touches CUDA.
"""
