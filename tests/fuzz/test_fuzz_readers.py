"""Property-based fuzzers of every reader: a mutated input loads to the model its config describes, or is refused
with a one-line `InputError` (`FileNotFoundError` for a missing path) naming its file; within a time bound, and
opening nothing outside its directory (a valid sentinel model waits outside to be misread). See `harness.run_case`.

Cases per fuzzer: ``QJAX_FUZZ_EXAMPLES`` (all fuzzers together, default 4000) times the fuzzer's share.
"""

import json
import os
import shutil
import struct
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from qjax.calib.text import load_text
from qjax.formats.awq import load_awq
from qjax.formats.compressed_tensors import load_compressed_tensors
from qjax.formats.gguf_reader import GgufCheckpoint
from qjax.formats.gptq import load_gptq
from qjax.formats.native import load_quantized
from qjax.models import LlamaConfig, SafetensorsCheckpoint
from qjax.models.checkpoint import read_safetensors, safetensors_header
from qjax.models.config import MAX_SIZE
from tests.fuzz import harness
from tests.fuzz.harness import fresh_case, run_case


def fuzz(share: float):
  """Hypothesis settings of a fuzzer with this share of the cases (slow-data health checks off: files are I/O)."""
  return settings(max_examples=harness.examples(share), suppress_health_check=list(HealthCheck), deadline=None)


INTERESTING_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 24, 31, 32, 33, 63, 64, 255, 256, 2**16, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1, -1, -(2**31)]  # fmt: skip
JSON = st.recursive(
  st.none() | st.booleans() | st.sampled_from(INTERESTING_INTS) | st.integers() | st.floats() | st.text(max_size=12),
  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
  max_leaves=6,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """The fuzz area: pristine models under ``base/``, and ``outside/`` holding sentinels no case may open."""
  root = str(tmp_path_factory.mktemp("fuzz"))
  base = os.path.join(root, "base")
  harness.write_hf_dir(os.path.join(base, "sharded"), shards=2)
  harness.write_hf_dir(os.path.join(base, "single"))
  harness.write_gguf_file(os.path.join(base, "f32.gguf"))
  harness.write_gguf_file(os.path.join(base, "q8.gguf"), recipe="Q8_0")
  for kind in LOADERS:
    harness.write_quantized_dir(os.path.join(base, kind), kind)
  outside = os.path.join(root, "outside")
  os.makedirs(outside)
  shutil.copy(os.path.join(base, "sharded", "model-00001-of-00002.safetensors"), os.path.join(outside, "s.safetensors"))
  shutil.copy(os.path.join(base, "single", "model.safetensors"), os.path.join(outside, "model.safetensors"))
  shutil.copy(os.path.join(base, "f32.gguf"), os.path.join(outside, "s.gguf"))
  with open(os.path.join(outside, "secret.txt"), "w") as f:
    f.write("a sentinel text no reader may open\n")
  return root


def copy_case(root: str, base: str) -> str:
  """A fresh case directory holding a copy of the pristine model `base` (a directory under ``base/``)."""
  case = fresh_case(root)
  source = os.path.join(root, "base", base)
  for name in os.listdir(source):
    shutil.copy(os.path.join(source, name), case)
  return case


def add_traps(case: str, root: str) -> None:
  """Files a hostile name may point at: a FIFO, a directory, links out of the directory, a link loop, a device."""
  os.mkfifo(os.path.join(case, "fifo.safetensors"))
  os.mkdir(os.path.join(case, "dir.safetensors"))
  os.mkdir(os.path.join(case, "sub"))
  os.symlink(os.path.join(root, "outside", "s.safetensors"), os.path.join(case, "link.safetensors"))
  os.symlink("../outside/s.safetensors", os.path.join(case, "rel.safetensors"))
  os.symlink("loop.safetensors", os.path.join(case, "loop.safetensors"))
  os.symlink("/dev/zero", os.path.join(case, "dev.safetensors"))


def check_loaded(checkpoint) -> None:
  harness.check_model(checkpoint.config, checkpoint.params())


# ---- (e) the text reader ----


@fuzz(0.12)
@given(data=st.binary(max_size=512) | st.text(max_size=256).map(str.encode), kind=st.sampled_from(
  ["file"] * 8 + ["fifo", "dir", "device", "missing", "broken_link"]))  # fmt: skip
def test_fuzz_text_reader(root, data, kind):
  case = fresh_case(root)
  path = os.path.join(case, "text.txt")
  if kind == "file":
    with open(path, "wb") as f:
      f.write(data)
  elif kind == "fifo":
    os.mkfifo(path)
  elif kind == "dir":
    os.mkdir(path)
  elif kind in ("device", "broken_link"):
    os.symlink("/dev/zero" if kind == "device" else "nowhere.txt", path)

  def check(text):
    assert isinstance(text, str) and text.strip() and text == data.decode().replace("\r\n", "\n").replace("\r", "\n")

  run_case("text", case, lambda: load_text(path, "evaluation"), check)


# ---- config.json ----

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "architectures",
               "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
               "use_sliding_window", "bos_token_id", "eos_token_id", "qjax_rope_freq_factors",
               "rope_parameters"]  # fmt: skip
ROPE = st.fixed_dictionaries(
  {"rope_type": st.sampled_from(["default", "linear", "llama3", "yarn", 3])},
  optional={k: JSON for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")},
)


def edit_json(draw, value: dict, keys: list[str]) -> dict:
  """`value` with one to three keys set to drawn JSON (or RoPE blocks, or interesting integers) or deleted."""
  value = dict(value)
  for _ in range(draw(st.integers(1, 3))):
    key = draw(st.sampled_from(keys) | st.text(max_size=10))
    if draw(st.integers(0, 4)) == 0:
      value.pop(key, None)
    else:
      value[key] = draw(ROPE if "rope" in key else st.sampled_from(INTERESTING_INTS) | JSON)
  return value


def check_config(config: LlamaConfig) -> None:
  sizes = [config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
           config.num_attention_heads, config.num_key_value_heads, config.head_dim]  # fmt: skip
  assert all(type(s) is int and 0 < s < MAX_SIZE for s in sizes), sizes
  assert config.num_attention_heads % config.num_key_value_heads == 0 and config.head_dim % 2 == 0
  assert np.isfinite([config.rms_norm_eps, config.rope_theta, config.rope_scaling.factor]).all()


@fuzz(0.12)
@given(data=st.data())
def test_fuzz_config_json(root, data):
  case = fresh_case(root)
  hf = harness.TINY.to_hf_dict()
  raw = data.draw(st.sampled_from(["edit"] * 8 + ["json", "bytes"]))
  content = {"edit": lambda: json.dumps(edit_json(data.draw, hf, CONFIG_KEYS)).encode(),
             "json": lambda: json.dumps(data.draw(JSON)).encode(),
             "bytes": lambda: data.draw(st.binary(max_size=300))}[raw]()  # fmt: skip
  with open(os.path.join(case, "config.json"), "wb") as f:
    f.write(content)
  run_case("config", case, lambda: LlamaConfig.from_pretrained(case), check_config)


# ---- (a) the safetensors index and shard names ----


def hostile_names(root: str) -> list[str]:
  outside = os.path.join(root, "outside", "s.safetensors")
  return ["../outside/s.safetensors", outside, "/dev/zero", "/proc/self/environ", "link.safetensors",
          "rel.safetensors", "loop.safetensors", "dev.safetensors", "fifo.safetensors", "dir.safetensors",
          "./model-00001-of-00002.safetensors", "sub/../model-00001-of-00002.safetensors",
          "sub/../../outside/s.safetensors", "model-00001-of-00002.safetensors/", "", ".", "..", "sub", "a" * 300,
          "x\0y", "missing.safetensors", "..\\outside\\s.safetensors", "~/s.safetensors", "model.safetensors",
          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # fmt: skip


@fuzz(0.14)
@given(data=st.data())
def test_fuzz_safetensors_index(root, data):
  case = copy_case(root, "sharded")
  add_traps(case, root)
  index_path = os.path.join(case, "model.safetensors.index.json")
  with open(index_path) as f:
    index = json.load(f)
  names = sorted(index["weight_map"])
  mode = data.draw(st.sampled_from(["entries"] * 6 + ["map", "index", "bytes"]))
  if mode == "entries":
    for _ in range(data.draw(st.integers(1, 3))):
      file = data.draw(st.sampled_from(hostile_names(root)) | st.text(max_size=20))
      tensor = data.draw(st.sampled_from(names) | st.text(max_size=10))
      index["weight_map"][tensor] = file
    if data.draw(st.booleans()):
      index["weight_map"].pop(data.draw(st.sampled_from(names)))
  elif mode == "map":
    index["weight_map"] = data.draw(JSON)
  else:
    index = data.draw(JSON)
  with open(index_path, "wb") as f:
    f.write(data.draw(st.binary(max_size=300)) if mode == "bytes" else json.dumps(index).encode())
  run_case("index", case, lambda: SafetensorsCheckpoint(case), check_loaded)


# ---- (b) safetensors headers ----

DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "U32", "XYZ", "", 7, None]


def mutate_header(draw, header: dict) -> dict:
  """The JSON header with one to three entries' dtype, shape or offsets changed, or entries removed or added."""
  header = {k: dict(v) if isinstance(v, dict) else v for k, v in header.items()}
  names = sorted(k for k in header if k != "__metadata__")
  for _ in range(draw(st.integers(1, 3))):
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "add", "metadata"]))
    ints = st.sampled_from(INTERESTING_INTS) | st.integers(0, 200_000)
    entry = header[name] if isinstance(header.get(name), dict) else header.setdefault(name, {})
    if field == "dtype":
      entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":
      entry["shape"] = draw(st.lists(ints, max_size=4) | JSON)
    elif field == "data_offsets":
      entry["data_offsets"] = draw(st.lists(ints, min_size=2, max_size=2) | JSON)
    elif field == "drop":
      header.pop(name, None)
    elif field == "add":
      header[draw(st.text(max_size=40))] = draw(st.sampled_from([header.get(name), None]) | JSON)
    else:
      header["__metadata__"] = draw(JSON)
  return header


@fuzz(0.16)
@given(data=st.data())
def test_fuzz_safetensors_header(root, data):
  case = copy_case(root, "single")
  weights = os.path.join(case, "model.safetensors")
  with open(weights, "rb") as f:
    blob = f.read()
  (length,) = struct.unpack("<Q", blob[:8])
  header, body = json.loads(blob[8 : 8 + length]), blob[8 + length :]
  mode = data.draw(st.sampled_from(["header"] * 4 + ["length", "flip", "truncate", "raw"]))
  if mode == "header":
    text = json.dumps(mutate_header(data.draw, header)).encode()
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text + body
  elif mode == "length":
    new = data.draw(st.sampled_from(INTERESTING_INTS) | st.integers(length - 16, length + 16))
    blob = struct.pack("<Q", new % 2**64) + blob[8:]
  elif mode == "flip":
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
      blob[data.draw(st.integers(0, 8 + length + 63))] ^= data.draw(st.integers(1, 255))
    blob = bytes(blob)
  elif mode == "truncate":
    blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
  else:
    blob = blob[:8] + data.draw(st.binary(min_size=length, max_size=length)) + body
  with open(weights, "wb") as f:
    f.write(blob)
  run_case("safetensors_header", case, lambda: SafetensorsCheckpoint(case), check_loaded)


# ---- (c) GGUF ----


@pytest.fixture(scope="module")
def gguf_bases(root):
  """Per pristine GGUF: its bytes, its integer header parts (offset, size) and its string parts."""
  bases = {}
  for name in ("f32.gguf", "q8.gguf"):
    path = os.path.join(root, "base", name)
    layout = harness.gguf_layout(path)
    with open(path, "rb") as f:
      blob = f.read()
    integers = sorted({v for v in layout.values() if v[1] in (4, 8)})
    strings = sorted({v for k, v in layout.items() if v[1] not in (4, 8) and 0 < v[1] <= 64})
    bases[name] = blob, integers, strings
  return bases


def mutate_gguf(draw, blob: bytes, integers: list, strings: list) -> bytes:
  """One to three mutations: an integer header field (count, length, type, dimension, offset) set to a drawn value, a
  string's bytes replaced, bytes flipped or spliced in the first 4 KiB, or the file cut short."""
  blob = bytearray(blob)
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["integer"] * 4 + ["string", "flip", "splice", "truncate"]))
    if kind == "integer":
      offset, size = draw(st.sampled_from(integers))
      value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2 ** (8 * size) - 1)) % 2 ** (8 * size)
      blob[offset : offset + size] = value.to_bytes(size, "little")
    elif kind == "string":
      offset, size = draw(st.sampled_from(strings))
      blob[offset : offset + size] = draw(st.binary(min_size=size, max_size=size))
    elif kind == "flip":
      blob[draw(st.integers(0, min(4095, len(blob) - 1)))] ^= draw(st.integers(1, 255))
    elif kind == "splice":
      at = draw(st.integers(0, min(4095, len(blob))))
      blob[at : at + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
    elif len(blob) > 1:
      del blob[draw(st.integers(1, len(blob) - 1)) :]
  return bytes(blob)


def load_gguf(path: str):
  checkpoint = GgufCheckpoint(path)
  return checkpoint, checkpoint.params(), checkpoint.tokenizer()


def check_gguf(loaded) -> None:
  checkpoint, params, tokenizer = loaded
  check_config(checkpoint.config)
  harness.check_model(checkpoint.config, params)
  assert len(tokenizer) <= checkpoint.config.vocab_size


@fuzz(0.2)
@given(data=st.data())
def test_fuzz_gguf_reader(root, gguf_bases, data):
  case = fresh_case(root)
  blob, integers, strings = gguf_bases[data.draw(st.sampled_from(sorted(gguf_bases)))]
  path = os.path.join(case, "model.gguf")
  with open(path, "wb") as f:
    f.write(mutate_gguf(data.draw, blob, integers, strings))
  run_case("gguf", case, lambda: load_gguf(path), check_gguf)


# ---- (d) GPTQ, AWQ and qjax directories ----

QC_KEYS = ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "format", "zero_point", "version",
           "quant_method", "dynamic", "pack_dtype", "w_bit", "q_group_size"]  # fmt: skip
CT_KEYS = ["config_groups", "format", "ignore", "quantization_status", "sparsity_config", "transform_config",
           "kv_cache_scheme", "quant_method"]  # fmt: skip
CT_WEIGHT_KEYS = ["num_bits", "type", "symmetric", "group_size", "strategy", "actorder", "dynamic"]
SPEC_FIELDS = ["bits", "group_size", "symmetric", "scale_dtype", "layout", "partial_groups", "grid", "global_scale"]
CAST = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
        "uint32": np.uint32, "bool": np.bool_, "complex64": np.complex64, "bfloat16": ml_dtypes.bfloat16,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn}  # fmt: skip


def mutate_tensor(draw, value: np.ndarray) -> np.ndarray | None:
  """A tensor reshaped, cut, grown, cast, given NaN/Inf or random integers, or None (deleted)."""
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # casts that overflow are the point
    return _mutated(draw, value)


def _mutated(draw, value: np.ndarray) -> np.ndarray | None:
  op = draw(st.sampled_from(["transpose", "cut", "grow", "flatten", "cast", "nan", "inf", "ints", "delete"]))
  if op == "transpose":
    return np.ascontiguousarray(value.T)
  if op == "cut":
    return value[: max(0, value.shape[0] - draw(st.integers(1, 4)))]
  if op == "grow":
    return np.concatenate([value, value[:1]])
  if op == "flatten":
    return value.reshape(-1)
  if op == "cast":
    return value.astype(CAST[draw(st.sampled_from(sorted(CAST)))])
  if op in ("nan", "inf") and value.size:
    out = value.astype(np.float32 if value.dtype.kind != "f" else value.dtype).copy()
    out.flat[draw(st.integers(0, max(0, out.size - 1)))] = np.nan if op == "nan" else -np.inf
    return out
  if op in ("nan", "inf", "ints"):
    fill = draw(st.sampled_from([-1, 0, 1, 7, 255, 2**31 - 1]))
    return np.full(value.shape, fill, np.int64).astype(value.dtype)  # wrapped to the dtype's range
  return None


def mutate_tensors(draw, tensors: dict[str, np.ndarray]) -> None:
  """One or two tensors mutated (see `mutate_tensor`), or stored again under a name the config lacks."""
  for _ in range(draw(st.integers(1, 2))):
    name = draw(st.sampled_from(sorted(tensors)))
    if draw(st.integers(0, 5)) == 0:  # the same tensor under another name: a layer, bias or leaf the config lacks
      other = draw(st.sampled_from(["model.layers.2.mlp.up_proj.qweight", "lm_head.qweight", "model.norm.bias",
                                    "model/layers_9/mlp/up_proj/kernel:codes", "x:codes", "a:b:c"]))  # fmt: skip
      tensors[other] = tensors[name]
      continue
    value = mutate_tensor(draw, tensors[name])
    if value is None:
      del tensors[name]
    else:
      tensors[name] = value


def mutate_manifest(draw, path: str) -> None:
  with open(path) as f:
    manifest = json.load(f)
  entries = manifest["quantized"]
  if not entries:
    return
  leaf = draw(st.sampled_from(sorted(entries)))
  target = draw(st.sampled_from(["spec", "entry", "drop", "copy", "version"]))
  if target == "spec":
    entries[leaf]["spec"][draw(st.sampled_from(SPEC_FIELDS))] = draw(
      st.sampled_from(
        [
          2,
          3,
          4,
          8,
          16,
          32,
          64,
          -1,
          True,
          False,
          "float32",
          "bfloat16",
          "Q4_0",
          "Q8_0",
          "kernel_int4",
          "nvfp4",
          "mxfp4",
          1e-38,
          0.5,
          4096.0,
        ]
      )
      | JSON
    )
  elif target == "entry":
    entries[leaf][draw(st.sampled_from(["shape", "dtype", "axis"]))] = draw(
      st.sampled_from([[32, 32], [64, 32], [32, 64], [1, 32], 0, 1, "float16", "int8"]) | JSON
    )
  elif target == "drop":
    del entries[leaf]
  elif target == "copy":
    entries[draw(st.sampled_from(sorted(entries)))] = entries[leaf]
  else:
    manifest["format_version"] = draw(JSON)
  with open(path, "w") as f:
    json.dump(manifest, f)


def mutate_quantized_dir(draw, case: str, kind: str) -> None:
  """One or two mutations of the config, the quantization config, the tensors or (qjax) the manifest."""
  targets = ["config", "tensors", "tensors"] + (["manifest", "manifest"] if kind.startswith("qjax") else [])
  weights = os.path.join(case, "model.safetensors")
  tensors = read_safetensors(weights, list(safetensors_header(weights)))  # FP8 codes too, as ml_dtypes arrays
  for _ in range(draw(st.integers(1, 2))):
    target = draw(st.sampled_from(targets))
    if target == "tensors" and tensors:
      mutate_tensors(draw, tensors)
    elif target == "manifest":
      mutate_manifest(draw, os.path.join(case, "qjax_quantization.json"))
    else:
      path = os.path.join(case, "config.json")
      with open(path) as f:
        config = json.load(f)
      qc = config.get("quantization_config")
      groups = qc.get("config_groups") if isinstance(qc, dict) else None
      scheme = groups.get("group_0") if isinstance(groups, dict) else None
      if kind.startswith("compressed-tensors") and isinstance(scheme, dict) and draw(st.booleans()):
        qc = json.loads(json.dumps(qc))  # one scheme's weight arguments, nested two levels down
        scheme = qc["config_groups"]["group_0"]
        args = scheme.get("weights")
        scheme["weights"] = edit_json(draw, args if isinstance(args, dict) else {}, CT_WEIGHT_KEYS)
        config["quantization_config"] = edit_json(draw, qc, CT_KEYS) if draw(st.booleans()) else qc
      elif not kind.startswith("qjax") and isinstance(qc, dict) and draw(st.booleans()):
        config["quantization_config"] = edit_json(draw, qc, QC_KEYS)
      else:
        config = edit_json(draw, config, [*CONFIG_KEYS, "quantization_config", "qjax"])
      with open(path, "w") as f:
        json.dump(config, f)
  save_file(tensors, weights)


LOADERS = {
  "gptq": load_gptq,
  "awq": load_awq,
  "compressed-tensors": load_compressed_tensors,
  "compressed-tensors-fp8": load_compressed_tensors,
  "compressed-tensors-nvfp4": load_compressed_tensors,
  "qjax": lambda d: load_quantized(d)[:2],
  "qjax-nvfp4": lambda d: load_quantized(d)[:2],
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_fuzz_quantized_directories(root, kind):
  """GPTQ, AWQ, compressed-tensors and qjax directories with mutated config keys, quantization configs, tensors and
  manifests."""
  harness.check_model(*LOADERS[kind](os.path.join(root, "base", kind)))  # the pristine directory loads

  @fuzz(0.08)
  @given(data=st.data())
  def fuzz_one(data):
    case = copy_case(root, kind)
    mutate_quantized_dir(data.draw, case, kind)
    run_case(kind, case, lambda: LOADERS[kind](case), lambda loaded: harness.check_model(*loaded))

  fuzz_one()


def test_pristine_models_load(root):
  """The fuzzers' starting points are valid: each loads to its config's model."""
  base = os.path.join(root, "base")
  for name in ("sharded", "single"):
    check_loaded(SafetensorsCheckpoint(os.path.join(base, name)))
  for name in ("f32.gguf", "q8.gguf"):
    check_gguf(load_gguf(os.path.join(base, name)))
