"""qjax: post-training quantization of large language models in JAX.

The curated surface; each subpackage exports more:

* `qjax.core`: `QSpec`, `QArray`, packing, affine grids.
* `qjax.quantizers`: one algorithm per file (`rtn_quantize`, `gptq_quantize`, `kquant_quantize`, AWQ math).
* `qjax.transforms`: `Transform`, `chain`, `masked`, `partition`, `per_leaf`, rules, `quantize_params`.
* `qjax.calib`: calibration text, statistics, `quantize_blocks`, `awq`, `learned_clipping`.
* `qjax.models`: the Flax Llama family, checkpoints, `generate`.
* `qjax.formats`: loading any model, GGUF, GPTQ and AWQ files.
* `qjax.eval`: perplexity, KL divergence.
"""

from qjax.calib import awq as awq
from qjax.calib import learned_clipping as learned_clipping
from qjax.calib import quantize_blocks as quantize_blocks
from qjax.core import ClipSearch as ClipSearch
from qjax.core import QArray as QArray
from qjax.core import QSpec as QSpec
from qjax.core import dequantize as dequantize
from qjax.transforms import Rule as Rule
from qjax.transforms import Transform as Transform
from qjax.transforms import chain as chain
from qjax.transforms import gptq as gptq
from qjax.transforms import kquant as kquant
from qjax.transforms import masked as masked
from qjax.transforms import partition as partition
from qjax.transforms import per_leaf as per_leaf
from qjax.transforms import plan as plan
from qjax.transforms import quantize_params as quantize_params
from qjax.transforms import rtn as rtn

__version__ = "0.1.0"

__all__ = [
  "ClipSearch",
  "QArray",
  "QSpec",
  "Rule",
  "Transform",
  "awq",
  "chain",
  "dequantize",
  "gptq",
  "kquant",
  "learned_clipping",
  "masked",
  "partition",
  "per_leaf",
  "plan",
  "quantize_blocks",
  "quantize_params",
  "rtn",
]
