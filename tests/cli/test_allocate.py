"""`qjax quantize --target_bpw`: llama.cpp types, or bit widths on an affine grid, allocated per tensor within the
budget, written as a rules file that --rules reads back into the same file; and every bad budget refused before any
work."""

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
    (dict(target_bpw="5", export="gguf:F16"), "--target_bpw with --export=gguf:F16: a float GGUF has nothing"),
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


@pytest.mark.parametrize(
  ("kw", "message"),
  [
    (
      dict(target_bpw="1"),
      "--target_bpw=1: below the 3.125 bits per weight of every linear at 3 bits in groups of 128",
    ),
    (dict(target_bpw="9"), "--target_bpw=9: above the 8.125 bits per weight of every linear at 8 bits"),
    (dict(target_bpw="Q4_K_M"), "--target_bpw=Q4_K_M: expected bits per weight (4.5)."),
    (dict(target_bpw="4.5", allocation_bits="4,9"), "--allocation_bits=4,9: expected widths from 2, 3, 4, 5, 6, 7, 8"),
    (dict(target_bpw="4.5", allocation_bits="4,5", export="gptq"), "--export=gptq stores widths 2, 3, 4, 8, not 5"),
    (dict(target_bpw="4.5", export="awq"), "--target_bpw with --export=awq: an AWQ config has one width"),
    (dict(target_bpw="6", grid="fp8", bits=8, group_size=-1), "allocates widths on the affine grid; drop --grid=fp8"),
    (dict(target_bpw="4.5", allocation_group_sizes="32,48"), "--allocation_group_sizes=32,48: expected group sizes"),
    (
      dict(target_bpw="3", allocation_group_sizes="256"),
      "below the 3.062 bits per weight of every linear at 3 bits in groups of 128, 256",
    ),
  ],
)
def test_a_bad_width_budget_is_refused_before_any_work(kw, message):
  with pytest.raises((ValueError, InputError)) as e:
    plan(Settings(**{"method": "gptq", "export": "compressed-tensors", **kw}), CONFIG)
  assert message in str(e.value)


def test_affine_rules_that_do_not_fit_the_settings_are_refused_naming_the_file(tmp_path):
  path = tmp_path / "rules.json"
  rule = lambda pattern, bits: f'{{"pattern": "{pattern}", "bits": {bits}}}'
  path.write_text(f'{{"format": "affine", "group_size": 64, "sym": true, "rules": [{rule(".*/down_proj/.*", 8)}]}}')
  s = Settings(method="gptq", export="compressed-tensors", group_size=64, rules=str(path))
  assert plan(s, CONFIG).overrides == {f"model/layers_{i}/mlp/down_proj/kernel": "8" for i in range(2)}
  with pytest.raises(InputError, match=rf"--rules={path}: widths chosen for --group_size=64, not --group_size=128"):
    plan(dataclasses.replace(s, group_size=128), CONFIG)
  with pytest.raises(InputError, match=rf"--rules={path}: affine rules are for an affine export"):
    plan(dataclasses.replace(s, export="gguf:Q4_K_M"), CONFIG)
  path.write_text(f'{{"format": "affine", "group_size": 64, "sym": true, "rules": [{rule(".*/q_proj/.*", 8)}]}}')
  with pytest.raises(InputError, match="are loaded as one matrix by vLLM and need one width and group size, got 4, 8"):
    plan(s, CONFIG)
  path.write_text(f'{{"format": "affine", "group_size": 64, "sym": true, "rules": [{rule(".*/o_proj/.*", 5)}]}}')
  with pytest.raises(ValueError, match=rf"--rules={path}: --export=gptq stores widths 2, 3, 4, 8, not 5"):
    plan(dataclasses.replace(s, export="gptq"), CONFIG)


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


def _safetensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return {k: v for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
          for k, v in load_file(os.path.join(directory, f)).items()}  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
def test_allocated_widths_load_in_transformers_and_their_rules_rebuild_the_directory(tmp_path):
  """GPTQ at a width and group size per linear to 3.5 bits per weight: compressed-tensors config_groups (one per
  setting) that transformers loads with qjax's logits; q/k/v and gate/up at one setting; --rules rebuilds the same
  tensors, and into GPTQ's dynamic widths and group sizes."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  from qjax.core import QSpec, is_qarray
  from qjax.core.tree import leaves_with_paths
  from qjax.eval.sensitivity import affine_choice, affine_groups
  from qjax.formats import load_model
  from tests.formats.test_gptq import compare_with_transformers, default_windows

  model = write_random_llama(str(tmp_path / "model"), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
  base = dict(model=model, method="gptq", group_size=64, nsamples=4, seqlen=64, eval_windows=0, batch_size=2,
              allocation_group_sizes="32")  # fmt: skip
  out = str(tmp_path / "alloc")
  _, _, p = run(Settings(**base, export="compressed-tensors", target_bpw="3.5", out=out), show_progress=False)
  rules = read_rules(os.path.join(out, "rules.json"))
  assert rules.format == "affine" and (rules.group_size, rules.symmetric) == (64, True)
  assert 3.4 < rules.record["bits_per_weight"] <= 3.5  # nearly all of the budget spent, none over
  config = open_checkpoint(model).config
  for group in affine_groups(config):
    assert len({p.overrides[path] for path in group}) == 1, group
  assert len(set(p.overrides.values())) > 1  # the layers' sensitivities differ, so do their widths

  back = load_model(out)
  widths = {path: (leaf.spec.bits, leaf.spec.group_size) for path, leaf in leaves_with_paths(back.params)
            if is_qarray(leaf)}  # fmt: skip
  assert widths == {path: (c.bits, c.group_size) for path, c in ((p, affine_choice(b, QSpec(bits=3, group_size=64)))
                                                                 for p, b in p.overrides.items())}  # fmt: skip
  windows = default_windows(back.tokenizer)
  diff, scale, ppl_theirs, ppl_ours = compare_with_transformers(out, windows, dtype=torch.float32)
  print(f"allocated compressed-tensors ((bits, group size): {sorted(set(widths.values()))}): max |Δlogit| "
        f"{diff:.5f} of {scale:.2f}; perplexity transformers {ppl_theirs:.4f} qjax {ppl_ours:.4f}")  # fmt: skip
  assert diff < 3e-3 * scale

  again = str(tmp_path / "again")
  run(Settings(**base, export="compressed-tensors", rules=os.path.join(out, "rules.json"), out=again),
      show_progress=False)  # fmt: skip
  first, second = _safetensors(out), _safetensors(again)
  assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
  gptq = str(tmp_path / "gptq")
  run(Settings(**base, export="gptq", rules=os.path.join(out, "rules.json"), out=gptq), show_progress=False)
  read = {path: (leaf.spec.bits, leaf.spec.group_size) for path, leaf in leaves_with_paths(load_model(gptq).params)
          if is_qarray(leaf)}  # fmt: skip
  assert read == widths


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_widths_vllm_loads(family, tmp_path):
  """An affine allocation on each family: q/k/v, gate/up (Phi-3's fused tensors) and all of a layer's experts at one
  width and group size, each group size dividing its linear's inputs; the compressed-tensors export reads back
  with those settings."""
  from qjax.core import QSpec, is_qarray
  from qjax.core.tree import leaves_with_paths
  from qjax.eval.sensitivity import affine_choice
  from qjax.formats import load_model
  from tests.model_factory import write_random_moe

  kwargs = dict(FAMILIES[family])
  write = write_random_moe if "num_experts_per_tok" in kwargs else write_random_llama
  model = write(str(tmp_path / "model"), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, **kwargs)
  config = open_checkpoint(model).config
  s = Settings(model=model, method="rtn", export="compressed-tensors", group_size=64, allocation_group_sizes="32,128",
               target_bpw="4.5", nsamples=2, seqlen=32, eval_windows=0, batch_size=2,
               out=str(tmp_path / "out"))  # fmt: skip
  _, written, p = run(s, show_progress=False)
  chosen = {path: affine_choice(label, QSpec(bits=4, group_size=64)) for path, label in p.overrides.items()}
  rows = row_lengths(config)
  assert set(chosen) == set(rows)  # every decoder linear allocated
  for i in range(2):
    for fused in (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("mlp/gate_proj", "mlp/up_proj"),
                  ("mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj")):  # fmt: skip
      settings = {(chosen[f"model/layers_{i}/{m}/kernel"].bits, chosen[f"model/layers_{i}/{m}/kernel"].group_size)
                  for m in fused if f"model/layers_{i}/{m}/kernel" in chosen}  # fmt: skip
      assert len(settings) <= 1, (i, fused, settings)
  assert all(rows[path] % c.group_size == 0 for path, c in chosen.items())
  back = {path: (q.spec.bits, q.spec.group_size) for path, q in leaves_with_paths(load_model(written).params)
          if is_qarray(q)}  # fmt: skip
  assert back == {path: (c.bits, c.group_size) for path, c in chosen.items()}
