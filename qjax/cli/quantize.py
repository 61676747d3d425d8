"""Quantize a model, measure what it cost, and write it out.

Runs the chosen method block by block on calibration text (GPTQ) or directly (RTN),
then prints perplexity and KL divergence before and after, size, bits per weight and
time, and writes the quantized model to --out (readable by `qjax eval --model=DIR`).

Example:
  qjax quantize                                        # GPTQ 4-bit g128 on the built-in default model
  qjax quantize --method=gptq --bits=3 --group_size=64 --desc_act --out=runs/gptq3
  qjax quantize --model=path/to/hf_model --method=rtn --bits=4 --group_size=128
  qjax quantize --method=none --export=gguf:Q4_K_M --imatrix --out=runs/q4km   # llama.cpp's encoders, in JAX
  qjax quantize --bits=4 --group_size=64 --export=gptq --out=runs/gptq4-hf       # for vLLM, TGI, transformers
  qjax quantize --method=rtn --nosym --group_size=64 --export=awq --out=runs/awq4
"""

import dataclasses
import os
import time

from absl import flags

from qjax.eval.report import write_report
from qjax.formats import open_checkpoint
from qjax.pipeline import ALLOWED_GROUP_SIZES, METHOD_EXAMPLES, QuantizeJob, estimate, gguf_path, run_job

_MODEL = flags.DEFINE_string(
    "model", "default", "Float model to quantize: 'default' (built-in SmolLM2-135M-Instruct), a Hugging Face "
    "directory, or a .gguf file. Example: --model=~/models/Llama-3.2-1B."
)  # fmt: skip
_METHOD = flags.DEFINE_string(
  "method", "gptq", "Quantization scheme: a rounding (rtn, gptq) after optional preparations (rotate, awq, lwc), "
  f"joined by '+'; 'none' with --export=gguf:TYPE encodes the float weights as llama.cpp would. Examples: "
  f"{', '.join(METHOD_EXAMPLES)}."
)  # fmt: skip
_BITS = flags.DEFINE_enum("bits", "4", ["2", "3", "4", "5", "6", "8"], "Bits per weight code. Example: --bits=3.")
_GROUP = flags.DEFINE_integer(
    "group_size", 128, f"Input channels sharing a scale, one of {ALLOWED_GROUP_SIZES} (-1: per output channel). "
    "Where it does not divide a layer's input width the last group is shorter, as in GPTQ checkpoints. "
    "Example: --group_size=64."
)  # fmt: skip
_SYM = flags.DEFINE_bool("sym", True, "Symmetric grid (fixed zero point); --nosym stores a zero point per group.")
_DESC_ACT = flags.DEFINE_bool(
  "desc_act", False, "GPTQ act-order: quantize input channels by decreasing Hessian diagonal."
)
_GAR = flags.DEFINE_bool(
  "act_group_aware", True, "GPTQ group-aware reordering (GPTQModel's default): quantize whole groups by decreasing "
  "Hessian diagonal, needing no g_idx. Ignored with --desc_act; --noact_group_aware for plain GPTQ order."
)  # fmt: skip
_STATIC_GROUPS = flags.DEFINE_bool(
  "static_groups", False, "With --desc_act, keep groups in the original channel order."
)
_DAMP = flags.DEFINE_float(
  "damp_percent", 0.01, "GPTQ dampening, a fraction of mean(diag(H)). Example: --damp_percent=0.05."
)
_MSE = flags.DEFINE_bool(
  "mse", False, "Search a clipping range per group that minimises the rounding error (RTN and GPTQ)."
)
_TRUE_SEQ = flags.DEFINE_bool(
  "true_sequential", True, "Quantize q/k/v, then o, then gate/up, then down, each from inputs after the previous."
)
_NSAMPLES = flags.DEFINE_integer("nsamples", 32, "Calibration windows. Example: --nsamples=128.")
_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Tokens per calibration and evaluation window. Example: --seqlen=2048.")
_CALIB = flags.DEFINE_string(
    "calib", "default", "Calibration text: 'default' (the calibration part of Python's documentation topics) or a "
    "UTF-8 file. Example: --calib=c4_sample.txt."
)  # fmt: skip
_SEED = flags.DEFINE_integer("seed", 0, "Seed for choosing calibration windows.")
_EVAL_TEXT = flags.DEFINE_string("eval_text", "default", "Evaluation text ('default' or a UTF-8 file).")
_EVAL_WINDOWS = flags.DEFINE_integer(
  "eval_windows", 16, "Evaluation windows before and after (0 skips evaluation). Example: --eval_windows=64."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Calibration windows per step (bounds activation memory).")
_OUT = flags.DEFINE_string("out", None, "Directory for the quantized model (default: runs/<method>-w<bits>g<group>).")
_EXPORT = flags.DEFINE_string(
  "export", None, "Write the model in another format instead of a qjax directory: gguf:<TYPE>, TYPE a llama.cpp "
  "recipe (Q4_K_M, Q5_K_M, Q8_0, Q4_0, Q2_K, Q3_K_M, …) or F32/F16/BF16 (with --method=none); or a Hugging Face "
  "directory for vLLM, TGI and transformers (with --method=gptq or rtn): gptq (GPTQ v1 zero points, read by "
  "every loader), gptq_v2 (v2 zero points, for GPTQModel and vLLM; stores a zero point of 0, which v1 cannot), "
  "awq (AutoAWQ gemm layout: --bits=4, no --desc_act, a group size dividing every input width). A GPTQ group size "
  "that does not divide a width (g128 on a 576-wide model) loads in transformers and GPTQModel with their torch "
  "kernel (backend='torch'), not in vLLM. "
  "Example: --export=gguf:Q4_K_M, --export=gptq."
)  # fmt: skip
_IMATRIX = flags.DEFINE_bool(
  "imatrix", False, "With a GGUF recipe: weight the block searches by an importance matrix (mean x² of each "
  "linear's inputs) measured on the calibration text, as llama.cpp's imatrix tool does."
)  # fmt: skip
_CKPT = flags.DEFINE_string(
    "checkpoint_dir", None, "Where finished blocks are checkpointed; a rerun with the same flags resumes there. "
    "Default: <out>.checkpoint, removed after success."
)  # fmt: skip


def job_from_flags() -> QuantizeJob:
  bits, group = int(_BITS.value), _GROUP.value
  default_name = f"{_METHOD.value}-w{bits}g{group}"
  if _EXPORT.value:
    kind, _, type_name = _EXPORT.value.partition(":")
    default_name = f"gguf-{type_name}" if kind == "gguf" else f"{default_name}-{kind}"
  out = _OUT.value or os.path.join("runs", default_name)
  return QuantizeJob(
    model=_MODEL.value,
    method=_METHOD.value,
    bits=bits,
    group_size=group,
    sym=_SYM.value,
    desc_act=_DESC_ACT.value,
    act_group_aware=_GAR.value,
    static_groups=_STATIC_GROUPS.value,
    damp_percent=_DAMP.value,
    mse=_MSE.value,
    true_sequential=_TRUE_SEQ.value,
    nsamples=_NSAMPLES.value,
    seqlen=_SEQLEN.value,
    calib=_CALIB.value,
    seed=_SEED.value,
    eval_text=_EVAL_TEXT.value,
    eval_windows=_EVAL_WINDOWS.value,
    batch_size=_BATCH.value,
    out=out,
    checkpoint_dir=_CKPT.value or out.rstrip("/") + ".checkpoint",
    export=_EXPORT.value,
    imatrix=_IMATRIX.value,
  )


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  job = job_from_flags()
  start = time.perf_counter()
  print(estimate(job, open_checkpoint(job.model).config), flush=True)
  report = run_job(job)
  print(report.table())
  written = gguf_path(job) if job.gguf_type else job.out
  files = write_report(job.out, {"job": dataclasses.asdict(job), **report.as_dict()})
  print(f"\nwrote {written}  (evaluate: qjax eval --model={written})")
  print(f"report: {', '.join(files)}  total {time.perf_counter() - start:.0f}s")
