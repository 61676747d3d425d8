"""Encode throughput of qjax's ggml block quantizers against llama.cpp's `ggml_quantize_chunk` on this CPU.

For each type: MB of float32 weights encoded per second by the jitted `qjax.core.ggml_kquants.encode` and by one
`ggml_quantize_chunk` call over all rows (single-threaded C from llama-cpp-python's `libggml-base`), on the same
matrix. The bytes are checked equal first; then, after warm-up, the two are timed in alternation (so that load from
other processes hits both alike) and the medians reported, by wall clock (`block_until_ready`) and by the CPU time
of this process (steadier on a shared machine; it counts every thread XLA uses).

  .venv/bin/python scripts/bench_gguf.py --types=Q4_K,Q6_K --imatrix
"""

import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from qjax.core import ggml
from qjax.core import ggml_kquants as kquants

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests import ggml_oracle  # the ctypes wrapper the tests use

_TYPES = flags.DEFINE_list("types", list(ggml.BLOCK_TYPES), "ggml types to time.")
_ROWS = flags.DEFINE_integer("rows", 576, "Rows (output channels).")
_COLS = flags.DEFINE_integer("cols", 1536, "Row length (a multiple of 256).")
_RUNS = flags.DEFINE_integer("runs", 7, "Timed runs of each contender (medians reported).")
_IMATRIX = flags.DEFINE_bool("imatrix", True, "Also time the importance-matrix paths.")
_JSON = flags.DEFINE_string("json_out", None, "Append one JSON row per case to this file.")


def _timed(fn) -> tuple[float, float]:
  """(wall, process CPU) seconds of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def _alternate(fns, runs: int) -> list[tuple[float, float]]:
  """Median (wall, CPU) seconds of each function, timed in turn `runs` times."""
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, t in zip(fns, times, strict=True):
      t.append(_timed(fn))
  return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  if ggml_oracle.library() is None:
    sys.exit("llama-cpp-python's libggml-base is not installed: nothing to compare with")
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((_ROWS.value, _COLS.value)).astype(np.float32)
  imatrix = (rng.standard_normal((64, _COLS.value)) ** 2).mean(axis=0).astype(np.float32)
  megabytes = rows.nbytes / 1e6
  cases = [(t, False) for t in _TYPES.value]
  if _IMATRIX.value:
    cases += [(t, True) for t in _TYPES.value if t != "Q8_0"]  # Q8_0 has no importance-weighted path
  device = jax.devices()[0].device_kind
  print(f"{_ROWS.value}x{_COLS.value} float32 ({megabytes:.2f} MB), {device}, jax {jax.__version__}")
  columns = f"{'qjax':>8} {'llama.cpp':>10} {'ratio':>6}"
  print(f"{'':15}{'-------- wall MB/s --------':>26}   {'--------- CPU MB/s --------':>26}")
  print(f"{'type':<6} {'imatrix':<8} {columns}   {columns}")
  for type_name, weighted in cases:
    qw = imatrix if weighted else None

    def ours(type_name=type_name, qw=qw):
      return jax.block_until_ready(kquants.encode(rows, type_name, qw))

    def reference(type_name=type_name, qw=qw):
      return ggml_oracle.quantize(rows, type_name, qw)

    start = time.perf_counter()
    if not np.array_equal(np.asarray(ours()), reference()):
      raise AssertionError(f"{type_name} (imatrix={weighted}): qjax bytes differ from llama.cpp's")
    compile_s = time.perf_counter() - start
    (ours_wall, ours_cpu), (ref_wall, ref_cpu) = _alternate([ours, reference], _RUNS.value)
    row = {
      "type_name": type_name,
      "imatrix": weighted,
      "shape": list(rows.shape),
      "compile_s": compile_s,
      "qjax_mb_s": megabytes / ours_wall,
      "llama_cpp_mb_s": megabytes / ref_wall,
      "ratio": ref_wall / ours_wall,
      "qjax_cpu_mb_s": megabytes / ours_cpu,
      "llama_cpp_cpu_mb_s": megabytes / ref_cpu,
      "cpu_ratio": ref_cpu / ours_cpu,
      "device_kind": device,
      "jax": jax.__version__,
      "commit": _git_commit(),
    }
    print(
      f"{type_name:<6} {'yes' if weighted else 'no':<8} {row['qjax_mb_s']:>8.1f} {row['llama_cpp_mb_s']:>10.1f} "
      f"{row['ratio']:>6.2f}   {row['qjax_cpu_mb_s']:>8.1f} {row['llama_cpp_cpu_mb_s']:>10.1f} {row['cpu_ratio']:>6.2f}"
    )
    if _JSON.value:
      with open(_JSON.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
