"""qjax: post-training quantization of large language models in JAX.

The curated surface, enough for a script's whole path (each subpackage exports more):

* grids and data: `QSpec`, `QArray`, the `Grid` protocol (`AffineGrid`, `GgmlGrid`, `Fp8Grid`, `MxFp4Grid`,
  `NvFp4Grid`, `PerTensorGrid`), `quantize`, `dequantize`;
* transforms and recipes: `Transform`, `chain`, `masked`, `partition`, `per_leaf`, `observe`, `Rule`, `plan`,
  `quantize_params`, the method transforms (`rtn`, `gptq`, `kquant`, `awq`, `learned_clipping`, `rotate`),
  equivalence folding (`ScaleGroup`, `fold_scales`), `Recipe` and the named recipes in `recipes`;
* calibration: `quantize_model`, `quantize_blocks`, `RunnerOptions`, `Statistic`, `register_statistic`, text and
  token windows;
* models and formats: `open_checkpoint`, `load_model`, `LlamaBlocks`, `logits_fn`, `generate`, `export`,
  `parse_target`, `convert_model`;
* running and measuring: `qmatmul`, `to_kernel_layout_params`, `evaluate`.
"""

from qjax.calib import RunnerOptions as RunnerOptions
from qjax.calib import Statistic as Statistic
from qjax.calib import calibration_windows as calibration_windows
from qjax.calib import eval_windows as eval_windows
from qjax.calib import load_text as load_text
from qjax.calib import quantize_blocks as quantize_blocks
from qjax.calib import quantize_model as quantize_model
from qjax.calib import register_statistic as register_statistic
from qjax.calib import tokenize as tokenize
from qjax.core import AffineGrid as AffineGrid
from qjax.core import ClipSearch as ClipSearch
from qjax.core import Fp8Grid as Fp8Grid
from qjax.core import GgmlGrid as GgmlGrid
from qjax.core import Grid as Grid
from qjax.core import GroupParams as GroupParams
from qjax.core import MxFp4Grid as MxFp4Grid
from qjax.core import NvFp4Grid as NvFp4Grid
from qjax.core import PerTensorGrid as PerTensorGrid
from qjax.core import QArray as QArray
from qjax.core import QSpec as QSpec
from qjax.core import dequantize as dequantize
from qjax.core import quantize as quantize
from qjax.eval import evaluate as evaluate
from qjax.formats import convert_model as convert_model
from qjax.formats import export as export
from qjax.formats import load_model as load_model
from qjax.formats import open_checkpoint as open_checkpoint
from qjax.formats import parse_target as parse_target
from qjax.kernels import qmatmul as qmatmul
from qjax.kernels import to_kernel_layout_params as to_kernel_layout_params
from qjax.models import LlamaBlocks as LlamaBlocks
from qjax.models import generate as generate
from qjax.models import logits_fn as logits_fn
from qjax.quantizers import GptqConfig as GptqConfig
from qjax.transforms import Recipe as Recipe
from qjax.transforms import Rule as Rule
from qjax.transforms import ScaleGroup as ScaleGroup
from qjax.transforms import Transform as Transform
from qjax.transforms import awq as awq
from qjax.transforms import chain as chain
from qjax.transforms import fold_scales as fold_scales
from qjax.transforms import gptq as gptq
from qjax.transforms import kquant as kquant
from qjax.transforms import learned_clipping as learned_clipping
from qjax.transforms import masked as masked
from qjax.transforms import observe as observe
from qjax.transforms import partition as partition
from qjax.transforms import per_block as per_block
from qjax.transforms import per_leaf as per_leaf
from qjax.transforms import plan as plan
from qjax.transforms import quantize_params as quantize_params
from qjax.transforms import recipes as recipes
from qjax.transforms import rotate as rotate
from qjax.transforms import rtn as rtn
from qjax.transforms import rules_transform as rules_transform
from qjax.transforms import stateless as stateless

__version__ = "0.1.0"

__all__ = [
  "AffineGrid",
  "ClipSearch",
  "Fp8Grid",
  "GgmlGrid",
  "GptqConfig",
  "Grid",
  "GroupParams",
  "LlamaBlocks",
  "MxFp4Grid",
  "NvFp4Grid",
  "PerTensorGrid",
  "QArray",
  "QSpec",
  "Recipe",
  "Rule",
  "RunnerOptions",
  "ScaleGroup",
  "Statistic",
  "Transform",
  "awq",
  "calibration_windows",
  "chain",
  "convert_model",
  "dequantize",
  "eval_windows",
  "evaluate",
  "export",
  "fold_scales",
  "generate",
  "gptq",
  "kquant",
  "learned_clipping",
  "load_model",
  "load_text",
  "logits_fn",
  "masked",
  "observe",
  "open_checkpoint",
  "parse_target",
  "partition",
  "per_block",
  "per_leaf",
  "plan",
  "qmatmul",
  "quantize",
  "quantize_blocks",
  "quantize_model",
  "quantize_params",
  "recipes",
  "register_statistic",
  "rotate",
  "rtn",
  "rules_transform",
  "stateless",
  "to_kernel_layout_params",
  "tokenize",
]
