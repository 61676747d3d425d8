"""Recipes: named quantization schemes as values, the way optax's `adam` is a function returning a `chain`.

A `Recipe` is the stages the calibration runner applies to every part of a model, in order (chains are run as
their members). A recipe function returns one: ``gptq(spec)``, ``awq_gptq(spec)``, ``rotate_gptq(spec)``,
``gguf("Q4_K_M", model_config)``; recipes add up (``rotate() + gptq(spec)``), and a researcher's own function
in an experiment script is the same kind of value, so `qjax quantize --recipe=FILE.py:function` runs it through
calibration, evaluation, the report and every export.

The CLI calls a recipe function with the keyword arguments its signature names, from this vocabulary (see
`qjax quantize --help`): ``spec`` (`QSpec` from --bits, --group_size, --sym), ``gptq_config`` (`GptqConfig` from
--desc_act, --act_group_aware, --static_groups, --damp_percent, --mse), ``clip`` (--mse), ``rounding`` (the
export's own rounding: RTN on ``spec``, or llama.cpp's recipe for a GGUF export), ``model_config`` and ``seed``.
"""

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qjax.core import ClipSearch, QSpec
from qjax.quantizers.gptq import GptqConfig
from qjax.transforms import gguf_recipes
from qjax.transforms.awq import awq as awq_scaling
from qjax.transforms.base import Transform
from qjax.transforms.equivalence import rotate as rotation
from qjax.transforms.lwc import learned_clipping
from qjax.transforms.methods import gptq as gptq_rounding
from qjax.transforms.methods import rtn as rtn_rounding
from qjax.transforms.rules import Rule, rules_transform

if TYPE_CHECKING:
  from qjax.models.config import LlamaConfig

LINEAR_KERNELS = r"model/layers_\d+/(self_attn|mlp|mlp/experts)/\w+_proj/kernel"
"""Every linear of every decoder block, experts included (not the embedding, the output head or a router)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Stages applied to every part of a model (embedding, each decoder block, head), in order.

  Attributes:
    stages: transforms over the full-path params of a part; a chain runs as its members.
    name: a label for reports.
    float_inputs: collect every stage's statistics on the float model's activations, not the quantized
      model's (what llama.cpp's imatrix tool measures); only meaningful without equivalence stages before.
    unties_head: a stage changes a tied output embedding apart from the input one (a rotation folds the final
      norm into it), so the result has its own head; roundings that type the head (GGUF recipes) are built for
      the untied model.
  """

  stages: tuple[Transform, ...]
  name: str = ""
  float_inputs: bool = False
  unties_head: bool = False

  def __add__(self, other: "Recipe") -> "Recipe":
    """This recipe's stages, then `other`'s."""
    name = "+".join(n for n in (self.name, other.name) if n)
    return Recipe(self.stages + other.stages, name, self.float_inputs and other.float_inputs,
                  self.unties_head or other.unties_head)  # fmt: skip


def _linears(
  rounding: Callable[[QSpec], Transform], spec: QSpec, name: str, overrides: Mapping[str, QSpec] | None = None
) -> Transform:
  """`rounding` on `spec` for every block linear, on the spec `overrides` gives a path (an allocation's) if any."""
  by_spec: dict[QSpec, list[str]] = defaultdict(list)
  for path, own in (overrides or {}).items():
    by_spec[own].append(re.escape(path))
  rules = [Rule("|".join(paths), rounding(own), name=f"{name} {own.bits}-bit g{own.group_size}")
           for own, paths in by_spec.items()]  # fmt: skip
  return rules_transform([*rules, Rule(LINEAR_KERNELS, rounding(spec), name=name)])


def rtn(spec: QSpec, *, clip: ClipSearch | None = None, overrides: Mapping[str, QSpec] | None = None) -> Recipe:
  """Round-to-nearest of every block linear on `spec`'s grid (on the spec `overrides` gives a path, if any).

  Examples:
    >>> rtn(QSpec(bits=4, group_size=128)).name
    'rtn'
  """
  return Recipe((_linears(lambda s: rtn_rounding(s, clip=clip), spec, "rtn", overrides),), "rtn")


def gptq(
  spec: QSpec, gptq_config: GptqConfig = GptqConfig(), *, overrides: Mapping[str, QSpec] | None = None
) -> Recipe:
  """GPTQ of every block linear on `spec`'s grid, block by block on calibration inputs.

  Args:
    spec: the grid.
    gptq_config: GPTQ's options.
    overrides: path -> the spec replacing `spec` for that linear (a bit allocation's widths and group sizes,
      `qjax.eval.allocate_affine`).
  """
  return Recipe((_linears(lambda s: gptq_rounding(s, gptq_config), spec, "gptq", overrides),), "gptq")


def gguf(
  gguf_type: str,
  model_config: "LlamaConfig",
  *,
  imatrix: bool = False,
  gptq_config: GptqConfig | None = None,
  overrides: Mapping[str, str] | None = None,
) -> Recipe:
  """llama.cpp's recipe `gguf_type` (``Q4_K_M`` …): its per-tensor types, the file llama.cpp would write.

  Without `gptq_config` every tensor is encoded byte for byte as llama.cpp does. With it, the tensors take the
  types llama.cpp gives a calibrated (imatrix) file, so the file is exactly that file's size, and the block
  linears are rounded by GPTQ into their types' block grids (each block's scales fitted by llama.cpp's own
  search, weighted by the Hessian's diagonal, when the sweep enters the block); the embedding and output, which
  GPTQ does not see, are encoded as llama.cpp would.

  Args:
    gguf_type: a llama.cpp file type (`qjax.transforms.gguf_recipes.RECIPES`).
    model_config: the model's config (layer count, widths, heads, tied embeddings decide the types).
    imatrix: weight the block linears' searches by an importance matrix (mean x² of their inputs), measured on
      the float model as llama.cpp's imatrix tool does (GPTQ's rounding weighs its own Hessian instead).
    gptq_config: round the block linears with GPTQ (its sweep order must keep each block's columns together:
      group-aware or plain order).
    overrides: path -> ggml type replacing the recipe's type for that tensor (a bit allocation's choices).
  """
  if gptq_config is None:
    rules = gguf_recipes.gguf_recipe(gguf_type, model_config, imatrix=imatrix, overrides=overrides)
    return Recipe((rules_transform(rules),), f"gguf {gguf_type}" + (" imatrix" if imatrix else ""), imatrix)
  linear = lambda type_name: gptq_rounding(QSpec.ggml(type_name), gptq_config)
  # A calibrated file: the types llama.cpp gives a file made with an importance matrix (they differ for a few
  # recipes, e.g. IQ4_XS keeps its first ffn_down layers at IQ4_XS), so it is the size of the imatrix file.
  rules = gguf_recipes.gguf_recipe(gguf_type, model_config, imatrix=True, linear=linear, overrides=overrides)
  return Recipe((rules_transform(rules),), f"gptq gguf {gguf_type}")


def none(rounding: Recipe) -> Recipe:
  """No method of its own: the export's rounding alone (llama.cpp's encoders for a GGUF recipe)."""
  return rounding


def rotate(*, seed: int = 0) -> Recipe:
  """A randomized Hadamard rotation of the residual stream folded into the weights (QuaRot's R1); add a rounding."""
  return Recipe((rotation(seed=seed),), "rotate", unties_head=True)


def awq(spec: QSpec, rounding: Recipe | None = None) -> Recipe:
  """AWQ's scale search and clipping on `spec`'s grid, then `rounding` (RTN on `spec` by default)."""
  return Recipe((awq_scaling(spec),), "awq") + (rounding or rtn(spec))


def awq_gptq(spec: QSpec, gptq_config: GptqConfig = GptqConfig(), rounding: Recipe | None = None) -> Recipe:
  """AWQ's scales, then GPTQ (`rounding`, e.g. GPTQ into a GGUF recipe's grids, or GPTQ on `spec`).

  AWQ's clipping is left out: it clamps outliers for round-to-nearest, but GPTQ would then reconstruct the
  clamped weights, and its error feedback already handles them (3-bit g128 on the default model: perplexity
  27.3 with clipping, 25.5 without, GPTQ alone 26.5).
  """
  return Recipe((awq_scaling(spec, clip=False),), "awq") + (rounding or gptq(spec, gptq_config))


def lwc(spec: QSpec, rounding: Recipe | None = None) -> Recipe:
  """OmniQuant's learned weight clipping on `spec`'s grid, then `rounding` (RTN on `spec` by default)."""
  return Recipe((learned_clipping(spec),), "lwc") + (rounding or rtn(spec))


def rotate_rtn(spec: QSpec, rounding: Recipe | None = None, *, seed: int = 0) -> Recipe:
  """A rotation, then `rounding` (RTN on `spec` by default)."""
  return rotate(seed=seed) + (rounding or rtn(spec))


def rotate_gptq(
  spec: QSpec, gptq_config: GptqConfig = GptqConfig(), rounding: Recipe | None = None, *, seed: int = 0
) -> Recipe:
  """A rotation, then GPTQ (QuaRot's weight path; `rounding` replaces GPTQ on `spec`, e.g. GPTQ into GGUF grids)."""
  return rotate(seed=seed) + (rounding or gptq(spec, gptq_config))


def rotate_awq(spec: QSpec, rounding: Recipe | None = None, *, seed: int = 0) -> Recipe:
  """A rotation, AWQ's scales and clipping, then `rounding` (RTN on `spec` by default)."""
  return rotate(seed=seed) + awq(spec, rounding)


def rotate_awq_gptq(
  spec: QSpec, gptq_config: GptqConfig = GptqConfig(), rounding: Recipe | None = None, *, seed: int = 0
) -> Recipe:
  """A rotation, AWQ's scales, then GPTQ (or `rounding`)."""
  return rotate(seed=seed) + awq_gptq(spec, gptq_config, rounding)
