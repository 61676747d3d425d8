"""Composable transforms over parameter pytrees, and rules that assign them by path."""

from qjax.transforms.base import EmptyState as EmptyState
from qjax.transforms.base import MaskedNode as MaskedNode
from qjax.transforms.base import Transform as Transform
from qjax.transforms.base import chain as chain
from qjax.transforms.base import identity as identity
from qjax.transforms.base import masked as masked
from qjax.transforms.base import partition as partition
from qjax.transforms.base import per_leaf as per_leaf
from qjax.transforms.base import stateless as stateless
from qjax.transforms.methods import gptq as gptq
from qjax.transforms.methods import kquant as kquant
from qjax.transforms.methods import rtn as rtn
from qjax.transforms.rules import Plan as Plan
from qjax.transforms.rules import Rule as Rule
from qjax.transforms.rules import plan as plan
from qjax.transforms.rules import quantize_params as quantize_params
from qjax.transforms.rules import quantized_leaves as quantized_leaves

__all__ = [
  "EmptyState",
  "MaskedNode",
  "Plan",
  "Rule",
  "Transform",
  "chain",
  "gptq",
  "identity",
  "masked",
  "partition",
  "per_leaf",
  "plan",
  "quantize_params",
  "quantized_leaves",
  "rtn",
  "stateless",
]
