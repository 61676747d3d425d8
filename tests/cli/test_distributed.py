"""`qjax quantize --distributed`: two JAX processes on localhost (CPU collectives over gloo) write the bytes that one
process with two devices writes (the same global mesh, so the same XLA program), and a run stopped after a block
resumes across two processes to those bytes again."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `qjax quantize` with its flags; a first argument >= 0 stops the run after that many blocks were checkpointed
# (the runner's testing hook raises `Interrupted`), as a kill would.
LAUNCH = """
import functools, sys
from qjax.calib.runner import RunnerOptions
from qjax.cli import quantize, run
if int(sys.argv[1]) >= 0:
  quantize.RunnerOptions = functools.partial(RunnerOptions, stop_after_block=int(sys.argv[1]))
run(["qjax", "quantize", *sys.argv[2:]])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(flags: list[str], *, processes: int, devices: int = 1, stop: int = -1) -> list[subprocess.CompletedProcess]:
  """`qjax quantize` as `processes` JAX processes of `devices` CPU devices each; their results, once all ended."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if processes > 1:
    address = f"localhost:{_free_port()}"
    flags = [*flags, "--distributed", f"--coordinator_address={address}", f"--num_processes={processes}"]
  commands = [[sys.executable, "-c", LAUNCH, str(stop), *flags] + ([f"--process_id={i}"] if processes > 1 else [])
              for i in range(processes)]  # fmt: skip
  running = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]  # fmt: skip
  try:
    outputs = [p.communicate(timeout=300)[0] for p in running]
    return [subprocess.CompletedProcess(c, p.returncode, o) for c, p, o in zip(commands, running, outputs, strict=True)]
  finally:  # a process left waiting for one that failed
    for p in running:
      if p.poll() is None:
        p.kill()


def _files(directory) -> dict[str, bytes]:
  """Every file of an output but its report (which holds timings)."""
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "report.json"}


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one_and_resume_across_processes(model_dir, tmp_path):
  # The same command line each time (settings are recorded in config.json); each output is then moved aside.
  out = tmp_path / "out"
  flags = [f"--model={model_dir}", "--method=gptq", "--bits=4", "--group_size=32", "--nsamples=4", "--seqlen=32",
           "--batch_size=2", "--eval_windows=0", f"--out={out}"]  # fmt: skip

  def quantize(name: str, **how) -> tuple[list[subprocess.CompletedProcess], dict[str, bytes]]:
    """Launches, checks that every process succeeded, and moves the output aside to `name`."""
    results = _launch(flags, **how)
    for p in results:
      assert p.returncode == 0, p.stdout[-3000:]
    assert not os.path.exists(f"{out}.checkpoint")  # removed once, after success
    return results, _files(out.rename(tmp_path / name))

  _, expected = quantize("one", processes=1, devices=2)
  assert "model.safetensors" in expected
  _, two = quantize("two", processes=2)
  assert two == expected

  for p in _launch(flags, processes=2, stop=1):
    assert p.returncode != 0 and "stopped before block 1" in p.stdout, p.stdout[-3000:]
  assert not out.exists() and os.path.isdir(f"{out}.checkpoint")
  resumed, files = quantize("resumed", processes=2)
  assert "block (resumed after 1)" in resumed[0].stdout  # process 0 shows the progress
  # The model's files; the plot of rounding errors shows only the blocks this run quantized, as with one process.
  del files["errors.png"], expected["errors.png"]
  assert files == expected
