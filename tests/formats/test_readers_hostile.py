"""Hostile model and text files: every reader refuses them with an `InputError` naming the file, before reading
weights where it can; none hangs, reads outside the model directory, or silently drops or invents a tensor."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qjax.calib.text import load_text
from qjax.core import InputError, QSpec
from qjax.formats import load_model, save_gptq
from qjax.formats.awq import load_awq
from qjax.formats.gguf_reader import GgufCheckpoint
from qjax.formats.gptq import load_gptq
from qjax.formats.native import load_quantized
from qjax.models import SafetensorsCheckpoint
from tests.fuzz import harness
from tests.model_factory import quantized_params

INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00002.safetensors"
SECOND = "model-00002-of-00002.safetensors"


def refusal_in_a_child(call: str, timeout: float = 60.0) -> str:
  """What ``call`` raises (``"<type>: <message>"``, or "returned") run in a fresh interpreter, failing on a hang.

  A thread cannot time the call out: code blocked inside a native library (safetensors opening a FIFO) keeps
  Python's global lock, so the whole process stops.
  """
  code = (
    "import sys\n"
    "from qjax.calib.text import load_text\n"
    "from qjax.models import SafetensorsCheckpoint\n"
    "from qjax.formats.gguf_reader import GgufCheckpoint\n"
    f"try:\n  {call}\n  print('returned')\n"
    "except BaseException as e:\n  print(f'{type(e).__name__}: {e}')\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  try:
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip
  except subprocess.TimeoutExpired:
    pytest.fail(f"{call}: no answer within {timeout} s (blocked opening a FIFO?)")
  return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]


@pytest.fixture
def sharded(tmp_path):
  """A tiny float model in two shards with an index, and a valid safetensors file outside its directory."""
  model = tmp_path / "model"
  harness.write_hf_dir(str(model), shards=2)
  shutil.copy(model / SHARD, tmp_path / "outside.safetensors")
  return model


def point_index(model, file: str) -> None:
  """Moves every tensor of the first shard to `file` in the index."""
  index = json.loads((model / INDEX).read_text())
  index["weight_map"] = {name: f if f == SECOND else file for name, f in index["weight_map"].items()}
  (model / INDEX).write_text(json.dumps(index))


# ---- shard names in an index ----


def test_index_entry_outside_the_directory_is_refused_the_same_whether_it_exists_or_not(sharded):
  messages = []
  for entry in ("../outside.safetensors", "../absent.safetensors"):
    point_index(sharded, entry)
    with pytest.raises(InputError, match=rf"{INDEX}: entry .* expected a file name inside the model directory") as e:
      SafetensorsCheckpoint(str(sharded))
    messages.append(str(e.value).replace(entry, "ENTRY"))
  assert messages[0] == messages[1]


def test_absolute_and_linked_shards_outside_the_directory_are_refused(sharded, tmp_path):
  point_index(sharded, str(tmp_path / "outside.safetensors"))
  with pytest.raises(InputError, match="expected a file name inside the model directory"):
    SafetensorsCheckpoint(str(sharded))
  os.symlink(tmp_path / "outside.safetensors", sharded / "link.safetensors")
  point_index(sharded, "link.safetensors")
  with pytest.raises(InputError, match=r"entry 'link\.safetensors' expected a file name inside the model directory"):
    SafetensorsCheckpoint(str(sharded))


def test_fifo_shard_is_refused_without_opening_it(sharded):
  fifo = str(sharded / "fifo.safetensors")
  os.mkfifo(fifo)
  point_index(sharded, "fifo.safetensors")
  outcome = refusal_in_a_child(f"SafetensorsCheckpoint({str(sharded)!r}).params()")
  assert outcome.startswith("InputError: ") and "fifo.safetensors' expected a regular file" in outcome, outcome
  os.mkfifo(sharded / "model.gguf")
  outcome = refusal_in_a_child(f"GgufCheckpoint({str(sharded / 'model.gguf')!r})")
  assert outcome.startswith("InputError: ") and "model.gguf: expected a regular file" in outcome, outcome


def test_directory_shard_is_refused_at_open(sharded):
  (sharded / "dir.safetensors").mkdir()
  point_index(sharded, "dir.safetensors")
  with pytest.raises(InputError, match=r"dir\.safetensors' expected a regular file"):
    SafetensorsCheckpoint(str(sharded))


@pytest.mark.parametrize(
  ("content", "message"),
  [
    ({"weight_map": {"model.norm.weight": 1}}, "weight_map entry 'model.norm.weight' expected a file name, got 1"),
    ({"weight_map": ["model.safetensors"]}, "weight_map expected an object of tensor name -> file name"),
    ([], "weight_map expected an object"),
    ("{not json", "not valid JSON"),
    (None, r"expected at most 67108864 bytes of JSON, got 68157440"),
  ],
  ids=["entry_not_a_string", "map_is_a_list", "not_an_object", "not_json", "too_large"],
)
def test_malformed_index_is_refused(sharded, content, message):
  path = sharded / INDEX
  if content is None:
    with open(path, "wb") as f:
      f.truncate(65 << 20)  # sparse: 65 MB of zero bytes, refused before it is read
  else:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
  with pytest.raises(InputError, match=message):
    SafetensorsCheckpoint(str(sharded))


def test_index_and_shards_must_agree(sharded):
  index = json.loads((sharded / INDEX).read_text())
  name = next(n for n, f in index["weight_map"].items() if f == SHARD)
  del index["weight_map"][name]
  (sharded / INDEX).write_text(json.dumps(index))
  with pytest.raises(InputError, match=rf"{SHARD}: holds tensors the index does not list: \['{name}'\]"):
    SafetensorsCheckpoint(str(sharded))


# ---- safetensors files ----


def test_hostile_header_length_is_refused_before_safetensors_reads_it(tmp_path):
  harness.write_hf_dir(str(tmp_path))
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
  with pytest.raises(InputError, match=r"model\.safetensors: unreadable safetensors file \(header length 4611686"):
    SafetensorsCheckpoint(str(tmp_path))


# ---- the config against the tensors ----


@pytest.mark.parametrize(
  ("changes", "message"),
  [
    (
      {"hidden_size": 64},
      r"tensor model\.embed_tokens\.weight expected shape \(64, 64\) from .*config\.json, got "
      r"\(64, 32\)",
    ),
    ({"head_dim": 16}, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight expected shape \(64, 32\) from "),
    ({"num_hidden_layers": 1}, r"tensors the config does not describe: \['model\.layers\.1\..*num_hidden_layers=1"),
    ({"num_hidden_layers": 3}, r"tensors missing from the checkpoint: layer 2 has none, but .*config\.json says"),
    ({"num_hidden_layers": 2**31 - 1}, "layer 2 has none"),
    ({"attention_bias": True}, r"tensors missing from the checkpoint \(expected by .*config\.json\): \['model\.layers"),
  ],
  ids=["hidden_size", "head_dim", "fewer_layers", "more_layers", "absurd_layers", "bias"],
)
def test_config_that_does_not_match_the_weights_is_refused_at_open(tmp_path, changes, message):
  harness.write_hf_dir(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
  with pytest.raises(InputError, match=message):
    SafetensorsCheckpoint(str(tmp_path))


def test_a_tied_head_stored_twice_is_accepted_and_stays_tied(tmp_path):
  harness.write_hf_dir(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
  checkpoint = SafetensorsCheckpoint(str(tmp_path))  # the file holds lm_head.weight of the embedding's shape
  assert "lm_head" not in checkpoint.head_params()


def test_tensor_the_config_does_not_describe_is_not_dropped(tmp_path):
  harness.write_hf_dir(str(tmp_path))
  weights = str(tmp_path / "model.safetensors")
  with safe_open(weights, "numpy") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}, weights)
  with pytest.raises(InputError, match=r"tensors the config does not describe: \['model\.layers\.0\.self_attn\.q_proj"):
    SafetensorsCheckpoint(str(tmp_path))


def test_integer_and_nan_weights_are_refused(tmp_path):
  harness.write_hf_dir(str(tmp_path))
  weights = str(tmp_path / "model.safetensors")
  with safe_open(weights, "numpy") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  save_file({**tensors, "model.norm.weight": np.ones(32, np.int32)}, weights)
  with pytest.raises(InputError, match=r"tensor model\.norm\.weight expected a float dtype .*, got I32"):
    SafetensorsCheckpoint(str(tmp_path))
  save_file({**tensors, "model.norm.weight": np.full(32, np.nan, np.float32)}, weights)
  checkpoint = SafetensorsCheckpoint(str(tmp_path))
  with pytest.raises(InputError, match=r"model\.safetensors: tensor model\.norm\.weight holds NaN or Inf"):
    checkpoint.params()


@pytest.mark.parametrize(
  ("key", "value"),
  [
    ("hidden_size", "abc"),
    ("hidden_size", [32]),
    ("hidden_size", True),
    ("hidden_size", -32),
    ("vocab_size", 2**40),
    ("num_attention_heads", 0),
    ("num_key_value_heads", 3),
    ("rms_norm_eps", "tiny"),
    ("tie_word_embeddings", "false"),
    ("architectures", "LlamaForCausalLM"),
    ("rope_scaling", "linear"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
    ("eos_token_id", "</s>"),
  ],
)
def test_config_values_of_the_wrong_type_or_range_name_the_key(tmp_path, key, value):
  harness.write_hf_dir(str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
  with pytest.raises(InputError, match=rf"config\.json: .*{key.split('_')[0]}"):
    SafetensorsCheckpoint(str(tmp_path))


def test_config_that_is_a_fifo_is_refused_without_opening_it(tmp_path):
  harness.write_hf_dir(str(tmp_path))
  os.remove(tmp_path / "config.json")
  os.mkfifo(tmp_path / "config.json")
  outcome = refusal_in_a_child(f"SafetensorsCheckpoint({str(tmp_path)!r})")
  assert outcome.startswith("InputError: ") and "config.json: expected a regular file" in outcome, outcome


# ---- GGUF ----


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  harness.write_gguf_file(path)
  return path, harness.gguf_layout(path)


def test_tiny_gguf_written_by_qjax_loads(tiny_gguf):
  path, _ = tiny_gguf
  checkpoint = GgufCheckpoint(path)
  harness.check_model(checkpoint.config, checkpoint.params())
  assert len(checkpoint.tokenizer()) == 64


U64, U32 = "<Q", "<I"
GGUF_MUTATIONS = {
  "2**40_metadata_entries": ("GGUF.kv_count#0", U64, 2**40, "claims 1099511627776 metadata entries"),
  "2**40_tensors": ("GGUF.tensor_count#0", U64, 2**40, "1099511627776 tensors, more than its"),
  "version_7": ("GGUF.version#0", U32, 7, "GGUF version 7 is not supported"),
  "key_length_2**62": ("general.architecture#0", U64, 2**62, "metadata key 0 needs 4611686018427387904 bytes"),
  "unknown_value_type": ("general.name#2", U32, 99, "has unknown type 99"),
  "string_length_beyond_file": ("general.name#3", U64, 2**32, "needs 4294967296 bytes"),
  "array_of_2**40_tokens": ("tokenizer.ggml.tokens#4", U64, 2**40, "claims 1099511627776 items"),
  "array_item_type_unknown": ("tokenizer.ggml.token_type#3", U32, 77, "items of unknown type 77"),
  "five_dimensions": ("token_embd.weight#2", U32, 5, "has 5 dimensions, expected 1 to 4"),
  "zero_dimension": ("token_embd.weight#3", U64, 0, r"dimensions \[0, 64\]"),
  "unknown_ggml_type": ("token_embd.weight#4", U32, 999, "ggml type 999"),
  "offset_beyond_file": ("output.weight#5", U64, 2**40, "expected an offset aligned to 32 inside the file"),
  "unaligned_offset": ("output.weight#5", U64, 3, "expected an offset aligned to 32"),
}


@pytest.mark.parametrize("mutation", list(GGUF_MUTATIONS))
def test_mutated_gguf_header_is_refused(tiny_gguf, tmp_path, mutation):
  source, layout = tiny_gguf
  part, fmt, value, message = GGUF_MUTATIONS[mutation]
  path = str(tmp_path / "m.gguf")
  shutil.copy(source, path)
  offset, size = layout[part]
  assert struct.calcsize(fmt) <= size
  harness.patch_bytes(path, offset, struct.pack(fmt, value))
  with pytest.raises(InputError, match=rf"m\.gguf: .*{message}"):
    GgufCheckpoint(path).params()


def open_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def test_truncated_and_foreign_gguf_files_are_refused(tiny_gguf, tmp_path):
  source, _ = tiny_gguf
  data = open_bytes(source)
  path = tmp_path / "m.gguf"
  for cut, message in ((len(data) - 100, "is it truncated"), (2000, "is it truncated"), (10, "not a GGUF file")):
    path.write_bytes(data[:cut])
    with pytest.raises(InputError, match=message):
      GgufCheckpoint(str(path))
  path.write_bytes(b"GGML" + data[4:])
  with pytest.raises(InputError, match=r"magic b'GGML', expected b'GGUF'"):
    GgufCheckpoint(str(path))


@pytest.mark.parametrize(
  ("part", "value", "message"),
  [
    ("llama.embedding_length#3", 48, r"tensor token_embd\.weight expected shape \(64, 48\) from the metadata, got"),
    ("llama.block_count#3", 1, r"tensors the config does not describe: \['blk\.1\."),
    ("llama.block_count#3", 3, "tensors missing from the checkpoint: layer 2 has none"),
    ("llama.attention.head_count#3", 3, "attention.head_count=3 expected a multiple of"),
    ("llama.attention.head_count#3", 0, r"attention\.head_count expected an integer in \[1, 2\*\*31\), got 0"),
  ],
)
def test_gguf_metadata_that_does_not_match_its_tensors_is_refused_at_open(tiny_gguf, tmp_path, part, value, message):
  source, layout = tiny_gguf
  path = str(tmp_path / "m.gguf")
  shutil.copy(source, path)
  harness.patch_bytes(path, layout[part][0], struct.pack(U32, value))
  with pytest.raises(InputError, match=message):
    GgufCheckpoint(path)


def test_gguf_of_another_architecture_is_named_before_tensor_data_is_read(tiny_gguf, tmp_path, monkeypatch):
  import gguf

  source, layout = tiny_gguf
  path = str(tmp_path / "m.gguf")
  shutil.copy(source, path)
  offset, size = layout["general.architecture#4"]
  harness.patch_bytes(path, offset, b"gpt2x"[:size])
  monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("tensor data was read"))
  with pytest.raises(InputError, match="GGUF architecture 'gpt2x' is not supported"):
    GgufCheckpoint(path)


# ---- quantized directories ----


@pytest.fixture(scope="module")
def gptq_dir(model_dir, tmp_path_factory):
  checkpoint, params = quantized_params(model_dir, QSpec(bits=4, group_size=32))
  out = str(tmp_path_factory.mktemp("gptq") / "gptq")
  save_gptq(out, checkpoint.config, params, checkpoint.tokenizer())
  return out


def rewrite_tensor(directory: str, name: str, fn) -> None:
  weights = os.path.join(directory, "model.safetensors")
  with safe_open(weights, "numpy") as f:
    tensors = {n: f.get_tensor(n) for n in f.keys()}
  tensors[name] = fn(tensors[name])
  save_file(tensors, weights, metadata={"format": "pt"})


def with_nan(x: np.ndarray) -> np.ndarray:
  x = x.copy()
  x.flat[3] = np.nan
  return x


@pytest.mark.parametrize(
  "tensor", ["model.layers.1.mlp.down_proj.scales", "model.embed_tokens.weight"], ids=["scale", "dense"]
)
def test_nan_in_a_gptq_directory_is_refused_at_load(gptq_dir, tmp_path, tensor):
  out = shutil.copytree(gptq_dir, tmp_path / "nan")
  rewrite_tensor(str(out), tensor, with_nan)
  with pytest.raises(InputError, match=rf"tensor {tensor} holds NaN or Inf"):
    load_model(str(out))


@pytest.mark.parametrize(
  ("changes", "message"),
  [
    ({"bits": 4.0}, r"GPTQ bits must be one of \(2, 3, 4, 8\), got 4\.0"),
    ({"group_size": "32"}, r"GPTQ group_size must be -1 or in \[1, 2\*\*31\), got '32'"),
    ({"group_size": 2**63}, r"GPTQ group_size must be -1 or in \[1, 2\*\*31\), got 9223372036854775808"),
    ({"group_size": 4096}, r"q_proj: group_size=4096 expected -1 or at most max\(in=64, 1024\)"),
    ({"sym": "yes"}, "GPTQ sym must be true or false, got 'yes'"),
    ({"dynamic": {"-:.*": {}}}, "modules left unquantized by a negative pattern are not supported"),
    ({"dynamic": {"+:model": {"bits": 5}}}, r"dynamic\['\+:model'\]: GPTQ bits must be one of"),
    ({"dynamic": {"+:(": {"bits": 8}}}, r"dynamic\['\+:\('\]: not a regular expression"),
    ({"dynamic": {"+:model.layers.0.mlp": {"bits": 8}}}, r"layers\.0\.mlp\.\w+_proj\.qweight: expected shape"),
  ],
)
def test_gptq_quantization_config_values_of_the_wrong_type(gptq_dir, tmp_path, changes, message):
  out = shutil.copytree(gptq_dir, tmp_path / "bad")
  config = json.loads((out / "config.json").read_text())
  config["quantization_config"].update(changes)
  (out / "config.json").write_text(json.dumps(config))
  with pytest.raises(InputError, match=message):
    load_gptq(str(out))


def test_tensor_of_a_dtype_numpy_lacks_is_refused_before_it_is_read(gptq_dir, tmp_path):
  import ml_dtypes

  out = shutil.copytree(gptq_dir, tmp_path / "f8")
  rewrite_tensor(str(out), "model.layers.0.mlp.up_proj.qweight", lambda x: x.astype(ml_dtypes.float8_e5m2))
  with pytest.raises(InputError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.qweight has dtype F8_E5M2; qjax reads"):
    load_gptq(str(out))
  # FP8 E4M3 is read (compressed-tensors' FP8 codes), and refused where the format expects integer words
  e4m3 = shutil.copytree(gptq_dir, tmp_path / "e4m3")
  rewrite_tensor(str(e4m3), "model.layers.0.mlp.up_proj.qweight", lambda x: x.astype(ml_dtypes.float8_e4m3fn))
  with pytest.raises(InputError, match=r"up_proj\.qweight: expected shape \(8, 128\) int32 .* got \(8, 128\) float8"):
    load_gptq(str(e4m3))


def test_nan_scale_in_an_awq_directory_is_refused_at_load(tmp_path):
  harness.write_quantized_dir(str(tmp_path / "awq"), "awq")
  rewrite_tensor(str(tmp_path / "awq"), "model.layers.0.self_attn.q_proj.scales", with_nan)
  with pytest.raises(InputError, match=r"awq: tensor model\.layers\.0\.self_attn\.q_proj\.scales holds NaN or Inf"):
    load_awq(str(tmp_path / "awq"))


@pytest.fixture(scope="module")
def qjax_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("qjax") / "qjax")
  harness.write_quantized_dir(out, "qjax")
  return out


Q_PROJ = "model/layers_0/self_attn/q_proj/kernel"


def edit_manifest(directory, fn) -> None:
  path = os.path.join(directory, "qjax_quantization.json")
  with open(path) as f:
    manifest = json.load(f)
  fn(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


@pytest.mark.parametrize(
  ("edit", "message"),
  [
    (
      lambda m: m["quantized"][Q_PROJ]["spec"].update(group_size=16),
      rf"tensor {Q_PROJ}:scale expected shape \(2, 32\)",
    ),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(bits=8), rf"tensor {Q_PROJ}:codes expected shape \(8, 32\) U32"),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(bits=7), r"`QSpec` expected bits in"),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(symmetric=True), rf"tensor {Q_PROJ}:zero is not part of"),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(bits="4"), r"spec\.bits expected int, got '4'"),
    (lambda m: m["quantized"][Q_PROJ].update(shape=[32, 64]), rf"quantized {Q_PROJ} expected shape \(32, 32\)"),
    (lambda m: m["quantized"][Q_PROJ].update(axis=2), "axis expected 0 or 1, got 2"),
    (lambda m: m["quantized"][Q_PROJ].update(dtype="int8"), "dtype expected float32, bfloat16 or float16"),
    (lambda m: m["quantized"].pop(Q_PROJ), rf"tensors the config does not describe: \['{Q_PROJ}:codes'"),
    (lambda m: m.update(quantized=[]), "quantized expected an object of leaf path -> entry"),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(global_scale=2.0), "global_scale belongs to the nvfp4 grid"),
    (lambda m: m["quantized"][Q_PROJ]["spec"].update(tensor_scale=0.5), "tensor_scale belongs to the tensor-affine"),
    (
      lambda m: m["quantized"][Q_PROJ]["spec"].update(grid="nvfp4", global_scale=-1.0),
      "nvfp4 grid expected a positive finite global_scale above 1e-35, got -1.0",
    ),
  ],
  ids=[
    *("group_size", "bits", "bad_bits", "symmetric", "bits_type", "shape", "axis", "dtype", "dropped", "not_object"),
    *("global_scale_without_nvfp4", "tensor_scale_without_per_tensor", "negative_global_scale"),
  ],
)
def test_qjax_directory_whose_tensors_disagree_with_its_manifest(qjax_dir, tmp_path, edit, message):
  out = shutil.copytree(qjax_dir, tmp_path / "bad")
  edit_manifest(out, edit)
  with pytest.raises(InputError, match=message):
    load_quantized(str(out))


@pytest.mark.parametrize(
  ("tensor", "fn", "message"),
  [
    (f"{Q_PROJ}:scale", with_nan, "holds NaN or Inf"),
    ("model/norm/scale", lambda x: np.ones(48, np.float32), r"tensor model/norm/scale expected shape \(32,\) from"),
    (f"{Q_PROJ}:codes", lambda x: x[:, :16], rf"tensor {Q_PROJ}:codes expected shape \(4, 32\) U32"),
  ],
  ids=["nan_scale", "dense_shape", "codes_shape"],
)
def test_qjax_directory_whose_tensors_are_wrong(qjax_dir, tmp_path, tensor, fn, message):
  out = shutil.copytree(qjax_dir, tmp_path / "bad")
  rewrite_tensor(str(out), tensor, fn)
  with pytest.raises(InputError, match=message):
    load_quantized(str(out))


def test_qjax_directory_with_a_permutation_that_is_not_one(qjax_dir, tmp_path):
  out = shutil.copytree(qjax_dir, tmp_path / "bad")
  weights = str(out / "model.safetensors")
  with safe_open(weights, "numpy") as f:
    tensors = {n: f.get_tensor(n) for n in f.keys()}
  save_file({**tensors, f"{Q_PROJ}:perm": np.zeros(32, np.int32)}, weights)
  with pytest.raises(InputError, match=rf"tensor {Q_PROJ}:perm expected a permutation of 0\.\.31"):
    load_quantized(str(out))


# ---- text ----


def test_text_that_is_not_utf8_names_the_byte_offset(tmp_path):
  path = tmp_path / "calib.txt"
  path.write_bytes("héllo ".encode() + b"\xff\xfe rest")
  with pytest.raises(InputError, match=r"calib\.txt: expected UTF-8 text, got byte 0xff at offset 7"):
    load_text(str(path), "calibration")


def test_text_that_is_empty_a_directory_or_a_fifo_is_refused(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b" \n\t")
  with pytest.raises(InputError, match=r"empty\.txt: expected some text, got only whitespace"):
    load_text(str(tmp_path / "empty.txt"), "evaluation")
  with pytest.raises(InputError, match="expected a regular text file"):
    load_text(str(tmp_path), "evaluation")
  fifo = str(tmp_path / "fifo.txt")
  os.mkfifo(fifo)
  outcome = refusal_in_a_child(f"load_text({fifo!r}, 'evaluation')")
  assert outcome.startswith("InputError: ") and "fifo.txt: expected a regular text file" in outcome, outcome


def test_text_newlines_read_as_text_mode_reads_them(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"a\r\nb\rc\n")
  assert load_text(str(tmp_path / "t.txt"), "evaluation") == "a\nb\nc\n"
