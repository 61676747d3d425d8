"""Greedy or sampled generation with a KV cache: one prefill, then a `lax.scan` of decode steps."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from qjax.models.llama import LlamaForCausalLM, init_caches


def _pick(logits, key, temperature: float, top_k: int | None):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate(
  model: LlamaForCausalLM,
  params,
  prompt: Int[Array, "b t"],
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  key: Array | None = None,
) -> Int[Array, "b n"]:
  """Continues equal-length prompts by `max_new_tokens` tokens.

  Args:
    model: the Flax model (static).
    params: its parameters; linear kernels may be `QArray`s.
    prompt: (batch, t) int32 prompt ids, all of the same length.
    max_new_tokens: tokens to generate.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among the `top_k` most likely tokens only.
    key: PRNG key for sampling.

  Returns:
    (batch, max_new_tokens) int32 generated ids (the prompt is not repeated).
  """
  b, t = prompt.shape
  key = jax.random.key(0) if key is None else key
  caches = init_caches(model.config, b, t + max_new_tokens, model.dtype)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  logits, caches = model.apply({"params": params}, prompt, positions, caches)
  key, sub = jax.random.split(key)
  first = _pick(logits[:, -1], sub, temperature, top_k)

  def step(carry, i):
    token, caches, key = carry
    key, sub = jax.random.split(key)
    pos = jnp.full((b, 1), t + i, jnp.int32)
    logits, caches = model.apply({"params": params}, token[:, None], pos, caches)
    nxt = _pick(logits[:, -1], sub, temperature, top_k)
    return (nxt, caches, key), nxt

  _, rest = jax.lax.scan(step, (first, caches, key), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)
