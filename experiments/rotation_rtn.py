"""Why a rotation hurts round-to-nearest on the default model: its RMSNorm weights, and the weights RTN rounds.

  .venv/bin/python experiments/rotation_rtn.py

Per decoder layer: the spread of ``input_layernorm``'s weight γ, and the relative error
``‖Ŵ - W‖ / ‖W‖`` of 3-bit RTN (groups of 128, zero point) on q_proj's kernel as each model
rounds it. Unrotated, RTN rounds ``W`` and γ scales the activations; rotated
(`qjax.transforms.equivalence.rotate_stream`), it rounds ``Rᵀ diag(γ) W``. The ``diag(γ) W`` column is the same
matrix before the rotation, so the last two columns isolate what the rotation does.
"""

import numpy as np
from absl import app

from qjax.core import QSpec, dequantize
from qjax.core.tree import get_path, nest
from qjax.formats import open_checkpoint
from qjax.models.blocks import residual_stream
from qjax.quantizers import rtn_quantize
from qjax.quantizers.rotation import random_rotation
from qjax.transforms.equivalence import rotate_stream

SPEC = QSpec(bits=3, group_size=128, symmetric=False, partial_groups=True)


def relative_rtn_error(w: np.ndarray) -> float:
  w = np.asarray(w, np.float32)
  return float(np.linalg.norm(np.asarray(dequantize(rtn_quantize(w, spec=SPEC))) - w) / np.linalg.norm(w))


def main(argv):
  del argv
  checkpoint = open_checkpoint("default")
  r = random_rotation(checkpoint.config.hidden_size, seed=0)
  print("layer  γ median  γ max   RTN error of q_proj:  W    diag(γ)W   Rᵀdiag(γ)W")
  for i in range(checkpoint.config.num_hidden_layers):
    layer = checkpoint.layer_params(i)
    gamma = np.asarray(layer["input_layernorm"]["scale"], np.float64)
    w = np.asarray(layer["self_attn"]["q_proj"]["kernel"], np.float64)
    block = nest(f"model/layers_{i}", layer)
    rotated = get_path(rotate_stream(block, residual_stream(block), r), f"model/layers_{i}/self_attn/q_proj/kernel")
    errors = [relative_rtn_error(m) for m in (w, gamma[:, None] * w, rotated)]
    print(f"{i:5d}  {np.median(gamma):8.3f}  {gamma.max():5.2f}  " + "  ".join(f"{e:9.3f}" for e in errors))


if __name__ == "__main__":
  app.run(main)
