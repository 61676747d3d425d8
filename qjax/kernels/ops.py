"""Public quantized ops: choose a kernel by platform and shape, else the XLA path or the reference.

`qmatmul(x, q)` picks, at trace time:

* ``"hopper"``: on an sm90 GPU, bfloat16/float16 activations, shapes `pallas_hopper`
  supports (n a multiple of 128; groups of 32, 64, 128 or per channel);
* ``"tpu"``: on a TPU, shapes `pallas_tpu` supports;
* ``"xla"``: other 4-bit packed weights on GPU/TPU, and kernel-layout weights anywhere: native
  int4 codes dequantized and multiplied by XLA (`xla_int4`);
* ``"reference"``: everything else (other bit widths, ggml layouts, a shorter last group,
  and every weight on CPU, where Pallas only interprets).

`qmatmul_mode` forces a backend for the calls traced inside it, optionally in interpret
mode, which is how the tests run the kernel path on CPU. Each choice is logged once.

The Hopper kernel and the XLA path read the kernel layout: a ``packed`` `QArray` given to
them is converted on every call (an extra pass over the codes), so convert the params
once with `to_kernel_layout_params` when serving on GPU.
"""

import contextlib
import contextvars
import dataclasses
from typing import Literal, get_args

from absl import logging
from jaxtyping import Array, Float

from qjax.core import QArray
from qjax.kernels.qmatmul import common, pallas_hopper, pallas_portable, pallas_tpu, xla_int4
from qjax.kernels.qmatmul.layout import from_kernel_layout, is_kernel_layout, to_kernel_layout
from qjax.kernels.qmatmul.reference import qmatmul_reference

Backend = Literal["auto", "reference", "xla", "portable", "tpu", "hopper"]
BACKENDS = get_args(Backend)
Config = pallas_portable.PortableConfig | pallas_tpu.TpuConfig | pallas_hopper.HopperConfig


@dataclasses.dataclass(frozen=True)
class _Mode:
  backend: Backend = "auto"
  interpret: bool = False
  config: Config | None = None


_AUTO = _Mode()
_CONFIG_TYPES = {
  "portable": pallas_portable.PortableConfig,
  "tpu": pallas_tpu.TpuConfig,
  "hopper": pallas_hopper.HopperConfig,
}
_MODE: contextvars.ContextVar[_Mode | None] = contextvars.ContextVar("qmatmul_mode", default=None)
_LOGGED: set[tuple[str, str, str]] = set()


@contextlib.contextmanager
def qmatmul_mode(backend: Backend = "auto", *, interpret: bool = False, config: Config | None = None):
  """Forces the `qmatmul` backend for calls traced inside the block.

  A forced backend that does not support a call falls back as ``"auto"`` would (and logs
  why). The mode is read when a function is traced: a function already jitted outside the
  block keeps its path, so re-trace (``jax.clear_caches()``) to switch.

  Args:
    backend: one of `BACKENDS`.
    interpret: run Pallas backends in interpret mode (CPU): ``interpret=True`` for
      ``"portable"``, `pltpu.InterpretParams` for ``"tpu"``, `plgpu.InterpretGPUParams` for
      ``"hopper"``.
    config: tiling for the forced Pallas backend (its `PortableConfig`, `TpuConfig` or
      `HopperConfig`); None uses the tuned table or the defaults. Interpret mode runs
      fastest with one block per call.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qjax.core import QSpec, quantize
    >>> q = quantize(jnp.ones((64, 16)), QSpec(group_size=32))
    >>> with qmatmul_mode("portable", interpret=True):
    ...   y = qmatmul(jnp.ones((2, 64)), q)
    >>> y.shape
    (2, 16)
  """
  if backend not in BACKENDS:
    raise ValueError(f"`qmatmul_mode` expected backend in {BACKENDS}, got {backend!r}.")
  if config is not None and not isinstance(config, _CONFIG_TYPES.get(backend, ())):
    raise TypeError(f"`qmatmul_mode` expected a config for backend {backend!r}, got {type(config).__name__}.")
  token = _MODE.set(_Mode(backend, interpret, config))
  try:
    yield
  finally:
    _MODE.reset(token)


def _unsupported(backend: str, x, q, interpret: bool, config: Config | None = None) -> str | None:
  """Why `backend` cannot run ``x @ q`` (None if it can)."""
  match backend:
    case "reference":
      return None
    case "xla":
      return common.packed_int4_reason(q) or common.activation_reason(x, q.canonical_shape[0])
    case "portable":
      return pallas_portable.unsupported_reason(x, q, config=config)
    case "tpu":
      return pallas_tpu.unsupported_reason(x, q, config=config, interpret=interpret)
    case "hopper":
      return pallas_hopper.unsupported_reason(x, q, config=config, interpret=interpret)
  raise ValueError(f"unknown backend {backend!r}")


def _auto(x, q) -> str:
  platform = common.target_device().platform
  if platform == "gpu" and _unsupported("hopper", x, q, False) is None:
    return "hopper"
  if platform == "tpu" and _unsupported("tpu", x, q, False) is None:
    return "tpu"
  if is_kernel_layout(q) or (platform in ("gpu", "tpu") and _unsupported("xla", x, q, False) is None):
    return "xla"
  return "reference"


def choose_backend(
  x, q: QArray, backend: Backend = "auto", *, interpret: bool = False, config: Config | None = None
) -> str:
  """The backend `qmatmul` runs for these shapes under `qmatmul_mode(backend, interpret=...)`.

  Accepts `jax.ShapeDtypeStruct` leaves. Logs the choice (and why a forced backend fell
  back) once per backend, shape and spec.
  """
  reason = _unsupported(backend, x, q, interpret, config) if backend != "auto" else None
  chosen = backend if backend != "auto" and reason is None else _auto(x, q)
  key = (chosen, f"{tuple(x.shape)} {x.dtype} x {type(q).__name__}{q.canonical_shape} {q.spec}", backend)
  if key not in _LOGGED:
    _LOGGED.add(key)
    why = f" ({backend!r} unsupported: {reason})" if reason else ""
    logging.info("qmatmul: %s for %s%s", chosen, key[1], why)
  return chosen


def qmatmul(x: Float[Array, "... k"], q: QArray) -> Float[Array, "... n"]:
  """``x @ W`` for a quantized ``W`` (canonical (k, n)), by the backend `choose_backend` picks.

  Args:
    x: (..., k) float32|bfloat16|float16 activations.
    q: a `QArray` (any layout).

  Returns:
    (..., n) in `x.dtype`, accumulated in float32 (see `qmatmul_reference` for the contract).
  """
  mode = _MODE.get() or _AUTO
  backend = choose_backend(x, q, mode.backend, interpret=mode.interpret, config=mode.config)
  config = mode.config if backend == mode.backend else None
  match backend:
    case "hopper":
      w = to_kernel_layout(q)
      return pallas_hopper.qmatmul_hopper(x, w, config=config, interpret=mode.interpret)
    case "xla":
      return xla_int4.qmatmul_xla_int4(x, to_kernel_layout(q))
  q = from_kernel_layout(q)
  match backend:
    case "tpu":
      return pallas_tpu.qmatmul_tpu(x, q, config=config, interpret=mode.interpret)
    case "portable":
      return pallas_portable.qmatmul_portable(x, q, config=config, interpret=mode.interpret)
  return qmatmul_reference(x, q)
