"""qmatmul kernels vs `qmatmul_reference`: portable (interpret), TPU (TPU interpret), XLA int4; layout; dispatch.

Output poisoning: the Pallas HLO interpreter fills every output buffer with NaN before the
kernel runs, and `assert_close` requires a finite output, so a tile the portable kernel
forgets to write fails. TPU interpret mode allocates block buffers NaN-filled and copies
them back after every block, so a tile the TPU kernel forgets to write holds NaN or another
tile's values and fails the comparison (`test_unwritten_tile_is_detected` checks both premises).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.core import QSpec, from_codes, quantize, round_to_grid
from qjax.kernels import (
  choose_backend,
  from_kernel_layout,
  from_kernel_layout_params,
  is_kernel_layout,
  qmatmul,
  qmatmul_mode,
  qmatmul_reference,
  to_kernel_layout,
  to_kernel_layout_params,
)
from qjax.kernels.qmatmul import (
  PortableConfig,
  TpuConfig,
  pallas_hopper,
  pallas_portable,
  pallas_tpu,
  qmatmul_portable,
  qmatmul_tpu,
  qmatmul_xla_int4,
  xla_int4,
)
from tests.kernels.qmatmul_cases import PORTABLE, TPU, Case, assert_close

SMALL_PORTABLE = PortableConfig(block_m=8, block_n=64, block_k=64)
SMALL_TPU = TpuConfig(block_m=8, block_n=128, block_k=256)


def _seed(name: str) -> int:
  return sum(map(ord, name))


class TestPortableKernel:
  """The portable kernel compiled; `TestPortableKernelInterpret` runs the same cases interpreted."""

  INTERPRET = False

  def setup_method(self):
    if not self.INTERPRET:
      pytest.skip("the portable kernel is the interpret-mode kernel; compiled runs use pallas_tpu or pallas_hopper")

  @pytest.mark.parametrize("name", sorted(PORTABLE))
  def test_matches_reference(self, name):
    x, q = PORTABLE[name].make(_seed(name))
    out = qmatmul_portable(x, q, config=SMALL_PORTABLE, interpret=self.INTERPRET)
    assert_close(out, qmatmul_reference(x, q), x.dtype)

  @settings(max_examples=6)
  @given(
    m=st.integers(1, 20),
    groups=st.integers(1, 4),
    group=st.sampled_from([32, 64, 128, -1]),
    n=st.integers(1, 80),
    symmetric=st.booleans(),
    act_order=st.booleans(),
  )
  def test_fuzz_shapes(self, m, groups, group, n, symmetric, act_order):
    k = 8 * groups * 5 if group == -1 else group * groups
    case = Case((m,), k, n, group, symmetric, "float32", act_order=act_order)
    x, q = case.make(m * 1000 + k + n)
    out = qmatmul_portable(x, q, config=SMALL_PORTABLE, interpret=self.INTERPRET)
    assert_close(out, qmatmul_reference(x, q), x.dtype)

  def test_rejects_other_layouts(self):
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="bits=8"):
      qmatmul_portable(x, quantize(jnp.ones((64, 8)), QSpec(bits=8, group_size=32)), interpret=self.INTERPRET)
    with pytest.raises(ValueError, match=r"x of shape \(\.\.\., 64\)"):
      qmatmul_portable(jnp.ones((2, 32)), quantize(jnp.ones((64, 8)), QSpec(group_size=32)), interpret=self.INTERPRET)


class TestPortableKernelInterpret(TestPortableKernel):
  INTERPRET = True


class TestTpuKernel:
  """The Mosaic TPU kernel on a TPU; `TestTpuKernelInterpret` runs it under TPU interpret mode."""

  INTERPRET = False

  def setup_method(self):
    if not self.INTERPRET and jax.devices()[0].platform != "tpu":
      pytest.skip("needs a TPU")

  def _interpret(self):
    return pltpu.InterpretParams(uninitialized_memory="nan") if self.INTERPRET else False

  @pytest.mark.parametrize("name", sorted(TPU))
  def test_matches_reference(self, name):
    x, q = TPU[name].make(_seed(name))
    out = qmatmul_tpu(x, q, config=SMALL_TPU, interpret=self._interpret())
    assert_close(out, qmatmul_reference(x, q), x.dtype)

  def test_group_32_is_unsupported(self):
    q = jax.eval_shape(lambda: quantize(jnp.ones((256, 128)), QSpec(group_size=32)))
    x = jax.ShapeDtypeStruct((4, 256), jnp.bfloat16)
    assert not pallas_tpu.supported(x, q, interpret=True)
    with pytest.raises(NotImplementedError, match="group=32"):
      qmatmul_tpu(jnp.ones((4, 256), jnp.bfloat16), quantize(jnp.ones((256, 128)), QSpec(group_size=32)), interpret=1)


class TestTpuKernelInterpret(TestTpuKernel):
  INTERPRET = True

  @pytest.mark.parametrize("group", [128, -1])
  def test_lowers_to_mosaic_tpu(self, group):
    """Pallas-to-Mosaic lowering for a TPU v6e target runs on CPU (Mosaic's own compile needs the chip)."""
    q = jax.eval_shape(lambda: quantize(jnp.ones((4096, 1024)), QSpec(group_size=group, symmetric=False)))
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    device = jax.sharding.AbstractDevice(device_kind="TPU v6 lite", platform="tpu", num_cores=1)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
      exported = jax.export.export(qmatmul_tpu, platforms=["tpu"])(x, q)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("name", sorted(PORTABLE))
def test_xla_int4_matches_reference(name):
  x, q = PORTABLE[name].make(_seed(name) + 1)
  assert_close(qmatmul_xla_int4(x, to_kernel_layout(q)), qmatmul_reference(x, q), x.dtype)


@pytest.mark.parametrize(
  "spec,axis",
  [(QSpec(group_size=32), 0), (QSpec(group_size=-1, symmetric=False), 0), (QSpec(group_size=64, symmetric=False), 1)],
)
def test_kernel_layout_round_trips_exactly(spec, axis):
  rng = np.random.default_rng(0)
  codes, params = round_to_grid(rng.standard_normal((128, 24)).astype(np.float32), spec)
  q = from_codes(codes, params, spec, perm=rng.permutation(128), axis=axis)
  kw = to_kernel_layout(q)
  assert kw.codes.dtype == jnp.int4 and kw.codes.shape == (24, 128) and kw.canonical_shape == q.canonical_shape
  back = from_kernel_layout(kw)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (back.spec, back.shape, back.axis) == (q.spec, q.shape, q.axis)


def test_kernel_layout_params_convert_only_4bit_packed():
  params = {
    "a": quantize(jnp.ones((64, 8)), QSpec(group_size=32)),
    "b": quantize(jnp.ones((64, 8)), QSpec(bits=8, group_size=32)),
    "c": jnp.ones(3),
  }
  converted = to_kernel_layout_params(params)
  assert is_kernel_layout(converted["a"]) and not is_kernel_layout(converted["b"])
  back = from_kernel_layout_params(converted)
  np.testing.assert_array_equal(back["a"].codes, params["a"].codes)
  with pytest.raises(ValueError, match="4-bit packed QArray with whole groups: only 4-bit"):
    to_kernel_layout(params["b"])


def test_supported_accepts_shape_dtype_structs():
  q = jax.eval_shape(lambda: quantize(jnp.ones((512, 256)), QSpec(group_size=128, symmetric=False)))
  kw = jax.eval_shape(to_kernel_layout, q)
  x = jax.ShapeDtypeStruct((2, 7, 512), jnp.bfloat16)
  assert pallas_portable.supported(x, q)
  assert pallas_tpu.supported(x, q, interpret=True)
  assert pallas_hopper.supported(x, kw, interpret=True)
  if jax.devices()[0].platform == "cpu":
    assert not pallas_tpu.supported(x, q) and not pallas_hopper.supported(x, kw)
  assert xla_int4.supported(x, kw)
  assert not pallas_hopper.supported(jax.ShapeDtypeStruct((2, 512), jnp.float32), kw, interpret=True)
  odd_n = jax.eval_shape(lambda: to_kernel_layout(quantize(jnp.ones((512, 200)), QSpec(group_size=128))))
  assert not pallas_hopper.supported(x, odd_n, interpret=True)
  partial = jax.eval_shape(lambda: quantize(jnp.ones((80, 8)), QSpec(group_size=32, partial_groups=True)))
  assert not pallas_portable.supported(jax.ShapeDtypeStruct((1, 80), jnp.float32), partial)


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="checks the CPU dispatch")
def test_dispatch_on_cpu():
  q = jax.eval_shape(lambda: quantize(jnp.ones((512, 256)), QSpec(group_size=128)))
  x = jax.ShapeDtypeStruct((4, 512), jnp.bfloat16)
  assert choose_backend(x, q) == "reference"  # Pallas only interprets on CPU
  assert choose_backend(x, q, "portable", interpret=True) == "portable"
  assert choose_backend(x, q, "tpu", interpret=True) == "tpu"
  assert choose_backend(x, q, "hopper") == "reference"  # no sm90 GPU: falls back
  assert choose_backend(x, jax.eval_shape(to_kernel_layout, q)) == "xla"
  q3 = jax.eval_shape(lambda: quantize(jnp.ones((512, 256)), QSpec(bits=3, group_size=128)))
  assert choose_backend(x, q3, "portable", interpret=True) == "reference"


def test_qmatmul_through_every_cpu_path():
  x, q = PORTABLE["b2x3_g128_asym_bf16_actorder"].make(7)
  ref = qmatmul_reference(x, q)
  assert_close(qmatmul(x, q), ref, x.dtype)
  assert_close(qmatmul(x, to_kernel_layout(q)), ref, x.dtype)
  for backend in ("portable", "tpu", "xla"):
    with qmatmul_mode(backend, interpret=True):
      assert_close(jax.jit(qmatmul)(x, q), ref, x.dtype)
  with pytest.raises(ValueError, match="backend in"):
    qmatmul_mode("triton").__enter__()
  with pytest.raises(TypeError, match="config for backend 'tpu'"):
    qmatmul_mode("tpu", config=SMALL_PORTABLE).__enter__()


@pytest.mark.parametrize(
  "interpret,stale", [(True, False), (pltpu.InterpretParams(uninitialized_memory="nan"), True)], ids=["hlo", "tpu"]
)
def test_unwritten_tile_is_detected(interpret, stale):
  """The premise of the poisoning check: a tile no program writes cannot come out right.

  The HLO interpreter leaves it NaN. TPU interpret mode, like a TPU, copies the output
  block buffer back whether or not it was written, so the tile holds the previous block's
  values (the first block's buffer starts NaN).
  """

  def first_tile_only(o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = jnp.ones_like(o_ref)

  out = pl.pallas_call(
    first_tile_only,
    out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
    grid=(2,),
    out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
    interpret=interpret,
  )()
  written, unwritten = np.asarray(out[:8]), np.asarray(out[8:])
  assert np.all(written == 1)
  assert np.all(unwritten == written) if stale else np.all(np.isnan(unwritten))
