"""llama.cpp's quantization mixtures (Q4_K_M, Q5_K_M, …) as qjax rules.

A recipe names a default ggml type and llama.cpp's per-tensor choices on top of it: the
output (and a tied embedding) at Q6_K, more bits for ``attn_v`` and ``ffn_down`` in some
layers, and a fallback to a 32-block type for rows that are not whole 256-blocks. These
facts follow llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``) for dense Llama-family models;
`tensor_types` reproduces its per-tensor decisions and `gguf_recipe` turns them into
`Rule`s (regex on parameter paths, first match wins) of `kquant` transforms.
"""

import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qjax.core import ggml
from qjax.transforms.base import Transform
from qjax.transforms.methods import kquant
from qjax.transforms.rules import Rule

if TYPE_CHECKING:  # the config is read by attribute; transforms do not import the models layer
  from qjax.models.config import LlamaConfig

# recipe -> its default ggml type (llama_ftype_get_default_type)
RECIPES = {
  "Q4_0": "Q4_0",
  "Q4_1": "Q4_1",
  "Q5_0": "Q5_0",
  "Q5_1": "Q5_1",
  "Q8_0": "Q8_0",
  "Q2_K": "Q2_K",
  "Q3_K_S": "Q3_K",
  "Q3_K_M": "Q3_K",
  "Q3_K_L": "Q3_K",
  "Q4_K_S": "Q4_K",
  "Q4_K_M": "Q4_K",
  "Q5_K_S": "Q5_K",
  "Q5_K_M": "Q5_K",
  "Q6_K": "Q6_K",
  "IQ4_NL": "IQ4_NL",
  "IQ4_XS": "IQ4_XS",
}

# 256-block types and the 32-block type llama.cpp uses when a row is not whole 256-blocks
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}

# Flax module inside a layer -> llama.cpp tensor category
CATEGORIES = {
  "self_attn/q_proj": "attn_q",
  "self_attn/k_proj": "attn_k",
  "self_attn/v_proj": "attn_v",
  "self_attn/o_proj": "attn_output",
  "mlp/gate_proj": "ffn_gate",
  "mlp/up_proj": "ffn_up",
  "mlp/down_proj": "ffn_down",
}
# A sparse layer's stacked experts (ffn_gate_exps, …): llama.cpp matches categories by substring, so they are typed
# as their dense counterparts (ffn_down by the layer in the tensor's name); the router (ffn_gate_inp) stays F32.
EXPERT_CATEGORIES = {"mlp/experts/gate_proj": "ffn_gate", "mlp/experts/up_proj": "ffn_up",
                     "mlp/experts/down_proj": "ffn_down"}  # fmt: skip


# A family that fuses projections (Phi-3) stores q/k/v as one attn_qkv tensor, which llama.cpp treats as it treats
# attn_v, and gate/up as one ffn_up tensor. Rows are quantized one by one, so quantizing the parts with the fused
# tensor's type and concatenating their rows gives llama.cpp's fused tensor.
FUSED_CATEGORIES = {**CATEGORIES, "self_attn/q_proj": "attn_qkv", "self_attn/k_proj": "attn_qkv",
                    "self_attn/v_proj": "attn_qkv", "mlp/gate_proj": "ffn_up"}  # fmt: skip
ATTN_V_LIKE = ("attn_v", "attn_qkv")  # llama.cpp's category_is_attn_v


def categories(config: "LlamaConfig", i: int | None = None) -> dict[str, str]:
  """Flax module inside a layer (layer `i`: the modules it has, experts or a dense MLP) -> the category of the
  llama.cpp tensor holding it."""
  modules = FUSED_CATEGORIES if config.fused_projections else CATEGORIES
  if i is None:
    return {**modules, **(EXPERT_CATEGORIES if config.num_experts else {})}
  if config.moe(i):
    return {**{m: c for m, c in modules.items() if not m.startswith("mlp/")}, **EXPERT_CATEGORIES}
  return modules


def check_recipe(recipe: str) -> str:
  if recipe not in RECIPES:
    raise ValueError(f"unknown GGUF recipe {recipe!r}; known recipes: {', '.join(RECIPES)} (and F32, F16, BF16).")
  return recipe


def use_more_bits(i: int, n: int) -> bool:
  """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
  return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_type(recipe: str, category: str, i: int, config: "LlamaConfig", *, imatrix: bool) -> str:
  """The type llama.cpp picks for a decoder-layer tensor before the shape fallback."""
  t, n = RECIPES[recipe], config.num_hidden_layers
  if category in ATTN_V_LIKE:
    if recipe == "Q2_K":
      t = "Q4_K" if config.num_attention_heads // config.num_key_value_heads >= 4 else "Q3_K"
    elif recipe == "Q3_K_M":
      t = "Q5_K" if i < 2 else "Q4_K"
    elif recipe == "Q3_K_L":
      t = "Q5_K"
    elif recipe in ("IQ4_NL", "IQ4_XS") and config.num_attention_heads // config.num_key_value_heads >= 4:
      t = "Q5_K"
    elif recipe in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
      t = "Q6_K"
    elif recipe == "Q4_K_S" and i < 4:
      t = "Q5_K"
    if _is_70b(config) and t in ("Q3_K", "Q4_K"):
      t = "Q5_K"  # 8 query heads share each value head: the small attn_v gets more bits
    if config.num_experts == 8:
      t = "Q8_0"  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
  elif category == "attn_k" and config.num_experts == 8:
    t = "Q8_0"
  elif category == "ffn_down":
    if recipe == "Q2_K":
      t = "Q3_K"
    elif recipe == "Q3_K_M":
      t = "Q5_K" if i < n // 16 else "Q4_K"
    elif recipe == "Q3_K_L":
      t = "Q5_K"
    elif recipe in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
      t = "Q6_K"
    elif recipe in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not imatrix:
      t = "Q5_K"
    elif recipe == "Q4_K_S" and i < n // 8:
      t = "Q5_K"
    elif recipe in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
      t = {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[recipe]
  elif category == "attn_output" and config.num_experts == 8:
    t = "Q5_K" if recipe in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS") else t
  elif category == "attn_output":
    t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(recipe, t)
  return t


def _is_70b(config: "LlamaConfig") -> bool:
  # llama.cpp's LLM_TYPE_70B for the llama architecture (qjax writes Llama, Mistral and Mixtral as it): 80 layers,
  # unless 8 experts (its 8x7B and 8x22B types).
  llama = config.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
  return llama and config.num_hidden_layers == 80 and config.num_experts != 8


def _output_type(recipe: str, row_length: int) -> str:
  default = RECIPES[recipe]
  if row_length % ggml.BLOCK_TYPES[default].block_size:
    return "Q8_0"
  return default if default == "Q8_0" else "Q6_K"


def fallback(type_name: str, row_length: int) -> str:
  """llama.cpp's `tensor_type_fallback`: a 32-block type for rows that are not whole 256-blocks.

  Raises:
    ValueError: if the row fits no block size (not a multiple of 32).
  """
  if row_length % ggml.BLOCK_TYPES[type_name].block_size == 0:
    return type_name
  fitted = FALLBACK.get(type_name, type_name)
  if row_length % ggml.BLOCK_TYPES[fitted].block_size:
    raise ValueError(
      f"a row of {row_length} elements fits no ggml block size (32 or 256); llama.cpp would keep it in F16."
    )
  return fitted


def row_lengths(config: "LlamaConfig") -> dict[str, int]:
  """Flax path of every decoder-layer linear -> the row length llama.cpp quantizes it along (its input width)."""
  q_width = config.num_attention_heads * config.head_dim
  rows = {  # ne[0]: the row length llama.cpp quantizes along (the input width)
    "self_attn/q_proj": config.hidden_size,
    "self_attn/k_proj": config.hidden_size,
    "self_attn/v_proj": config.hidden_size,
    "self_attn/o_proj": q_width,
    "mlp/gate_proj": config.hidden_size,
    "mlp/up_proj": config.hidden_size,
    "mlp/down_proj": config.intermediate_size,
    "mlp/experts/gate_proj": config.hidden_size,
    "mlp/experts/up_proj": config.hidden_size,
    "mlp/experts/down_proj": config.expert_size,
  }
  return {
    f"model/layers_{i}/{module}/kernel": rows[module]
    for i in range(config.num_hidden_layers)
    for module in categories(config, i)
  }


def tied_groups(config: "LlamaConfig") -> list[tuple[str, ...]]:
  """The decoder linears grouped by the llama.cpp tensor that holds them: one type per group (Phi-3's attn_qkv holds
  q/k/v, its ffn_up gate/up; every other family stores each linear, its experts stacked, as its own tensor)."""
  groups = []
  for i in range(config.num_hidden_layers):
    by_tensor: dict[str, list[str]] = defaultdict(list)
    for module, category in categories(config, i).items():
      fused = config.fused_projections and category in ("attn_qkv", "ffn_up")
      by_tensor[category if fused else module].append(f"model/layers_{i}/{module}/kernel")
    groups += [tuple(paths) for paths in by_tensor.values()]
  return groups


ALLOCATABLE = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""The types a bit allocation chooses among for a block linear: llama.cpp reads any of them for any tensor."""


def types_for_row(row_length: int) -> tuple[str, ...]:
  """The `ALLOCATABLE` types whose blocks tile a row of `row_length` elements."""
  return tuple(t for t in ALLOCATABLE if row_length % ggml.BLOCK_TYPES[t].block_size == 0)


def tensor_types(
  recipe: str, config: "LlamaConfig", *, imatrix: bool = False, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
  """Flax parameter path -> ggml type of every quantized tensor, as ``llama-quantize`` chooses it.

  Norms and other 1-D tensors are not listed (they stay F32).

  Args:
    recipe: a llama.cpp file type (`RECIPES`).
    config: the model's config.
    imatrix: the types llama.cpp gives a file made with an importance matrix.
    overrides: path -> ggml type replacing the recipe's choice for that tensor (a bit allocation, or
      ``llama-quantize --tensor-type``); taken as given, without llama.cpp's fallback.

  Raises:
    ValueError: naming the tensor, for an override of a path that is not quantized or a type whose blocks do
      not tile its rows.
  """
  check_recipe(recipe)
  hidden = config.hidden_size
  chosen = {}  # path -> (category, type before the fallback, row length)
  output = _output_type(recipe, hidden)
  embed = output if config.tie_word_embeddings else RECIPES[recipe]
  chosen["model/embed_tokens/embedding"] = ("token_embd", embed, hidden)
  if not config.tie_word_embeddings:
    chosen["lm_head/kernel"] = ("output", output, hidden)
  for path, row_length in row_lengths(config).items():
    i, module = re.fullmatch(r"model/layers_(\d+)/(.*)/kernel", path).groups()
    category = categories(config, int(i))[module]
    chosen[path] = (category, _layer_type(recipe, category, int(i), config, imatrix=imatrix), row_length)
  types = {}
  for path, (category, type_name, row_length) in chosen.items():
    try:
      types[path] = fallback(type_name, row_length)
    except ValueError as e:
      raise ValueError(f"{path} ({category}, {type_name} in {recipe}): {e}") from None
  for path, type_name in (overrides or {}).items():
    if path not in chosen:
      raise ValueError(f"{path}: not a tensor a GGUF recipe quantizes, so no type can be set for it.")
    row_length = chosen[path][2]
    block = ggml.BLOCK_TYPES[type_name].block_size if type_name in ggml.BLOCK_TYPES else None
    if block is None or row_length % block:
      fits = ", ".join(types_for_row(row_length))
      raise ValueError(f"{path}: {type_name} does not tile its rows of {row_length} elements; one of {fits}.")
    types[path] = type_name
  if overrides:
    for group in tied_groups(config):
      if len({types[p] for p in group}) > 1:
        given = ", ".join(f"{p.rsplit('/', 2)[-2]} {types[p]}" for p in group)
        raise ValueError(f"{group[0]}: llama.cpp stores {' and '.join(p.rsplit('/', 2)[-2] for p in group)} of this "
                         f"layer as one tensor, so they take one type; the overrides give {given}.")  # fmt: skip
  return types


def gguf_recipe(
  recipe: str,
  config: "LlamaConfig",
  *,
  imatrix: bool = False,
  linear: Callable[[str], Transform] | None = None,
  overrides: Mapping[str, str] | None = None,
) -> list[Rule]:
  """The recipe as rules: one rule per (tensor kind, type), its layers in the pattern.

  Args:
    recipe: a llama.cpp file type name (see `RECIPES`).
    config: the model's config (layer count, widths, heads, tied embeddings).
    imatrix: whether block linears are quantized with an importance matrix (the runner's
      ``imatrix`` statistic); the embedding and output never are, as in llama.cpp.
    linear: ``type name -> transform`` rounding the block linears into their types (e.g. GPTQ into the block
      grid); by default llama.cpp's own encoders (`kquant`).
    overrides: path -> ggml type replacing the recipe's choice (see `tensor_types`).

  Examples:
    >>> from qjax.models import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    ...                   num_attention_heads=32, num_key_value_heads=32, head_dim=128)
    >>> [r.name for r in gguf_recipe("Q4_K_M", cfg)][:3]
    ['token_embd Q4_K', 'output Q6_K', 'attn_q Q4_K']
  """
  by_kind: dict[tuple[str, str], list[int]] = defaultdict(list)
  rules = []
  for path, type_name in tensor_types(recipe, config, imatrix=imatrix, overrides=overrides).items():
    if path == "model/embed_tokens/embedding":
      rules.append(Rule(re.escape(path), kquant(type_name, axis=1), name=f"token_embd {type_name}"))
    elif path == "lm_head/kernel":
      rules.append(Rule(re.escape(path), kquant(type_name), name=f"output {type_name}"))
    else:
      layer, module = re.fullmatch(r"model/layers_(\d+)/(.*)/kernel", path).groups()
      by_kind[module, type_name].append(int(layer))
  for (module, type_name), layers in by_kind.items():
    pattern = f"model/layers_({'|'.join(map(str, layers))})/{module}/kernel"
    transform = kquant(type_name, imatrix=imatrix) if linear is None else linear(type_name)
    rules.append(Rule(pattern, transform, name=f"{categories(config)[module]} {type_name}"))
  return rules
