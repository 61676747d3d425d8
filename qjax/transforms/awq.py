"""The AWQ transform: activation-aware scales folded into a block's params, then clipping.

AWQ works across several leaves of a block: a scale group (`qjax.transforms.equivalence.ScaleGroup`) is the
operation that produces an input (a norm, or a linear) and the linears that read it. For each group it searches
the scales (`qjax.quantizers.awq.search_scale`) on the error of the block part the group feeds, folds ``s`` into
the linears and ``1/s`` into the producer (`fold_scales`), so the float model computes the same function, then
searches clipping bounds for the linears (`search_clip`). Rounding is left to the next stage (RTN, GPTQ,
llama.cpp's encoders).

It runs the block itself, inside the calibration runner, which passes the block's inputs and function and a
block model that names the block's scale groups (``scale_groups``).

A mixture of experts' layer (AutoAWQ's Mixtral scheme): its norm's scales are searched over every expert's gate
and up kernels at once (on the sparse block's output; the float router absorbs them exactly), then each expert's
up -> down scales on its own rows, every expert with its own α; an expert calibration never reached keeps ``s = 1``.
Clipping runs expert by expert on each expert's own inputs.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import QSpec
from qjax.core.grouped import GroupedRows
from qjax.core.tree import get_path, replace_path
from qjax.quantizers import awq as awq_core
from qjax.transforms.base import Transform, each_matrix, per_block
from qjax.transforms.capture import capture_linear_inputs, module_call
from qjax.transforms.equivalence import ScaleGroup, fold_scales, input_rows


class _Jitted:
  """Jitted pieces of the AWQ search, compiled once per (block function, scale group) and reused by every block."""

  def __init__(self, spec: QSpec, n_grid: int, max_shrink: float):
    self.spec, self.n_grid, self.max_shrink = spec, n_grid, max_shrink
    self._fns: dict = {}
    search = functools.partial(awq_core.search_clip, spec=spec, n_grid=n_grid, max_shrink=max_shrink)
    clip_one = lambda w, x: awq_core.apply_clip(w, search(w, x), spec)
    # `w` clamped to its searched bounds on sample inputs `x`; a stack of experts one expert after another
    # (`lax.map`, not `each_matrix`'s vmap: the search's intermediates, times E, would not fit).
    self.clip = jax.jit(lambda w, x: jax.lax.map(lambda a: clip_one(*a), (w, x)) if w.ndim == 3 else clip_one(w, x))

  def capture(self, block_fn, inspect: str):
    """``(block, h) -> (args, kwargs, out)`` of the module at `inspect`, and a holder for that module."""
    key = ("capture", block_fn, inspect)
    if key not in self._fns:
      run, found = module_call(block_fn, inspect)
      self._fns[key] = (jax.jit(run), found)
    return self._fns[key]

  def search(self, module, relative: tuple[str, ...], duo: bool, per_expert: bool):
    """``(sub_params, kernels, x_mean, calls) -> s``: the scale search of one group (`per_expert`: x_mean (E, in),
    one search per expert, its error measured on its own rows)."""
    key = ("search", module, relative, duo, per_expert)
    if key not in self._fns:
      spec = self.spec

      def loss(s, sub, kernels, calls):
        candidate = sub
        for rel, w in zip(relative, kernels, strict=True):
          rows = input_rows(s, w.ndim)
          # A stack of experts' kernels rounds expert by expert, as it is quantized.
          fq = each_matrix(awq_core.fake_quantize, jnp.asarray(w, jnp.float32) * rows, spec=spec) / rows
          candidate = replace_path(candidate, "kernel" if rel == "" else f"{rel}/kernel", fq.astype(w.dtype))
        err = 0.0
        for args, kwargs, ref in calls:
          out = module.apply({"params": candidate}, *args, **kwargs)
          out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
          squared = (out.astype(jnp.float32) - ref.astype(jnp.float32)) ** 2
          err = err + (_per_expert_sum(squared, args[0], s.shape[0]) if per_expert else jnp.sum(squared))
        return err

      def search(sub, kernels, x_mean, calls):
        salience = lambda *ws: awq_core.weight_salience(list(ws), spec.group_size)
        w_mean = (jax.vmap(salience)(*kernels) if per_expert else salience(*kernels)) if duo else None
        s, _ = awq_core.search_scale(x_mean, w_mean, lambda s: loss(s, sub, kernels, calls), n_grid=self.n_grid)
        return s

      self._fns[key] = jax.jit(search)
    return self._fns[key]


def _per_expert_sum(values: jax.Array, rows: GroupedRows, experts: int) -> jax.Array:
  """(E,) sums of `values` (rows, ...) over each expert's rows of `rows` (padding rows hold zeros)."""
  per_tile = jnp.sum(values.reshape(rows.tile_expert.shape[0], -1), axis=1)
  return jax.ops.segment_sum(per_tile, rows.tile_expert, num_segments=experts)


def _activation_salience(group_stats: dict, per_expert: bool) -> tuple[np.ndarray, np.ndarray | None]:
  """``(x̄, tokens)``: the mean |x| of a group's input, and the tokens each expert saw (None for a dense layer).
  Per expert, or (a norm feeding every expert) pooled over the experts: every token counted once per expert it
  reaches, as it is in the experts' matmuls."""
  x_mean = np.asarray(group_stats["abs_mean"])
  if "routed" not in group_stats:
    return x_mean, None
  tokens = np.asarray(group_stats["tokens"])
  if per_expert:
    return x_mean, tokens
  return np.tensordot(tokens / max(tokens.sum(), 1), x_mean, axes=1).astype(np.float32), None


def _search_group(jitted: _Jitted, block, group: ScaleGroup, batches, block_fn, stats, duo: bool):
  producer = get_path(block, group.prev)
  per_expert = "kernel" in producer and np.ndim(producer["kernel"]) == 3
  x_mean, tokens = _activation_salience(stats[f"{group.linears[0]}/kernel"], per_expert)
  capture, found = jitted.capture(block_fn, group.inspect)
  calls = [capture(block, h) for h in batches]
  relative = tuple(m.removeprefix(f"{group.inspect}/") if m != group.inspect else "" for m in group.linears)
  kernels = [get_path(block, f"{m}/kernel") for m in group.linears]
  search = jitted.search(found["module"], relative, duo, per_expert)
  s = search(get_path(block, group.inspect), kernels, jnp.asarray(x_mean), calls)
  if tokens is not None:  # an expert calibration never reached: nothing measured, nothing to protect
    s = jnp.where(jnp.asarray(tokens)[:, None] > 0, s, 1.0)
  return s


def awq(
  spec: QSpec,
  *,
  n_grid: int = 20,
  duo_scaling: bool = True,
  clip: bool = True,
  max_shrink: float = 0.5,
  clip_tokens: int = 512,
  search_tokens: int | None = None,
) -> Transform:
  """AWQ scaling (and clipping) of a block's float params; follow it with a rounding transform.

  Args:
    spec: the grid the weights will be rounded to (the search fake-quantizes on it).
    n_grid: grid points of the scale exponent α in ``[0, 1)``.
    duo_scaling: divide by the weight salience ``w̄^(1-α)`` too (AutoAWQ's default).
    clip: run the clipping search on every scaled linear except those the model excludes
      (q/k in the Llama family: their product is hard to clip precisely).
    max_shrink: the largest relative shrink of a group's range tried by the clip search.
    clip_tokens: sample tokens for the clip search.
    search_tokens: run the scale search on the first calibration batches holding at least this many tokens
      (None: all of them); the search runs the block part once per grid point, so on a CPU this bounds its cost.
      The activation statistics ``x̄`` always cover every token.

  Raises (from update):
    ValueError: outside the calibration runner, or for a block whose model names no scale groups.

  References:
    Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
    Acceleration", MLSys 2024 (arXiv:2306.00978); checked against AutoAWQ
    ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_compute_best_clip``).
  """

  jitted = _Jitted(spec, n_grid, max_shrink)

  def awq_block(block, *, stats, block_model, block_inputs=None, block_fn=None, block_prefix=None, **_):
    groups = getattr(block_model, "scale_groups", None)
    if groups is None:
      raise ValueError(
        f"`awq` does not know the scale groups of block {block_prefix!r} ({type(block_model).__name__} names "
        "none); add `scale_groups` to its block model rather than skipping AWQ silently."
      )
    batches = list(block_inputs)
    searched = batches
    if search_tokens is not None:
      counts = np.cumsum([int(np.prod(b.shape[:-1])) for b in batches])
      searched = batches[: int(np.searchsorted(counts, search_tokens)) + 1]
    for group in groups(block):
      s = _search_group(jitted, block, group, searched, block_fn, stats, duo_scaling)
      block = fold_scales(block, group, s)
    if clip:
      block = _clip_block(jitted, block, batches, block_fn, block_model, clip_tokens)
    return block

  return per_block(awq_block, stats=frozenset({"abs_mean"}), name="`awq`")


def _clip_block(jitted: _Jitted, block, batches, block_fn, block_model, clip_tokens: int):
  skip = set(getattr(block_model, "no_clip", ()))
  linears = [m for g in block_model.sequential_groups(block) for m in g if m not in skip]
  samples = _sample_inputs(jitted, block, batches, block_fn, clip_tokens)
  for m in linears:
    block = replace_path(block, f"{m}/kernel", jitted.clip(get_path(block, f"{m}/kernel"), samples[m]))
  return block


def _expert_inputs(rows: GroupedRows) -> list[np.ndarray]:
  """Each expert's rows of `rows` (on the host), padding left out."""
  x, padded, sizes = (np.asarray(a) for a in (rows.x, rows.padded_sizes, rows.group_sizes))
  starts = np.cumsum(padded) - padded
  return [x[start : start + n] for start, n in zip(starts, sizes, strict=True)]


def _evenly(x: np.ndarray, tokens: int) -> np.ndarray:
  return x[:: max(1, len(x) // tokens)][:tokens]


def _sample_inputs(jitted: _Jitted, block, batches: Sequence, block_fn, tokens: int) -> dict[str, np.ndarray]:
  """Inputs of every linear on (evenly spaced) `tokens` calibration tokens, (tokens, in).

  An experts' module's are (E, tokens, in): each expert's own rows, padded with zero rows, which add no error to
  the clip search (an expert calibration never reached gets only zeros: every bound ties, the first, no clipping,
  wins), so one compiled search serves every expert.
  """
  key = ("inputs", block_fn)
  if key not in jitted._fns:
    jitted._fns[key] = jax.jit(lambda p, h: capture_linear_inputs(block_fn, p, h)[1])
  parts: dict[str, list] = {}
  for h in batches:
    for m, x in jitted._fns[key](block, h).items():
      if isinstance(x, GroupedRows):
        parts.setdefault(m, []).append(_expert_inputs(x))
      else:
        parts.setdefault(m, []).append(np.asarray(x).reshape(-1, x.shape[-1]))
  out = {}
  for m, xs in parts.items():
    if isinstance(xs[0], list):  # per batch, per expert
      per_expert = [_evenly(np.concatenate(rows), tokens) for rows in zip(*xs, strict=True)]
      out[m] = np.stack([np.pad(x, ((0, tokens - len(x)), (0, 0))) for x in per_expert])
    else:
      out[m] = _evenly(np.concatenate(xs), tokens)
  return out
