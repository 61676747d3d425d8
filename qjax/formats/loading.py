"""Opening a model by name: the built-in default, a Hugging Face directory, a GGUF file, or a qjax directory."""

import dataclasses
import os
from typing import Any

import numpy as np

from qjax.formats import native
from qjax.models.checkpoint import Checkpoint, GgufCheckpoint, SafetensorsCheckpoint
from qjax.models.config import LlamaConfig
from qjax.models.default import default_model_dir

DEFAULT = "default"


@dataclasses.dataclass
class LoadedModel:
  """A model in memory.

  Attributes:
    config: the model config.
    params: Flax parameter tree (dense or `QArray` leaves).
    tokenizer: its `transformers` tokenizer.
    source: what was opened.
    reference: the model it was quantized from (for KL divergence), when known.
  """

  config: LlamaConfig
  params: Any
  tokenizer: Any
  source: str
  reference: str | None = None


def open_checkpoint(model: str, *, dtype=np.float32) -> Checkpoint:
  """A lazily read float checkpoint: ``"default"``, a Hugging Face directory, or a ``.gguf`` file.

  Raises:
    FileNotFoundError: if the path does not exist.
    ValueError: for a qjax (already quantized) directory, which holds no float checkpoint.
  """
  if model == DEFAULT:
    return SafetensorsCheckpoint(default_model_dir(), dtype)
  if model.endswith(".gguf"):
    return GgufCheckpoint(model, dtype)
  if not os.path.exists(model):
    raise FileNotFoundError(f"{model}: no such model (a Hugging Face directory, a .gguf file, or 'default').")
  if native.is_qjax_dir(model):
    raise ValueError(f"{model}: a quantized qjax directory cannot be quantized again; start from the float model.")
  return SafetensorsCheckpoint(model, dtype)


def load_model(model: str, *, dtype=np.float32) -> LoadedModel:
  """Loads any model `qjax eval --model` accepts."""
  if model != DEFAULT and os.path.isdir(model) and native.is_qjax_dir(model):
    config, params, metadata = native.load_quantized(model)
    tokenizer = SafetensorsCheckpoint.load_tokenizer(model, config)
    return LoadedModel(config, params, tokenizer, model, metadata.get("source_model"))
  checkpoint = open_checkpoint(model, dtype=dtype)
  return LoadedModel(checkpoint.config, checkpoint.params(), checkpoint.tokenizer(), model)
