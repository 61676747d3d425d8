"""A forecast of a quantize run's peak memory and time, printed before it starts (from the model's sizes)."""

import dataclasses
import functools
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


class Work(NamedTuple):
  """What a run computes, by kind: each kind runs at its own rate on a device (`qjax.cli.plan.Device`).

  FLOPs count a multiply-add as two. Per-weight work (RTN, llama.cpp's encoders) is in float32 FLOP-equivalents: the
  time it took on this machine times its measured matmul speed (`RTN_FLOPS_PER_WEIGHT`, `ENCODE_FLOPS_PER_WEIGHT`).
  """

  forward_flops: float  # the blocks run over the calibration tokens (float32 at default matmul precision)
  search_flops: float  # AWQ's grid of block passes (as the forward)
  statistics_flops: float  # Hessians x^T x of every linear's inputs (float32, full precision)
  sweep_flops: float  # GPTQ's updates (float32, full precision)
  per_weight_flops: float  # rounding and encoding each weight (narrow vector work)
  columns: int  # GPTQ's column steps, sequential in the input channels (each a few small kernels)
  eval_flops: float  # evaluating before and after
  host_bytes: float  # host work: reading the checkpoint, the error report, packing the export (memory traffic)
  factor_flops: float = 0.0  # GPTQ's Hessian inverses, 4/3 in³ each (float32 Cholesky and triangular solve)

  @property
  def quantize_flops(self) -> float:
    """In matmul FLOP-equivalents of this machine (the factorisations at `FACTORIZATION_COST`)."""
    return (self.forward_flops + self.search_flops + self.statistics_flops + self.sweep_flops + self.per_weight_flops
            + FACTORIZATION_COST * self.factor_flops)  # fmt: skip


RTN_FLOPS_PER_WEIGHT = 720.0
"""Round-to-nearest of a weight as a run does it (the transform: device transfers, group scales, rounding, codes), in
float32 matmul FLOPs of this machine's speed. Measured on one Llama-3.1-8B-shaped block (218M weights, 4-bit groups
of 128): 7.0 ns a weight at 103 GFLOP/s (10.5 ns in a second run; `rtn_quantize` alone, jitted, 0.65 ns)."""

ENCODE_FLOPS_PER_WEIGHT = 1.1e4
"""llama.cpp's encoder of a weight into its recipe's block types as a run does it (`qjax.core.ggml_kquants.encode`
through the transform: the k-quants search scales per sub-block), in float32 matmul FLOPs of this machine's speed.
Measured on one Llama-3.1-8B-shaped block into Q4_K_M's types: 106 ns a weight at 103 GFLOP/s (the Q4_K encoder
alone on 1024 rows of 4096: 34 ns at 194 GFLOP/s)."""

HOST_READ_BYTES_PER_PARAM = 215.0
"""Reading a checkpoint into float32 kernels on the host (dtype conversion and transpose into (in, out) in one copy,
fresh pages), per parameter, in bytes of memory traffic at the host's read bandwidth (numpy's sum of a 512 MB
array). Measured: one Llama-3.1-8B-shaped block from bfloat16 safetensors, 9.8 ns a parameter at 21.9 GB/s."""

REPORT_BYTES_PER_WEIGHT = 347.0
"""The run's error report (`qjax.eval.TensorLog`): each rounded weight dequantized to the host and compared, per
weight, in bytes at the host's read bandwidth. Measured on the same block's RTN QArrays: 15.8 ns at 21.9 GB/s."""

PACK_BYTES_PER_WEIGHT = 68.0
"""Packing a rounded weight for an export (GPTQ's 32-bit words, scales, zero points), per weight, in bytes at the
host's read bandwidth. Measured on the same block: 3.1 ns at 21.9 GB/s."""

FACTORIZATION_COST = 2.7
"""GPTQ's Hessian inverse (a Cholesky factorisation and a triangular solve, 4/3 in³ FLOPs) in matmul FLOP-equivalents
per FLOP on this machine: XLA:CPU runs them at 0.37 of its matmul speed (`qjax plan` assumes full float32 speed on a
GPU or TPU). Measured: `hessian_inverse` of an 8192-wide Hessian, 4.1 s
(180 GFLOP/s) against 479 GFLOP/s of float32 matmul in the same process. It is most of GPTQ's time on a wide MLP
(the 14336-wide down_proj of Llama-3.1-8B: 3.9e12 FLOPs a layer)."""

COLUMN_SECONDS = 25e-6
"""One step of GPTQ's column sweep on this machine (a few small kernels; the sweep is sequential in the inputs)."""


def _linear_inputs(config: LlamaConfig, layer: _Layer) -> list[tuple[int, int, int]]:
  """(input width, output width, count) of each decoder linear of a layer (experts counted)."""
  d = config.hidden_size
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  mlp = [(d, w, 2) for w in layer.mlp_widths] + [(w, d, 1) for w in layer.mlp_widths]
  return [(d, q_out, 1), (d, kv_out, 2), (q_out, d, 1), *mlp]


def reads_hessians(recipe: Recipe) -> bool:
  """Whether a stage of `recipe` reads Hessians (runs GPTQ's sweep)."""
  return any("hessian" in stage.stats for stage in flatten_stages(recipe.stages))


def work(
  config: LlamaConfig,
  recipe: Recipe,
  *,
  calibration_tokens: int,
  seqlen: int,
  eval_windows: int = 0,
  gguf_type: str | None = None,
  ggml_sweep: bool = False,
  allocation: bool = False,
  allocation_sweeps: int = 0,
) -> Work:
  """What running `recipe` on a model with `config` computes (a count from the model's sizes, not a measurement).

  Stages reading a Hessian cost its accumulation and GPTQ's sweep: its updates, 2 in² out per linear, and its
  Hessian's inverse, 4/3 in³ (a Cholesky factorisation and a triangular solve against the identity). Stages that
  run the block (AWQ) cost a grid of block passes. A sparse layer stores every expert but runs each token through
  its k; every expert's Hessians and sweep count. Linears no stage
  calibrates are rounded to nearest, or encoded into `gguf_type`'s block types. The host reads every parameter, and
  reports and packs every rounded weight. An `allocation` (--target_bpw) adds
  a forward and backward pass over the calibration tokens and every candidate type's encoding of every linear;
  `allocation_sweeps`, a calibration pass and that many GPTQ sweeps of every linear.
  """
  stages = flatten_stages(recipe.stages)
  sweeps = reads_hessians(recipe)
  block_searches = sum(s.whole_block for s in stages)
  d, v = config.hidden_size, config.vocab_size
  q_out = config.num_attention_heads * config.head_dim
  layers = [_layer(config, i) for i in range(config.num_hidden_layers)]
  embeddings = v * d * (1 if config.tie_word_embeddings else 2)
  linear_weights = estimate_sizes(config).linear_params
  tokens = calibration_tokens
  attention = 2 * 2 * tokens * seqlen * q_out  # scores and their weighted sum, the whole window (masked, not skipped)
  forward = search = statistics = sweep = factor = 0.0
  columns = 0
  for layer in layers:
    mlp_tokens = tokens * layer.routed_tokens
    hessian_flops = 2 * tokens * (d * d + q_out * q_out) + sum(
      2 * mlp_tokens * (d * d + w * w) for w in layer.mlp_widths
    )
    linears = _linear_inputs(config, layer)
    sweep_flops = sum(n * 2 * i * i * o for i, o, n in linears)
    factor_flops = sum(n * 4 * i**3 / 3 for i, _, n in linears)
    forward += (2 * tokens * layer.active_params + attention) * 2.2
    search += AWQ_BLOCK_PASSES * (2 * tokens * layer.active_params + attention) * block_searches
    statistics += hessian_flops * sweeps
    sweep += sweep_flops * sweeps
    factor += factor_flops * sweeps
    if allocation_sweeps:  # a float calibration pass; each width's sweep and its error (about a sweep's flops)
      forward += 2 * tokens * layer.active_params + attention
      statistics += hessian_flops
      sweep += 2 * allocation_sweeps * sweep_flops
      factor += 2 * allocation_sweeps * factor_flops
    # Beyond the flops: GPTQ's column sweep, sequential in the input channels.
    columns += sum(n * i for i, _, n in linears) * (sweeps + allocation_sweeps)
  per_weight = 0.0
  if ggml_sweep:
    per_weight += GGML_SWEEP_FLOPS_PER_WEIGHT * linear_weights
  elif gguf_type:
    per_weight += ENCODE_FLOPS_PER_WEIGHT * linear_weights
  elif not sweeps:
    per_weight += RTN_FLOPS_PER_WEIGHT * linear_weights
  if allocation:
    forward += 3 * 2 * tokens * (sum(layer.active_params for layer in layers) + embeddings)  # the Fisher pass
    per_weight += ALLOCATION_FLOPS_PER_WEIGHT * linear_weights
  eval_tokens = eval_windows * seqlen
  eval_attention = 2 * 2 * eval_tokens * seqlen * q_out * len(layers)
  eval_flops = 2 * (2 * eval_tokens * (sum(layer.active_params for layer in layers) + embeddings) + eval_attention)
  sizes = estimate_sizes(config)
  host = HOST_READ_BYTES_PER_PARAM * (sizes.linear_params + sizes.other_params)
  host += (REPORT_BYTES_PER_WEIGHT + PACK_BYTES_PER_WEIGHT) * linear_weights
  return Work(forward, search, statistics, sweep, per_weight, columns, eval_flops, host, factor)


class Memory(NamedTuple):
  """Peak memory of a run, in bytes, by part (float32 throughout).

  A run holds one part of the model at a time (`qjax.calib.quantize_parts`, `qjax.formats.shards`): the embedding
  first, then each block with its statistics and activations, then the head; the peak is the larger phase.
  """

  block: float  # the decoder block's weights, and their rounded copy
  statistics: float  # the statistics of a block's linears, and the work buffers of GPTQ's sweep
  activations: float  # the calibration windows' hidden states into and out of the block, and each linear's outputs
  batch: float  # one batch's transient activations (the MLP's and the attention scores)
  model: float  # the embedding or the head while it is read, rounded and written (before and after the blocks)
  runtime: float = 0.0  # the process itself (Python, JAX), where the device is this machine's memory

  @property
  def blocks(self) -> float:
    """The block phase: a block, its statistics, the activations and a batch."""
    return self.block + self.statistics + self.activations + self.batch

  @property
  def total(self) -> float:
    return self.runtime + max(self.model, self.blocks)


GPTQ_INVERSE_BUFFERS = 1.25
"""(in, in) float32 buffers GPTQ holds at its peak beyond the block's statistics, for the widest linear input: its
largest program (the inverse of the factor) holds 2.25 such buffers, one of them written over the Hessian the
runner hands over (counted in the statistics). From XLA's accounting of each program (scripts/bench_gptq_memory.py,
experiments/gptq_memory.md), not fitted to a run."""


def memory(
  config: LlamaConfig, *, calibration_tokens: int, seqlen: int, batch_size: int, sweeps: bool = True
) -> Memory:
  """`Memory` of calibrating a model with `config` on `calibration_tokens` tokens in batches of `batch_size` windows
  (`sweeps`: with GPTQ's sweep)."""
  d, v = config.hidden_size, config.vocab_size
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  layers = [_layer(config, i) for i in range(config.num_hidden_layers)]
  block = max(layer.params for layer in layers)
  f = max(max(layer.mlp_widths) for layer in layers)
  tokens = calibration_tokens
  outputs = q_out + 2 * kv_out + d + 2 * f + d  # every linear's output, cached within a block
  widest = max((sum(layer.mlp_widths) * layer.routed_tokens for layer in layers), default=f)
  widest_input = max(d, q_out, f)
  return Memory(
    block=4.0 * 2 * block,
    statistics=4.0 * max(d * d + q_out * q_out + sum(d * d + w * w for w in layer.mlp_widths) for layer in layers)
    + 4.0 * GPTQ_INVERSE_BUFFERS * widest_input**2 * sweeps,
    activations=4.0 * (tokens * d * 2 + min(tokens * (outputs + 2 * widest), 4 << 30)),
    batch=4.0 * batch_size * seqlen * (4 * f + config.num_attention_heads * seqlen),
    model=4.0 * v * d,
  )


@functools.cache
def measure_memory_gb_per_s() -> float:
  """This machine's memory read bandwidth: numpy's sum of a 512 MB float32 array (one core), best of three;
  measured once a process."""
  import numpy as np

  a = np.ones(1 << 27, np.float32)
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    a.sum()
    best = min(best, time.perf_counter() - start)
  return a.nbytes / best / 1e9


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
  gguf_type: str | None = None,
  memory_gb_per_s: float | None = None,
) -> Estimate:
  """Peak memory and time of running `recipe` on a model with `config` on this machine (a forecast, not a
  measurement): `work`'s FLOPs at `gflops_per_second` and its host work at `memory_gb_per_s` (default: measured
  now), GPTQ's column steps at `COLUMN_SECONDS` each, and `memory`'s parts on one device. `qjax plan` splits the
  same work over the stages and the rates of another device.
  """
  w = work(config, recipe, calibration_tokens=calibration_tokens, seqlen=seqlen, eval_windows=eval_windows,
           gguf_type=gguf_type, ggml_sweep=ggml_sweep, allocation=allocation,
           allocation_sweeps=allocation_sweeps)  # fmt: skip
  d, v = config.hidden_size, config.vocab_size
  model = sum(_layer(config, i).params for i in range(config.num_hidden_layers)) + v * d * (
    2 - config.tie_word_embeddings
  )
  calibration = memory(
    config, calibration_tokens=calibration_tokens, seqlen=seqlen, batch_size=batch_size, sweeps=reads_hessians(recipe)
  ).total
  evaluation = 4 * (2 * model + 3 * seqlen * v) if eval_windows else 0
  gflops = gflops_per_second or measure_gflops()
  host = w.host_bytes / (memory_gb_per_s or measure_memory_gb_per_s()) / 1e9
  quantize_seconds = (
    w.quantize_flops / gflops / 1e9 + host + COLUMN_SECONDS * w.columns + (15.0 if calibration_tokens else 5.0)
  )
  eval_seconds = w.eval_flops / gflops / 1e9 + 5.0 if eval_windows else 0.0
  return Estimate(float(max(calibration, evaluation)), quantize_seconds, eval_seconds, gflops)
