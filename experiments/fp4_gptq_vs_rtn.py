"""Perplexity of the default model with its linears in NVFP4, MXFP4 and integer 4-bit, rounded by RTN and by GPTQ.

NVFP4 (an E4M3 scale per 16, a global scale per tensor) and integer 4-bit with a float16 scale per 32 both cost 4.5
bits per weight; MXFP4 (a power-of-two scale per 32) 4.25. Reproduces experiments/fp4_gptq_vs_rtn.md:

  .venv/bin/python experiments/fp4_gptq_vs_rtn.py

Same calibration windows (--nsamples x --seqlen from the built-in text, seed 0) for every GPTQ run, same evaluation
windows (--eval_windows x 512 tokens of the built-in evaluation text) for every model, KL divergence against the
float model on those windows.
"""

import json
import time

from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, quantize_with, settings_spec
from qjax.eval.metrics import evaluate
from qjax.formats import open_checkpoint
from qjax.models import logits_fn

FLAGS = flags.FLAGS  # --nsamples, --seqlen and --eval_windows are the quantize command's own flags
FLAGS.set_default("eval_windows", 33)  # the whole built-in evaluation text

_PREFIX = flags.DEFINE_string("prefix", "experiments/fp4_gptq_vs_rtn", "Results: PREFIX.json and PREFIX.md.")

GRIDS = [
  ("NVFP4 (E4M3 scale / 16, global scale)", dict(grid="nvfp4", group_size=16)),
  ("MXFP4 (E8M0 scale / 32)", dict(grid="mxfp4", group_size=32)),
  ("INT4 sym, fp16 scale / 32", dict(grid="affine", group_size=32)),
]
METHODS = ["rtn", "gptq"]


def main(argv):
  del argv
  checkpoint = open_checkpoint("default")
  tokenizer = checkpoint.tokenizer()
  windows = calibration_windows(Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen), tokenizer)
  eval_windows = texts.eval_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512, max_windows=FLAGS.eval_windows
  )
  float_fn = logits_fn(checkpoint.config, checkpoint.params())
  rows = []
  for grid, kw in GRIDS:
    for method in METHODS:
      s = Settings(method=method, bits=4, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen, **kw)
      start = time.perf_counter()
      _, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows)
      seconds = time.perf_counter() - start
      result = evaluate(logits_fn(config, params), eval_windows, reference_fn=float_fn, label=f"{grid} {method}")
      bits = settings_spec(s).bits_per_weight(config.hidden_size)
      rows.append({"grid": grid, "method": method.upper(), "bits_per_weight": bits, "perplexity": result.perplexity,
                   "kl": result.kl_divergence, "top1": result.top1_agreement, "quantize_s": round(seconds, 1),
                   "float_perplexity": result.reference_perplexity})  # fmt: skip
      print(f"{grid:40s} {method:5s} ppl {result.perplexity:8.3f}  KL {result.kl_divergence:.4f}", flush=True)
  with open(f"{_PREFIX.value}.json", "w") as f:
    json.dump({"nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "eval_tokens": result.tokens, "rows": rows}, f,
              indent=2)  # fmt: skip
  lines = [
    "# 4-bit floating-point grids: GPTQ vs RTN on the default model",
    "",
    f"`.venv/bin/python experiments/fp4_gptq_vs_rtn.py` (calibration {FLAGS.nsamples} x {FLAGS.seqlen} tokens of "
    f"the built-in text; evaluation {result.tokens} tokens of the built-in evaluation text; float perplexity "
    f"{rows[0]['float_perplexity']:.3f}). Every linear of every block quantized; embeddings and the tied head float.",
    "",
    "| grid | bits/w | method | perplexity | KL vs float | top-1 agreement | quantize s |",
    "|---|---|---|---|---|---|---|",
    *(
      f"| {r['grid']} | {r['bits_per_weight']:.2f} | {r['method']} | {r['perplexity']:.3f} | {r['kl']:.4f} | "
      f"{r['top1']:.3f} | {r['quantize_s']:.0f} |"
      for r in rows
    ),
  ]
  with open(f"{_PREFIX.value}.md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
