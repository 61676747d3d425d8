"""`QSpec`: how a weight matrix is quantized (static configuration, hashable under jit)."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from qjax.core import ggml
from qjax.core.affine import AffineGrid
from qjax.core.ggml_grid import GgmlGrid
from qjax.core.grid import Grid, TensorGrid
from qjax.core.packing import SUPPORTED_BITS

PACKED = "packed"
"""Codes bit-packed as uint32 words along the contraction axis (GPTQ's qweight order), parameters beside them."""

KERNEL = "kernel_int4"
"""4-bit codes as a (n, k) `jnp.int4` array of ``q - 8``, the zero point as ``z - 8`` in the scale dtype: the layout
the GPU kernels and XLA's int4 path read (`qjax.kernels.to_kernel_layout`)."""

LAYOUTS = (PACKED, KERNEL, *ggml.BLOCK_TYPES)
_FLOAT16 = np.dtype(np.float16)
SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class QSpec:
  """How to quantize one weight matrix: which grid, how wide its groups are, how the codes are stored.

  Attributes:
    bits: code width, one of 2, 3, 4, 5, 6, 8.
    group_size: number of consecutive input channels sharing the grid's parameters; -1 means one group per
      output channel (per-channel quantization).
    symmetric: for the affine grid: codes centred on the fixed zero ``2**(bits-1)`` and no zero point stored;
      if False, each group has an integer zero point.
    scale_dtype: dtype the affine grid's scales are stored in (float16 by default, as GPTQ and AWQ checkpoints
      store them); codes are computed against the rounded scale so that dequantization is exactly what an
      exporter writes.
    layout: how codes are stored: ``"packed"`` (`PACKED`), ``"kernel_int4"`` (`KERNEL`), or a ggml block type
      (``"Q4_K"`` …) whose codes are the ggml block bytes themselves (use `QSpec.ggml`).
    partial_groups: allow a group size that does not divide the input dimension; the last group is then shorter
      (``ceil(in / group_size)`` groups, input ``i`` in group ``i // group_size``), as GPTQ checkpoints define it
      (AutoGPTQ, GPTQModel and transformers accept it; vLLM's GPTQ kernels and AWQ do not). Off by default so a
      mismatched group size is reported rather than silently producing a short group.
    grid: a rounding grid (`qjax.core.grid.Grid`) other than the default; give one to round into another number
      format (its codes must be `bits` wide; a custom grid's parameters are stored in the `QArray`'s ``scale`` and
      ``zero``). None (the default, and what a grid equal to the default is stored as) means the grid that
      `bits`, `symmetric`, `scale_dtype` and `layout` imply, so ``dataclasses.replace(spec, bits=3)`` gives the
      3-bit grid rather than keeping the 4-bit one. Read the grid in use from `rounding_grid`.

  Examples:
    >>> QSpec(bits=4, group_size=128).rounding_grid
    AffineGrid(bits=4, symmetric=True, scale_dtype=dtype('float16'), clip=None)
  """

  bits: int = 4
  group_size: int = 128
  symmetric: bool = True
  scale_dtype: np.dtype = _FLOAT16
  layout: str = PACKED
  partial_groups: bool = False
  grid: Grid | None = None

  def __post_init__(self):
    object.__setattr__(self, "scale_dtype", np.dtype(self.scale_dtype))
    if self.layout not in LAYOUTS:
      raise ValueError(f"`QSpec` expected layout in {LAYOUTS}, got {self.layout=}.")
    if self.bits not in SUPPORTED_BITS:
      raise ValueError(f"`QSpec` expected bits in {SUPPORTED_BITS}, got {self.bits=}.")
    if self.group_size != -1 and self.group_size <= 0:
      raise ValueError(f"`QSpec` expected group_size > 0 or -1 (per channel), got {self.group_size=}.")
    if self.scale_dtype not in SCALE_DTYPES:
      names = [str(d) for d in SCALE_DTYPES]
      raise ValueError(f"`QSpec` expected scale_dtype in {names}, got {self.scale_dtype}.")
    if self.layout == KERNEL and self.bits != 4:
      raise ValueError(f"`QSpec` layout {KERNEL} holds 4-bit codes, got {self.bits=}.")
    if self.is_ggml:
      info = ggml.BLOCK_TYPES[self.layout]
      if (self.bits, self.group_size, self.symmetric) != (info.bits, info.block_size, info.symmetric):
        raise ValueError(
          f"`QSpec` layout {self.layout} has bits={info.bits}, group_size={info.block_size}, "
          f"symmetric={info.symmetric}; build it with `QSpec.ggml({self.layout!r})`."
        )
    if self.grid is None:
      return
    if not isinstance(self.grid, Grid):
      raise TypeError(f"`QSpec` expected a grid with fit, round and dequantize, got {type(self.grid).__name__}.")
    if self.grid.bits != self.bits and not self.is_ggml:
      raise ValueError(f"`QSpec` expected a grid of {self.bits}-bit codes, got {self.grid.bits=}.")
    if self.grid == self._default_grid():
      object.__setattr__(self, "grid", None)  # one spelling per spec: equal specs hash and compare equal

  def _default_grid(self) -> Grid:
    if self.is_ggml:
      return GgmlGrid(self.layout)
    return AffineGrid(bits=self.bits, symmetric=self.symmetric, scale_dtype=self.scale_dtype)

  @property
  def rounding_grid(self) -> Grid:
    """The grid codes are rounded into: `grid` if one was given, else the one the other fields imply."""
    return self._default_grid() if self.grid is None else self.grid

  def for_tensor(self, amax) -> "QSpec":
    """This spec with its grid's per-tensor parameter set from a matrix's largest magnitude `amax`, if the grid has
    one not yet set (`qjax.core.grid.TensorGrid`, e.g. NVFP4's global scale); else this spec.

    Quantizers call it once per matrix before their jitted work; with a traced `amax` the result holds a traced
    parameter and serves only inside that trace (it cannot be a static argument).
    """
    return dataclasses.replace(self, grid=self.grid.for_tensor(amax)) if self.needs_tensor_fit else self

  @property
  def needs_tensor_fit(self) -> bool:
    """Whether the grid has a per-tensor parameter not yet set (see `for_tensor`)."""
    return isinstance(self.grid, TensorGrid) and not self.grid.fixed

  @staticmethod
  def ggml(type_name: str) -> "QSpec":
    """The spec of a ggml block type, e.g. ``QSpec.ggml("Q4_K")``."""
    if type_name not in ggml.BLOCK_TYPES:
      raise ValueError(f"`QSpec.ggml` expected one of {tuple(ggml.BLOCK_TYPES)}, got {type_name!r}.")
    info = ggml.BLOCK_TYPES[type_name]
    return QSpec(bits=info.bits, group_size=info.block_size, symmetric=info.symmetric, layout=type_name)

  @property
  def is_ggml(self) -> bool:
    return self.layout in ggml.BLOCK_TYPES

  @property
  def has_default_grid(self) -> bool:
    """Whether the grid is the one `bits`, `symmetric`, `scale_dtype` and `layout` imply (it need not be saved)."""
    return self.grid is None

  def check_divides(self, fn: str, in_features: int, shape: tuple[int, ...]) -> None:
    """Raises the standard error when the group size does not divide `in_features` (and may not)."""
    if self.group_size == -1 or in_features % self.group_size == 0 or self.partial_groups:
      return
    raise ValueError(
      f"`{fn}` expected group_size to divide the input dimension, got group_size={self.group_size} for "
      f"shape={tuple(shape)} (in={in_features}); use a divisor of {in_features}, group_size=-1 (per channel), "
      "or partial_groups=True for a shorter last group (GPTQ checkpoints allow it)."
    )

  def num_groups(self, in_features: int) -> int:
    """Number of groups along an input (contraction) axis of length `in_features` (the last may be shorter)."""
    return 1 if self.group_size == -1 else -(-in_features // self.group_size)

  def group_length(self, in_features: int) -> int:
    return in_features if self.group_size == -1 else self.group_size

  def padded_length(self, in_features: int) -> int:
    """`in_features` rounded up to whole groups."""
    return self.num_groups(in_features) * self.group_length(in_features)

  def bits_per_weight(self, in_features: int) -> float:
    """Storage cost per weight, codes plus scales and zeros."""
    if self.is_ggml:
      return ggml.BLOCK_TYPES[self.layout].bits_per_weight
    group = self.group_length(in_features)
    scale_bits = getattr(self.rounding_grid, "scale_bits", self.scale_dtype.itemsize * 8)  # MX/NV FP4: byte scales
    per_group = scale_bits + (0 if self.symmetric else self.bits)
    return self.bits + per_group / group
