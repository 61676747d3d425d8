"""Evaluate a model: perplexity on a text, and KL divergence / top-1 agreement against a reference model.

Example:
  qjax eval --model=default --seqlen=512
  qjax eval --model=runs/gptq4 --reference=default --json=eval.json
"""

import json

import numpy as np
from absl import flags

from qjax.calib import text as texts
from qjax.eval.metrics import evaluate
from qjax.formats.loading import load_model
from qjax.models import logits_fn

_MODEL = flags.DEFINE_string(
    "model", "default", "Model to evaluate: 'default' or 'gemma3-270m' (built-in), a Hugging Face directory, a .gguf "
    "file, or a qjax directory written by `qjax quantize --out`. Example: --model=runs/gptq4."
)  # fmt: skip
_TEXT = flags.DEFINE_string(
    "text", "default", "Evaluation text: 'default' (the evaluation part of Python's documentation topics) or a "
    "UTF-8 text file. Example: --text=wiki.test.txt."
)  # fmt: skip
_SEQLEN = flags.DEFINE_integer(
  "seqlen", 512, "Window length in tokens; windows do not overlap. Example: --seqlen=2048."
)
_MAX_WINDOWS = flags.DEFINE_integer(
  "max_windows", None, "Evaluate at most this many windows. Example: --max_windows=8."
)
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Reference model for KL divergence and top-1 agreement (same forms as --model). Defaults to "
    "the model a qjax directory was quantized from. Example: --reference=default."
)  # fmt: skip
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file. Example: --json=eval.json.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Windows per forward pass. Example: --batch_size=4.")


def _logits(model):
  return logits_fn(model.config, model.params)


def run_eval(model_spec: str, text: str, seqlen: int, *, reference: str | None, max_windows=None, batch_size=1):
  model = load_model(model_spec)
  tokens = texts.tokenize(model.tokenizer, texts.load_text(text, "evaluation"))
  windows = texts.eval_windows(tokens, seqlen, max_windows=max_windows)
  reference = reference or model.reference
  ref_fn = None if reference is None else _logits(load_model(reference))
  result = evaluate(_logits(model), windows, reference_fn=ref_fn, batch_size=batch_size)
  return {"model": model_spec, "text": text, "seqlen": seqlen, "reference": reference, **result.as_dict()}


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if _SEQLEN.value < 2:
    raise ValueError(f"--seqlen must be at least 2, got {_SEQLEN.value}")
  row = run_eval(
      _MODEL.value, _TEXT.value, _SEQLEN.value, reference=_REFERENCE.value, max_windows=_MAX_WINDOWS.value,
      batch_size=_BATCH.value,
  )  # fmt: skip
  print(f"model        {row['model']}")
  print(f"tokens       {row['tokens']}  (windows of {row['seqlen']})")
  print(f"perplexity   {row['perplexity']:.4f}")
  if row["kl_divergence"] is not None:
    print(f"KL vs ref    {row['kl_divergence']:.5f}  (reference {row['reference']})")
    print(f"top-1 agree  {100 * row['top1_agreement']:.2f}%")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({k: (float(v) if isinstance(v, np.floating) else v) for k, v in row.items()}, f, indent=2)
