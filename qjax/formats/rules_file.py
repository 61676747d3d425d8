"""Per-tensor format rules as a file: what a bit allocation writes and `qjax quantize --rules=FILE` reads.

A JSON object::

  {"format": "gguf", "base": "Q4_K_M",
   "rules": [{"pattern": "model/layers_(0|5)/mlp/down_proj/kernel", "type": "Q6_K"}, ...],
   ...}

Each rule's ``pattern`` is a regular expression fully matched against a tensor's '/'-joined Flax path (the first
matching rule wins, as in `qjax.transforms.Rule`); ``type`` is the llama.cpp type the matched tensors take instead
of the ``base`` recipe's. Tensors no rule matches keep the base recipe's types. Other keys (the budget, the proxy,
its prediction) are a record and are not read back. The file is untrusted input: its size is bounded and every
field checked before use.
"""

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from qjax.core import InputError
from qjax.transforms.gguf_recipes import ALLOCATABLE, RECIPES

MAX_BYTES = 4 << 20


class TensorRules(NamedTuple):
  """A rules file's content: ``rules`` are ``(pattern, ggml type)`` in priority order on top of ``base``."""

  base: str
  rules: tuple[tuple[str, str], ...]
  record: Mapping[str, Any] = MappingProxyType({})

  def resolve(self, paths: Iterable[str], *, source: str = "the rules") -> dict[str, str]:
    """path -> type for every path some rule matches (the first that does).

    Raises:
      InputError: naming the rule's pattern when it matches none of `paths` (a typo would otherwise be silent).
    """
    paths = list(paths)
    types: dict[str, str] = {}
    for pattern, type_name in self.rules:
      hits = [p for p in paths if re.fullmatch(pattern, p)]
      if not hits:
        raise InputError(f"{source}: rule {pattern!r} matches no quantized tensor of this model (paths look like "
                         f"{paths[0]!r}).")  # fmt: skip
      for p in hits:
        types.setdefault(p, type_name)
    return types


def rules_from_types(types: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
  """Rules giving each path its type, one per (module, type) with its layers in the pattern, in layer order.

  Examples:
    >>> rules_from_types({"model/layers_0/mlp/down_proj/kernel": "Q6_K", "model/layers_3/mlp/down_proj/kernel": "Q6_K"})
    (('model/layers_(0|3)/mlp/down_proj/kernel', 'Q6_K'),)
  """
  layers: dict[tuple[str, str], list[str]] = defaultdict(list)
  others = []
  for path, type_name in types.items():
    m = re.fullmatch(r"model/layers_(\d+)/(.*)", path)
    if m:
      layers[m.group(2), type_name].append(m.group(1))
    else:
      others.append((re.escape(path), type_name))
  grouped = [(f"model/layers_({'|'.join(ids)})/{rest}", t) for (rest, t), ids in layers.items()]
  return tuple(others + grouped)


def write_rules(path: str, rules: TensorRules) -> None:
  """Writes `rules` to `path` as JSON (the caller makes the write atomic)."""
  value = {"format": "gguf", "base": rules.base, **rules.record,
           "rules": [{"pattern": p, "type": t} for p, t in rules.rules]}  # fmt: skip
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def read_rules(path: str) -> TensorRules:
  """The rules in the file at `path`, every field checked.

  Raises:
    InputError: naming the file and the field: missing, too large, not JSON, an unknown format or type, a
      pattern that is not a regular expression.
  """
  if not os.path.isfile(path):
    raise InputError(f"--rules={path}: no such file.")
  if os.path.getsize(path) > MAX_BYTES:
    raise InputError(f"--rules={path}: {os.path.getsize(path)} bytes, more than a rules file's {MAX_BYTES}.")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise InputError(f"--rules={path}: not a JSON rules file ({e}).") from None
  if not isinstance(value, dict):
    raise InputError(f"--rules={path}: expected a JSON object with 'format', 'base' and 'rules'.")
  if value.get("format") != "gguf":
    raise InputError(f"--rules={path}: 'format' is {value.get('format')!r}; qjax reads rules for 'gguf' files.")
  base = value.get("base")
  if base not in RECIPES:
    raise InputError(f"--rules={path}: 'base' is {base!r}, not a llama.cpp file type ({', '.join(RECIPES)}).")
  entries = value.get("rules")
  if not isinstance(entries, list) or not entries:
    raise InputError(f"--rules={path}: 'rules' must be a non-empty list of {{'pattern': ..., 'type': ...}}.")
  rules = []
  for n, entry in enumerate(entries):
    if not isinstance(entry, dict) or not isinstance(entry.get("pattern"), str) or "type" not in entry:
      raise InputError(f"--rules={path}: rule {n} must be {{'pattern': REGEX, 'type': TYPE}}, got {entry!r:.80}.")
    pattern, type_name = entry["pattern"], entry["type"]
    try:
      re.compile(pattern)
    except re.error as e:
      raise InputError(f"--rules={path}: rule {n}: {pattern!r} is not a regular expression ({e}).") from None
    if type_name not in ALLOCATABLE:
      raise InputError(f"--rules={path}: rule {n}: type {type_name!r} is not one qjax encodes for a linear; one of "
                       f"{', '.join(ALLOCATABLE)}.")  # fmt: skip
    rules.append((pattern, type_name))
  record = {k: v for k, v in value.items() if k not in ("format", "base", "rules")}
  return TensorRules(base, tuple(rules), record)
