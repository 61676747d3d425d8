"""A forecast of a quantize run's peak memory and time, printed before it starts (from the model's sizes)."""

import dataclasses
import time
from typing import NamedTuple

from qjax.models.config import LlamaConfig
from qjax.transforms import flatten_stages
from qjax.transforms.recipes import Recipe


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A rough forecast of a run's cost."""

  peak_bytes: float
  quantize_seconds: float
  eval_seconds: float
  gflops_per_second: float

  def __str__(self) -> str:
    return (
      f"estimate: peak memory ~{self.peak_bytes / 2**30:.1f} GiB, quantize ~{minutes(self.quantize_seconds)}, "
      f"evaluate ~{minutes(self.eval_seconds)} (at {self.gflops_per_second:.0f} GFLOP/s measured here)"
    )


def minutes(seconds: float) -> str:
  """``"74 s"`` below two minutes, ``"6.8 min"`` above."""
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Sizes(NamedTuple):
  """Parameter counts of a model: its decoder linears (what recipes quantize) and everything else."""

  linear_params: int
  other_params: int


class _Layer(NamedTuple):
  """What one decoder layer costs: weights stored, weights a token runs through, and the MLP's matrices."""

  params: int
  active_params: int
  mlp_widths: tuple[int, ...]  # the intermediate width of each MLP matrix set (every expert of a sparse layer)
  routed_tokens: float  # calibration tokens per MLP matrix set, per calibration token


def _layer(config: LlamaConfig, i: int) -> _Layer:
  d = config.hidden_size
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  attention = d * (q_out + 2 * kv_out) + q_out * d
  if not config.moe(i):
    return _Layer(attention + 3 * d * config.intermediate_size, attention + 3 * d * config.intermediate_size,
                  (config.intermediate_size,), 1.0)  # fmt: skip
  e, k, f = config.num_experts, config.num_experts_per_tok, config.expert_size
  return _Layer(attention + e * 3 * d * f + d * e, attention + k * 3 * d * f + d * e, (f,) * e, k / e)


GGML_SWEEP_FLOPS_PER_WEIGHT = 1.8e5
"""GPTQ into llama.cpp's block types, per weight, beyond GPTQ's own sweep: in float32 matmul FLOPs of this
machine's speed. Measured: `qjax compare --recipes=gptq,gptq@Q4_K_M` on the default model, 131 s more for its 106M
linear weights at 150 GFLOP/s (the per-block scale searches run on narrow vectors, far below matmul speed)."""


AWQ_BLOCK_PASSES = 35
"""AWQ's search, in forward passes of the block over the calibration tokens: 20 grid points each run the block part
a scale group feeds and fake-quantize its kernels, and the clip search follows. Measured: `qjax compare` on the
default model, `awq` took 40 passes' matmul flops at one 2-core machine's speed and 30 at another's (the fake
quantization and the clip search's narrow per-group products run far below matmul speed, and vary more)."""


ALLOCATION_FLOPS_PER_WEIGHT = 1.3e5
"""--target_bpw's rounding errors, per linear weight: every candidate llama.cpp type's encoder run on it and its
Fisher-weighted error summed, in float32 matmul FLOPs of this machine's speed. Measured: `qjax compare
--recipes=Q4_K_M,Q4_K_M+alloc` on the default model, the allocation 66 s for 106M weights at 284 GFLOP/s, of which
the Fisher pass (three forward passes' flops) ~12 s; six types tile most of its rows."""


def estimate_sizes(config: LlamaConfig) -> Sizes:
  d, v, n = config.hidden_size, config.vocab_size, config.num_hidden_layers
  routers = sum(d * config.num_experts for i in range(n) if config.moe(i))
  linears = sum(_layer(config, i).params for i in range(n)) - routers
  return Sizes(linears, v * d * (1 if config.tie_word_embeddings else 2) + (2 * n + 1) * d + routers)


def measure_gflops() -> float:
  """Float32 matmul throughput of the default device, from a short timed run."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def estimate(
  config: LlamaConfig,
  recipe: Recipe,
  *,
  calibration_tokens: int,
  seqlen: int,
  batch_size: int,
  eval_windows: int,
  gflops_per_second: float | None = None,
  ggml_sweep: bool = False,
  allocation: bool = False,
  allocation_sweeps: int = 0,
) -> Estimate:
  """Peak memory and time of running `recipe` on a model with `config` (a forecast, not a measurement).

  Stages reading a Hessian cost GPTQ's sweep; stages that run the block (AWQ) cost a grid of block passes. A sparse
  layer stores every expert but runs each token through its k; every expert's Hessians and sweep count. An
  `allocation` (--target_bpw) adds a forward and backward pass over the calibration tokens and every candidate
  type's encoding of every linear; `allocation_sweeps`, a calibration pass and that many GPTQ sweeps of every
  linear (an allocation for GPTQ measures each candidate width's rounding).
  """
  stages = flatten_stages(recipe.stages)
  sweeps = any("hessian" in s.stats for s in stages)
  block_searches = sum(s.whole_block for s in stages)
  d, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  layers = [_layer(config, i) for i in range(n_layers)]
  block = max(layer.params for layer in layers)
  f = max(max(layer.mlp_widths) for layer in layers)
  embeddings = v * d * (1 if config.tie_word_embeddings else 2)
  model = sum(layer.params for layer in layers) + embeddings
  tokens = calibration_tokens
  outputs = q_out + 2 * kv_out + d + 2 * f + d  # every linear's output, cached within a block
  widest = max((sum(layer.mlp_widths) * layer.routed_tokens for layer in layers), default=f)
  calibration = 4 * (tokens * d * 2 + min(tokens * (outputs + 2 * widest), 4 << 30) + 2 * block + 3 * d * d
                     + sum(w * w for w in layers[0].mlp_widths) + v * d)  # fmt: skip
  calibration += 4 * batch_size * seqlen * (4 * f + config.num_attention_heads * seqlen)
  evaluation = 4 * (2 * model + 3 * seqlen * v) if eval_windows else 0
  gflops = gflops_per_second or measure_gflops()
  quantize_flops = 0.0
  columns = 0
  for layer in layers:
    mlp_tokens = tokens * layer.routed_tokens
    hessian_flops = 2 * tokens * 2 * d * d + sum(2 * mlp_tokens * (d * d + w * w) for w in layer.mlp_widths)
    sweep_flops = 2 * (d * d * (q_out + 2 * kv_out) + q_out * q_out * d)
    sweep_flops += sum(2 * (2 * d * d * w + w * w * d) for w in layer.mlp_widths)
    awq_flops = AWQ_BLOCK_PASSES * 2 * tokens * layer.active_params * block_searches
    quantize_flops += 2 * tokens * layer.active_params * 2.2 + hessian_flops + sweep_flops * sweeps + awq_flops
    if allocation_sweeps:  # a float calibration pass; each width's sweep and its error (about a sweep's flops)
      quantize_flops += 2 * tokens * layer.active_params + hessian_flops + 2 * allocation_sweeps * sweep_flops
    # Beyond the flops: GPTQ's column sweep, sequential in the input channels.
    columns += (3 * d + q_out + sum(2 * d + w for w in layer.mlp_widths)) * (sweeps + allocation_sweeps)
  eval_flops = 2 * eval_windows * seqlen * 2 * (sum(layer.active_params for layer in layers) + embeddings)
  if ggml_sweep:
    quantize_flops += GGML_SWEEP_FLOPS_PER_WEIGHT * sum(layer.params for layer in layers)
  if allocation:
    fisher_flops = 3 * 2 * tokens * (sum(layer.active_params for layer in layers) + embeddings)
    quantize_flops += fisher_flops + ALLOCATION_FLOPS_PER_WEIGHT * sum(layer.params for layer in layers)
  quantize_seconds = quantize_flops / gflops / 1e9 + 25e-6 * columns + (15.0 if tokens else 5.0)
  eval_seconds = eval_flops / gflops / 1e9 + 5.0 if eval_windows else 0.0
  return Estimate(float(max(calibration, evaluation)), quantize_seconds, eval_seconds, gflops)
