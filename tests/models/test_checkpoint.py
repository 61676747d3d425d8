"""Checkpoint readers: Hugging Face directories, GGUF files, the default model; and their errors."""

import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.formats.default_model import default_gguf_path
from qjax.formats.gguf import tokenizer_metadata, write_gguf
from qjax.formats.gguf_reader import GgufCheckpoint, rope_permute, rope_unpermute
from qjax.models import LlamaForCausalLM, SafetensorsCheckpoint, generate
from tests.model_factory import write_random_llama


@pytest.fixture(scope="module")
def default_ckpt():
  from qjax.formats import open_checkpoint

  return open_checkpoint("default")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  return write_random_llama(str(tmp_path_factory.mktemp("small")), layers=1, hidden=32, intermediate=64)


def test_rope_permutation_round_trips_and_interleaves_halves():
  w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of dim 8
  p = rope_permute(w, 2)
  np.testing.assert_array_equal(p[:8:2], w[:4])  # even rows of a head: the first half
  np.testing.assert_array_equal(p[1:8:2], w[4:8])  # odd rows: the second half
  np.testing.assert_array_equal(rope_unpermute(p, 2), w)


@pytest.mark.slow
def test_gguf_reader_matches_transformers_gguf_loader(default_ckpt):
  """transformers dequantizes and un-permutes the shipped Q4_1 GGUF itself: an independent reader."""
  transformers = pytest.importorskip("transformers")
  path = default_gguf_path()
  ours = GgufCheckpoint(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32"
  )
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  layer = ours.layer_params(3)
  np.testing.assert_array_equal(
    layer["self_attn"]["q_proj"]["kernel"].T, state["model.layers.3.self_attn.q_proj.weight"]
  )
  np.testing.assert_array_equal(
    layer["self_attn"]["k_proj"]["kernel"].T, state["model.layers.3.self_attn.k_proj.weight"]
  )
  np.testing.assert_array_equal(layer["mlp"]["down_proj"]["kernel"].T, state["model.layers.3.mlp.down_proj.weight"])
  np.testing.assert_array_equal(ours.embed_params()["embedding"], state["model.embed_tokens.weight"])
  assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3


def test_default_model_continues_a_capital_city_prompt(default_ckpt):
  tok = default_ckpt.tokenizer()
  ids = tok("The capital of France is", return_tensors="np").input_ids
  out = generate(LlamaForCausalLM(default_ckpt.config), default_ckpt.params(), jnp.asarray(ids), max_new_tokens=3)
  assert tok.decode(np.asarray(out[0])).strip().startswith("Paris")


@pytest.mark.slow
def test_f32_gguf_export_matches_llama_cpp(default_ckpt, tmp_path):
  llama_cpp = pytest.importorskip("llama_cpp")
  path = str(tmp_path / "smollm2-f32.gguf")
  tok = default_ckpt.tokenizer()
  params = default_ckpt.params()
  write_gguf(path, default_ckpt.config, params, tokenizer_metadata(tok, default_ckpt.config.vocab_size))
  from qjax.calib.text import load_text

  text = load_text("default", "evaluation")[:2000]
  llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
  try:
    ids = llm.tokenize(text.encode(), add_bos=False)[:256]
    assert ids == tok(text).input_ids[:256]  # the GGUF tokenizer is the same tokenizer
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
  finally:
    llm.close()
  out = np.asarray(LlamaForCausalLM(default_ckpt.config).apply({"params": params}, jnp.asarray([ids]))[0])
  assert np.mean(out.argmax(-1) == ref.argmax(-1)) > 0.98
  assert np.abs(out - ref).max() < 0.1  # llama.cpp's CPU matmuls round activations differently
  # And the GGUF reads back as the same model.
  back = GgufCheckpoint(path)
  assert back.config == default_ckpt.config
  np.testing.assert_array_equal(
    back.layer_params(5)["self_attn"]["q_proj"]["kernel"], params["model"]["layers_5"]["self_attn"]["q_proj"]["kernel"]
  )


def test_missing_and_truncated_safetensors(small_dir, tmp_path):
  broken = shutil.copytree(small_dir, tmp_path / "broken")
  weights = broken / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: unreadable safetensors file .*truncated"):
    SafetensorsCheckpoint(str(broken)).params()
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
    SafetensorsCheckpoint(str(broken))


def test_unsupported_architecture_is_named(small_dir, tmp_path):
  other = shutil.copytree(small_dir, tmp_path / "gpt2")
  config = json.loads((other / "config.json").read_text())
  config["architectures"] = ["GPT2LMHeadModel"]
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json: unsupported architecture \['GPT2LMHeadModel'\]"):
    SafetensorsCheckpoint(str(other))


def test_gguf_of_another_architecture_is_named(tmp_path):
  path = str(tmp_path / "falcon.gguf")
  writer = gguf.GGUFWriter(path, "falcon")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"falcon\.gguf: GGUF architecture 'falcon' is not supported"):
    GgufCheckpoint(path)


def test_tokenizer_that_does_not_fit_the_embedding(tmp_path):
  path = write_random_llama(str(tmp_path / "tiny_vocab"), layers=1, hidden=32, intermediate=64, vocab=1000)
  with pytest.raises(ValueError, match="tokenizer has 49152 tokens but the embedding has 1000 rows"):
    SafetensorsCheckpoint(path).tokenizer()


def test_sharded_safetensors_with_an_index(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  config = transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  ckpt = SafetensorsCheckpoint(str(tmp_path))
  ids = np.arange(10)[None] % 64
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  out = LlamaForCausalLM(ckpt.config).apply({"params": ckpt.params()}, jnp.asarray(ids))
  assert np.abs(np.asarray(out) - ref).max() < 1e-4
  os.remove(tmp_path / sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1])
  with pytest.raises(FileNotFoundError, match="the index names missing weight files"):
    SafetensorsCheckpoint(str(tmp_path))


def test_large_matrices_are_read_in_row_blocks_to_the_same_values(small_dir, monkeypatch):
  """Matrices over `READ_CHUNK_ELEMENTS` (an embedding, a head) are read a row block at a time, the last one short,
  kernels transposed on the way."""
  from qjax.models import checkpoint

  whole = SafetensorsCheckpoint(small_dir).params()
  monkeypatch.setattr(checkpoint, "READ_CHUNK_ELEMENTS", 7 * 32 + 5)  # 7 rows of 32 a block; the last block short
  blocks = SafetensorsCheckpoint(small_dir).params()
  flat = lambda tree: dict(jax.tree_util.tree_leaves_with_path(tree))
  assert flat(whole).keys() == flat(blocks).keys()
  for key, value in flat(whole).items():
    np.testing.assert_array_equal(value, flat(blocks)[key], err_msg=str(key))
