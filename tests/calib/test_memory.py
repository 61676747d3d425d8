"""Peak memory of a quantize run grows with one block, not with the model: measured with twice the layers, the
output written as each block is finished (`qjax.formats.shards`)."""

import os
import subprocess
import sys

import pytest

from tests.model_factory import write_random_llama

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


@pytest.mark.slow
def test_peak_memory_grows_by_a_block_not_by_the_model(tmp_path):
  shape = dict(hidden=1024, intermediate=2048, heads=8, kv_heads=2, tie=True)
  small = write_random_llama(str(tmp_path / "l4"), layers=4, **shape)
  large = write_random_llama(str(tmp_path / "l8"), layers=8, **shape)
  block_bytes = 4 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 2048)  # float32 params of one block (34 MB)
  grown = peak_bytes(large) - peak_bytes(small)
  # Four more float blocks would add 4 * block_bytes if the model were held whole, and holding the quantized model
  # and its exported tensors about 1.5 * block_bytes (each block a seventh of its float size, twice or thrice);
  # streamed, nothing but noise.
  assert grown < 0.75 * block_bytes, (grown / 2**20, block_bytes / 2**20)
