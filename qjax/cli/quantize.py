"""Quantize a model, measure what it cost, and write it out.

Runs a recipe (--method, or your own with --recipe) over the model block by block on calibration text, then
prints perplexity and KL divergence before and after, size, bits per weight and time, and writes the quantized
model to --out (readable by `qjax eval --model=DIR`) or exports it (--export).

Example:
  qjax quantize                                        # GPTQ 4-bit g128 on the built-in default model
  qjax quantize --method=gptq --bits=3 --group_size=64 --desc_act --out=runs/gptq3
  qjax quantize --model=path/to/hf_model --method=rtn --bits=4 --group_size=128
  qjax quantize --method=none --export=gguf:Q4_K_M --imatrix --out=runs/q4km   # llama.cpp's encoders, in JAX
  qjax quantize --method=none --export=gguf:Q4_K_M --target_bpw=Q4_K_M          # types per tensor, Q4_K_M's size
  qjax quantize --bits=4 --group_size=64 --export=gptq --out=runs/gptq4-hf       # for vLLM, TGI, transformers
  qjax quantize --group_size=64 --export=compressed-tensors --target_bpw=3.5      # a bit width per linear
  qjax quantize --recipe=experiments/new_scheme.py:recipe --group_size=64         # your own scheme
  qjax quantize --distributed ...             # one of several processes: a TPU pod slice, SLURM (README)
"""

import collections
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import flags
from jax.sharding import AxisType, Mesh

from qjax.calib import text as texts
from qjax.calib.experts import POLICIES, ExpertPolicy
from qjax.calib.quantize import needs_calibration, quantize_model, quantize_parts
from qjax.calib.runner import RunnerOptions, check_checkpoint_dir, remove_checkpoints, sync_processes
from qjax.cli import Interrupted, interrupted
from qjax.cli import recipes as cli_recipes
from qjax.cli.estimate import estimate, estimate_sizes
from qjax.core import ClipSearch, Fp8Grid, InputError, MxFp4Grid, NvFp4Grid, PerTensorGrid, ggml
from qjax.core.ggml_grid import LAYOUTS
from qjax.core.qspec import QSpec
from qjax.eval import TensorLog, evaluate, sizes, write_report
from qjax.eval.report import RunReport
from qjax.eval.sensitivity import (
  Allocation,
  affine_choice,
  affine_groups,
  allocate_affine,
  allocate_gguf,
  check_affine_budget,
  check_budget,
  recipe_bits_per_weight,
)
from qjax.formats import gptq, open_checkpoint
from qjax.formats.default_model import BUILTIN_MODELS
from qjax.formats.gguf import model_metadata
from qjax.formats.output import atomic_directory, atomic_file, check_free_space, check_output
from qjax.formats.rules_file import AFFINE_BITS, TensorRules, read_rules, rules_from_types, write_rules
from qjax.formats.shards import merge, skeleton
from qjax.formats.targets import (
  GROUP_SIZES,
  Target,
  check_group_size,
  check_shapes,
  check_spec,
  export,
  loader_note,
  output_path,
  parse_target,
)
from qjax.models import LlamaBlocks, LlamaConfig, logits_fn
from qjax.models.checkpoint import param_shapes, set_nested
from qjax.quantizers import GptqConfig
from qjax.transforms import observe, recipes
from qjax.transforms.gguf_recipes import ALLOCATABLE, RECIPES, row_lengths, tensor_types
from qjax.transforms.recipes import Recipe

GRIDS = ("affine", "fp8", "mxfp4", "nvfp4")


DAMP = 0.01
"""GPTQ's dampening by default (AutoGPTQ's ``damp_percent``)."""
GGUF_DAMP = 0.1
"""GPTQ's dampening into a GGUF recipe: out of domain, 0.01 lost to llama.cpp's imatrix IQ4_XS file, 0.1 beat it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """The values of `qjax quantize`'s flags (the defaults are the flags' defaults; see `qjax quantize --help`)."""

  model: str = "default"
  method: str = "gptq"
  recipe: str | None = None
  bits: int = 4
  group_size: int = 128
  partial_groups: bool = False
  grid: str = "affine"
  per_tensor: bool = False
  sym: bool = True
  desc_act: bool = False
  act_group_aware: bool = True
  static_groups: bool = False
  damp_percent: float | None = None  # None: `gptq_damp`'s default for the export
  mse: bool = False
  true_sequential: bool = True
  nsamples: int = 32
  seqlen: int = 512
  calib: str = "default"
  seed: int = 0
  eval_text: str = "default"
  eval_windows: int = 16
  batch_size: int = 8
  out: str | None = None
  export: str | None = None
  imatrix: bool = False
  target_bpw: str | None = None
  allocation_types: str = ",".join(ALLOCATABLE)
  allocation_bits: str = "3,4,8"
  allocation_group_sizes: str = ""
  rules: str | None = None
  checkpoint_dir: str | None = None
  overwrite: bool = False
  expert_policy: str = ExpertPolicy().kind
  expert_kappa: float = ExpertPolicy().kappa

  @classmethod
  def from_flags(cls) -> "Settings":
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(cls)}
    return cls(**{**values, "bits": int(values["bits"])})


_D = Settings()
flags.DEFINE_string(
    "model", _D.model, "Float model to quantize: 'default' (built-in SmolLM2-135M-Instruct), 'gemma3-270m' (built-in "
    "Gemma 3 270M), a Hugging Face directory, or a .gguf file. Example: --model=~/models/Llama-3.2-1B."
)  # fmt: skip
flags.DEFINE_enum(
  "method", _D.method, list(cli_recipes.METHODS), "Quantization recipe: a rounding (rtn, gptq) after optional "
  "preparations (rotate, awq, lwc); 'none' with --export=gguf:TYPE encodes the float weights as llama.cpp would. "
  "Each name is a function in qjax.transforms.recipes."
)  # fmt: skip
flags.DEFINE_string(
  "recipe", _D.recipe, "Your own recipe instead of --method: FILE.py:function or module:function, a function returning "
  "a qjax.Recipe; it is called with the parameters it names among spec, gptq_config, clip, rounding, model_config, "
  "seed. Example: --recipe=experiments/new_scheme.py:recipe."
)  # fmt: skip
flags.DEFINE_enum("bits", str(_D.bits), ["2", "3", "4", "5", "6", "8"], "Bits per weight code. Example: --bits=3.")
flags.DEFINE_integer(
    "group_size", _D.group_size, f"Input channels sharing a scale, one of {GROUP_SIZES} (-1: per output "
    "channel). "
    "Where it does not divide a layer's input width the last group is shorter (a qjax directory; a Hugging Face "
    "export refuses it unless --partial_groups). Example: --group_size=64."
)  # fmt: skip
flags.DEFINE_bool(
  "partial_groups", _D.partial_groups, "With --export=gptq/gptq_v2, allow a group size that does not divide a "
  "layer's input width: the last group is shorter, as GPTQ defines it, but only GPTQModel's and transformers' torch "
  "kernel (backend='torch') read such files; vLLM, Marlin, ExLlama and GPTQModel's default CPU kernel refuse them."
)  # fmt: skip
flags.DEFINE_enum(
  "grid", _D.grid, list(GRIDS), "The number format codes are rounded into: affine (integer codes, a scale and "
  "optional zero point per group: GPTQ, AWQ, compressed-tensors pack-quantized), fp8 (E4M3 codes, a float scale per "
  "group; with --bits=8, usually --group_size=-1), mxfp4 (E2M1 codes, a power-of-two scale per 32; with "
  "--group_size=32), nvfp4 (E2M1 codes, an E4M3 scale per 16 and a power-of-two scale per tensor, shared by q/k/v "
  "and by gate/up as vLLM needs; with --group_size=16). fp8, mxfp4 and nvfp4 export to a qjax directory or "
  "--export=compressed-tensors. Example: --grid=fp8 --bits=8 --group_size=-1."
)  # fmt: skip
flags.DEFINE_bool(
  "per_tensor", _D.per_tensor, "One scale for each whole weight matrix (compressed-tensors' tensor strategy), on "
  "the symmetric affine or fp8 grid with --group_size=-1; exported with --export=compressed-tensors or to a qjax "
  "directory. Example: --grid=fp8 --bits=8 --group_size=-1 --per_tensor."
)  # fmt: skip
flags.DEFINE_bool("sym", _D.sym, "Symmetric grid (fixed zero point); --nosym stores a zero point per group.")
flags.DEFINE_bool("desc_act", _D.desc_act, "GPTQ act-order: quantize input channels by decreasing Hessian diagonal.")
flags.DEFINE_bool(
  "act_group_aware", _D.act_group_aware, "GPTQ group-aware reordering (GPTQModel's default): quantize whole "
  "groups by decreasing Hessian diagonal, needing no g_idx. Ignored with --desc_act; --noact_group_aware for "
  "plain GPTQ order."
)  # fmt: skip
flags.DEFINE_bool("static_groups", _D.static_groups, "With --desc_act, keep groups in the original channel order.")
flags.DEFINE_float(
  "damp_percent",
  _D.damp_percent,
  f"GPTQ dampening, a fraction of mean(diag(H)); default {DAMP}, and {GGUF_DAMP} "
  "into a GGUF recipe, whose files are run on any text: there it keeps GPTQ's file ahead of llama.cpp's imatrix "
  "file on text unlike the calibration (experiments/gguf_gptq.md). Example: --damp_percent=0.05.",
)
flags.DEFINE_bool("mse", _D.mse, "Search a clipping range per group that minimises the rounding error (RTN and GPTQ).")
flags.DEFINE_bool(
  "true_sequential",
  _D.true_sequential,
  "Quantize q/k/v, then o, then gate/up, then down, each from inputs after the previous.",
)
flags.DEFINE_integer("nsamples", _D.nsamples, "Calibration windows. Example: --nsamples=128.")
flags.DEFINE_integer("seqlen", _D.seqlen, "Tokens per calibration and evaluation window. Example: --seqlen=2048.")
flags.DEFINE_string(
    "calib", _D.calib, "Calibration text: 'default' (the calibration part of Python's documentation topics) or a "
    "UTF-8 file. Example: --calib=c4_sample.txt."
)  # fmt: skip
flags.DEFINE_integer("seed", _D.seed, "Seed for choosing calibration windows and for a rotation's signs.")
flags.DEFINE_string("eval_text", _D.eval_text, "Evaluation text ('default' or a UTF-8 file).")
flags.DEFINE_integer(
  "eval_windows",
  _D.eval_windows,
  "Evaluation windows before and after (0 skips evaluation). Example: --eval_windows=64.",
)
flags.DEFINE_integer("batch_size", _D.batch_size, "Calibration windows per step (bounds activation memory).")
flags.DEFINE_string("out", _D.out, "Directory for the quantized model (default: runs/<method>-w<bits>g<group>).")
flags.DEFINE_string(
  "export", _D.export, "Write the model in another format instead of a qjax directory: gguf:<TYPE>, TYPE a llama.cpp "
  "file type (Q4_K_M, Q5_K_M, Q8_0, Q4_0, Q2_K, Q3_K_M, …) or F32/F16/BF16 (with --method=none); or a Hugging Face "
  "directory for vLLM, TGI and transformers (with --method=gptq or rtn): gptq (GPTQ v1 zero points, read by "
  "every loader), gptq_v2 (v2 zero points, for GPTQModel and vLLM; stores a zero point of 0, which v1 cannot), "
  "awq (AutoAWQ gemm layout: --bits=4, no --desc_act), compressed-tensors (vLLM's pack-quantized format, "
  "llm-compressor's; transformers reads it with the compressed-tensors package; act-order only with "
  "--static_groups). Every Hugging Face export needs a group size dividing each layer's input width (see "
  "--partial_groups). Example: --export=gguf:Q4_K_M, --export=compressed-tensors."
)  # fmt: skip
flags.DEFINE_bool(
  "imatrix", _D.imatrix, "With a GGUF recipe: weight the block searches by an importance matrix (mean x² of each "
  "linear's inputs) measured on the calibration text, as llama.cpp's imatrix tool does."
)  # fmt: skip
flags.DEFINE_string(
  "target_bpw", _D.target_bpw, "Bits allocated per linear to a budget. With --export=gguf:TYPE: instead of the "
  "recipe's fixed types, give each decoder linear the llama.cpp type (any llama.cpp reads for it) that least raises "
  "the predicted KL divergence, to this many bits per weight of the quantized tensors (the recipe's embedding and "
  "output types are kept); a number, or a llama.cpp file type for that recipe's size on this model. With "
  "--export=compressed-tensors, gptq, gptq_v2 or a qjax directory: a bit width per linear (of --allocation_bits, "
  "q/k/v, gate/up and a layer's experts at one width as vLLM loads them) on the --group_size/--sym grid, to this "
  "many bits per weight of the linears, scales counted. The prediction is each linear's Fisher-weighted rounding "
  "error, measured once on the calibration text; the choice is written to <out>/rules.json for --rules. Example: "
  "--export=gguf:Q4_K_M --imatrix --target_bpw=4.5, --target_bpw=Q4_K_M, --export=compressed-tensors --target_bpw=4.5."
)  # fmt: skip
flags.DEFINE_string(
  "allocation_types", _D.allocation_types, "With --target_bpw: the llama.cpp types a linear may take (of those that "
  "tile its rows). Example: --allocation_types=Q4_0,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K."
)  # fmt: skip
flags.DEFINE_string(
  "allocation_bits", _D.allocation_bits, "With --target_bpw and an affine export: the bit widths a linear may take "
  "(vLLM's Marlin kernels run 4 and 8; its other GPTQ and compressed-tensors kernels 2 and 3 too). 2 is left out by "
  "default: the proxy underrates what 2-bit linears cost (experiments/allocation.md). Example: "
  "--allocation_bits=4,8."
)  # fmt: skip
flags.DEFINE_string(
  "allocation_group_sizes", _D.allocation_group_sizes, "With --target_bpw and an affine export: group sizes a "
  "linear may take besides --group_size (those that divide its input width), each with every width of "
  "--allocation_bits. Example: --group_size=64 --allocation_group_sizes=32,128."
)  # fmt: skip
flags.DEFINE_string(
  "rules", _D.rules, "A rules file of per-tensor llama.cpp types over a GGUF recipe, or of bit widths per linear on "
  "an affine grid (as --target_bpw writes, or your own: qjax/formats/rules_file.py); without --export, a GGUF "
  "file's base recipe is the export. Example: --rules=runs/alloc/rules.json."
)  # fmt: skip
flags.DEFINE_string(
    "checkpoint_dir", _D.checkpoint_dir, "Where finished blocks are checkpointed; a rerun with the same flags "
    "resumes there. "
    "Default: <out>.checkpoint, removed after success."
)  # fmt: skip
flags.DEFINE_enum(
  "expert_policy", _D.expert_policy, list(POLICIES), "Mixtures of experts: what experts that calibration fed few "
  "tokens quantize with: 'plain' (their own statistics; none: round-to-nearest), 'shrink' (shrunk toward the "
  "layer's pooled ones by --expert_kappa tokens), 'rtn' (round-to-nearest below 64 tokens), 'all_tokens' (every "
  "expert calibrated on every token). See experiments/moe_calibration.md."
)  # fmt: skip
flags.DEFINE_float("expert_kappa", _D.expert_kappa, "With --expert_policy=shrink: the pooled statistics' weight, in "
                   "tokens.")  # fmt: skip
flags.DEFINE_bool(
  "overwrite", _D.overwrite, "Replace a previous qjax output of another kind in --out. A directory of files qjax "
  "did not write is never replaced; a previous output of the same kind is replaced without it."
)  # fmt: skip


# How the process is launched, not what it computes: outside `Settings`, so that the output, its recorded settings
# and the checkpoints' run are the same however many processes share the work.
flags.DEFINE_bool(
  "distributed", False, "Run as one of several processes that share the work (jax.distributed), e.g. one per host "
  "of a TPU pod slice or one per GPU under SLURM, where JAX finds the others itself; elsewhere give "
  "--coordinator_address, --num_processes and --process_id. Every process runs the same command: calibration "
  "windows and GPTQ's output channels are split over all their devices, and process 0 writes the output, the same "
  "bytes as one process with as many devices. Example: srun qjax quantize --distributed --out=runs/gptq4."
)  # fmt: skip
flags.DEFINE_string(
  "coordinator_address", None, "With --distributed where JAX cannot find the others: host:port of process 0 "
  "(default: $JAX_COORDINATOR_ADDRESS). Example: --coordinator_address=10.0.0.1:8476."
)  # fmt: skip
flags.DEFINE_integer("num_processes", None, "With --distributed where JAX cannot find the others: how many processes.")
flags.DEFINE_integer("process_id", None, "With --distributed where JAX cannot find the others: this process's "
                     "index, 0 to --num_processes - 1.")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the settings ask for, checked: the recipe, where it goes, and how it is labelled."""

  recipe: Recipe
  target: Target
  spec: QSpec
  label: str
  recipe_id: str
  out: str
  checkpoint_dir: str
  actorder: str | None = None  # compressed-tensors' record of GPTQ's order: "weight" (--desc_act --static_groups)
  ggml_sweep: bool = False  # GPTQ rounds into llama.cpp's block types (slower than into an affine grid)
  target_bpw: float | None = None  # allocate llama.cpp types or bit widths to this budget before quantizing
  overrides: dict[str, str] | None = None  # path -> ggml type, or width ("3"): an allocation's, --rules'
  gptq_config: GptqConfig | None = None  # the recipe's GPTQ options, when it rounds with GPTQ


def gptq_damp(s: Settings, target: Target) -> float:
  """--damp_percent, or its default for the export: `GGUF_DAMP` into a GGUF recipe, `DAMP` otherwise."""
  if s.damp_percent is None:
    return GGUF_DAMP if target.quantizes else DAMP
  if not 0.0 <= s.damp_percent < 1.0:
    raise ValueError(f"--damp_percent must be in [0, 1), got {s.damp_percent}.")
  return s.damp_percent


def _gptq_config(s: Settings, target: Target) -> GptqConfig:
  return GptqConfig(
    damp=gptq_damp(s, target),
    act_order=s.desc_act,
    static_groups=s.static_groups,
    clip=ClipSearch() if s.mse else None,
    group_aware=s.act_group_aware and not s.desc_act,
  )


def _search_spec(target: Target, spec: QSpec) -> QSpec:
  """The grid AWQ and learned clipping aim at: --bits/--group_size, or a GGUF recipe's main type's sub-blocks
  (its bits, symmetry and sub-block width: the scale llama.cpp stores per 16 or 32 weights)."""
  if not target.quantizes:
    return spec
  main = RECIPES[target.gguf_type]
  info = ggml.BLOCK_TYPES[main]
  return QSpec(bits=info.bits, group_size=LAYOUTS[main].sub_block, symmetric=info.symmetric)


def _specs(spec: QSpec, overrides: dict[str, str] | None) -> dict[str, QSpec] | None:
  """An affine allocation's choices (``"4"``, ``"8g32"``) as the specs they name."""
  return None if overrides is None else {path: affine_choice(label, spec) for path, label in overrides.items()}


def _rounding(s: Settings, target: Target, spec: QSpec, clip, config, overrides) -> Recipe:
  if target.quantizes:
    return recipes.gguf(target.gguf_type, config, imatrix=s.imatrix, overrides=overrides)
  if target.is_gguf:
    return Recipe(())  # a float GGUF: nothing rounds
  return recipes.rtn(spec, clip=clip, overrides=_specs(spec, overrides))


def _gptq_rounding(target: Target, spec: QSpec, gptq_config: GptqConfig, config, overrides) -> Recipe:
  if target.quantizes:
    return recipes.gguf(target.gguf_type, config, gptq_config=gptq_config, overrides=overrides)
  if target.is_gguf:
    raise ValueError(f"--export={target} stores float weights; GPTQ has nothing to round into (use a GGUF recipe).")
  return recipes.gptq(spec, gptq_config, overrides=_specs(spec, overrides))


def _recipe_function(s: Settings, method_given: bool):
  """``(function, identity, name)`` of the recipe the settings name."""
  if s.recipe and method_given:
    raise ValueError("give --method or --recipe, not both.")
  if s.recipe:
    fn, recipe_id = cli_recipes.load_function(s.recipe)
    return fn, recipe_id, s.recipe
  if s.method not in cli_recipes.METHODS:
    raise ValueError(f"--method={s.method}: unknown; one of {', '.join(cli_recipes.METHODS)}, or --recipe.")
  return cli_recipes.METHODS[s.method], s.method, s.method


def settings_spec(s: Settings) -> QSpec:
  """The spec of every rounded linear that --bits, --group_size, --sym and --grid name.

  Raises:
    ValueError: naming the flags, for a floating-point grid with other bits, groups or a zero point.
  """
  if s.per_tensor and (s.grid not in ("affine", "fp8") or s.group_size != -1 or not s.sym):
    raise ValueError(f"--per_tensor needs --grid=affine or fp8, --group_size=-1 and a symmetric grid, got "
                     f"--grid={s.grid} --group_size={s.group_size}{'' if s.sym else ' --nosym'}.")  # fmt: skip
  spec = _grid_spec(s)
  if s.per_tensor:
    return dataclasses.replace(spec, grid=PerTensorGrid(grid=spec.rounding_grid))
  return spec


def _grid_spec(s: Settings) -> QSpec:
  if s.grid == "affine":
    return QSpec(bits=s.bits, group_size=s.group_size, symmetric=s.sym, partial_groups=True)
  if s.grid not in GRIDS:
    raise ValueError(f"--grid must be one of {GRIDS}, got {s.grid!r}.")
  need = {"fp8": dict(bits=8), "mxfp4": dict(bits=4, group_size=32), "nvfp4": dict(bits=4, group_size=16)}[s.grid]
  got = {"bits": s.bits, "group_size": s.group_size}
  if any(got[k] != v for k, v in need.items()) or not s.sym:
    wanted = " ".join(f"--{k}={v}" for k, v in need.items())
    raise ValueError(f"--grid={s.grid} needs {wanted} and a symmetric grid (no --nosym), got --bits={s.bits} "
                     f"--group_size={s.group_size}{'' if s.sym else ' --nosym'}.")  # fmt: skip
  if s.grid == "fp8":
    return QSpec(bits=8, group_size=s.group_size, scale_dtype=np.float32, grid=Fp8Grid(), partial_groups=True)
  if s.grid == "nvfp4":
    return QSpec(bits=4, group_size=16, grid=NvFp4Grid())  # its global scale is fixed per fused set of linears
  return QSpec(bits=4, group_size=32, grid=MxFp4Grid())


def _check(s: Settings, target: Target, spec: QSpec, config: LlamaConfig, *, name: str, uses_gptq: bool) -> None:
  """Raises for settings that contradict each other, the target or the model (naming the flag)."""
  if s.group_size not in GROUP_SIZES:
    raise ValueError(f"--group_size must be one of {GROUP_SIZES}, got {s.group_size}.")
  if s.nsamples < 1 or s.seqlen < 2:
    raise ValueError(f"--nsamples must be >= 1 and --seqlen >= 2, got {s.nsamples} and {s.seqlen}.")
  if s.imatrix and not target.quantizes:
    raise ValueError("--imatrix applies to GGUF recipes (--export=gguf:<TYPE>, e.g. gguf:Q4_K_M).")
  if s.target_bpw and s.rules:
    raise ValueError("give --target_bpw (choose the types) or --rules (types chosen before), not both.")
  if (s.target_bpw or s.rules) and not target.quantizes:
    _check_allocatable(s, target, "--target_bpw" if s.target_bpw else "--rules")
  act_order = uses_gptq and s.desc_act and not s.static_groups and s.group_size != -1
  if target.quantizes and act_order:
    raise ValueError(
      f"--desc_act with --export={target}: a GGUF file has no g_idx, so GPTQ must keep each block's columns "
      "together; drop --desc_act (group-aware order is the default) or add --static_groups."
    )
  if target.is_hf and name == "none":
    raise ValueError(f"--export={target} writes linears rounded by RTN or GPTQ; use a --method that rounds.")
  if name == "none" and not target.is_gguf:
    raise ValueError("--method=none quantizes nothing by itself; give --export=gguf:<TYPE> (e.g. gguf:Q4_K_M).")
  affine_groups_only = target.is_gguf or target.is_gptq or target.kind == "awq"
  if s.grid != "affine" and affine_groups_only:
    raise ValueError(
      f"--grid={s.grid} with --export={target}: that format stores integer codes (GGUF: its own block types); "
      "export to a qjax directory or --export=compressed-tensors."
    )
  if s.per_tensor and affine_groups_only:
    raise ValueError(f"--per_tensor with --export={target}: that format has no one-scale-per-matrix form; export "
                     "to a qjax directory or --export=compressed-tensors.")  # fmt: skip
  if target.is_gguf:  # what llama.cpp cannot be told about the model is refused now, not after quantizing it
    try:
      model_metadata(config, file_type=target.gguf_type, name="")
    except NotImplementedError as e:
      raise NotImplementedError(f"--export={target}: {e}") from None
  if target.is_hf:
    check_spec(target, spec, act_order=act_order)
    check_group_size(target, s.group_size, config, partial_groups=s.partial_groups)
    check_shapes(target, spec, config)


def _check_allocatable(s: Settings, target: Target, flag: str) -> None:
  """Raises when `target` cannot hold a width per linear (--target_bpw or --rules without a GGUF recipe)."""
  if target.is_gguf:
    raise ValueError(f"{flag} with --export={target}: a float GGUF has nothing to allocate; give a llama.cpp "
                     "recipe (--export=gguf:Q4_K_M: its embedding and output types are kept).")  # fmt: skip
  if target.kind == "awq":
    raise ValueError(f"{flag} with --export=awq: an AWQ config has one width for every layer; use "
                     "--export=compressed-tensors (config_groups per width) or gptq (per-module dynamic).")  # fmt: skip
  if s.grid != "affine" or s.per_tensor:
    raise ValueError(f"{flag} allocates widths on the affine grid; drop --grid={s.grid}"
                     f"{' --per_tensor' if s.per_tensor else ''}.")  # fmt: skip


def _check_widths(target: Target, spec: QSpec, config: LlamaConfig, widths, source: str) -> None:
  """Raises when the target cannot hold a linear at one of `widths` (naming `source`, the flag or file)."""
  allowed = gptq.BITS if target.is_gptq else AFFINE_BITS
  wrong = sorted({int(b) for b in widths} - set(allowed))
  if wrong:
    raise ValueError(f"{source}: --export={target} stores widths {', '.join(map(str, allowed))}, not "
                     f"{', '.join(map(str, wrong))}.")  # fmt: skip
  for bits in sorted({int(b) for b in widths}):
    check_shapes(target, dataclasses.replace(spec, bits=bits), config)


def _check_choices(s: Settings, target: Target, spec: QSpec, config: LlamaConfig, overrides, source: str) -> None:
  """Raises when the target cannot hold an affine allocation's choice of some linear (naming `source`): a width it
  does not store, or a group size that leaves that linear a partial group where the target needs whole ones."""
  chosen = {path: affine_choice(label, spec) for path, label in overrides.items()}
  _check_widths(target, spec, config, {c.bits for c in chosen.values()}, source)
  rows = row_lengths(config)
  partial_ok = not target.is_hf or (target.is_gptq and s.partial_groups)
  for path, c in chosen.items():
    if c.group_size > 0 and rows[path] % c.group_size and not partial_ok:
      raise ValueError(f"{source}: {path}: groups of {c.group_size} leave its {rows[path]} inputs a partial group, "
                       f"which --export={target} does not hold.")  # fmt: skip


def _affine_overrides(rules: TensorRules, s: Settings, config: LlamaConfig) -> dict[str, str]:
  """path -> width of an affine rules file, checked against the settings' grid and vLLM's fused groups."""
  source = f"--rules={s.rules}"
  if (rules.group_size, rules.symmetric) != (s.group_size, s.sym):
    chosen = f"--group_size={rules.group_size}{'' if rules.symmetric else ' --nosym'}"
    raise InputError(f"{source}: widths chosen for {chosen}, not --group_size={s.group_size}"
                     f"{'' if s.sym else ' --nosym'}; give those flags.")  # fmt: skip
  overrides = rules.resolve(row_lengths(config), source=source)
  for group in affine_groups(config):
    widths = {overrides.get(p, str(s.bits)) for p in group}
    if len(widths) > 1:
      raise InputError(f"{source}: {', '.join(group)} are loaded as one matrix by vLLM and need one width and group "
                       f"size, got {', '.join(sorted(widths))}.")  # fmt: skip
  return overrides


def plan(
  s: Settings, config: LlamaConfig, *, method_given: bool = False, overrides: dict[str, str] | None = None
) -> Plan:
  """Checks the settings against each other and the model's config, before any work, and builds the recipe.

  Args:
    s: the settings.
    config: the model's config.
    method_given: whether --method was given (it and --recipe exclude each other).
    overrides: path -> llama.cpp type over the GGUF recipe's, or bit width over --bits (a bit allocation's result;
      default: --rules').

  Raises:
    ValueError, NotImplementedError, FileNotFoundError: naming the flag.
  """
  rules = read_rules(s.rules) if s.rules else None
  gguf_rules = rules is not None and rules.format == "gguf"
  target = parse_target(s.export if s.export or not gguf_rules else f"gguf:{rules.base}")
  if rules is not None and gguf_rules != target.quantizes:
    want = "a GGUF recipe (--export=gguf:<TYPE>)" if gguf_rules else "an affine export (compressed-tensors, gptq, qjax)"
    raise InputError(f"--rules={s.rules}: {rules.format} rules are for {want}, not --export={target}.")
  spec = settings_spec(s)
  gptq_config = _gptq_config(s, target)
  fn, recipe_id, name = _recipe_function(s, method_given)
  parameters = inspect.signature(fn).parameters
  uses_gptq = bool({"gptq_rounding", "gptq_config"} & set(parameters))
  _check(s, target, spec, config, name=name, uses_gptq=uses_gptq)
  calibrated = s.imatrix or uses_gptq  # the types llama.cpp gives a file made with an importance matrix
  target_bpw = _budget(s.target_bpw, config, imatrix=calibrated, recipes=target.quantizes) if s.target_bpw else None
  unknown = [t for t in allocation_types(s) if t not in ALLOCATABLE]
  if unknown:
    raise ValueError(f"--allocation_types: {', '.join(unknown)} not among the types qjax encodes for a linear "
                     f"({', '.join(ALLOCATABLE)}).")  # fmt: skip
  if target_bpw and target.quantizes:
    check_budget(target_bpw, target.gguf_type, config, imatrix=calibrated, types=allocation_types(s))
  elif target_bpw:
    _check_widths(target, spec, config, allocation_bits(s), "--allocation_bits")
    check_affine_budget(target_bpw, spec, config, allocation_bits(s), allocation_group_sizes(s))
  if gguf_rules and overrides is None:
    paths = tensor_types(target.gguf_type, config, imatrix=calibrated)
    overrides = rules.resolve(paths, source=f"--rules={s.rules}")
    try:  # each type must tile its tensor's rows, and fused parts share one
      tensor_types(target.gguf_type, config, imatrix=calibrated, overrides=overrides)
    except ValueError as e:
      raise InputError(f"--rules={s.rules}: {e}") from None
  elif rules is not None and overrides is None:
    overrides = _affine_overrides(rules, s, config)
  if overrides and not target.is_gguf:
    _check_choices(s, target, spec, config, overrides, f"--rules={s.rules}" if rules else "the allocation")

  def build(rounded_config: LlamaConfig) -> Recipe:
    values = {
      "spec": _search_spec(target, spec),
      "gptq_config": gptq_config,
      "clip": gptq_config.clip,
      "rounding": _rounding(s, target, spec, gptq_config.clip, rounded_config, overrides),
      "model_config": config,
      "seed": s.seed,
    }
    if "gptq_rounding" in parameters:
      values["gptq_rounding"] = _gptq_rounding(target, spec, gptq_config, rounded_config, overrides)
    return cli_recipes.call(fn, values, name=name)

  recipe = build(config)
  if recipe.unties_head:  # a rotation: refused now, before any work, where the model's stream cannot take one
    skeleton: dict = {}
    for path in param_shapes(config):
      set_nested(skeleton, tuple(path.split("/")), None)
    LlamaBlocks.residual_stream(skeleton)
  if recipe.unties_head and config.tie_word_embeddings:
    # A rotation gives a tied model its own head: the GGUF recipe types the embedding and the output as llama.cpp
    # types them in the untied model it will be handed.
    recipe = build(dataclasses.replace(config, tie_word_embeddings=False))
  short = name.rpartition(":")[2]
  if target.quantizes:
    label = ("" if name in ("none", "rtn") else f"{short} ") + f"gguf {target.gguf_type}"
    label += (" imatrix" if s.imatrix else "") + (f" @{target_bpw:.2f}bpw" if target_bpw else "")
    label += " +rules" if rules else ""
  elif target_bpw or rules:
    label = f"{short} g{s.group_size}" + (f" @{target_bpw:.2f}bpw" if target_bpw else " +rules")
  else:
    label = f"{short} w{s.bits}g{s.group_size}" + ("" if s.grid == "affine" else f" {s.grid}")
    label += " per-tensor" if s.per_tensor else ""
  default_name = f"gguf-{target.gguf_type}" if target.is_gguf else f"{s.method}-w{s.bits}g{s.group_size}"
  if target_bpw and not target.is_gguf:
    default_name = f"{s.method}-g{s.group_size}"
  default_name += f"-{target_bpw:.2f}bpw" if target_bpw else ""
  default_name += ("" if s.grid == "affine" else f"-{s.grid}") + ("-tensor" if s.per_tensor else "")
  if target.is_hf:
    default_name += f"-{target.kind}"
  out = s.out or os.path.join("runs", default_name)
  checkpoint_dir = s.checkpoint_dir or out.rstrip("/") + ".checkpoint"
  actorder = "weight" if uses_gptq and s.desc_act and s.static_groups else None  # dynamic groups: refused above
  return Plan(recipe, target, spec, label, recipe_id, out, checkpoint_dir, actorder, uses_gptq and target.quantizes,
              target_bpw, overrides, gptq_config if uses_gptq else None)  # fmt: skip


def allocation_sweeps(s: Settings, p: Plan) -> int:
  """GPTQ sweeps of every linear that --target_bpw's allocation runs: one per choice when GPTQ rounds them."""
  choices = len(allocation_bits(s)) * len({s.group_size, *allocation_group_sizes(s)})
  return choices if p.target_bpw and p.gptq_config and not p.target.is_gguf else 0


def allocation_types(s: Settings) -> tuple[str, ...]:
  return tuple(t.strip() for t in s.allocation_types.split(",") if t.strip())


def allocation_bits(s: Settings) -> tuple[int, ...]:
  """--allocation_bits as widths.

  Raises:
    ValueError: naming the flag, for a value that is not a list of widths in `AFFINE_BITS`.
  """
  try:
    widths = tuple(sorted({int(b) for b in s.allocation_bits.split(",") if b.strip()}))
  except ValueError:
    widths = ()
  if not widths or any(b not in AFFINE_BITS for b in widths):
    raise ValueError(f"--allocation_bits={s.allocation_bits}: expected widths from {', '.join(map(str, AFFINE_BITS))}"
                     ", e.g. 2,3,4,8.")  # fmt: skip
  return widths


def allocation_group_sizes(s: Settings) -> tuple[int, ...]:
  """--allocation_group_sizes as group sizes.

  Raises:
    ValueError: naming the flag, for a value that is not a list of `GROUP_SIZES`.
  """
  try:
    sizes = tuple(int(g) for g in s.allocation_group_sizes.split(",") if g.strip())
  except ValueError:
    sizes = (0,)
  if any(g not in GROUP_SIZES for g in sizes):
    raise ValueError(f"--allocation_group_sizes={s.allocation_group_sizes}: expected group sizes from "
                     f"{', '.join(map(str, GROUP_SIZES))}.")  # fmt: skip
  return sizes


def _budget(value: str, config: LlamaConfig, *, imatrix: bool, recipes: bool) -> float:
  """--target_bpw as bits per weight: a number, or (for a GGUF recipe) a llama.cpp file type's on this model."""
  if value in RECIPES and recipes:
    return recipe_bits_per_weight(value, config, imatrix=imatrix)
  try:
    bpw = float(value)
  except ValueError:
    named = f" or a llama.cpp file type ({', '.join(RECIPES)})" if recipes else ""
    raise ValueError(f"--target_bpw={value}: expected bits per weight (4.5){named}.") from None
  if not 0 < bpw <= 32:
    raise ValueError(f"--target_bpw={value}: bits per weight must be in (0, 32].")
  return bpw


def run_id(s: Settings, p: Plan) -> dict:
  """What a checkpoint directory must have been written with to be resumed."""
  skip = {"out", "checkpoint_dir", "eval_windows", "eval_text", "method", "recipe", "partial_groups"}
  settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in skip}
  if s.rules:  # the file's content, not its name, decides the types
    settings["rules"] = hashlib.sha256(json.dumps(sorted(p.overrides.items())).encode()).hexdigest()
  return {"recipe": p.recipe_id, **settings, "damp_percent": gptq_damp(s, p.target)}


def calibration_windows(s: Settings, tokenizer):
  """The (nsamples, seqlen) calibration windows the settings name."""
  tokens = texts.tokenize(tokenizer, texts.load_text(s.calib, "calibration"))
  return texts.calibration_windows(tokens, s.nsamples, s.seqlen, seed=s.seed)


def data_mesh() -> Mesh | None:
  """Every device of every JAX process along one ``data`` axis, which calibration windows and GPTQ's output
  channels are split over; None with one device (nothing to split)."""
  n = jax.device_count()
  return None if n == 1 else jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))


def quantize_with(
  s: Settings,
  *,
  checkpoint=None,
  windows=None,
  log: TensorLog | None = None,
  checkpoint_dir: str | None = None,
  show_progress: bool = False,
  allocation: Allocation | None = None,
  stream: bool = False,
) -> tuple[Plan, LlamaConfig, dict | Iterator[dict]]:
  """The settings' plan, and the model quantized by it: ``(plan, config of the result, params)``.

  Calibration is split over every device (`data_mesh`), of every process under ``jax.distributed``: each process
  calls this with the same settings and gets the whole result.

  Args:
    s: the settings.
    checkpoint: the float checkpoint (default: opened from ``s.model``).
    windows: calibration windows (default: the settings' text, when the recipe needs them).
    log: records each quantized tensor's error.
    checkpoint_dir: where to checkpoint finished blocks (None: no checkpoints).
    show_progress: print the runner's progress.
    allocation: --target_bpw's allocation when already made (default: made here when the settings ask for one).
    stream: return the model's parts as they are quantized (`quantize_parts`: for an exporter to write one at a
      time) instead of the whole tree; the config is then the source's (a writer learns whether the result's head
      is tied from the parts: ``lm_head`` comes exactly when it is not).
  """
  checkpoint = checkpoint or open_checkpoint(s.model)
  p = plan(s, checkpoint.config)
  if windows is None and (needs_calibration(p.recipe) or p.target_bpw):
    windows = calibration_windows(s, checkpoint.tokenizer())
  if p.target_bpw:
    allocation = allocation or allocate(s, p, checkpoint, windows, show_progress=show_progress)
    p = plan(s, checkpoint.config, overrides=allocation.types)
  recipe = p.recipe
  if log is not None:
    recipe = dataclasses.replace(recipe, stages=tuple(observe(stage, log.record) for stage in recipe.stages))
  experts = ExpertPolicy(kind=s.expert_policy, kappa=s.expert_kappa)
  options = RunnerOptions(batch_size=s.batch_size, true_sequential=s.true_sequential, checkpoint_dir=checkpoint_dir,
                          mesh=data_mesh(), show_progress=show_progress, experts=experts,
                          expert_tokens=None if log is None else log.record_experts)  # fmt: skip
  if stream:
    return p, checkpoint.config, quantize_parts(LlamaBlocks(checkpoint), recipe, windows, options=options,
                                                run_id=run_id(s, p))  # fmt: skip
  qparams = quantize_model(LlamaBlocks(checkpoint), recipe, windows, options=options, run_id=run_id(s, p))
  return p, dataclasses.replace(checkpoint.config, tie_word_embeddings="lm_head" not in qparams), qparams


def allocate(s: Settings, p: Plan, checkpoint, windows, *, show_progress: bool = False, errors=None) -> Allocation:
  """--target_bpw's choice of llama.cpp types or bit widths, from the float model's sensitivities on the
  calibration windows (or from `errors`, a previous allocation's on the same windows)."""
  if p.target.quantizes:
    allocation = allocate_gguf(checkpoint.config, checkpoint.params(), windows, base=p.target.gguf_type,
                               target_bpw=p.target_bpw, imatrix=s.imatrix or p.ggml_sweep, types=allocation_types(s),
                               batch_size=s.batch_size, show_progress=show_progress, errors=errors)  # fmt: skip
  else:
    allocation = allocate_affine(checkpoint.config, checkpoint.params(), windows, spec=p.spec, target_bpw=p.target_bpw,
                                 bits=allocation_bits(s), group_sizes=allocation_group_sizes(s),
                                 gptq_config=p.gptq_config, model=LlamaBlocks(checkpoint), batch_size=s.batch_size,
                                 show_progress=show_progress, errors=errors)  # fmt: skip
  if show_progress:
    name = lambda t: t if p.target.quantizes else "{}-bit g{}".format(*t.partition("g")[::2]).removesuffix(" g")
    mix = ", ".join(f"{n} {name(t)}" for t, n in collections.Counter(allocation.types.values()).most_common())
    print(f"allocated {allocation.bits_per_weight:.3f} bits/weight (target {p.target_bpw:.3f}): {mix}; predicted KL "
          f"{allocation.predicted_kl:.4f}", flush=True)  # fmt: skip
  return allocation


def write_allocation(directory: str, s: Settings, p: Plan, allocation: Allocation) -> str:
  """Writes the allocation as a rules file (``rules.json``) that --rules reads back; returns its path."""
  choices = (
    {"imatrix": s.imatrix, "types": list(allocation_types(s))}
    if p.target.quantizes
    else {
      "widths": list(allocation_bits(s)),
      "group_sizes": [s.group_size, *allocation_group_sizes(s)],
      "method": s.method,
    }
  )
  record = {"model": s.model, "target_bpw": p.target_bpw, "bits_per_weight": allocation.bits_per_weight,
            "predicted_kl": allocation.predicted_kl, **choices,
            "proxy": "Fisher-weighted rounding error, 1/2 sum F (w_hat - w)^2, F the Fisher diagonal (tokens drawn "
                     f"from the model) on {s.nsamples} windows of {s.seqlen} tokens of --calib={s.calib}",
            "predicted_kl_by_tensor": allocation.errors}  # fmt: skip
  rules = rules_from_types(allocation.types)
  if p.target.quantizes:
    tensor_rules = TensorRules(p.target.gguf_type, rules, record)
  else:
    tensor_rules = TensorRules(None, rules, record, "affine", s.group_size, s.sym)
  path = os.path.join(directory, "rules.json")
  with atomic_file(path) as tmp:
    write_rules(tmp, tensor_rules)
  return path


def _estimated_bytes(s: Settings, p: Plan, config: LlamaConfig, calibrate: bool) -> tuple[int, int]:
  """Generous upper bounds of the output's and the checkpoints' sizes, in bytes."""
  est = estimate_sizes(config)
  if p.target.is_gguf:  # the largest llama.cpp type of a recipe is 8.5 bits per weight (Q8_0)
    bits = 8.5 if p.target.quantizes else 32.0
    dense_bits = 32 if p.target.gguf_type == "F32" else 16
  else:  # an allocation's linears take at most its budget
    bits, dense_bits = max(p.spec.bits_per_weight(config.hidden_size), p.target_bpw or 0.0), 16
  output = int(est.linear_params * bits / 8 + est.other_params * dense_bits / 8) + (64 << 20)
  activations = 2 * s.nsamples * s.seqlen * config.hidden_size * 4
  return output, (output + activations if calibrate else 0)


def preflight(s: Settings, p: Plan, config: LlamaConfig, *, calibrate: bool) -> None:
  """Checks every output path and the free disk before any work (inputs were read by then).

  Raises:
    InputError: naming the path: an output that may not be written, a checkpoint directory that is not qjax's or
      overlaps the model or the output, or too little free disk for the estimated output and checkpoints.
  """
  inputs = [s.model] if s.model not in BUILTIN_MODELS else []
  inputs += [t for t in (s.calib, s.eval_text) if t != "default"]
  check_output(p.out, p.target.kind, overwrite=s.overwrite, inputs=inputs)
  if calibrate:
    ckpt, out = os.path.realpath(p.checkpoint_dir), os.path.realpath(p.out)
    for other, what in ((out, "--out"), *((os.path.realpath(i), i) for i in inputs)):
      if ckpt == other or ckpt.startswith(other + os.sep) or other.startswith(ckpt + os.sep):
        raise InputError(f"--checkpoint_dir={p.checkpoint_dir}: overlaps {what}; choose a directory beside them.")
    check_checkpoint_dir(p.checkpoint_dir, run_id(s, p))
  output, checkpoints = _estimated_bytes(s, p, config, calibrate)
  # Twice the output: its tensors are spilled as they come, then copied behind the header (`qjax.formats.shards`).
  check_free_space(p.out, 2 * output + checkpoints, "the output and checkpoints",
                   "free some space or choose another --out / --checkpoint_dir")  # fmt: skip


def run(s: Settings, *, method_given: bool = False, show_progress: bool = True) -> tuple[RunReport, str, Plan]:
  """Quantizes, evaluates before and after on the same windows, and writes the output with its report.

  Every input is read and every output checked before the first block is calibrated; the output directory
  appears complete (model, ``report.json``, ``errors.png``) or not at all. Under ``jax.distributed`` every process
  calls this alike: all quantize and evaluate, process 0 writes the output and removes the checkpoints, and all
  return once it has.

  Returns:
    (the report, the path of the written model, the plan).
  """
  checkpoint = open_checkpoint(s.model)
  config = checkpoint.config
  p = plan(s, config, method_given=method_given)
  calibrate = needs_calibration(p.recipe)
  tokenizer = checkpoint.tokenizer()
  windows_needed = calibrate or p.target_bpw
  windows = calibration_windows(s, tokenizer) if windows_needed else None
  eval_windows = None
  if s.eval_windows:
    tokens = texts.tokenize(tokenizer, texts.load_text(s.eval_text, "evaluation"))
    eval_windows = texts.eval_windows(tokens, s.seqlen, max_windows=s.eval_windows)
  preflight(s, p, config, calibrate=calibrate)
  if show_progress:
    tokens = s.nsamples * s.seqlen if windows_needed else 0
    cost = estimate(config, p.recipe, calibration_tokens=tokens, seqlen=s.seqlen, batch_size=s.batch_size,
                    eval_windows=s.eval_windows, ggml_sweep=p.ggml_sweep, allocation=bool(p.target_bpw),
                    allocation_sweeps=allocation_sweeps(s, p),
                    gguf_type=p.target.gguf_type if p.target.quantizes else None)  # fmt: skip
    print(cost, flush=True)
  log = TensorLog()
  writes = jax.process_index() == 0
  with atomic_directory(p.out, p.target.kind, overwrite=s.overwrite) if writes else contextlib.nullcontext() as tmp:
    tick = time.perf_counter()
    allocation = allocate(s, p, checkpoint, windows, show_progress=show_progress) if p.target_bpw else None
    # Evaluation needs the whole quantized model; without it, each part is written as it is finished.
    stream = eval_windows is None
    p, out_config, qparams = quantize_with(
      s, checkpoint=checkpoint, windows=windows, log=log, show_progress=show_progress,
      checkpoint_dir=p.checkpoint_dir if calibrate else None, allocation=allocation, stream=stream,
    )  # fmt: skip
    if stream:
      qparams = _recorded(qparams, written := {})
    if allocation is not None and writes:
      write_allocation(tmp, s, p, allocation)
    metadata = {"source_model": s.model, "recipe": p.recipe_id, "settings": dataclasses.asdict(s)}
    if writes:
      export(p.target, tmp, out_config, qparams, tokenizer, name=s.model, metadata=metadata, description=p.label,
             atomic=False, actorder=p.actorder)  # fmt: skip
    elif stream:
      collections.deque(qparams, maxlen=0)  # every process computes every part; process 0 writes them
    quantize_seconds = time.perf_counter() - tick  # quantized and written
    evaluation = None
    tick = time.perf_counter()
    if eval_windows is not None:
      reference = logits_fn(config, checkpoint.params())
      evaluation = evaluate(logits_fn(out_config, qparams), eval_windows, reference_fn=reference, label="evaluate",
                            show_progress=show_progress)  # fmt: skip
    report = RunReport(p.label, evaluation, sizes(written if stream else qparams), quantize_seconds,
                       time.perf_counter() - tick, log.rows, log.expert_tokens)  # fmt: skip
    if writes:
      write_report(tmp, {"job": dataclasses.asdict(s), **report.as_dict()})
  if calibrate and writes:
    remove_checkpoints(p.checkpoint_dir)
  sync_processes(f"qjax quantize wrote {p.out}")
  return report, output_path(p.target, p.out), p


def _recorded(parts: Iterator[dict], into: dict) -> Iterator[dict]:
  """Each part as it comes, its shapes and specs (`skeleton`) merged `into` a tree (for the report's sizes)."""
  for part in parts:
    merge(into, skeleton(part))
    yield part
    del part  # not held while the next part is made


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  start = time.perf_counter()
  s = Settings.from_flags()
  launch = ("coordinator_address", "num_processes", "process_id")
  if not flags.FLAGS.distributed and any(flags.FLAGS[name].present for name in launch):
    raise ValueError("--coordinator_address, --num_processes and --process_id describe a --distributed run; add it.")
  if flags.FLAGS.distributed:
    jax.distributed.initialize(*(flags.FLAGS[name].value for name in launch))
  first = jax.process_index() == 0  # the others print nothing: they write nothing either
  try:
    report, written, p = run(s, method_given=flags.FLAGS["method"].present, show_progress=first)
  except (KeyboardInterrupt, Exception) as e:
    if interrupted(e):
      raise Interrupted(_interrupted_message(s)) from None
    raise
  if not first:
    return
  print(report.table())
  print(f"\nwrote {written}  (evaluate: qjax eval --model={written})")
  if note := loader_note(p.target, written):
    print(note)
  print(f"report: {os.path.join(p.out, 'report.json')}  total {time.perf_counter() - start:.0f}s")


def _interrupted_message(s: Settings) -> str:
  out = s.out or "the output"
  ckpt = s.checkpoint_dir or f"{out.rstrip('/')}.checkpoint"
  if os.path.isdir(ckpt):
    return f"interrupted; finished blocks are checkpointed in {ckpt}; rerun the same command to resume."
  return f"interrupted; nothing was written to {out}."
