"""AWQ and the composed recipes on the default model: RTN, AWQ, AWQ+GPTQ, GPTQ, rotations, learned clipping.

  .venv/bin/python experiments/awq_recipes.py        # writes experiments/awq_recipes.{json,md}
  .venv/bin/python experiments/awq_recipes.py --methods=awq+gptq   # reruns those rows, keeps the others

4- and 3-bit groups of 128 with a zero point (AutoAWQ's setting; the 576-wide inputs end in a
64-wide group), the same calibration windows for every calibrated method, the same evaluation
windows for every model, KL divergence against the float model.
"""

import json
import os
import time

import jax
from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, quantize_with
from qjax.eval.metrics import evaluate
from qjax.formats import open_checkpoint
from qjax.models import logits_fn

FLAGS = flags.FLAGS  # --nsamples, --seqlen and --eval_windows are the quantize command's own flags
FLAGS.set_default("nsamples", 16)
FLAGS.set_default("seqlen", 256)
_BITS = flags.DEFINE_list("bit_widths", ["4", "3"], "Bit widths.")
_OUT = flags.DEFINE_string("prefix", "experiments/awq_recipes", "Output path prefix (.json, .md).")

METHODS = ["rtn", "awq", "gptq", "awq+gptq", "rotate+rtn", "rotate+gptq", "lwc"]
_METHODS = flags.DEFINE_list("methods", METHODS, "Methods to run; the other rows of an existing PREFIX.json are kept.")


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
  for bits in map(int, _BITS.value):
    for method in _METHODS.value:
      s = Settings(method=method, bits=bits, group_size=128, sym=False, nsamples=FLAGS.nsamples,
                   seqlen=FLAGS.seqlen)  # fmt: skip
      start = time.perf_counter()
      _, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows)
      params = jax.block_until_ready(params)
      seconds = time.perf_counter() - start
      result = evaluate(logits_fn(config, params), eval_windows, reference_fn=float_fn, label=f"w{bits} {method}")
      rows.append(dict(bits=bits, method=method, perplexity=result.perplexity, kl=result.kl_divergence,
                       top1=result.top1_agreement, seconds=seconds))  # fmt: skip
      print(f"w{bits}g128 {method:12s} ppl {result.perplexity:9.3f}  KL {result.kl_divergence:.4f}  {seconds:.0f}s",
            flush=True)  # fmt: skip
  rows = merge_rows(f"{_OUT.value}.json", rows, key=lambda r: (r["bits"], r["method"]))
  lines = [
    f"SmolLM2-135M-Instruct, groups of 128 with a zero point, {len(windows)} x {windows.shape[1]} calibration "
    f"tokens, {result.tokens} evaluation tokens (float perplexity {result.reference_perplexity:.3f}).",
    "",
    "| bits | method | perplexity | KL | top-1 | seconds |",
    "|---|---|---|---|---|---|",
  ]
  lines += [f"| {r['bits']} | {r['method']} | {r['perplexity']:.3f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
            f"{r['seconds']:.0f} |" for r in rows]  # fmt: skip
  with open(f"{_OUT.value}.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(f"{_OUT.value}.json", "w") as f:
    json.dump({"float_perplexity": result.reference_perplexity, "rows": rows}, f, indent=2)
  print("\n".join(lines))


def merge_rows(path: str, rows: list[dict], key) -> list[dict]:
  """`rows` replacing the rows with the same key in the JSON at `path` (if any), in that file's order."""
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    kept = json.load(f)["rows"]
  fresh = {key(r): r for r in rows}
  merged = [fresh.pop(key(r), r) for r in kept]
  return merged + list(fresh.values())


if __name__ == "__main__":
  app.run(main)
