"""Composable transforms over parameter pytrees, rules that assign them by path, equivalence folding, recipes."""

from qjax.transforms import recipes as recipes
from qjax.transforms.awq import awq as awq
from qjax.transforms.base import EmptyState as EmptyState
from qjax.transforms.base import Transform as Transform
from qjax.transforms.base import chain as chain
from qjax.transforms.base import flatten_stages as flatten_stages
from qjax.transforms.base import masked as masked
from qjax.transforms.base import observe as observe
from qjax.transforms.base import partition as partition
from qjax.transforms.base import per_block as per_block
from qjax.transforms.base import per_leaf as per_leaf
from qjax.transforms.base import stateless as stateless
from qjax.transforms.equivalence import ResidualStream as ResidualStream
from qjax.transforms.equivalence import ScaleGroup as ScaleGroup
from qjax.transforms.equivalence import fold_scales as fold_scales
from qjax.transforms.equivalence import rotate as rotate
from qjax.transforms.lwc import learned_clipping as learned_clipping
from qjax.transforms.methods import gptq as gptq
from qjax.transforms.methods import kquant as kquant
from qjax.transforms.methods import rtn as rtn
from qjax.transforms.recipes import Recipe as Recipe
from qjax.transforms.rules import Plan as Plan
from qjax.transforms.rules import Rule as Rule
from qjax.transforms.rules import plan as plan
from qjax.transforms.rules import quantize_params as quantize_params
from qjax.transforms.rules import rules_transform as rules_transform

__all__ = [
  "EmptyState",
  "Plan",
  "Recipe",
  "ResidualStream",
  "Rule",
  "ScaleGroup",
  "Transform",
  "awq",
  "chain",
  "flatten_stages",
  "fold_scales",
  "gptq",
  "kquant",
  "learned_clipping",
  "masked",
  "observe",
  "partition",
  "per_block",
  "per_leaf",
  "plan",
  "quantize_params",
  "recipes",
  "rotate",
  "rtn",
  "rules_transform",
  "stateless",
]
