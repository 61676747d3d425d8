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
      f"estimate: peak memory ~{self.peak_bytes / 2**30:.1f} GiB, quantize ~{_minutes(self.quantize_seconds)}, "
      f"evaluate ~{_minutes(self.eval_seconds)} (at {self.gflops_per_second:.0f} GFLOP/s measured here)"
    )


def _minutes(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Sizes(NamedTuple):
  """Parameter counts of a model: its decoder linears (what recipes quantize) and everything else."""

  linear_params: int
  other_params: int


def estimate_sizes(config: LlamaConfig) -> Sizes:
  d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  block = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * f
  return Sizes(n * block, v * d * (1 if config.tie_word_embeddings else 2) + (2 * n + 1) * d)


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
) -> Estimate:
  """Peak memory and time of running `recipe` on a model with `config` (a forecast, not a measurement).

  Stages reading a Hessian cost GPTQ's sweep; stages that run the block (AWQ) cost a grid of block passes.
  """
  stages = flatten_stages(recipe.stages)
  sweeps = any("hessian" in s.stats for s in stages)
  block_searches = sum(s.whole_block for s in stages)
  d, f, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  block = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * f
  model = n_layers * block + v * d * (1 if config.tie_word_embeddings else 2)
  tokens = calibration_tokens
  outputs = q_out + 2 * kv_out + d + 2 * f + d  # every linear's output, cached within a block
  calibration = 4 * (tokens * d * 2 + min(tokens * outputs, 4 << 30) + 2 * block + 3 * d * d + f * f + v * d)
  calibration += 4 * batch_size * seqlen * (4 * f + config.num_attention_heads * seqlen)
  evaluation = 4 * (2 * model + 3 * seqlen * v) if eval_windows else 0
  gflops = gflops_per_second or measure_gflops()
  hessian_flops = 2 * tokens * (3 * d * d + f * f)
  gptq_flops = 2 * (d * d * (q_out + 2 * kv_out + 2 * f) + q_out * q_out * d + f * f * d) if sweeps else 0
  awq_flops = 20 * 2 * tokens * block * block_searches
  quantize_flops = n_layers * (2 * tokens * block * 2.2 + hessian_flops + gptq_flops + awq_flops)
  eval_flops = 2 * eval_windows * seqlen * 2 * model
  # Beyond the flops: compilation, and GPTQ's column sweep, sequential in the input channels.
  columns = n_layers * (5 * d + q_out + f) if sweeps else 0
  quantize_seconds = quantize_flops / gflops / 1e9 + 25e-6 * columns + (15.0 if tokens else 5.0)
  eval_seconds = eval_flops / gflops / 1e9 + 5.0 if eval_windows else 0.0
  return Estimate(float(max(calibration, evaluation)), quantize_seconds, eval_seconds, gflops)
