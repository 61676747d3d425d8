"""W4A16 matmul for Hopper (sm90) with Mosaic GPU: TMA loads, dequantization in registers, wgmma, split-K.

Design (after openxla/tokamax ``pallas_mosaic_gpu_kernel_sm90_quant*.py`` and JAX's
``hopper_mixed_type_matmul_mgpu.py``):

* **Swap A and B.** ``wgmma`` takes its A operand from registers and needs M = 64 rows,
  while decode has 1 to 16 tokens. So each compute warpgroup computes
  ``out.T[64 rows of n, tokens] += W_tile (64, block_k) @ x_tile.T (block_k, block_m)``:
  the dequantized weights are the register A operand and the tokens are wgmma's N
  (8 to 128, a multiple of 8).
* **Dequantization in registers.** The int4 tile is read from shared memory in the
  ``WGMMA_UPCAST_4X`` layout, cast to ``WGMMA`` and converted to the activation dtype
  (Mosaic GPU emits the prmt/lop3 magic-bias conversion), zero-shifted, scaled by the
  group's scale broadcast along k, and handed to ``wgmma``. The dense weight never
  exists outside registers.
* **Warp specialization.** One memory warpgroup issues TMA copies (weights, tokens,
  scales, zeros) into a ``max_concurrent_steps``-deep ring; two compute warpgroups
  consume it (`plgpu.emit_pipeline_warp_specialized`). A CTA covers 128 output channels.
* **Split-K.** The grid is ``(m tiles, n / 128, split_k)``; split ``s`` reduces k-steps
  ``[s, s + 1) * k_steps / split_k``. With decode shapes ``n / 128`` alone leaves most of
  the 132 SMs idle (64 CTAs at n = 8192), so `split_k` is picked to fill them. Each split
  writes its float32 partial, transposed, to ``(split_k, n, m)``; the sum, transpose and
  cast back to the activation dtype is one small XLA fusion.

Weights come in the kernel layout (`layout.to_kernel_layout`): (n, k) int4, k minor, so a TMA tile
``(128, block_k)`` is exactly the A operands of the two compute warpgroups.

Verification status: lowered for sm90 on CPU (``jax.export`` with ``platforms=["cuda"]``
runs Mosaic GPU's layout inference and dialect lowering) and run under Mosaic GPU
interpret mode against the reference. JAX 0.12's GPU interpreter only takes shared-memory
``wgmma`` operands, so under interpretation (only) the dequantized tile is staged
through shared memory before the ``wgmma``; everything else is the same program. Not yet
run on hardware: ``scripts/bench_kernels.py`` checks it against the reference on the card
before timing it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul import common

WG_ROWS = 64  # wgmma's M: output channels per compute warpgroup
COMPUTE_WGS = 2
CTA_ROWS = COMPUTE_WGS * WG_ROWS
BLOCK_M_CHOICES = (8, 16, 32, 64, 128)  # wgmma N; tokens per CTA tile
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))  # wgmma operand dtypes (f32 would run as tf32)
DEFAULT_NUM_SMS = 132  # H100 SXM / H200; used when no GPU is attached (interpret mode)
_HOPPER_KINDS = ("H100", "H200", "H800", "H20")
_WEIGHT_BYTES_IN_FLIGHT = 32 * 1024  # per CTA: ~ HBM bandwidth x latency / SMs
_SMEM_BUDGET = 200 * 1024  # of the 227 KiB an sm90 block may use, leaving room for barriers
_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HopperConfig:
  """Tiling of `qmatmul_hopper`; None fields are derived from the shape (see `resolve`).

  Attributes:
    block_m: tokens per CTA tile (wgmma N), one of `BLOCK_M_CHOICES`.
    block_k: contraction per pipeline step, a multiple of 64 that divides k and either
      divides the group size or spans two groups (g32 with ``block_k=64``).
    split_k: number of k splits; must divide ``k / block_k``.
    max_concurrent_steps: depth of the TMA ring.
  """

  block_m: int | None = None
  block_k: int | None = None
  split_k: int | None = None
  max_concurrent_steps: int | None = None

  def __post_init__(self):
    if self.block_m is not None and self.block_m not in BLOCK_M_CHOICES:
      raise ValueError(f"`HopperConfig` expected block_m in {BLOCK_M_CHOICES}, got {self.block_m=}.")
    if self.block_k is not None and (self.block_k <= 0 or self.block_k % 64):
      raise ValueError(f"`HopperConfig` expected block_k a positive multiple of 64, got {self.block_k=}.")
    for name in ("split_k", "max_concurrent_steps"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"`HopperConfig` expected {name} >= 1, got {value}.")


# Measured winners of scripts/bench_kernels.py, keyed by (device kind, activation dtype, k, n,
# m bucket). Empty until the sweep runs on a card: no entry here is a guess.
TUNED: dict[tuple[str, str, int, int, int], HopperConfig] = {}


def _is_hopper(device) -> bool:
  if device.platform != "gpu":
    return False
  capability = getattr(device, "compute_capability", None)  # absent on an abstract device
  return capability == "9.0" if capability is not None else any(h in device.device_kind for h in _HOPPER_KINDS)


def _num_sms(device) -> int:
  return getattr(device, "core_count", None) or getattr(device, "num_cores", None) or DEFAULT_NUM_SMS


def _pick_block_k(k: int, group: int) -> int | None:
  for bk in (128, 64):
    if k % bk == 0 and group % bk == 0:
      return bk
  # Groups of 32 are narrower than the 64-wide int4 tile TMA can swizzle: two per step.
  return 64 if group == 32 and k % 64 == 0 else None


def _split_ok(split: int, k_steps: int, steps_per_group: int) -> bool:
  """A split must divide the k-steps, and each split must span whole groups or lie inside one."""
  if k_steps % split:
    return False
  steps = k_steps // split
  return steps % steps_per_group == 0 or steps_per_group % steps == 0


def _pick_split_k(tiles: int, k_steps: int, steps_per_group: int, num_sms: int, max_split: int) -> int:
  """The smallest split whose CTAs fill 90% of whole waves (one CTA per SM), else the best-filling one.

  Splits keep >= 2 k-steps each and at most `max_split`, which bounds the float32 partials
  (written and re-read once) to half the weight bytes.
  """
  best, best_fill = 1, 0.0
  for split in range(1, min(k_steps // 2, max_split) + 1):
    if not _split_ok(split, k_steps, steps_per_group):
      continue
    ctas = tiles * split
    fill = ctas / (-(-ctas // num_sms) * num_sms)
    if fill >= 0.9:
      return split
    if fill > best_fill:
      best, best_fill = split, fill
  return best


def resolve(config: HopperConfig, m: int, k: int, n: int, group: int, num_sms: int) -> HopperConfig:
  """Fills the None fields of `config` for an (m, k) x (k, n) problem."""
  block_m = config.block_m or next((b for b in BLOCK_M_CHOICES if b >= m), BLOCK_M_CHOICES[-1])
  block_k = config.block_k or _pick_block_k(k, group)
  k_steps = k // block_k
  tiles = -(-m // block_m) * (n // CTA_ROWS)
  m_pad = -(-m // block_m) * block_m
  max_split = max(1, k // (16 * m_pad))  # split * m_pad * n * 4 bytes <= (k * n / 2) / 2
  split_k = config.split_k or _pick_split_k(tiles, k_steps, max(group // block_k, 1), num_sms, max_split)
  w_bytes = CTA_ROWS * block_k // 2
  stage_bytes = w_bytes + block_m * block_k * 2 + 2 * 4 * CTA_ROWS  # weights, tokens, scales and zeros
  out_bytes = CTA_ROWS * block_m * 4
  stages = config.max_concurrent_steps or max(2, min(8, _WEIGHT_BYTES_IN_FLIGHT // w_bytes))
  while config.max_concurrent_steps is None and stages > 2 and stages * stage_bytes + out_bytes > _SMEM_BUDGET:
    stages -= 1
  return HopperConfig(
    block_m=block_m, block_k=block_k, split_k=split_k, max_concurrent_steps=min(stages, k_steps // split_k)
  )


def unsupported_reason(x, w: QArray, *, config: HopperConfig | None = None, interpret=False) -> str | None:
  """Why `qmatmul_hopper` cannot run ``x @ w`` here, or None. Accepts `jax.ShapeDtypeStruct` leaves."""
  if not interpret and not _is_hopper(common.target_device()):
    return "no Hopper (sm90) GPU"
  reason = common.packed_int4_reason(w) or common.activation_reason(x, w.canonical_shape[0], DTYPES)
  if reason:
    return reason
  k, n = w.canonical_shape
  group = common.group_size(w)
  if n % CTA_ROWS:
    return f"n={n} is not a multiple of {CTA_ROWS}"
  block_k = (config and config.block_k) or _pick_block_k(k, group)
  if block_k is None or k % block_k or not (group % block_k == 0 or block_k == 2 * group):
    return f"no contraction block for k={k}, group={group} (block_k must divide k and the group, or be 2 groups)"
  split_k = config.split_k if config is not None else None
  if split_k is not None and not _split_ok(split_k, k // block_k, max(group // block_k, 1)):
    return f"split_k={split_k} must divide k / block_k = {k // block_k} into whole groups or parts of one"
  return None


def supported(x, w: QArray, *, config: HopperConfig | None = None, interpret=False) -> bool:
  """True if `qmatmul_hopper` handles these shapes and dtypes on this device (or interpreted).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qjax.core import QSpec, quantize
    >>> from qjax.kernels.qmatmul.layout import to_kernel_layout
    >>> w = jax.eval_shape(lambda: to_kernel_layout(quantize(jnp.ones((512, 256)), QSpec(group_size=128))))
    >>> supported(jax.ShapeDtypeStruct((4, 512), jnp.bfloat16), w, interpret=True)
    True
    >>> supported(jax.ShapeDtypeStruct((4, 512), jnp.float32), w, interpret=True)
    False
  """
  return unsupported_reason(x, w, config=config, interpret=interpret) is None


def _smem_transforms(shape: tuple[int, ...], dtype) -> tuple:
  bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits
  swizzle = plgpu.find_swizzle(shape[-1] * bits, "qmatmul_hopper")
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _group_operand(ref, rows, shape, dtype, group: int) -> Array:
  """A (r, CTA_ROWS) scale or zero tile as this warpgroup's (64, block_k) operand, in registers.

  Row ``i`` of the tile covers k-columns ``[i * group, (i + 1) * group)`` of the block.
  """
  values = [
    lax.broadcast_in_dim(plgpu.load(ref.at[i, rows], layout=_WGMMA_ROW).astype(dtype), shape, [0])
    for i in range(ref.shape[0])
  ]
  out = values[-1]
  if len(values) > 1:
    col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WGMMA)
    for i in range(len(values) - 2, -1, -1):
      out = jnp.where(col < (i + 1) * group, values[i], out)
  return out


def _build(m_pad: int, k: int, n: int, group: int, dtype, has_zero: bool, cfg: HopperConfig, interpret):
  """The `plgpu.kernel` computing float32 partials (split_k, n, m_pad)."""
  block_m, block_k, split_k = cfg.block_m, cfg.block_k, cfg.split_k
  steps = k // block_k // split_k
  group_rows = max(block_k // group, 1)  # scale rows per k-step
  steps_per_group = max(group // block_k, 1)
  split_rows = max(steps * group_rows // steps_per_group, 1)  # a split spans whole groups or lies in one
  stage_a = bool(interpret)  # see the module docstring

  def kernel(*refs, out_smem, a_smem=None):
    x_gmem, w_gmem, s_gmem, *z_gmem, out_gmem = refs
    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    k_slice = pl.ds(si * steps * block_k, steps * block_k)
    n_slice = pl.ds(ni * CTA_ROWS, CTA_ROWS)
    # Scale rows of this split, sliced here rather than offset in the index map: an index map
    # closing over the split index hangs Mosaic GPU interpret mode (JAX 0.12).
    g_slice = pl.ds(si * steps * group_rows // steps_per_group, split_rows)
    group_map = lambda kk: (kk // steps_per_group, 0)
    in_specs = [
      plgpu.BlockSpec((CTA_ROWS, block_k), lambda kk: (0, kk), transforms=_smem_transforms((block_k,), jnp.int4)),
      plgpu.BlockSpec((block_m, block_k), lambda kk: (0, kk), transforms=_smem_transforms((block_k,), dtype)),
      plgpu.BlockSpec((group_rows, CTA_ROWS), group_map),
    ]
    operands = [
      w_gmem.at[n_slice, k_slice],
      x_gmem.at[pl.ds(mi * block_m, block_m), k_slice],
      s_gmem.at[g_slice, n_slice],
    ]
    if has_zero:
      in_specs.append(plgpu.BlockSpec((group_rows, CTA_ROWS), group_map))
      operands.append(z_gmem[0].at[g_slice, n_slice])

    def step(_, w_smem, x_smem, s_smem, *rest):
      *z_smem, acc_ref = rest
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * WG_ROWS, WG_ROWS)
      w = plgpu.load(w_smem.at[rows], layout=plgpu.Layout.WGMMA_UPCAST_4X)
      w = plgpu.layout_cast(w, _WGMMA).astype(dtype)
      if z_smem:
        w = w - _group_operand(z_smem[0], rows, w.shape, dtype, group)
      w = w * _group_operand(s_smem, rows, w.shape, dtype, group)
      if stage_a:
        a_smem.at[wg][...] = w
        plgpu.commit_smem()
        w = a_smem.at[wg]
      plgpu.wgmma(acc_ref, w, x_smem.T)
      plgpu.wgmma_wait(0)
      return acc_ref

    def compute_context(run_pipeline):
      def with_acc(acc_ref):
        run_pipeline(acc_ref)
        wg = lax.axis_index("wg")
        out_smem.at[wg][...] = acc_ref[...]
        plgpu.commit_smem()
        rows = pl.ds(ni * CTA_ROWS + wg * WG_ROWS, WG_ROWS)
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[si, rows, pl.ds(mi * block_m, block_m)])
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(with_acc, plgpu.ACC((WG_ROWS, block_m), jnp.float32))

    plgpu.emit_pipeline_warp_specialized(
      step,
      grid=(steps,),
      memory_registers=40,
      in_specs=in_specs,
      wg_axis="wg",
      num_compute_wgs=COMPUTE_WGS,
      max_concurrent_steps=cfg.max_concurrent_steps,
      compute_context=compute_context,
    )(*operands)

  scratch = dict(
    out_smem=plgpu.SMEM(
      (COMPUTE_WGS, WG_ROWS, block_m), jnp.float32, transforms=_smem_transforms((block_m,), jnp.float32)
    )
  )
  if stage_a:
    scratch["a_smem"] = plgpu.SMEM(
      (COMPUTE_WGS, WG_ROWS, block_k), dtype, transforms=_smem_transforms((block_k,), dtype)
    )
  return plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct((split_k, n, m_pad), jnp.float32),
    grid=(m_pad // block_m, n // CTA_ROWS, split_k),
    grid_names=("m", "n", "s"),
    num_threads=COMPUTE_WGS + 1,
    thread_name="wg",
    scratch_types=scratch,
    interpret=interpret,
  )


# Jitted so that identical calls (every layer of a model) are traced and lowered once.
@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul_hopper(
  x: Float[Array, "... k"],
  w: QArray,
  *,
  config: HopperConfig | None = None,
  interpret: bool | plgpu.InterpretGPUParams = False,
) -> Float[Array, "... n"]:
  """``x @ W`` on Hopper, never materializing the dense ``W``; same contract as `qmatmul_reference`.

  Kernel refs (per CTA ``(mi, ni, si)``, all in GMEM, tiles staged through SMEM by TMA):
    x: (m_pad, k) bfloat16|float16 tokens (act-order applied, padded to ``block_m``);
      SMEM tile (block_m, block_k), swizzled.
    w: (n, k) int4 codes ``q - 8``; SMEM tile (128, block_k), swizzled; each compute
      warpgroup loads its (64, block_k) half into registers.
    scale, zero: (groups, n) in the scale dtype; SMEM tile (r, 128) with ``r`` groups per
      k-step (1, or 2 for g32).
    out: (split_k, n, m_pad) float32 partials, written through a (2, 64, block_m) SMEM tile.

  Args:
    x: (..., k) bfloat16|float16 activations.
    w: a kernel-layout `QArray` of canonical shape (k, n) (`to_kernel_layout`).
    config: tiling; None fields (or None) are derived from the shape and the tuned table.
    interpret: run under Mosaic GPU interpret mode on CPU (True or `plgpu.InterpretGPUParams`).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32.

  Raises:
    NotImplementedError: for shapes or dtypes the kernel does not take (see `supported`).
  """
  reason = unsupported_reason(x, w, config=config, interpret=bool(interpret))
  if reason:
    raise NotImplementedError(f"`qmatmul_hopper`: {reason}.")
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  k, n = w.canonical_shape
  x2, lead = common.flatten_tokens(common.permute_activations(x, w.perm))
  m = x2.shape[0]
  num_sms = _num_sms(common.target_device())
  base = config or common.lookup(TUNED, common.device_kind(), x.dtype, k, n, m, HopperConfig())
  cfg = resolve(base, m, k, n, common.group_size(w), num_sms)
  m_pad = -(-m // cfg.block_m) * cfg.block_m
  x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
  kernel = _build(m_pad, k, n, common.group_size(w), x.dtype, w.zero is not None, cfg, interpret)
  operands = (x2, w.codes, w.scale) + (() if w.zero is None else (w.zero,))
  partials = kernel(*operands)
  out = partials.sum(axis=0).T[:m].astype(x.dtype)
  return out.reshape(*lead, n)
