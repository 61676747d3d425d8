"""The blockwise sequential calibration runner.

GPTQ and AWQ quantize a decoder block from the inputs it sees *after* the blocks before
it were quantized. The runner embeds the calibration windows once, then for each block:

1. reads the block's float params (only this block is resident);
2. for each stage (a `Transform` over the block's params; a chain counts as its members),
   collects the statistics the stage asks for (`qjax.calib.stats.STATISTICS`) from the inputs
   of the block's linears, in jitted code, and applies the stage. Stages that read statistics
   run *true-sequentially*: group by group in the block's order (q/k/v, then o, then
   gate/up, then down), each group's inputs computed with the groups before it already
   quantized; a stage that runs the block itself (``whole_block``: AWQ) gets the whole block
   at once;
3. runs the quantized block on the inputs to get the next block's inputs;
4. checkpoints the quantized block and the activations with orbax, so a killed run
   resumes from the last finished block and ends with the identical result.

The runner knows nothing of a particular architecture: a `BlockModel` supplies the
pieces (see `qjax.models.blocks.LlamaBlocks`). With a `jax.sharding.Mesh`, calibration
windows are split over its ``data`` axis and the statistics are reduced across devices
by XLA; the mesh is handed to each stage too (GPTQ splits its output channels over it).
The mesh may span several processes (``jax.distributed``): every process runs this same
code on the same windows, holds its share of each batch, reads back the statistics and
quantized params whole, and takes part in each checkpoint (orbax writes it once).
`qjax.calib.quantize.quantize_model` runs the whole model (embedding, blocks, head)
through a recipe.
"""

import collections
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax.calib import stats as calib_stats
from qjax.calib.experts import ExpertPolicy, expert_statistics
from qjax.core.errors import InputError
from qjax.core.progress import progress
from qjax.core.tree import flatten_params, map_with_path, nest, unflatten_params
from qjax.transforms.base import Transform, flatten_stages, masked
from qjax.transforms.capture import capture_linear_inputs, output_shapes, shared_inputs

Params = Any


class BlockModel(Protocol):
  """What the runner needs from a model: its pieces, read and run one at a time."""

  num_layers: int

  # The linear module paths of a block (its params) in true-sequential order, grouped by the input they read.
  def sequential_groups(self, block: Params) -> tuple[tuple[str, ...], ...]: ...
  def layer_prefix(self, i: int) -> str: ...  # e.g. "model/layers_3"
  def layer_params(self, i: int) -> Params: ...  # the block's params, relative to its prefix
  def layer_fn(self, i: int) -> Callable[[Params, jax.Array], jax.Array]: ...  # block i: (b, t, d) -> (b, t, d)
  def embed_params(self) -> Params: ...  # the embedding part, full paths: {"model": {"embed_tokens": ...}}
  def embed(self, params: Params, ids: jax.Array) -> jax.Array: ...  # embedding part, (b, t) -> (b, t, d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerOptions:
  """How the runner batches, shards and checkpoints.

  Attributes:
    batch_size: calibration windows per jitted step (a multiple of the data-axis size).
    true_sequential: quantize a block's linears group by group (GPTQ's `true_sequential`).
    checkpoint_dir: where finished blocks are checkpointed for resume; None disables it.
    mesh: a mesh with a ``data`` axis to split calibration windows over (its devices may belong to several
      processes); None for one device.
    show_progress: print ``block i/n`` with ETA.
    cache_bytes: memory for outputs of linears whose params are final within a block, so
      later passes over the block skip them (each linear is then computed about once).
    float_inputs: collect statistics on the float model and feed each block float inputs
      (what llama.cpp's imatrix tool measures), instead of the quantized blocks' outputs.
    experts: what the experts of a mixture of experts quantize with when they saw few tokens.
    expert_tokens: called ``(experts' module path, tokens the router sent each expert (E,))`` for each sparse layer
      (for reports).
    stop_after_block: testing hook: raise `Interrupted` after this many blocks (simulates a kill).
  """

  batch_size: int = 8
  true_sequential: bool = True
  checkpoint_dir: str | None = None
  mesh: Mesh | None = None
  show_progress: bool = True
  cache_bytes: int = 4 << 30
  float_inputs: bool = False
  experts: ExpertPolicy = dataclasses.field(default_factory=ExpertPolicy)
  expert_tokens: Callable[[str, np.ndarray], None] | None = None
  stop_after_block: int | None = None


class Interrupted(RuntimeError):
  """Raised by the `stop_after_block` testing hook."""


def sync_processes(name: str) -> None:
  """Waits until every JAX process reaches the barrier `name` (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """`jax.device_get`, also of arrays split over several processes' devices: those are gathered, a collective
  that every process must call in the same order."""

  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return x

  return jax.device_get(jax.tree.map(gather, tree))


def _stage_groups(stage: Transform, groups, options: RunnerOptions) -> list[tuple[str, ...] | None]:
  """Module groups a stage is applied to in turn; None means the whole block at once."""
  if stage.stats and not stage.whole_block and options.true_sequential and not options.float_inputs:
    return list(groups)
  return [None]


def _group_mask(prefix: str, group: tuple[str, ...] | None):
  def mask(params):
    return map_with_path(lambda path, _: group is None or any(path.startswith(f"{prefix}/{m}/") for m in group), params)

  return mask


class _Batches:
  """Calibration activations (n, t, d) split into batches, sharded over the mesh's data axis."""

  def __init__(self, h: np.ndarray | jax.Array, options: RunnerOptions):
    n = h.shape[0]
    bs = min(options.batch_size, n)
    if n % bs:
      raise ValueError(f"nsamples={n} must be a multiple of the batch size {bs}.")
    self.options = options
    self.sharding = None
    if options.mesh is not None:
      data = options.mesh.shape["data"]
      if bs % data:
        raise ValueError(f"batch_size={bs} must be a multiple of the mesh's data axis ({data} devices).")
      # Auto axes: XLA partitions the statistics matmuls and inserts the cross-device sums.
      mesh = Mesh(
        options.mesh.devices, options.mesh.axis_names, axis_types=(AxisType.Auto,) * options.mesh.devices.ndim
      )
      self.sharding = NamedSharding(mesh, P(None, "data"))
    self.h = self._place(np.asarray(h).reshape(n // bs, bs, *h.shape[1:]))

  def _place(self, h):
    if self.sharding is None:
      return jnp.asarray(h)
    if isinstance(h, np.ndarray):  # each process places its own share (device_put would first compare the copies)
      return jax.make_array_from_callback(h.shape, self.sharding, lambda index: h[index])
    return jax.device_put(h, self.sharding)

  def __len__(self) -> int:
    return self.h.shape[0]

  def __iter__(self):
    return (self.h[i] for i in range(len(self)))

  def map(self, fn: Callable) -> None:
    """Replaces batch ``j`` by ``fn(j, batch)``."""
    self.h = self._place(jnp.stack([fn(j, b) for j, b in enumerate(self)]))

  def numpy(self) -> np.ndarray:
    return to_host(self.h).reshape(-1, *self.h.shape[2:])


CHECKPOINT_MARKER = "qjax_checkpoint.json"
"""In every checkpoint directory qjax writes: the run's description and whether qjax created the directory."""
_CHECKPOINT_PARTS = ("blocks", "activations")


def _read_marker(directory: str) -> dict | None:
  try:
    with open(os.path.join(directory, CHECKPOINT_MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and "run" in marker else None


def check_checkpoint_dir(directory: str, run: dict[str, Any] | None = None) -> None:
  """Raises unless `directory` may hold this run's checkpoints: absent, empty, or a qjax checkpoint of the same run.

  Raises:
    InputError: naming the directory and the way out.
  """
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise InputError(f"{directory}: the checkpoint directory exists and is not a directory.")
  if not os.path.isdir(directory) or not os.listdir(directory):
    return
  marker = _read_marker(directory)
  if marker is None:
    raise InputError(f"{directory}: holds files that are not a qjax checkpoint; use another --checkpoint_dir.")
  if run is not None:
    previous, run = marker["run"], json.loads(json.dumps(run))  # normalise tuples etc. as JSON would
    if previous != run:
      diff = sorted(k for k in set(previous) | set(run) if previous.get(k) != run.get(k))
      raise InputError(
        f"{directory} holds a run with a different configuration (differs in {diff}); "
        "use another --checkpoint_dir, or remove it to start over."
      )


def remove_checkpoints(directory: str) -> None:
  """Removes a qjax checkpoint directory: only what qjax wrote, and the directory itself if qjax created it."""
  marker = _read_marker(directory)
  if marker is None:
    return
  for part in _CHECKPOINT_PARTS:
    shutil.rmtree(os.path.join(directory, part), ignore_errors=True)
  os.remove(os.path.join(directory, CHECKPOINT_MARKER))
  if marker.get("created_directory") and not os.listdir(directory):
    os.rmdir(directory)


class _Checkpoints:
  """Orbax checkpoints of finished blocks (all kept) and the latest activations (one kept)."""

  def __init__(self, directory: str, run: dict[str, Any]):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    self.directory = os.path.abspath(directory)
    check_checkpoint_dir(self.directory, run)
    sync_processes(f"qjax checkpoints checked: {self.directory}")  # before the first process marks it
    if jax.process_index() == 0 and _read_marker(self.directory) is None:
      created = not os.path.isdir(self.directory)
      os.makedirs(self.directory, exist_ok=True)
      with open(os.path.join(self.directory, CHECKPOINT_MARKER), "w") as f:
        json.dump({"run": json.loads(json.dumps(run)), "created_directory": created}, f, indent=1)
    sync_processes(f"qjax checkpoints marked: {self.directory}")
    if _read_marker(self.directory) is None:  # process 0's marker is not here: every process must resume alike
      raise InputError(f"{self.directory}: process {jax.process_index()} does not see the checkpoint directory "
                       "process 0 marked; give every process one on a file system they all see.")  # fmt: skip
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    self.blocks = ocp.CheckpointManager(os.path.join(self.directory, "blocks"), options=options)
    self.activations = ocp.CheckpointManager(
      os.path.join(self.directory, "activations"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
    )

  def resume_point(self) -> int:
    """Number of finished blocks whose outputs were saved too."""
    latest = self.activations.latest_step()
    return 0 if latest is None else latest + 1

  def save(self, i: int, qblock: Params, h: np.ndarray) -> None:
    tensors, manifest = flatten_params(qblock)
    names = sorted(tensors)
    ocp = self.ocp
    if i in self.blocks.all_steps():
      self.blocks.delete(i)  # left over from a run killed between the two saves below
    self.blocks.save(
      i,
      args=ocp.args.Composite(
        tensors=ocp.args.StandardSave({str(k): tensors[n] for k, n in enumerate(names)}),
        meta=ocp.args.JsonSave({"names": names, "manifest": manifest}),
      ),
    )
    self.activations.save(i, args=ocp.args.Composite(h=ocp.args.StandardSave({"h": h})))

  def restore_block(self, i: int) -> Params:
    ocp = self.ocp
    restored = self.blocks.restore(
      i, args=ocp.args.Composite(tensors=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    names = restored["meta"]["names"]
    tensors = {n: np.asarray(restored["tensors"][str(k)]) for k, n in enumerate(names)}
    return unflatten_params(tensors, restored["meta"]["manifest"], source=self.directory)

  def restore_activations(self, n_blocks: int) -> np.ndarray:
    """The outputs of block ``n_blocks - 1``: the next block's inputs."""
    ocp = self.ocp
    return np.asarray(
      self.activations.restore(n_blocks - 1, args=ocp.args.Composite(h=ocp.args.StandardRestore()))["h"]["h"]
    )


class _OutputCache:
  """Per-batch outputs of a block's linears whose params are final, within one block."""

  def __init__(self, budget_bytes: int):
    self.budget = budget_bytes
    self.outputs: dict[str, list[jax.Array]] = {}
    self.used = 0

  def plan(self, final: Sequence[str], out_bytes: dict[str, int]) -> tuple[str, ...]:
    """The final modules to capture in the next pass: those not cached yet that fit the budget."""
    chosen = []
    for m in final:
      if m not in self.outputs and self.used + out_bytes[m] <= self.budget:
        chosen.append(m)
        self.used += out_bytes[m]
        self.outputs[m] = []
    return tuple(chosen)

  def batch(self, j: int) -> dict[str, jax.Array]:
    return {m: outs[j] for m, outs in self.outputs.items() if len(outs) > j}

  def add(self, outputs: dict[str, jax.Array]) -> None:
    for m, out in outputs.items():
      self.outputs[m].append(out)


class _BlockRunner:
  """Jitted statistics and forward passes of one block function, compiled once per (group, stats, cache)."""

  def __init__(self, block_fn: Callable[[Params, jax.Array], jax.Array]):
    self.block_fn = block_fn
    self._jitted: dict = {}

  def _apply_cached(self, params, h, cached):
    return capture_linear_inputs(self.block_fn, params, h, cached=cached)[0]

  def forward(self, params, h, cached=None):
    if "forward" not in self._jitted:
      self._jitted["forward"] = jax.jit(self._apply_cached)
    return self._jitted["forward"](params, h, cached or {})

  def input_stats(
    self,
    params,
    batches,
    modules,
    names,
    cache: _OutputCache | None = None,
    capture: tuple[str, ...] = (),
    on_host: bool = True,
  ):
    """{module: {stat: value, "tokens": n}} over all batches; linears reading one input share one dict. An experts'
    module has each value per expert (leading axis E), ``"tokens"`` (E,) and the router's ``"routed"`` (E,).

    Outputs of the `capture` modules are added to `cache`; cached outputs are reused. With `on_host`, the values
    are numpy arrays (a transform may place them on a mesh of its own: GPTQ's output-channel split); otherwise
    the device arrays, which a transform handed them may donate.
    """
    cache = cache or _OutputCache(0)
    aliases = shared_inputs(self.block_fn, modules, params, next(iter(batches)))
    reps = tuple(dict.fromkeys(aliases.values()))
    names = tuple(sorted(names))
    key = ("stats", reps, names, capture)
    if key not in self._jitted:

      def step(p, h, cached, states):
        _, inputs, outputs = capture_linear_inputs(self.block_fn, p, h, cached=cached, capture=capture)
        return {m: calib_stats.update_states(states[m], inputs[m]) for m in reps}, outputs

      # The accumulators are donated: updated in place, a MoE layer's (E, d, d) Hessians are one buffer.
      self._jitted[key] = jax.jit(step, donate_argnums=3)
    states = {m: calib_stats.init_states(names, *_in_width(params, m)) for m in reps}
    for j, batch in enumerate(batches):
      states, outputs = self._jitted[key](params, batch, cache.batch(j), states)
      cache.add(outputs)
    finals = {rep: _finalize(states[rep]) for rep in reps}
    finals = to_host(finals) if on_host else finals
    return {m: finals[aliases[m]] for m in modules}


_finalize = jax.jit(calib_stats.finalize, donate_argnums=0)  # in place: no second copy of the statistics


def _in_width(block: Params, module: str) -> tuple[int, int | None]:
  """(input width, experts or None) of a linear: kernels (in, out), or an experts' (E, in, out)."""
  shape = _module(block, module)["kernel"].shape
  return int(shape[-2]), (int(shape[0]) if len(shape) == 3 else None)


def _module(block: Params, path: str) -> Params:
  node = block
  for key in path.split("/"):
    node = node[key]
  return node


def _out_bytes(block_fn, block: Params, modules: Sequence[str], batch) -> dict[str, int]:
  """Bytes of each linear's output on one batch (an experts' module: its grouped rows)."""
  shapes = output_shapes(block_fn, modules, block, batch)
  return {m: int(np.prod(shapes[m].shape)) * np.dtype(shapes[m].dtype).itemsize for m in modules}


def _expert_stats(module_stats: dict[str, Any], policy: ExpertPolicy, prefix: str, report) -> dict[str, Any]:
  """The statistics of an experts' module (those with per-expert ``"routed"`` counts) after `policy`; the router's
  counts reported once per layer."""
  out = {}
  for m, s in module_stats.items():
    if "routed" not in s:
      out[m] = s
      continue
    out[m] = expert_statistics(s, policy)
    if report is not None and m.endswith("gate_proj"):
      report(f"{prefix}/{m.rsplit('/', 1)[0]}", np.asarray(s["routed"]))
  return out


def quantize_blocks(
  model: BlockModel,
  stages: Sequence[Transform],
  windows: np.ndarray,
  *,
  options: RunnerOptions = RunnerOptions(),
  run_id: dict[str, Any] | None = None,
  embed_params: Params | None = None,
) -> tuple[list[Params], np.ndarray]:
  """Quantizes every decoder block sequentially on calibration windows (`iter_quantized_blocks`, collected).

  Returns:
    (the quantized params of every block, the final hidden states (nsamples, seqlen, d)).
  """
  blocks = iter_quantized_blocks(model, stages, windows, options=options, run_id=run_id, embed_params=embed_params)
  qblocks = []
  while True:
    try:
      qblocks.append(next(blocks))
    except StopIteration as done:
      return qblocks, done.value


def iter_quantized_blocks(
  model: BlockModel,
  stages: Sequence[Transform],
  windows: np.ndarray,
  *,
  options: RunnerOptions = RunnerOptions(),
  run_id: dict[str, Any] | None = None,
  embed_params: Params | None = None,
) -> Generator[Params, None, np.ndarray]:
  """Quantizes every decoder block sequentially on calibration windows, handing each over as it is finished (blocks
  a resumed run finished before come back from their checkpoints first, one at a time), so that only one block is
  held: the caller writes it out and lets it go.

  Args:
    model: the block pieces (`BlockModel`).
    stages: transforms applied in order to each block's params (full paths, e.g.
      ``model/layers_3/mlp/up_proj/kernel``); a chain is applied as its members. Each gets
      ``stats=`` keyed by kernel path (the statistics it names, measured just before it runs)
      and ``block_inputs=``, ``block_fn=``, ``block_model=`` and ``block_prefix=`` for
      transforms that run the block themselves (AWQ).
    windows: (nsamples, seqlen) int calibration token windows.
    options: batching, true-sequential order, checkpoints, mesh (also passed to each stage as ``mesh=``).
    run_id: JSON-serialisable description of the run; a checkpoint directory written by a
      run with another description is refused.
    embed_params: the embedding part the windows are embedded with (default: the model's own).

  Yields:
    The quantized params of each block, in order.

  Returns:
    The final hidden states (nsamples, seqlen, d) (``StopIteration.value``).

  Raises:
    ValueError: for statistics no `Statistic` is registered under, or a chain nested where
      its members cannot run one by one.
  """
  stages = flatten_stages(stages)
  for stage in stages:
    calib_stats.check_names(stage.stats)
  checkpoints = None
  if options.checkpoint_dir:
    checkpoints = _Checkpoints(options.checkpoint_dir, run_id or {})
  done = checkpoints.resume_point() if checkpoints else 0
  if done:
    for i in range(done):
      yield checkpoints.restore_block(i)
    h = checkpoints.restore_activations(done)
  else:
    embed_params = model.embed_params() if embed_params is None else embed_params
    h = np.concatenate([np.asarray(model.embed(embed_params, jnp.asarray(w[None]))) for w in windows])
    del embed_params  # the embedding is not needed again (it can be a GB): let it go before the first block
  batches = _Batches(h, options)
  runners: dict = {}  # block function -> its runner
  out_bytes_by_fn: dict = {}  # block function -> bytes of each linear's output on one batch
  label = "block" if done == 0 else f"block (resumed after {done})"
  for i in progress(range(done, model.num_layers), total=model.num_layers - done, label=label,
                    enabled=options.show_progress):  # fmt: skip
    if options.stop_after_block is not None and i >= options.stop_after_block:
      raise Interrupted(f"stopped before block {i} (stop_after_block={options.stop_after_block})")
    block = _quantize_block(model, i, stages, batches, runners, out_bytes_by_fn, options)
    if checkpoints:
      checkpoints.save(i, block, batches.numpy())
    yield block
    del block  # not held while the next block is made
  return batches.numpy()


def _quantize_block(
  model: BlockModel,
  i: int,
  stages: list[Transform],
  batches: _Batches,
  runners: dict,
  out_bytes_by_fn: dict,
  options: RunnerOptions,
) -> Params:
  """Block `i` through every stage, and `batches` moved on to its outputs: its quantized params. Its float params,
  statistics and cached outputs go when this returns, before the next block is read."""
  prefix, block_fn = model.layer_prefix(i), model.layer_fn(i)
  runner = runners.setdefault(block_fn, _BlockRunner(block_fn))
  block = jax.tree.map(jnp.asarray, model.layer_params(i))
  # Kept only when the next passes read the float block: otherwise its float weights would stay beside their
  # quantized replacements until the block is done (0.6 GB of a Llama-3-8B block by the time down_proj's turn comes).
  float_block = block if options.float_inputs else None
  groups = model.sequential_groups(block)
  linears = tuple(m for g in groups for m in g)
  steps = [(stage, group) for stage in stages for group in _stage_groups(stage, groups, options)]
  # Statistics with every expert on every token come from another function, whose outputs the forward cannot reuse.
  stats_fn = model.layer_fn(i, all_experts=True) if options.experts.all_experts else block_fn
  stats_runner = runners.setdefault(stats_fn, _BlockRunner(stats_fn))
  cache = _OutputCache(0 if options.float_inputs or stats_fn is not block_fn else options.cache_bytes)
  if block_fn not in out_bytes_by_fn:  # one abstract trace per kind of block, not per block
    out_bytes_by_fn[block_fn] = _out_bytes(block_fn, block, linears, next(iter(batches)))
  out_bytes = out_bytes_by_fn[block_fn]
  for k, (stage, group) in enumerate(steps):
    extra = {"block_inputs": batches, "block_fn": block_fn, "block_model": model, "block_prefix": prefix,
             "mesh": options.mesh}  # fmt: skip
    if stage.stats:
      modules = group or linears
      # Linears no step from here on changes are final: capture their outputs for later passes.
      changing = {m for _, g in steps[k:] for m in (g or linears)}
      capture = cache.plan([m for m in linears if m not in changing], out_bytes)
      source = block if float_block is None else float_block
      # Without a mesh the statistics stay device arrays, and those of a linear that shares no input (o_proj,
      # down_proj) are handed over: GPTQ donates its Hessian rather than keep it beside its own copies.
      module_stats = stats_runner.input_stats(
        source, batches, modules, stage.stats, cache, capture, on_host=options.mesh is not None
      )
      module_stats = _expert_stats(module_stats, options.experts, prefix, options.expert_tokens)
      extra["stats"] = {f"{prefix}/{m}/kernel": s for m, s in module_stats.items()}
      extra["stats_owned"] = _unshared(extra["stats"])
    tree = nest(prefix, block)
    t = masked(stage, _group_mask(prefix, group))
    tree, _ = t.update(tree, t.init(tree), **extra)
    # On the host, uncommitted: a stage may return arrays placed on a mesh of its own.
    block = to_host(_unnest(prefix, tree))
  next_block = block if float_block is None else float_block
  batches.map(lambda j, b, p=next_block, c=cache, r=runner: r.forward(p, b, c.batch(j)))
  return block


def _unshared(stats: dict[str, Any]) -> frozenset[str]:
  """The paths whose statistics' arrays no other path's share."""
  readers = collections.Counter(id(a) for s in stats.values() for a in jax.tree.leaves(s))
  return frozenset(path for path, s in stats.items() if all(readers[id(a)] == 1 for a in jax.tree.leaves(s)))


def _unnest(prefix: str, tree: Params) -> Params:
  for key in prefix.split("/"):
    tree = tree[key]
  return tree
