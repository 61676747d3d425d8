"""Forecast a quantize run's cost from a model's config.json alone, before booking machines for it.

Given a Hugging Face config.json (no weights), `qjax quantize`'s flags (--method, --bits, --group_size, --nsamples,
--seqlen, --export, …) and the machines (--devices=8xH100, v5e-16, cpu), prints per device the peak memory of the
calibration (the block, its statistics, the calibration activations: the runner splits windows over devices, and
GPTQ the output channels), the FLOPs of calibrating and rounding, a time per stage from the device's roofline (the
slower of its compute at the device's matmul throughput and its bytes at the memory, disk or host-link bandwidth),
and the size of the output in each format. Refuses, naming the flag, what does not fit on a device.

The counts are `qjax.cli.estimate.work` and `memory`, the same as `qjax quantize` prints before a run. Device rates
are the vendors' datasheet peaks (`DEVICES`), so on a GPU or TPU the device stages are a floor; the host's own work
(reading the checkpoint, the error report, packing the export) runs at rates measured on this machine.

Example:
  qjax plan --config=path/to/Llama-3.1-8B/config.json --devices=1xH100 --nsamples=128 --seqlen=2048 --eval_windows=0
  qjax plan --config=tests/data/configs/qwen3-30b-a3b.json --devices=4xH200 --eval_windows=0
  qjax plan --config=tests/data/configs/llama-3.1-70b.json --method=none --export=gguf:Q4_K_M --eval_windows=0
"""

import dataclasses
import math
import os
import re
from typing import NamedTuple

import numpy as np
from absl import flags

from qjax.calib.quantize import needs_calibration
from qjax.cli import quantize as q
from qjax.cli.estimate import (
  COLUMN_SECONDS,
  FACTORIZATION_COST,
  Memory,
  Work,
  estimate_sizes,
  measure_gflops,
  measure_memory_gb_per_s,
  memory,
  minutes,
  reads_hessians,
  work,
)
from qjax.core import InputError, QSpec
from qjax.eval.sensitivity import type_bits
from qjax.models.checkpoint import param_shapes
from qjax.models.config import LlamaConfig, read_json
from qjax.transforms.gguf_recipes import row_lengths, tensor_types

SHARED_FLAGS = ("method", "recipe", "bits", "group_size", "grid", "sym", "desc_act", "nsamples", "seqlen",
                "batch_size", "eval_windows", "export", "imatrix", "target_bpw", "allocation_bits",
                "allocation_group_sizes")  # fmt: skip
"""`qjax quantize`'s flags that plan reads (its --help lists them): the run being forecast."""

_CONFIG = flags.DEFINE_string(
  "config", None, "The model's Hugging Face config.json, or a directory holding it. Example: "
  "--config=tests/data/configs/llama-3.1-8b.json."
)  # fmt: skip
_DEVICES = flags.DEFINE_string(
  "devices", "cpu", "The machines: [N x]TYPE (TYPE one of H100, H200, A100-80GB, L40S, v5e, v5p, v6e), a TPU slice "
  "(v5e-16: 16 chips; v5p-8: 8 TensorCores, 4 chips) or cpu (this machine, measured now). Example: --devices=8xH100."
)  # fmt: skip
_DISK = flags.DEFINE_float(
  "disk_gb_per_s", 2.0, "Disk read and write speed for the checkpoint and the output, GB/s (a local NVMe; network "
  "disks are often 0.2-0.5). Example: --disk_gb_per_s=0.5."
)  # fmt: skip
_GFLOPS = flags.DEFINE_float("gflops", None, "With --devices=cpu: float32 matmul GFLOP/s instead of measuring it.")
_MEMORY = flags.DEFINE_float("memory_gb_per_s", None, "With --devices=cpu: memory bandwidth instead of measuring it.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
  """One accelerator's published peaks (dense, no sparsity), or this machine's measured rates.

  Attributes:
    name: what it is called in --devices.
    memory_bytes: device memory (HBM; for ``cpu``, RAM).
    usable: the part of it a JAX program gets (on GPUs XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default; read from
      the environment).
    memory_gb_per_s: memory bandwidth.
    bf16_tflops: bfloat16 matmul throughput.
    default_f32_tflops: float32 matmuls at JAX's default precision, as the blocks run (TF32 tensor cores on A100,
      H100, H200, L40S; one bfloat16 pass on TPUs).
    f32_tflops: float32 at full precision (``Precision.HIGHEST``), as Hessians and GPTQ's updates run, and vector
      work: CUDA cores on GPUs; six bfloat16 passes on TPUs.
    host_gb_per_s: host-to-device link, one direction (PCIe), that the checkpoint's blocks cross.
    host_memory_gb_per_s: the host's memory read bandwidth on one core, at which the host's work runs: reading the
      checkpoint into float32 kernels, the error report, packing the export (`qjax.cli.estimate.Work.host_bytes`).
    column_seconds: one of GPTQ's sequential column steps (a few small kernels).
    source: where the numbers come from.
  """

  name: str
  memory_bytes: float
  usable: float
  memory_gb_per_s: float
  bf16_tflops: float
  default_f32_tflops: float
  f32_tflops: float
  host_gb_per_s: float
  column_seconds: float
  host_memory_gb_per_s: float = 13.0  # assumed for a GPU or TPU host: one core as this machine's (measured 13 GB/s)
  source: str


_GPU_COLUMN = 20e-6  # assumed, not measured: a while-loop step of ~4 small kernels at ~5 us each
_TPU_COLUMN = 10e-6  # assumed, not measured
_TPU_HOST = 16.0  # assumed, not published: a TPU host's PCIe link per chip
DEVICES = {
  d.name: d
  for d in (
    Device(name="H100", memory_bytes=80e9, usable=0.75, memory_gb_per_s=3350, bf16_tflops=989, default_f32_tflops=494,
           f32_tflops=67, host_gb_per_s=64, column_seconds=_GPU_COLUMN,
           source="NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): 3.35 TB/s HBM3, BF16 1979 and "
                  "TF32 989 TFLOPS with sparsity (half dense), FP32 67 TFLOPS, PCIe Gen5 128 GB/s both ways"),
    Device(name="H200", memory_bytes=141e9, usable=0.75, memory_gb_per_s=4800, bf16_tflops=989,
           default_f32_tflops=494, f32_tflops=67, host_gb_per_s=64, column_seconds=_GPU_COLUMN,
           source="NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 141 GB HBM3e at 4.8 TB/s, H100's "
                  "compute (BF16 989, TF32 494 dense, FP32 67 TFLOPS), PCIe Gen5"),
    Device(name="A100-80GB", memory_bytes=80e9, usable=0.75, memory_gb_per_s=2039, bf16_tflops=312,
           default_f32_tflops=156, f32_tflops=19.5, host_gb_per_s=32, column_seconds=_GPU_COLUMN,
           source="NVIDIA A100 80GB SXM datasheet (nvidia.com/en-us/data-center/a100): 2039 GB/s HBM2e, BF16 312, "
                  "TF32 156, FP32 19.5 TFLOPS dense, PCIe Gen4 64 GB/s both ways"),
    Device(name="L40S", memory_bytes=48e9, usable=0.75, memory_gb_per_s=864, bf16_tflops=362, default_f32_tflops=183,
           f32_tflops=91.6, host_gb_per_s=32, column_seconds=_GPU_COLUMN,
           source="NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): 48 GB GDDR6 at 864 GB/s, BF16 733 and "
                  "TF32 366 TFLOPS with sparsity (half dense), FP32 91.6 TFLOPS, PCIe Gen4 x16"),
    Device(name="v5e", memory_bytes=16e9, usable=1.0, memory_gb_per_s=819, bf16_tflops=197, default_f32_tflops=197,
           f32_tflops=197 / 6, host_gb_per_s=_TPU_HOST, column_seconds=_TPU_COLUMN,
           source="Google Cloud TPU v5e docs (cloud.google.com/tpu/docs/v5e): 16 GB HBM2 at 819 GB/s, 197 TFLOPS "
                  "bf16 per chip"),
    Device(name="v5p", memory_bytes=95e9, usable=1.0, memory_gb_per_s=2765, bf16_tflops=459, default_f32_tflops=459,
           f32_tflops=459 / 6, host_gb_per_s=_TPU_HOST, column_seconds=_TPU_COLUMN,
           source="Google Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p): 95 GB HBM2e at 2765 GB/s, 459 TFLOPS "
                  "bf16 per chip"),
    Device(name="v6e", memory_bytes=32e9, usable=1.0, memory_gb_per_s=1640, bf16_tflops=918, default_f32_tflops=918,
           f32_tflops=918 / 6, host_gb_per_s=_TPU_HOST, column_seconds=_TPU_COLUMN,
           source="Google Cloud TPU v6e (Trillium) docs (cloud.google.com/tpu/docs/v6e): 32 GB HBM at 1640 GB/s, "
                  "918 TFLOPS bf16 per chip"),
  )
}  # fmt: skip
ALIASES = {"H100-SXM": "H100", "A100": "A100-80GB", "V5E": "v5e", "V5P": "v5p", "V6E": "v6e"}
CORES_PER_CHIP = {"v5p": 2}
"""A v5p slice is named by TensorCores (v5p-8: 4 chips); JAX sees a chip (its two cores, megacore) as one device."""
SETUP_SECONDS = (15.0, 5.0)
"""Starting, compiling each block shape and the rest outside the counted work, with and without calibration
(measured on this machine, `qjax.cli.estimate`)."""
HEAD_READ_BYTES_PER_PARAM = 4
"""Host memory of reading the output head (the largest tensor) and writing it out: its float32 kernel, read, rounded
and converted for the file a row block at a time (`qjax.formats.shards.Cast`)."""
PROCESS_BYTES = 1.1e9
"""Resident memory a `qjax quantize` run keeps beside the model's parts: Python, JAX's runtime and compiled programs,
and freed memory the allocators keep (0.27 GB before the model is read, 1.1 GB at the end of the 8B-shaped runs of
scripts/bench_scale.py, measured here)."""
TOKENIZER_BYTES_PER_TOKEN = 64
"""A GGUF file's tokenizer metadata (tokens, their types and BPE merges), per vocabulary entry: an approximation."""


def cpu(
  *, gflops: float | None = None, memory_gb_per_s: float | None = None, memory_bytes: float | None = None
) -> Device:
  """This machine as a device: float32 matmul throughput, memory bandwidth and RAM measured now unless given."""
  gflops = gflops or measure_gflops()
  bandwidth = memory_gb_per_s or measure_memory_gb_per_s()
  ram = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return Device(name="cpu", memory_bytes=float(ram), usable=1.0, memory_gb_per_s=bandwidth,
                bf16_tflops=gflops / 1e3, default_f32_tflops=gflops / 1e3, f32_tflops=gflops / 1e3,
                host_gb_per_s=bandwidth, column_seconds=COLUMN_SECONDS, host_memory_gb_per_s=bandwidth,
                source=f"this machine ({os.cpu_count()} cores): {gflops:.0f} GFLOP/s float32 matmul, "
                       f"{bandwidth:.1f} GB/s memory")  # fmt: skip


def parse_devices(value: str, *, gflops: float | None = None, memory_gb_per_s: float | None = None):
  """``(count, Device)`` of a --devices value: ``8xH100``, ``H200``, ``v5e-16``, ``4xv6e``, ``cpu``.

  Raises:
    InputError: naming --devices, for a form or a device it does not know.
  """
  m = re.fullmatch(r"(?:(\d+)x)?(.+)", value.strip())
  count, name = int(m.group(1) or 1), m.group(2)
  if name.lower() == "cpu":
    device = cpu(gflops=gflops, memory_gb_per_s=memory_gb_per_s)
  else:
    name = ALIASES.get(name.upper(), ALIASES.get(name, name))
    slice_ = re.fullmatch(r"(v\d+[a-z])-(\d+)", name, re.IGNORECASE)
    if slice_ and not m.group(1):
      name = slice_.group(1).lower()
      count = int(slice_.group(2)) // CORES_PER_CHIP.get(name, 1)
    if name not in DEVICES:
      known = ", ".join([*DEVICES, "cpu"])
      raise InputError(f"--devices={value}: unknown device {name!r}; expected [N x]TYPE with TYPE one of {known}, "
                       "or a TPU slice such as v5e-16.")  # fmt: skip
    device = DEVICES[name]
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if fraction and device.usable < 1:  # a GPU: JAX's allocator takes this part of its memory
      device = dataclasses.replace(device, usable=float(fraction))
  if count < 1:
    raise InputError(f"--devices={value}: expected at least one device, got {count}.")
  return count, device


class Model(NamedTuple):
  """A model as its config.json describes it."""

  config: LlamaConfig
  name: str
  dtype_bytes: int  # bytes per parameter of the checkpoint on disk (its torch_dtype)


def read_model(path: str) -> Model:
  """The model of a config.json (or a directory holding one).

  Raises:
    FileNotFoundError: when there is no config.json there.
    InputError: naming the file, for an invalid config.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.lexists(path):
    raise FileNotFoundError(f"--config={path}: no such file; give a config.json or a directory holding one.")
  hf = read_json(path)
  config = LlamaConfig.from_hf_dict(hf, source=path)
  dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
  name = os.path.basename(os.path.dirname(os.path.abspath(path)))
  if name in ("", "configs", "."):
    name = os.path.splitext(os.path.basename(path))[0]
  return Model(config, name, 4 if "32" in dtype else 2)


class Stage(NamedTuple):
  """One stage of a run: its work, the bytes it moves, and its time on the device (the slower of the two)."""

  name: str
  flops: float
  bytes: float
  seconds: float
  bound: str  # what limits it: "compute", "memory", "disk", "host link", "steps" (GPTQ's sequential columns)


@dataclasses.dataclass(frozen=True)
class Forecast:
  """What a run costs on `devices` x `device`: per device peak memory, stages and output sizes."""

  model: Model
  label: str
  device: Device
  devices: int
  tokens: int
  memory: Memory  # per device
  eval_bytes: float  # per device, while evaluating (0: no evaluation)
  stages: tuple[Stage, ...]
  sizes: dict[str, float]  # format -> bytes of the output
  export: str

  @property
  def seconds(self) -> float:
    return sum(s.seconds for s in self.stages)

  @property
  def peak_bytes(self) -> float:
    return max(self.memory.total, self.eval_bytes)

  @property
  def calibration_flops(self) -> float:
    return sum(s.flops for s in self.stages if s.name in ("forward", "statistics", "search"))

  @property
  def rounding_flops(self) -> float:
    return sum(s.flops for s in self.stages if s.name == "round")


def per_device(m: Memory, devices: int) -> Memory:
  """`m` on each of `devices`: windows split over the data axis (activations, batches); the block, its
  statistics and the embedding replicated."""
  return m._replace(activations=m.activations / devices, batch=m.batch / devices)


def forecast(
  model: Model,
  s: q.Settings,
  *,
  device: Device,
  devices: int = 1,
  disk_gb_per_s: float = 2.0,
  method_given: bool = False,
) -> Forecast:
  """The cost of ``qjax quantize`` with settings `s` on `model`, on `devices` x `device`.

  Raises:
    InputError: naming the flag, when a block and its statistics, or the evaluation, do not fit on a device, or
      --batch_size does not split over the devices; and as `qjax.cli.quantize.plan` for contradicting settings.
  """
  config = model.config
  p = q.plan(s, config, method_given=method_given)
  calibrate = needs_calibration(p.recipe) or bool(p.target_bpw)
  tokens = s.nsamples * s.seqlen if calibrate else 0
  if calibrate and s.batch_size % devices:
    raise InputError(f"--batch_size={s.batch_size} must be a multiple of the {devices} devices (the runner splits "
                     "each batch's windows over them).")  # fmt: skip
  w = work(config, p.recipe, calibration_tokens=tokens, seqlen=s.seqlen, eval_windows=s.eval_windows,
           gguf_type=p.target.gguf_type if p.target.quantizes else None, ggml_sweep=p.ggml_sweep,
           allocation=bool(p.target_bpw), allocation_sweeps=q.allocation_sweeps(s, p))  # fmt: skip
  m = memory(config, calibration_tokens=tokens, seqlen=s.seqlen, batch_size=s.batch_size,
             sweeps=reads_hessians(p.recipe))  # fmt: skip
  m = per_device(m, devices)
  if not calibrate:  # a block at a time, and the embedding and head as they are read
    m = m._replace(statistics=0.0, activations=0.0, batch=0.0)
  if device.name == "cpu":  # the host is the device: the head is read there too
    head = HEAD_READ_BYTES_PER_PARAM * config.vocab_size * config.hidden_size
    m = m._replace(model=max(m.model, head), runtime=PROCESS_BYTES)
  eval_bytes = evaluation_bytes(config, s.seqlen) if s.eval_windows else 0.0
  _check_fits(m, eval_bytes, device, devices, s)
  sizes = output_sizes(config, q.settings_spec(s), p.target.gguf_type if p.target.quantizes else "Q4_K_M",
                       imatrix=s.imatrix or p.ggml_sweep)  # fmt: skip
  export = _format_of(p.target)
  stages = _stages(model, w, s, device, devices, disk_gb_per_s, tokens, sizes.get(export, 0.0), calibrate)
  return Forecast(model, p.label, device, devices, tokens, m, eval_bytes, stages, sizes, export)


def evaluation_bytes(config: LlamaConfig, seqlen: int) -> float:
  """Memory of evaluating before and after: the float and the quantized model on one device, and a window's logits."""
  sizes = estimate_sizes(config)
  return 4.0 * (2 * (sizes.linear_params + sizes.other_params) + 3 * seqlen * config.vocab_size)


def _check_fits(m: Memory, eval_bytes: float, device: Device, devices: int, s: q.Settings) -> None:
  usable = device.memory_bytes * device.usable
  where = f"{device.name}'s {device.memory_bytes / 1e9:.0f} GB" + (
    f" ({device.usable:.0%} of it is JAX's: XLA_PYTHON_CLIENT_MEM_FRACTION)" if device.usable < 1 else ""
  )
  fixed = m.runtime + max(m.model, m.block + m.statistics)
  if fixed > usable:
    raise InputError(f"--devices={devices}x{device.name}: the block, its statistics, the embedding and head need "
                     f"{gib(fixed)} on every device, more than {where}; choose a device with more memory.")  # fmt: skip
  if m.total > usable:
    need = math.ceil((m.activations + m.batch) * devices / (usable - fixed))
    more = (
      ""
      if device.name == "cpu"
      else f"use {need} or more devices (the windows split over them: --batch_size a multiple), or "
    )
    raise InputError(f"--devices={devices}x{device.name}: calibration needs {gib(m.total)} per device ({parts(m)}), "
                     f"more than {where}; {more}fewer --nsamples={s.nsamples} / --seqlen={s.seqlen} / "
                     f"--batch_size={s.batch_size}.")  # fmt: skip
  if eval_bytes > usable:
    raise InputError(f"--eval_windows={s.eval_windows}: evaluating holds the float and the quantized model on one "
                     f"device, {gib(eval_bytes)}, more than {where}; --eval_windows=0 skips it.")  # fmt: skip


def _format_of(target) -> str:
  if target.quantizes:
    return f"gguf {target.gguf_type}"
  return "gptq" if target.is_gptq else str(target)


def _stage(name: str, flops: float, rate_tflops: float, nbytes: float, gb_per_s: float, limit: str) -> Stage:
  compute = flops / (rate_tflops * 1e12) if flops else 0.0
  moved = nbytes / (gb_per_s * 1e9) if nbytes else 0.0
  return Stage(name, flops, nbytes, max(compute, moved), "compute" if compute >= moved else limit)


def _stages(model: Model, w: Work, s, device: Device, n: int, disk: float, tokens: int, out_bytes: float,
            calibrate: bool) -> tuple[Stage, ...]:  # fmt: skip
  """The run's stages on `n` x `device`: calibration split over the windows, GPTQ's sweep over output channels."""
  config = model.config
  sizes = estimate_sizes(config)
  params = sizes.linear_params + sizes.other_params
  block_bytes = memory(config, calibration_tokens=0, seqlen=2, batch_size=1).block / 2  # float32, once
  disk_read = _stage("read", 0.0, 1.0, params * model.dtype_bytes, disk, "disk")
  to_device = _stage("to device", 0.0, 1.0, params * 4.0 * (device.name != "cpu"), device.host_gb_per_s, "host link")
  host = _stage("host", 0.0, 1.0, w.host_bytes, device.host_memory_gb_per_s, "host memory")
  batches = math.ceil(s.nsamples / s.batch_size) if tokens else 0
  weight_reads = batches * 2.2 * block_bytes * config.num_hidden_layers  # each batch reads each block's weights
  activations = tokens * config.hidden_size * 4.0 * 2 * 2.2 * config.num_hidden_layers
  forward = _stage("forward", w.forward_flops / n, device.default_f32_tflops, weight_reads + activations / n,
                   device.memory_gb_per_s, "memory")  # fmt: skip
  statistics = _stage("statistics", w.statistics_flops / n, device.f32_tflops, 0.0, 1.0, "memory")
  search = _stage("search", w.search_flops / n, device.default_f32_tflops, 0.0, 1.0, "memory")
  # Every device factors the whole (replicated) Hessian; the updates split over output channels. The factorisation's
  # slowness relative to matmuls is measured on XLA:CPU only.
  factor = w.factor_flops * (FACTORIZATION_COST if device.name == "cpu" else 1.0)
  sweep = (w.sweep_flops / n + factor) / (device.f32_tflops * 1e12)
  steps = w.columns * device.column_seconds
  passes = 3.0 * (w.per_weight_flops > 0)  # per-weight rounding reads each weight, its group, and writes its code
  elementwise = _stage("round", w.per_weight_flops, device.f32_tflops, sizes.linear_params * 4.0 * passes,
                       device.memory_gb_per_s, "memory")  # fmt: skip
  rounding = Stage("round", w.sweep_flops / n + w.factor_flops + w.per_weight_flops, elementwise.bytes,
                   sweep + steps + elementwise.seconds, "steps" if steps > sweep + elementwise.seconds else
                   elementwise.bound)  # fmt: skip
  write = _stage("write", 0.0, 1.0, out_bytes, disk, "disk")
  evaluate = _stage("evaluate", w.eval_flops, device.default_f32_tflops, params * 4.0 * (w.eval_flops > 0),
                    device.host_gb_per_s, "host link")  # fmt: skip
  setup = Stage("set-up", 0.0, 0.0, SETUP_SECONDS[0] if calibrate else SETUP_SECONDS[1], "fixed")
  stages = (setup, disk_read, host, to_device, forward, statistics, search, rounding, write, evaluate)
  return tuple(st for st in stages if st.seconds > 0 or st.name in ("set-up", "read"))


def output_sizes(config: LlamaConfig, spec: QSpec, gguf_type: str, *, imatrix: bool = False) -> dict[str, float]:
  """Bytes of the quantized model in each format: ``gguf <TYPE>`` (llama.cpp's types per tensor, norms and routers
  in F32, the tokenizer), and at `spec`'s bits and groups: ``gptq`` (packed codes, float16 scales, packed zero points,
  a g_idx), ``awq`` (4 bits only: codes, zero points, scales), ``compressed-tensors`` (packed codes, 16-bit scales,
  zero points when asymmetric) and ``qjax`` (as compressed-tensors, the rest in float32). The Hugging Face formats
  keep every other tensor in 16 bits."""
  shapes = param_shapes(config)
  numel = {p: int(np.prod(shape)) for p, shape in shapes.items()}
  rows = row_lengths(config)
  types = tensor_types(gguf_type, config, imatrix=imatrix)
  gguf = sum(type_bits(t, numel[p]) / 8 for p, t in types.items())
  gguf += sum(4 * n for p, n in numel.items() if p not in types) + TOKENIZER_BYTES_PER_TOKEN * config.vocab_size
  others = 2 * sum(n for p, n in numel.items() if p not in rows)
  out = {f"gguf {gguf_type}": gguf}
  gptq = awq = packed = 0.0
  for path, length in rows.items():
    *experts, _, outputs = shapes[path]  # kernels (in, out), or (experts, in, out)
    matrices = math.prod(experts)
    groups = matrices * outputs * (1 if spec.group_size == -1 else math.ceil(length / spec.group_size))
    gptq += numel[path] * spec.bits / 8 + groups * (2 + spec.bits / 8) + 4 * length * matrices
    awq += numel[path] * 4 / 8 + groups * (2 + 4 / 8)
    packed += numel[path] * spec.bits_per_weight(length) / 8
  if spec.grid is None:  # the affine grid: GPTQ and AWQ hold it
    out["gptq"] = gptq + others
    if spec.bits == 4:
      out["awq"] = awq + others
  out["compressed-tensors"] = packed + others
  out["qjax"] = packed + 2 * others  # a qjax directory keeps the rest in float32, as qjax computes
  return out


def gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.1f} GiB"


def parts(m: Memory) -> str:
  names = {"block": "block", "statistics": "statistics", "activations": "activations", "batch": "batch",
           "model": "embedding and head", "runtime": "process"}  # fmt: skip
  return ", ".join(f"{names[k]} {gib(v)}" for k, v in m._asdict().items() if v)


def report(f: Forecast) -> str:
  """The forecast as printed by ``qjax plan``."""
  c = f.model.config
  sizes = estimate_sizes(c)
  params = (sizes.linear_params + sizes.other_params) / 1e9
  usable = f.device.memory_bytes * f.device.usable
  experts = f", {c.num_experts} experts, top-{c.num_experts_per_tok}" if c.num_experts else ""
  lines = [
    f"model: {f.model.name} ({c.architecture}, {params:.2f}B parameters, {sizes.linear_params / 1e9:.2f}B in decoder "
    f"linears, {c.num_hidden_layers} layers{experts})",
    f"run: {f.label}, {f'{f.tokens:,} calibration tokens' if f.tokens else 'no calibration'}, on {f.devices} x "
    f"{f.device.name}",
    f"device: {f.device.source}",
    f"peak memory per device: {gib(f.peak_bytes)} of {gib(usable)} usable ({parts(f.memory)}"
    + (f"; evaluating {gib(f.eval_bytes)}" if f.eval_bytes else "")
    + ")",
    f"calibration {f.calibration_flops:.2e} FLOP, rounding {f.rounding_flops:.2e} FLOP",
    "",
    f"{'stage':<11} {'FLOP':>9} {'bytes':>9} {'time':>9}  bound",
  ]  # fmt: skip
  for st in f.stages:
    flops = f"{st.flops:.2e}" if st.flops else "-"
    nbytes = f"{st.bytes / 1e9:.1f} GB" if st.bytes else "-"
    lines.append(f"{st.name:<11} {flops:>9} {nbytes:>9} {minutes(st.seconds):>9}  {st.bound}")
  floor = "at rates measured here" if f.device.name == "cpu" else "device at datasheet peaks, host as this machine"
  lines.append(f"{'total':<11} {'':>9} {'':>9} {minutes(f.seconds):>9}  ({floor})")
  lines += ["", "output size:"]
  for name, nbytes in f.sizes.items():
    lines.append(f"  {name:<20} {nbytes / 1e9:6.2f} GB" + ("   <- --export" if name == f.export else ""))
  return "\n".join(lines)


def settings_from_args(args: list[str]) -> q.Settings:
  """`qjax quantize`'s settings from its command-line flags (``["--method=gptq", "--nsamples=8", "--nosym"]``), as
  a run recorded them; flags that are not settings (--verbose) are ignored.

  Raises:
    InputError: for an argument that is not a ``--flag[=value]``.
  """
  fields = {f.name: f for f in dataclasses.fields(q.Settings)}
  values = {}
  for arg in args:
    name, eq, value = arg.removeprefix("--").partition("=")
    if not arg.startswith("--"):
      raise InputError(f"settings_from_args expected --flag[=value] arguments, got {arg!r}.")
    if not eq and name.startswith("no") and name[2:] in fields:
      name, value = name[2:], "false"
    if name not in fields:
      continue
    default = fields[name].default
    if isinstance(default, bool):
      values[name] = value.lower() in ("", "true", "1")
    elif isinstance(default, int) or name == "bits":
      values[name] = int(value)
    elif isinstance(default, float) or name == "damp_percent":
      values[name] = float(value)
    else:
      values[name] = value
  return q.Settings(**values)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not _CONFIG.value:
    raise InputError("--config is required: a model's config.json, or a directory holding it.")
  model = read_model(_CONFIG.value)
  count, device = parse_devices(_DEVICES.value, gflops=_GFLOPS.value, memory_gb_per_s=_MEMORY.value)
  s = q.Settings.from_flags()
  f = forecast(model, s, device=device, devices=count, disk_gb_per_s=_DISK.value,
               method_given=flags.FLAGS["method"].present)  # fmt: skip
  print(report(f))
