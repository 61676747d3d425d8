"""GPTQ wall time and perplexity: qjax vs gptqmodel (the maintained PyTorch reference) on the same tokens.

Both quantize the built-in default model with GPTQ (4-bit, group 64, symmetric, true-sequential)
on the same calibration windows (32 x 256 tokens of the built-in text), each at its own default
dampening; both quantized models are then scored by the same evaluator on the same windows.

  scripts/env.sh test  # once, for gptqmodel and torch
  GPTQMODEL_CPU_WORKERS=2 .venv/bin/python scripts/bench_quantize.py --results=experiments/bench_quantize.json
"""

import json
import os
import platform
import subprocess
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's worker pool fails on < 4 cores otherwise

import jax
import numpy as np
from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, quantize_with
from qjax.eval.metrics import evaluate
from qjax.formats import default_model_dir, open_checkpoint
from qjax.models import logits_fn

FLAGS = flags.FLAGS  # --nsamples, --seqlen, --bits, --group_size, --eval_windows: the quantize command's own flags
FLAGS.set_default("seqlen", 256)
FLAGS.set_default("group_size", 64)
_GPTQMODEL = flags.DEFINE_bool("gptqmodel", True, "Also run gptqmodel (about 10 minutes on 2 cores).")
_OUT = flags.DEFINE_string("results", None, "Write the results as JSON here.")


def run_qjax(checkpoint, windows):
  s = Settings(
    method="gptq", bits=FLAGS.bits, group_size=FLAGS.group_size, nsamples=len(windows), seqlen=windows.shape[1]
  )
  start = time.perf_counter()
  _, _, params = quantize_with(s, checkpoint=checkpoint, windows=windows, show_progress=True)
  jax.block_until_ready(params)
  return params, time.perf_counter() - start


def run_gptqmodel(windows, out_dir):
  import torch
  from gptqmodel import GPTQModel, QuantizeConfig

  torch.set_num_threads(os.cpu_count())
  config = QuantizeConfig(bits=FLAGS.bits, group_size=FLAGS.group_size, sym=True)
  model = GPTQModel.load(default_model_dir(), config, device="cpu")
  calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
  start = time.perf_counter()
  model.quantize(calibration, batch_size=1)
  seconds = time.perf_counter() - start
  model.save(out_dir)
  quantized = GPTQModel.load(out_dir, device="cpu")

  def logits(ids):
    with torch.no_grad():
      return quantized.model(torch.tensor(np.asarray(ids))).logits.float().numpy()

  return logits, seconds, config.damp_percent


def main(argv):
  del argv
  checkpoint = open_checkpoint("default")
  tokenizer = checkpoint.tokenizer()
  windows = calibration_windows(Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen), tokenizer)
  eval_windows = texts.eval_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512, max_windows=FLAGS.eval_windows
  )
  float_fn = logits_fn(checkpoint.config, checkpoint.params())
  rows = {"float": {"perplexity": evaluate(float_fn, eval_windows, label="float").perplexity}}

  params, seconds = run_qjax(checkpoint, windows)
  result = evaluate(logits_fn(checkpoint.config, params), eval_windows, reference_fn=float_fn, label="qjax")
  rows["qjax"] = {"seconds": seconds, "perplexity": result.perplexity, "kl": result.kl_divergence, "damp": 0.01}

  if _GPTQMODEL.value:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
      fn, seconds, damp = run_gptqmodel(windows, tmp)
      result = evaluate(fn, eval_windows, reference_fn=float_fn, label="gptqmodel")
    rows["gptqmodel"] = {"seconds": seconds, "perplexity": result.perplexity, "kl": result.kl_divergence, "damp": damp}

  print(f"\nGPTQ w{FLAGS.bits} g{FLAGS.group_size} sym, {len(windows)} x {windows.shape[1]} calibration tokens")
  print(f"{'':10s} {'seconds':>9s} {'perplexity':>11s} {'KL':>9s}")
  for name, row in rows.items():
    secs = f"{row['seconds']:9.1f}" if "seconds" in row else f"{'-':>9s}"
    kl = f"{row['kl']:9.5f}" if "kl" in row else f"{'-':>9s}"
    print(f"{name:10s} {secs} {row['perplexity']:11.3f} {kl}")
  if "gptqmodel" in rows:
    print(f"qjax speedup: {rows['gptqmodel']['seconds'] / rows['qjax']['seconds']:.1f}x")
  if _OUT.value:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "commit": commit}  # fmt: skip
    with open(_OUT.value, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
