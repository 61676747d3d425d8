"""Time a model's forward on this device: prefill and KV-cache decode tokens per second.

Runs any model `qjax eval` accepts (float or quantized) through the same Flax forward; quantized
linears go through `qjax.kernels.qmatmul`, whose backend --kernel can force.

Example:
  qjax bench --model=runs/gptq-w4g128 --batch=1 --seqlen=512 --new_tokens=32
  qjax bench --model=default --kernel=xla --json=bench.json
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qjax.core import is_qarray
from qjax.core.tree import leaves_with_paths
from qjax.formats.loading import load_model
from qjax.kernels import BACKENDS, qmatmul_mode
from qjax.models import LlamaForCausalLM, generate

_MODEL = flags.DEFINE_string("model", "default", "Model to time (same forms as `qjax eval --model`).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per call. Example: --batch=4.")
_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Prompt tokens per sequence (prefill). Example: --seqlen=2048.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per sequence (decode). Example: --new_tokens=128.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement; the median is reported.")
_KERNEL = flags.DEFINE_enum("kernel", "auto", list(BACKENDS), "qmatmul backend for quantized linears.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  for name, value in (("batch", _BATCH.value), ("seqlen", _SEQLEN.value), ("new_tokens", _NEW.value)):
    if value < 1:
      raise ValueError(f"--{name} must be at least 1, got {value}")
  model = load_model(_MODEL.value)
  net = LlamaForCausalLM(model.config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (_BATCH.value, _SEQLEN.value)))
  with qmatmul_mode(_KERNEL.value):
    forward = jax.jit(lambda p, x: net.apply({"params": p}, x))
    prefill = median_seconds(lambda: forward(model.params, ids), _REPEATS.value)
    decode = median_seconds(lambda: generate(net, model.params, ids[:, :8], max_new_tokens=_NEW.value), _REPEATS.value)
  weight_bytes = sum(
    leaf.nbytes if is_qarray(leaf) else np.asarray(leaf).nbytes for _, leaf in leaves_with_paths(model.params)
  )
  row = {
    "model": _MODEL.value,
    "device": jax.devices()[0].device_kind,
    "kernel": _KERNEL.value,
    "batch": _BATCH.value,
    "prefill_tokens_per_s": _BATCH.value * _SEQLEN.value / prefill,
    "decode_tokens_per_s": _BATCH.value * _NEW.value / decode,
    "weight_mb": weight_bytes / 2**20,
  }
  print(f"model        {row['model']}  ({row['weight_mb']:.1f} MB of weights, {row['device']}, kernel {row['kernel']})")
  print(f"prefill      {row['prefill_tokens_per_s']:9.0f} tokens/s  (batch {_BATCH.value} x {_SEQLEN.value})")
  print(f"decode       {row['decode_tokens_per_s']:9.1f} tokens/s  (batch {_BATCH.value}, {_NEW.value} new tokens)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(row, f, indent=2)
