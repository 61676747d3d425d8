"""What experts that calibration fed few tokens should quantize with: pooled (shrunk) statistics, their own, RTN, or
every token. Measured on a mixture of experts whose experts specialise, at two calibration sizes.

  .venv/bin/python experiments/moe_calibration.py     # writes experiments/moe_calibration.{json,md}

The model: the default model (SmolLM2-135M) made a Mixtral of 8 experts, top-2. The router partitions input space:
each layer's MLP neurons are clustered by their gate weights into 8 groups and an expert's router row is its group's
centroid direction, so an expert sees the tokens whose hidden states point its way (its inputs, and so its Hessian,
differ from the layer's average, as in trained MoEs). Each expert is the MLP with every weight multiplied by
(1 + 0.25 N(0, 1)), so experts are distinct matrices and the model stays a language model (its float perplexity is
in the table's header; the dense model's is 19.9 on the same text). Routing is uneven: some experts see few
calibration tokens.

Every row quantizes the experts alone (the rest stays float, so rows differ only in how experts are handled): GPTQ
4-bit g64 (desc_act off) calibrated on the same windows of the built-in calibration text (the first row: RTN), and
scored on held-out windows of the evaluation text: mean KL divergence from the float MoE over all tokens, and over
the tokens that the float model routes, in some layer, to an expert that fewer than a tenth of its fair share of
the calibration tokens reach (as the float model routes the calibration windows): "rare-expert tokens". Per
expert: the mean KL of the evaluation tokens the float model routes to it (in its layer), averaged over the experts
of each band of calibration feed (none, under a tenth of its share, under its share, at least its share), and how
many experts each policy serves best.
"""

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qjax.calib import text as texts
from qjax.calib.experts import ExpertPolicy
from qjax.calib.quantize import quantize_model
from qjax.calib.runner import RunnerOptions
from qjax.core import QSpec
from qjax.formats import open_checkpoint
from qjax.models import LlamaForCausalLM, logits_fn
from qjax.models.blocks import LlamaBlocks
from qjax.transforms.capture import capture_linear_inputs
from qjax.transforms.methods import gptq, rtn
from qjax.transforms.rules import Rule, rules_transform

EXPERTS, TOP_K = 8, 2
ROUTER_SCALE = 4.0  # router logits: this times the cosine-like score of the hidden state and each expert's direction
NOISE = 0.25  # each expert's weights: the MLP's, each multiplied by (1 + NOISE * N(0, 1)), so experts differ
SEQLEN = 128
SIZES = {"2 x 128 tokens": 2, "16 x 128 tokens": 16}
POLICIES = {
  "GPTQ per expert (plain)": ExpertPolicy(kind="plain"),
  "RTN fallback (< 64 tokens)": ExpertPolicy(kind="rtn", min_tokens=64),
  "all tokens to all experts": ExpertPolicy(kind="all_tokens"),
  "shrink, kappa = 16": ExpertPolicy(kind="shrink", kappa=16),
  "shrink, kappa = 64": ExpertPolicy(kind="shrink", kappa=64),
  "shrink, kappa = 256": ExpertPolicy(kind="shrink", kappa=256),
}
ROWS = {"RTN (no calibration)": None, **POLICIES}  # the baseline first, then the candidates
SPEC = QSpec(bits=4, group_size=64)
EXPERT_KERNELS = r"model/layers_\d+/mlp/experts/\w+_proj/kernel"  # only the experts: the rest stays float
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 16, "Evaluation windows of 256 tokens.")
_OUT = flags.DEFINE_string("prefix", "experiments/moe_calibration", "Output path prefix (.json, .md).")
_SIZES = flags.DEFINE_list("sizes", list(SIZES), "Calibration sizes to run; rows already in the JSON are kept.")
_DRAWS = flags.DEFINE_list("draws", ["0", "1", "2"], "Seeds of the calibration windows' draws, at each size.")
_WRITE_ONLY = flags.DEFINE_bool("write_only", False, "Only rewrite the .md from the .json.")


def balanced_clusters(vectors: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
  """Assignment of each row of `vectors` (n, d) to one of `k` equal-size clusters (spherical k-means, each
  assignment step filling clusters greedily by similarity)."""
  n = vectors.shape[0]
  size = n // k
  rng = np.random.default_rng(seed)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  centroids = unit[rng.choice(n, k, replace=False)]
  for _ in range(iterations):
    similarity = unit @ centroids.T
    order = np.argsort(-similarity, axis=None)
    assign = np.full(n, -1)
    counts = np.zeros(k, int)
    for flat in order:
      row, cluster = divmod(int(flat), k)
      if assign[row] < 0 and counts[cluster] < size:
        assign[row] = cluster
        counts[cluster] += 1
    centroids = np.stack([unit[assign == c].mean(0) for c in range(k)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
  return assign


def write_moefied(out: str) -> str:
  """The default model as a Mixtral with `EXPERTS` experts per layer (see the module docstring)."""
  import transformers
  from safetensors.numpy import save_file

  checkpoint = open_checkpoint("default")
  cfg = checkpoint.config
  tensors = {"model.embed_tokens.weight": checkpoint.embed_params()["embedding"],
             "model.norm.weight": checkpoint.head_params()["norm"]["scale"]}  # fmt: skip
  for i in range(cfg.num_hidden_layers):
    p = checkpoint.layer_params(i)
    prefix = f"model.layers.{i}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      tensors[f"{prefix}.self_attn.{name}.weight"] = np.ascontiguousarray(p["self_attn"][name]["kernel"].T)
    tensors[f"{prefix}.input_layernorm.weight"] = p["input_layernorm"]["scale"]
    tensors[f"{prefix}.post_attention_layernorm.weight"] = p["post_attention_layernorm"]["scale"]
    gate, up, down = (p["mlp"][m]["kernel"] for m in ("gate_proj", "up_proj", "down_proj"))
    # Router directions: centroids of the MLP's neurons clustered by their gate weights (regions of input space).
    assign = balanced_clusters(gate.T, EXPERTS, seed=i)
    router = np.stack([gate[:, assign == e].mean(axis=1) for e in range(EXPERTS)])
    tensors[f"{prefix}.block_sparse_moe.gate.weight"] = ROUTER_SCALE * router / np.linalg.norm(router, axis=1)[:, None]
    rng = np.random.default_rng(i)
    for e in range(EXPERTS):
      for name, w in (("w1", gate), ("w3", up), ("w2", down)):
        w = w * (1 + NOISE * rng.standard_normal(w.shape)).astype(np.float32)
        tensors[f"{prefix}.block_sparse_moe.experts.{e}.{name}.weight"] = np.ascontiguousarray(w.T)
  hf = cfg.to_hf_dict()
  config = transformers.MixtralConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
    num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
    rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
    num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, bos_token_id=hf["bos_token_id"],
    eos_token_id=hf["eos_token_id"],
  )  # fmt: skip
  config.save_pretrained(out)
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
            metadata={"format": "pt"})  # fmt: skip
  checkpoint.tokenizer().save_pretrained(out)
  return out


def routing(config, params, ids: np.ndarray) -> np.ndarray:
  """(layers, windows, tokens, k) experts the model routes each token to."""
  net = LlamaForCausalLM(config)
  routers = [f"model/layers_{i}/mlp/gate" for i in range(config.num_hidden_layers)]
  run = jax.jit(lambda p, x: capture_linear_inputs(lambda: net.apply({"params": p}, x), capture=routers)[2])
  out = run(params, jnp.asarray(ids))  # each router's logits over the flattened tokens (windows * tokens, E)
  return np.stack([np.asarray(jax.lax.top_k(out[r], TOP_K)[1]).reshape(*ids.shape, TOP_K) for r in routers])


def token_kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """KL(reference || model) per token, (windows, tokens)."""
  logp_ref = jax.nn.log_softmax(jnp.asarray(reference, jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return np.asarray(jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), axis=-1))


def per_expert_kl(kl: np.ndarray, routes: np.ndarray) -> np.ndarray:
  """(layers, experts) mean of `kl` (windows, tokens) over the tokens each layer routes to each expert (`routes`
  (layers, windows, tokens, k)); NaN for an expert no evaluation token reaches."""
  hits = (routes[..., None] == np.arange(EXPERTS)).any(axis=-2)  # (layers, windows, tokens, experts)
  counts = hits.sum(axis=(1, 2))
  with np.errstate(invalid="ignore"):
    return np.einsum("lwte,wt->le", hits, kl) / counts


def main(_):
  path = f"{_OUT.value}.json"
  results = {"sizes": {}}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  if _WRITE_ONLY.value:
    with open(f"{_OUT.value}.md", "w") as f:
      f.write(markdown(results))
    return
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = open_checkpoint(write_moefied(tmp))
    config, float_params = checkpoint.config, checkpoint.params()
    tokenizer = checkpoint.tokenizer()
    eval_ids = texts.eval_windows(texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 256,
                                  max_windows=_EVAL_WINDOWS.value)  # fmt: skip
    calib_tokens = texts.tokenize(tokenizer, texts.load_text("default", "calibration"))
    reference = np.asarray(logits_fn(config, float_params)(jnp.asarray(eval_ids)))
    nll = -np.take_along_axis(jax.nn.log_softmax(reference[:, :-1]), eval_ids[:, 1:, None], -1).mean()
    results["float perplexity"] = float(np.exp(nll))
    eval_routes = routing(config, float_params, eval_ids)  # (layers, windows, tokens, k)
    for size, draw in [(size, int(draw)) for size in _SIZES.value for draw in _DRAWS.value]:
      nsamples = SIZES[size]
      windows = texts.calibration_windows(calib_tokens, nsamples, SEQLEN, seed=draw)
      entry = results["sizes"].setdefault(f"{size}, draw {draw}", {"rows": {}})
      # The calibration's counts per expert (the float model's routing of the calibration windows): which experts
      # are rare, and which evaluation tokens reach one.
      calib_routes = routing(config, float_params, windows)
      tokens = np.stack([np.bincount(calib_routes[i].ravel(), minlength=EXPERTS) for i in range(len(calib_routes))])
      fair = nsamples * SEQLEN * TOP_K / EXPERTS
      rare = tokens < fair / 10  # (layers, experts)
      rare_tokens = rare[np.arange(len(rare))[:, None, None, None], eval_routes].any(axis=(0, 3))[:, :-1]
      entry.update({
        "calibration tokens per expert (min, median, max)": [int(tokens.min()), float(np.median(tokens)),
                                                             int(tokens.max())],
        "experts without tokens": int((tokens == 0).sum()),
        "experts under a tenth of their share": int(rare.sum()),
        "rare-expert evaluation tokens": float(rare_tokens.mean()),
        "calibration tokens": tokens.tolist(),
      })  # fmt: skip
      for label, policy in ROWS.items():
        if label in entry["rows"]:
          continue
        options = RunnerOptions(batch_size=2, show_progress=False, experts=policy or ExpertPolicy())
        start = time.perf_counter()
        rounding = rtn(SPEC) if policy is None else gptq(SPEC)
        recipe = [rules_transform([Rule(EXPERT_KERNELS, rounding, name="experts")])]
        qparams = quantize_model(LlamaBlocks(checkpoint), recipe, windows if policy else None, options=options)
        seconds = time.perf_counter() - start
        kl = token_kl(reference, np.asarray(logits_fn(config, qparams)(jnp.asarray(eval_ids))))[:, :-1]
        entry["rows"][label] = {
          "kl": float(kl.mean()),
          "kl_rare": float(kl[rare_tokens].mean()),
          "seconds": seconds,
          "kl_per_expert": np.round(per_expert_kl(kl, eval_routes[:, :, :-1]), 6).tolist(),
        }
        print(f"{size}, draw {draw}  {label:30s} KL {kl.mean():.5f}  rare {kl[rare_tokens].mean():.5f}  "
              f"({seconds:.0f}s)", flush=True)  # fmt: skip
        with open(path, "w") as f:  # after every row: a long run keeps what it measured
          json.dump(results, f, indent=1)
  with open(f"{_OUT.value}.md", "w") as f:
    f.write(markdown(results))
  print(markdown(results))


def markdown(results: dict) -> str:
  lines = [
    "# Under-sampled experts: what they should quantize with",
    "",
    "Written by `experiments/moe_calibration.py` (its docstring describes the model: the default model made a "
    f"Mixtral of {EXPERTS} experts, top-{TOP_K}). The experts alone in 4-bit g64; mean KL divergence from the float "
    "MoE on the evaluation text, over all tokens and over the tokens routed (in some layer) to an expert that "
    f"calibration fed under a tenth of its share. Float MoE perplexity: {results['float perplexity']:.2f}.",
    "",
    *summary(results),
  ]
  for size, entry in results["sizes"].items():
    mn, med, mx = entry["calibration tokens per expert (min, median, max)"]
    lines += [
      f"## Calibration: {size}",
      "",
      f"Tokens per expert: min {mn}, median {med:.0f}, max {mx}; {entry['experts without tokens']} experts saw none, "
      f"{entry['experts under a tenth of their share']} saw under a tenth of their share; "
      f"{100 * entry['rare-expert evaluation tokens']:.1f}% of evaluation tokens are rare-expert tokens.",
      "",
      "| policy | KL, all tokens | KL, rare-expert tokens | quantize s |",
      "|---|---:|---:|---:|",
    ]
    for label, row in entry["rows"].items():
      lines.append(f"| {label} | {row['kl']:.5f} | {row['kl_rare']:.5f} | {row['seconds']:.0f} |")
    best = min(entry["rows"], key=lambda r: entry["rows"][r]["kl"])
    best_rare = min(entry["rows"], key=lambda r: entry["rows"][r]["kl_rare"])
    lines += ["", f"Lowest KL over all tokens: {best}; over rare-expert tokens: {best_rare}.", ""]
    if all("kl_per_expert" in row for row in entry["rows"].values()):
      lines += per_expert_table(entry, fair=int(size.split(" x ")[0]) * SEQLEN * TOP_K / EXPERTS)
  return "\n".join(lines)


def summary(results: dict) -> list[str]:
  """Markdown lines: each policy's KL at each calibration size, averaged over the draws, and the choice of a
  default: the lowest mean excess of KL over all tokens over the best policy of the same draw, across every draw of
  every size (a policy must do well at both sizes; RTN everywhere is the baseline, not a candidate), among the
  policies at the routed calibration's cost: every token to every expert runs E/k times the experts' calibration
  work (4x here, 16x on Qwen3-30B-A3B), which the 2x-a-dense-model's-step budget cannot hold."""
  entries = {key: entry for key, entry in results["sizes"].items() if ", draw " in key}
  labels = [label for label in ROWS if all(label in e["rows"] for e in entries.values())]
  if not entries or not labels:
    return []
  sizes = sorted({key.split(", draw ")[0] for key in entries}, key=lambda size: SIZES[size])
  draws = {size: [e for key, e in entries.items() if key.startswith(f"{size}, draw ")] for size in sizes}

  def mean(size, label, value):
    return np.mean([value(e["rows"][label]) for e in draws[size]])

  def excess(e, label):
    return e["rows"][label]["kl"] / min(e["rows"][other]["kl"] for other in labels if other in POLICIES) - 1

  def experts_mean(row):
    return np.nanmean(np.asarray(row["kl_per_expert"], float))

  head = " | ".join(f"{size}: all tokens | rare-expert | per expert" for size in sizes)
  lines = [
    f"## Summary: {', '.join(f'{len(draws[size])} draws of {size}' for size in sizes)}",
    "",
    "Mean KL over the draws of each size (over all evaluation tokens, the rare-expert tokens, and the mean over "
    "experts of the KL of the tokens routed to each), and the mean excess of KL over all tokens over the best policy "
    "of the same draw, across every draw:",
    "",
    f"| policy | {head} | mean excess (± s.e.) |",
    "|---|" + "---:|" * (3 * len(sizes) + 1),
  ]
  excesses = {label: [excess(e, label) for e in entries.values()] for label in labels}
  scores = {label: np.mean(values) for label, values in excesses.items()}
  errors = {label: np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
            for label, values in excesses.items()}  # fmt: skip
  for label in labels:
    cells = [f"{mean(size, label, lambda r: r['kl']):.5f} | {mean(size, label, lambda r: r['kl_rare']):.5f} | "
             f"{mean(size, label, experts_mean):.5f}" for size in sizes]  # fmt: skip
    lines.append(f"| {label} | {' | '.join(cells)} | {100 * scores[label]:.1f}% ± {100 * errors[label]:.1f} |")
  best = min((label for label in labels if label in POLICIES), key=scores.get)
  routed = [label for label in labels if label in POLICIES and not POLICIES[label].all_experts]
  default = min(routed, key=scores.get)
  return [*lines, "", f"Lowest mean excess: {best}; lowest at the routed calibration's cost (the default): {default}.",
          ""]  # fmt: skip


def per_expert_table(entry: dict, fair: float) -> list[str]:
  """Markdown lines: per policy, the mean per-expert KL in each band of calibration feed, and experts won."""
  tokens = np.asarray(entry["calibration tokens"])
  bands = {
    "none": tokens == 0,
    "under a tenth": (tokens > 0) & (tokens < fair / 10),
    "under its share": (tokens >= fair / 10) & (tokens < fair),
    "at least its share": tokens >= fair,
  }
  labels = list(entry["rows"])
  kl = np.stack([np.asarray(entry["rows"][label]["kl_per_expert"], float) for label in labels])  # (rows, l, e)
  reached = ~np.isnan(kl).any(axis=0)
  won = np.bincount(np.argmin(np.where(reached, kl, 0), axis=0)[reached], minlength=len(labels))
  header = " | ".join(f"{name} ({int((band & reached).sum())})" for name, band in bands.items())
  lines = [
    "Per expert: mean KL of the evaluation tokens routed to it, averaged over the experts of each band of "
    "calibration tokens (how many experts, of those evaluation reaches, in brackets), and the experts for which a "
    "policy's KL is the lowest:",
    "",
    f"| policy | {header} | all experts | experts won |",
    "|---|" + "---:|" * (len(bands) + 2),
  ]
  for i, label in enumerate(labels):
    cells = [f"{np.mean(kl[i][band & reached]):.5f}" if (band & reached).any() else "-" for band in bands.values()]
    lines.append(f"| {label} | {' | '.join(cells)} | {np.mean(kl[i][reached]):.5f} | {won[i]} |")
  return [*lines, ""]


if __name__ == "__main__":
  app.run(main)
