"""`qjax quantize --target_bpw`: llama.cpp types allocated per tensor within the budget, written as a rules file that
--rules reads back into the same file; and every bad budget refused before any work."""

import dataclasses
import os

import numpy as np
import pytest

from qjax.cli.quantize import Settings, plan, run
from qjax.core import InputError
from qjax.formats import open_checkpoint
from qjax.formats.rules_file import read_rules
from qjax.models import LlamaConfig
from qjax.transforms.gguf_recipes import row_lengths, types_for_row
from tests.model_factory import write_random_llama

CONFIG = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip


@pytest.mark.parametrize(
  ("kw", "message"),
  [
    (dict(target_bpw="5"), "--target_bpw chooses llama.cpp types per tensor over a GGUF recipe"),
    (dict(rules="r.json", target_bpw="5", export="gguf:Q4_K_M"), "--rules=r.json: no such file"),
    (dict(target_bpw="five", export="gguf:Q4_K_M"), "--target_bpw=five: expected bits per weight"),
    (dict(target_bpw="2", export="gguf:Q4_K_M"), "--target_bpw=2: below the 3.505 bits per weight"),
    (dict(target_bpw="5", export="gguf:Q4_K_M", allocation_types="Q4_K,Q9"), "--allocation_types: Q9"),
  ],
)
def test_a_bad_budget_is_refused_before_any_work(kw, message):
  with pytest.raises((ValueError, InputError)) as e:
    plan(Settings(method="none", **kw), CONFIG)
  assert message in str(e.value)


def test_narrow_rows_limit_the_types(tmp_path):
  narrow = dataclasses.replace(CONFIG, hidden_size=96, head_dim=24)
  s = Settings(method="none", export="gguf:Q4_K_M", target_bpw="5", allocation_types="Q4_K,Q6_K")
  with pytest.raises(ValueError, match="none of Q4_K, Q6_K tiles the rows of 96 elements of model/layers_0/self_at"):
    plan(s, narrow)


@pytest.mark.slow
def test_allocation_meets_the_budget_and_its_rules_rebuild_the_file(tmp_path):
  import gguf

  model = write_random_llama(str(tmp_path / "model"), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
  base = dict(model=model, method="none", export="gguf:Q4_K_M", nsamples=4, seqlen=64, eval_windows=0, batch_size=2)
  out = str(tmp_path / "alloc")
  _, written, p = run(Settings(**base, target_bpw="Q4_K_M", out=out), show_progress=False)  # Q4_K_M's own size
  rules = read_rules(os.path.join(out, "rules.json"))
  budget = rules.record["target_bpw"]
  assert rules.base == "Q4_K_M" and budget - 0.01 < rules.record["bits_per_weight"] <= budget  # nearly all spent

  # The file holds the allocated types, each one that tiles its tensor's rows, within the budget.
  reader = gguf.GGUFReader(written)
  stored = {t.name: t for t in reader.tensors if t.tensor_type not in (gguf.GGMLQuantizationType.F32,)}
  assert sum(int(t.n_bytes) * 8 for t in stored.values()) / sum(int(t.n_elements) for t in stored.values()) <= budget
  rows = row_lengths(open_checkpoint(model).config)
  names = {f"model/layers_{i}/{m}/kernel": f"blk.{i}.{n}.weight" for i in range(2) for m, n in _NAMES.items()}
  for path, type_name in p.overrides.items():
    assert stored[names[path]].tensor_type.name == type_name and type_name in types_for_row(rows[path])
  assert len(set(p.overrides.values())) > 1  # the layers' sensitivities differ, so do their types

  # --rules alone (the base recipe from the file) rebuilds the same tensors, byte for byte (the metadata records
  # how each file was made).
  again = str(tmp_path / "again")
  _, rewritten, _ = run(Settings(**{**base, "export": None}, rules=os.path.join(out, "rules.json"), out=again),
                        show_progress=False)  # fmt: skip
  rebuilt = {t.name: t for t in gguf.GGUFReader(rewritten).tensors}
  assert rebuilt.keys() == {t.name for t in reader.tensors}
  for t in reader.tensors:
    assert rebuilt[t.name].tensor_type == t.tensor_type and np.array_equal(rebuilt[t.name].data, t.data), t.name


_NAMES = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
          "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
          "mlp/down_proj": "ffn_down"}  # fmt: skip


FAMILIES = {
  "qwen3": dict(family="Qwen3", head_dim=96),
  "gemma3": dict(family="Gemma3", head_dim=64, tie=True, query_pre_attn_scalar=64),
  "phi3": dict(family="Phi3"),  # q/k/v one attn_qkv tensor, gate/up one ffn_up: one type each
  "mixtral": dict(family="Mixtral", num_local_experts=4, num_experts_per_tok=2),  # experts stacked: one tensor
  "qwen3moe": dict(
    family="Qwen3Moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_types_its_runtime_reads(family, tmp_path):
  import gguf

  from qjax.transforms.gguf_recipes import tied_groups
  from tests.model_factory import write_random_moe

  kwargs = dict(FAMILIES[family])
  write = write_random_moe if "num_experts_per_tok" in kwargs else write_random_llama
  model = write(str(tmp_path / "model"), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, **kwargs)
  config = open_checkpoint(model).config
  s = Settings(model=model, method="none", export="gguf:Q4_K_M", target_bpw="Q4_K_M", nsamples=2, seqlen=32,
               eval_windows=0, batch_size=2, out=str(tmp_path / "out"))  # fmt: skip
  _, written, p = run(s, show_progress=False)
  rows = row_lengths(config)
  assert set(p.overrides) == set(rows)  # every decoder linear allocated
  for group in tied_groups(config):  # fused parts share a type, and it tiles their rows
    assert len({p.overrides[path] for path in group}) == 1 and p.overrides[group[0]] in types_for_row(rows[group[0]])
  assert (len(tied_groups(config)) < len(rows)) == (family == "phi3")
  # The file is written (fused and stacked tensors whole) and llama.cpp runs it.
  names = {t.name for t in gguf.GGUFReader(written).tensors}
  assert ("blk.0.attn_qkv.weight" in names) == (family == "phi3")
  assert ("blk.0.ffn_down_exps.weight" in names) == ("moe" in family or family == "mixtral")
  llama_cpp = pytest.importorskip("llama_cpp")
  llm = llama_cpp.Llama(model_path=written, n_ctx=32, logits_all=True, verbose=False)
  llm.eval([1, 2, 3, 4])
  assert np.isfinite(np.array(llm.scores[:4])).all()
  llm.close()


def test_rules_that_do_not_fit_the_model_are_refused_naming_the_file(tmp_path):
  path = tmp_path / "rules.json"
  path.write_text(
    '{"format": "gguf", "base": "Q4_K_M", "rules": [{"pattern": "model/layers_0/mlp/.*", "type": "Q4_K"}]}'
  )
  narrow = dataclasses.replace(CONFIG, hidden_size=96, head_dim=24)  # rows of 96: Q4_K's 256-blocks do not tile them
  with pytest.raises(InputError, match=rf"--rules={path}: model/layers_0/mlp/gate_proj/kernel: Q4_K does not tile"):
    plan(Settings(method="none", rules=str(path)), narrow)
  fused = dataclasses.replace(CONFIG, architecture="Phi3ForCausalLM")  # q/k/v are one llama.cpp tensor
  path.write_text('{"format": "gguf", "base": "Q4_K_M", "rules": [{"pattern": ".*/layers_0/self_attn/q_proj/.*", '
                  '"type": "Q8_0"}]}')  # fmt: skip
  with pytest.raises(InputError, match="as one tensor, so they take one type; the overrides give q_proj Q8_0"):
    plan(Settings(method="none", rules=str(path)), fused)
