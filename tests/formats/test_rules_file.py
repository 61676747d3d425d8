"""Rules files: written and read back, and every malformed field refused by name before any work."""

import dataclasses
import json
import re

import pytest

from qjax.core import InputError
from qjax.formats.rules_file import TensorRules, read_rules, rules_from_types, write_rules
from qjax.models import LlamaConfig
from qjax.transforms.gguf_recipes import tensor_types

CONFIG = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64)  # fmt: skip


def test_types_round_trip_through_a_rules_file(tmp_path):
  chosen = {"model/layers_0/mlp/down_proj/kernel": "Q6_K", "model/layers_3/mlp/down_proj/kernel": "Q6_K",
            "model/layers_1/self_attn/v_proj/kernel": "Q8_0", "lm_head/kernel": "Q8_0"}  # fmt: skip
  path = tmp_path / "rules.json"
  write_rules(str(path), TensorRules("Q4_K_M", rules_from_types(chosen), {"target_bpw": 4.5}))
  rules = read_rules(str(path))
  assert rules.base == "Q4_K_M" and rules.record["target_bpw"] == 4.5
  assert len(rules.rules) == 3  # the two down_proj layers share one pattern
  types = tensor_types("Q4_K_M", CONFIG, overrides=rules.resolve(tensor_types("Q4_K_M", CONFIG)))
  assert all(types[p] == t for p, t in chosen.items())
  assert types["model/layers_2/mlp/down_proj/kernel"] == tensor_types("Q4_K_M", CONFIG)[
    "model/layers_2/mlp/down_proj/kernel"]  # fmt: skip  # untouched: the base recipe's


def test_widths_round_trip_through_an_affine_rules_file(tmp_path):
  chosen = {"model/layers_0/mlp/down_proj/kernel": "8", "model/layers_1/mlp/down_proj/kernel": "3g32"}
  path = tmp_path / "rules.json"
  chosen_patterns = [p for p, _ in rules_from_types(chosen)]
  write_rules(str(path), TensorRules(None, rules_from_types(chosen), {"target_bpw": 4.25}, "affine", 64, False))
  stored = json.loads(path.read_text())
  assert stored["format"] == "affine" and stored["rules"][0] == {"pattern": chosen_patterns[0], "bits": 8}
  assert stored["rules"][1]["group_size"] == 32  # only where it is not the file's
  rules = read_rules(str(path))
  assert (rules.format, rules.base, rules.group_size, rules.symmetric) == ("affine", None, 64, False)
  assert rules.resolve(chosen) == chosen


def test_the_first_matching_rule_wins():
  rules = TensorRules("Q4_K_M", ((r"model/layers_0/.*", "Q8_0"), (r"model/layers_\d+/mlp/.*", "Q3_K")))
  types = rules.resolve(tensor_types("Q4_K_M", CONFIG))
  assert types["model/layers_0/mlp/up_proj/kernel"] == "Q8_0" and types["model/layers_1/mlp/up_proj/kernel"] == "Q3_K"


@pytest.mark.parametrize(
  ("content", "message"),
  [
    ("not json", "not a JSON rules file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "gptq", "base": "Q4_K_M", "rules": []}', "'format' is 'gptq'"),
    ('{"format": "gguf", "base": "Q9_K", "rules": []}', "'base' is 'Q9_K'"),
    ('{"format": "gguf", "base": "Q4_K_M", "rules": []}', "non-empty list"),
    ('{"format": "gguf", "base": "Q4_K_M", "rules": [{"pattern": "(", "type": "Q4_K"}]}', "not a regular expr"),
    ('{"format": "gguf", "base": "Q4_K_M", "rules": [{"pattern": ".*", "type": "Q9"}]}', "type 'Q9'"),
    ('{"format": "gguf", "base": "Q4_K_M", "rules": [{"type": "Q4_K"}]}', "rule 0 must be"),
    ('{"format": "affine", "group_size": 100, "sym": true, "rules": []}', "'group_size' is 100"),
    ('{"format": "affine", "group_size": 128, "sym": 1, "rules": []}', "'sym' must be true or false"),
    ('{"format": "affine", "group_size": 128, "sym": true, "rules": [{"pattern": ".*", "bits": 9}]}', "width 9"),
    ('{"format": "affine", "group_size": 128, "sym": true, "rules": [{"pattern": ".*", "bits": "4"}]}', "width '4'"),
    (
      '{"format": "affine", "group_size": 128, "sym": true, "rules": [{"pattern": ".*", "type": "Q4_K"}]}',
      "rule 0 must be {'pattern': REGEX, 'bits'",
    ),
    (
      '{"format": "affine", "group_size": 128, "sym": true, "rules": [{"pattern": ".*", "bits": 4, "group_size": 48}]}',
      "rule 0: 'group_size' is 48",
    ),
  ],
)
def test_a_malformed_rules_file_is_refused_by_name(tmp_path, content, message):
  path = tmp_path / "rules.json"
  path.write_text(content)
  with pytest.raises(InputError, match=r"--rules=.*rules\.json") as e:
    read_rules(str(path))
  assert message in str(e.value)


def test_rules_that_match_nothing_or_do_not_fit_are_refused_by_tensor(tmp_path):
  typo = TensorRules("Q4_K_M", (("model/layer_0/.*", "Q8_0"),))
  with pytest.raises(InputError, match=re.escape("rule 'model/layer_0/.*' matches no quantized tensor")):
    typo.resolve(tensor_types("Q4_K_M", CONFIG), source="--rules=x.json")
  narrow = dataclasses.replace(CONFIG, hidden_size=96, head_dim=24)  # rows of 96: no 256-blocks
  with pytest.raises(ValueError, match=r"model/layers_0/self_attn/q_proj/kernel: Q4_K does not tile its rows of 96"):
    tensor_types("Q4_K_M", narrow, overrides={"model/layers_0/self_attn/q_proj/kernel": "Q4_K"})


def test_an_oversized_rules_file_is_refused_before_it_is_read(tmp_path):
  path = tmp_path / "rules.json"
  path.write_text(json.dumps({"format": "gguf", "base": "Q4_K_M", "rules": [], "pad": "x" * (5 << 20)}))
  with pytest.raises(InputError, match="more than a rules file's"):
    read_rules(str(path))
