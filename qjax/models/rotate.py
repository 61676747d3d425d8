"""Folding a residual-stream rotation into a Llama-family model (QuaRot's R1), so the float model is unchanged.

With an orthogonal ``R`` (d, d), the residual stream becomes ``x R``: the embedding is ``E R``;
every linear reading the stream (q/k/v, gate/up, the head) first absorbs the RMSNorm weight
before it (``RMSNorm(x R) = RMSNorm(x) R`` only for a unit norm weight) and becomes
``Rᵀ W``; every linear writing to it (o, down) becomes ``W R``. A tied output embedding is
untied, since the head now differs from the embedding.
"""

import dataclasses

import numpy as np

from qjax.models.checkpoint import Checkpoint
from qjax.models.config import LlamaConfig

READERS = {"input_layernorm": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
           "post_attention_layernorm": ("mlp/gate_proj", "mlp/up_proj")}  # fmt: skip
WRITERS = ("self_attn/o_proj", "mlp/down_proj")


def _node(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def rotate_layer(layer: dict, r: np.ndarray) -> dict:
  """One decoder layer's params with the rotation folded in (norm weights become 1)."""
  layer = _copy(layer)
  for norm, readers in READERS.items():
    gamma = np.asarray(layer[norm]["scale"], np.float64)
    for m in readers:
      node = _node(layer, m)
      node["kernel"] = _cast(r.T @ (gamma[:, None] * np.asarray(node["kernel"], np.float64)), node["kernel"])
    layer[norm]["scale"] = np.ones_like(layer[norm]["scale"])
  for m in WRITERS:
    node = _node(layer, m)
    node["kernel"] = _cast(np.asarray(node["kernel"], np.float64) @ r, node["kernel"])
    if "bias" in node:
      node["bias"] = _cast(np.asarray(node["bias"], np.float64) @ r, node["bias"])
  return layer


def _cast(x: np.ndarray, like) -> np.ndarray:
  return np.ascontiguousarray(x).astype(np.asarray(like).dtype)


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


class RotatedCheckpoint(Checkpoint):
  """A `Checkpoint` whose pieces come out with the rotation `r` folded in, block by block.

  Args:
    checkpoint: the float checkpoint.
    r: (hidden, hidden) orthogonal matrix (e.g. `qjax.quantizers.rotation.random_rotation`).
  """

  def __init__(self, checkpoint: Checkpoint, r: np.ndarray):
    if r.shape != (checkpoint.config.hidden_size,) * 2:
      raise ValueError(f"`RotatedCheckpoint` expected a ({checkpoint.config.hidden_size},)*2 rotation, got {r.shape}.")
    self.inner, self.r = checkpoint, np.asarray(r, np.float64)
    self.source = f"{checkpoint.source} (rotated)"
    self.config: LlamaConfig = dataclasses.replace(checkpoint.config, tie_word_embeddings=False)

  def embed_params(self):
    e = self.inner.embed_params()["embedding"]
    return {"embedding": _cast(np.asarray(e, np.float64) @ self.r, e)}

  def layer_params(self, i: int):
    return rotate_layer(self.inner.layer_params(i), self.r)

  def head_params(self):
    head = self.inner.head_params()
    gamma = np.asarray(head["norm"]["scale"], np.float64)
    if "lm_head" in head:
      kernel = head["lm_head"]["kernel"]
    else:  # tied: the head is the embedding's transpose, untied here
      kernel = np.asarray(self.inner.embed_params()["embedding"]).T
    rotated = self.r.T @ (gamma[:, None] * np.asarray(kernel, np.float64))
    return {"norm": {"scale": np.ones_like(head["norm"]["scale"])}, "lm_head": {"kernel": _cast(rotated, kernel)}}

  def tokenizer(self):
    return self.inner.tokenizer()
