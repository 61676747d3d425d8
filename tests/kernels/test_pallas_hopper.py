"""The Hopper (Mosaic GPU) kernel vs `qmatmul_reference`: on an sm90 GPU, in GPU interpret mode, lowered for sm90.

GPU interpret mode simulates the kernel's three warpgroups as threads whose host callbacks
block on each other (barriers), and XLA's CPU client runs host callbacks on a pool sized
to the machine's cores: on a 2-core machine a memory warpgroup can wait forever for a pool
thread. The interpreted cases therefore run in a child process with a larger pool
(``PJRT_NPROC``, read when the CPU client is created). Run this file as a script to run
the cases by hand: ``PJRT_NPROC=8 python -m tests.kernels.test_pallas_hopper``.

Output poisoning: the interpreter fills every GMEM output with NaN (``uninitialized_memory=
"nan"``), and `assert_close` requires a finite output; `unwritten_output_is_nan` checks
that premise in the child process.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from qjax.core import QSpec, quantize
from qjax.kernels import to_kernel_layout
from qjax.kernels.qmatmul import HopperConfig, pallas_hopper, qmatmul_hopper, qmatmul_reference
from tests.kernels.qmatmul_cases import HOPPER, assert_close

# Configs that exercise split-K with several k-steps per split, several token tiles, and the
# shape-derived defaults (split-K then fills DEFAULT_NUM_SMS).
CONFIGS = {
  "m1_g128_sym_bf16": HopperConfig(split_k=2),
  "m3_g32_asym_f16_actorder": None,
  "m17_perchannel_asym_bf16": HopperConfig(block_m=8, split_k=2),
  "b2x3_g64_sym_bf16": HopperConfig(split_k=3),
}
INTERPRET = plgpu.InterpretGPUParams(uninitialized_memory="nan")
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def _seed(name: str) -> int:
  return sum(map(ord, name))


def check_case(name: str, interpret) -> None:
  x, q = HOPPER[name].make(_seed(name))
  out = qmatmul_hopper(x, to_kernel_layout(q), config=CONFIGS[name], interpret=interpret)
  assert_close(out, qmatmul_reference(x, q), x.dtype)


def unwritten_output_is_nan() -> None:
  """A kernel that writes nothing returns NaN under `INTERPRET`: the premise of the poisoning check."""

  @functools.partial(plgpu.kernel, out_type=jax.ShapeDtypeStruct((128,), jnp.float32), interpret=INTERPRET)
  def writes_nothing(o_ref):
    del o_ref

  assert np.all(np.isnan(np.asarray(writes_nothing())))


@pytest.mark.parametrize(
  "m,k,n,group,split",
  [
    (1, 8192, 8192, 128, 2),
    (1, 4096, 4096, 128, 4),
    (16, 14336, 4096, 128, 4),
    (1, 8192, 57344, 8192, 2),
  ],  # the last: per channel (one group),
)
def test_split_k_fills_the_sms(m, k, n, group, split):
  cfg = pallas_hopper.resolve(HopperConfig(), m, k, n, group, num_sms=132)
  assert cfg.split_k == split
  ctas = (n // pallas_hopper.CTA_ROWS) * cfg.split_k
  assert ctas / (-(-ctas // 132) * 132) > 0.9  # whole waves of one CTA per SM


@pytest.mark.parametrize("m", [1, 16, 128])
def test_pipeline_fits_shared_memory(m):
  cfg = pallas_hopper.resolve(HopperConfig(), m, 8192, 8192, 128, num_sms=132)
  stage = pallas_hopper.CTA_ROWS * cfg.block_k // 2 + cfg.block_m * cfg.block_k * 2
  assert cfg.max_concurrent_steps * stage + pallas_hopper.CTA_ROWS * cfg.block_m * 4 <= 227 * 1024


class TestHopperKernel:
  """The Hopper kernel on an sm90 GPU; `TestHopperKernelInterpret` runs it under GPU interpret mode."""

  INTERPRET = False

  def setup_method(self):
    if not self.INTERPRET and not pallas_hopper.supported(
      jax.ShapeDtypeStruct((1, 512), jnp.bfloat16),
      jax.eval_shape(lambda: to_kernel_layout(quantize(jnp.ones((512, 256)), QSpec()))),
    ):
      pytest.skip("needs a Hopper (sm90) GPU")

  @pytest.mark.parametrize("name", sorted(HOPPER))
  def test_matches_reference(self, name):
    check_case(name, INTERPRET if self.INTERPRET else False)


class TestHopperKernelInterpret(TestHopperKernel):
  INTERPRET = True

  def test_matches_reference(self, name=None):
    """All cases (and the poisoning premise) in one child process with a large enough callback pool."""
    env = dict(os.environ, PJRT_NPROC="8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-m", "tests.kernels.test_pallas_hopper"]
    run = subprocess.run(command, check=False, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok ") == len(HOPPER) + 1, run.stdout

  @pytest.mark.parametrize("group,m,dtype", [(128, 1, "bfloat16"), (32, 16, "float16"), (-1, 200, "bfloat16")])
  def test_lowers_for_sm90(self, group, m, dtype):
    """Mosaic GPU's layout inference and dialect lowering for sm90 run on CPU (PTX compilation needs the GPU)."""
    w = jax.eval_shape(lambda: to_kernel_layout(quantize(jnp.ones((4096, 1024)), QSpec(group_size=group))))
    x = jax.ShapeDtypeStruct((m, 4096), dtype)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
      assert pallas_hopper.supported(x, w)
      exported = jax.export.export(qmatmul_hopper, platforms=["cuda"])(x, w)
    assert "mosaic_gpu" in exported.mlir_module()


if __name__ == "__main__":
  unwritten_output_is_nan()
  print("ok unwritten_output_is_nan", flush=True)
  for case in sorted(HOPPER):
    check_case(case, INTERPRET)
    print(f"ok {case}", flush=True)
