"""Opening a model by name: a built-in model (``default``, ``gemma3-270m``), a Hugging Face directory (float, GPTQ,
AWQ or compressed-tensors), a GGUF file, or a qjax directory."""

import dataclasses
import os
from typing import Any

import numpy as np

from qjax.formats import awq, compressed_tensors, gptq, hf_quantized, native
from qjax.formats.default_model import BUILTIN_MODELS, builtin_model_dir
from qjax.formats.gguf_reader import GgufCheckpoint
from qjax.models.checkpoint import Checkpoint, SafetensorsCheckpoint
from qjax.models.config import LlamaConfig

QUANTIZED_LOADERS = {
  "gptq": gptq.load_gptq,
  "awq": awq.load_awq,
  compressed_tensors.QUANT_METHOD: compressed_tensors.load_compressed_tensors,
}


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
  """A lazily read float checkpoint: a built-in model's name, a Hugging Face directory, or a ``.gguf`` file.

  Raises:
    FileNotFoundError: if the path does not exist.
    ValueError: for a qjax, GPTQ or AWQ (already quantized) directory, which holds no float checkpoint.
  """
  if model in BUILTIN_MODELS:
    return SafetensorsCheckpoint(builtin_model_dir(model), dtype)
  if model.endswith(".gguf"):
    return GgufCheckpoint(model, dtype)
  if not os.path.exists(model):
    raise FileNotFoundError(
      f"{model}: no such model (a Hugging Face directory, a .gguf file, or a built-in: {sorted(BUILTIN_MODELS)})."
    )
  if native.is_qjax_dir(model):
    raise ValueError(f"{model}: a quantized qjax directory cannot be quantized again; start from the float model.")
  method = quant_method(model)
  if method is not None:
    raise ValueError(
      f"{model}: a {method} checkpoint is already quantized and cannot be quantized again; start from the float "
      "model (`qjax eval` reads it, `qjax convert` converts it)."
    )
  return SafetensorsCheckpoint(model, dtype)


def quant_method(model_dir: str) -> str | None:
  """The ``quant_method`` of a Hugging Face directory's quantization config ("gptq", "awq", …), None if float."""
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    return None
  qc = hf_quantized.read_quantization_config(model_dir)
  return None if qc is None else str(qc.get("quant_method", "")).lower()


def load_model(model: str, *, dtype=np.float32) -> LoadedModel:
  """Loads any model `qjax eval --model` accepts: GPTQ, AWQ, compressed-tensors and qjax directories with `QArray`
  leaves.

  Raises:
    ValueError: for a Hugging Face directory quantized with a method qjax does not read.
  """
  builtin = model in BUILTIN_MODELS
  if not builtin and os.path.isdir(model) and native.is_qjax_dir(model):
    config, params, metadata = native.load_quantized(model)
    tokenizer = SafetensorsCheckpoint.load_tokenizer(model, config)
    return LoadedModel(config, params, tokenizer, model, metadata.get("source_model"))
  method = quant_method(model) if not builtin and os.path.isdir(model) else None
  if method is not None:
    if method not in QUANTIZED_LOADERS:
      raise ValueError(
        f"{model}: quantization_config.quant_method {method!r} is not supported; qjax reads "
        f"{sorted(QUANTIZED_LOADERS)} checkpoints."
      )
    config, params = QUANTIZED_LOADERS[method](model, dtype=dtype)
    return LoadedModel(config, params, SafetensorsCheckpoint.load_tokenizer(model, config), model)
  checkpoint = open_checkpoint(model, dtype=dtype)
  return LoadedModel(checkpoint.config, checkpoint.params(), checkpoint.tokenizer(), model)
