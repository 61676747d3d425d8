"""GPTQ's memory on one matrix: the (in, in) buffers each of its programs holds (XLA's own accounting, in units of
one (in, in) float32 buffer, n²) and the process's resident memory around `gptq_quantize`, on a random Hessian.

.venv/bin/python scripts/bench_gptq_memory.py --inputs=14336 --outputs=4096   # Llama-3.1-8B's down_proj

The Hessian is handed over as a device array with ``donate_hessian=True``, as the calibration runner does.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qjax.core import QSpec
from qjax.quantizers import gptq as gptq_lib

_INPUTS = flags.DEFINE_integer("inputs", 14336, "Input width n (the Hessian is n x n).")
_OUTPUTS = flags.DEFINE_integer("outputs", 4096, "Output width.")
_GROUP = flags.DEFINE_integer("group_size", 128, "Group size.")


def resident_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 1e9


def program_buffers(n: int, out: int, spec: QSpec, config: gptq_lib.GptqConfig) -> dict[str, float]:
  """Arguments + outputs - aliased + temporaries of each program, in units of n² float32."""
  programs = gptq_lib._factor_programs(jax.devices()[0], True)
  square = jax.ShapeDtypeStruct((n, n), jnp.float32)
  scalar, k = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
  factored = jax.eval_shape(lambda h: gptq_lib._factor(h, spec=spec, config=config), square)
  compiled = {
    "prepare (Hessian donated)": programs.prepare.lower(square, spec=spec, config=config).compile(),
    "one dampening try": programs.factors.lower(square, scalar, k, config.damp).compile(),
    "factor": programs.lower.lower(square, scalar, k, config.damp).compile(),
    "inverse factor": programs.inverse.lower(square).compile(),
    "sweep": gptq_lib._round_core.lower(
      jax.ShapeDtypeStruct((n, out), jnp.bfloat16), factored, spec=spec, config=config
    ).compile(),
    "all in one program (under jit)": jax.jit(lambda h: gptq_lib._factor(h, spec=spec, config=config))
    .lower(square)
    .compile(),
  }
  unit = 4 * n * n
  out_units = {}
  for name, c in compiled.items():
    m = c.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    out_units[name] = total / unit
  return out_units


def main(argv):
  del argv
  n, out = _INPUTS.value, _OUTPUTS.value
  spec, config = QSpec(bits=4, group_size=_GROUP.value), gptq_lib.GptqConfig()
  print(f"n = {n}: one (in, in) float32 buffer is {4 * n * n / 1e9:.2f} GB")
  for name, units in program_buffers(n, out, spec, config).items():
    print(f"  {name:32s} {units:5.2f} n²")
  peak = [0.0]

  def sample():
    while True:
      peak[0] = max(peak[0], resident_gb())
      time.sleep(0.01)

  threading.Thread(target=sample, daemon=True).start()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1024, n), dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((n, out), dtype=np.float32), jnp.bfloat16)
  for call in range(2):  # the first compiles
    h = jax.block_until_ready(jnp.dot(x.T, x) / x.shape[0])
    before, peak[0] = resident_gb(), 0.0
    start = time.perf_counter()
    q, _ = gptq_lib.gptq_quantize(w, h, spec=spec, config=config, donate_hessian=True)
    jax.block_until_ready(q)
    seconds = time.perf_counter() - start
    print(f"call {call}: resident {before:.2f} GB with the Hessian, peak {peak[0]:.2f} GB "
          f"(+{(peak[0] - before) / (4 * n * n / 1e9):.2f} n²), {seconds:.1f} s")  # fmt: skip
    del q, h


if __name__ == "__main__":
  app.run(main)
