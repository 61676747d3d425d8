"""Forward throughput on this CPU: qjax's jitted Flax model vs transformers' PyTorch model, same weights and tokens;
with --moe, a mixture of experts against the dense model with the same active parameters (forward and calibration).

.venv/bin/python scripts/bench_forward.py --batch=1 --seqlen=512 --out=experiments/bench_forward.json
.venv/bin/python scripts/bench_forward.py --moe --batch=4 --seqlen=512 --out=experiments/bench_forward_moe.json
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
_MOE = flags.DEFINE_bool("moe", False, "Time a random Qwen3-MoE-shaped model (64 experts, 8 per token) against the "
                         "dense model of the same active parameters, forward and calibration statistics.")  # fmt: skip


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_moe() -> dict:
  """Median seconds of a forward pass and of one block's calibration step (its forward and every linear's Hessian;
  the block's forward alone too, so the Hessians' share shows), for a mixture of experts and for the dense model
  whose MLP is as wide as the experts a token runs through."""
  from qjax.models import LlamaConfig

  shape = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=4, head_dim=64)  # fmt: skip
  experts, per_token, width = 64, 8, 256
  configs = {
    "moe": LlamaConfig(**shape, intermediate_size=width, architecture="Qwen3MoeForCausalLM", num_experts=experts,
                       num_experts_per_tok=per_token, moe_intermediate_size=width),
    "dense": LlamaConfig(**shape, intermediate_size=per_token * width, architecture="Qwen3ForCausalLM"),
  }  # fmt: skip
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (_BATCH.value, _SEQLEN.value)))
  out = {"batch": _BATCH.value, "seqlen": _SEQLEN.value, "experts": experts, "experts_per_token": per_token,
         "expert_width": width, **shape}  # fmt: skip
  for name, config in configs.items():
    out[name] = _time_model(config, ids)
    print(f"{name:6s} forward {out[name]['forward_s'] * 1e3:8.1f} ms   one block's calibration step "
          f"{out[name]['calibration_step_s'] * 1e3:8.1f} ms, of which its forward "
          f"{out[name]['block_forward_s'] * 1e3:8.1f} ms", flush=True)  # fmt: skip
  out["forward_ratio"] = out["moe"]["forward_s"] / out["dense"]["forward_s"]
  out["calibration_ratio"] = out["moe"]["calibration_step_s"] / out["dense"]["calibration_step_s"]
  print(f"MoE / dense: forward {out['forward_ratio']:.2f}x, calibration step {out['calibration_ratio']:.2f}x")
  return out


def _time_model(config, ids) -> dict:
  from qjax.calib.runner import RunnerOptions, _Batches, _BlockRunner
  from qjax.models import DecoderLayer
  from qjax.models.blocks import LlamaBlocks

  model = LlamaForCausalLM(config)
  params = model.init(jax.random.key(0), ids[:, :8])["params"]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  forward = median_seconds(lambda: apply(params, ids).block_until_ready(), _REPEATS.value)
  block_fn = LlamaBlocks._block_fn(DecoderLayer(config, jnp.float32, False, config.moe(0)))
  runner = _BlockRunner(block_fn)
  block = params["model"]["layers_0"]
  h = jax.random.normal(jax.random.key(1), (*ids.shape, config.hidden_size))
  block_forward = median_seconds(lambda: jax.jit(block_fn)(block, h).block_until_ready(), _REPEATS.value)
  batches = _Batches(np.asarray(h), RunnerOptions(batch_size=ids.shape[0]))
  modules = tuple(m for g in LlamaBlocks.sequential_groups(block) for m in g)
  stats = median_seconds(lambda: runner.input_stats(block, batches, modules, {"hessian"}), _REPEATS.value)
  return {"forward_s": forward, "calibration_step_s": stats, "block_forward_s": block_forward,
          "tokens_per_s": ids.size / forward}  # fmt: skip


def main(argv):
  del argv
  if _MOE.value:
    results = {"jax": jax.__version__, "cpus": os.cpu_count(), **bench_moe()}
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    return
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
