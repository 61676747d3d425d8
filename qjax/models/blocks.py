"""The Llama family as the calibration runner sees it: the embedding, one decoder block at a time, the head.

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

# The q/k product is hard to clip precisely (AutoAWQ's `avoid_clipping`).
NO_CLIP = ("self_attn/q_proj", "self_attn/k_proj")

# Inside a block: the norms and the linears that read them, and the linears that write to the stream.
READERS = {
  "input_layernorm": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
  "post_attention_layernorm": ("mlp/gate_proj", "mlp/up_proj"),
}
WRITERS = ("self_attn/o_proj", "mlp/down_proj")


def scale_groups(block) -> list[ScaleGroup]:
  """AWQ's scale groups of a Llama-family block (AutoAWQ's `get_layers_for_scaling`).

  The v -> o group exists only without grouped-query attention: with it, o's input channels
  (one per query head) do not map one to one onto v's output channels.
  """
  attn = block["self_attn"]
  groups = [ScaleGroup("input_layernorm", READERS["input_layernorm"], "self_attn")]
  if attn["v_proj"]["kernel"].shape[::-1] == attn["o_proj"]["kernel"].shape:
    groups.append(ScaleGroup("self_attn/v_proj", ("self_attn/o_proj",), "self_attn/o_proj"))
  groups.append(ScaleGroup("post_attention_layernorm", READERS["post_attention_layernorm"], "mlp"))
  groups.append(ScaleGroup("mlp/up_proj", ("mlp/down_proj",), "mlp/down_proj"))
  return groups


def residual_stream(part) -> ResidualStream:
  """Where a part of a Llama-family model (full paths: embedding, ``model/layers_i`` blocks, norm and head)
  touches the residual stream."""
  model = part.get("model", {})
  readers, writers, embeddings = {}, [], []
  if "embed_tokens" in model:
    embeddings.append("model/embed_tokens/embedding")
  for name in model:
    if name.startswith("layers_"):
      prefix = f"model/{name}"
      for norm, linears in READERS.items():
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

  sequential_groups = SEQUENTIAL_GROUPS
  no_clip = NO_CLIP
  scale_groups = staticmethod(scale_groups)
  residual_stream = staticmethod(residual_stream)

  def __init__(self, checkpoint: Checkpoint, dtype=jnp.float32):
    self.checkpoint = checkpoint
    self.config = checkpoint.config
    self.num_layers = checkpoint.config.num_hidden_layers
    self.tied = checkpoint.config.tie_word_embeddings
    self.dtype = dtype
    self._layer = DecoderLayer(self.config, dtype)
    self._embed = Embed(self.config.vocab_size, self.config.hidden_size, dtype)

  def layer_prefix(self, i: int) -> str:
    return f"model/layers_{i}"

  def layer_params(self, i: int):
    return self.checkpoint.layer_params(i)

  def apply_layer(self, params, h: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
    return self._layer.apply({"params": params}, h, positions)[0]

  def embed_params(self):
    return {"model": {"embed_tokens": self.checkpoint.embed_params()}}

  def embed(self, params, ids: jax.Array) -> jax.Array:
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
