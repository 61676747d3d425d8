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

from qjax.calib import text as texts
from qjax.calib.runner import RunnerOptions, quantize_blocks
from qjax.core import QSpec, is_qarray
from qjax.eval.metrics import EvalResult, evaluate
from qjax.formats import native
from qjax.formats.loading import open_checkpoint
from qjax.models.blocks import LlamaBlocks
from qjax.models.llama import LlamaForCausalLM
from qjax.transforms import Rule, gptq, quantize_params, rtn
from qjax.transforms.base import leaves_with_paths
from qjax.transforms.rules import rules_transform

METHODS = ("gptq", "rtn")
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
  static_groups: bool = False
  damp_percent: float = 0.01
  mse: bool = False
  true_sequential: bool = True
  nsamples: int = 32
  seqlen: int = 512
  calib: str = "default"
  seed: int = 0
  eval_text: str = "default"
  eval_windows: int = 16
  batch_size: int = 8
  out: str = "runs/gptq-w4g128"
  checkpoint_dir: str | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}.")
    if self.group_size not in ALLOWED_GROUP_SIZES:
      raise ValueError(f"--group_size must be one of {ALLOWED_GROUP_SIZES}, got {self.group_size}.")
    if self.nsamples < 1 or self.seqlen < 2:
      raise ValueError(f"--nsamples must be >= 1 and --seqlen >= 2, got {self.nsamples} and {self.seqlen}.")
    if not 0.0 <= self.damp_percent < 1.0:
      raise ValueError(f"--damp_percent must be in [0, 1), got {self.damp_percent}.")

  @property
  def spec(self) -> QSpec:
    return QSpec(bits=self.bits, group_size=self.group_size, symmetric=self.sym, partial_groups=True)

  def rules(self) -> list[Rule]:
    from qjax.core import ClipSearch

    clip = ClipSearch() if self.mse else None
    if self.method == "rtn":
      transform = rtn(self.spec, clip=clip)
    else:
      transform = gptq(
        self.spec, damp=self.damp_percent, act_order=self.desc_act, static_groups=self.static_groups, clip=clip
      )
    return [Rule(LINEAR_KERNELS, transform, name=f"{self.method} w{self.bits}g{self.group_size}")]


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

  @property
  def bits_per_weight(self) -> float:
    """Of the quantized tensors (codes, scales, zeros, permutations)."""
    return 16.0 * self.quantized_bytes / max(self.quantized_float16_bytes, 1)

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["evaluation"] = None if self.evaluation is None else self.evaluation._asdict()
    d["bits_per_weight"] = self.bits_per_weight
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


def quantize_model(job: QuantizeJob, checkpoint, *, show_progress: bool = True):
  """The quantized parameter tree of `checkpoint` under `job`."""
  if job.method == "rtn":
    return quantize_params(checkpoint.params(), job.rules())
  tokens = texts.tokenize(checkpoint.tokenizer(), texts.load_text(job.calib, "calibration"))
  windows = texts.calibration_windows(tokens, job.nsamples, job.seqlen, seed=job.seed)
  blocks = LlamaBlocks(checkpoint)
  options = RunnerOptions(
    batch_size=job.batch_size,
    true_sequential=job.true_sequential,
    checkpoint_dir=job.checkpoint_dir,
    show_progress=show_progress,
  )
  run_id = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("out", "checkpoint_dir", "eval_windows")}
  stage = rules_transform(job.rules())
  qblocks, _ = quantize_blocks(blocks, [stage], windows, options=options, run_id=run_id)
  return blocks.assemble(qblocks)


def logits_fn(config, params):
  """A jitted ``ids -> logits`` with `params` passed as an argument (not folded into the program)."""
  import jax

  net = LlamaForCausalLM(config)
  apply = jax.jit(lambda p, ids: net.apply({"params": p}, ids))
  return lambda ids: apply(params, ids)


def run_job(job: QuantizeJob, *, show_progress: bool = True) -> JobReport:
  """Quantizes, evaluates before/after on the same windows, and writes `job.out`."""
  checkpoint = open_checkpoint(job.model)
  tokenizer = checkpoint.tokenizer()
  start = time.perf_counter()
  qparams = quantize_model(job, checkpoint, show_progress=show_progress)
  quantize_seconds = time.perf_counter() - start
  metadata = {"source_model": job.model, "method": job.method, "job": dataclasses.asdict(job)}
  native.save_quantized(job.out, checkpoint.config, qparams, tokenizer, metadata=metadata)
  if job.checkpoint_dir and os.path.isdir(job.checkpoint_dir):
    shutil.rmtree(job.checkpoint_dir)

  quant_eval = None
  start = time.perf_counter()
  if job.eval_windows:
    tokens = texts.tokenize(tokenizer, texts.load_text(job.eval_text, "evaluation"))
    windows = texts.eval_windows(tokens, job.seqlen, max_windows=job.eval_windows)
    float_fn = logits_fn(checkpoint.config, checkpoint.params())
    quant_eval = evaluate(
        logits_fn(checkpoint.config, qparams), windows, reference_fn=float_fn, label="evaluate",
        show_progress=show_progress,
    )  # fmt: skip
  eval_seconds = time.perf_counter() - start
  return JobReport(job.method, quant_eval, *_sizes(qparams), quantize_seconds, eval_seconds)
