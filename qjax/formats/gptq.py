"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): qjax params to a Hugging Face directory and back.

A quantized linear ``model.layers.{i}.mlp.down_proj`` is stored as four tensors (W is the torch
``[out, in]`` weight, so these are all in Flax ``[in, out]`` orientation):

* ``qweight`` (in * bits / 32, out) int32: codes packed along ``in``, the lowest bits holding
  the first row; 3-bit codes form one little-endian 96-bit stream per 32 rows. Rows are in the
  **original** input order, even with act-order.
* ``qzeros`` (groups, out * bits / 32) int32: zero points packed the same way along ``out``;
  ``checkpoint_format`` "gptq" (v1, what every loader reads) stores ``zero - 1``, "gptq_v2"
  stores ``zero``.
* ``scales`` (groups, out) float16, and ``g_idx`` (in,) int32, the group of each input channel.

Modules may take their own bit width and group size through GPTQModel's ``dynamic`` config (what vLLM reads too):
regular expressions matched from the start of a module's name, the first match giving its ``bits`` and
``group_size`` (a bit allocation's result); qjax writes one pattern per setting that names the modules and the
layers vLLM fuses them into.

Values are ``scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])``. ``groups = ceil(in / group_size)``
(a shorter last group is allowed). A qjax `QArray` holds the same numbers: its codes and groups
run in act-order (row ``r`` is input ``perm[r]``), so ``g_idx[perm[r]] = r // group_size``.

The Hugging Face directory plumbing it shares with `qjax.formats.awq` is `qjax.formats.hf_quantized`.

References: formats.md §1; AutoGPTQ ``qlinear_cuda_old.py`` ``pack``; GPTQModel ``utils/model.py``
(``convert_gptq_v1_to_v2_format``); vLLM ``quantization/gptq.py``; transformers ``GPTQConfig``.
"""

import dataclasses
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import GroupParams, QArray, QSpec, from_codes, is_qarray, packing
from qjax.core.affine import AffineGrid
from qjax.core.errors import InputError
from qjax.core.tree import leaves_with_paths
from qjax.formats import hf_quantized
from qjax.formats.output import atomic_directory
from qjax.models.checkpoint import check_finite, check_group_length
from qjax.models.config import MAX_SIZE, LlamaConfig, show

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG = "quantize_config.json"
MAX_DYNAMIC = 4096  # patterns in a read ``dynamic`` config
MAX_PATTERN = 1 << 16  # characters of one pattern
# The layers vLLM loads modules into (their prefix is what it matches ``dynamic`` patterns against).
VLLM_FUSED = ((re.compile(r"(.*\.experts)\.\d+\.\w+"), r"\1"), (re.compile(r"(.*)\.[qkv]_proj"), r"\1.qkv_proj"),
              (re.compile(r"(.*)\.(gate|up)_proj"), r"\1.gate_up_proj"))  # fmt: skip

# GPTQModel reads v1 zero points by adding one to every field of a word at once (carries included), the exact
# inverse of how it writes them; for 3 bits it shifts field by field.
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}

# Jitted (once per shape): dispatching the packing loops op by op dominates reading or converting a whole model.
pack_codes = jax.jit(packing.pack, static_argnames=("bits", "axis"))
unpack_codes = jax.jit(packing.unpack, static_argnames=("bits", "axis", "dtype"))
build_qarray = jax.jit(from_codes, static_argnames=("spec", "dtype", "axis"))

V1_ZERO_MSG = (
  "{name}: {count} group(s) have the zero point 0, which GPTQ checkpoint_format 'gptq' (v1) cannot store: v1 "
  "stores zero - 1 and every v1 loader (vLLM, TGI, transformers) would read a wrong zero point. Export with "
  "checkpoint_format='gptq_v2' (--export=gptq_v2; read by GPTQModel and vLLM, not by TGI or AutoGPTQ), or "
  "quantize symmetrically (--sym)."
)


class GptqTensors(NamedTuple):
  """One linear layer in the GPTQ layout.

  Attributes:
    qweight: (in * bits / 32, out) int32, codes packed along ``in`` in original input order.
    qzeros: (groups, out * bits / 32) int32, zero points (v1: minus one) packed along ``out``.
    scales: (groups, out) float16.
    g_idx: (in,) int32, the group of each input channel.
  """

  qweight: np.ndarray
  qzeros: np.ndarray
  scales: np.ndarray
  g_idx: np.ndarray


# ---- one QArray <-> GPTQ tensors ----


def canonical_act_order(q: QArray) -> QArray:
  """The same quantized matrix with each group's channels in increasing input order (``perm`` None if sorted).

  GPTQ's ``g_idx`` records which group each input belongs to, not the order inside a group, so this is
  the form a GPTQ round trip returns. Dequantization is unchanged.

  Args:
    q: a ``packed`` `QArray`, with or without ``perm``.

  Returns:
    A `QArray` whose ``perm`` is increasing within each group, or None when it is the identity.
  """
  if q.perm is None:
    return q
  k = q.canonical_shape[0]
  group = np.arange(k) // q.spec.group_length(k)
  perm = np.asarray(q.perm)
  order = np.lexsort((perm, group))  # by group, then by input channel
  codes = codes_of(q)[order]
  new_perm = perm[order]
  identity = np.array_equal(new_perm, np.arange(k))
  return dataclasses.replace(
    q,
    codes=pack_codes(codes, bits=q.spec.bits, axis=0),
    perm=None if identity else jnp.asarray(new_perm, jnp.int32),
  )


def group_index(q: QArray) -> np.ndarray:
  """GPTQ's ``g_idx``: (in,) int32, the group of each input channel in original order."""
  k = q.canonical_shape[0]
  rows = (np.arange(k) // q.spec.group_length(k)).astype(np.int32)
  if q.perm is None:
    return rows
  g_idx = np.empty(k, np.int32)
  g_idx[np.asarray(q.perm)] = rows
  return g_idx


def codes_of(q: QArray) -> np.ndarray:
  """(k, n) uint8 codes of a ``packed`` QArray in its (possibly permuted) row order."""
  return np.asarray(unpack_codes(q.codes, bits=q.spec.bits, axis=0))


def _original_order_codes(q: QArray) -> np.ndarray:
  codes = codes_of(q)
  if q.perm is None:
    return codes
  out = np.empty_like(codes)
  out[np.asarray(q.perm)] = codes
  return out


def check_packed_linear(q: QArray, name: str, fn: str) -> None:
  """Raises unless `q` is a ``packed`` Dense kernel (contraction axis 0)."""
  if q.spec.is_ggml:
    raise ValueError(
      f"`{fn}` expected packed affine codes for {name}, got ggml layout {q.spec.layout}; a GGUF-quantized model "
      "has no GPTQ/AWQ form (export it with --export=gguf:TYPE instead)."
    )
  if not isinstance(q.spec.rounding_grid, AffineGrid):
    raise ValueError(
      f"`{fn}` expected integer codes on the affine grid for {name}, got {q.spec.rounding_grid}; GPTQ, AWQ and "
      "compressed-tensors' pack-quantized format store scales and integer zero points only."
    )
  if q.axis != 0:
    raise ValueError(f"`{fn}` expected a Dense kernel (contraction axis 0) for {name}, got axis={q.axis}.")


def fp16_scales(q: QArray, name: str, fn: str) -> np.ndarray:
  """(groups, out) float16 scales; raises if the QArray's scales are not exactly float16 values."""
  scale = np.asarray(q.scale)
  half = scale.astype(np.float16)
  if not np.array_equal(half.astype(np.float32), scale.astype(np.float32)):
    raise ValueError(
      f"`{fn}` expected scales representable in float16 for {name}, got {q.spec.scale_dtype} scales that are "
      "not; quantize with QSpec(scale_dtype=float16) (the default)."
    )
  return half


def pack_words(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Codes packed into int32 words along `axis` (uint32 bit patterns viewed as int32)."""
  return np.asarray(pack_codes(codes, bits=bits, axis=axis)).view(np.int32)


def check_packable(length: int, bits: int, what: str, name: str, fn: str) -> None:
  """Raises unless `length` codes fill whole int32 words (a multiple of 32 for 3 bits, 32/bits otherwise)."""
  period = packing.codes_per_period(bits)
  if length % period:
    raise ValueError(
      f"`{fn}` expected {what} of {name} to be a multiple of {period} to pack {bits}-bit codes into int32 words, "
      f"got {length}."
    )


def to_gptq(q: QArray, *, checkpoint_format: str = "gptq", name: str = "weight") -> GptqTensors:
  """A Dense-kernel `QArray` in the GPTQ layout.

  Args:
    q: a ``packed`` QArray with ``axis=0`` (shape (in, out)), bits in `BITS`, float16-exact scales;
      optional act-order ``perm``; symmetric (zero None, written as the constant ``2**(bits-1)``) or not.
    checkpoint_format: "gptq" (v1, zero points stored minus one) or "gptq_v2" (stored as is).
    name: the tensor's name, for messages.

  Returns:
    `GptqTensors` (see its attributes for shapes and dtypes).

  Raises:
    ValueError: for an unsupported layout, axis or bit width, ``out`` not a multiple of the packing period
      (32 for 3 bits), non-float16 scales, or a zero point of 0 with v1 (`V1_ZERO_MSG`, with the way out).

  Examples:
    >>> import numpy as np
    >>> from qjax.core import quantize
    >>> q = quantize(np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8), QSpec(bits=4, group_size=32))
    >>> t = to_gptq(q)
    >>> t.qweight.shape, t.qzeros.shape, hex(int(t.qzeros.view(np.uint32)[0, 0]))
    ((8, 8), (2, 1), '0x77777777')
  """
  check_packed_linear(q, name, "to_gptq")
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ValueError(f"`to_gptq` expected checkpoint_format in {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
  bits = q.spec.bits
  if bits not in BITS:
    raise ValueError(f"`to_gptq` expected bits in {BITS} for {name}, got {bits} (no GPTQ loader reads them).")
  n = q.canonical_shape[1]
  check_packable(n, bits, "the output width", name, "to_gptq")
  scales = fp16_scales(q, name, "to_gptq")
  zero = np.full(scales.shape, 1 << (bits - 1), np.int32) if q.zero is None else np.asarray(q.zero, np.int32)
  if checkpoint_format == "gptq":
    if (zero == 0).any():
      raise ValueError(V1_ZERO_MSG.format(name=name, count=int((zero == 0).sum())))
    zero = zero - 1
  return GptqTensors(
    qweight=pack_words(_original_order_codes(q), bits, axis=0),
    qzeros=pack_words(zero, bits, axis=1),
    scales=scales,
    g_idx=group_index(q),
  )


def decode_zeros(qzeros: np.ndarray, bits: int, *, checkpoint_format: str) -> np.ndarray:
  """(groups, out) int32 zero points of packed ``qzeros``, undoing v1's minus one as GPTQModel does."""
  words = np.asarray(qzeros).view(np.uint32)
  if checkpoint_format == "gptq_v2":
    return np.asarray(unpack_codes(words, bits=bits, axis=1), np.int32)
  if bits in _V1_WORD_OFFSET:
    return np.asarray(unpack_codes(words + np.uint32(_V1_WORD_OFFSET[bits]), bits=bits, axis=1), np.int32)
  return (np.asarray(unpack_codes(words, bits=bits, axis=1), np.int32) + 1) % (1 << bits)


def perm_from_group_index(g_idx: np.ndarray, spec: QSpec, name: str) -> np.ndarray | None:
  """qjax's act-order ``perm`` of a GPTQ ``g_idx`` (None for contiguous groups); channels within a group ascend.

  Raises:
    InputError: if `g_idx` does not give every group ``group_size`` channels (the last one the rest).
  """
  k = g_idx.shape[0]
  expected = np.arange(k) // spec.group_length(k)
  if np.array_equal(g_idx, expected):
    return None
  perm = np.argsort(g_idx, kind="stable")
  if not np.array_equal(g_idx[perm], expected):
    counts = np.bincount(np.clip(g_idx, 0, None), minlength=spec.num_groups(k))
    raise InputError(
      f"{name}: g_idx does not assign group_size={spec.group_size} input channels to each of its "
      f"{spec.num_groups(k)} groups (counts {counts[:8].tolist()}…); the config's group_size does not describe "
      "this tensor."
    )
  return perm.astype(np.int32)


def from_gptq(
  t: GptqTensors,
  *,
  bits: int,
  group_size: int,
  sym: bool | None,
  checkpoint_format: str = "gptq",
  dtype=np.float32,
  name: str = "weight",
) -> QArray:
  """A `QArray` (shape (in, out), axis 0) from GPTQ tensors whose shapes were checked (see `check_gptq_tensors`).

  Args:
    t: the layer's tensors.
    bits: code width (2, 3, 4 or 8).
    group_size: input channels per group, or -1.
    sym: the config's ``sym``: True requires the constant symmetric zero point and gives ``zero=None``;
      None infers it from the zero points; False keeps the zero points.
    checkpoint_format: "gptq" (v1) or "gptq_v2".
    dtype: dtype the QArray dequantizes to.
    name: the layer's name, for messages.

  Returns:
    A ``packed`` QArray with ``QSpec(bits, group_size, symmetric, scale_dtype=scales.dtype,
    partial_groups=True)`` and, for a non-contiguous ``g_idx``, the act-order ``perm`` in the form of
    `canonical_act_order`.

  Raises:
    InputError: for symmetric configs whose zero points are not ``2**(bits-1)``, or a ``g_idx`` that does
      not match the group size.

  Warns:
    UserWarning: for v1 zero points that decode to 0 (written by GPTQModel's word-wise subtraction): qjax
      reads them as GPTQModel and transformers do; vLLM and TGI read such groups differently.
  """
  scales = np.asarray(t.scales)
  zeros = decode_zeros(t.qzeros, bits, checkpoint_format=checkpoint_format)
  symmetric_zero = 1 << (bits - 1)
  constant = bool((zeros == symmetric_zero).all())
  if sym and not constant:
    as_v2 = decode_zeros(t.qzeros, bits, checkpoint_format="gptq_v2")
    hint = ""
    if checkpoint_format == "gptq" and (as_v2 == symmetric_zero).all():
      hint = " They equal it read as gptq_v2: the config's checkpoint_format is probably wrong."
    raise InputError(
      f"{name}: the config says sym=true but the zero points are not the symmetric {symmetric_zero}; loaders "
      f"disagree on such a checkpoint (Marlin kernels ignore qzeros).{hint}"
    )
  if checkpoint_format == "gptq" and (zeros == 0).any():
    warnings.warn(
      f"{name}: {int((zeros == 0).sum())} v1 zero point(s) are 0 (stored as -1, with a borrow from the next "
      "field); qjax reads them as GPTQModel and transformers do, but vLLM and TGI read these groups differently.",
      stacklevel=2,
    )
  symmetric = sym if sym is not None else constant
  spec = QSpec(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scales.dtype, partial_groups=True)
  perm = perm_from_group_index(np.asarray(t.g_idx), spec, name)
  codes = np.asarray(unpack_codes(np.asarray(t.qweight).view(np.uint32), bits=bits, axis=0))
  if perm is not None:
    codes = codes[perm]
  params = GroupParams(jnp.asarray(scales), None if symmetric else jnp.asarray(zeros))
  return build_qarray(codes, params, spec=spec, perm=perm, dtype=np.dtype(dtype))


# ---- GPTQ directories ----


def dynamic_overrides(layouts: Mapping[str, tuple[int, int]], base: tuple[int, int]) -> dict[str, dict[str, int]]:
  """GPTQModel's ``dynamic`` overrides giving each module of `layouts` (Hugging Face module name -> (bits, group
  size)) its own where it is not `base`: one pattern per setting, naming its modules and the layers vLLM fuses them
  into.

  Examples:
    >>> d = dynamic_overrides({"a.q_proj": (8, 32), "a.o_proj": (4, 128)}, (4, 128))
    >>> list(d.values()), [n for n in ("a.q_proj", "a.qkv_proj", "a.o_proj") if re.match(next(iter(d))[2:], n)]
    ([{'bits': 8, 'group_size': 32}], ['a.q_proj', 'a.qkv_proj'])
  """
  names: dict[tuple[int, int], list[str]] = defaultdict(list)
  for module, layout in layouts.items():
    if layout != base:
      fused = [f.sub(to, module) for f, to in VLLM_FUSED if f.fullmatch(module)][:1]
      names[layout] += [n for n in (module, *fused) if n not in names[layout]]
  return {f"+:({'|'.join(map(re.escape, ms))})$": {"bits": b, "group_size": g} for (b, g), ms in sorted(names.items())}


def gptq_quantization_config(
  spec: QSpec, *, desc_act: bool, lm_head: bool, checkpoint_format: str, dynamic: dict | None = None
) -> dict:
  """The ``quantization_config`` block vLLM, TGI, transformers (optimum) and GPTQModel read (formats.md §1.6)."""
  from qjax import __version__

  return {
    "quant_method": "gptq",
    "bits": spec.bits,
    "group_size": spec.group_size,
    "desc_act": desc_act,
    "sym": spec.symmetric,
    "lm_head": lm_head,
    "checkpoint_format": checkpoint_format,
    "format": checkpoint_format,
    "pack_dtype": "int32",
    **({"dynamic": dynamic} if dynamic else {}),
    "meta": {"quantizer": [f"qjax:{__version__}"]},
  }


def save_gptq(
  out_dir: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  checkpoint_format: str = "gptq",
  max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES,
  overwrite: bool = False,
) -> None:
  """Writes quantized params as a GPTQ checkpoint directory that vLLM, TGI and transformers load.

  Every decoder linear must be a ``packed`` `QArray` of one symmetry (bits 2, 3, 4 or 8; the widths and group
  sizes other than the most common written as ``dynamic`` overrides, which vLLM and GPTQModel read but
  transformers does not); ``lm_head`` may be quantized too. Everything else is written in float16 (a tied
  embedding has no ``lm_head`` tensor). ``config.json`` carries ``quantization_config`` and ``quantize_config.json``
  the same keys.

  Args:
    out_dir: the directory to create (written beside it and renamed when complete; see `qjax.formats.output`).
    config: the model config.
    params: the Flax parameter tree.
    tokenizer: a `transformers` tokenizer, or None.
    checkpoint_format: "gptq" (v1, for every loader) or "gptq_v2" (GPTQModel and vLLM only).
    max_shard_bytes: largest safetensors file before sharding.
    overwrite: replace a previous qjax output of another kind.

  Raises:
    ValueError: for params a GPTQ config cannot describe (see `model_spec`, `to_gptq`).
    InputError: if `out_dir` may not be written.
  """
  with atomic_directory(out_dir, checkpoint_format, overwrite=overwrite) as tmp:
    write_gptq(tmp, config, params, tokenizer, checkpoint_format=checkpoint_format, max_shard_bytes=max_shard_bytes)


def write_gptq(
  directory: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  checkpoint_format: str = "gptq",
  max_shard_bytes: int = hf_quantized.MAX_SHARD_BYTES,
) -> None:
  """`save_gptq`'s files, written into the existing `directory`; `params` may be a stream of parts."""
  layouts = {}

  def module_tensors(module: str, q: QArray) -> dict[str, np.ndarray]:
    layouts[module] = (q.spec.bits, q.spec.group_size)
    return to_gptq(q, checkpoint_format=checkpoint_format, name=module)._asdict()

  written, config = hf_quantized.write_weights(
    directory, config, params, module_tensors, max_shard_bytes=max_shard_bytes
  )
  spec = hf_quantized.model_spec(written, "GPTQ", widths=True)
  desc_act = any(is_qarray(leaf) and leaf.perm is not None for _, leaf in leaves_with_paths(written))
  lm_head = is_qarray(written.get("lm_head", {}).get("kernel"))
  qc = gptq_quantization_config(spec, desc_act=desc_act, lm_head=lm_head, checkpoint_format=checkpoint_format,
                                dynamic=dynamic_overrides(layouts, (spec.bits, spec.group_size)))  # fmt: skip
  hf_quantized.write_hf_directory(directory, config, qc, tokenizer, extra_json={QUANTIZE_CONFIG: qc})


class GptqSettings(NamedTuple):
  """What a GPTQ ``quantization_config`` says about the tensors."""

  bits: int
  group_size: int
  sym: bool | None
  checkpoint_format: str
  dynamic: tuple[tuple[re.Pattern, Mapping[str, Any]], ...] = ()  # (pattern, overrides) in order

  def for_module(self, module: str) -> "GptqSettings":
    """The settings of `module`: the first ``dynamic`` pattern matching its name from the start overrides them."""
    for pattern, overrides in self.dynamic:
      if pattern.match(module):
        return self._replace(**overrides, dynamic=())
    return self


def _layout(values: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The bits, group size and sym of a GPTQ config (or a ``dynamic`` override: those of them it gives), checked."""
  layout = {}
  bits = values.get("bits", values.get("w_bit"))
  group_size = values.get("group_size", values.get("q_group_size"))
  if bits is not None:
    if type(bits) is not int or bits not in BITS:
      raise InputError(f"{source}: GPTQ bits must be one of {BITS}, got {show(bits)}.")
    layout["bits"] = bits
  if group_size is not None:
    if type(group_size) is not int or not (group_size == -1 or 0 < group_size < MAX_SIZE):
      raise InputError(f"{source}: GPTQ group_size must be -1 or in [1, 2**31), got {show(group_size)}.")
    layout["group_size"] = group_size
  if values.get("sym") is not None:
    if not isinstance(values["sym"], bool):
      raise InputError(f"{source}: GPTQ sym must be true or false, got {show(values['sym'])}.")
    layout["sym"] = values["sym"]
  return layout


def _dynamic(dynamic: Any, source: str) -> tuple[tuple[re.Pattern, Mapping[str, Any]], ...]:
  """GPTQModel's ``dynamic`` overrides, checked: positive patterns (``+:`` or none) with bits/group_size/sym."""
  if not isinstance(dynamic, dict) or len(dynamic) > MAX_DYNAMIC:
    raise InputError(f"{source}: GPTQ 'dynamic' must be an object of at most {MAX_DYNAMIC} patterns.")
  overrides = []
  for key, value in dynamic.items():
    where = f"{source}: dynamic[{show(key)}]"
    if key.startswith("-:"):
      raise InputError(f"{where}: modules left unquantized by a negative pattern are not supported.")
    raw = key.removeprefix("+:")
    if len(raw) > MAX_PATTERN or not isinstance(value, dict):
      raise InputError(f"{where}: expected a pattern under {MAX_PATTERN} characters and an object of overrides.")
    try:
      pattern = re.compile(raw)
    except re.error as e:
      raise InputError(f"{where}: not a regular expression ({e}).") from None
    overrides.append((pattern, _layout(value, where)))
  return tuple(overrides)


def gptq_settings(qc: dict[str, Any], source: str) -> GptqSettings:
  """Parses and checks a GPTQ ``quantization_config`` (synonyms ``w_bit``, ``q_group_size``; v1 by default).

  Raises:
    InputError: naming `source` for unsupported bits, group size, packing, an unknown checkpoint_format, a
      non-boolean sym, or a ``dynamic`` override that is negative (modules left unquantized) or not a regular
      expression with such settings.
  """
  layout = _layout(qc, source)
  if "bits" not in layout or "group_size" not in layout:
    missing = "bits" if "bits" not in layout else "group_size"
    raise InputError(f"{source}: GPTQ {missing} missing from the quantization config.")
  fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
  if fmt not in CHECKPOINT_FORMATS:
    raise InputError(
      f"{source}: unknown GPTQ checkpoint_format {show(fmt)}; qjax reads {CHECKPOINT_FORMATS} (v1 zero points "
      "stored minus one, v2 as is)."
    )
  if qc.get("pack_dtype", "int32") != "int32":
    raise InputError(f"{source}: GPTQ pack_dtype must be int32, got {show(qc['pack_dtype'])}.")
  dynamic = _dynamic(qc["dynamic"], source) if qc.get("dynamic") else ()
  return GptqSettings(layout["bits"], layout["group_size"], layout.get("sym"), fmt, dynamic)


def check_gptq_tensors(
  t: GptqTensors, shape: tuple[int, int], s: GptqSettings, name: str, *, source: str | None = None
) -> None:
  """Raises naming the tensor when a layer's GPTQ tensors do not have the shapes the config implies, a ``g_idx``
  names a group that does not exist, or a scale is NaN or Inf.

  Raises:
    InputError: naming `source` (the directory) and the tensor.
  """
  k, n = shape
  spec = QSpec(bits=s.bits, group_size=s.group_size, partial_groups=True)
  groups = spec.num_groups(k)
  described = f"{s.bits}-bit group_size={s.group_size} GPTQ of a ({n}, {k}) linear"
  prefix = f"{source}: " if source else ""
  check_group_length(s.group_size, k, f"{prefix}{name}")
  for length in (k, n):
    try:
      check_packable(length, s.bits, "the width", name, "load_gptq")
    except ValueError as e:
      raise InputError(f"{prefix}{e}") from e
  qweight_shape = (packing.packed_length(k, s.bits), n)
  hf_quantized.check_tensor(f"{name}.qweight", t.qweight, qweight_shape, (np.int32,), described, source=source)
  qzeros_shape = (groups, packing.packed_length(n, s.bits))
  hf_quantized.check_tensor(f"{name}.qzeros", t.qzeros, qzeros_shape, (np.int32,), described, source=source)
  scale_dtypes = (np.float16, np.float32, jnp.bfloat16)
  hf_quantized.check_tensor(f"{name}.scales", t.scales, (groups, n), scale_dtypes, described, source=source)
  hf_quantized.check_tensor(f"{name}.g_idx", t.g_idx, (k,), (np.int32, np.int64), described, source=source)
  if (t.g_idx < 0).any() or (t.g_idx >= groups).any():
    raise InputError(f"{prefix}{name}.g_idx: values must lie in [0, {groups}), got [{t.g_idx.min()}, {t.g_idx.max()}].")
  check_finite(f"{name}.scales", t.scales, source or name)


def load_gptq(model_dir: str, *, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads a GPTQ checkpoint directory (qjax's, GPTQModel's, AutoGPTQ's) into qjax params.

  Args:
    model_dir: a Hugging Face directory whose ``quantization_config`` (or ``quantize_config.json``) says GPTQ.
    dtype: dtype of the dense leaves and of what the QArrays dequantize to.

  Returns:
    ``(config, params)``: quantized linears as `QArray` (see `from_gptq`), the rest dense.

  Raises:
    FileNotFoundError: naming a missing config or weights file.
    InputError: naming the file or tensor for a bad config or quantization_config (unknown checkpoint_format,
      a ``dynamic`` override qjax does not read), tensors that do not match the config (shapes, dtypes, a
      ``g_idx`` that does not fit the group size, extra tensors), NaN or Inf scales or weights, or a truncated file.
  """
  config = LlamaConfig.from_pretrained(model_dir)
  qc = hf_quantized.read_quantization_config(model_dir)
  if qc is None:
    raise InputError(f"{model_dir}: no quantization_config in config.json and no {QUANTIZE_CONFIG}.")
  base = gptq_settings(qc, os.path.join(model_dir, "config.json"))
  tensors = hf_quantized.HfTensors(model_dir)

  def quantized(module: str, shape: tuple[int, int]) -> QArray:
    settings = base.for_module(module)
    fields = [f for f in GptqTensors._fields if f != "g_idx" or f"{module}.g_idx" in tensors]
    got = tensors.get_many([f"{module}.{f}" for f in fields])
    values = {f: got[f"{module}.{f}"] for f in fields}
    if "g_idx" not in values:  # optional in old checkpoints: contiguous groups
      spec = QSpec(bits=settings.bits, group_size=settings.group_size, partial_groups=True)
      values["g_idx"] = (np.arange(shape[0]) // spec.group_length(shape[0])).astype(np.int32)
    t = GptqTensors(**values)
    check_gptq_tensors(t, shape, settings, module, source=model_dir)
    t = t._replace(g_idx=t.g_idx.astype(np.int32))
    return from_gptq(
      t,
      bits=settings.bits,
      group_size=settings.group_size,
      sym=settings.sym,
      checkpoint_format=settings.checkpoint_format,
      dtype=dtype,
      name=f"{model_dir}: {module}",  # its messages name the directory too
    )

  return config, hf_quantized.read_hf_params(tensors, config, quantized, dtype=dtype)
