"""The second built-in model, Gemma 3 270M (a Q4_K_M GGUF assembled from PyPI chunk packages): qjax reads it as
llama.cpp runs it, token for token, in perplexity and in greedy generation."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings
from qjax.eval.metrics import evaluate
from qjax.formats import GgufCheckpoint, export, open_checkpoint, parse_target
from qjax.formats.default_model import BUILTIN_MODELS, builtin_gguf_path
from qjax.models import LlamaForCausalLM, generate, logits_fn
from tests.formats.test_gguf import llama_cpp_perplexity
from tests.model_factory import quantize_like_cli

llama_cpp = pytest.importorskip("llama_cpp")


def assert_llama_cpp_reads_as_qjax(path: str, tokenizer, config, params, *, windows: int) -> None:
  """llama.cpp splits the evaluation text of the GGUF file `path` into the tokens `tokenizer` gives, and its
  perplexity on the first `windows` windows of 512 is within 1% of qjax's with `params`."""
  text = texts.load_text("default", "evaluation")
  ids = texts.tokenize(tokenizer, text)
  vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
  try:
    assert vocab.tokenize(text.encode(), add_bos=True, special=False) == ids.tolist()
  finally:
    vocab.close()
  chosen = texts.eval_windows(ids, 512, max_windows=windows)
  ours = evaluate(logits_fn(config, params), chosen, show_progress=False).perplexity
  theirs = llama_cpp_perplexity(path, chosen)
  print(f"{os.path.basename(path)}, {windows} x 512 tokens: perplexity qjax {ours:.3f}, llama.cpp {theirs:.3f}")
  assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


@pytest.fixture(scope="module")
def gemma():
  return open_checkpoint("gemma3-270m")  # the cached float32 directory of the assembled, SHA-256-checked GGUF


@pytest.mark.slow
def test_tokens_and_perplexity_are_llama_cpps_on_the_same_gguf(gemma):
  config = gemma.config
  assert config.gemma and config.vocab_size == 262144 and config.hidden_size == 640
  assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
  path = builtin_gguf_path("gemma3-270m")
  # llama.cpp rounds activations to 8 bits in its quantized dot products: measured 0.75% apart (38.54 vs 38.83).
  assert_llama_cpp_reads_as_qjax(path, gemma.tokenizer(), config, gemma.params(), windows=2)


@pytest.mark.slow
def test_its_gguf_export_is_tokenized_and_scored_by_llama_cpp_as_by_qjax(gemma, tmp_path):
  """qjax's own Q8_0 file of the model: llama.cpp splits the text into qjax's tokens (SentencePiece without a space
  prefix, written as add_space_prefix = false) and scores them as qjax scores the file's weights."""
  s = Settings(model="gemma3-270m", method="none", export="gguf:Q8_0")
  _, config, params = quantize_like_cli(s, checkpoint=gemma)
  path = export(parse_target(s.export), str(tmp_path / "q8"), config, params, gemma.tokenizer(), name="gemma3-270m")
  back = GgufCheckpoint(path)
  assert_llama_cpp_reads_as_qjax(path, gemma.tokenizer(), back.config, back.params(), windows=1)


@pytest.mark.slow
def test_greedy_continuation_is_llama_cpps(gemma):
  tokenizer = gemma.tokenizer()
  prompt = tokenizer.encode("One, two, three, four,")
  out = generate(LlamaForCausalLM(gemma.config), gemma.params(), jnp.asarray([prompt]), max_new_tokens=8)
  ours = np.asarray(out)[0].tolist()
  assert tokenizer.decode(ours).startswith(" five, six, seven, eight")
  llm = llama_cpp.Llama(model_path=builtin_gguf_path("gemma3-270m"), n_ctx=64, verbose=False)
  try:
    theirs = [t for _, t in zip(range(8), llm.generate(prompt, temp=0.0, top_k=1), strict=False)]
  finally:
    llm.close()
  assert ours == theirs


def test_a_corrupt_chunk_is_refused_by_its_digest(tmp_path, monkeypatch):
  import dataclasses

  from qjax.core.errors import InputError
  from qjax.formats import default_model

  pieces = []
  for i, data in enumerate((b"GGUF", b"chunks")):
    pieces.append(tmp_path / f"part{i}")
    pieces[-1].write_bytes(data)
  model = dataclasses.replace(BUILTIN_MODELS["gemma3-270m"], chunks=tuple(("m", str(p)) for p in pieces))
  monkeypatch.setitem(default_model.BUILTIN_MODELS, "gemma3-270m", model)
  monkeypatch.setattr(default_model, "_chunk_path", lambda model, module, relative: relative)
  monkeypatch.setenv("QJAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(
    InputError, match=r"part0: the chunks of gemma-3-270m-q4_k_m.gguf assemble to SHA-256 [0-9a-f]{64}"
  ):
    builtin_gguf_path("gemma3-270m")
  assert not list((tmp_path / "cache").iterdir())  # nothing half-written is left to be trusted later
