"""The linear layer every model part uses: a kernel ``[in, out]`` that may be a `QArray`."""

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from qjax.core import QArray, is_qarray
from qjax.kernels import qmatmul


def stored_param(module: nn.Module, name: str, shape: tuple[int, ...], init, dtype) -> Array | QArray:
  # `self.param` would compare a stored QArray's leaves with the dense init shape; a
  # stored value is used as is, dense or quantized.
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, shape, dtype)


class Linear(nn.Module):
  """``y = x @ kernel (+ bias)`` where the kernel ``[in, out]`` may be a `QArray`."""

  features: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
    kernel = stored_param(self, "kernel", (x.shape[-1], self.features), nn.initializers.normal(0.02), self.dtype)
    if is_qarray(kernel):
      y = qmatmul(x, kernel)
    else:
      y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
      y = y + jnp.broadcast_to(bias.astype(y.dtype), y.shape)
    return y
