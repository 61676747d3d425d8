"""Runs the reader fuzzers (`tests/fuzz`) with many cases and prints the cases tried and the defects found.

Every fuzzer runs its share of `--cases` in one pytest process with ``QJAX_FUZZ_COLLECT=1``, so a defect is recorded
and fuzzing goes on; a defect is an input that made a reader raise anything but a one-line `InputError` (or
`FileNotFoundError`) naming its file, take longer than `--case_seconds`, open a file outside the case directory, or
load a model its config does not describe. Exits 1 if any defect was found.

  .venv/bin/python scripts/fuzz.py --cases=100000          # all readers; about 1 ms to 40 ms a case on one core
  .venv/bin/python scripts/fuzz.py --cases=5000 --only=gguf
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]

_CASES = flags.DEFINE_integer("cases", 100_000, "Cases over all fuzzers together (split by each fuzzer's share).")
_CASE_SECONDS = flags.DEFINE_float("case_seconds", 10.0, "Time bound of one case; a case over it is a defect.")
_ONLY = flags.DEFINE_string("only", None, "A pytest -k expression selecting fuzzers, e.g. 'gguf or index'.")
_STATS = flags.DEFINE_string("stats_out", None, "Also write the counts and defects as JSON to this file.")


def report(stats: dict, seconds: float) -> int:
  """Prints cases, models loaded and defects per fuzzer; returns the number of defects."""
  cases, defects, outcomes = stats["cases"], stats["defects"], stats.get("outcomes", {})
  print(f"\n{'fuzzer':<20}{'cases':>9}{'loaded':>9}{'refused':>9}{'defects':>9}")
  for fuzzer, n in sorted(cases.items()):
    loaded = outcomes.get(fuzzer, {}).get("loaded", 0)
    found = len(defects.get(fuzzer, {}))
    print(f"{fuzzer:<20}{n:>9}{loaded:>9}{sum(outcomes.get(fuzzer, {}).values()) - loaded:>9}{found:>9}")
  total = sum(len(d) for d in defects.values())
  print(f"{'total':<20}{sum(cases.values()):>9}{'':>18}{total:>9}   ({seconds:.0f} s)")
  for fuzzer, found in sorted(defects.items()):
    for defect, example in found.items():
      print(f"\n[{fuzzer}] {defect}\n  e.g. {example[:400]}")
  return total


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    stats_file = os.path.join(tmp, "stats.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QJAX_FUZZ_EXAMPLES": str(_CASES.value), "QJAX_FUZZ_COLLECT": "1",
           "QJAX_FUZZ_STATS": stats_file, "QJAX_FUZZ_CASE_SECONDS": str(_CASE_SECONDS.value)}  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz"]
    if _ONLY.value:
      command += ["-k", _ONLY.value]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, check=False)
    if not os.path.exists(stats_file):
      print(f"the fuzzers wrote no statistics (pytest exited {done.returncode}; a hang ends the process).")
      return 1
    with open(stats_file) as f:
      stats = json.load(f)
  if _STATS.value:
    with open(_STATS.value, "w") as f:
      json.dump(stats, f, indent=1)
  defects = report(stats, time.perf_counter() - start)
  return 1 if defects or done.returncode else 0


if __name__ == "__main__":
  app.run(main)
