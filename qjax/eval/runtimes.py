"""Logits from the runtimes a user runs each format in: llama.cpp for GGUF files, transformers (PyTorch) for GPTQ,
AWQ and compressed-tensors directories, and float logits stored once on disk to score every candidate against.

Each runtime is optional (`missing` says what to install); each opens a model as a context manager yielding a
`LogitsFn` over the same ``(b, t)`` token windows qjax's own forward takes, so `qjax.eval.evaluate` scores all of
them with the same code.
"""

import contextlib
import importlib.util
import io
import os
import warnings
from collections.abc import Iterator

import numpy as np
from jaxtyping import Array, Float, Int

from qjax.eval.metrics import LogitsFn

LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"

# What each runtime needs installed to read a format; transformers reads GPTQ and AWQ through gptqmodel's kernels.
_PACKAGES = {
  (LLAMA_CPP, "gguf"): ("llama_cpp",),
  (TRANSFORMERS, "gptq"): ("torch", "gptqmodel"),
  (TRANSFORMERS, "gptq_v2"): ("torch", "gptqmodel"),
  (TRANSFORMERS, "awq"): ("torch", "gptqmodel"),
  (TRANSFORMERS, "compressed-tensors"): ("torch", "compressed_tensors"),
}


def runtime_for(kind: str) -> str | None:
  """The runtime a user runs an export of `kind` in (None for a qjax directory: qjax's forward is its runtime)."""
  return next((runtime for runtime, k in _PACKAGES if k == kind), None)


def missing(runtime: str, kind: str) -> str | None:
  """Why `runtime` cannot read an export of `kind` here (the packages to install), or None if it can."""
  absent = [p for p in _PACKAGES[runtime, kind] if importlib.util.find_spec(p) is None]
  return f"needs {', '.join(absent)}" if absent else None


@contextlib.contextmanager
def llama_cpp_logits(path: str, seqlen: int) -> Iterator[LogitsFn]:
  """llama.cpp's logits of every position of each window (a fresh context per window), for a GGUF file."""
  import llama_cpp

  llm = llama_cpp.Llama(model_path=path, n_ctx=seqlen, n_batch=seqlen, n_threads=os.cpu_count(), logits_all=True,
                        verbose=False)  # fmt: skip

  def logits(ids: Int[Array, "b t"]) -> Float[np.ndarray, "b t v"]:
    out = []
    for window in np.asarray(ids):
      llm.reset()
      llm.eval(window.tolist())
      out.append(np.array(llm.scores[: len(window)], np.float32))  # a copy: `scores` is llama.cpp's reused buffer
    return np.stack(out)

  try:
    yield logits
  finally:
    llm.close()


@contextlib.contextmanager
def transformers_logits(path: str) -> Iterator[LogitsFn]:
  """transformers' logits (PyTorch on the CPU, float32 activations) for a Hugging Face directory it can load."""
  import torch
  from transformers import AutoModelForCausalLM

  # Loading prints banners, progress bars and deprecation notices of the loaders' own; none is for a qjax user.
  quiet = io.StringIO()
  with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
    warnings.simplefilter("ignore")
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
  model.eval()

  def logits(ids: Int[Array, "b t"]) -> Float[np.ndarray, "b t v"]:
    with torch.no_grad():
      return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()

  yield logits


class StoredLogits:
  """A reference model's logits of fixed windows, stored in a safetensors file and read back one window at a time.

  Called with windows it has (in any order or batching), it returns their logits, so it stands in for the model's
  `LogitsFn` in `qjax.eval.evaluate` without rerunning the model.
  """

  def __init__(self, path: str, windows: Int[np.ndarray, "n t"]):
    from safetensors import safe_open

    self.path = path
    self._file = safe_open(path, "np")
    self._index = {np.asarray(w, np.int64).tobytes(): i for i, w in enumerate(windows)}
    stored = self._file.get_slice("logits").get_shape()
    if stored[:2] != list(windows.shape) or not np.array_equal(self._file.get_tensor("windows"), windows):
      raise ValueError(f"{path}: stored for other windows than these {windows.shape[0]} of {windows.shape[1]} "
                       "tokens; remove it to compute the reference again.")  # fmt: skip

  def __call__(self, ids: Int[Array, "b t"]) -> Float[np.ndarray, "b t v"]:
    rows = [self._index[np.asarray(w, np.int64).tobytes()] for w in np.asarray(ids)]
    logits = self._file.get_slice("logits")
    return np.stack([logits[i] for i in rows])

  @staticmethod
  def write(path: str, logits_fn: LogitsFn, windows: Int[np.ndarray, "n t"], metadata: dict[str, str]) -> None:
    """Runs `logits_fn` window by window and writes the float32 logits ``(n, t, vocab)`` to `path`."""
    from safetensors.numpy import save_file

    logits = np.stack([np.asarray(logits_fn(windows[i : i + 1]), np.float32)[0] for i in range(len(windows))])
    save_file({"logits": logits, "windows": np.asarray(windows, np.int64)}, path, metadata=metadata)
