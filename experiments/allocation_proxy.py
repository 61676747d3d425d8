"""How well the allocation's proxy (the Fisher-weighted rounding error) predicts the KL divergence measured end to end.

Reads a `qjax compare` directory holding llama.cpp file types with and without ``+alloc`` (their files and the
rules.json each allocated row wrote, whose ``predicted_kl_by_tensor`` is the proxy of every linear in every candidate
type), and reports:

1. per file: the proxy summed over the linears at the types the file holds, against the KL divergence measured in
   qjax's forward and in llama.cpp (rows made without an importance matrix or GPTQ, whose encodings the proxy
   models);
2. per tensor: one linear at a time rounded to Q4_0 (the rest float), the proxy against the KL measured in qjax's
   forward on the comparison's evaluation windows, with the rank correlation (the allocation only needs the order
   of the error removed per bit to be right).

Writes experiments/allocation.{md,json}.

  python experiments/allocation_proxy.py --compare_dir=/tmp/cmp_alloc --tensors=12
"""

import json
import os

import gguf
import numpy as np
from absl import app, flags

from qjax.core.tree import get_path, replace_path
from qjax.eval import evaluate
from qjax.eval.runtimes import StoredLogits
from qjax.eval.sensitivity import ggml_round_trip
from qjax.formats import open_checkpoint
from qjax.models import logits_fn

_DIR = flags.DEFINE_string("compare_dir", None, "A `qjax compare` directory with +alloc rows.", required=True)
_TENSORS = flags.DEFINE_integer("tensors", 12, "Linears rounded one at a time (spread over layers and kinds).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "allocation"), "Output path stem.")


def _file_types(path: str) -> dict[str, str]:
  """GGUF tensor name -> type name, for the block linears."""
  return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.")}


_GGUF = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
         "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
         "mlp/down_proj": "ffn_down"}  # fmt: skip


def _gguf_name(path: str) -> str:
  layer, module = path.removeprefix("model/layers_").split("/", 1)
  return f"blk.{layer}.{_GGUF[module.removesuffix('/kernel')]}.weight"


def _spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def main(argv):
  del argv
  d = _DIR.value
  summary = json.load(open(os.path.join(d, "compare.json")))
  rows = {r["recipe"]: r for r in summary["rows"]}
  alloc = next(r for r in rows.values() if r["recipe"].endswith("+alloc") and "imatrix" not in r["recipe"])
  rules = json.load(open(os.path.join(d, os.path.dirname(alloc["path"]), "rules.json")))
  proxy = rules["predicted_kl_by_tensor"]

  files = []
  for r in rows.values():
    if not r["format"].startswith("gguf:") or "imatrix" in r["recipe"] or r["recipe"].startswith("gptq@"):
      continue
    types = _file_types(os.path.join(d, r["path"]))
    predicted = sum(proxy[p][types[_gguf_name(p)]] for p in proxy)
    files.append(dict(recipe=r["recipe"], bpw=r["bpw"], predicted=predicted, qjax=r["runtimes"]["qjax"]["kl"],
                      llama_cpp=r["runtimes"].get("llama.cpp", {}).get("kl")))  # fmt: skip

  checkpoint = open_checkpoint(summary["settings"]["model"])
  params, config = checkpoint.params(), checkpoint.config
  from safetensors import safe_open

  with safe_open(os.path.join(d, "reference.safetensors"), "np") as f:
    windows = f.get_tensor("windows")
  reference = StoredLogits(os.path.join(d, "reference.safetensors"), windows)
  paths = sorted(proxy, key=lambda p: proxy[p]["Q4_0"])
  picks = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, _TENSORS.value)]
  tensors = []
  for path in picks:
    rounded = replace_path(params, path, np.asarray(ggml_round_trip(get_path(params, path), "Q4_0")))
    r = evaluate(logits_fn(config, rounded), windows, reference_fn=reference, show_progress=False)
    tensors.append(dict(path=path, predicted=proxy[path]["Q4_0"], measured=r.kl_divergence))
    print(f"{path}: proxy {proxy[path]['Q4_0']:.5f}, measured {r.kl_divergence:.5f}", flush=True)

  rho_files = _spearman([f["predicted"] for f in files], [f["qjax"] for f in files])
  rho_tensors = _spearman([t["predicted"] for t in tensors], [t["measured"] for t in tensors])
  ratio = [t["measured"] / t["predicted"] for t in tensors]
  lines = [
    f"**The allocation's proxy against measured KL divergence ({summary['settings']['model']}).**",
    "",
    f"Proxy: ½ Σ F ⊙ ΔW², F the Fisher's diagonal (tokens drawn from the model) on "
    f"{rules['proxy'].rpartition('on ')[2]}; "
    f"measured: mean KL divergence on {summary['eval_tokens']} tokens against the stored float logits. From "
    f"`python experiments/allocation_proxy.py --compare_dir={d}`.",
    "",
    "#### Whole files (the proxy summed over their linears)",
    "",
    "| recipe | bits/weight | proxy | KL in qjax | KL in llama.cpp |",
    "|---|---|---|---|---|",
    *(f"| {f['recipe']} | {f['bpw']:.2f} | {f['predicted']:.4f} | {f['qjax']:.4f} | {f['llama_cpp']:.4f} |"
      for f in files),
    "",
    f"Rank correlation of proxy and qjax KL over the files: {rho_files:.2f}.",
    "",
    f"#### One linear at a time, rounded to Q4_0 ({len(tensors)} linears spread over the proxy's range)",
    "",
    "| tensor | proxy | KL in qjax | ratio |",
    "|---|---|---|---|",
    *(f"| {t['path']} | {t['predicted']:.5f} | {t['measured']:.5f} | {t['measured'] / t['predicted']:.2f} |"
      for t in tensors),
    "",
    f"Rank correlation over the tensors: {rho_tensors:.2f}; measured/proxy ratio {min(ratio):.2f}-{max(ratio):.2f} "
    f"(median {np.median(ratio):.2f}).",
  ]  # fmt: skip
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(_OUT.value + ".json", "w") as f:
    json.dump(dict(files=files, tensors=tensors, rank_files=rho_files, rank_tensors=rho_tensors), f, indent=2)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
