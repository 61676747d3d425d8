"""Perplexity of a built-in model quantized by RTN and GPTQ at 4 and 3 bits, group 128.

Reproduces the GPTQ table in the README (the default model), and the two models side by side:

  .venv/bin/python experiments/gptq_vs_rtn.py --results=experiments/gptq_vs_rtn.json
  .venv/bin/python experiments/gptq_vs_rtn.py --model=gemma3-270m --widths=4 --nsamples=16 --seqlen=256 \
      --eval_windows=8 --results=experiments/gptq_vs_rtn_gemma3-270m.json   # and --model=default likewise

Same calibration windows (--nsamples x --seqlen from the built-in text, seed 0) for every
GPTQ run, same evaluation windows (--eval_windows x 512 tokens) for every model, KL divergence
against the float model on those windows.
"""

import json

from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, quantize_with
from qjax.eval.metrics import evaluate
from qjax.formats import open_checkpoint
from qjax.models import logits_fn

FLAGS = flags.FLAGS  # --nsamples, --seqlen and --eval_windows are the quantize command's own flags
FLAGS.set_default("eval_windows", 33)  # the whole built-in evaluation text

_RESULTS = flags.DEFINE_string("results", "experiments/gptq_vs_rtn.json", "Results file.")
_WIDTHS = flags.DEFINE_list("widths", ["4", "3"], "Bit widths to compare (--bits is the quantize command's own flag).")

VARIANTS = [
  ("RTN", dict(method="rtn")),
  ("GPTQ", dict(method="gptq", act_group_aware=False)),
  ("GPTQ + group-aware order", dict(method="gptq")),
  ("GPTQ + act-order", dict(method="gptq", desc_act=True)),
]


def main(argv):
  del argv
  checkpoint = open_checkpoint(FLAGS.model)
  tokenizer = checkpoint.tokenizer()
  windows = calibration_windows(Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen), tokenizer)
  eval_windows = texts.eval_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512, max_windows=FLAGS.eval_windows
  )
  float_fn = logits_fn(checkpoint.config, checkpoint.params())
  rows = []
  for bits in map(int, _WIDTHS.value):
    for name, kw in VARIANTS:
      s = Settings(model=FLAGS.model, bits=bits, group_size=128, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen, **kw)
      _, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows)
      result = evaluate(logits_fn(config, params), eval_windows, reference_fn=float_fn, label=name)
      rows.append({"bits": bits, "method": name, "perplexity": result.perplexity, "kl": result.kl_divergence,
                   "top1": result.top1_agreement, "float_perplexity": result.reference_perplexity})  # fmt: skip
      print(f"w{bits}g128 {name:26s} ppl {result.perplexity:8.3f}  KL {result.kl_divergence:.4f}", flush=True)
  with open(_RESULTS.value, "w") as f:
    results = {"model": FLAGS.model, "nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "eval_tokens": result.tokens}
    json.dump({**results, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
