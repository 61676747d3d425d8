"""One table of methods on a built-in model and the built-in text: qjax's and llama.cpp's recipes side by side.

  .venv/bin/python experiments/compare_methods.py          # writes experiments/compare_methods.{json,md,png}
  .venv/bin/python experiments/compare_methods.py --rows=AWQ+GPTQ,Q4_K_M   # reruns those rows, keeps the others
  .venv/bin/python experiments/compare_methods.py --model=gemma3-270m      # experiments/compare_methods_gemma3-270m.*

Rows: RTN, GPTQ (group-aware order), GPTQ act-order, AWQ, AWQ+GPTQ at 4 bits in groups of 128
(calibrated on 16 x 256 tokens),
and GGUF recipes (Q8_0, Q6_K, Q5_K_M, Q4_K_M with and without an importance matrix, Q3_K_M,
Q2_K) encoded by qjax (byte for byte what llama-quantize writes) and *run by llama.cpp*. Every row
is scored on the same evaluation windows; KL divergence is against qjax's float model on them.
The README quotes `compare_methods.md`.
"""

import json
import os
import tempfile

import numpy as np
from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, quantize_with
from qjax.core import is_qarray
from qjax.core.tree import leaves_with_paths
from qjax.eval.metrics import evaluate
from qjax.eval.runtimes import llama_cpp_logits
from qjax.formats import export, open_checkpoint, parse_target
from qjax.models import logits_fn

FLAGS = flags.FLAGS  # --nsamples, --seqlen and --eval_windows are the quantize command's own flags
FLAGS.set_default("nsamples", 16)
FLAGS.set_default("seqlen", 256)
_EVAL_SEQLEN = flags.DEFINE_integer("eval_seqlen", 512, "Tokens per evaluation window.")
_OUT = flags.DEFINE_string(
  "prefix", None, "Output path prefix (.json, .md, .png); default experiments/compare_methods[_MODEL]."
)
MODEL_NAMES = {"default": "Default model (SmolLM2-135M-Instruct)", "gemma3-270m": "Gemma 3 270M"}
_ROWS = flags.DEFINE_list(
  "rows", None, "Only these rows (qjax row names or GGUF recipes); the other rows of an existing JSON are kept."
)

QJAX_ROWS = [
  ("RTN", dict(method="rtn")),
  ("RTN zero point", dict(method="rtn", sym=False)),
  ("GPTQ", dict(method="gptq")),
  ("GPTQ act-order", dict(method="gptq", desc_act=True)),
  ("AWQ", dict(method="awq", sym=False)),
  ("AWQ+GPTQ", dict(method="awq+gptq", sym=False)),
]
GGUF_ROWS = [("Q8_0", False), ("Q6_K", False), ("Q5_K_M", False), ("Q4_K_M", False), ("Q4_K_M", True),
             ("Q3_K_M", False), ("Q2_K", False)]  # fmt: skip


def weight_bits(params) -> tuple[float, float]:
  """(bits per weight over all 2-D tensors with dense ones at 16 bits, size in MB at that precision)."""
  bits = weights = 0
  for _, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      bits += 8 * leaf.nbytes
      weights += int(np.prod(leaf.shape))
    elif np.ndim(leaf) == 2:
      bits += 16 * np.size(leaf)
      weights += np.size(leaf)
  return bits / weights, bits / 8 / 2**20


def main(argv):
  del argv
  if _OUT.value is None:
    suffix = "" if FLAGS.model == "default" else f"_{FLAGS.model}"
    FLAGS.prefix = f"experiments/compare_methods{suffix}"
  checkpoint = open_checkpoint(FLAGS.model)
  tokenizer = checkpoint.tokenizer()
  windows = calibration_windows(Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen), tokenizer)
  eval_windows = texts.eval_windows(
    texts.tokenize(tokenizer, texts.load_text("default", "evaluation")),
    _EVAL_SEQLEN.value,
    max_windows=FLAGS.eval_windows,
  )
  float_fn = logits_fn(checkpoint.config, checkpoint.params())

  def wanted(name):
    return _ROWS.value is None or name in _ROWS.value

  rows = []
  for name, kw in filter(lambda row: wanted(row[0]), QJAX_ROWS):
    s = Settings(model=FLAGS.model, nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen, group_size=128, **kw)
    _, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows)
    result = evaluate(logits_fn(config, params), eval_windows, reference_fn=float_fn, label=name)
    bpw, mb = weight_bits(params)
    rows.append(dict(method=f"{name} w4g128", runtime="qjax", perplexity=result.perplexity,
                     kl=result.kl_divergence, top1=result.top1_agreement, bpw=bpw, size_mb=mb))  # fmt: skip
  with tempfile.TemporaryDirectory() as tmp:
    for recipe, imatrix in filter(lambda row: wanted(row[0]), GGUF_ROWS):
      s = Settings(model=FLAGS.model, method="none", export=f"gguf:{recipe}", imatrix=imatrix,
                   nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen)  # fmt: skip
      p, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows)
      path = export(parse_target(s.export), os.path.join(tmp, f"{recipe}-{imatrix}"), config, params, tokenizer,
                    name=FLAGS.model)  # fmt: skip
      with llama_cpp_logits(path, _EVAL_SEQLEN.value) as fn:
        result = evaluate(fn, eval_windows, reference_fn=float_fn, label=p.label)
      bpw, _ = weight_bits(params)
      rows.append(dict(method=f"GGUF {recipe}" + (" + imatrix" if imatrix else ""), runtime="llama.cpp",
                       perplexity=result.perplexity, kl=result.kl_divergence, top1=result.top1_agreement, bpw=bpw,
                       size_mb=os.path.getsize(path) / 2**20))  # fmt: skip
  float_ppl = result.reference_perplexity
  if _ROWS.value is not None:  # keep the rows not rerun, in the table's order
    with open(f"{_OUT.value}.json") as f:
      fresh = {r["method"]: r for r in rows}
      rows = [fresh.pop(r["method"], r) for r in json.load(f)["rows"]] + list(fresh.values())
  write_outputs(rows, float_ppl, len(eval_windows) * (_EVAL_SEQLEN.value - 1))


def write_outputs(rows, float_ppl: float, tokens: int) -> None:
  with open(f"{_OUT.value}.json", "w") as f:
    json.dump({"float_perplexity": float_ppl, "eval_tokens": tokens, "rows": rows}, f, indent=2)
  lines = [
    f"{MODEL_NAMES.get(FLAGS.model, FLAGS.model)}, built-in evaluation text, {tokens} scored tokens; float perplexity "
    f"{float_ppl:.3f}. KL divergence and top-1 agreement against qjax's float model on the same tokens.",
    "",
    "| method | runtime | perplexity | KL | top-1 | bits/weight | size MB |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['method']} | {r['runtime']} | {r['perplexity']:.3f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
      f"{r['bpw']:.2f} | {r['size_mb']:.1f} |"
    )
  with open(f"{_OUT.value}.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for runtime, marker in (("qjax", "o"), ("llama.cpp", "s")):
    pts = [r for r in rows if r["runtime"] == runtime]
    ax.scatter([r["bpw"] for r in pts], [r["perplexity"] for r in pts], marker=marker, label=runtime)
    for r in pts:
      ax.annotate(r["method"], (r["bpw"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.axhline(float_ppl, color="gray", linestyle="--", label="float")
  ax.set_xlabel("bits per weight (2-D tensors; dense ones at 16)")
  ax.set_ylabel("perplexity")
  ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(f"{_OUT.value}.png", dpi=120)


if __name__ == "__main__":
  app.run(main)
