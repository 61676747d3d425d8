"""What a run cost and where: ``report.json`` (versions, sizes, quality, per-tensor errors) and plots of the
quantization error per layer and per tensor type."""

import dataclasses
import json
import os
import re
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np

from qjax.calib.experts import least_fed

LAYER_TENSOR = re.compile(r"model/layers_(\d+)/(?:self_attn|mlp)/(\w+)/kernel")


def write_report(run_dir: str, report: dict[str, Any]) -> list[str]:
  """Writes ``report.json`` and, when it lists quantized tensors, ``errors.png``; returns the paths written."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, "report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2, default=_jsonable)
  written = [path]
  if report.get("tensors"):
    written.append(plot_errors(report["tensors"], os.path.join(run_dir, "errors.png"), title=report.get("method", "")))
  return written


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def errors_by_layer(tensors: dict[str, dict[str, Any]]) -> dict[str, dict[int, float]]:
  """tensor type (``q_proj`` …) -> layer -> relative error."""
  table: dict[str, dict[int, float]] = defaultdict(dict)
  for path, row in tensors.items():
    match = LAYER_TENSOR.fullmatch(path)
    if match:
      table[match[2]][int(match[1])] = row["relative_error"]
  return dict(table)


def plot_errors(tensors: dict[str, dict[str, Any]], path: str, *, title: str = "") -> str:
  """Relative weight error per layer (a line per tensor type) and its mean per tensor type."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = errors_by_layer(tensors)
  fig, (by_layer, by_type) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
  for kind, errors in sorted(table.items()):
    layers = sorted(errors)
    by_layer.plot(layers, [errors[i] for i in layers], marker=".", label=kind)
  by_layer.set_xlabel("layer")
  by_layer.set_ylabel("relative error ‖Ŵ − W‖ / ‖W‖")
  by_layer.legend(fontsize=8)
  kinds = sorted(table)
  by_type.bar(kinds, [np.mean(list(table[k].values())) for k in kinds])
  by_type.set_ylabel("mean over layers")
  by_type.tick_params(axis="x", rotation=45)
  fig.suptitle(f"quantization error {title}".strip())
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


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


class TensorLog:
  """Per quantized tensor: its format, bits per weight, and the rounding's relative error ``‖Ŵ - W‖ / ‖W‖``.

  ``W`` is what the rounding saw (after a rotation or AWQ scaling), so the error is the rounding's own. Pass
  `record` to `qjax.transforms.observe` around each stage.
  """

  def __init__(self):
    self.rows: dict[str, dict[str, Any]] = {}
    self.expert_tokens: dict[str, list[int]] = {}

  def record_experts(self, path: str, tokens) -> None:
    """Tokens the router sent each expert of the experts' module `path` during calibration (pass it to the runner:
    `qjax.calib.RunnerOptions.expert_tokens`)."""
    self.expert_tokens[path] = [int(n) for n in tokens]

  def record(self, path: str, before, after) -> None:
    from qjax.core import dequantize, is_qarray

    if not is_qarray(after):
      return
    if after.spec.is_ggml and not after.stack_shape:
      err = _ggml_relative_error(np.asarray(before, np.float32), after)
    else:
      w = np.asarray(before, np.float32)
      err = np.linalg.norm(np.asarray(dequantize(after), np.float32) - w) / max(np.linalg.norm(w), 1e-30)
    layout = after.spec.layout if after.spec.is_ggml else f"int{after.spec.bits} g{after.spec.group_size}"
    self.rows[path] = {"format": layout, "bits_per_weight": after.bits_per_weight, "relative_error": float(err)}


ERROR_BLOCK_ELEMENTS = 1 << 24
"""Weights dequantized at a time for a ggml tensor's error: an embedding or head (0.5B weights) is not whole twice."""


def _ggml_relative_error(w: np.ndarray, q) -> float:
  """``‖dequantize(q) - w‖ / ‖w‖`` of a ggml-layout `QArray`, a block of its rows (output channels, or an
  embedding's vocabulary) at a time, summed in float64."""
  from qjax.core import ggml_decode

  rows = w.T if q.axis == 0 else w  # ggml rows: a kernel's output channels, an embedding's vocabulary rows
  step = max(1, ERROR_BLOCK_ELEMENTS // rows.shape[1])
  err = ref = 0.0
  for start in range(0, rows.shape[0], step):
    target = rows[start : start + step]
    diff = np.asarray(ggml_decode.decode(q.codes[start : start + step], q.spec.layout), np.float32) - target
    err += float(np.sum(np.square(diff, dtype=np.float64)))
    ref += float(np.sum(np.square(target, dtype=np.float64)))
  return float(np.sqrt(err) / max(np.sqrt(ref), 1e-30))


class Sizes(NamedTuple):
  """Bytes of a parameter tree: its quantized tensors as stored and in float16, the rest in float16."""

  quantized: int
  quantized_float16: int
  dense_float16: int

  @property
  def bits_per_weight(self) -> float:
    """Of the quantized tensors (codes, scales, zeros, permutations)."""
    return 16.0 * self.quantized / max(self.quantized_float16, 1)


def sizes(params) -> Sizes:
  from qjax.core import is_qarray
  from qjax.core.tree import leaves_with_paths

  quantized = quantized_f16 = dense_f16 = 0
  for _, leaf in leaves_with_paths(params):
    if is_qarray(leaf):
      quantized += leaf.nbytes
      quantized_f16 += 2 * leaf.size
    else:
      dense_f16 += 2 * int(np.size(leaf))
  return Sizes(quantized, quantized_f16, dense_f16)


@dataclasses.dataclass
class RunReport:
  """What a quantize run cost: quality before and after, size, bits per weight, time, per-tensor errors."""

  method: str
  evaluation: Any  # `qjax.eval.EvalResult` of the quantized model against the float one, or None
  sizes: Sizes
  quantize_seconds: float
  eval_seconds: float
  tensors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  expert_tokens: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # calibration tokens per expert

  @property
  def bits_per_weight(self) -> float:
    return self.sizes.bits_per_weight

  def as_dict(self) -> dict[str, Any]:
    return {
      "method": self.method,
      "evaluation": None if self.evaluation is None else self.evaluation._asdict(),
      "quantized_bytes": self.sizes.quantized,
      "quantized_float16_bytes": self.sizes.quantized_float16,
      "dense_float16_bytes": self.sizes.dense_float16,
      "bits_per_weight": self.bits_per_weight,
      "quantize_seconds": self.quantize_seconds,
      "eval_seconds": self.eval_seconds,
      "tensors": self.tensors,
      "expert_tokens": self.expert_tokens,
      "versions": versions(),
    }

  def table(self) -> str:
    mb = 1 / 2**20
    s = self.sizes
    total_f16 = (s.quantized_float16 + s.dense_float16) * mb
    total_q = (s.quantized + s.dense_float16) * mb
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
      f"(quantized linears: {s.quantized_float16 * mb:.1f} MB fp16 -> {s.quantized * mb:.1f} MB; "
      f"quantize {self.quantize_seconds:.0f}s, evaluate {self.eval_seconds:.0f}s)"
    )
    if self.expert_tokens:
      lines.append("calibration tokens of the least-fed experts (expert: tokens):")
      for path, tokens in self.expert_tokens.items():
        starved = ", ".join(f"{e}: {n}" for e, n in least_fed(np.asarray(tokens)))
        unseen = [str(e) for e, n in enumerate(tokens) if n == 0]
        named = f"  ({len(unseen)} of {len(tokens)} saw none: {', '.join(unseen)})" if unseen else ""
        lines.append(f"  {path}: {starved}{named}")
    return "\n".join(lines)


def _fmt(value, width, digits):
  return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"
