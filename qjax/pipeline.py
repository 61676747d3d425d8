"""The quantize-and-measure pipeline behind `qjax quantize`, callable from scripts and notebooks.

`run_job(QuantizeJob(...))` opens a float model, quantizes it (GPTQ block by block on
calibration windows, or RTN directly), evaluates perplexity and KL divergence before and
after on the same windows, and writes the quantized model directory.
"""

import dataclasses
import os
import shutil
import time
from typing import Any

import numpy as np

from qjax import schemes
from qjax.calib import text as texts
from qjax.calib.awq import awq
from qjax.calib.lwc import learned_clipping
from qjax.calib.runner import RunnerOptions, quantize_blocks
from qjax.core import QSpec, dequantize, ggml, is_qarray
from qjax.eval.metrics import EvalResult, evaluate
from qjax.formats import convert, gguf, gguf_recipes, native
from qjax.formats.loading import open_checkpoint
from qjax.models.blocks import LlamaBlocks
from qjax.models.llama import LlamaForCausalLM
from qjax.models.rotate import RotatedCheckpoint
from qjax.quantizers.rotation import random_rotation
from qjax.transforms import Rule, Transform, gptq, quantize_params, rtn
from qjax.transforms.base import leaves_with_paths, observe
from qjax.transforms.rules import rules_transform

METHOD_EXAMPLES = ("gptq", "rtn", "awq", "awq+gptq", "rotate+gptq", "rotate+rtn", "lwc", "none")
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")
ALLOWED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's list
LINEAR_KERNELS = r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeJob:
  """Everything `qjax quantize` was asked to do (its flags); see `qjax quantize --help`."""

  model: str = "default"
  method: str = "gptq"
  bits: int = 4
  group_size: int = 128
  sym: bool = True
  desc_act: bool = False
  act_group_aware: bool = True  # GPTQModel's default when desc_act is off
  static_groups: bool = False
  damp_percent: float = 0.01
  mse: bool = False
  true_sequential: bool = True
  nsamples: int = 32
  seqlen: int = 512
  calib: str = "default"
  seed: int = 0  # calibration windows and the rotation
  eval_text: str = "default"
  eval_windows: int = 16
  batch_size: int = 8
  out: str = "runs/gptq-w4g128"
  checkpoint_dir: str | None = None
  export: str | None = None  # "gguf:<recipe or F32/F16/BF16>", or a Hugging Face format: "gptq", "gptq_v2", "awq"
  imatrix: bool = False

  def __post_init__(self):
    self.scheme  # noqa: B018 (parses --method, raising on a bad one)
    if self.group_size not in ALLOWED_GROUP_SIZES:
      raise ValueError(f"--group_size must be one of {ALLOWED_GROUP_SIZES}, got {self.group_size}.")
    if self.nsamples < 1 or self.seqlen < 2:
      raise ValueError(f"--nsamples must be >= 1 and --seqlen >= 2, got {self.nsamples} and {self.seqlen}.")
    if not 0.0 <= self.damp_percent < 1.0:
      raise ValueError(f"--damp_percent must be in [0, 1), got {self.damp_percent}.")
    if self.export in convert.HF_FORMATS:
      self._check_hf_export()
    elif self.export is not None:
      kind, _, name = self.export.partition(":")
      if kind != "gguf" or not name:
        raise ValueError(f"--export must be gguf:<TYPE> or one of {convert.HF_FORMATS}, got {self.export!r}.")
      if name not in GGUF_FLOAT_TYPES:
        gguf_recipes.check_recipe(name)
      if self.imatrix and name in GGUF_FLOAT_TYPES:
        raise ValueError(f"--imatrix needs a quantized GGUF type, got --export={self.export}.")
    elif self.method == "none":
      raise ValueError("--method=none quantizes nothing by itself; give --export=gguf:<TYPE> (e.g. gguf:Q4_K_M).")
    elif self.imatrix:
      raise ValueError("--imatrix applies to GGUF exports (--method=none --export=gguf:<TYPE>).")

  def _check_hf_export(self) -> None:
    if self.scheme.rounding is None or self.imatrix:
      raise ValueError(
        f"--export={self.export} writes linears rounded by RTN or GPTQ; use a --method that ends in one, e.g. "
        "gptq, rtn, awq+gptq (without --imatrix, which is for GGUF recipes)."
      )
    act_order = self.scheme.rounding == "gptq" and self.desc_act and not self.static_groups and self.group_size != -1
    convert.check_export_spec(self.export, self.spec, act_order=act_order)

  @property
  def gguf_type(self) -> str | None:
    return None if self.export is None else self.export.partition(":")[2]

  @property
  def label(self) -> str:
    if self.gguf_type:
      return f"gguf {self.gguf_type}" + (" imatrix" if self.imatrix else "")
    return f"{self.method} w{self.bits}g{self.group_size}"

  @property
  def scheme(self) -> schemes.Scheme:
    return schemes.parse_method(self.method, gguf_export=self.gguf_type is not None and self.gguf_type != "")

  @property
  def needs_calibration(self) -> bool:
    return self.scheme.needs_calibration or self.imatrix

  @property
  def search_spec(self) -> QSpec:
    """The grid AWQ and learned clipping aim at: the job's, or for a GGUF recipe its main type's sub-blocks."""
    if not self.gguf_type or self.gguf_type in GGUF_FLOAT_TYPES:
      return self.spec
    info = ggml.BLOCK_TYPES[gguf_recipes.RECIPES[self.gguf_type]]
    return QSpec(bits=info.bits, group_size=32, symmetric=info.symmetric)

  def preparations(self) -> list[Transform]:
    """The calibration stages before rounding (AWQ, learned clipping); rotation wraps the checkpoint instead."""
    # Before GPTQ, AWQ only scales: its clipping clamps outliers for round-to-nearest, but GPTQ
    # would then reconstruct the clamped weights, and its error feedback already handles them
    # (3-bit g128 on the default model: perplexity 27.3 with clipping, 25.5 without, GPTQ alone 26.5).
    awq_clip = self.scheme.rounding != "gptq"
    stages = {
      "awq": lambda: awq(self.search_spec, clip=awq_clip),
      "lwc": lambda: learned_clipping(self.search_spec),
    }
    return [stages[p]() for p in self.scheme.preparations if p in stages]

  def output_config(self, config):
    """The config of the quantized model (a rotation unties the output embedding)."""
    return dataclasses.replace(config, tie_word_embeddings=False) if "rotate" in self.scheme.preparations else config

  def prepare(self, checkpoint):
    """The checkpoint the rounding sees: rotated when the scheme says so."""
    if "rotate" in self.scheme.preparations:
      return RotatedCheckpoint(checkpoint, random_rotation(checkpoint.config.hidden_size, seed=self.seed))
    return checkpoint

  @property
  def spec(self) -> QSpec:
    return QSpec(bits=self.bits, group_size=self.group_size, symmetric=self.sym, partial_groups=True)

  def rules(self, config) -> list[Rule]:
    """The rules this job applies to a model with `config`."""
    from qjax.core import ClipSearch

    if self.gguf_type:
      return (
        []
        if self.gguf_type in GGUF_FLOAT_TYPES
        else gguf_recipes.gguf_recipe(self.gguf_type, config, imatrix=self.imatrix)
      )
    clip = ClipSearch() if self.mse else None
    if self.scheme.rounding is None:
      return []
    if self.scheme.rounding == "rtn":
      transform = rtn(self.spec, clip=clip)
    else:
      transform = gptq(
        self.spec,
        damp=self.damp_percent,
        act_order=self.desc_act,
        static_groups=self.static_groups,
        clip=clip,
        group_aware=self.act_group_aware and not self.desc_act,
      )
    return [Rule(LINEAR_KERNELS, transform, name=self.label)]


class TensorLog:
  """Per quantized tensor: its format, bits per weight, and the rounding's relative error ``‖Ŵ - W‖ / ‖W‖``.

  ``W`` is what the rounding saw (after a rotation or AWQ scaling), so the error is the rounding's own.
  """

  def __init__(self):
    self.rows: dict[str, dict[str, Any]] = {}

  def record(self, path: str, before, after) -> None:
    if not is_qarray(after):
      return
    w = np.asarray(before, np.float32)
    err = np.linalg.norm(np.asarray(dequantize(after), np.float32) - w) / max(np.linalg.norm(w), 1e-30)
    layout = after.spec.layout if after.spec.is_ggml else f"int{after.spec.bits} g{after.spec.group_size}"
    self.rows[path] = {"format": layout, "bits_per_weight": after.bits_per_weight, "relative_error": float(err)}

  def observed(self, rules: list[Rule]) -> list[Rule]:
    return [Rule(r.pattern, None if r.transform is None else observe(r.transform, self.record), r.name) for r in rules]


@dataclasses.dataclass
class JobReport:
  """Results of a job: quality before and after, size, bits per weight, time."""

  method: str
  evaluation: EvalResult | None  # of the quantized model, with the float model as reference
  quantized_bytes: int
  quantized_float16_bytes: int
  dense_float16_bytes: int
  quantize_seconds: float
  eval_seconds: float
  tensors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def bits_per_weight(self) -> float:
    """Of the quantized tensors (codes, scales, zeros, permutations)."""
    return 16.0 * self.quantized_bytes / max(self.quantized_float16_bytes, 1)

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["evaluation"] = None if self.evaluation is None else self.evaluation._asdict()
    d["bits_per_weight"] = self.bits_per_weight
    d["versions"] = versions()
    return d

  def table(self) -> str:
    mb = 1 / 2**20
    total_f16 = (self.quantized_float16_bytes + self.dense_float16_bytes) * mb
    total_q = (self.quantized_bytes + self.dense_float16_bytes) * mb
    lines = [f"{'':14s} {'perplexity':>11s} {'KL vs float':>12s} {'top-1':>7s} {'size MB':>9s} {'bits/w':>7s}"]
    qe = self.evaluation
    float_ppl = qe and qe.reference_perplexity
    lines.append(f"{'float (fp16)':14s} {_fmt(float_ppl, 11, 3)} {'-':>12s} {'-':>7s} {total_f16:9.1f} {16:7.2f}")
    kl = qe and qe.kl_divergence
    top1 = None if qe is None else 100 * qe.top1_agreement
    lines.append(
      f"{self.method:14s} {_fmt(qe and qe.perplexity, 11, 3)} {_fmt(kl, 12, 5)} {_fmt(top1, 7, 2)} "
      f"{total_q:9.1f} {self.bits_per_weight:7.2f}"
    )
    lines.append(
      f"(quantized linears: {self.quantized_float16_bytes * mb:.1f} MB fp16 -> {self.quantized_bytes * mb:.1f} MB; "
      f"quantize {self.quantize_seconds:.0f}s, evaluate {self.eval_seconds:.0f}s)"
    )
    return "\n".join(lines)


def _fmt(value, width, digits):
  return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def _sizes(params) -> tuple[int, int, int]:
  quantized = quantized_f16 = dense_f16 = 0
  for _, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      quantized += leaf.nbytes
      quantized_f16 += 2 * int(np.prod(leaf.shape))
    else:
      dense_f16 += 2 * int(np.size(leaf))
  return quantized, quantized_f16, dense_f16


def calibration_windows(job: QuantizeJob, tokenizer) -> np.ndarray:
  """The (nsamples, seqlen) calibration token windows of `job`."""
  tokens = texts.tokenize(tokenizer, texts.load_text(job.calib, "calibration"))
  return texts.calibration_windows(tokens, job.nsamples, job.seqlen, seed=job.seed)


def quantize_model(
  job: QuantizeJob,
  checkpoint,
  *,
  windows: np.ndarray | None = None,
  show_progress: bool = True,
  log: TensorLog | None = None,
):
  """The quantized parameter tree of `checkpoint` under `job` (calibrating on `windows`, default: the job's)."""
  checkpoint = job.prepare(checkpoint)
  rules = job.rules(checkpoint.config)
  if log is not None:
    rules = log.observed(rules)
  if not job.needs_calibration:
    return quantize_params(checkpoint.params(), rules) if rules else checkpoint.params()
  if windows is None:
    windows = calibration_windows(job, checkpoint.tokenizer())
  blocks = LlamaBlocks(checkpoint)
  options = RunnerOptions(
    batch_size=job.batch_size,
    true_sequential=job.true_sequential,
    checkpoint_dir=job.checkpoint_dir,
    show_progress=show_progress,
    float_inputs=job.imatrix and not job.scheme.preparations,  # llama.cpp measures its imatrix on the float model
  )
  keep = ("out", "checkpoint_dir", "eval_windows", "eval_text")
  run_id = {k: v for k, v in dataclasses.asdict(job).items() if k not in keep}
  block_rules = [r for r in rules if r.pattern.startswith("model/layers_")]
  other_rules = [r for r in rules if not r.pattern.startswith("model/layers_")]
  stages = [*job.preparations(), rules_transform(block_rules)]
  qblocks, _ = quantize_blocks(blocks, stages, windows, options=options, run_id=run_id)
  params = blocks.assemble(qblocks)
  return quantize_params(params, other_rules) if other_rules else params


def logits_fn(config, params):
  """A jitted ``ids -> logits`` with `params` passed as an argument (not folded into the program)."""
  import jax

  net = LlamaForCausalLM(config)
  apply = jax.jit(lambda p, ids: net.apply({"params": p}, ids))
  return lambda ids: apply(params, ids)


def gguf_path(job: QuantizeJob) -> str:
  """Where a GGUF export of `job` is written: ``<out>/model-<TYPE>.gguf``."""
  return os.path.join(job.out, f"model-{job.gguf_type}.gguf")


def write_gguf_export(job: QuantizeJob, config, params, tokenizer) -> str:
  os.makedirs(job.out, exist_ok=True)
  path = gguf_path(job)
  float_type = job.gguf_type if job.gguf_type in GGUF_FLOAT_TYPES else "F32"
  entries = gguf.tokenizer_metadata(tokenizer, config.vocab_size)
  gguf.write_gguf(path, config, params, entries, float_type=float_type, file_type=job.gguf_type, name=job.model)
  return path


def run_job(job: QuantizeJob, *, show_progress: bool = True) -> JobReport:
  """Quantizes, evaluates before/after on the same windows, and writes `job.out`."""
  checkpoint = open_checkpoint(job.model)
  if job.export in convert.HF_FORMATS:
    convert.check_export_shapes(job.export, job.spec, checkpoint.config)
  tokenizer = checkpoint.tokenizer()
  start = time.perf_counter()
  log = TensorLog()
  qparams = quantize_model(job, checkpoint, show_progress=show_progress, log=log)
  quantize_seconds = time.perf_counter() - start
  config = job.output_config(checkpoint.config)
  if job.gguf_type:
    write_gguf_export(job, config, qparams, tokenizer)
  elif job.export in convert.HF_FORMATS:
    convert.save_hf(job.export, job.out, config, qparams, tokenizer)
  else:
    metadata = {"source_model": job.model, "method": job.method, "job": dataclasses.asdict(job)}
    native.save_quantized(job.out, config, qparams, tokenizer, metadata=metadata)
  if job.checkpoint_dir and os.path.isdir(job.checkpoint_dir):
    shutil.rmtree(job.checkpoint_dir)

  quant_eval = None
  start = time.perf_counter()
  if job.eval_windows:
    tokens = texts.tokenize(tokenizer, texts.load_text(job.eval_text, "evaluation"))
    windows = texts.eval_windows(tokens, job.seqlen, max_windows=job.eval_windows)
    float_fn = logits_fn(checkpoint.config, checkpoint.params())
    quant_eval = evaluate(
        logits_fn(config, qparams), windows, reference_fn=float_fn, label="evaluate",
        show_progress=show_progress,
    )  # fmt: skip
  eval_seconds = time.perf_counter() - start
  return JobReport(job.label, quant_eval, *_sizes(qparams), quantize_seconds, eval_seconds, log.rows)


def versions() -> dict[str, str]:
  """Versions of qjax, Python and the packages a result depends on, and the device."""
  import importlib.metadata
  import platform

  import jax

  names = ("qjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "gguf", "numpy")
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "not installed"
  return {**found, "python": platform.python_version(), "device": jax.devices()[0].device_kind}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A rough forecast of a job's cost, printed before it starts."""

  peak_bytes: float
  quantize_seconds: float
  eval_seconds: float
  gflops_per_second: float

  def __str__(self) -> str:
    return (
      f"estimate: peak memory ~{self.peak_bytes / 2**30:.1f} GiB, quantize ~{_minutes(self.quantize_seconds)}, "
      f"evaluate ~{_minutes(self.eval_seconds)} (at {self.gflops_per_second:.0f} GFLOP/s measured here)"
    )


def _minutes(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def measure_gflops() -> float:
  """Float32 matmul throughput of the default device, from a short timed run."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def estimate(job: QuantizeJob, config, *, gflops_per_second: float | None = None) -> Estimate:
  """Peak memory and time of `job` on a model with `config`, from its sizes (a forecast, not a measurement)."""
  d, f, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
  q_out = config.num_attention_heads * config.head_dim
  kv_out = config.num_key_value_heads * config.head_dim
  block = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * f
  model = n_layers * block + v * d * (1 if config.tie_word_embeddings else 2)
  tokens = job.nsamples * job.seqlen if job.needs_calibration else 0
  outputs = q_out + 2 * kv_out + d + 2 * f + d  # every linear's output, cached within a block
  calibration = 4 * (tokens * d * 2 + min(tokens * outputs, 4 << 30) + 2 * block + 3 * d * d + f * f + v * d)
  calibration += 4 * job.batch_size * job.seqlen * (4 * f + config.num_attention_heads * job.seqlen)
  windows = job.eval_windows
  evaluation = 4 * (2 * model + 3 * job.seqlen * v) if windows else 0
  gflops = gflops_per_second or measure_gflops()
  hessian_flops = 2 * tokens * (3 * d * d + f * f)
  gptq_flops = (
    2 * (d * d * (q_out + 2 * kv_out + 2 * f) + q_out * q_out * d + f * f * d) if job.scheme.rounding == "gptq" else 0
  )
  awq_flops = 20 * 2 * tokens * block if "awq" in job.scheme.preparations else 0
  quantize_flops = n_layers * (2 * tokens * block * 2.2 + hessian_flops + gptq_flops + awq_flops)
  eval_flops = 2 * windows * job.seqlen * 2 * model
  # Beyond the flops: compilation, and GPTQ's column sweep, sequential in the input channels.
  columns = n_layers * (5 * d + q_out + f) if job.scheme.rounding == "gptq" else 0
  quantize_seconds = quantize_flops / gflops / 1e9 + 25e-6 * columns + (15.0 if job.needs_calibration else 5.0)
  eval_seconds = eval_flops / gflops / 1e9 + 5.0 if windows else 0.0
  return Estimate(float(max(calibration, evaluation)), quantize_seconds, eval_seconds, gflops)
