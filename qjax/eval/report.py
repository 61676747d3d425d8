"""A run directory's report: ``report.json`` and plots of the quantization error per layer and per tensor type."""

import json
import os
import re
from collections import defaultdict
from typing import Any

import numpy as np

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
