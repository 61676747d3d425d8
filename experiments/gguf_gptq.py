"""GGUF files better than llama.cpp makes: GPTQ rounding into llama.cpp's own block grids, evaluated by llama.cpp.

  .venv/bin/python experiments/gguf_gptq.py          # writes experiments/gguf_gptq.{json,md,png}
  .venv/bin/python experiments/gguf_gptq.py --recipes=Q3_K_M --rows="qjax GPTQ"   # rerun some rows, keep the rest

For each recipe, four files: llama.cpp's plain file and its importance-matrix file (qjax's encoders, byte for
byte what llama-quantize writes), and qjax's GPTQ and AWQ+GPTQ files (GPTQ's error feedback inside llama.cpp's
block grids at the imatrix file's types and size, the embedding and output encoded as llama.cpp would; AWQ's
search bounded to 4096 tokens, experiments/awq_gptq_cpu.py). Every file
is run by llama.cpp itself (llama-cpp-python) on the same token windows, and compared with llama.cpp running the
F32 file: mean and 99th-percentile KL divergence, top-1 agreement, perplexity. Two texts: the built-in evaluation
text (the same kind as the calibration text) and Python's own LICENSE.txt (legal prose, never calibrated on).
"""

import json
import os
import sysconfig
import tempfile

import numpy as np
from absl import app, flags

from qjax.calib import text as texts
from qjax.cli.quantize import Settings, calibration_windows, gptq_damp, quantize_with
from qjax.eval.metrics import evaluate
from qjax.formats import export, open_checkpoint, parse_target
from qjax.models import logits_fn

# --nsamples, --seqlen, --damp_percent and --eval_windows (of 512 tokens, per text) are `qjax quantize`'s own
# flags, defined when qjax.cli.quantize is imported.
FLAGS = flags.FLAGS
_RECIPES = flags.DEFINE_list("recipes", ["Q4_K_M", "Q3_K_M", "IQ4_XS"], "llama.cpp recipes.")
_ROWS = flags.DEFINE_list(
  "rows", None, "Rows to run (default: all); the other rows of an existing <prefix>.json are kept."
)
_PREFIX = flags.DEFINE_string("prefix", "experiments/gguf_gptq", "Output path prefix (.json, .md, .png).")

ROWS = {  # row -> settings beyond the recipe
  "llama.cpp": dict(method="none"),
  "llama.cpp + imatrix": dict(method="none", imatrix=True),
  "qjax GPTQ": dict(method="gptq"),
  # --method=awq+gptq with AWQ's scale search on 4096 of the calibration tokens, to fit two CPU cores
  "qjax AWQ+GPTQ": dict(recipe=os.path.join(os.path.dirname(__file__), "awq_gptq_cpu.py:recipe")),
}


def damp() -> float:
  """--damp_percent, or `qjax quantize`'s default into a GGUF recipe."""
  return gptq_damp(Settings(damp_percent=FLAGS.damp_percent), parse_target("gguf:Q4_K_M"))


def ood_text() -> str:
  return os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")


def llama_logits(path: str, windows: np.ndarray) -> np.ndarray:
  """(n, t, vocab) float32 logits of llama.cpp running the GGUF file at `path` on each window."""
  import llama_cpp

  llm = llama_cpp.Llama(model_path=path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                        verbose=False)  # fmt: skip
  try:
    out = []
    for window in windows:
      llm.reset()
      llm.eval(window.tolist())
      out.append(np.array(llm.scores[: len(window)], np.float32))  # a copy: `scores` is llama.cpp's reused buffer
    return np.stack(out)
  finally:
    llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> dict[str, float]:
  """llama.cpp's KL-divergence statistics of `logits` against the F32 file's on the same windows."""
  kl, nll, agree = [], [], []
  for ours, ref, window in zip(logits, reference, windows, strict=True):  # a window at a time: float64 vocab rows
    p, q = log_softmax(ref[:-1]), log_softmax(ours[:-1])
    kl.append(np.sum(np.exp(p) * (p - q), axis=-1))
    nll.append(-np.take_along_axis(q, window[1:, None], axis=-1)[:, 0])
    agree.append(p.argmax(-1) == q.argmax(-1))
  kl, nll, agree = map(np.concatenate, (kl, nll, agree))
  return {"kl": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "top1": float(agree.mean()),
          "perplexity": float(np.exp(nll.mean()))}  # fmt: skip


def main(argv):
  del argv
  checkpoint = open_checkpoint("default")
  tokenizer = checkpoint.tokenizer()
  base = Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen, damp_percent=damp())
  windows = calibration_windows(base, tokenizer)
  texts_ = {
    "built-in": texts.eval_windows(texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512,
                                   max_windows=FLAGS.eval_windows),
    "LICENSE.txt": texts.eval_windows(texts.tokenize(tokenizer, texts.load_text(ood_text(), "evaluation")), 512,
                                      max_windows=FLAGS.eval_windows),
  }  # fmt: skip
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    f32 = export(parse_target("gguf:F32"), os.path.join(tmp, "f32"), checkpoint.config, checkpoint.params(),
                 tokenizer, name="default")  # fmt: skip
    reference = {name: llama_logits(f32, w) for name, w in texts_.items()}
    for recipe in _RECIPES.value:
      for row, kw in ROWS.items():
        if _ROWS.value is not None and row not in _ROWS.value:
          continue
        s = Settings(**{**base.__dict__, **kw, "export": f"gguf:{recipe}"})
        p, config, params = quantize_with(s, checkpoint=checkpoint, windows=windows, show_progress=True)
        path = export(p.target, os.path.join(tmp, f"{recipe}-{row}".replace(" ", "_")), config, params, tokenizer,
                      name="default", description=p.label)  # fmt: skip
        weights = sum(int(np.prod(t.shape)) for t in _gguf_2d(path))
        result = {"recipe": recipe, "row": row, "settings": {k: getattr(s, k) for k in ("nsamples", "seqlen",
                  "damp_percent")}, "size_mb": os.path.getsize(path) / 2**20,
                  "bpw": 8 * sum(t.n_bytes for t in _gguf_2d(path)) / weights}  # fmt: skip
        for name, w in texts_.items():
          result[name] = compare(llama_logits(path, w), reference[name], w)
        # qjax's own forward on the dequantized weights, on the same windows: llama.cpp runs what qjax computed
        ours = evaluate(logits_fn(config, params), texts_["built-in"], show_progress=False)
        result["qjax_perplexity"] = ours.perplexity
        rows.append(result)
        print(json.dumps(result), flush=True)
  write_outputs(merged(rows), {name: int(w[:, 1:].size) for name, w in texts_.items()})


# the settings each row depends on: llama.cpp's plain file on none, the imatrix file on the calibration windows
DEPENDS = {"llama.cpp": (), "llama.cpp + imatrix": ("nsamples", "seqlen")}


def merged(rows: list[dict]) -> list[dict]:
  """`rows` and the rows of the previous run that were not rerun and depend on no setting that changed."""
  path = f"{_PREFIX.value}.json"
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    now = {"nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "damp_percent": damp()}
    same = lambda r: all(r.get("settings", previous).get(k) == now[k] for k in DEPENDS.get(r["row"], now))
    new = {(r["recipe"], r["row"]) for r in rows}
    kept = [r for r in previous["rows"] if same(r) and (r["recipe"], r["row"]) not in new]
  recipes = list(dict.fromkeys([*_RECIPES.default, *_RECIPES.value, *(r["recipe"] for r in kept)]))
  return sorted(rows + kept, key=lambda r: (recipes.index(r["recipe"]), list(ROWS).index(r["row"])))


def _gguf_2d(path: str):
  import gguf

  return [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]


def write_outputs(rows: list[dict], tokens: dict[str, int]) -> None:
  out = _PREFIX.value
  with open(f"{out}.json", "w") as f:
    json.dump({"nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "damp_percent": damp(), "tokens": tokens,
               "rows": rows}, f, indent=2)  # fmt: skip
  names = list(tokens)
  head = " | ".join(f"{what} ({n})" for n in names for what in ("KL", "KL p99", "top-1", "ppl"))
  lines = [
    f"SmolLM2-135M-Instruct, every file run by llama.cpp and compared with llama.cpp running the F32 file; "
    f"calibration {FLAGS.nsamples} x {FLAGS.seqlen} tokens of the built-in text, GPTQ's dampening "
    f"{damp()} (AWQ+GPTQ: AWQ's scales searched on 4096 of those tokens, experiments/awq_gptq_cpu.py); last "
    "column: qjax's own forward on the file's dequantized weights; "
    + ", ".join(f"{n}: {t} scored tokens" for n, t in tokens.items())
    + ".",
    "",
    f"| recipe | file | MB | bits/w | {head} | ppl by qjax ({names[0]}) |",
    "|---|---|---|---|" + "---|" * (4 * len(names) + 1),
  ]
  for r in rows:
    cells = " | ".join(
      f"{r[n]['kl']:.4f} | {r[n]['kl_p99']:.3f} | {100 * r[n]['top1']:.1f}% | {r[n]['perplexity']:.3f}" for n in names
    )
    ours = f"{r['qjax_perplexity']:.3f}" if "qjax_perplexity" in r else "not run"
    lines.append(f"| {r['recipe']} | {r['row']} | {r['size_mb']:.1f} | {r['bpw']:.3f} | {cells} | {ours} |")
  with open(f"{out}.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, names, f"{out}.png")


def plot(rows: list[dict], names: list[str], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4))
  markers = {"llama.cpp": "o", "llama.cpp + imatrix": "s", "qjax GPTQ": "^", "qjax AWQ+GPTQ": "D"}
  for ax, name in zip(np.atleast_1d(axes), names, strict=True):
    for row, marker in markers.items():
      pts = [(r["bpw"], r[name]["kl"]) for r in rows if r["row"] == row]
      if pts:
        ax.scatter(*zip(*pts, strict=True), marker=marker, label=row)
    ax.set(xlabel="bits per weight (2-D tensors)", ylabel="mean KL divergence vs F32 (llama.cpp)", yscale="log",
           title=f"{name} text")  # fmt: skip
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
