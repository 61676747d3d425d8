"""W4A16 matmul on the Llama-3-8B and Llama-70B layer shapes: Pallas kernels vs XLA int4 vs bf16 ``jnp.dot``.

For every layer shape (K, N) and token count M it builds random int4 weights (g128
symmetric, bfloat16 scales by default; see the flags), checks every variant against
`qmatmul_reference` on this device, then times each variant: a median over device-timed runs (CUPTI on GPUs, wall
clock with ``block_until_ready`` elsewhere) while rotating through enough weight copies
to defeat the L2 cache. It prints microseconds, the percent of the HBM roofline (the
variant's bytes over peak bandwidth) and the speedups over bf16 ``jnp.dot`` and over the
XLA int4 baseline, all measured in the same run on the same device.

  .venv/bin/python scripts/bench_kernels.py --out=experiments/bench_kernels.json  # on an H100/H200
  .venv/bin/python scripts/bench_kernels.py --smoke  # any machine: tiny shapes, checks only the wiring

Variants: ``bf16`` (dense weights), ``xla_int4`` (`qmatmul_xla_int4`), ``hopper``
(`qmatmul_hopper`, sm90 only), ``tpu`` (`qmatmul_tpu`, TPU only). ``--sweep`` also times a
grid of `HopperConfig`s per shape; its winners are the entries of `pallas_hopper.TUNED`.
"""

import dataclasses
import functools
import itertools
import json
import math
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qjax.core import QArray, QSpec, is_qarray
from qjax.core.qspec import KERNEL
from qjax.kernels.qmatmul import (
  HopperConfig,
  from_kernel_layout,
  pallas_hopper,
  pallas_tpu,
  qmatmul_hopper,
  qmatmul_reference,
  qmatmul_tpu,
  qmatmul_xla_int4,
)

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes and few runs: checks the script end to end on any machine.")
_MODELS = flags.DEFINE_list("models", ["llama3_8b", "llama_70b"], "Layer sets to run.")
_M = flags.DEFINE_list("m", ["1", "2", "4", "8", "16", "32", "64", "128"], "Token counts.")
_GROUP = flags.DEFINE_integer("group_size", 128, "Group size (-1: per channel).")
_SYMMETRIC = flags.DEFINE_bool("symmetric", True, "Symmetric codes (no zero points).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16"], "Activation dtype.")
_SCALE_DTYPE = flags.DEFINE_enum("scale_dtype", "bfloat16", ["bfloat16", "float16"], "Scale dtype.")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed runs per variant (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed runs first.")
_L2_MB = flags.DEFINE_float("l2_mb", 50.0, "L2 size in MiB (H100 and H200: 50).")
_HBM_GBPS = flags.DEFINE_float("hbm_gbps", None, "Peak HBM bandwidth in GB/s; default from the device kind.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also time a grid of HopperConfigs per shape and report the fastest.")
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here.")

# (K, N) of the linear layers (vLLM benchmarks/kernels/weight_shapes.py, as in kernels.md).
LAYERS = {
  "llama3_8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
  "llama_70b": {"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 57344), "down": (28672, 8192)},
  "smoke": {"a": (256, 256), "b": (512, 128)},
}
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "H800": 3350.0}  # datasheets
TOLERANCE = {"bfloat16": 1.6e-2, "float16": 2e-3}  # max |out - ref| / max |ref|, as tests/kernels


def peak_gbps(device) -> float | None:
  if _HBM_GBPS.value:
    return _HBM_GBPS.value
  return next((v for k, v in PEAK_GBPS.items() if k in device.device_kind), None)


def random_weight(key, k: int, n: int, spec: QSpec) -> QArray:
  """Random int4 codes, scales and zeros in the kernel layout (the values do not affect timing)."""
  kc, ks, kz = jax.random.split(key, 3)
  groups = spec.num_groups(k)
  codes = jax.random.randint(kc, (n, k), -8, 8, jnp.int8).astype(jnp.int4)
  scale = jax.random.uniform(ks, (groups, n), jnp.float32, 1e-3, 1e-2).astype(spec.scale_dtype)
  zero = None if spec.symmetric else jax.random.randint(kz, (groups, n), -8, 8).astype(spec.scale_dtype)
  spec = dataclasses.replace(spec, layout=KERNEL)
  return QArray(codes, scale, zero, None, spec, (k, n), np.dtype(jnp.float32))


def nbytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def weight_bytes(w) -> float:
  """Bytes a matmul reads for the weight: int4 counts half a byte per code."""
  if is_qarray(w) and w.spec.layout == KERNEL:
    return w.codes.size / 2 + nbytes((w.scale, w.zero))
  return nbytes(w)


def dense_matmul(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


dense_matmul = jax.jit(dense_matmul)


def _cupti_us(fn, x, weights) -> list[float]:
  from jax.experimental.mosaic.gpu import profiler

  timed = profiler.measure(fn)
  times = []
  for i in range(_ITERS.value):
    _, ms = timed(x, weights[i % len(weights)])
    times.append(ms * 1e3)  # every kernel the call launched (e.g. the split-K epilogue too)
  return times


def _wall_us(fn, x, weights) -> list[float]:
  times = []
  for i in range(_ITERS.value):
    w = weights[i % len(weights)]
    start = time.perf_counter()
    jax.block_until_ready(fn(x, w))
    times.append((time.perf_counter() - start) * 1e6)
  return times


def median_us(fn, x, weights, device) -> tuple[float, str]:
  """Median time of ``fn(x, w)`` over `_ITERS` runs rotating through `weights`, and how it was timed."""
  for i in range(_WARMUP.value):
    jax.block_until_ready(fn(x, weights[i % len(weights)]))
  if device.platform == "gpu":
    return statistics.median(_cupti_us(fn, x, weights)), "cupti"
  return statistics.median(_wall_us(fn, x, weights)), "wall"


def variants(device) -> dict:
  """The variants that run on `device`: name -> (function, weight kind)."""
  out = {"bf16": (dense_matmul, "dense")}
  out["xla_int4"] = (qmatmul_xla_int4, "kernel")
  if device.platform == "gpu":
    out["hopper"] = (qmatmul_hopper, "kernel")
  if device.platform == "tpu":
    out["tpu"] = (qmatmul_tpu, "qarray")
  return out


def supported(name: str, x, w: QArray) -> bool:
  if name == "hopper":
    return pallas_hopper.supported(x, w)
  if name == "tpu":
    return pallas_tpu.supported(x, jax.eval_shape(from_kernel_layout, w))
  return True


def sweep_hopper(x, weights, device) -> tuple[float, HopperConfig] | None:
  """The fastest supported `HopperConfig` of a small grid (tile, split, pipeline depth) for these shapes."""
  best = None
  for block_k, split_k, stages in itertools.product((64, 128, 256), (None, 1, 2, 4, 8), (2, 4, 6)):
    config = HopperConfig(block_k=block_k, split_k=split_k, max_concurrent_steps=stages)
    if not pallas_hopper.supported(x, weights[0], config=config):
      continue
    fn = functools.partial(qmatmul_hopper, config=config)
    us, _ = median_us(fn, x, weights, device)
    if best is None or us < best[0]:
      best = (us, config)
  return best


def run_layer(key, model: str, layer: str, k: int, n: int, ms: list[int], spec: QSpec, device) -> list[dict]:
  dtype = jnp.dtype(_DTYPE.value)
  base = random_weight(key, k, n, spec)
  dense = from_kernel_layout(base)
  min_bytes = 0 if _SMOKE.value else 4 * _L2_MB.value * 2**20  # rotate through 4x L2 of weights
  copies = {}
  for index, (name, (_, kind)) in enumerate(variants(device).items()):
    one = k * n * dtype.itemsize if kind == "dense" else weight_bytes(base)
    count = max(2, math.ceil(min_bytes / one))
    keys = jax.random.split(jax.random.fold_in(key, index + 1), count)
    if kind == "dense":
      copies[name] = [jax.random.normal(kk, (k, n), dtype) for kk in keys]
    else:
      ws = [random_weight(kk, k, n, spec) for kk in keys]
      copies[name] = [from_kernel_layout(w) for w in ws] if kind == "qarray" else ws
  peak = peak_gbps(device)
  rows = []
  for m in ms:
    x = jax.random.normal(jax.random.fold_in(key, m), (m, k), dtype)
    ref = np.asarray(qmatmul_reference(x, dense), np.float32)
    row = {"model": model, "layer": layer, "k": k, "n": n, "m": m}
    for name, (fn, kind) in variants(device).items():
      if not supported(name, x, base):
        continue
      if name != "bf16":  # the dense baseline has random weights of its own
        w = {"kernel": base, "qarray": dense}[kind]
        out = np.asarray(fn(x, w), np.float32)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        row[f"{name}_err"] = err
        row[f"{name}_ok"] = bool(np.isfinite(out).all() and err <= TOLERANCE[_DTYPE.value])
      us, row["timing"] = median_us(fn, x, copies[name], device)
      moved = weight_bytes(copies[name][0]) + (m * k + m * n) * dtype.itemsize
      row[f"{name}_us"] = us
      if peak:
        row[f"{name}_roofline_pct"] = 100 * moved / (peak * 1e3) / us
    if _SWEEP.value and "hopper_us" in row:
      us, config = sweep_hopper(x, copies["hopper"], device)
      row["hopper_sweep_us"], row["hopper_sweep_config"] = us, repr(config)
      print(f"sweep {model} {layer} m={m}: {us:.1f} us with {config} (default config: {row['hopper_us']:.1f} us)")
    rows.append(row)
  return rows


def print_rows(rows: list[dict]) -> None:
  names = [v for v in ("hopper", "tpu", "xla_int4", "bf16") if any(f"{v}_us" in r for r in rows)]
  kernel = names[0]
  header = f"{'model':10s} {'layer':8s} {'K':>6s} {'N':>6s} {'M':>4s}"
  for v in names:
    header += f" {v + ' us':>12s} {'%roof':>6s}"
  header += f" {kernel + '/bf16':>12s} {kernel + '/xla':>12s} {'check':>6s}"
  print(header)
  for r in rows:
    line = f"{r['model']:10s} {r['layer']:8s} {r['k']:6d} {r['n']:6d} {r['m']:4d}"
    for v in names:
      us, pct = r.get(f"{v}_us"), r.get(f"{v}_roofline_pct")
      line += f" {us:12.1f}" if us is not None else f" {'-':>12s}"
      line += f" {pct:6.1f}" if pct is not None else f" {'-':>6s}"
    us = r.get(f"{kernel}_us")
    for base in ("bf16", "xla_int4"):
      other = r.get(f"{base}_us")
      line += f" {other / us:11.2f}x" if us and other and base != kernel else f" {'-':>12s}"
    checks = [r[key] for key in r if key.endswith("_ok")]
    line += f" {'ok' if all(checks) else 'FAIL':>6s}"
    print(line)


def main(argv):
  del argv
  device = jax.devices()[0]
  spec = QSpec(bits=4, group_size=_GROUP.value, symmetric=_SYMMETRIC.value, scale_dtype=_SCALE_DTYPE.value)
  models = ["smoke"] if _SMOKE.value else _MODELS.value
  ms = [1, 3] if _SMOKE.value else [int(m) for m in _M.value]
  if _SMOKE.value:
    flags.FLAGS.iters, flags.FLAGS.warmup = 2, 1
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, peak HBM {peak_gbps(device)} GB/s")
  print(f"weights: int4 {spec}; activations {_DTYPE.value}; median of {_ITERS.value} runs")
  rows = []
  key = jax.random.key(0)
  for model in models:
    for layer, (k, n) in LAYERS[model].items():
      rows += run_layer(jax.random.fold_in(key, k * 7 + n), model, layer, k, n, ms, spec, device)
  print_rows(rows)
  failed = [r for r in rows if not all(r[key] for key in r if key.endswith("_ok"))]
  if _OUT.value:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {"device_kind": device.device_kind, "jax": jax.__version__, "commit": commit, "spec": str(spec)}
    with open(_OUT.value, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)
  if failed:
    raise SystemExit(f"{len(failed)} rows failed the check against qmatmul_reference")


if __name__ == "__main__":
  app.run(main)
