"""GGUF files better than llama.cpp makes: GPTQ rounding into llama.cpp's own block grids, evaluated by llama.cpp.

  .venv/bin/python experiments/gguf_gptq.py          # writes experiments/gguf_gptq.{json,md,png}
  .venv/bin/python experiments/gguf_gptq.py --recipes=Q3_K_M --rows="qjax GPTQ"   # rerun some rows, keep the rest

For each recipe, four files of exactly the same types and size: llama.cpp's plain file and its importance-matrix
file (qjax's encoders, byte for byte what llama-quantize writes), and qjax's GPTQ and AWQ+GPTQ files (GPTQ's
error feedback inside llama.cpp's block grids, the embedding and output encoded as llama.cpp would). Every file
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
from qjax.cli.quantize import Settings, calibration_windows, quantize_with
from qjax.formats import export, open_checkpoint, parse_target

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
  "qjax AWQ+GPTQ": dict(method="awq+gptq"),
}


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
  p, q = log_softmax(reference[:, :-1]), log_softmax(logits[:, :-1])
  kl = np.sum(np.exp(p) * (p - q), axis=-1).reshape(-1)
  targets = windows[:, 1:]
  nll = -np.take_along_axis(q, targets[..., None], axis=-1).mean()
  return {"kl": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
          "top1": float(np.mean(p.argmax(-1) == q.argmax(-1))), "perplexity": float(np.exp(nll))}  # fmt: skip


def main(argv):
  del argv
  checkpoint = open_checkpoint("default")
  tokenizer = checkpoint.tokenizer()
  base = Settings(nsamples=FLAGS.nsamples, seqlen=FLAGS.seqlen, damp_percent=FLAGS.damp_percent)
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
        result = {"recipe": recipe, "row": row, "size_mb": os.path.getsize(path) / 2**20,
                  "bpw": 8 * sum(t.n_bytes for t in _gguf_2d(path)) / weights}  # fmt: skip
        for name, w in texts_.items():
          result[name] = compare(llama_logits(path, w), reference[name], w)
        rows.append(result)
        print(json.dumps(result), flush=True)
  write_outputs(merged(rows), {name: int(w[:, 1:].size) for name, w in texts_.items()})


def merged(rows: list[dict]) -> list[dict]:
  """`rows` and the rows of the previous run at the same settings that were not rerun, by recipe then row."""
  path = f"{_PREFIX.value}.json"
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    same = [previous.get(k) for k in ("nsamples", "seqlen", "damp_percent")] == [
      FLAGS.nsamples, FLAGS.seqlen, FLAGS.damp_percent]  # fmt: skip
    new = {(r["recipe"], r["row"]) for r in rows}
    kept = [r for r in previous["rows"] if same and (r["recipe"], r["row"]) not in new]
  recipes = list(dict.fromkeys([*_RECIPES.value, *(r["recipe"] for r in kept)]))
  return sorted(rows + kept, key=lambda r: (recipes.index(r["recipe"]), list(ROWS).index(r["row"])))


def _gguf_2d(path: str):
  import gguf

  return [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]


def write_outputs(rows: list[dict], tokens: dict[str, int]) -> None:
  out = _PREFIX.value
  with open(f"{out}.json", "w") as f:
    json.dump({"nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "damp_percent": FLAGS.damp_percent, "tokens": tokens,
               "rows": rows}, f, indent=2)  # fmt: skip
  names = list(tokens)
  head = " | ".join(f"{what} ({n})" for n in names for what in ("KL", "KL p99", "top-1", "ppl"))
  lines = [
    f"SmolLM2-135M-Instruct, every file run by llama.cpp and compared with llama.cpp running the F32 file; "
    f"calibration {FLAGS.nsamples} x {FLAGS.seqlen} tokens of the built-in text; "
    + ", ".join(f"{n}: {t} scored tokens" for n, t in tokens.items())
    + ".",
    "",
    f"| recipe | file | MB | bits/w | {head} |",
    "|---|---|---|---|" + "---|" * (4 * len(names)),
  ]
  for r in rows:
    cells = " | ".join(
      f"{r[n]['kl']:.4f} | {r[n]['kl_p99']:.3f} | {100 * r[n]['top1']:.1f}% | {r[n]['perplexity']:.3f}" for n in names
    )
    lines.append(f"| {r['recipe']} | {r['row']} | {r['size_mb']:.1f} | {r['bpw']:.3f} | {cells} |")
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
