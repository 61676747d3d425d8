"""The whole-model quantize loop: a recipe applied to the embedding, every decoder block, then the head.

Each part of the model is read, transformed and released in turn, so a model larger than memory streams from
its checkpoint. The blocks go through the calibration runner (`iter_quantized_blocks`) when a stage reads statistics or
runs the block; the embedding and the head get the same stages without calibration data (a stage that needs
statistics there raises, naming the leaf). The embedding part is transformed first: the calibration windows are
embedded with it, so every block sees the inputs the quantized model will give it (a rotation's rotated stream,
a quantized embedding), unless the recipe calibrates on the float model (``float_inputs``).

A tied output embedding is handed to the head's stages as an explicit ``lm_head`` (the embedding transposed):
if no stage changes it, the result stays tied; if one does (a rotation), the result carries its own ``lm_head``.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from qjax.calib.runner import BlockModel, RunnerOptions, iter_quantized_blocks
from qjax.core.tree import get_path, nest
from qjax.transforms.base import Transform, flatten_stages
from qjax.transforms.recipes import Recipe

Params = Any


class WholeModel(BlockModel, Protocol):
  """A `BlockModel` that also hands out the head and puts the parts back together."""

  def head_params(self) -> Params: ...  # full paths; a tied head as an explicit lm_head
  def assemble(self, embed: Params, blocks: list[Params], head: Params) -> Params: ...


def needs_calibration(recipe: Recipe | Sequence[Transform]) -> bool:
  """Whether some stage reads statistics or runs the block (so calibration windows are needed)."""
  stages = flatten_stages(recipe.stages if isinstance(recipe, Recipe) else recipe)
  return any(stage.stats or stage.whole_block for stage in stages)


def _apply(stages: list[Transform], part: Params, model: WholeModel) -> Params:
  """The stages that do not run a block, applied to a non-block part (embedding or head)."""
  for stage in stages:
    if not stage.whole_block:
      part, _ = stage.update(part, stage.init(part), block_model=model)
  return part


def _untie_only_if_changed(head: Params, tied: Any | None) -> Params:
  if tied is not None and head.get("lm_head", {}).get("kernel") is tied:
    return {k: v for k, v in head.items() if k != "lm_head"}
  return head


def quantize_parts(
  model: WholeModel,
  recipe: Recipe | Sequence[Transform],
  windows: np.ndarray | None = None,
  *,
  options: RunnerOptions = RunnerOptions(),
  run_id: dict[str, Any] | None = None,
) -> Iterator[Params]:
  """Applies a recipe to every part of a model and hands over each part as it is finished, so that a consumer (an
  exporter, `qjax.formats.export`) can write it and let it go: memory stays one block, whatever the model's size.

  Args: as `quantize_model`.

  Yields:
    Full-path subtrees in model order: the embedding (``{"model": {"embed_tokens": ...}}``), each decoder block
    (``{"model": {"layers_3": ...}}``), the head (``model/norm``, and ``lm_head`` exactly when the result's output
    embedding is untied).

  Raises:
    ValueError: when a stage needs statistics and no `windows` were given.
  """
  stages = flatten_stages(recipe.stages if isinstance(recipe, Recipe) else recipe)
  float_inputs = options.float_inputs or (isinstance(recipe, Recipe) and recipe.float_inputs)
  if needs_calibration(stages) and windows is None:
    raise ValueError("`quantize_model`: the recipe reads calibration statistics; pass calibration windows.")
  float_embed = model.embed_params()
  embed = _apply(stages, float_embed, model)
  yield embed
  if needs_calibration(stages):
    options = dataclasses.replace(options, float_inputs=float_inputs)
    blocks = iter_quantized_blocks(
      model, stages, windows, options=options, run_id=run_id, embed_params=float_embed if float_inputs else embed
    )
    del float_embed, embed
    for i, block in enumerate(blocks):
      yield nest(model.layer_prefix(i), block)
      del block  # not held while the next block is made
  else:
    del float_embed, embed
    for i in range(model.num_layers):
      yield _apply(stages, nest(model.layer_prefix(i), model.layer_params(i)), model)
  head = model.head_params()
  tied = get_path(head, "lm_head/kernel") if getattr(model, "tied", False) else None
  yield _untie_only_if_changed(_apply(stages, head, model), tied)


def quantize_model(
  model: WholeModel,
  recipe: Recipe | Sequence[Transform],
  windows: np.ndarray | None = None,
  *,
  options: RunnerOptions = RunnerOptions(),
  run_id: dict[str, Any] | None = None,
) -> Params:
  """Applies a recipe to every part of a model: the embedding, each decoder block (calibrated), the head.

  Args:
    model: the model's parts (e.g. `qjax.models.blocks.LlamaBlocks` over a checkpoint).
    recipe: a `Recipe`, or its stages.
    windows: (nsamples, seqlen) calibration token windows; needed when a stage reads statistics or runs blocks.
    options: the runner's batching, checkpoints and mesh (a recipe's ``float_inputs`` is added to them).
    run_id: JSON description of the run, checked against a checkpoint directory before resuming there.

  Returns:
    The full parameter tree; ``lm_head`` present exactly when the result's output embedding is untied.

  Raises:
    ValueError: when a stage needs statistics and no `windows` were given.
  """
  embed, *blocks, head = quantize_parts(model, recipe, windows, options=options, run_id=run_id)
  return model.assemble(embed, [get_path(b, model.layer_prefix(i)) for i, b in enumerate(blocks)], head)
