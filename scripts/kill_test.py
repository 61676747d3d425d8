"""Kill -9 at random points of `qjax quantize` (a GPTQ run, and a GGUF export), then rerun: nothing partial, ever.

  .venv/bin/python scripts/kill_test.py --trials=20          # writes experiments/kill_test.md

Each trial starts a run on a small random model, kills it (SIGKILL) after a random delay, checks that --out is
either absent or complete (its marker, model files and report all present), reruns the same command to the end,
and checks that the model's tensors are byte-identical to an uninterrupted run's and that no temporary or
checkpoint directory is left behind. Half the trials export a GGUF recipe, with kills late in the run.
"""

import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TRIALS = flags.DEFINE_integer("trials", 20, "Kill trials (half GPTQ to a qjax directory, half GGUF exports).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
_OUT = flags.DEFINE_string("out", "experiments/kill_test.md", "Where to write the results.")

VARIANTS = {
  "gptq": ["--method=gptq", "--group_size=32"],
  "gguf": ["--method=none", "--export=gguf:Q4_K_M", "--imatrix"],
}


def command(model: str, out: str, variant: str) -> list[str]:
  return [sys.executable, "-c", "from qjax.cli import run; run()", "quantize", f"--model={model}", "--nsamples=8",
          "--seqlen=32", "--batch_size=4", "--eval_windows=0", f"--out={out}", *VARIANTS[variant]]  # fmt: skip


def tensors(out: str) -> dict[str, bytes]:
  import gguf
  from safetensors import safe_open

  found = {}
  for path in glob.glob(os.path.join(out, "*.safetensors")):
    with safe_open(path, "numpy") as f:
      found.update({k: f.get_tensor(k).tobytes() for k in f.keys()})
  for path in glob.glob(os.path.join(out, "*.gguf")):
    found.update({t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors})
  return found


def complete(out: str) -> bool:
  from qjax.formats.output import MARKER

  names = set(os.listdir(out))
  return {MARKER, "report.json"} <= names and bool(glob.glob(os.path.join(out, "*.safetensors")) + glob.glob(
    os.path.join(out, "*.gguf")))  # fmt: skip


def leftovers(parent: str) -> list[str]:
  return [e for e in os.listdir(parent) if e.startswith(".qjax-") or e.endswith(".checkpoint")]


def run_to_end(cmd: list[str]) -> float:
  start = time.perf_counter()
  result = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{result.stderr[-2000:]}")
  return time.perf_counter() - start


def main(argv):
  del argv
  from tests.model_factory import write_random_llama

  rng = random.Random(_SEED.value)
  root = tempfile.mkdtemp(prefix="qjax-kill-")
  model = write_random_llama(os.path.join(root, "model"), layers=4, hidden=256, intermediate=512, heads=4, kv_heads=2)
  reference, duration = {}, {}
  for variant in VARIANTS:
    out = os.path.join(root, f"reference-{variant}")
    duration[variant] = run_to_end(command(model, out, variant))
    reference[variant] = tensors(out)
  rows = []
  for trial in range(_TRIALS.value):
    variant = list(VARIANTS)[trial % 2]
    parent = os.path.join(root, f"trial-{trial}")
    os.makedirs(parent)
    out = os.path.join(parent, "out")
    early = 0.3 if variant == "gptq" else 0.6  # GGUF trials aim at the encoding and export at the end
    delay = rng.uniform(early, 1.1) * duration[variant]
    proc = subprocess.Popen(command(model, out, variant), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
      proc.kill()
    proc.wait()
    state = "absent" if not os.path.exists(out) else "complete" if complete(out) else "PARTIAL"
    left_after_kill = leftovers(parent)
    run_to_end(command(model, out, variant))
    identical = tensors(out) == reference[variant]
    left = leftovers(parent)
    rows.append((trial, variant, f"{delay:.1f}", killed, state, ", ".join(left_after_kill) or "-", identical,
                 ", ".join(left) or "-"))  # fmt: skip
    print(rows[-1], flush=True)
    shutil.rmtree(parent)
  shutil.rmtree(root)
  ok = all(r[4] != "PARTIAL" and r[6] and r[7] == "-" for r in rows)
  lines = [
    f"`scripts/kill_test.py --trials={_TRIALS.value} --seed={_SEED.value}`: SIGKILL after a random delay, then the "
    "same command rerun to the end. Reference runs took "
    + ", ".join(f"{v} {d:.0f} s" for v, d in duration.items())
    + ".",
    "",
    "| trial | run | kill after s | killed | --out after the kill | left beside it | rerun identical "
    "| left after rerun |",
    "|---|---|---|---|---|---|---|---|",
    *(f"| {' | '.join(map(str, r))} |" for r in rows),
    "",
    f"**{'Every' if ok else 'NOT every'} trial** left no partial --out, resumed to byte-identical tensors and left "
    "nothing behind.",
  ]
  with open(_OUT.value, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines[-1:]))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
