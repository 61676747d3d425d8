"""`scripts/bench_kernels.py --smoke` runs end to end on CPU (the GPU-only variants skip themselves)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_smoke(tmp_path):
  out = tmp_path / "rows.json"
  command = [sys.executable, os.path.join(ROOT, "scripts", "bench_kernels.py"), "--smoke", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "xla_int4 us" in run.stdout and "FAIL" not in run.stdout
  assert '"device_kind": "cpu"' in out.read_text()
