"""Mixtures of experts in GGUF: qjax's F32 file reads back and runs in llama.cpp with qjax's logits, and each recipe
is llama.cpp's quantizer's file (its rules for 8-expert models and stacked expert tensors included)."""

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
