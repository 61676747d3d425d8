"""Quantization algorithms, one per file; each core works on one weight matrix and its statistics."""

from qjax.quantizers.rtn import rtn_quantize as rtn_quantize

__all__ = ["rtn_quantize"]
