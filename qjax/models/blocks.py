"""The Llama family (Gemma 3 included) as the calibration runner sees it: the embedding, one decoder block at a time,
the head.

`LlamaBlocks` hands out the parts of a lazily read checkpoint and says where they can be reparametrised: the
scale groups of AWQ-style scalings and where each part touches the residual stream (for rotations).
"""

import jax
import jax.numpy as jnp
import numpy as np

from qjax.models.checkpoint import Checkpoint
from qjax.models.llama import DecoderLayer, Embed
from qjax.transforms.equivalence import ResidualStream, ScaleGroup

# Linear modules of a block in GPTQ's true-sequential order: each group's inputs depend on the groups before it.
SEQUENTIAL_GROUPS = (
  ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
  ("self_attn/o_proj",),
  ("mlp/gate_proj", "mlp/up_proj"),
  ("mlp/down_proj",),
)

# A sparse layer's: the experts read the MLP's input (gate/up of every expert at once), then down; the router stays
# in float.
EXPERT_INPUTS = ("mlp/experts/gate_proj", "mlp/experts/up_proj")
MOE_SEQUENTIAL_GROUPS = (*SEQUENTIAL_GROUPS[:2], EXPERT_INPUTS, ("mlp/experts/down_proj",))


def sequential_groups(block) -> tuple[tuple[str, ...], ...]:
  """The linear modules of a block in GPTQ's true-sequential order (a sparse layer's experts in place of the MLP)."""
  return MOE_SEQUENTIAL_GROUPS if "experts" in block["mlp"] else SEQUENTIAL_GROUPS


# The q/k product is hard to clip precisely (AutoAWQ's `avoid_clipping`).
NO_CLIP = ("self_attn/q_proj", "self_attn/k_proj")

# Inside a block: the norms and the linears that read them, and the linears that write to the stream.
ATTENTION_INPUTS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")
MLP_INPUTS = ("mlp/gate_proj", "mlp/up_proj")
WRITERS = ("self_attn/o_proj", "mlp/down_proj")


def block_readers(block) -> dict[str, tuple[str, ...]]:
  """The norms of a block and the linears that read them: Gemma's MLP reads ``pre_feedforward_layernorm`` (its
  ``post_attention_layernorm`` normalises the attention's output), the others' ``post_attention_layernorm``."""
  mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in block else "post_attention_layernorm"
  return {"input_layernorm": ATTENTION_INPUTS, mlp_norm: MLP_INPUTS}


def scale_groups(block) -> list[ScaleGroup]:
  """AWQ's scale groups of a Llama-family block (AutoAWQ's `get_layers_for_scaling`; Gemma's as AutoAWQ's Gemma 2:
  the norms that read the residual stream, whatever normalises the outputs).

  The v -> o group exists only without grouped-query attention: with it, o's input channels
  (one per query head) do not map one to one onto v's output channels.
  """
  attn = block["self_attn"]
  (attn_norm, attn_inputs), (mlp_norm, mlp_inputs) = block_readers(block).items()
  groups = [ScaleGroup(attn_norm, attn_inputs, "self_attn")]
  if attn["v_proj"]["kernel"].shape[::-1] == attn["o_proj"]["kernel"].shape:
    groups.append(ScaleGroup("self_attn/v_proj", ("self_attn/o_proj",), "self_attn/o_proj"))
  if "experts" in block["mlp"]:  # AutoAWQ's Mixtral: every expert's gate/up and the router; then each up -> down
    groups.append(ScaleGroup(mlp_norm, EXPERT_INPUTS, "mlp", float_readers=("mlp/gate",)))
    groups.append(ScaleGroup("mlp/experts/up_proj", ("mlp/experts/down_proj",), "mlp/experts/down_proj"))
  else:
    groups.append(ScaleGroup(mlp_norm, mlp_inputs, "mlp"))
    groups.append(ScaleGroup("mlp/up_proj", ("mlp/down_proj",), "mlp/down_proj"))
  return groups


def residual_stream(part) -> ResidualStream:
  """Where a part of a Llama-family model (full paths: embedding, ``model/layers_i`` blocks, norm and head)
  touches the residual stream.

  Raises:
    ValueError: for Gemma blocks: their outputs pass a norm with its own weights before joining the stream
      (``post_attention_layernorm``, ``post_feedforward_layernorm``), so a rotation of the stream cannot be folded
      into ``o_proj``/``down_proj``: ``(w * rmsnorm(y)) Q`` is no norm of ``y Q'`` for any ``Q'``.
  """
  model = part.get("model", {})
  readers, writers, embeddings = {}, [], []
  if "embed_tokens" in model:
    embeddings.append("model/embed_tokens/embedding")
  for name in model:
    if name.startswith("layers_"):
      prefix = f"model/{name}"
      if "experts" in model[name]["mlp"]:
        raise ValueError(f"{prefix}: rotating a mixture-of-experts layer is not implemented yet.")
      if "post_feedforward_layernorm" in model[name]:
        raise ValueError(
          f"{prefix}: a rotation cannot be folded into Gemma blocks: their outputs pass weighted norms "
          "(post_attention_layernorm, post_feedforward_layernorm) before joining the residual stream."
        )
      for norm, linears in block_readers(model[name]).items():
        readers[f"{prefix}/{norm}"] = tuple(f"{prefix}/{m}" for m in linears)
      writers += [f"{prefix}/{m}" for m in WRITERS]
  if "norm" in model and "lm_head" in part:
    readers["model/norm"] = ("lm_head",)
  return ResidualStream(readers, tuple(writers), tuple(embeddings))


class LlamaBlocks:
  """The parts of a lazily read Llama-family checkpoint, for `qjax.calib.quantize_model` and the runner.

  Args:
    checkpoint: the float checkpoint; each part is read when asked for.
    dtype: compute dtype of the blocks.
  """

  sequential_groups = staticmethod(sequential_groups)
  no_clip = NO_CLIP
  scale_groups = staticmethod(scale_groups)
  residual_stream = staticmethod(residual_stream)

  def __init__(self, checkpoint: Checkpoint, dtype=jnp.float32):
    self.checkpoint = checkpoint
    self.config = checkpoint.config
    self.num_layers = checkpoint.config.num_hidden_layers
    self.tied = checkpoint.config.tie_word_embeddings
    self.dtype = dtype
    # One block function per kind of layer (full or sliding-window attention, MLP or experts), compiled once each.
    self._layer_fns = {}
    self._embed = Embed(self.config.vocab_size, self.config.hidden_size, dtype, self.config.embed_scale)

  def layer_prefix(self, i: int) -> str:
    return f"model/layers_{i}"

  def layer_params(self, i: int):
    return self.checkpoint.layer_params(i)

  @staticmethod
  def _block_fn(layer: DecoderLayer):
    def apply(params, h: jax.Array) -> jax.Array:
      positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
      return layer.apply({"params": params}, h, positions)[0]

    return apply

  def layer_fn(self, i: int, *, all_experts: bool = False):
    """Block `i` as a function ``(params, h (b, t, d)) -> (b, t, d)``; the same function for blocks of one kind.

    `all_experts`: a sparse layer computes every expert on every token (calibration; `SparseMoeBlock`).
    """
    kind = (self.config.sliding(i), self.config.moe(i), all_experts and self.config.moe(i))
    if kind not in self._layer_fns:
      self._layer_fns[kind] = self._block_fn(DecoderLayer(self.config, self.dtype, *kind))
    return self._layer_fns[kind]

  def embed_params(self):
    return {"model": {"embed_tokens": self.checkpoint.embed_params()}}

  def embed(self, params, ids: jax.Array) -> jax.Array:
    table = params["model"]["embed_tokens"]["embedding"]
    if isinstance(table, np.ndarray):
      # A table on the host sends only the rows looked up to the device: all of it would be a copy of GBs (128k x
      # 4096 in float32 is 2.1 GB) beside the host's.
      used, inverse = np.unique(np.asarray(ids), return_inverse=True)
      lookup = Embed(len(used), self.config.hidden_size, self.dtype, self.config.embed_scale)
      return lookup.apply({"params": {"embedding": table[used]}}, jnp.asarray(inverse.reshape(np.shape(ids))))
    return self._embed.apply({"params": params["model"]["embed_tokens"]}, ids)

  def head_params(self):
    """The final norm and the output head; a tied head is the embedding, transposed (a view, not a copy)."""
    head = self.checkpoint.head_params()
    if "lm_head" in head:
      kernel = head["lm_head"]["kernel"]
    else:
      kernel = np.asarray(self.checkpoint.embed_params()["embedding"]).T
    return {"model": {"norm": head["norm"]}, "lm_head": {"kernel": kernel}}

  def assemble(self, embed, blocks: list, head):
    """The full parameter tree of `LlamaForCausalLM` from its parts (``lm_head`` only when the head is untied)."""
    model = {"embed_tokens": embed["model"]["embed_tokens"]}
    for i, block in enumerate(blocks):
      model[f"layers_{i}"] = block
    model["norm"] = head["model"]["norm"]
    params = {"model": model}
    if "lm_head" in head:
      params["lm_head"] = head["lm_head"]
    return params
