"""Flax implementation of the Llama family (Llama 1-3, Mistral, Qwen2, Qwen3, SmolLM, Gemma 3, Phi-3) as Hugging Face
defines it.

One model with per-family options rather than a class per family: the families differ in a few switches (biases,
a sliding window, Qwen3's per-head query/key norms, Gemma 3's GeGLU, extra norms and per-layer attention, Phi-3's
LongRoPE and partial rotary dimensions), and one block structure keeps the calibration runner, the scale groups and
every exporter's name map shared. Phi-3's fused projections exist on disk only (`qjax.models.fused`).

A norm's ``scale`` is the multiplier it applies. Gemma's checkpoints store ``scale - 1``; the offset lives in
the Hugging Face readers and writers (`LlamaConfig.norm_offset`), so every transform that folds into a norm (AWQ's
scales, a rotation) sees one kind of norm.

Parameter paths mirror Hugging Face module names, so rules read naturally and
checkpoint conversion is a rename: ``model/layers_3/self_attn/q_proj/kernel`` is
``model.layers.3.self_attn.q_proj.weight`` transposed (Flax kernels are ``[in, out]``).

Any linear kernel (and the embedding table) may be a `QArray`: linears go through
`qjax.kernels.qmatmul`, so the same forward runs dense or quantized, in any `QArray` layout
(the GPU kernels' layout included, `qjax.kernels.to_kernel_layout_params`).

The model is split into the pieces the calibration runner drives one at a time:
`embed`, `DecoderLayer` (one block) and `head`; `LlamaForCausalLM` chains them.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from qjax.core import dequantize, is_qarray
from qjax.kernels import qmatmul
from qjax.models.config import LlamaConfig
from qjax.models.linear import Linear, stored_param
from qjax.models.moe import SparseMoeBlock


class KVCache(NamedTuple):
  """Keys and values of one layer for positions ``[0, max_len)``.

  Attributes:
    k: (batch, max_len, kv_heads, head_dim).
    v: (batch, max_len, kv_heads, head_dim).
  """

  k: Array
  v: Array


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x²) + eps) * scale``, computed in float32 as Hugging Face does."""

  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return jnp.broadcast_to(scale.astype(x.dtype), x.shape) * h.astype(x.dtype)


def rope_frequencies(config: LlamaConfig, *, local: bool = False, long: bool = False) -> np.ndarray:
  """Inverse frequencies ``(rotary_dim / 2,)`` float32, with Llama-3, linear or LongRoPE scaling applied.

  `local`: a sliding-window layer's, when the model gives those their own base (unscaled, as Gemma 3's).
  `long`: LongRoPE's long factors (for a pass beyond the original length) rather than its short ones.
  """
  dim = config.rotary_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  if local and config.rope_local_theta is not None:
    return (1.0 / (config.rope_local_theta**exponents)).astype(np.float32)
  inv_freq = 1.0 / (config.rope_theta**exponents)
  if config.rope_freq_factors is not None:
    return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
  scaling = config.rope_scaling
  if scaling.rope_type == "longrope":
    factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
    return (1.0 / (factors * config.rope_theta**exponents)).astype(np.float32)
  if scaling.rope_type == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  if scaling.rope_type == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq.astype(np.float32)


def rope_tables(config: LlamaConfig, positions: Int[Array, "b t"], *, local: bool = False) -> tuple[Array, Array]:
  """cos and sin tables ``(batch, seq, rotary_dim)`` float32 for rotate-half RoPE.

  LongRoPE switches to its long factors for the whole pass when any position reaches beyond the original length,
  as transformers does (so a KV-cached decode switches at that step, and earlier keys keep the short ones).
  """
  local = local and config.rope_local_theta is not None  # a sliding layer with the model's one RoPE otherwise
  inv_freq = jnp.asarray(rope_frequencies(config, local=local))
  scaling = config.rope_scaling
  if scaling.rope_type == "longrope" and not local:
    long = jnp.max(positions) + 1 > scaling.original_max_position_embeddings
    inv_freq = jnp.where(long, jnp.asarray(rope_frequencies(config, long=True)), inv_freq)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  if scaling.rope_type == "longrope" and scaling.attention_factor != 1.0:
    return jnp.cos(emb) * scaling.attention_factor, jnp.sin(emb) * scaling.attention_factor
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "b t h d"], cos: Array, sin: Array) -> Float[Array, "b t h d"]:
  """Rotate-half RoPE on the first ``cos.shape[-1]`` dimensions of each head; the rest pass unchanged."""
  dim = cos.shape[-1]
  rot, rest = x[..., :dim], x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = (rot.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]).astype(x.dtype)
  return out if dim == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)


def attention_mask(q_pos: Int[Array, "b t"], k_pos: Int[Array, "b s"], window: int | None) -> Array:
  """(batch, 1, t, s) bool: causal, and within `window` tokens (``q - k < window``) unless it is None."""
  allowed = k_pos[:, None, :] <= q_pos[:, :, None]
  if window is not None:
    allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
  return allowed[:, None]


class Attention(nn.Module):
  """Grouped-query attention with rotate-half RoPE and an optional KV cache.

  Attributes:
    sliding: this layer attends within ``config.sliding_window`` tokens (with the local RoPE base, if any).
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  sliding: bool = False

  @nn.compact
  def __call__(self, x, positions, cache: KVCache | None = None):
    cfg = self.config
    b, t, _ = x.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = Linear(heads * hd, cfg.attention_bias, self.dtype, name="q_proj")(x).reshape(b, t, heads, hd)
    k = Linear(kv_heads * hd, cfg.attention_bias, self.dtype, name="k_proj")(x).reshape(b, t, kv_heads, hd)
    v = Linear(kv_heads * hd, cfg.attention_bias, self.dtype, name="v_proj")(x).reshape(b, t, kv_heads, hd)
    if cfg.qk_norm:  # Qwen3: each head's queries and keys normalised (one weight over head_dim) before RoPE
      q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
    cos, sin = rope_tables(cfg, positions, local=self.sliding)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
      k_all, v_all, k_pos = k, v, positions
    else:
      # Tokens are written at their positions; every sequence of the batch is at the same step.
      start = positions[0, 0]
      k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
      cache = KVCache(k_all, v_all)
      k_pos = jnp.broadcast_to(jnp.arange(k_all.shape[1]), (b, k_all.shape[1]))
    groups = heads // kv_heads
    qg = q.reshape(b, t, kv_heads, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_all.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * cfg.attention_scale
    window = cfg.sliding_window if self.sliding else None
    mask = attention_mask(positions, k_pos, window)[:, :, None]  # (b, 1, 1, t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_all.astype(q.dtype), preferred_element_type=jnp.float32)
    out = out.astype(x.dtype).reshape(b, t, heads * hd)
    return Linear(cfg.hidden_size, False, self.dtype, name="o_proj")(out), cache


class MLP(nn.Module):
  """SwiGLU ``down(silu(gate(x)) * up(x))``, or GeGLU with tanh GELU for Gemma."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = Linear(cfg.intermediate_size, cfg.mlp_bias, self.dtype, name="gate_proj")(x)
    up = Linear(cfg.intermediate_size, cfg.mlp_bias, self.dtype, name="up_proj")(x)
    act = jax.nn.gelu(gate, approximate=True) if cfg.gemma else nn.silu(gate)
    return Linear(cfg.hidden_size, cfg.mlp_bias, self.dtype, name="down_proj")(act * up)


class DecoderLayer(nn.Module):
  """One pre-norm decoder block: attention and MLP, each with a residual connection (Gemma: and a norm on each
  output before it joins the residual stream).

  Attributes:
    sliding: the layer's attention is sliding-window (`LlamaConfig.sliding`).
    moe: the layer routes tokens to experts (`LlamaConfig.moe`) in place of its MLP.
    all_experts: a sparse layer computes every expert on every token (calibration; `SparseMoeBlock`).
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  sliding: bool = False
  moe: bool = False
  all_experts: bool = False

  @nn.compact
  def __call__(
    self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], cache: KVCache | None = None
  ) -> tuple[Float[Array, "b t d"], KVCache | None]:
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, name=name)
    attention = Attention(cfg, self.dtype, self.sliding, name="self_attn")
    if self.moe:
      mlp = SparseMoeBlock(cfg, self.dtype, self.all_experts, name="mlp")
    else:
      mlp = MLP(cfg, self.dtype, name="mlp")
    h, cache = attention(norm("input_layernorm")(x), positions, cache)
    if cfg.gemma:  # each output normalised before it joins the stream; the MLP reads pre_feedforward_layernorm
      x = x + norm("post_attention_layernorm")(h)
      return x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x))), cache
    x = x + h
    return x + mlp(norm("post_attention_layernorm")(x)), cache


class Embed(nn.Module):
  """Token embedding ``(vocab, hidden)``; may be a `QArray` quantized along ``hidden``.

  Attributes:
    scale: the factor looked-up rows are multiplied by (Gemma: sqrt(hidden)); not applied by `attend`.
  """

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  scale: float = 1.0

  def setup(self):
    shape = (self.num_embeddings, self.features)
    self.embedding = stored_param(self, "embedding", shape, nn.initializers.normal(0.02), self.dtype)

  def __call__(self, ids: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    table = self.embedding
    if is_qarray(table):
      # Dequantized whole, then gathered: small next to the (vocab x hidden) head matmul.
      rows = jnp.take(dequantize(table), ids, axis=0).astype(self.dtype)
    else:
      rows = jnp.take(table, ids, axis=0).astype(self.dtype)
    return rows if self.scale == 1.0 else rows * jnp.asarray(self.scale, self.dtype)

  def attend(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
    """Tied output embedding: ``h @ embedding.T``."""
    if is_qarray(self.embedding):
      return qmatmul(h, self.embedding)  # quantized along hidden, the contraction axis
    return jnp.dot(h, self.embedding.astype(h.dtype).T, preferred_element_type=jnp.float32)


class LlamaModel(nn.Module):
  """Embedding, decoder layers and final norm (``LlamaModel`` in Hugging Face)."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, cfg.embed_scale)
    self.layers = [DecoderLayer(cfg, self.dtype, cfg.sliding(i), cfg.moe(i)) for i in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

  def __call__(self, ids, positions, caches=None):
    x = self.embed(ids)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, positions, None if caches is None else caches[i])
      new_caches.append(cache)
    return self.norm(x), (None if caches is None else new_caches)

  def embed(self, ids):
    return self.embed_tokens(ids)


class LlamaForCausalLM(nn.Module):
  """Logits of a Llama-family causal LM.

  Attributes:
    config: the model hyperparameters.
    dtype: compute and parameter dtype (float32 or bfloat16).

  Examples:
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).shape
    (1, 5, 64)
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.model = LlamaModel(self.config, self.dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = Linear(self.config.vocab_size, False, self.dtype)

  def __call__(
    self, ids: Int[Array, "b t"], positions: Int[Array, "b t"] | None = None, caches: list[KVCache] | None = None
  ):
    """Logits (batch, seq, vocab) float32; with `caches`, returns ``(logits, caches)``."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h, new_caches = self.model(ids, positions, caches)
    logits = self.logits(h)
    return logits if caches is None else (logits, new_caches)

  def logits(self, h):
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)


def init_caches(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
  """Empty KV caches for every layer."""
  shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
  return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]


def logits_fn(config: LlamaConfig, params, *, dtype=jnp.float32):
  """A jitted ``ids (b, t) -> logits (b, t, vocab)`` with `params` passed as an argument (not folded into the
  program as constants), dense or quantized."""
  net = LlamaForCausalLM(config, dtype)
  apply = jax.jit(lambda p, ids: net.apply({"params": p}, ids))
  return lambda ids: apply(params, ids)
