"""GGUF export against llama.cpp itself: loading, byte equality with `llama_model_quantize`, perplexity."""

import ctypes
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, plan, run
from qjax.core import dequantize
from qjax.core.tree import leaves_with_paths
from qjax.eval.metrics import evaluate
from qjax.formats import GgufCheckpoint, open_checkpoint
from qjax.formats import gguf as gguf_format
from qjax.formats.gguf import tokenizer_metadata, write_gguf
from qjax.formats.targets import export, parse_target
from qjax.models import logits_fn
from qjax.transforms import gguf_recipes, quantize_params
from tests.model_factory import quantize_like_cli, write_random_llama

llama_cpp = pytest.importorskip("llama_cpp")


def llama_quantize(src: str, dst: str, recipe: str) -> None:
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{recipe}")
  assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


def assert_same_tensors(ours: str, theirs: str) -> None:
  a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
  b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
  assert sorted(a) == sorted(b)
  types = {n: (a[n].tensor_type.name, b[n].tensor_type.name) for n in a if a[n].tensor_type != b[n].tensor_type}
  assert not types, types
  differ = [n for n in a if not np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))]
  assert not differ, differ


def export_f32(model: str, out: str, arch: str, keys: list[str] | None = None) -> tuple[str, gguf.GGUFReader]:
  """``(path, reader)`` of qjax's F32 GGUF file of `model` (``qjax quantize --method=none --export=gguf:F32``), checked
  to declare architecture `arch` and, given `keys`, exactly those ``<arch>.*`` metadata keys."""
  path = run(Settings(model=model, method="none", export="gguf:F32", eval_windows=0, out=out), show_progress=False)[1]
  reader = gguf.GGUFReader(path)
  assert reader.fields["general.architecture"].contents() == arch
  if keys is not None:
    assert sorted(k for k in reader.fields if k.startswith(f"{arch}.")) == keys
  return path, reader


def assert_f32_reads_back_and_runs_in_llama_cpp(checkpoint, f32: str, window: np.ndarray) -> GgufCheckpoint:
  """qjax's F32 GGUF file of `checkpoint` reads back tensor for tensor, and llama.cpp's logits on `window` are
  qjax's within 2e-3 of the largest. Returns the file read back."""
  back = GgufCheckpoint(f32)
  for (path, a), (_, b) in zip(leaves_with_paths(checkpoint.params()), leaves_with_paths(back.params()), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
  ours = np.asarray(logits_fn(back.config, back.params())(jnp.asarray(window[None])))[0]
  theirs = llama_cpp_logits(f32, window)
  assert np.abs(ours - theirs).max() < 2e-3 * np.abs(ours).max()
  return back


def assert_same_metadata(ours: str, theirs: str, *, except_keys: tuple[str, ...] = ()) -> None:
  """Every metadata field of the two files has the same value, but `except_keys`."""
  fields = lambda path: {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k not in except_keys}
  a, b = fields(ours), fields(theirs)
  assert a.keys() == b.keys(), set(a) ^ set(b)
  differ = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
  assert not differ, differ


def assert_recipe_is_llama_quantizes(model: str, f32: str, tmp_path, recipe: str = "Q4_K_M") -> str:
  """qjax's `recipe` file of `model` is `llama_model_quantize`'s of the F32 file `f32`, tensor for tensor and
  metadata field for field (but ``general.quantized_by``, which llama.cpp copies from the F32 file). Returns qjax's
  file."""
  ours = run(Settings(model=model, method="none", export=f"gguf:{recipe}", eval_windows=0, out=str(tmp_path / "q")),
             show_progress=False)[1]  # fmt: skip
  llama_quantize(f32, str(tmp_path / "llama.gguf"), recipe)
  assert_same_tensors(ours, str(tmp_path / "llama.gguf"))
  assert_same_metadata(ours, str(tmp_path / "llama.gguf"), except_keys=("general.quantized_by",))
  return ours


def llama_cpp_perplexity(path: str, windows: np.ndarray) -> float:
  llm = llama_cpp.Llama(model_path=path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                        verbose=False)  # fmt: skip
  try:
    nll, n = 0.0, 0
    for w in windows:
      llm.reset()
      llm.eval(w.tolist())
      logits = np.asarray(llm.scores[: len(w)], np.float64)[:-1]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
      n += len(w) - 1
  finally:
    llm.close()
  return float(np.exp(nll / n))


@pytest.fixture(scope="module")
def f32_export(tmp_path_factory):
  return export_f32("default", str(tmp_path_factory.mktemp("f32")), "llama")[0]


@pytest.mark.slow
# The fallbacks of 576-wide rows (Q4_K -> Q5_0, IQ4_XS -> IQ4_NL) and Q8_0 on the real model; every recipe on
# k-quant widths: test_every_recipe_matches_llama_quantize_on_k_quant_widths; every block type: tests/core.
@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q8_0", "IQ4_XS"])
def test_default_model_export_is_llama_quantize_byte_for_byte(recipe, f32_export, tmp_path):
  checkpoint, config, params = quantize_like_cli(Settings(method="none", export=f"gguf:{recipe}"))
  target = parse_target(f"gguf:{recipe}")
  ours = export(target, str(tmp_path / recipe), config, params, checkpoint.tokenizer(), name="default")
  theirs = str(tmp_path / f"llama-{recipe}.gguf")
  llama_quantize(f32_export, theirs, recipe)
  assert_same_tensors(ours, theirs)
  # Perplexity through llama.cpp equals perplexity through qjax's forward on the same quantized weights.
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))
  windows = texts.eval_windows(tokens, 256, max_windows=3)
  ours_ppl = evaluate(logits_fn(checkpoint.config, params), windows, show_progress=False).perplexity
  theirs_ppl = llama_cpp_perplexity(ours, windows)
  assert abs(ours_ppl - theirs_ppl) / theirs_ppl < 0.01, (ours_ppl, theirs_ppl)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
  """A random model whose rows are whole 256-blocks, so every recipe picks its k-quant types."""
  path = write_random_llama(str(tmp_path_factory.mktemp("wide")), layers=8, hidden=256, intermediate=768, heads=4,
                            kv_heads=1)  # fmt: skip
  out = str(tmp_path_factory.mktemp("wide_f32"))
  s = Settings(model=path, method="none", export="gguf:F32", eval_windows=0, out=out)
  return path, run(s, show_progress=False)[1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(gguf_recipes.RECIPES))
def test_every_recipe_matches_llama_quantize_on_k_quant_widths(recipe, wide_model, tmp_path):
  model, f32 = wide_model
  s = Settings(model=model, method="none", export=f"gguf:{recipe}", eval_windows=0, out=str(tmp_path / "q"))
  ours = run(s, show_progress=False)[1]
  theirs = str(tmp_path / "llama.gguf")
  llama_quantize(f32, theirs, recipe)
  assert_same_tensors(ours, theirs)


def test_imatrix_export_uses_float_model_statistics(wide_model, tmp_path):
  model, _ = wide_model
  s = Settings(model=model, method="none", export="gguf:Q4_K_M", imatrix=True, nsamples=4, seqlen=64,
               eval_windows=0, out=str(tmp_path / "imat"))  # fmt: skip
  plain = Settings(model=model, method="none", export="gguf:Q4_K_M", eval_windows=0, out=str(tmp_path / "plain"))
  checkpoint = open_checkpoint(model)
  _, _, with_imatrix = quantize_like_cli(s, checkpoint=checkpoint)
  _, _, without = quantize_like_cli(plain, checkpoint=checkpoint)
  a = with_imatrix["model"]["layers_3"]["mlp"]["up_proj"]["kernel"]
  b = without["model"]["layers_3"]["mlp"]["up_proj"]["kernel"]
  assert a.spec.layout == b.spec.layout == "Q4_K"
  assert not np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
  # The embedding and output never take an importance matrix (llama.cpp does not collect one for them).
  np.testing.assert_array_equal(with_imatrix["lm_head"]["kernel"].codes, without["lm_head"]["kernel"].codes)
  report, written, _ = run(s, show_progress=False)
  assert report.evaluation is None and os.path.exists(written)


def test_gguf_reads_back_as_the_dequantized_params(wide_model, tmp_path):
  model, _ = wide_model
  checkpoint = open_checkpoint(model)
  params = quantize_params(checkpoint.params(), gguf_recipes.gguf_recipe("Q4_K_M", checkpoint.config))
  path = str(tmp_path / "m.gguf")
  write_gguf(path, checkpoint.config, params, tokenizer_metadata(checkpoint.tokenizer(), checkpoint.config.vocab_size))
  back = GgufCheckpoint(path)
  q = params["model"]["layers_2"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(back.layer_params(2)["self_attn"]["q_proj"]["kernel"], np.asarray(dequantize(q)))
  ids = jnp.asarray(np.arange(40)[None] % 1000)
  np.testing.assert_allclose(logits_fn(back.config, back.params())(ids), logits_fn(back.config, params)(ids), atol=1e-4)


def test_bad_inputs(tmp_path):
  config = open_checkpoint("default").config
  with pytest.raises(ValueError, match=r"--export expected gguf:<TYPE> \(TYPE one of .*Q4_K_M.*got 'gguf:Q4_K_X'"):
    plan(Settings(method="none", export="gguf:Q4_K_X"), config)
  with pytest.raises(ValueError, match="fits no ggml block size"):
    gguf_recipes.fallback("Q4_K", 100)
  with pytest.raises(ValueError, match="a GGUF file has no g_idx"):
    plan(Settings(method="gptq", desc_act=True, export="gguf:Q4_K_M"), config)
  checkpoint = open_checkpoint("default")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    write_gguf(str(tmp_path / "missing" / "m.gguf"), checkpoint.config, {}, [])


def test_unigram_tokenizer_cannot_be_expressed():
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast

  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0)))
  with pytest.raises(ValueError, match="Unigram tokenizer cannot be expressed in GGUF"):
    tokenizer_metadata(tok, 2)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
  checkpoint = open_checkpoint("default")

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(gguf_format.gguf.GGUFWriter, "write_tensor_data", boom)
  path = tmp_path / "m.gguf"
  with pytest.raises(KeyboardInterrupt):
    write_gguf(str(path), checkpoint.config, checkpoint.params(), [])
  assert os.listdir(tmp_path) == []


def _sentencepiece_style_tokenizer():
  """A Llama-2 style tokenizer: BPE with byte fallback and '▁' for spaces, trained on the built-in text."""
  from pydoc_data.topics import topics

  from tokenizers import Tokenizer, decoders, models, normalizers, trainers
  from transformers import LlamaTokenizerFast

  tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
  tok.train_from_iterator(list(topics.values())[:20], trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
  return LlamaTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, legacy=False
  )


def test_sentencepiece_style_tokenizer_tokenizes_the_same_in_llama_cpp(tmp_path):
  transformers = pytest.importorskip("transformers")
  from pydoc_data.topics import topics

  from qjax.models import SafetensorsCheckpoint

  tokenizer = _sentencepiece_style_tokenizer()
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  tokenizer.save_pretrained(tmp_path)
  checkpoint = SafetensorsCheckpoint(str(tmp_path))
  entries = tokenizer_metadata(checkpoint.tokenizer(), checkpoint.config.vocab_size)
  assert {e.key: e.value for e in entries}["tokenizer.ggml.model"] == "llama"
  path = str(tmp_path / "spm.gguf")
  write_gguf(path, checkpoint.config, checkpoint.params(), entries)
  lines = [line for text in list(topics.values())[30:34] for line in text.splitlines() if line[:1].isalpha()]
  llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
  try:
    for line in lines:
      assert llm.tokenize(line.encode(), add_bos=True) == checkpoint.tokenizer()(line).input_ids, line
  finally:
    llm.close()


@pytest.mark.slow
def test_gptq_rounded_gguf_loads_in_llama_cpp_with_the_perplexity_qjax_computes(tmp_path):
  """GPTQ into llama.cpp's Q4_K_M types: the file has llama.cpp's types and size, and llama.cpp's perplexity of it
  is qjax's forward's on the same dequantized weights."""
  s = Settings(method="gptq", export="gguf:Q4_K_M", nsamples=8, seqlen=128)
  checkpoint, config, params = quantize_like_cli(s)
  ours = export(parse_target(s.export), str(tmp_path / "gptq"), config, params, checkpoint.tokenizer(), name="default",
                description="gptq gguf Q4_K_M")  # fmt: skip
  plain = export(parse_target(s.export), str(tmp_path / "plain"), config,
                 quantize_like_cli(Settings(method="none", export="gguf:Q4_K_M"), checkpoint=checkpoint)[2],
                 checkpoint.tokenizer(), name="default")  # fmt: skip
  types = lambda path: {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
  assert types(ours) == types(plain) and os.path.getsize(ours) == pytest.approx(os.path.getsize(plain), abs=256)
  assert gguf_format.written_by_qjax(ours)
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))
  windows = texts.eval_windows(tokens, 256, max_windows=3)
  ours_ppl = evaluate(logits_fn(config, params), windows, show_progress=False).perplexity
  theirs_ppl = llama_cpp_perplexity(ours, windows)
  assert abs(ours_ppl - theirs_ppl) / theirs_ppl < 0.01, (ours_ppl, theirs_ppl)


def test_a_width_no_block_holds_names_the_tensor_and_llama_cpps_fallback():
  from qjax.models import LlamaConfig

  config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16)  # fmt: skip
  message = (r"model/layers_0/mlp/down_proj/kernel \(ffn_down, Q6_K in Q4_K_M\): a row of 100 elements "
             r"fits no ggml block size \(32 or 256\); llama.cpp would keep it in F16")  # fmt: skip
  with pytest.raises(ValueError, match=message):
    plan(Settings(method="gptq", export="gguf:Q4_K_M"), config)


def llama_cpp_logits(path: str, window: np.ndarray) -> np.ndarray:
  llm = llama_cpp.Llama(model_path=path, n_ctx=len(window), n_batch=len(window), logits_all=True, verbose=False)
  try:
    llm.eval(window.tolist())
    return np.array(llm.scores[: len(window)], np.float64)
  finally:
    llm.close()


@pytest.mark.slow
def test_rotation_and_awq_folded_into_a_gptq_gguf_need_no_extra_op_in_llama_cpp(tmp_path):
  """rotate+awq+gptq into Q4_K_M: the rotation and AWQ's scales live in the weights (a tied head is untied and
  typed as llama.cpp types an untied output), so llama.cpp runs the file as qjax runs the params."""
  model = write_random_llama(str(tmp_path / "m"), layers=2, hidden=256, intermediate=768, heads=4, kv_heads=1,
                             tie=True)  # fmt: skip
  s = Settings(model=model, method="rotate+awq+gptq", export="gguf:Q4_K_M", nsamples=4, seqlen=64)
  checkpoint, config, params = quantize_like_cli(s)
  path = export(parse_target(s.export), str(tmp_path / "q"), config, params, checkpoint.tokenizer(), name="m")
  types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
  assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K", types
  assert types["blk.0.attn_norm.weight"] == "F32"
  window = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:128]
  ours = np.asarray(logits_fn(config, params)(jnp.asarray(window[None])))[0]
  float_model = np.asarray(logits_fn(checkpoint.config, checkpoint.params())(jnp.asarray(window[None])))[0]
  theirs = llama_cpp_logits(path, window)
  rms = lambda x: float(np.sqrt(np.mean(x**2)))
  # llama.cpp rounds activations to 8 bits for its k-quant dot products: a small fraction of the 4-bit change.
  assert rms(theirs - ours) < 0.1 * rms(ours - float_model), (rms(theirs - ours), rms(ours - float_model))


@pytest.fixture(scope="module")
def two_layer_model(tmp_path_factory):
  """A random 2-layer model whose linears are all 256 x 256 (one GPTQ compilation per type), whose recipes type
  the same with or without an importance matrix."""
  path = write_random_llama(str(tmp_path_factory.mktemp("two")), layers=2, hidden=256, intermediate=256, heads=4,
                            kv_heads=4)  # fmt: skip
  s = Settings(model=path, method="none", export="gguf:F32", eval_windows=0, out=str(tmp_path_factory.mktemp("f")))
  return path, run(s, show_progress=False)[1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["Q2_K", "Q8_0", "IQ4_XS"])  # every grid: tests/core/test_grid.py
def test_gptq_into_a_recipe_writes_llama_cpps_types_and_the_values_gptq_chose(recipe, two_layer_model, tmp_path):
  """`qjax quantize --method=gptq --export=gguf:<recipe>`: llama.cpp's types and size, every tensor decoding
  (gguf's numpy dequantizers) to qjax's values, and a file llama.cpp runs."""
  model, f32 = two_layer_model
  s = Settings(model=model, method="gptq", export=f"gguf:{recipe}", nsamples=2, seqlen=64)
  checkpoint, config, params = quantize_like_cli(s)
  ours = export(parse_target(s.export), str(tmp_path / "q"), config, params, checkpoint.tokenizer(), name="m")
  theirs = str(tmp_path / "llama.gguf")
  llama_quantize(f32, theirs, recipe)
  types = lambda path: {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
  assert types(ours) == types(theirs) and os.path.getsize(ours) == pytest.approx(os.path.getsize(theirs), abs=256)
  back = GgufCheckpoint(ours)
  for i in range(config.num_hidden_layers):
    for module, kernel in [(f"{m}/{n}", v["kernel"]) for m in ("self_attn", "mlp")
                           for n, v in params["model"][f"layers_{i}"][m].items()]:  # fmt: skip
      got = back.layer_params(i)
      for part in module.split("/"):
        got = got[part]
      np.testing.assert_array_equal(got["kernel"], np.asarray(dequantize(kernel)), err_msg=f"layer {i} {module}")
  window = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:64]
  assert np.isfinite(llama_cpp_logits(ours, window)).all()


@pytest.mark.slow
def test_mxfp4_tensors_run_in_llama_cpp_as_qjax_runs_them(two_layer_model, tmp_path):
  """Linears as MXFP4 blocks (llama.cpp's own encoder, byte for byte), the rest F32: the file reads back as the
  values qjax dequantizes, and llama.cpp's logits match qjax's forward on them."""
  from qjax.transforms import Rule, kquant

  model, _ = two_layer_model
  checkpoint = open_checkpoint(model)
  params = quantize_params(checkpoint.params(), [Rule(r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel",
                                                       kquant("MXFP4"))])  # fmt: skip
  path = str(tmp_path / "mxfp4.gguf")
  write_gguf(path, checkpoint.config, params, tokenizer_metadata(checkpoint.tokenizer(), checkpoint.config.vocab_size))
  back = GgufCheckpoint(path)
  q = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert q.spec.layout == "MXFP4"
  np.testing.assert_array_equal(back.layer_params(1)["mlp"]["down_proj"]["kernel"], np.asarray(dequantize(q)))
  window = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:64]
  theirs = llama_cpp_logits(path, window)
  ours = np.asarray(logits_fn(checkpoint.config, params)(jnp.asarray(window[None])))[0]
  # llama.cpp multiplies MXFP4 blocks with 8-bit activations (Q8_0): agreement to about a percent of the logits
  print(f"max |Δlogit| {np.abs(theirs - ours).max():.4f}, max |logit| {np.abs(ours).max():.2f}")
  assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()
