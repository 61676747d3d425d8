"""Encode throughput of qjax's ggml block quantizers against llama.cpp's `ggml_quantize_chunk` on this CPU.

For each type: MB of float32 weights encoded per second by the jitted `qjax.quantizers.kquants.encode` (after
warm-up, `block_until_ready`, median of runs) and by one `ggml_quantize_chunk` call over all rows (single-threaded C,
llama-cpp-python's `libggml-base`), on the same matrix; the bytes are checked equal before timing.

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
from qjax.quantizers import kquants

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import ggml_oracle  # noqa: E402  (the ctypes wrapper the tests use)

_TYPES = flags.DEFINE_list("types", list(ggml.BLOCK_TYPES), "ggml types to time.")
_ROWS = flags.DEFINE_integer("rows", 576, "Rows (output channels).")
_COLS = flags.DEFINE_integer("cols", 1536, "Row length (a multiple of 256).")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per measurement (median reported).")
_IMATRIX = flags.DEFINE_bool("imatrix", False, "Also time the importance-matrix paths.")
_JSON = flags.DEFINE_string("json_out", None, "Append one JSON row per case to this file.")


def _median_seconds(fn, runs: int) -> float:
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((_ROWS.value, _COLS.value)).astype(np.float32)
  imatrix = (rng.standard_normal((64, _COLS.value)) ** 2).mean(axis=0).astype(np.float32)
  megabytes = rows.nbytes / 1e6
  cases = [{"type_name": t, "imatrix": False} for t in _TYPES.value]
  if _IMATRIX.value:
    cases += [{"type_name": t, "imatrix": True} for t in _TYPES.value if t != "Q8_0"]
  device = jax.devices()[0].device_kind
  print(f"{_ROWS.value}x{_COLS.value} float32 ({megabytes:.2f} MB), device {device}, jax {jax.__version__}")
  print(f"{'type':<6} {'imatrix':<8} {'compile s':>9} {'qjax MB/s':>10} {'llama.cpp MB/s':>15} {'ratio':>6}")
  for case in cases:
    qw = imatrix if case["imatrix"] else None
    start = time.perf_counter()
    ours = jax.block_until_ready(kquants.encode(rows, case["type_name"], qw))
    compile_s = time.perf_counter() - start
    if not np.array_equal(np.asarray(ours), ggml_oracle.quantize(rows, case["type_name"], qw)):
      raise AssertionError(f"{case}: qjax bytes differ from llama.cpp's")
    qjax_s = _median_seconds(lambda: jax.block_until_ready(kquants.encode(rows, case["type_name"], qw)), _RUNS.value)
    ggml_s = _median_seconds(lambda: ggml_oracle.quantize(rows, case["type_name"], qw), _RUNS.value)
    row = {
      **case,
      "shape": list(rows.shape),
      "compile_s": compile_s,
      "qjax_mb_s": megabytes / qjax_s,
      "llama_cpp_mb_s": megabytes / ggml_s,
      "ratio": ggml_s / qjax_s,
      "device_kind": device,
      "jax": jax.__version__,
      "commit": _git_commit(),
    }
    print(
      f"{case['type_name']:<6} {'yes' if case['imatrix'] else 'no':<8} {compile_s:>9.1f} {row['qjax_mb_s']:>10.2f} "
      f"{row['llama_cpp_mb_s']:>15.2f} {row['ratio']:>6.2f}"
    )
    if _JSON.value:
      with open(_JSON.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
