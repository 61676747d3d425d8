"""Forward throughput on this CPU: qjax's jitted Flax model vs transformers' PyTorch model, same weights and tokens.

.venv/bin/python scripts/bench_forward.py --batch=1 --seqlen=512 --out=experiments/bench_forward.json
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qjax.calib import text as texts
from qjax.formats import open_checkpoint
from qjax.formats.default_model import default_model_dir
from qjax.models import LlamaForCausalLM

_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per forward pass.")
_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per framework (median reported).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  checkpoint = open_checkpoint("default")
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text("default", "evaluation"))
  ids = texts.eval_windows(tokens, _SEQLEN.value, max_windows=_BATCH.value)

  model = LlamaForCausalLM(checkpoint.config)
  params = jax.device_put(checkpoint.params())
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  jax_ids = jnp.asarray(ids)
  jax_logits = np.asarray(apply(params, jax_ids))
  jax_s = median_seconds(lambda: apply(params, jax_ids).block_until_ready(), _REPEATS.value)

  hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
  torch_ids = torch.tensor(ids)
  with torch.inference_mode():
    torch_logits = hf(torch_ids).logits.numpy()
    torch_s = median_seconds(lambda: hf(torch_ids).logits, _REPEATS.value)

  n = ids.size
  rows = {
    "tokens": int(n),
    "qjax_tokens_per_s": n / jax_s,
    "torch_tokens_per_s": n / torch_s,
    "speedup": torch_s / jax_s,
    "max_abs_logit_diff": float(np.abs(jax_logits - torch_logits).max()),
  }
  print(f"batch {_BATCH.value} x seqlen {_SEQLEN.value}, float32, {os.cpu_count()} CPU threads")
  print(f"qjax (jit)    {rows['qjax_tokens_per_s']:9.0f} tokens/s")
  print(f"transformers  {rows['torch_tokens_per_s']:9.0f} tokens/s")
  print(f"ratio         {rows['speedup']:9.2f}x   (max |logit diff| {rows['max_abs_logit_diff']:.1e})")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"batch": _BATCH.value, "seqlen": _SEQLEN.value, "jax": jax.__version__, "torch": torch.__version__,
                 **rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
  app.run(main)
