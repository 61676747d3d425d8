"""A random checkpoint with a real model's exact configuration and sharded safetensors layout, for scale benchmarks.

.venv/bin/python scripts/make_synthetic_checkpoint.py --config=tests/data/configs/llama-3.1-8b.json --out=/tmp/llama8b

The weights are random but not featureless: each linear has a few input channels scaled up tenfold (the outlier
channels that make rounding hard in real models), norms near one, and a per-tensor std like a trained model's. The
tensors are written one at a time straight into shards of at most `--shard_gb` (Hugging Face's names, order and
``model.safetensors.index.json``), so memory stays one tensor whatever the model's size. The tokenizer is the built-in
default model's (its ids fit any larger vocabulary), enough to calibrate on text and to load the file in llama.cpp.
"""

import json
import os
import shutil
import time

import ml_dtypes
import numpy as np
from absl import app, flags

from qjax.formats.default_model import default_model_dir
from qjax.formats.shards import safetensors_header
from qjax.models.checkpoint import hf_tensor_shapes
from qjax.models.config import LlamaConfig

_CONFIG = flags.DEFINE_string("config", None, "A Hugging Face config.json (the model's shapes).", required=True)
_OUT = flags.DEFINE_string("out", None, "The directory to write (must not exist).", required=True)
_SHARD_GB = flags.DEFINE_float("shard_gb", 5.0, "Largest shard, in GB (Hugging Face's default is 5).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

OUTLIER_CHANNELS = 8
"""Input channels per linear scaled by `OUTLIER_SCALE`: the few large-magnitude channels of trained LLMs."""
OUTLIER_SCALE = 10.0
CHUNK_ELEMENTS = 1 << 24
"""Elements generated at a time: one 64 MB float32 buffer, so a 1 GB tensor never sits whole in memory twice."""


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch and JAX convert."""
  bits = x.view(np.uint32)
  return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_tensor(f, rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> None:
  """Streams one bfloat16 tensor's bytes into `f`, `CHUNK_ELEMENTS` at a time."""
  if name.endswith("norm.weight"):
    f.write(bfloat16_bits((1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)).tobytes())
    return
  rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
  scale = np.full(cols, 0.02, np.float32)
  if name.endswith("proj.weight"):
    scale[rng.choice(cols, OUTLIER_CHANNELS, replace=False)] *= OUTLIER_SCALE
  step = max(1, CHUNK_ELEMENTS // cols)
  for start in range(0, rows, step):
    block = rng.standard_normal((min(step, rows - start), cols), np.float32)
    block *= scale
    f.write(bfloat16_bits(block).tobytes())


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: float) -> list[list[str]]:
  """Tensor names in file order, cut into shards of at most `shard_bytes` (a larger tensor gets its own)."""
  shards, size = [[]], 0
  for name, shape in shapes.items():
    nbytes = 2 * int(np.prod(shape))
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def write_shard(path: str, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
  """Writes a safetensors file (header, then each tensor's bytes in order); returns its tensors' bytes."""
  with open(path, "wb") as f:
    f.write(safetensors_header(((n, ml_dtypes.bfloat16, shapes[n]) for n in names), {"format": "pt"}))
    for name in names:
      write_tensor(f, rng, name, shapes[name])
  return sum(2 * int(np.prod(shapes[n])) for n in names)


def make_checkpoint(config_path: str, out: str, *, shard_gb: float = 5.0, seed: int = 0) -> str:
  """Writes the checkpoint into `out` (created; refused if it exists) and returns `out`."""
  if os.path.lexists(out):
    raise SystemExit(f"--out={out} exists; choose a new directory.")
  with open(config_path) as f:
    hf_config = json.load(f)
  hf_config["torch_dtype"] = "bfloat16"
  config = LlamaConfig.from_hf_dict(hf_config, source=config_path)
  shapes = hf_tensor_shapes(config)
  shapes["model.norm.weight"] = shapes.pop("model.norm.weight")  # after the layers, in Hugging Face's file order
  if "lm_head.weight" in shapes:
    shapes["lm_head.weight"] = shapes.pop("lm_head.weight")
  shards = shard_plan(shapes, shard_gb * 1e9)
  rng = np.random.default_rng(seed)
  partial = out + ".partial"
  os.makedirs(partial)
  weight_map, total = {}, 0
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write_shard(os.path.join(partial, file), names, shapes, rng)
    weight_map.update(dict.fromkeys(names, file))
  with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(partial, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(default_model_dir(), name), os.path.join(partial, name))
  os.rename(partial, out)
  return out


def main(argv):
  del argv
  start = time.perf_counter()
  out = make_checkpoint(_CONFIG.value, _OUT.value, shard_gb=_SHARD_GB.value, seed=_SEED.value)
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"{out}: {size / 1e9:.2f} GB in {seconds:.0f} s ({seconds / (size / 1e9):.1f} s/GB)")


if __name__ == "__main__":
  app.run(main)
