"""Conversion between formats: quantized params (from GPTQ, AWQ, compressed-tensors or qjax directories) to GGUF,
GPTQ, AWQ or compressed-tensors.

Between the Hugging Face formats the grids are the same affine grid, so codes, scales and zero points are copied
(`to_hf`), except act-order groups (a GPTQ ``g_idx``), which AWQ and compressed-tensors cannot hold: those tensors
are re-rounded onto input-order groups of the same grid, and the added error is reported.

GGUF's 32-element block types hold an affine group exactly when the grids agree: a block of 32 inputs
inside one group has a single fp16 scale and zero point, and

* ``Q4_1``/``Q5_1`` store ``value = q * d + m``: codes of up to 4/5 bits are copied, ``d = scale`` and
  ``m = -zero * scale`` rounded to fp16 (the only change, one rounding per block);
* ``Q4_0``/``Q5_0``/``Q8_0`` store ``(q' - Z) * d`` with a fixed Z (8, 16, 0 with signed codes): codes
  are copied as ``q' = q - zero + Z`` when that fits the code range (a symmetric 4-bit group is a
  ``Q4_0`` block bit for bit; any group of up to 7 bits fits ``Q8_0``).

Everything else is requantized from the dequantized weights with llama.cpp's own encoders
(`qjax.quantizers.kquants`): the k-quants (their sub-block scales are 6-bit multiples of a super-scale),
grids that do not fit, and act-order groups, which are not contiguous runs of inputs. Each tensor's added
error against the source's dequantized weights is reported.

``gguf:<TYPE>`` means what it means everywhere in qjax: a llama.cpp file type, whose recipe gives each
quantized tensor its ggml type (with llama.cpp's fallback for rows that are not whole 256-blocks). Tensors the
source keeps dense stay dense (a conversion adds no rounding the source did not have): 2-D ones as F16 (GPTQ
and AWQ store them so), norms as F32.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import QArray, QSpec, is_qarray
from qjax.core.ggml_legacy import fifth_bits, fp16_bytes, nibbles_by_halves, to_blocks, to_rows
from qjax.core.qarray import dequantize, dequantize_canonical, quantize
from qjax.core.tree import map_with_path
from qjax.formats import gguf, gptq
from qjax.formats.gguf import FLOAT_TYPES
from qjax.formats.loading import load_model
from qjax.formats.output import check_file_output, check_output
from qjax.formats.targets import Target, export
from qjax.models.config import LlamaConfig
from qjax.quantizers.kquants import kquant_quantize
from qjax.transforms.gguf_recipes import fallback, tensor_types

# ggml type -> (code bits, fixed zero or None for a stored minimum)
LEGACY_GRIDS = {"Q4_0": (4, 8), "Q4_1": (4, None), "Q5_0": (5, 16), "Q5_1": (5, None), "Q8_0": (8, 0)}

_dequantize_canonical = jax.jit(dequantize_canonical)  # once per shape, not op by op for every tensor


class TensorConversion(NamedTuple):
  """How one quantized tensor was converted.

  Attributes:
    path: the Flax parameter path.
    source: the source grid, e.g. ``"4-bit g32 asym"``.
    type_name: the ggml type written, or the Hugging Face format.
    exact: True when codes and scales were copied (only the fp16 rounding of a minimum changes values).
    rel_rmse: ``‖ŵ - w‖ / ‖w‖`` against the source's dequantized weights ``w``.
    max_abs: ``max |ŵ - w|``.
  """

  path: str
  source: str
  type_name: str
  exact: bool
  rel_rmse: float
  max_abs: float


def describe(q: QArray) -> str:
  """A short name of a QArray's grid, e.g. ``"4-bit g32 asym act-order"`` or ``"Q4_K"``."""
  if q.spec.is_ggml:
    return q.spec.layout
  text = f"{q.spec.bits}-bit g{q.spec.group_size} {'sym' if q.spec.symmetric else 'asym'}"
  return text + (" act-order" if q.perm is not None else "")


def _block_params(q: QArray, nb: int) -> tuple[np.ndarray, np.ndarray]:
  """(nb, n) float32 scale and int32 zero of each 32-block along ``k`` (blocks lie inside groups)."""
  k = q.canonical_shape[0]
  group = np.arange(nb) * 32 // q.spec.group_length(k)
  scale = np.asarray(q.scale, np.float32)[group]
  zero = np.full_like(scale, 1 << (q.spec.bits - 1), np.int32) if q.zero is None else np.asarray(q.zero)[group]
  return scale, zero


def exact_blocks(q: QArray, type_name: str) -> np.ndarray | None:
  """The ggml block rows of `type_name` that hold `q`'s codes and scales, or None when the grids differ.

  Args:
    q: a ``packed`` QArray, canonical (k, n).
    type_name: a ggml type; only the 32-element types of `LEGACY_GRIDS` can hold affine groups.

  Returns:
    (n, k / 32 * type_size) uint8, one row of blocks per output channel (as `QArray.codes` of a ggml
    layout), or None: act-order groups, groups that are not whole 32-blocks, too many code bits, or codes
    that leave a fixed-zero type's range.
  """
  q = gptq.canonical_act_order(q)
  k, n = q.canonical_shape
  if type_name not in LEGACY_GRIDS or q.perm is not None or k % 32 or q.spec.group_length(k) % 32:
    return None
  bits, fixed = LEGACY_GRIDS[type_name]
  scale, zero = _block_params(q, k // 32)
  codes = gptq.codes_of(q).astype(np.int32)
  if fixed is None:
    if q.spec.bits > bits:
      return None
    levels, minimum = codes, -zero.astype(np.float32) * scale  # exact: an integer below 2**8 times an fp16
  else:
    levels = codes - np.repeat(zero, 32, axis=0) + fixed
    lo, hi = (-128, 127) if type_name == "Q8_0" else (0, (1 << bits) - 1)
    if levels.min() < lo or levels.max() > hi:
      return None
  x = to_blocks(jnp.asarray(levels.T), 32)  # (32, n * nb), blocks of row j then of row j + 1
  d = jnp.asarray(scale.T.reshape(-1))
  fields = {
    "Q4_0": lambda: [fp16_bytes(d), nibbles_by_halves(x)],
    "Q5_0": lambda: [fp16_bytes(d), fifth_bits(x), nibbles_by_halves(x)],
    "Q8_0": lambda: [fp16_bytes(d), x],
    "Q4_1": lambda: [fp16_bytes(d), fp16_bytes(jnp.asarray(minimum.T.reshape(-1))), nibbles_by_halves(x)],
    "Q5_1": lambda: [fp16_bytes(d), fp16_bytes(jnp.asarray(minimum.T.reshape(-1))), fifth_bits(x),
                     nibbles_by_halves(x)],
  }  # fmt: skip
  return np.asarray(to_rows(fields[type_name](), n))


def _error(path: str, q: QArray, converted, type_name: str, exact: bool) -> TensorConversion:
  w = np.asarray(_dequantize_canonical(q), np.float64)
  got = converted if not is_qarray(converted) else _dequantize_canonical(converted)
  diff = np.asarray(got, np.float64) - w
  rel = float(np.linalg.norm(diff) / max(np.linalg.norm(w), np.finfo(np.float64).tiny))
  return TensorConversion(path, describe(q), type_name, exact, rel, float(np.abs(diff).max()))


def to_ggml(q: QArray, type_name: str, *, path: str = "weight") -> tuple[QArray, TensorConversion]:
  """One quantized tensor as a ggml-layout `QArray`: copied where the grids agree, else requantized.

  Args:
    q: a QArray (``packed``, or already a ggml layout, which is kept as it is).
    type_name: the ggml type; rows that are not whole blocks of it take llama.cpp's fallback type.
    path: the parameter path, for the report.

  Returns:
    The ggml QArray (same shape, dtype and axis) and its `TensorConversion` row.

  Raises:
    ValueError: for rows that fit no ggml block size (not a multiple of 32).
  """
  if q.spec.is_ggml:
    return q, TensorConversion(path, describe(q), q.spec.layout, True, 0.0, 0.0)
  type_name = fallback(type_name, q.canonical_shape[0])
  rows = exact_blocks(q, type_name)
  if rows is None:
    out = kquant_quantize(dequantize(q), type_name=type_name, axis=q.axis)
  else:
    out = QArray(
      codes=jnp.asarray(rows), scale=None, zero=None, perm=None, spec=QSpec.ggml(type_name), shape=q.shape,
      dtype=q.dtype, axis=q.axis,
    )  # fmt: skip
  return out, _error(path, q, out, type_name, rows is not None)


def to_hf(q: QArray, target: Target, *, path: str = "weight") -> tuple[QArray, TensorConversion]:
  """One quantized tensor as the Hugging Face format `target` holds it: copied (act-order groups in GPTQ's
  canonical order), or for an act-order tensor going to a format without ``g_idx`` (AWQ, compressed-tensors)
  rounded again to nearest onto input-order groups of the same grid.

  Returns:
    The QArray to write and its `TensorConversion` row (``exact`` when copied).
  """
  q = gptq.canonical_act_order(q)
  if q.perm is None or target.is_gptq:
    return q, TensorConversion(path, describe(q), target.kind, True, 0.0, 0.0)
  out = quantize(dequantize(q), q.spec, axis=q.axis)
  return out, _error(path, q, out, target.kind, False)


def _to_float(q: QArray, type_name: str, path: str) -> tuple[np.ndarray, TensorConversion]:
  w = np.asarray(dequantize(q), np.float32)
  stored = w.astype({"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}[type_name]).astype(np.float32)
  canonical = stored if q.axis == 0 else stored.T
  return w, _error(path, q, jnp.asarray(canonical), type_name, type_name == "F32")


def convert_params(params, gguf_type: str, config: LlamaConfig) -> tuple[dict, list[TensorConversion]]:
  """Every `QArray` leaf of `params` as the ggml type llama.cpp's recipe `gguf_type` gives it (see `to_ggml`), or
  dequantized for a float type; dense leaves unchanged.

  Returns:
    The new parameter tree and one `TensorConversion` per quantized leaf.
  """
  types = {} if gguf_type in FLOAT_TYPES else tensor_types(gguf_type, config)
  report = []

  def convert(path, leaf):
    if not is_qarray(leaf):
      return leaf
    if gguf_type in FLOAT_TYPES:
      out, row = _to_float(leaf, gguf_type, path)
    else:
      out, row = to_ggml(leaf, types.get(path, gguf_type), path=path)
    report.append(row)
    return out

  return map_with_path(convert, params), report


def summary(report: list[TensorConversion]) -> str:
  """A few lines: tensors copied exactly and requantized, per source grid and type, with their added error."""
  groups: dict[tuple[str, str, bool], list[TensorConversion]] = {}
  for row in report:
    groups.setdefault((row.source, row.type_name, row.exact), []).append(row)
  lines = [f"{'source':26s} {'-> type':8s} {'how':11s} {'tensors':>7s} {'rel RMSE max':>13s} {'max |Δw|':>10s}"]
  for (source, type_name, exact), rows in sorted(groups.items()):
    rel = max(r.rel_rmse for r in rows)
    biggest = max(r.max_abs for r in rows)
    how = "copied" if exact else "requantized"
    lines.append(f"{source:26s} {type_name:8s} {how:11s} {len(rows):7d} {rel:13.3e} {biggest:10.3e}")
  return "\n".join(lines)


def convert_model(source: str, target: Target, out: str, *, overwrite: bool = False) -> list[TensorConversion]:
  """Converts the model at `source` (GPTQ, AWQ or qjax directory; anything `load_model` reads) to `target`.

  Args:
    source: the model to read.
    target: a GGUF type (written to the file `out`) or a Hugging Face format (the directory `out`).
    out: the output path: a GGUF file, or a Hugging Face directory; checked before the model is read (see
      `qjax.formats.output`: files qjax did not write are never replaced).
    overwrite: replace a previous qjax output.

  Returns:
    One `TensorConversion` per quantized tensor.

  Raises:
    ValueError, FileNotFoundError: for unreadable sources, params the target cannot hold, or a missing
      output directory.
  """
  if target.is_gguf:
    check_file_output(out, overwrite=overwrite, is_ours=gguf.written_by_qjax, inputs=[source])
  else:
    check_output(out, target.kind, overwrite=overwrite, inputs=[source])
  model = load_model(source)
  name = os.path.basename(os.path.normpath(source))
  if not target.is_gguf:
    report = []

    def convert(path, leaf):
      if not is_qarray(leaf):
        return leaf
      out, row = to_hf(leaf, target, path=path)
      report.append(row)
      return out

    params = map_with_path(convert, model.params)
    export(target, out, model.config, params, model.tokenizer, name=name, overwrite=overwrite)
    return report
  params, report = convert_params(model.params, target.gguf_type, model.config)
  float_type = target.gguf_type if target.gguf_type in FLOAT_TYPES else "F16"
  entries = gguf.tokenizer_metadata(model.tokenizer, model.config.vocab_size)
  gguf.write_gguf(out, model.config, params, entries, float_type=float_type, file_type=target.gguf_type, name=name,
                  overwrite=overwrite)  # fmt: skip
  return report
