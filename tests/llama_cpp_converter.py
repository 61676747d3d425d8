"""llama.cpp's `convert_hf_to_gguf.py`, the oracle for the GGUF files qjax writes from a Hugging Face model.

It ships only in llama-cpp-python's source distribution; `scripts/env.sh` unpacks the converter of the installed
version (with its `conversion` modules and its own `gguf-py`) into ``<venv>/llama.cpp-<version>``.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest


def converter() -> str:
  """The path of the installed llama-cpp-python's converter; skips the test when it was not unpacked."""
  version = importlib.metadata.version("llama-cpp-python")
  path = os.path.join(sys.prefix, f"llama.cpp-{version}", "convert_hf_to_gguf.py")
  if not os.path.exists(path):
    pytest.skip(f"{path} is missing; scripts/env.sh unpacks llama.cpp's converter beside the environment.")
  return path


def convert(model_dir: str, out: str, outtype: str = "f32") -> str:
  """Converts the Hugging Face directory `model_dir` to the GGUF file `out` with llama.cpp's converter."""
  script = converter()
  env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(script), "gguf-py")}
  done = subprocess.run([sys.executable, script, model_dir, "--outfile", out, "--outtype", outtype], env=env,
                        capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  return out
