"""Exported files written one tensor at a time, so a model larger than memory is never held whole.

A model arrives in parts (the embedding, each decoder block, the head: `qjax.calib.quantize_parts`), but a
safetensors or GGUF file begins with a header that lists every tensor. `Spill` keeps each encoded tensor in a
scratch file beside the output as it comes; once the last part is in, the header is written and the tensors are
copied after it in order, a tensor at a time. Memory stays one tensor; the disk holds the output twice until the
scratch file is removed.

`as_parts` lets every writer take either a whole parameter tree or a stream of parts, and `skeleton` keeps the
shapes, dtypes and `QSpec`s of what went by (no data), for the config a format writes last.
"""

import json
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from qjax.models.checkpoint import WEIGHTS, WEIGHTS_INDEX

Params = Any

SAFETENSORS_DTYPES = {
  np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
  np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
  np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
  np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
  np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}  # fmt: skip
"""numpy dtype -> the safetensors header's dtype name."""


def as_parts(params: Params | Iterable[Params]) -> Iterator[Params]:
  """A parameter tree (a dict) as its one part, or the parts of a stream as they come."""
  return iter([params]) if isinstance(params, dict) else iter(params)


def skeleton(params: Params) -> Params:
  """`params` with every array replaced by a zero-stride view of its shape and dtype: `QArray`s keep their spec and
  shapes, ``.nbytes``/``.size`` answer as for the data, and the tree takes no memory."""
  return jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), params)


def merge(tree: dict, part: dict) -> dict:
  """`part` (full paths) merged into `tree` in place; returns `tree`."""
  for key, value in part.items():
    if isinstance(value, dict) and isinstance(tree.get(key), dict):
      merge(tree[key], value)
    else:
      tree[key] = value
  return tree


BLOCK_ELEMENTS = 1 << 24
"""Elements converted at a time by `Cast` (64 MB of float32)."""


class Cast(NamedTuple):
  """A dense tensor to be written as `dtype` (a matrix transposed when `transpose`), converted a row block at a time
  as it is written: the converted copy of an embedding-sized matrix (a GB or two) never exists whole."""

  name: str
  source: np.ndarray
  dtype: np.dtype
  transpose: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.source.shape[::-1] if self.transpose else self.source.shape)

  def blocks(self) -> Iterator[np.ndarray]:
    """The converted tensor's leading-axis blocks, in order.

    Raises:
      ValueError: naming the tensor when a value overflows `dtype`.
    """
    source = np.asarray(self.source)
    source = source.T if self.transpose else source
    if source.ndim == 0:
      source = source.reshape(1)
    step = max(1, BLOCK_ELEMENTS // max(1, source[:1].size))
    for start in range(0, len(source), step):
      block = np.array(source[start : start + step], dtype=self.dtype, order="C")
      if np.issubdtype(self.dtype, np.floating) and not np.isfinite(block).all():
        big = np.abs(np.asarray(source[start : start + step], np.float64)).max()
        raise ValueError(f"{self.name}: values beyond {np.dtype(self.dtype).name}'s range (max |x| = {big:.4g}).")
      yield block


class Entry(NamedTuple):
  """A tensor held in a `Spill` file."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int
  nbytes: int


class Spill:
  """Tensors appended to a scratch file as they come, read back one at a time in any order."""

  def __init__(self, path: str):
    self.path = path
    self.entries: dict[str, Entry] = {}
    self._file = open(path, "w+b")

  def add(self, name: str, array: np.ndarray | Cast) -> None:
    if name in self.entries:
      raise ValueError(f"tensor {name} written twice.")
    offset = self._file.seek(0, os.SEEK_END)
    if isinstance(array, Cast):
      blocks, shape, dtype = array.blocks(), array.shape, np.dtype(array.dtype)
    else:
      array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
      blocks, shape, dtype = [array], tuple(array.shape), array.dtype
    for block in blocks:
      self._file.write(block.reshape(-1).view(np.uint8).data)  # as bytes: memoryviews refuse float16 and ml_dtypes
    nbytes = self._file.tell() - offset
    self.entries[name] = Entry(name, shape, dtype, offset, nbytes)

  def read(self, name: str) -> np.ndarray:
    e = self.entries[name]
    self._file.seek(e.offset)
    return np.frombuffer(self._file.read(e.nbytes), e.dtype).reshape(e.shape)

  def copy_to(self, f, name: str, chunk: int = 64 << 20) -> None:
    """Copies a tensor's bytes to the open file `f` without holding more than `chunk` bytes."""
    e = self.entries[name]
    self._file.seek(e.offset)
    left = e.nbytes
    while left:
      data = self._file.read(min(chunk, left))
      f.write(data)
      left -= len(data)

  def close(self) -> None:
    self._file.close()
    os.remove(self.path)


def shard_names(entries: Iterable[Entry], max_shard_bytes: int) -> list[list[str]]:
  """Tensor names in name order (a module's tensors together), cut into shards of at most `max_shard_bytes` (a
  larger tensor gets one of its own)."""
  shards: list[list[str]] = [[]]
  size = 0
  for e in sorted(entries, key=lambda e: e.name):
    if shards[-1] and size + e.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e.name)
    size += e.nbytes
  return shards


def safetensors_header(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
  """The opening of a safetensors file whose tensors ``(name, dtype, shape)`` follow it back to back, in that order:
  the 8-byte length and the JSON header, padded so that the data starts 8-byte aligned (as safetensors writes it)."""
  header, offset = {"__metadata__": metadata}, 0
  for name, dtype, shape in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": SAFETENSORS_DTYPES[np.dtype(dtype)],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(path: str, spill: Spill, names: list[str], metadata: dict[str, str]) -> int:
  """Writes the tensors `names` of `spill` as one safetensors file, in that order; returns their bytes."""
  entries = [spill.entries[name] for name in names]
  with open(path, "wb") as f:
    f.write(safetensors_header(((e.name, e.dtype, e.shape) for e in entries), metadata))
    for name in names:
      spill.copy_to(f, name)
  return sum(e.nbytes for e in entries)


class SafetensorsWriter:
  """A Hugging Face directory's weights, a tensor at a time: ``model.safetensors``, or shards
  ``model-0000i-of-0000n.safetensors`` of at most `max_shard_bytes` with ``model.safetensors.index.json``.

  Args:
    directory: an existing directory.
    max_shard_bytes: largest file before sharding.
    metadata: the files' ``__metadata__`` (``{"format": "pt"}`` for transformers).
  """

  def __init__(self, directory: str, *, max_shard_bytes: int, metadata: dict[str, str]):
    self.directory = directory
    self.max_shard_bytes = max_shard_bytes
    self.metadata = metadata
    self.spill = Spill(os.path.join(directory, ".tensors.spill"))

  def add(self, name: str, array: np.ndarray) -> None:
    self.spill.add(name, array)

  def names(self) -> list[str]:
    return list(self.spill.entries)

  def read(self, name: str) -> np.ndarray:
    return self.spill.read(name)

  def close(self) -> None:
    """Writes the files and removes the scratch file."""
    try:
      shards = shard_names(self.spill.entries.values(), self.max_shard_bytes)
      if len(shards) == 1:
        write_safetensors(os.path.join(self.directory, WEIGHTS), self.spill, shards[0], self.metadata)
        return
      weight_map, total = {}, 0
      for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(self.directory, file), self.spill, names, self.metadata)
        weight_map.update(dict.fromkeys(names, file))
      with open(os.path.join(self.directory, WEIGHTS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    finally:
      self.spill.close()
