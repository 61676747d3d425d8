"""Mixtures of experts in GGUF: qjax's F32 file reads back and runs in llama.cpp with qjax's logits, and each recipe
is llama.cpp's quantizer's file (its rules for 8-expert models and stacked expert tensors included)."""

import subprocess
import sys

import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.formats import GgufCheckpoint, open_checkpoint
from qjax.transforms.gguf_recipes import tensor_types
from tests.formats.test_gguf import (
  assert_f32_reads_back_and_runs_in_llama_cpp,
  assert_recipe_is_llama_quantizes,
  export_f32,
)
from tests.model_factory import write_random_moe

MODELS = {
  # 8 experts: llama.cpp's 8-expert rules (attn_v and attn_k Q8_0, attn_output Q5_K in Q4_K_M).
  "mixtral": ("llama", dict(family="Mixtral", num_local_experts=8, num_experts_per_tok=2)),
  "qwen3moe": ("qwen3moe", dict(family="Qwen3Moe", num_experts=6, num_experts_per_tok=3, moe_intermediate_size=256,
                                norm_topk_prob=True)),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MODELS))
def test_moe_gguf_runs_in_llama_cpp_and_recipes_are_llama_quantizes(family, tmp_path):
  arch, kwargs = MODELS[family]
  model = write_random_moe(str(tmp_path / "model"), layers=2, hidden=256, intermediate=256, heads=4, kv_heads=2,
                           **kwargs)  # fmt: skip
  checkpoint = open_checkpoint(model)
  f32, reader = export_f32(model, str(tmp_path / "f32"), arch)
  keys = {k: f.contents() for k, f in reader.fields.items() if "expert" in k}
  assert keys[f"{arch}.expert_count"] == checkpoint.config.num_experts
  assert keys[f"{arch}.expert_used_count"] == checkpoint.config.num_experts_per_tok
  stored = {t.name: t for t in reader.tensors}
  assert list(stored["blk.1.ffn_down_exps.weight"].shape) == [256, 256, checkpoint.config.num_experts]
  window = np.asarray(texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:48])
  back = assert_f32_reads_back_and_runs_in_llama_cpp(checkpoint, f32, window)
  assert back.config.architecture == checkpoint.config.architecture and back.config.num_experts == kwargs.get(
    "num_experts", kwargs.get("num_local_experts")
  )
  ours = assert_recipe_is_llama_quantizes(model, f32, tmp_path)
  types = tensor_types("Q4_K_M", checkpoint.config)
  quantized = {t.name: t.tensor_type.name for t in GgufCheckpoint(ours)._reader.tensors}
  assert quantized["blk.0.ffn_gate_inp.weight"] == "F32"  # the router is never quantized
  assert quantized["blk.1.ffn_down_exps.weight"] == types["model/layers_1/mlp/experts/down_proj/kernel"] == "Q6_K"
  if family == "mixtral":
    assert quantized["blk.1.attn_k.weight"] == quantized["blk.1.attn_v.weight"] == "Q8_0"
    assert quantized["blk.1.attn_output.weight"] == "Q5_K"


@pytest.fixture(scope="module")
def mixtral_f32(tmp_path_factory):
  """A 2-layer 8-expert Mixtral whose rows are whole 256-blocks (so recipes keep their k-quants), and its F32 file."""
  arch, kwargs = MODELS["mixtral"]
  model = write_random_moe(str(tmp_path_factory.mktemp("mixtral")), layers=2, hidden=256, intermediate=256, heads=4,
                           kv_heads=2, **kwargs)  # fmt: skip
  return model, export_f32(model, str(tmp_path_factory.mktemp("mixtral_f32")), arch)[0]


# recipe -> (attn_output, blk.0.ffn_down_exps) as llama.cpp types them in an 8-expert model: attn_v and attn_k are
# Q8_0 in every recipe; attn_output is Q5_K in the low-bit mixtures (Q2_K, Q3_K_S/M, Q4_K_S/M, IQ4_*) but keeps the
# default in the others (Q3_K_L's Q3_K, where a dense model gets Q5_K); expert ffn_down takes the dense ffn_down rules.
# Q4_K_M: test_moe_gguf_runs_in_llama_cpp_and_recipes_are_llama_quantizes.
EIGHT_EXPERT_TYPES = {"Q2_K": ("Q5_K", "Q3_K"), "Q3_K_L": ("Q3_K", "Q5_K"), "Q4_0": ("Q4_0", "Q4_0")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(EIGHT_EXPERT_TYPES))
def test_moe_recipes_beyond_q4_k_m_are_llama_quantizes(recipe, mixtral_f32, tmp_path):
  model, f32 = mixtral_f32
  ours = assert_recipe_is_llama_quantizes(model, f32, tmp_path, recipe=recipe)
  quantized = {t.name: t.tensor_type.name for t in GgufCheckpoint(ours)._reader.tensors}
  assert quantized["blk.0.attn_v.weight"] == quantized["blk.0.attn_k.weight"] == "Q8_0"
  assert (quantized["blk.0.attn_output.weight"], quantized["blk.0.ffn_down_exps.weight"]) == EIGHT_EXPERT_TYPES[recipe]
  assert quantized["blk.0.ffn_gate_inp.weight"] == "F32"


GPTQMODEL_LOGITS = """
import sys, numpy as np, torch, gptqmodel
model = gptqmodel.GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.float32).model
with torch.no_grad():
  np.save(sys.argv[3], model(torch.tensor(np.load(sys.argv[2]))).logits.float().numpy())
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
def test_gptq_export_of_experts_loads_in_gptqmodel(tmp_path):
  """GPTQModel (the GPTQ runtime behind transformers' and vLLM's loaders of such checkpoints) loads a Qwen3-MoE
  export with per-expert names and computes qjax's logits. transformers 5's own from_pretrained stacks experts into
  fused parameters and cannot place per-expert quantized modules yet; GPTQModel.load can. Its CPU kernel differs
  from qjax by ~0.5% of the largest logit on models this small, dense ones alike."""
  pytest.importorskip("gptqmodel")
  import jax.numpy as jnp

  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec
  from qjax.formats import export, load_model, parse_target
  from qjax.models import logits_fn
  from qjax.models.blocks import LlamaBlocks
  from qjax.transforms.recipes import rtn

  model = write_random_moe(str(tmp_path / "model"), family="Qwen3Moe", hidden=128, intermediate=128, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64)  # fmt: skip
  checkpoint = open_checkpoint(model)
  qparams = quantize_model(LlamaBlocks(checkpoint), rtn(QSpec(bits=4, group_size=32)),
                           options=RunnerOptions(show_progress=False))  # fmt: skip
  out = str(tmp_path / "gptq")
  export(parse_target("gptq"), out, checkpoint.config, qparams, checkpoint.tokenizer(), name="moe")
  ids = np.asarray(texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:32])[None]
  np.save(tmp_path / "ids.npy", ids)
  # GPTQModel patches transformers' model classes process-wide when it loads (Mixtral's then saves fused experts),
  # so it runs in a process of its own.
  run = subprocess.run(
    [sys.executable, "-c", GPTQMODEL_LOGITS, out, str(tmp_path / "ids.npy"), str(tmp_path / "theirs.npy")],
    capture_output=True, text=True, timeout=600, check=False,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  theirs = np.load(tmp_path / "theirs.npy")
  back = load_model(out)
  ours = np.asarray(logits_fn(back.config, back.params)(jnp.asarray(ids)))
  print(f"Qwen3-MoE GPTQ in GPTQModel: max |Δlogit| {np.abs(ours - theirs).max():.4f} of {np.abs(ours).max():.3f}")
  assert np.abs(ours - theirs).max() < 1e-2 * np.abs(ours).max()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
@pytest.mark.parametrize("family", ["Mixtral", "Qwen3Moe"])
def test_compressed_tensors_export_of_experts_loads_in_transformers(tmp_path, family):
  """transformers 5's from_pretrained decompresses a compressed-tensors export's per-expert modules into its fused
  experts and computes qjax's logits (its experts in float16: the difference). GPTQ and AWQ exports of the same
  model it would leave with random experts; the command line says so (`loader_note`)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  import jax.numpy as jnp
  from transformers import AutoModelForCausalLM

  from qjax.calib.quantize import quantize_model
  from qjax.calib.runner import RunnerOptions
  from qjax.core import QSpec
  from qjax.formats import export, parse_target
  from qjax.formats.targets import loader_note
  from qjax.models import logits_fn
  from qjax.models.blocks import LlamaBlocks
  from qjax.transforms.recipes import rtn

  kwargs = dict(num_local_experts=4) if family == "Mixtral" else dict(num_experts=4, moe_intermediate_size=32)
  checkpoint = open_checkpoint(write_random_moe(str(tmp_path / "model"), family=family, num_experts_per_tok=2,
                                                **kwargs))  # fmt: skip
  qparams = quantize_model(LlamaBlocks(checkpoint), rtn(QSpec(bits=4, group_size=32)),
                           options=RunnerOptions(show_progress=False))  # fmt: skip
  out = export(parse_target("compressed-tensors"), str(tmp_path / "ct"), checkpoint.config, qparams,
               checkpoint.tokenizer(), name="moe")  # fmt: skip
  ids = np.asarray(texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))[:32])[None]
  model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(logits_fn(checkpoint.config, qparams)(jnp.asarray(ids)))
  unquantized = np.asarray(logits_fn(checkpoint.config, checkpoint.params())(jnp.asarray(ids)))
  print(f"{family} compressed-tensors in transformers: max |Δlogit| {np.abs(ours - theirs).max():.5f}, "
        f"quantization's own {np.abs(ours - unquantized).max():.4f}")  # fmt: skip
  assert np.abs(ours - theirs).max() < 2e-3 * np.abs(ours).max() < 0.1 * np.abs(ours - unquantized).max()
  assert loader_note(parse_target("compressed-tensors"), out) is None
  gptq_out = export(parse_target("gptq"), str(tmp_path / "gptq"), checkpoint.config, qparams, None, name="moe")
  assert "experts of this gptq checkpoint uninitialised" in loader_note(parse_target("gptq"), gptq_out)


def test_gguf_writer_refuses_a_moe_llama_cpp_cannot_run_before_encoding(tmp_path, monkeypatch):
  """`qjax convert --to=gguf:…` goes through `write_gguf` with an already quantized model: a Qwen3-MoE with a dense
  layer is refused before any tensor is encoded, and no file is left."""
  from qjax.formats import gguf as gguf_format

  model = write_random_moe(str(tmp_path / "model"), family="Qwen3Moe", layers=2, hidden=64, intermediate=128,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                           mlp_only_layers=[1])  # fmt: skip
  checkpoint = open_checkpoint(model)
  monkeypatch.setattr(gguf_format, "_encoded", lambda *a, **k: pytest.fail("a tensor was encoded before the refusal"))
  out = str(tmp_path / "model.gguf")
  with pytest.raises(NotImplementedError, match=r"layers \[1\] of this model are dense"):
    gguf_format.write_gguf(out, checkpoint.config, checkpoint.params(), [])
  assert not any(p.name.startswith("model.gguf") or p.suffix == ".spill" for p in tmp_path.iterdir()), list(
    tmp_path.iterdir()
  )
