"""The learned-clipping transform: trains per-group clipping ranges of a block with optax.

For every linear of the block, `qjax.quantizers.lwc` ranges are trained jointly with Adam
to minimise ``‖block(W) - block(Q(W))‖²`` on the calibration inputs (OmniQuant's LWC; the
learned equivalent transformation is left out). The weights come out clamped to their
learned ranges, so a rounding transform that follows (RTN, GPTQ) uses those ranges. A stack of experts' kernels
(E, in, out) learns ranges expert by expert (stacked logits), trained on the whole block's output like the rest.
"""

import jax
import jax.numpy as jnp
import optax

from qjax.core import QSpec
from qjax.core.tree import get_path, replace_path
from qjax.quantizers import lwc as lwc_core
from qjax.transforms.base import Transform, each_matrix, per_block


def learned_clipping(spec: QSpec, *, steps: int = 40, learning_rate: float = 5e-3) -> Transform:
  """OmniQuant-style learned weight clipping of every linear in a block (runs in the calibration runner).

  Args:
    spec: the grid the weights will be rounded to.
    steps: Adam steps per block (cycling over the calibration batches).
    learning_rate: Adam's learning rate for the range logits.

  References:
    Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language
    Models", ICLR 2024 (arXiv:2308.13137), learnable weight clipping.
  """
  optimizer = optax.adam(learning_rate)
  compiled = {}

  def clip_block(block, *, block_model, block_inputs=None, block_fn=None, **_):
    linears = tuple(f"{m}/kernel" for g in block_model.sequential_groups(block) for m in g)
    batches = list(block_inputs)
    key = (block_fn, linears)
    if key not in compiled:
      compiled[key] = _compile(block_fn, linears, spec, optimizer)
    init, step = compiled[key]
    targets = [jax.jit(block_fn)(block, h) for h in batches]
    logits, opt_state = init(block)
    for i in range(steps):
      logits, opt_state, _ = step(logits, opt_state, block, batches[i % len(batches)], targets[i % len(batches)])
    for path in linears:
      block = replace_path(
        block, path, each_matrix(lwc_core.apply_clip, get_path(block, path), logits[path], spec=spec)
      )
    return block

  return per_block(clip_block, name="`learned_clipping`")


def _compile(block_fn, linears, spec, optimizer):
  def quantized(block, logits):
    for path in linears:
      block = replace_path(
        block, path, each_matrix(lwc_core.fake_quantize, get_path(block, path), logits[path], spec=spec)
      )
    return block

  def loss(logits, block, h, target):
    out = block_fn(quantized(block, logits), h)
    return jnp.mean((out.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)

  def init(block):
    logits = {path: each_matrix(lwc_core.init_logits, get_path(block, path), spec=spec) for path in linears}
    return logits, optimizer.init(logits)

  @jax.jit
  def step(logits, opt_state, block, h, target):
    value, grads = jax.value_and_grad(loss)(logits, block, h, target)
    updates, opt_state = optimizer.update(grads, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state, value

  return init, step
