"""Per-tensor format rules as a file: what a bit allocation writes and `qjax quantize --rules=FILE` reads.

A JSON object, for a GGUF file::

  {"format": "gguf", "base": "Q4_K_M",
   "rules": [{"pattern": "model/layers_(0|5)/mlp/down_proj/kernel", "type": "Q6_K"}, ...],
   ...}

or for linears on an affine grid (GPTQ, compressed-tensors and qjax directories)::

  {"format": "affine", "group_size": 128, "sym": true,
   "rules": [{"pattern": "model/layers_(0|5)/mlp/down_proj/kernel", "bits": 8},
             {"pattern": "model/layers_3/self_attn/o_proj/kernel", "bits": 4, "group_size": 32}, ...],
   ...}

Each rule's ``pattern`` is a regular expression fully matched against a tensor's '/'-joined Flax path (the first
matching rule wins, as in `qjax.transforms.Rule`); ``type`` is the llama.cpp type the matched tensors take instead
of the ``base`` recipe's, ``bits`` the width they take on the grid of ``group_size`` and ``sym`` (the one the
widths were chosen on) instead of --bits, in groups of the rule's own ``group_size`` where it gives one. Tensors no
rule matches keep the base's. Other keys (the budget, the proxy, its prediction) are a record and are not read
back. The file is untrusted input: its size is bounded and every field checked before use.
"""

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from qjax.core import InputError
from qjax.formats.targets import GROUP_SIZES
from qjax.transforms.gguf_recipes import ALLOCATABLE, RECIPES

FORMATS = ("gguf", "affine")
AFFINE_BITS = (2, 3, 4, 5, 6, 7, 8)
MAX_BYTES = 4 << 20


class TensorRules(NamedTuple):
  """A rules file's content: ``rules`` are ``(pattern, value)`` in priority order, the value a ggml type over the
  ``base`` recipe (format ``"gguf"``) or a bit width, and group size where it is not ``group_size``, as
  `qjax.eval.sensitivity.affine_choice` labels (``"3"``, ``"4g32"``; format ``"affine"``, on the grid of
  ``group_size`` and ``symmetric``)."""

  base: str | None
  rules: tuple[tuple[str, str], ...]
  record: Mapping[str, Any] = MappingProxyType({})
  format: str = "gguf"
  group_size: int | None = None
  symmetric: bool | None = None

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
  if rules.format == "gguf":
    head = {"format": "gguf", "base": rules.base}
    entries = [{"pattern": p, "type": t} for p, t in rules.rules]
  else:
    head = {"format": "affine", "group_size": rules.group_size, "sym": rules.symmetric}
    entries = []
    for pattern, label in rules.rules:
      bits, _, group = label.partition("g")
      entries.append({"pattern": pattern, "bits": int(bits), **({"group_size": int(group)} if group else {})})
  with open(path, "w") as f:
    json.dump({**head, **rules.record, "rules": entries}, f, indent=2)
    f.write("\n")


def read_rules(path: str) -> TensorRules:
  """The rules in the file at `path`, every field checked.

  Raises:
    InputError: naming the file and the field: missing, too large, not JSON, an unknown format, type or width, a
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
    raise InputError(f"--rules={path}: expected a JSON object with 'format' and 'rules'.")
  fmt = value.get("format")
  if fmt not in FORMATS:
    raise InputError(f"--rules={path}: 'format' is {fmt!r}; qjax reads rules for {' and '.join(map(repr, FORMATS))}.")
  if fmt == "gguf":
    base, key, allowed = value.get("base"), "type", ALLOCATABLE
    if base not in RECIPES:
      raise InputError(f"--rules={path}: 'base' is {base!r}, not a llama.cpp file type ({', '.join(RECIPES)}).")
    grid = {}
  else:
    base, key, allowed = None, "bits", AFFINE_BITS
    group_size, sym = value.get("group_size"), value.get("sym")
    if type(group_size) is not int or group_size not in GROUP_SIZES:
      raise InputError(f"--rules={path}: 'group_size' is {group_size!r}, not one of {GROUP_SIZES}.")
    if not isinstance(sym, bool):
      raise InputError(f"--rules={path}: 'sym' must be true or false, got {sym!r}.")
    grid = {"group_size": group_size, "symmetric": sym}
  entries = value.get("rules")
  if not isinstance(entries, list) or not entries:
    raise InputError(f"--rules={path}: 'rules' must be a non-empty list of {{'pattern': ..., '{key}': ...}}.")
  rules = []
  for n, entry in enumerate(entries):
    if not isinstance(entry, dict) or not isinstance(entry.get("pattern"), str) or key not in entry:
      raise InputError(f"--rules={path}: rule {n} must be {{'pattern': REGEX, '{key}': ...}}, got {entry!r:.80}.")
    pattern, choice = entry["pattern"], entry[key]
    try:
      re.compile(pattern)
    except re.error as e:
      raise InputError(f"--rules={path}: rule {n}: {pattern!r} is not a regular expression ({e}).") from None
    if type(choice) is not type(allowed[0]) or choice not in allowed:
      what = "type" if key == "type" else "width"
      raise InputError(f"--rules={path}: rule {n}: {what} {choice!r} is not one qjax writes for a linear; one of "
                       f"{', '.join(map(str, allowed))}.")  # fmt: skip
    group = entry.get("group_size", grid.get("group_size"))
    if fmt == "affine" and (type(group) is not int or group not in GROUP_SIZES):
      raise InputError(f"--rules={path}: rule {n}: 'group_size' is {group!r}, not one of {GROUP_SIZES}.")
    rules.append((pattern, f"{choice}g{group}" if fmt == "affine" and group != grid["group_size"] else str(choice)))
  record = {k: v for k, v in value.items() if k not in ("format", "base", "group_size", "sym", "rules")}
  return TensorRules(base, tuple(rules), record, fmt, **grid)
