"""How much each linear's rounding error costs the model's output: the Fisher-weighted rounding error.

To second order, the KL divergence a small weight change ΔW adds to the model's next-token distributions is
``½ ΔWᵀ F ΔW``, with F the Fisher information of the weights. Its diagonal (estimated from squared gradients of the
log-likelihood of tokens drawn from the model itself, on the calibration text's contexts) weighs every weight's
rounding error by how much the output moves with it, across layers as well as within one, so
``½ Σ F ⊙ ΔW²`` predicts, in nats per token, what rounding one tensor into a format costs the whole model. This
is the proxy `qjax.transforms.allocation` allocates bits with; `experiments/allocation.md` measures how well it
predicts the KL divergence measured end to end.

GPTQ's rounding is the exception: it moves each weight further than rounding to nearest would, so that the errors
of one output column cancel across correlated inputs, and the diagonal proxy sees only the larger moves. For it the
Fisher is taken as the Kronecker product of the inputs' second moments C (GPTQ's Hessian) and a per-output-channel
factor f (K-FAC's approximation), which predicts ``½ Σ_j f_j Δw_jᵀ C Δw_j`` (`kronecker_error`): GPTQ's own
objective, weighted by how much each output channel moves the model's output.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jaxtyping import Array, Float, Int

from qjax.calib.quantize import WholeModel, quantize_model
from qjax.calib.runner import RunnerOptions
from qjax.core import QSpec, dequantize, ggml, quantize
from qjax.core.progress import progress
from qjax.core.tree import MaskedNode, get_path, leaves_with_paths
from qjax.models import LlamaConfig
from qjax.models.checkpoint import param_shapes
from qjax.models.llama import LlamaForCausalLM
from qjax.quantizers.gptq import GptqConfig, gptq_quantize
from qjax.quantizers.kquants import kquant_quantize
from qjax.transforms import gguf_recipes
from qjax.transforms.allocation import Option, Unit, allocate
from qjax.transforms.base import stateless
from qjax.transforms.gguf_recipes import ALLOCATABLE
from qjax.transforms.recipes import LINEAR_KERNELS, Recipe
from qjax.transforms.rules import Rule, rules_transform


def fisher_diagonal(
  config: LlamaConfig,
  params,
  windows: Int[np.ndarray, "n t"],
  paths: Sequence[str],
  *,
  batch_size: int = 4,
  seed: int = 0,
  show_progress: bool = False,
) -> dict[str, np.ndarray]:
  """The Fisher information's diagonal, per token, of the weights at `paths`: the curvature of the KL divergence
  from the float model's next-token distributions, which is what rounding the weights adds to.

  For each batch of windows, next tokens are drawn from the model's own distributions and the gradient g of their
  mean negative log-likelihood is taken; with ``N`` tokens in the batch, ``N·g²`` estimates the per-token Fisher's
  diagonal (each token's score has mean zero under the model's distribution, so the cross terms vanish in
  expectation), and the estimates are averaged over batches. The text's own next tokens would give the
  "empirical Fisher", which counts the model's systematic error on the text as curvature: on the default model it
  overstated the first layer's ffn_down forty-fold.

  Args:
    config: the model's config.
    params: the float model's parameters.
    windows: (n, t) calibration token windows.
    paths: '/'-joined paths of the weights (Dense kernels).
    batch_size: windows per gradient.
    seed: seeds the drawn tokens.
    show_progress: print progress.

  Returns:
    path -> float32 array of the weight's shape.
  """
  net = LlamaForCausalLM(config)
  flat = flatten_dict(params, sep="/")
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ValueError(f"fisher_diagonal: no parameter at {missing[0]!r}.")
  chosen = {p: flat[p] for p in paths}
  rest = {p: v for p, v in flat.items() if p not in chosen}

  def nll(selected, rest, ids, key):
    logits = net.apply({"params": unflatten_dict({**rest, **selected}, sep="/")}, ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    drawn = jax.lax.stop_gradient(jax.random.categorical(key, logp))
    return -jnp.mean(jnp.take_along_axis(logp, drawn[..., None], axis=-1))

  @jax.jit
  def squared_grad(selected, rest, ids, key):
    g = jax.grad(nll)(selected, rest, ids, key)
    return jax.tree_util.tree_map(lambda x: ids.size * jnp.square(x.astype(jnp.float32)), g)

  total = None
  batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
  keys = jax.random.split(jax.random.key(seed), len(batches))
  for ids, key in progress(zip(batches, keys, strict=True), total=len(batches), label="sensitivity",
                           enabled=show_progress):  # fmt: skip
    sq = squared_grad(chosen, rest, jnp.asarray(ids), key)
    total = sq if total is None else jax.tree_util.tree_map(jnp.add, total, sq)
  return {p: np.asarray(v, np.float32) / len(batches) for p, v in total.items()}


def weighted_error(fisher: Float[Array, "..."], w: Float[Array, "..."], w_hat: Float[Array, "..."]) -> float:
  """``½ Σ F ⊙ (ŵ - w)²``: the KL divergence, in nats per token, that replacing `w` by `w_hat` is predicted to add."""
  d = jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32)
  return float(0.5 * jnp.sum(jnp.asarray(fisher) * d * d))


def kronecker_error(
  fisher: Float[Array, "in out"],
  hessian: Float[Array, "in in"],
  w: Float[Array, "in out"],
  w_hat: Float[Array, "in out"],
) -> float:
  """``½ Σ_j f_j Δw_jᵀ C Δw_j``, Δw_j output column j of ``ŵ - w``: the KL divergence, in nats per token, that
  replacing `w` by `w_hat` is predicted to add when the Fisher of the weights factors into the inputs' second
  moments C (`hessian`, at any scale) and an output factor f, read from the Fisher's diagonal F as
  ``f_j = Σ_i F_ij / tr C`` (so a diagonal C gives `weighted_error`)."""
  c = jnp.asarray(hessian, jnp.float32)
  d = jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32)
  f = jnp.sum(jnp.asarray(fisher, jnp.float32), axis=0) / jnp.trace(c)
  return float(0.5 * jnp.sum(f * jnp.sum(d * jnp.dot(c, d, precision=jax.lax.Precision.HIGHEST), axis=0)))


def gptq_errors(
  model: WholeModel,
  windows: Int[np.ndarray, "n t"],
  fisher: Mapping[str, np.ndarray],
  widths: Mapping[str, Iterable[str]],
  *,
  spec: QSpec,
  gptq_config: GptqConfig,
  batch_size: int = 8,
  show_progress: bool = False,
) -> dict[str, dict[str, float]]:
  """Each linear's predicted cost in each choice when GPTQ rounds it: ``path -> {choice: kronecker_error}``.

  GPTQ rounds every linear of `widths` in each of its choices (`affine_choice` labels: widths, and group sizes, on
  `spec`'s grid), with the Hessian of the float model's inputs on the calibration windows (one pass of the
  calibration runner; the model stays float).

  Args:
    model: the float model's parts (`qjax.models.LlamaBlocks`).
    windows: (n, t) calibration windows.
    fisher: `fisher_diagonal`'s result for the paths of `widths`.
    widths: path -> the choices (``"4"``, ``"4g32"``) that linear may take.
    spec: the grid (its ``bits`` and group size replaced by each choice's).
    gptq_config: GPTQ's options.
    batch_size: windows per forward.
    show_progress: print the runner's progress.
  """
  errors: dict[str, dict[str, float]] = {}

  def measure(params, *, stats=None, **_):
    for path, w in leaves_with_paths(params):
      if isinstance(w, MaskedNode) or path not in widths:
        continue
      h, f = stats[path]["hessian"], fisher[path]
      parts = list(zip(w, h, f, strict=True)) if np.ndim(w) == 3 else [(w, h, f)]  # experts one by one
      errors[path] = {}
      for label in widths[path]:
        one = affine_choice(label, spec)
        errors[path][label] = sum(kronecker_error(fe, he, we, dequantize(gptq_quantize(we, he, spec=one,
                                  config=gptq_config)[0])) for we, he, fe in parts)  # fmt: skip
    return params

  stage = rules_transform([Rule(LINEAR_KERNELS, stateless(measure, stats=frozenset({"hessian"})), name="sensitivity")])
  quantize_model(model, Recipe((stage,), "sensitivity", float_inputs=True), windows,
                 options=RunnerOptions(batch_size=batch_size, show_progress=show_progress))  # fmt: skip
  return errors


def format_errors(
  params,
  fisher: Mapping[str, np.ndarray],
  formats: Mapping[str, Iterable[str]],
  round_trip: Callable[[Array, str], Array],
  *,
  show_progress: bool = False,
) -> dict[str, dict[str, float]]:
  """Each weight's predicted cost in each of its formats: ``path -> {format: ½ Σ F ⊙ ΔW²}``.

  Args:
    params: the float model's parameters.
    fisher: `fisher_diagonal`'s result for the paths of `formats`.
    formats: path -> the formats (labels `round_trip` understands) that weight may take.
    round_trip: ``(w, format) -> w`` rounded into the format and back.
    show_progress: print progress.
  """
  errors: dict[str, dict[str, float]] = {}
  for path in progress(formats, total=len(formats), label="rounding errors", enabled=show_progress):
    w = get_path(params, path)
    errors[path] = {f: weighted_error(fisher[path], w, round_trip(w, f)) for f in formats[path]}
  return errors


def _expert_by_expert(round_trip: Callable[[Array, str], Array]) -> Callable[[Array, str], Array]:
  """`round_trip` of a kernel (in, out), applied to each kernel of a stack of experts' (E, in, out) too."""

  @functools.wraps(round_trip)
  def each(w, fmt: str):
    return jnp.stack([round_trip(e, fmt) for e in w]) if np.ndim(w) == 3 else round_trip(w, fmt)

  return each


@_expert_by_expert
def ggml_round_trip(w: Float[Array, "*experts in out"], type_name: str) -> Float[Array, "*experts in out"]:
  """`w` encoded by llama.cpp's encoder for `type_name` (without an importance matrix) and decoded; a stack of
  experts' kernels (E, in, out) expert by expert, as llama.cpp encodes the rows of its stacked tensor."""
  return dequantize(kquant_quantize(w, type_name=type_name))


class Allocation(NamedTuple):
  """A bit allocation's result.

  Attributes:
    types: path -> ggml type of every tensor the allocation chose (the overrides of the base recipe).
    bits_per_weight: of the quantized tensors (embedding and output at the base recipe's types included).
    predicted_kl: the proxy's total, ``Σ ½ Σ F ⊙ ΔW²`` over the allocated tensors, in nats per token.
    errors: path -> {type: predicted KL divergence} for every allocated tensor and candidate type.
  """

  types: dict[str, str]
  bits_per_weight: float
  predicted_kl: float
  errors: dict[str, dict[str, float]]


def type_bits(type_name: str, numel: int) -> float:
  """Bits a tensor of `numel` weights takes in ggml type `type_name`."""
  return numel * ggml.BLOCK_TYPES[type_name].bits_per_weight


def _numel(config: LlamaConfig, paths) -> dict[str, int]:
  """path -> weights of the tensor there, from the config's shapes."""
  shapes = param_shapes(config)
  return {p: int(np.prod(shapes[p])) for p in paths}


def allocate_gguf(
  config: LlamaConfig,
  params,
  windows: Int[np.ndarray, "n t"],
  *,
  base: str,
  target_bpw: float,
  imatrix: bool = False,
  types: Sequence[str] = ALLOCATABLE,
  batch_size: int = 4,
  show_progress: bool = False,
  errors: Mapping[str, Mapping[str, float]] | None = None,
) -> Allocation:
  """The ggml type of each decoder-layer linear that least raises the predicted KL divergence within a budget.

  The embedding and output keep the `base` recipe's types; every block linear may take any of `types` whose
  blocks tile its rows (`qjax.transforms.gguf_recipes.types_for_row`), each costed by the Fisher-weighted
  rounding error of llama.cpp's encoder for it.

  Args:
    config: the model's config.
    params: the float model's parameters.
    windows: (n, t) calibration windows for the Fisher's diagonal.
    base: the llama.cpp recipe (``"Q4_K_M"`` …) whose embedding and output types are kept.
    target_bpw: bits per weight of all the quantized tensors together.
    imatrix: the base recipe's types as a file made with an importance matrix gets them.
    types: the ggml types a linear may take (those of them that tile its rows).
    batch_size: windows per gradient.
    show_progress: print progress.
    errors: a previous allocation's ``errors`` on the same model and windows: reused when they cover every
      candidate (they do not depend on the base recipe or the budget).

  Raises:
    ValueError: as `check_budget`.
  """
  check_budget(target_bpw, base, config, imatrix=imatrix, types=types)
  base_types = gguf_recipes.tensor_types(base, config, imatrix=imatrix)
  rows = gguf_recipes.row_lengths(config)
  numel = _numel(config, base_types)
  fixed_bits = sum(type_bits(t, numel[p]) for p, t in base_types.items() if p not in rows)
  candidates = {p: [t for t in gguf_recipes.types_for_row(r) if t in types] for p, r in rows.items()}
  measure = lambda fisher: format_errors(params, fisher, candidates, ggml_round_trip, show_progress=show_progress)
  return _allocate(config, params, windows, candidates, measure, lambda p, t: type_bits(t, numel[p]),
                   gguf_recipes.tied_groups(config), fixed_bits=fixed_bits, total=sum(numel.values()),
                   target_bpw=target_bpw, batch_size=batch_size, show_progress=show_progress,
                   errors=errors)  # fmt: skip


def _allocate(
  config: LlamaConfig,
  params,
  windows: Int[np.ndarray, "n t"],
  candidates: Mapping[str, Sequence[str]],
  measure: Callable[[Mapping[str, np.ndarray]], dict[str, dict[str, float]]],
  bits_of: Callable[[str, str], float],
  groups: Sequence[tuple[str, ...]],
  *,
  fixed_bits: float,
  total: int,
  target_bpw: float,
  batch_size: int,
  show_progress: bool,
  errors: Mapping[str, Mapping[str, float]] | None,
) -> Allocation:
  """The allocation of `candidates` (path -> formats) in units of `groups` (paths sharing one format), costed by
  ``bits_of(path, format)`` and the errors ``measure(fisher)`` predicts (path -> {format: KL}, from the Fisher's
  diagonal), within ``target_bpw * total`` bits of which `fixed_bits` are already spent."""
  if errors is None or any(t not in errors.get(p, {}) for p, ts in candidates.items() for t in ts):
    fisher = fisher_diagonal(config, params, windows, list(candidates), batch_size=batch_size,
                             show_progress=show_progress)  # fmt: skip
    errors = measure(fisher)
  errors = {p: {t: errors[p][t] for t in ts} for p, ts in candidates.items()}
  units = []
  for group in groups:
    shared = [t for t in candidates[group[0]] if all(t in candidates[p] for p in group)]
    options = [Option(t, sum(bits_of(p, t) for p in group), sum(errors[p][t] for p in group)) for t in shared]
    units.append(Unit(group, tuple(options)))
  chosen = allocate(units, target_bpw * total - fixed_bits)
  types = {p: u.options[i].label for u, i in zip(units, chosen, strict=True) for p in u.members}
  bits = fixed_bits + sum(u.options[i].bits for u, i in zip(units, chosen, strict=True))
  predicted = sum(u.options[i].error for u, i in zip(units, chosen, strict=True))
  return Allocation(types, bits / total, predicted, errors)


FUSED_BY_VLLM = (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("mlp/gate_proj", "mlp/up_proj"),
                 ("mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj"))  # fmt: skip
"""Linears vLLM loads as one layer (QKVParallelLinear, MergedColumnParallelLinear, a FusedMoE layer's w13 and w2
together), which must share one width; a layer's experts are one stacked tensor per projection here."""


def affine_groups(config: LlamaConfig) -> list[tuple[str, ...]]:
  """The decoder linears grouped into what must take one bit width in a GPU-served checkpoint (`FUSED_BY_VLLM`)."""
  groups = []
  for i in range(config.num_hidden_layers):
    modules = list(gguf_recipes.categories(config, i))
    for fused in FUSED_BY_VLLM:
      if all(m in modules for m in fused):
        groups.append(tuple(f"model/layers_{i}/{m}/kernel" for m in fused))
        modules = [m for m in modules if m not in fused]
    groups += [(f"model/layers_{i}/{m}/kernel",) for m in modules]
  return groups


def affine_choice(label: str, spec: QSpec) -> QSpec:
  """`spec` with the width, and group size, an affine allocation's choice names: ``"3"`` (3 bits in `spec`'s groups)
  or ``"4g32"`` (4 bits in groups of 32).

  Examples:
    >>> affine_choice("4g32", QSpec(bits=3, group_size=64)).group_size
    32
  """
  bits, _, group = label.partition("g")
  return dataclasses.replace(spec, bits=int(bits), group_size=int(group) if group else spec.group_size)


def affine_choices(spec: QSpec, row_length: int, bits: Sequence[int], group_sizes: Sequence[int] = ()) -> list[str]:
  """The choices (`affine_choice` labels) of a linear whose rows are `row_length` long: each of `bits` in `spec`'s
  groups and in each of `group_sizes` that divides its rows (as vLLM's kernels need)."""
  groups = [g for g in dict.fromkeys((spec.group_size, *group_sizes)) if g == -1 or row_length % g == 0]
  return [f"{b}" if g == spec.group_size else f"{b}g{g}" for g in groups for b in sorted(bits)]


def affine_round_trip(spec: QSpec) -> Callable[[Array, str], Array]:
  """``(w, choice) -> w`` rounded to nearest on `spec`'s grid at that choice (`affine_choice`; experts one by one)
  and back."""

  @_expert_by_expert
  def round_trip(w, label: str):
    return dequantize(quantize(w, affine_choice(label, spec)))

  return round_trip


def affine_bits(spec: QSpec, config: LlamaConfig) -> Callable[[str, str], float]:
  """``(path, choice) -> bits`` the decoder linear at `path` takes on `spec`'s grid at that choice (`affine_choice`;
  its scales and zero points counted)."""
  shapes = param_shapes(config)

  def bits_of(path: str, label: str) -> float:
    shape = shapes[path]
    return affine_choice(label, spec).bits_per_weight(shape[-2]) * int(np.prod(shape))

  return bits_of


def affine_bits_per_weight(spec: QSpec, config: LlamaConfig) -> float:
  """Bits per weight of every decoder linear at `spec`'s width on its grid (scales and zero points counted)."""
  rows = gguf_recipes.row_lengths(config)
  bits_of = affine_bits(spec, config)
  return sum(bits_of(p, str(spec.bits)) for p in rows) / sum(_numel(config, rows).values())


def check_affine_budget(
  target_bpw: float, spec: QSpec, config: LlamaConfig, bits: Sequence[int], group_sizes: Sequence[int] = ()
) -> None:
  """Raises ValueError, before any work, when `target_bpw` is below every decoder linear at its cheapest choice
  (`affine_choices`), or above them all at the dearest, where the budget buys nothing an allocation could choose."""
  rows = gguf_recipes.row_lengths(config)
  bits_of, total = affine_bits(spec, config), sum(_numel(config, rows).values())
  costs = [[bits_of(p, c) for c in affine_choices(spec, r, bits, group_sizes)] for p, r in rows.items()]
  least, most = sum(map(min, costs)) / total, sum(map(max, costs)) / total
  where = f"in groups of {', '.join(map(str, dict.fromkeys((spec.group_size, *group_sizes))))}"
  if target_bpw < least:
    raise ValueError(f"--target_bpw={target_bpw:g}: below the {least:.3f} bits per weight of every linear at "
                     f"{min(bits)} bits {where} (--allocation_bits and --allocation_group_sizes give the "
                     "choices).")  # fmt: skip
  if target_bpw > most:
    raise ValueError(f"--target_bpw={target_bpw:g}: above the {most:.3f} bits per weight of every linear at "
                     f"{max(bits)} bits {where}; nothing to allocate (use --bits={max(bits)}).")  # fmt: skip


def allocate_affine(
  config: LlamaConfig,
  params,
  windows: Int[np.ndarray, "n t"],
  *,
  spec: QSpec,
  target_bpw: float,
  bits: Sequence[int] = (3, 4, 8),
  group_sizes: Sequence[int] = (),
  gptq_config: GptqConfig | None = None,
  model: WholeModel | None = None,
  batch_size: int = 4,
  show_progress: bool = False,
  errors: Mapping[str, Mapping[str, float]] | None = None,
) -> Allocation:
  """The bit width (and group size) of each decoder linear, on `spec`'s grid, that least raises the predicted KL
  divergence within `target_bpw` bits per weight of the linears (scales and zero points counted); q/k/v, gate/up
  and a layer's experts take one choice, as vLLM loads them (`FUSED_BY_VLLM`). ``Allocation.types`` holds the
  choices as `affine_choice` labels: ``"4"`` (4 bits in `spec`'s groups), ``"8g32"`` (from `group_sizes`).

  Each choice's cost is predicted for the rounding that will be used: round to nearest (`weighted_error` of
  `affine_round_trip`), or with `gptq_config` GPTQ's (`gptq_errors`, run on `model`, the float model's parts).

  Raises:
    ValueError: as `check_affine_budget`; when `gptq_config` is given without `model`.
  """
  check_affine_budget(target_bpw, spec, config, bits, group_sizes)
  if gptq_config is not None and model is None:
    raise ValueError("allocate_affine: GPTQ's errors are measured by running the model; pass `model`.")
  rows = gguf_recipes.row_lengths(config)
  candidates = {p: affine_choices(spec, r, bits, group_sizes) for p, r in rows.items()}
  if gptq_config is None:
    measure = lambda fisher: format_errors(params, fisher, candidates, affine_round_trip(spec),
                                           show_progress=show_progress)  # fmt: skip
  else:
    measure = lambda fisher: gptq_errors(model, windows, fisher, candidates, spec=spec, gptq_config=gptq_config,
                                         batch_size=batch_size, show_progress=show_progress)  # fmt: skip
  return _allocate(config, params, windows, candidates, measure, affine_bits(spec, config),
                   affine_groups(config), fixed_bits=0.0, total=sum(_numel(config, rows).values()),
                   target_bpw=target_bpw, batch_size=batch_size, show_progress=show_progress,
                   errors=errors)  # fmt: skip


def check_budget(
  target_bpw: float, base: str, config: LlamaConfig, *, imatrix: bool = False, types: Sequence[str] = ALLOCATABLE
) -> None:
  """Raises ValueError, before any work, when `target_bpw` is below what the cheapest of `types` for every linear
  (and `base`'s embedding and output) take, or when some linear has none of `types` that tiles its rows."""
  base_types = gguf_recipes.tensor_types(base, config, imatrix=imatrix)
  rows = gguf_recipes.row_lengths(config)
  numel = _numel(config, base_types)
  bits = sum(type_bits(t, numel[p]) for p, t in base_types.items() if p not in rows)
  for path, row_length in rows.items():
    fits = [t for t in gguf_recipes.types_for_row(row_length) if t in types]
    if not fits:
      raise ValueError(f"--allocation_types: none of {', '.join(types)} tiles the rows of {row_length} elements of "
                       f"{path}; allow one of {', '.join(gguf_recipes.types_for_row(row_length))}.")  # fmt: skip
    bits += min(type_bits(t, numel[path]) for t in fits)
  least = bits / sum(numel.values())
  if target_bpw < least:
    raise ValueError(f"--target_bpw={target_bpw:g}: below the {least:.3f} bits per weight of the cheapest types "
                     f"this model's linears can take ({base}'s embedding and output kept).")  # fmt: skip


def recipe_bits_per_weight(recipe: str, config: LlamaConfig, *, imatrix: bool = False) -> float:
  """Bits per weight of the tensors llama.cpp's `recipe` quantizes, on a model of `config`."""
  types = gguf_recipes.tensor_types(recipe, config, imatrix=imatrix)
  numel = _numel(config, types)
  return sum(type_bits(t, numel[p]) for p, t in types.items()) / sum(numel.values())
