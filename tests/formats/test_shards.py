"""Exports written a tensor at a time: the same bytes from a stream of parts as from the whole tree, safetensors
files that safetensors reads back, nothing left behind when a stream fails."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from qjax.core import QSpec
from qjax.formats import export, parse_target, shards
from qjax.models.checkpoint import read_safetensors, safetensors_header
from qjax.transforms import Rule, quantize_params, rtn
from qjax.transforms.gguf_recipes import gguf_recipe
from tests.model_factory import LINEARS


def test_safetensors_writer_round_trips_every_dtype_in_shards(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
    "b.f16": rng.standard_normal((7,)).astype(np.float16),
    "c.bf16": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
    "d.fp8": rng.standard_normal((2, 8)).astype(ml_dtypes.float8_e4m3fn),
    "e.u8": rng.integers(0, 255, (9,), dtype=np.uint8),
    "f.i32": rng.integers(-(2**31), 2**31 - 1, (2, 3), dtype=np.int32),
    "g.scalar": np.float32(2.5).reshape(()),
  }
  writer = shards.SafetensorsWriter(str(tmp_path), max_shard_bytes=64, metadata={"format": "pt"})
  for name in ("g.scalar", "a.f32", "f.i32", "c.bf16", "e.u8", "d.fp8", "b.f16"):  # any order in, name order out
    writer.add(name, tensors[name])
  writer.close()
  with open(tmp_path / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert sorted(weight_map) == sorted(tensors) and len(set(weight_map.values())) > 2
  assert sorted(os.listdir(tmp_path)) == sorted({*weight_map.values(), "model.safetensors.index.json"})  # no spill
  for name, file in weight_map.items():
    path = str(tmp_path / file)
    assert safetensors_header(path)[name].shape == tensors[name].shape
    back = read_safetensors(path, [name])[name]
    assert back.dtype == tensors[name].dtype
    np.testing.assert_array_equal(back.reshape(-1).view(np.uint8), tensors[name].reshape(-1).view(np.uint8))


def _parts(params: dict) -> list[dict]:
  """A parameter tree cut as `quantize_parts` hands it over: the embedding, each block, the head."""
  model = params["model"]
  layers = sorted((k for k in model if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  head = {"model": {"norm": model["norm"]}, **({"lm_head": params["lm_head"]} if "lm_head" in params else {})}
  return [{"model": {"embed_tokens": model["embed_tokens"]}}, *({"model": {k: model[k]}} for k in layers), head]


def _files(directory: str) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
  return out


@pytest.mark.parametrize("target", ["gptq", "compressed-tensors", "qjax", "gguf:Q4_K_M"])
def test_a_stream_of_parts_writes_the_same_bytes_as_the_whole_tree(model_dir, tmp_path, target):
  from qjax.formats import open_checkpoint

  checkpoint = open_checkpoint(model_dir)
  t = parse_target(target)
  if t.is_gguf:
    params = quantize_params(checkpoint.params(), gguf_recipe(t.gguf_type, checkpoint.config))
  else:
    params = quantize_params(checkpoint.params(), [Rule(LINEARS, rtn(QSpec(bits=4, group_size=32)))])
  tokenizer = checkpoint.tokenizer()
  export(t, str(tmp_path / "whole"), checkpoint.config, params, tokenizer, name="m")
  export(t, str(tmp_path / "streamed"), checkpoint.config, iter(_parts(params)), tokenizer, name="m")
  a, b = _files(str(tmp_path / "whole")), _files(str(tmp_path / "streamed"))
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a.get(k) != b.get(k)]


def test_a_stream_that_fails_leaves_nothing(model_dir, tmp_path):
  from qjax.formats import open_checkpoint

  checkpoint = open_checkpoint(model_dir)
  quantized = quantize_params(checkpoint.params(), [Rule(LINEARS, rtn(QSpec(bits=4, group_size=32)))])

  def failing(params):
    yield from _parts(params)[:2]
    raise KeyboardInterrupt

  for target, params in (("gptq", quantized), ("gguf:F16", checkpoint.params())):
    with pytest.raises(KeyboardInterrupt):
      out = str(tmp_path / "out")
      export(parse_target(target), out, checkpoint.config, failing(params), checkpoint.tokenizer(), name="m")
    assert os.listdir(tmp_path) == []
