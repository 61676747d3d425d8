"""The Llama family as the calibration runner sees it: embed, then one decoder block at a time."""

import jax
import jax.numpy as jnp

from qjax.calib.awq import ScaleGroup
from qjax.models.checkpoint import Checkpoint
from qjax.models.llama import DecoderLayer, Embed

# Linear modules of a block in GPTQ's true-sequential order: each group's inputs depend on the groups before it.
SEQUENTIAL_GROUPS = (
  ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
  ("self_attn/o_proj",),
  ("mlp/gate_proj", "mlp/up_proj"),
  ("mlp/down_proj",),
)


# The q/k product is hard to clip precisely (AutoAWQ's `avoid_clipping`).
AWQ_NO_CLIP = ("self_attn/q_proj", "self_attn/k_proj")


def awq_scale_groups(block) -> list[ScaleGroup]:
  """AWQ's scale groups of a Llama-family block (AutoAWQ's `get_layers_for_scaling`).

  The v -> o group exists only without grouped-query attention: with it, o's input channels
  (one per query head) do not map one to one onto v's output channels.
  """
  attn = block["self_attn"]
  groups = [ScaleGroup("input_layernorm", ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), "self_attn")]
  if attn["v_proj"]["kernel"].shape[::-1] == attn["o_proj"]["kernel"].shape:
    groups.append(ScaleGroup("self_attn/v_proj", ("self_attn/o_proj",), "self_attn/o_proj"))
  groups.append(ScaleGroup("post_attention_layernorm", ("mlp/gate_proj", "mlp/up_proj"), "mlp"))
  groups.append(ScaleGroup("mlp/up_proj", ("mlp/down_proj",), "mlp/down_proj"))
  return groups


class LlamaBlocks:
  """A `qjax.calib.runner.BlockModel` over a lazily read Llama-family checkpoint.

  Args:
    checkpoint: the float checkpoint; each block is read when the runner asks for it.
    dtype: compute dtype of the blocks.
  """

  sequential_groups = SEQUENTIAL_GROUPS
  awq_no_clip = AWQ_NO_CLIP
  awq_scale_groups = staticmethod(awq_scale_groups)

  def __init__(self, checkpoint: Checkpoint, dtype=jnp.float32):
    self.checkpoint = checkpoint
    self.config = checkpoint.config
    self.num_layers = checkpoint.config.num_hidden_layers
    self.dtype = dtype
    self._layer = DecoderLayer(self.config, dtype)
    self._embed_params = None

  def layer_prefix(self, i: int) -> str:
    return f"model/layers_{i}"

  def layer_params(self, i: int):
    return self.checkpoint.layer_params(i)

  def apply_layer(self, params, h: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
    return self._layer.apply({"params": params}, h, positions)[0]

  def embed(self, ids: jax.Array) -> jax.Array:
    if self._embed_params is None:
      self._embed_params = self.checkpoint.embed_params()
    embed = Embed(self.config.vocab_size, self.config.hidden_size, self.dtype)
    return embed.apply({"params": self._embed_params}, ids)

  def assemble(self, qblocks: list):
    """The full parameter tree: the quantized blocks plus the checkpoint's embedding, norm and head."""
    head = self.checkpoint.head_params()
    model = {"embed_tokens": self.checkpoint.embed_params()}
    for i, block in enumerate(qblocks):
      model[f"layers_{i}"] = block
    model["norm"] = head["norm"]
    params = {"model": model}
    if "lm_head" in head:
      params["lm_head"] = head["lm_head"]
    return params
