"""Quantization algorithms, one per file; each core works on one weight matrix and its statistics."""

from qjax.quantizers.gptq import GptqConfig as GptqConfig
from qjax.quantizers.gptq import GptqInfo as GptqInfo
from qjax.quantizers.gptq import gptq_core as gptq_core
from qjax.quantizers.gptq import gptq_quantize as gptq_quantize
from qjax.quantizers.kquants import kquant_quantize as kquant_quantize
from qjax.quantizers.rtn import rtn_quantize as rtn_quantize

__all__ = ["GptqConfig", "GptqInfo", "gptq_core", "gptq_quantize", "kquant_quantize", "rtn_quantize"]
