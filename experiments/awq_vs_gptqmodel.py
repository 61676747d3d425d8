"""AWQ side by side: qjax vs gptqmodel's AWQ on the same calibration tokens and the same model.

Both sides quantize the first --layers decoder blocks of SmolLM2-135M-Instruct (a cut model
keeps the embedding, final norm and tied head; a cut model's perplexity is meaningless, so
compare KL there). Both use 4-bit groups with a zero point; both resulting models are scored
on the same evaluation windows; KL divergence is against the (cut) float model. gptqmodel
refuses groups of 128 on the 576-wide inputs (it wants the width divisible by the group), so
the recorded runs use groups of 64:

  GPTQMODEL_CPU_WORKERS=2 .venv/bin/python experiments/awq_vs_gptqmodel.py --layers=30 --group_size=64 \
      --out=experiments/awq_vs_gptqmodel.json
  GPTQMODEL_CPU_WORKERS=2 .venv/bin/python experiments/awq_vs_gptqmodel.py --layers=3 --group_size=64 \
      --out=experiments/awq_vs_gptqmodel_3layers.json
"""

import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import jax
import numpy as np
from absl import app, flags

from qjax.calib import RunnerOptions, quantize_model
from qjax.calib import text as texts
from qjax.core import QSpec
from qjax.eval.metrics import evaluate
from qjax.formats import open_checkpoint
from qjax.formats.default_model import write_hf_directory
from qjax.models import LlamaBlocks, logits_fn
from qjax.models.checkpoint import Checkpoint
from qjax.transforms import awq, quantize_params, rtn
from qjax.transforms.rules import rules_transform

_LAYERS = flags.DEFINE_integer("layers", 3, "Decoder layers kept in the cut model.")
_GROUP = flags.DEFINE_integer("group_size", 128, "Group size (4-bit, zero point).")
_NSAMPLES = flags.DEFINE_integer("nsamples", 16, "Calibration windows.")
_SEQLEN = flags.DEFINE_integer("seqlen", 256, "Tokens per calibration window.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 16, "Evaluation windows of 512 tokens.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")

KERNELS = r"model/layers_\d+/.*_proj/kernel"


class CutCheckpoint(Checkpoint):
  """The first `layers` decoder blocks of a checkpoint, with its embedding and head."""

  def __init__(self, checkpoint: Checkpoint, layers: int):
    self.inner, self.source = checkpoint, f"{checkpoint.source}[:{layers}]"
    self.config = dataclasses.replace(checkpoint.config, num_hidden_layers=layers)

  def embed_params(self):
    return self.inner.embed_params()

  def layer_params(self, i: int):
    return self.inner.layer_params(i)

  def head_params(self):
    return self.inner.head_params()

  def tokenizer(self):
    return self.inner.tokenizer()


def run_qjax(checkpoint, windows, spec):
  blocks = LlamaBlocks(checkpoint)
  stages = [awq(spec), rules_transform([(KERNELS, rtn(spec))])]
  start = time.perf_counter()
  params = quantize_model(blocks, stages, windows, options=RunnerOptions(batch_size=8))
  params = jax.block_until_ready(params)
  return params, time.perf_counter() - start


def run_gptqmodel(model_dir, windows, out_dir):
  import torch
  from gptqmodel import GPTQModel, QuantizeConfig
  from gptqmodel.quantization import FORMAT, METHOD

  torch.set_num_threads(os.cpu_count())
  config = QuantizeConfig(bits=4, group_size=_GROUP.value, sym=False, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
  model = GPTQModel.load(model_dir, config, device="cpu")
  start = time.perf_counter()
  model.quantize([{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows], batch_size=1)
  seconds = time.perf_counter() - start
  model.save(out_dir)
  quantized = GPTQModel.load(out_dir, device="cpu")

  def logits(ids):
    with torch.no_grad():
      return quantized.model(torch.tensor(np.asarray(ids))).logits.float().numpy()

  return logits, seconds


def main(argv):
  del argv
  full = open_checkpoint("default")
  checkpoint = CutCheckpoint(full, _LAYERS.value)
  tokenizer = full.tokenizer()
  windows = texts.calibration_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "calibration")), _NSAMPLES.value, _SEQLEN.value, seed=0
  )
  eval_windows = texts.eval_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512, max_windows=_EVAL_WINDOWS.value
  )
  spec = QSpec(bits=4, group_size=_GROUP.value, symmetric=False, partial_groups=True)
  float_fn = logits_fn(checkpoint.config, checkpoint.params())
  rows = {}
  rtn_params = quantize_params(checkpoint.params(), [(KERNELS, rtn(spec))])
  result = evaluate(logits_fn(checkpoint.config, rtn_params), eval_windows, reference_fn=float_fn, label="rtn")
  rows["float"] = {"perplexity": result.reference_perplexity}
  rows["rtn"] = {"perplexity": result.perplexity, "kl": result.kl_divergence}
  params, seconds = run_qjax(checkpoint, windows, spec)
  result = evaluate(logits_fn(checkpoint.config, params), eval_windows, reference_fn=float_fn, label="qjax awq")
  rows["qjax awq"] = {"seconds": seconds, "perplexity": result.perplexity, "kl": result.kl_divergence}
  with tempfile.TemporaryDirectory() as tmp:
    cut_dir = os.path.join(tmp, "cut")
    write_hf_directory(checkpoint, cut_dir)
    fn, seconds = run_gptqmodel(cut_dir, windows, os.path.join(tmp, "awq"))
    result = evaluate(fn, eval_windows, reference_fn=float_fn, label="gptqmodel awq")
  rows["gptqmodel awq"] = {"seconds": seconds, "perplexity": result.perplexity, "kl": result.kl_divergence}

  print(f"\nAWQ w4 g{_GROUP.value} zero point, SmolLM2 cut to {_LAYERS.value} layers, "
        f"{len(windows)} x {windows.shape[1]} calibration tokens")  # fmt: skip
  print(f"{'':14s} {'seconds':>8s} {'perplexity':>11s} {'KL':>9s}")
  for name, row in rows.items():
    secs = f"{row['seconds']:8.1f}" if "seconds" in row else f"{'-':>8s}"
    kl = f"{row['kl']:9.5f}" if "kl" in row else f"{'-':>9s}"
    print(f"{name:14s} {secs} {row['perplexity']:11.3f} {kl}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"layers": _LAYERS.value, "group_size": _GROUP.value, "nsamples": _NSAMPLES.value,
                 "seqlen": _SEQLEN.value, "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
  app.run(main)
