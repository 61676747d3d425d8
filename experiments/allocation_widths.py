"""Bit widths allocated per linear for GPU formats, against one width at the same bits per weight.

Every row is a compressed-tensors directory scored in qjax's forward and in transformers by `qjax compare`. At
each size the uniform row is --bits in groups of 32, and the allocated rows spend the same bits per weight in groups
of 64, each linear at 3, 4 or 8 bits (q/k/v and gate/up at one width) as `qjax quantize --target_bpw` chooses; once
with RTN and once with GPTQ doing the rounding, the allocation predicted for that rounding. A last pair shows what
the default leaves out: 2-bit linears allowed, at the size of 3-bit groups of 64; and the allocations again with
group sizes to choose from too (--allocation_group_sizes=32,128: every width in groups of 32, 64 or 128 where they
divide a linear's inputs), which makes the uniform rows one of the allocation's options.

Writes experiments/allocation_widths.{md,json}; each comparison is kept in --work_dir and resumed there.

  python experiments/allocation_widths.py --work_dir=/tmp/alloc_widths
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from qjax.core import QSpec
from qjax.eval.sensitivity import affine_bits_per_weight
from qjax.formats import open_checkpoint

_WORK = flags.DEFINE_string("work_dir", "runs/allocation-widths", "Where the comparisons are written.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "allocation_widths"), "Output path stem.")

# name -> (flags of `qjax compare`, which rows); the uniform and allocated rows of one size share its bits per weight.
RUNS = {
  "uniform-3": ("--bits=3 --group_size=32", "uniform 3-bit g32"),
  "alloc-3.5": ("--bits=3 --group_size=64", "allocated to 3.5"),
  "uniform-4": ("--bits=4 --group_size=32", "uniform 4-bit g32"),
  "alloc-4.5": ("--bits=4 --group_size=64", "allocated to 4.5"),
  "uniform-3g64": ("--bits=3 --group_size=64", "uniform 3-bit g64"),
  "alloc-3.25-2bit": ("--bits=3 --group_size=64 --allocation_bits=2,3,4,8", "allocated to 3.25, 2-bit allowed"),
  "alloc-3.5-groups": ("--bits=3 --group_size=64 --allocation_group_sizes=32,128", "allocated to 3.5, group sizes too"),
  "alloc-4.5-groups": ("--bits=4 --group_size=64 --allocation_group_sizes=32,128", "allocated to 4.5, group sizes too"),
}
RECIPES = {
  "uniform-3": "gptq@compressed-tensors,rtn@compressed-tensors",
  "alloc-3.5": "gptq@compressed-tensors+3.5bpw,rtn@compressed-tensors+3.5bpw",
  "uniform-4": "gptq@compressed-tensors,rtn@compressed-tensors",
  "alloc-4.5": "gptq@compressed-tensors+4.5bpw,rtn@compressed-tensors+4.5bpw",
  "uniform-3g64": "gptq@compressed-tensors,rtn@compressed-tensors",
  "alloc-3.25-2bit": "gptq@compressed-tensors+alloc,rtn@compressed-tensors+alloc",
  "alloc-3.5-groups": "gptq@compressed-tensors+3.5bpw,rtn@compressed-tensors+3.5bpw",
  "alloc-4.5-groups": "gptq@compressed-tensors+4.5bpw,rtn@compressed-tensors+4.5bpw",
}


def _linears_bpw(work: str, row: dict, flags: str) -> float:
  """The decoder linears' bits per weight: what an allocated row's rules.json records, or a uniform row's grid's."""
  path = os.path.join(work, row["path"], "rules.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["bits_per_weight"]
  given = dict(flag.removeprefix("--").split("=") for flag in flags.split())
  spec = QSpec(bits=int(given["bits"]), group_size=int(given["group_size"]))
  return affine_bits_per_weight(spec, open_checkpoint("default").config)


def main(argv):
  del argv
  qjax = os.path.join(os.path.dirname(sys.executable), "qjax")
  table = []
  for name, (extra, what) in RUNS.items():
    work = os.path.join(_WORK.value, name)
    command = [qjax, "compare", f"--recipes={RECIPES[name]}", f"--out={work}", *extra.split()]
    print(" ".join(command[1:]), flush=True)
    result_path = os.path.join(work, "compare.json")
    done = json.load(open(result_path)).get("rows", []) if os.path.exists(result_path) else []
    if {r["recipe"] for r in done} != set(RECIPES[name].split(",")):  # a finished comparison is read, not rerun
      subprocess.run(command, check=True)
    with open(result_path) as f:
      result = json.load(f)
    for row in result["rows"]:
      method = row["recipe"].partition("@")[0]
      table.append(dict(run=name, rows=what, method=method, label=row["label"],
                        linears_bpw=_linears_bpw(work, row, extra), size_mb=row["size_mb"],
                        kl_qjax=row["runtimes"]["qjax"]["kl"],
                        kl_transformers=row["runtimes"].get("transformers", {}).get("kl"),
                        command="qjax " + " ".join(command[1:]).replace(_WORK.value, "DIR")))  # fmt: skip
  lines = [
    "**Bit widths allocated per linear (compressed-tensors, default model), against one width at the same size.**",
    "",
    "Mean KL divergence from the float model on 4088 tokens, in qjax's forward and in transformers; linears "
    "bits/weight counts the codes and fp16 scales of the decoder linears. "
    "From `python experiments/allocation_widths.py`.",
    "",
    "| rows | method | recipe | linears bits/weight | size MB | KL qjax | KL transformers |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sorted(table, key=lambda r: (r["method"], list(RUNS).index(r["run"]))):
    kl_t = "" if r["kl_transformers"] is None else f"{r['kl_transformers']:.4f}"
    lines.append(f"| {r['rows']} | {r['method']} | {r['label']} | {r['linears_bpw']:.3f} | "
                 f"{r['size_mb']:.1f} | {r['kl_qjax']:.4f} | {kl_t} |")  # fmt: skip
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(_OUT.value + ".json", "w") as f:
    json.dump(table, f, indent=2)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
