"""Where a model goes: one parser for ``--export`` / ``--to`` values, the checks made before any work, and
the dispatch to each format's writer.

A target is a qjax directory (the default), a Hugging Face directory a GPU runtime loads (``gptq``,
``gptq_v2``, ``awq``, ``compressed-tensors``), or ``gguf:<TYPE>`` where TYPE is what ``llama-quantize`` takes: a
llama.cpp file type (``Q4_K_M`` … `RECIPES`, its per-tensor types) or a float type (`FLOAT_TYPES`).
"""

import json
import os
from typing import NamedTuple

from qjax.core import QSpec
from qjax.formats import awq, compressed_tensors, gguf, gptq, hf_quantized, native
from qjax.formats.gguf import FLOAT_TYPES
from qjax.formats.output import atomic_directory
from qjax.formats.shards import as_parts
from qjax.kernels import from_kernel_layout_params
from qjax.models.config import LlamaConfig
from qjax.transforms.gguf_recipes import RECIPES

HF_FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's list; -1: one group per output channel
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Who reads a GPTQ checkpoint whose group size does not divide a layer's input width (a shorter last group).
PARTIAL_GROUP_READERS = (
  "GPTQModel's torch kernel and transformers loading it with GPTQConfig(backend='torch') read it; vLLM, Marlin and "
  "ExLlama kernels and GPTQModel's default CPU kernel refuse it"
)
QJAX = "qjax"

TARGET_MSG = "{flag} expected gguf:<TYPE> (TYPE one of {types}) or one of {formats}, got {value!r}."


class Target(NamedTuple):
  """A parsed target.

  Attributes:
    kind: ``"qjax"``, ``"gguf"``, or a Hugging Face format (`HF_FORMATS`).
    gguf_type: for ``"gguf"``: a llama.cpp file type (`RECIPES`) or a float type (`FLOAT_TYPES`).
  """

  kind: str
  gguf_type: str | None = None

  @property
  def is_gguf(self) -> bool:
    return self.kind == "gguf"

  @property
  def is_gptq(self) -> bool:
    """A GPTQ directory (v1 or v2 zero points)."""
    return self.kind in gptq.CHECKPOINT_FORMATS

  @property
  def is_hf(self) -> bool:
    return self.kind in HF_FORMATS

  @property
  def quantizes(self) -> bool:
    """Whether the target's format rounds the weights itself (a GGUF file type rather than a float type)."""
    return self.is_gguf and self.gguf_type not in FLOAT_TYPES

  def __str__(self) -> str:
    return f"gguf:{self.gguf_type}" if self.is_gguf else self.kind


def parse_target(value: str | None, *, flag: str = "--export") -> Target:
  """``None`` -> the qjax directory; ``"gguf:Q4_K_M"``, ``"gguf:F16"``, ``"gptq"``, ``"gptq_v2"``, ``"awq"``,
  ``"compressed-tensors"``.

  Raises:
    ValueError: naming `flag` and the allowed values.

  Examples:
    >>> parse_target("gguf:Q4_K_M"), parse_target("awq").is_hf
    (Target(kind='gguf', gguf_type='Q4_K_M'), True)
  """
  if value is None or value == QJAX:
    return Target(QJAX)
  kind, _, type_name = value.partition(":")
  if kind in HF_FORMATS and not type_name:
    return Target(kind)
  if kind == "gguf" and (type_name in RECIPES or type_name in FLOAT_TYPES):
    return Target(kind, type_name)
  types = ", ".join([*RECIPES, *FLOAT_TYPES])
  raise ValueError(TARGET_MSG.format(flag=flag, types=types, formats=", ".join(HF_FORMATS), value=value))


def output_path(target: Target, out: str) -> str:
  """What a target writes under `out`: the directory itself, or ``<out>/model-<TYPE>.gguf``."""
  return os.path.join(out, f"model-{target.gguf_type}.gguf") if target.is_gguf else out


def loader_note(target: Target, directory: str) -> str | None:
  """What a user loading the model qjax wrote to `directory` should know that no check can refuse, or None.

  transformers 5 stacks a mixture's experts into fused parameters and quantizes only `nn.Linear`s, so its
  `from_pretrained` of a GPTQ or AWQ checkpoint with per-expert modules (the names vLLM and GPTQModel read) reports
  the experts MISSING and runs them with random weights. compressed-tensors' experts it decompresses into the fused
  parameters, but without their zero points, so it refuses asymmetric ones.
  """
  if not target.is_hf:
    return None
  with open(os.path.join(directory, "config.json")) as f:  # qjax's own, just written
    config = json.load(f)
  if not (config.get("num_local_experts") or config.get("num_experts")):
    return None
  if target.kind != "compressed-tensors":
    return (f"note: transformers 5's from_pretrained leaves the experts of this {target} checkpoint uninitialised "
            "(it fuses experts and cannot place per-expert quantized modules); serve it with vLLM or load it with "
            "GPTQModel, or export symmetric compressed-tensors for transformers.")  # fmt: skip
  groups = config["quantization_config"].get("config_groups", {}).values()
  if any((group.get("weights") or {}).get("symmetric") is False for group in groups):
    return (
      "note: transformers 5 cannot load this model's asymmetric experts (it decompresses experts without "
      "their zero points); vLLM and qjax read them, or quantize with --sym for transformers."
    )
  return None


def check_spec(target: Target, spec: QSpec, *, act_order: bool) -> None:
  """Raises for quantization settings a Hugging Face target cannot hold (checked before quantizing).

  Args:
    target: the target.
    spec: the grid of every quantized linear.
    act_order: whether the result will carry an act-order permutation (GPTQ ``desc_act`` with dynamic groups).
  """
  if target.kind == "awq":
    if spec.bits != awq.BITS:
      raise ValueError(f"--export=awq stores 4-bit codes, got --bits={spec.bits}; use --bits=4 or --export=gptq.")
    if act_order:
      raise ValueError("--export=awq has no g_idx for act-order; drop --desc_act (or add --static_groups).")
  elif target.kind == "compressed-tensors":
    if act_order:
      raise ValueError(compressed_tensors.ACTORDER_GROUP_MSG.format(name="--export=compressed-tensors"))
  elif target.is_hf and spec.bits not in gptq.BITS:
    raise ValueError(f"--export={target} stores bits {gptq.BITS}, got --bits={spec.bits} (no GPTQ loader reads it).")


def check_group_size(target: Target, group_size: int, config: LlamaConfig, *, partial_groups: bool = False) -> None:
  """Raises unless `group_size` divides the input width of every linear a Hugging Face target quantizes.

  A shorter last group is GPTQ's own definition, but the kernels that serve GPTQ, AWQ and compressed-tensors
  checkpoints (vLLM, Marlin, GPTQModel's CPU kernel) refuse it, so it is written only when asked for
  (`partial_groups`, GPTQ only).

  Raises:
    ValueError: naming the widths that do not divide, the group sizes that would, and the way out.
  """
  if not target.is_hf or group_size == -1:
    return
  widths: dict[int, list[str]] = {}
  for module in LINEAR_MODULES:
    widths.setdefault(hf_quantized.linear_shape(config, module)[0], []).append(module)
  bad = {k: modules for k, modules in widths.items() if k % group_size}
  if not bad or (partial_groups and target.is_gptq):
    return
  divisors = [g for g in GROUP_SIZES if g != -1 and all(k % g == 0 for k in widths)]
  found = "; ".join(f"in={k} ({', '.join(modules)})" for k, modules in bad.items())
  way_out = f"use --group_size in {[*divisors, -1]} (-1: one group per output channel)"
  if target.is_gptq:
    way_out += f", or --partial_groups for a shorter last group ({PARTIAL_GROUP_READERS})"
  raise ValueError(f"--export={target} with --group_size={group_size}: {group_size} does not divide {found}; "
                   f"{way_out}.")  # fmt: skip


def check_shapes(target: Target, spec: QSpec, config: LlamaConfig) -> None:
  """Raises when a Hugging Face target cannot hold `spec` on a model with `config` (checked before quantizing)."""
  if not target.is_hf:
    return
  for module in LINEAR_MODULES:
    k, n = hf_quantized.linear_shape(config, module)
    if target.kind == "awq":
      awq.check_awq_shape(k, n, spec.group_size, module, "--export=awq")
    elif target.is_gptq:
      for what, length in (("the input width", k), ("the output width", n)):
        gptq.check_packable(length, spec.bits, what, module, f"--export={target}")


def export(
  target: Target,
  out: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  name: str,
  metadata=None,
  description: str = "",
  overwrite: bool = False,
  atomic: bool = True,
  actorder: str | None = None,
) -> str:
  """Writes quantized params to `target` in the directory `out` and returns the path of the model written.

  Args:
    target: where to.
    out: the output directory (a GGUF file goes inside it, see `output_path`).
    config: the config of the quantized model.
    params: its parameter tree (`QArray` leaves in any layout), or a stream of its parts in model order (the
      embedding, each block, the head: full-path subtrees), written as they come (`qjax.formats.shards`).
    tokenizer: its `transformers` tokenizer.
    name: the model's name (GGUF ``general.name``).
    metadata: JSON facts recorded in a qjax directory's config (source model, recipe, flags).
    description: how the model was made, for a GGUF file's ``general.quantized_by``.
    overwrite: replace a previous qjax output of another kind (see `qjax.formats.output`).
    atomic: write to a temporary sibling and rename (False: write into `out`, an existing directory the caller
      made, e.g. its own temporary one).
    actorder: for compressed-tensors, ``"weight"`` when GPTQ ran in activation order with groups kept in input
      order (``--desc_act --static_groups``).

  Raises:
    InputError: if `out` may not be written (it holds files qjax did not write, …).
  """
  if atomic:
    with atomic_directory(out, target.kind, overwrite=overwrite) as tmp:
      export(target, tmp, config, params, tokenizer, name=name, metadata=metadata, description=description,
             atomic=False, actorder=actorder)  # fmt: skip
    return output_path(target, out)
  params = map(from_kernel_layout_params, as_parts(params))
  if target.is_gguf:
    float_type = target.gguf_type if target.gguf_type in FLOAT_TYPES else "F32"
    entries = gguf.tokenizer_metadata(tokenizer, config.vocab_size)
    path = output_path(target, out)
    gguf.write_gguf(path, config, params, entries, float_type=float_type, file_type=target.gguf_type, name=name,
                    description=description)  # fmt: skip
  elif target.kind == "awq":
    awq.write_awq(out, config, params, tokenizer)
  elif target.kind == "compressed-tensors":
    compressed_tensors.write_compressed_tensors(out, config, params, tokenizer, actorder=actorder)
  elif target.is_hf:
    gptq.write_gptq(out, config, params, tokenizer, checkpoint_format=target.kind)
  else:
    native.write_quantized(out, config, params, tokenizer, metadata=metadata)
  return output_path(target, out)
