"""Fused projections: Phi-3 checkpoints store q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``.

qjax's model always holds the separate projections, so every method (the calibration runner, AWQ's scale groups,
GPTQ, a rotation) sees one structure. The fused form exists only on disk: readers split a fused tensor along its
output axis right after reading, and writers concatenate the parts right before writing. For a quantized part
(`QArray`) both are exact: the output axis is never inside a quantization group or a ggml block, so the fused
matrix's codes and scales are the parts' side by side. The parts of one fused projection share their input, so
they share its statistics and end with one spec and one act-order permutation, as a fused checkpoint requires.
"""

import dataclasses
import itertools

import numpy as np

from qjax.core import QArray, is_qarray
from qjax.core.qspec import PACKED
from qjax.models.config import LlamaConfig

# Hugging Face module inside a layer -> the modules it fuses, in the order their outputs are concatenated (each
# ``parent.name``, the parent shared).
FUSED_MODULES = {
  "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fused_modules(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
  """Fused module -> its parts, for a family whose checkpoints fuse projections (else empty)."""
  return FUSED_MODULES if config.fused_projections else {}


def part_widths(config: LlamaConfig, fused: str) -> tuple[int, ...]:
  """The output width of each part of `fused` (a key of `FUSED_MODULES`)."""
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  return (q, kv, kv) if fused.endswith("qkv_proj") else (config.intermediate_size,) * 2


def fused_of(config: LlamaConfig) -> dict[str, str]:
  """Part module -> the fused module holding it."""
  return {part: fused for fused, parts in fused_modules(config).items() for part in parts}


def _out_axis(q: QArray) -> int:
  """The axis of `q.codes` along output channels: packed codes are (k * bits / 32, n), the others (n, ...)."""
  return 1 if q.spec.layout == PACKED else 0


def concat_outputs(parts: list[QArray], name: str = "weight") -> QArray:
  """One `QArray` whose outputs are the parts' outputs in order (a fused projection).

  Raises:
    ValueError: naming `name` when the parts differ in spec, contraction axis, input length or act-order
      permutation (a fused checkpoint has one of each).
  """
  first = parts[0]
  for q in parts[1:]:
    same_perm = (q.perm is None) == (first.perm is None) and (
      q.perm is None or np.array_equal(np.asarray(q.perm), np.asarray(first.perm))
    )
    if q.spec != first.spec or q.axis != first.axis or q.canonical_shape[0] != first.canonical_shape[0]:
      raise ValueError(f"{name}: the fused parts differ in quantization spec or input; a fused tensor has one.")
    if not same_perm:
      raise ValueError(f"{name}: the fused parts have different act-order permutations; a fused tensor has one.")
  axis = _out_axis(first)
  join = lambda xs, ax: None if xs[0] is None else np.concatenate([np.asarray(x) for x in xs], axis=ax)
  k = first.canonical_shape[0]
  n = sum(q.canonical_shape[1] for q in parts)
  return dataclasses.replace(
    first,
    codes=join([q.codes for q in parts], axis),
    scale=join([q.scale for q in parts], -1),
    zero=join([q.zero for q in parts], -1),
    shape=(k, n) if first.axis == 0 else (n, k),
  )


def split_outputs(q: QArray, widths: tuple[int, ...], name: str = "weight") -> list[QArray]:
  """Inverse of `concat_outputs`: the parts of a fused `QArray`, of output widths `widths`.

  Raises:
    ValueError: naming `name` when the widths do not add up to the output length, or a part would not start on a
      whole word of packed codes.
  """
  k, n = q.canonical_shape
  if sum(widths) != n:
    raise ValueError(f"{name}: {n} outputs cannot be split into parts of {widths}.")
  axis = _out_axis(q)
  bounds = np.cumsum((0, *widths))
  parts = []
  for lo, hi in itertools.pairwise(bounds):
    cut = lambda x, ax, lo=lo, hi=hi: None if x is None else np.take(np.asarray(x), np.arange(lo, hi), axis=ax)
    parts.append(
      dataclasses.replace(
        q,
        codes=cut(q.codes, axis),
        scale=cut(q.scale, -1),
        zero=cut(q.zero, -1),
        shape=(k, hi - lo) if q.axis == 0 else (hi - lo, k),
      )
    )
  return parts


def split_layer(layer: dict, config: LlamaConfig) -> dict:
  """A decoder layer's Flax params with each fused module (``kernel`` [in, out] dense or `QArray`, optional
  ``bias``) replaced by its parts; a layer without fused modules is returned as is."""
  layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}  # the parent dicts change
  for fused, parts in fused_modules(config).items():
    parent, name = fused.split(".")
    node = layer.get(parent, {}).get(name)
    if node is None:
      continue
    widths = part_widths(config, fused)
    values = {}
    for leaf, value in node.items():
      if is_qarray(value):
        values[leaf] = split_outputs(value, widths, fused)
      else:
        pieces = np.split(np.asarray(value), np.cumsum(widths)[:-1], axis=-1)  # kernel [in, out], bias [out]
        values[leaf] = [np.ascontiguousarray(p) for p in pieces]  # own buffers: writers need contiguous arrays
    del layer[parent][name]
    for i, part in enumerate(parts):
      layer[parent][part.split(".")[1]] = {leaf: pieces[i] for leaf, pieces in values.items()}
  return layer


def fuse_layer(layer: dict, config: LlamaConfig) -> dict:
  """Inverse of `split_layer`: each set of parts concatenated into its fused module.

  Raises:
    ValueError: when parts differ in what they hold (one quantized, another dense), or as `concat_outputs`.
  """
  layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}  # the parent dicts change
  for fused, parts in fused_modules(config).items():
    parent, name = fused.split(".")
    names = [part.split(".")[1] for part in parts]
    nodes = [layer.get(parent, {}).get(part) for part in names]
    if any(node is None for node in nodes):
      continue
    if len({tuple(sorted(n)) for n in nodes}) > 1 or len({is_qarray(n.get("kernel")) for n in nodes}) > 1:
      raise ValueError(f"{fused}: its parts {parts} must be all quantized or all dense, with the same leaves.")
    value = {}
    for leaf in nodes[0]:
      pieces = [node[leaf] for node in nodes]
      if is_qarray(pieces[0]):
        value[leaf] = concat_outputs(pieces, fused)
      else:
        value[leaf] = np.concatenate([np.asarray(p) for p in pieces], axis=-1)
    for part in names:
      del layer[parent][part]
    layer[parent][name] = value
  return layer


def fuse_params(params: dict, config: LlamaConfig) -> dict:
  """The parameter tree as a fused checkpoint stores it (`fuse_layer` on every layer); unchanged for other
  families."""
  if not config.fused_projections:
    return params
  model = {k: fuse_layer(v, config) if k.startswith("layers_") else v for k, v in params["model"].items()}
  return {**params, "model": model}
