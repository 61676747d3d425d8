"""qjax's F32 GGUF export of each family is llama.cpp's `convert_hf_to_gguf.py` output: every tensor byte for byte
(Llama's permuted Q/K rows, Gemma's 1 + w norms, Phi-3's fused projections and LongRoPE factors) and the same
``<arch>.*`` and ``tokenizer.*`` metadata. (Each recipe is `llama_model_quantize` of such a file: the family tests.)"""

import json
import os

import gguf
import numpy as np
import pytest

from tests.formats.test_gguf import export_f32
from tests.formats.test_phi3 import longrope
from tests.llama_cpp_converter import convert
from tests.model_factory import write_random_llama

FAMILIES = {
  "llama": dict(family="Llama", kv_heads=1),
  "qwen3": dict(family="Qwen3", tie=True),
  "gemma3": dict(family="Gemma3", tie=True, head_dim=128, sliding_window=16, query_pre_attn_scalar=128),
  "phi3": dict(family="Phi3", rope_parameters=longrope(32), partial_rotary_factor=0.5,
               original_max_position_embeddings=64),
  "mixtral": dict(family="Mixtral", num_local_experts=4, num_experts_per_tok=2),
  "qwen3moe": dict(family="Qwen3Moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                   norm_topk_prob=True),
}  # fmt: skip
ARCH = {"mixtral": "llama"}  # llama.cpp writes Mixtral as its llama architecture with experts
# Written by one and not the other, by design: qjax names itself; the converter adds its own provenance.
UNCOMPARED = ("general.", "tokenizer.chat_template")


def metadata(reader: gguf.GGUFReader) -> dict:
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", *UNCOMPARED))}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_f32_export_is_the_converters(family, tmp_path):
  arch = ARCH.get(family, family)
  model = write_random_llama(str(tmp_path / "model"), layers=2, hidden=256, intermediate=512, heads=4,
                             **{"kv_heads": 2, **FAMILIES[family]})  # fmt: skip
  _, ours = export_f32(model, str(tmp_path / "ours"), arch)
  if arch == "phi3":  # the converter reads a Phi-3 vocabulary without tokenizer.model as GPT-2 BPE (Phi-4's) only
    with open(os.path.join(model, "tokenizer_config.json")) as f:
      tokenizer_config = json.load(f)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
      json.dump({**tokenizer_config, "tokenizer_class": "GPT2Tokenizer"}, f)
  theirs = gguf.GGUFReader(convert(model, str(tmp_path / "theirs.gguf")))
  assert theirs.fields["general.architecture"].contents() == arch
  mine, reference = metadata(ours), metadata(theirs)
  if arch == "llama":  # the converter's rule for Granite's 49,152-token vocabularies; llama.cpp's default for smollm
    assert reference.pop("tokenizer.ggml.add_bos_token") is False
  assert sorted(mine) == sorted(reference), set(mine) ^ set(reference)
  for key in reference:
    assert mine[key] == reference[key], key
  tensors = {t.name: t for t in ours.tensors}
  assert sorted(tensors) == sorted(t.name for t in theirs.tensors)
  for t in theirs.tensors:
    ours_t = tensors[t.name]
    assert (ours_t.tensor_type, list(ours_t.shape)) == (t.tensor_type, list(t.shape)), t.name
    np.testing.assert_array_equal(np.asarray(ours_t.data).view(np.uint8), np.asarray(t.data).view(np.uint8), t.name)
