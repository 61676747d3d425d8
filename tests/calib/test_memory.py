"""Peak memory of a quantize run grows with one block, not with the model: measured with twice the layers, the
output written as each block is finished (`qjax.formats.shards`)."""

import os
import subprocess
import sys

import pytest

from tests.model_factory import write_random_llama, write_random_moe

PROBE = """
import resource, sys
from qjax.cli.quantize import Settings, run
s = Settings(model=sys.argv[1], method="gptq", group_size=128, nsamples=2, seqlen=32, batch_size=2, eval_windows=0,
             export="gptq", out=sys.argv[1] + "-gptq")
run(s, show_progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_bytes(model_dir: str) -> int:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
    [sys.executable, "-c", PROBE, model_dir], capture_output=True, text=True, check=False, cwd=root,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  return int(result.stdout.strip().splitlines()[-1])


# Per model: how to write it, and the float32 bytes of one of its blocks (the parameters the runner holds).
MODELS = {
  "llama": (
    lambda path, layers: write_random_llama(path, layers=layers, hidden=1024, intermediate=2048, heads=8, kv_heads=2,
                                            tie=True),
    4 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2048),  # 34 MB
  ),
  # A block's experts stream from the checkpoint like dense weights: 8 experts of 3 (512, 1024) matrices each.
  "mixtral": (
    lambda path, layers: write_random_moe(path, family="Mixtral", layers=layers, hidden=512, intermediate=1024,
                                          heads=8, kv_heads=2, tie=True, num_local_experts=8, num_experts_per_tok=2),
    4 * (2 * 512 * 512 + 2 * 512 * 128 + 8 * 3 * 512 * 1024 + 8 * 512),  # 52 MB
  ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MODELS))
def test_peak_memory_grows_by_a_block_not_by_the_model(tmp_path, family):
  write, block_bytes = MODELS[family]
  small, large = write(str(tmp_path / "l4"), 4), write(str(tmp_path / "l8"), 8)
  grown = peak_bytes(large) - peak_bytes(small)
  # Four more float blocks would add 4 * block_bytes if the model were held whole, and holding the quantized model
  # and its exported tensors about 1.5 * block_bytes (each block a seventh of its float size, twice or thrice);
  # streamed, nothing but noise.
  assert grown < 0.75 * block_bytes, (grown / 2**20, block_bytes / 2**20)
