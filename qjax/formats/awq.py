"""AWQ checkpoints in AutoAWQ's "gemm" layout: qjax params to a Hugging Face directory and back.

A quantized linear holds, in Flax ``[in, out]`` orientation (groups must divide ``in``):

* ``qweight`` (in, out / 8) int32 and ``qzeros`` (in / group_size, out / 8) int32: 4-bit codes and zero
  points packed along **out**, eight to a word, interleaved: nibble ``k`` of word ``c`` holds output
  channel ``8c + AWQ_ORDER[k]`` (even channels in the low nibbles, odd ones in the high ones).
* ``scales`` (in / group_size, out) float16.

Values are ``(q[i, j] - zero[i // group_size, j]) * scales[i // group_size, j]``; zero points are stored
as they are (no GPTQ v1 offset) and there is no ``g_idx``, so act-order cannot be stored.
``zero_point: true`` is the usual asymmetric AWQ grid. A symmetric `QArray` is written with
``zero_point: false`` and every zero point 8: the plain AWQ kernels read the 8 from ``qzeros`` and
vLLM's awq_marlin (``uint4b8``) and GPTQModel assume it, so all compute the same values.

References: formats.md §2; AutoAWQ ``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear`` and
``awq/utils/packing_utils.py``; vLLM ``quantization/awq.py`` and ``awq_marlin.py``; transformers ``AwqConfig``.
"""

import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from qjax.core import GroupParams, QArray, QSpec
from qjax.core.errors import InputError
from qjax.formats import gptq, hf_quantized
from qjax.formats.output import atomic_directory
from qjax.models.checkpoint import check_finite
from qjax.models.config import MAX_SIZE, LlamaConfig, show

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
VERSIONS = ("gemm",)
BITS = 4
SYMMETRIC_ZERO = 8


class AwqTensors(NamedTuple):
  """One linear layer in AutoAWQ's gemm layout.

  Attributes:
    qweight: (in, out / 8) int32, interleaved 4-bit codes packed along ``out``.
    qzeros: (groups, out / 8) int32, interleaved zero points packed along ``out``.
    scales: (groups, out) float16.
  """

  qweight: np.ndarray
  qzeros: np.ndarray
  scales: np.ndarray


def _interleaved_columns(n: int) -> np.ndarray:
  """Column ``8c + k`` of the packed order holds output channel ``8c + AWQ_ORDER[k]``."""
  j = np.arange(n)
  return (j // 8) * 8 + np.asarray(AWQ_ORDER)[j % 8]


def _pack(x: np.ndarray) -> np.ndarray:
  return gptq.pack_words(x[:, _interleaved_columns(x.shape[1])], BITS, axis=1)


def _unpack(words: np.ndarray) -> np.ndarray:
  x = np.asarray(gptq.unpack_codes(np.asarray(words).view(np.uint32), bits=BITS, axis=1), np.int32)
  return x[:, np.argsort(_interleaved_columns(x.shape[1]))]


def check_awq_shape(k: int, n: int, group_size: int, name: str, fn: str) -> None:
  """Raises unless a (k, n) kernel fits the gemm layout: whole groups along ``in``, ``out`` a multiple of 8."""
  if group_size != -1 and k % group_size:
    raise ValueError(
      f"`{fn}` expected group_size to divide the input width of {name}, got group_size={group_size} for in={k}; "
      "AWQ has no partial groups (use a divisor of every input width, or --export=gptq)."
    )
  if n % 8:
    raise ValueError(f"`{fn}` expected the output width of {name} to be a multiple of 8, got {n}.")


def to_awq(q: QArray, *, name: str = "weight") -> AwqTensors:
  """A 4-bit Dense-kernel `QArray` in AutoAWQ's gemm layout (a symmetric one with zero points 8).

  Args:
    q: a ``packed`` QArray with ``axis=0`` (shape (in, out)), 4 bits, no act-order ``perm``, a group size
      dividing ``in`` (or -1), ``out`` a multiple of 8, float16-exact scales.
    name: the tensor's name, for messages.

  Returns:
    `AwqTensors` (see its attributes for shapes and dtypes).

  Raises:
    ValueError: for other bit widths, act-order, shapes the layout cannot hold, or non-float16 scales.

  Examples:
    >>> import numpy as np
    >>> from qjax.core import quantize
    >>> q = quantize(np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8),
    ...              QSpec(bits=4, group_size=32, symmetric=False))
    >>> t = to_awq(q)
    >>> t.qweight.shape, t.qzeros.shape, t.scales.shape
    ((64, 1), (2, 1), (2, 8))
  """
  gptq.check_packed_linear(q, name, "to_awq")
  if q.spec.bits != BITS:
    raise ValueError(f"`to_awq` expected 4-bit codes for {name}, got {q.spec.bits} bits; AWQ's gemm layout is 4-bit.")
  if q.perm is not None:
    raise ValueError(
      f"`to_awq` expected no act-order permutation for {name}; AWQ has no g_idx. Quantize without --desc_act, "
      "or export GPTQ (--export=gptq)."
    )
  k, n = q.canonical_shape
  check_awq_shape(k, n, q.spec.group_size, name, "to_awq")
  scales = gptq.fp16_scales(q, name, "to_awq")
  zero = np.full(scales.shape, SYMMETRIC_ZERO, np.int32) if q.zero is None else np.asarray(q.zero, np.int32)
  return AwqTensors(qweight=_pack(gptq.codes_of(q)), qzeros=_pack(zero), scales=scales)


def from_awq(t: AwqTensors, *, group_size: int, zero_point: bool, dtype=np.float32, name: str = "weight") -> QArray:
  """A `QArray` (shape (in, out), axis 0) from gemm-layout tensors whose shapes were checked.

  Args:
    t: the layer's tensors.
    group_size: input channels per group, or -1.
    zero_point: the config's ``zero_point``; False requires every zero point to be 8 and gives a symmetric
      QArray (``zero=None``).
    dtype: dtype the QArray dequantizes to.
    name: the layer's name, for messages.

  Returns:
    A ``packed`` QArray with ``QSpec(bits=4, group_size, symmetric=not zero_point, scale_dtype=scales.dtype)``.

  Raises:
    InputError: for ``zero_point: false`` with zero points other than 8 (loaders would disagree).
  """
  scales = np.asarray(t.scales)
  zeros = _unpack(t.qzeros)
  if not zero_point and not (zeros == SYMMETRIC_ZERO).all():
    raise InputError(
      f"{name}: the config says zero_point=false but the zero points are not all {SYMMETRIC_ZERO}; loaders "
      "disagree on such a checkpoint (Marlin kernels ignore qzeros). Set zero_point=true if they are meant."
    )
  spec = QSpec(bits=BITS, group_size=group_size, symmetric=not zero_point, scale_dtype=scales.dtype)
  params = GroupParams(jnp.asarray(scales), jnp.asarray(zeros) if zero_point else None)
  return gptq.build_qarray(_unpack(t.qweight), params, spec=spec, dtype=np.dtype(dtype))


def awq_quantization_config(spec: QSpec) -> dict[str, Any]:
  """The ``quantization_config`` that vLLM (awq, awq_marlin), TGI, transformers and GPTQModel read (formats.md §2.4)."""
  return {
    "quant_method": "awq",
    "bits": spec.bits,
    "group_size": spec.group_size,
    "zero_point": not spec.symmetric,
    "version": "gemm",
    "modules_to_not_convert": None,
    "desc_act": False,  # lets TGI's config parser finish cleanly
  }


def save_awq(
  out_dir: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES,
  overwrite: bool = False,
) -> None:
  """Writes quantized params as an AWQ (gemm) checkpoint directory that vLLM, TGI and transformers load.

  Every decoder linear must be a 4-bit ``packed`` `QArray` with one spec (see `to_awq`); ``lm_head`` stays
  dense (no AWQ runtime quantizes it). Everything else is written in float16.

  Args:
    out_dir: the directory to create (written beside it and renamed when complete; see `qjax.formats.output`).
    config: the model config.
    params: the Flax parameter tree.
    tokenizer: a `transformers` tokenizer, or None.
    max_shard_bytes: largest safetensors file before sharding.
    overwrite: replace a previous qjax output of another kind.

  Raises:
    ValueError: for params an AWQ config cannot describe.
    InputError: if `out_dir` may not be written.
  """
  with atomic_directory(out_dir, "awq", overwrite=overwrite) as tmp:
    write_awq(tmp, config, params, tokenizer, max_shard_bytes=max_shard_bytes)


def write_awq(
  directory: str, config: LlamaConfig, params, tokenizer, *, max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES
) -> None:
  """`save_awq`'s files, written into the existing `directory`; `params` may be a stream of parts."""

  def module_tensors(module: str, q: QArray) -> dict[str, np.ndarray]:
    if module == "lm_head":
      raise ValueError("an AWQ checkpoint keeps lm_head dense (no AWQ runtime quantizes it); got a quantized lm_head.")
    return to_awq(q, name=module)._asdict()

  written, config = hf_quantized.write_weights(
    directory, config, params, module_tensors, max_shard_bytes=max_shard_bytes
  )
  spec = hf_quantized.model_spec(written, "AWQ")
  hf_quantized.write_hf_directory(directory, config, awq_quantization_config(spec), tokenizer)


def check_awq_tensors(
  t: AwqTensors, shape: tuple[int, int], group_size: int, name: str, *, source: str | None = None
) -> None:
  """Raises naming the tensor when a layer's AWQ tensors do not have the shapes the config implies, or a scale is
  NaN or Inf.

  Raises:
    InputError: naming `source` (the directory) and the tensor.
  """
  k, n = shape
  try:
    check_awq_shape(k, n, group_size, name, "load_awq")
  except ValueError as e:
    raise InputError(f"{source + ': ' if source else ''}{e}") from e
  groups = 1 if group_size == -1 else k // group_size
  described = f"4-bit group_size={group_size} AWQ gemm of a ({n}, {k}) linear"
  hf_quantized.check_tensor(f"{name}.qweight", t.qweight, (k, n // 8), (np.int32,), described, source=source)
  hf_quantized.check_tensor(f"{name}.qzeros", t.qzeros, (groups, n // 8), (np.int32,), described, source=source)
  scale_dtypes = (np.float16, np.float32, jnp.bfloat16)
  hf_quantized.check_tensor(f"{name}.scales", t.scales, (groups, n), scale_dtypes, described, source=source)
  check_finite(f"{name}.scales", t.scales, source or name)


def awq_settings(qc: dict[str, Any], source: str) -> tuple[int, bool]:
  """``(group_size, zero_point)`` of an AWQ ``quantization_config`` (synonyms ``w_bit``, ``q_group_size``).

  Raises:
    InputError: naming `source` for other bit widths, group sizes or versions (gemv, marlin, …), or a non-boolean
      zero_point.
  """
  bits = qc.get("bits", qc.get("w_bit"))
  group_size = qc.get("group_size", qc.get("q_group_size"))
  version = str(qc.get("version") or qc.get("format") or "gemm").lower()
  if type(bits) is not int or bits != BITS:
    raise InputError(f"{source}: AWQ bits must be 4, got {show(bits)}.")
  if type(group_size) is not int or not (group_size == -1 or 0 < group_size < MAX_SIZE):
    raise InputError(f"{source}: AWQ group_size must be -1 or in [1, 2**31), got {show(group_size)}.")
  if version not in VERSIONS:
    raise InputError(f"{source}: unknown AWQ version {show(version)}; qjax reads {VERSIONS} (AutoAWQ's GEMM layout).")
  zero_point = qc.get("zero_point", True)
  if not isinstance(zero_point, bool):
    raise InputError(f"{source}: AWQ zero_point must be true or false, got {show(zero_point)}.")
  return group_size, zero_point


def load_awq(model_dir: str, *, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads an AWQ (gemm) checkpoint directory (qjax's, AutoAWQ's, GPTQModel's) into qjax params.

  Args:
    model_dir: a Hugging Face directory whose ``quantization_config`` says AWQ.
    dtype: dtype of the dense leaves and of what the QArrays dequantize to.

  Returns:
    ``(config, params)``: quantized linears as `QArray` (see `from_awq`), the rest dense; modules listed in
    ``modules_to_not_convert`` are stored dense and read as such.

  Raises:
    FileNotFoundError: naming a missing config or weights file.
    InputError: naming the file or tensor for an unknown version, tensors that do not match the config, NaN or Inf
      scales or weights, or a truncated file.
  """
  config = LlamaConfig.from_pretrained(model_dir)
  qc = hf_quantized.read_quantization_config(model_dir)
  if qc is None:
    raise InputError(f"{model_dir}: config.json has no quantization_config.")
  group_size, zero_point = awq_settings(qc, os.path.join(model_dir, "config.json"))
  tensors = hf_quantized.HfTensors(model_dir)

  def quantized(module: str, shape: tuple[int, int]) -> QArray:
    got = tensors.get_many([f"{module}.{f}" for f in AwqTensors._fields])
    t = AwqTensors(*(got[f"{module}.{f}"] for f in AwqTensors._fields))
    check_awq_tensors(t, shape, group_size, module, source=model_dir)
    return from_awq(t, group_size=group_size, zero_point=zero_point, dtype=dtype, name=f"{model_dir}: {module}")

  return config, hf_quantized.read_hf_params(tensors, config, quantized, dtype=dtype)
