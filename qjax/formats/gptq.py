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

Values are ``scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])``. ``groups = ceil(in / group_size)``
(a shorter last group is allowed). A qjax `QArray` holds the same numbers: its codes and groups
run in act-order (row ``r`` is input ``perm[r]``), so ``g_idx[perm[r]] = r // group_size``.

The second half of the module is the Hugging Face directory plumbing that `qjax.formats.awq` shares:
tensor names, float16 conversion, sharded safetensors written to a temporary directory and renamed,
and a reader that checks every tensor against the model config.

References: formats.md §1; AutoGPTQ ``qlinear_cuda_old.py`` ``pack``; GPTQModel ``utils/model.py``
(``convert_gptq_v1_to_v2_format``); vLLM ``quantization/gptq.py``; transformers ``GPTQConfig``.
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qjax.core import AffineParams, QArray, QSpec, from_codes, is_qarray, packing
from qjax.models.checkpoint import hf_layer_tensors
from qjax.models.config import LlamaConfig
from qjax.transforms.base import leaves_with_paths

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
QUANTIZE_CONFIG = "quantize_config.json"
LINEAR_KERNEL = re.compile(r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel|lm_head/kernel")
LAYER_LINEAR = re.compile(r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel")

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
    ValueError: if `g_idx` does not give every group ``group_size`` channels (the last one the rest).
  """
  k = g_idx.shape[0]
  expected = np.arange(k) // spec.group_length(k)
  if np.array_equal(g_idx, expected):
    return None
  perm = np.argsort(g_idx, kind="stable")
  if not np.array_equal(g_idx[perm], expected):
    counts = np.bincount(np.clip(g_idx, 0, None), minlength=spec.num_groups(k))
    raise ValueError(
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
    ValueError: for symmetric configs whose zero points are not ``2**(bits-1)``, or a ``g_idx`` that does
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
    raise ValueError(
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
  params = AffineParams(jnp.asarray(scales), None if symmetric else jnp.asarray(zeros))
  return build_qarray(codes, params, spec=spec, perm=perm, dtype=np.dtype(dtype))


# ---- Hugging Face directories (shared with the AWQ format) ----


def hf_tensor_name(path: str) -> str:
  """Hugging Face name of a Flax leaf: ``model/layers_3/mlp/up_proj/kernel`` -> ``model.layers.3.mlp.up_proj.weight``.

  Raises:
    ValueError: for a leaf kind with no Hugging Face counterpart.
  """
  *modules, leaf = path.split("/")
  suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}.get(leaf)
  if suffix is None or not modules:
    raise ValueError(f"parameter {path!r} has no Hugging Face tensor name.")
  return ".".join([re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules] + [suffix])


def model_spec(params, fmt: str) -> QSpec:
  """The one spec of every quantized linear of `params`, checking what a GPTQ/AWQ config can describe.

  Raises:
    ValueError: naming the leaves, when nothing is quantized, a non-linear leaf is quantized, a decoder
      linear is left dense, or the quantized linears use different bits, group sizes or symmetry.
  """
  leaves = leaves_with_paths(params)
  quantized = {path: leaf for path, leaf in leaves if is_qarray(leaf)}
  if not quantized:
    raise ValueError(f"a {fmt} export needs quantized linears; these params have none (quantize them first).")
  not_linear = [p for p in quantized if not LINEAR_KERNEL.fullmatch(p)]
  dense = [p for p, leaf in leaves if LAYER_LINEAR.fullmatch(p) and not is_qarray(leaf)]
  if not_linear or dense:
    raise ValueError(
      f"a {fmt} checkpoint quantizes every decoder linear (and optionally lm_head) and nothing else; got "
      f"quantized {not_linear[:3]} and dense {dense[:3]}."
    )
  specs = {(q.spec.bits, q.spec.group_size, q.spec.symmetric): p for p, q in quantized.items()}
  if len(specs) > 1:
    found = ", ".join(f"{p}: bits={b} group_size={g} symmetric={s}" for (b, g, s), p in specs.items())
    raise ValueError(f"a {fmt} config has one bits/group_size/sym for all layers; got {found}.")
  return next(iter(quantized.values())).spec


def hf_tensors(params, quantized: Callable[[str, QArray], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Every leaf as Hugging Face tensors: dense leaves in float16 (kernels transposed to [out, in]).

  Args:
    params: the Flax parameter tree.
    quantized: ``(module name, QArray) -> {suffix: array}`` for quantized leaves.

  Raises:
    ValueError: naming the tensor when a dense value overflows float16.
  """
  tensors = {}
  for path, leaf in leaves_with_paths(params):
    name = hf_tensor_name(path)
    if is_qarray(leaf):
      module = name.removesuffix(".weight")
      tensors.update({f"{module}.{suffix}": value for suffix, value in quantized(module, leaf).items()})
      continue
    w = np.asarray(leaf, np.float32)
    half = (w.T if path.endswith("/kernel") else w).astype(np.float16)
    if not np.isfinite(half).all():
      raise ValueError(f"{name}: values beyond float16's range (max |x| = {np.abs(w).max():.4g}).")
    tensors[name] = np.ascontiguousarray(half)
  return tensors


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Tensors in name order (a module's tensors together), cut into shards of at most `max_shard_bytes`."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  return shards


def _save_weights(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  with open(os.path.join(directory, WEIGHTS_INDEX), "w") as f:
    json.dump(index, f, indent=2)


def write_hf_directory(
  out_dir: str,
  config: LlamaConfig,
  tensors: dict[str, np.ndarray],
  quantization_config: dict[str, Any],
  tokenizer,
  *,
  max_shard_bytes: int = MAX_SHARD_BYTES,
  extra_json: dict[str, dict] | None = None,
) -> None:
  """Writes a quantized Hugging Face directory: weights, ``config.json``, extra JSON files, the tokenizer.

  The directory is written beside `out_dir` and renamed when complete; an existing `out_dir` is replaced
  only then.

  Args:
    out_dir: the directory to create.
    config: the model config (written with ``torch_dtype: float16`` and `quantization_config`).
    tensors: Hugging Face name -> array.
    quantization_config: the ``config.json["quantization_config"]`` block.
    tokenizer: a `transformers` tokenizer, saved beside the weights (None: no tokenizer files).
    max_shard_bytes: largest safetensors file; more tensors go to ``model-0000i-of-0000n.safetensors``
      with ``model.safetensors.index.json``.
    extra_json: more files to write, name -> content (e.g. ``quantize_config.json``).
  """
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    _save_weights(tmp, tensors, max_shard_bytes)
    hf = {**config.to_hf_dict(), "torch_dtype": "float16", "quantization_config": quantization_config}
    for file, content in {"config.json": hf, **(extra_json or {})}.items():
      with open(os.path.join(tmp, file), "w") as f:
        json.dump(content, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def read_quantization_config(model_dir: str) -> dict[str, Any] | None:
  """``config.json["quantization_config"]``, else the legacy ``quantize_config.json`` (AutoGPTQ), else None."""
  qc = _read_json(os.path.join(model_dir, "config.json")).get("quantization_config")
  legacy = os.path.join(model_dir, QUANTIZE_CONFIG)
  if qc is None and os.path.exists(legacy):
    qc = {"quant_method": "gptq", **_read_json(legacy)}
  return qc


def _read_json(path: str) -> dict:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e


class HfTensors:
  """The tensors of a Hugging Face directory (one safetensors file or an index of shards), any dtype.

  Raises:
    FileNotFoundError: naming the missing weights or shard.
    ValueError: naming the file when it is unreadable or truncated.
  """

  def __init__(self, model_dir: str):
    self.source = model_dir
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self.files = {name: os.path.join(model_dir, file) for name, file in json.load(f)["weight_map"].items()}
    elif os.path.exists(os.path.join(model_dir, WEIGHTS)):
      single = os.path.join(model_dir, WEIGHTS)
      with self._open(single) as f:
        self.files = dict.fromkeys(f.keys(), single)
    else:
      raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}.")
    missing = sorted({f for f in self.files.values() if not os.path.exists(f)})
    if missing:
      raise FileNotFoundError(f"{index}: names missing weight files {missing}.")
    self.read: set[str] = set()

  @staticmethod
  def _open(file: str):
    try:
      return safe_open(file, "flax")  # the flax framework reads bfloat16, which numpy cannot
    except SafetensorError as e:
      raise ValueError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from e

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get_many(self, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors by name, as stored (numpy; bfloat16 as ml_dtypes' bfloat16)."""
    missing = [n for n in names if n not in self.files]
    if missing:
      raise ValueError(f"{self.source}: tensors {missing} are missing from the checkpoint.")
    by_file: dict[str, list[str]] = {}
    for name in names:
      by_file.setdefault(self.files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
      with self._open(file) as f:
        for name in file_names:
          out[name] = np.asarray(f.get_tensor(name))
    self.read.update(names)
    return out

  def check_all_read(self) -> None:
    """Raises if the checkpoint holds tensors the config does not describe (they would be silently dropped)."""
    unread = sorted(n for n in set(self.files) - self.read if not n.endswith("rotary_emb.inv_freq"))
    if unread:
      raise ValueError(
        f"{self.source}: tensors the config does not describe: {unread[:5]}{' …' if len(unread) > 5 else ''}."
      )


def linear_shape(config: LlamaConfig, module: str) -> tuple[int, int]:
  """(in, out) of a linear module such as ``model.layers.0.self_attn.k_proj`` or ``lm_head``."""
  q_width, kv_width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  hidden, inter = config.hidden_size, config.intermediate_size
  shapes = {
    "q_proj": (hidden, q_width),
    "k_proj": (hidden, kv_width),
    "v_proj": (hidden, kv_width),
    "o_proj": (q_width, hidden),
    "gate_proj": (hidden, inter),
    "up_proj": (hidden, inter),
    "down_proj": (inter, hidden),
    "lm_head": (hidden, config.vocab_size),
  }
  return shapes[module.rsplit(".", maxsplit=1)[-1]]


def check_tensor(name: str, value: np.ndarray, shape: tuple[int, ...], dtypes: tuple, described: str) -> None:
  """Raises naming the tensor when its shape or dtype is not what the config implies."""
  if tuple(value.shape) != tuple(shape) or np.dtype(value.dtype) not in [np.dtype(d) for d in dtypes]:
    allowed = "/".join(str(np.dtype(d)) for d in dtypes)
    raise ValueError(
      f"{name}: expected shape {tuple(shape)} {allowed} for {described}, got {tuple(value.shape)} {value.dtype}; "
      "the checkpoint's config does not describe its tensors."
    )


def read_hf_params(
  tensors: HfTensors,
  config: LlamaConfig,
  quantized: Callable[[str, tuple[int, int]], QArray],
  *,
  dtype=np.float32,
) -> dict:
  """The Flax parameter tree of a quantized Hugging Face directory.

  Args:
    tensors: the directory's tensors.
    config: the model config.
    quantized: ``(module name, (in, out)) -> QArray`` for linears stored with a ``qweight``.
    dtype: dtype of the dense leaves.

  Raises:
    ValueError: for missing tensors, or tensors the config does not describe.
  """

  def dense(name: str, transpose: bool) -> np.ndarray:
    w = tensors.get_many([name])[name].astype(dtype)
    return np.ascontiguousarray(w.T) if transpose else w

  def leaf(name: str, transpose: bool):
    module = name.removesuffix(".weight")
    if transpose and f"{module}.qweight" in tensors:
      return quantized(module, linear_shape(config, module))
    return dense(name, transpose)

  model: dict = {"embed_tokens": {"embedding": dense("model.embed_tokens.weight", False)}}
  for i in range(config.num_hidden_layers):
    layer: dict = {}
    for name, (path, transpose) in hf_layer_tensors(config, i).items():
      node = layer
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = leaf(name, transpose)
    model[f"layers_{i}"] = layer
  model["norm"] = {"scale": dense("model.norm.weight", False)}
  params = {"model": model}
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": leaf("lm_head.weight", True)}
  tensors.check_all_read()
  return params


# ---- GPTQ directories ----


def gptq_quantization_config(spec: QSpec, *, desc_act: bool, lm_head: bool, checkpoint_format: str) -> dict:
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
    "meta": {"quantizer": [f"qjax:{__version__}"]},
  }


def save_gptq(
  out_dir: str,
  config: LlamaConfig,
  params,
  tokenizer,
  *,
  checkpoint_format: str = "gptq",
  max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
  """Writes quantized params as a GPTQ checkpoint directory that vLLM, TGI and transformers load.

  Every decoder linear must be a ``packed`` `QArray` with one spec (bits 2, 3, 4 or 8); ``lm_head`` may be
  quantized too. Everything else is written in float16 (a tied embedding has no ``lm_head`` tensor).
  ``config.json`` carries ``quantization_config`` and ``quantize_config.json`` the same keys.

  Args:
    out_dir: the directory to create (written beside it and renamed when complete).
    config: the model config.
    params: the Flax parameter tree.
    tokenizer: a `transformers` tokenizer, or None.
    checkpoint_format: "gptq" (v1, for every loader) or "gptq_v2" (GPTQModel and vLLM only).
    max_shard_bytes: largest safetensors file before sharding.

  Raises:
    ValueError: for params a GPTQ config cannot describe (see `model_spec`, `to_gptq`).
  """
  spec = model_spec(params, "GPTQ")
  tensors = hf_tensors(params, lambda module, q: to_gptq(q, checkpoint_format=checkpoint_format, name=module)._asdict())
  desc_act = any(is_qarray(leaf) and leaf.perm is not None for _, leaf in leaves_with_paths(params))
  lm_head = "lm_head.qweight" in tensors
  qc = gptq_quantization_config(spec, desc_act=desc_act, lm_head=lm_head, checkpoint_format=checkpoint_format)
  write_hf_directory(
    out_dir, config, tensors, qc, tokenizer, max_shard_bytes=max_shard_bytes, extra_json={QUANTIZE_CONFIG: qc}
  )


class GptqSettings(NamedTuple):
  """What a GPTQ ``quantization_config`` says about the tensors."""

  bits: int
  group_size: int
  sym: bool | None
  checkpoint_format: str


def gptq_settings(qc: dict[str, Any], source: str) -> GptqSettings:
  """Parses and checks a GPTQ ``quantization_config`` (synonyms ``w_bit``, ``q_group_size``; v1 by default).

  Raises:
    ValueError: naming `source` for unsupported bits, group size, packing or an unknown checkpoint_format.
    NotImplementedError: for GPTQModel per-module ``dynamic`` overrides.
  """
  bits = qc.get("bits", qc.get("w_bit"))
  group_size = qc.get("group_size", qc.get("q_group_size"))
  fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
  if bits not in BITS:
    raise ValueError(f"{source}: GPTQ bits must be one of {BITS}, got {bits!r}.")
  if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
    raise ValueError(f"{source}: GPTQ group_size must be -1 or positive, got {group_size!r}.")
  if fmt not in CHECKPOINT_FORMATS:
    raise ValueError(
      f"{source}: unknown GPTQ checkpoint_format {fmt!r}; qjax reads {CHECKPOINT_FORMATS} (v1 zero points stored "
      "minus one, v2 as is)."
    )
  if qc.get("pack_dtype", "int32") != "int32":
    raise ValueError(f"{source}: GPTQ pack_dtype must be int32, got {qc['pack_dtype']!r}.")
  if qc.get("dynamic"):
    raise NotImplementedError(f"{source}: GPTQModel per-module 'dynamic' overrides are not supported.")
  sym = qc.get("sym")
  return GptqSettings(bits, group_size, None if sym is None else bool(sym), fmt)


def check_gptq_tensors(t: GptqTensors, shape: tuple[int, int], s: GptqSettings, name: str) -> None:
  """Raises naming the tensor when a layer's GPTQ tensors do not have the shapes the config implies."""
  k, n = shape
  spec = QSpec(bits=s.bits, group_size=s.group_size, partial_groups=True)
  groups = spec.num_groups(k)
  described = f"{s.bits}-bit group_size={s.group_size} GPTQ of a ({n}, {k}) linear"
  for length in (k, n):
    check_packable(length, s.bits, "the width", name, "load_gptq")
  check_tensor(f"{name}.qweight", t.qweight, (packing.packed_length(k, s.bits), n), (np.int32,), described)
  check_tensor(f"{name}.qzeros", t.qzeros, (groups, packing.packed_length(n, s.bits)), (np.int32,), described)
  check_tensor(f"{name}.scales", t.scales, (groups, n), (np.float16, np.float32, jnp.bfloat16), described)
  check_tensor(f"{name}.g_idx", t.g_idx, (k,), (np.int32, np.int64), described)
  if (t.g_idx < 0).any() or (t.g_idx >= groups).any():
    raise ValueError(f"{name}.g_idx: values must lie in [0, {groups}), got [{t.g_idx.min()}, {t.g_idx.max()}].")


def load_gptq(model_dir: str, *, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """Reads a GPTQ checkpoint directory (qjax's, GPTQModel's, AutoGPTQ's) into qjax params.

  Args:
    model_dir: a Hugging Face directory whose ``quantization_config`` (or ``quantize_config.json``) says GPTQ.
    dtype: dtype of the dense leaves and of what the QArrays dequantize to.

  Returns:
    ``(config, params)``: quantized linears as `QArray` (see `from_gptq`), the rest dense.

  Raises:
    ValueError: naming the file or tensor for an unknown checkpoint_format, tensors that do not match the
      config (shapes, dtypes, a ``g_idx`` that does not fit the group size, extra tensors), or a truncated file.
    NotImplementedError: for GPTQModel's per-module ``dynamic`` overrides.
  """
  config = LlamaConfig.from_pretrained(model_dir)
  qc = read_quantization_config(model_dir)
  if qc is None:
    raise ValueError(f"{model_dir}: no quantization_config in config.json and no {QUANTIZE_CONFIG}.")
  settings = gptq_settings(qc, os.path.join(model_dir, "config.json"))
  tensors = HfTensors(model_dir)

  def quantized(module: str, shape: tuple[int, int]) -> QArray:
    fields = [f for f in GptqTensors._fields if f != "g_idx" or f"{module}.g_idx" in tensors]
    got = tensors.get_many([f"{module}.{f}" for f in fields])
    values = {f: got[f"{module}.{f}"] for f in fields}
    if "g_idx" not in values:  # optional in old checkpoints: contiguous groups
      spec = QSpec(bits=settings.bits, group_size=settings.group_size, partial_groups=True)
      values["g_idx"] = (np.arange(shape[0]) // spec.group_length(shape[0])).astype(np.int32)
    t = GptqTensors(**values)
    check_gptq_tensors(t, shape, settings, module)
    t = t._replace(g_idx=t.g_idx.astype(np.int32))
    return from_gptq(
      t,
      bits=settings.bits,
      group_size=settings.group_size,
      sym=settings.sym,
      checkpoint_format=settings.checkpoint_format,
      dtype=dtype,
      name=module,
    )

  return config, read_hf_params(tensors, config, quantized, dtype=dtype)
