"""`qjax plan`: a run's cost forecast from config.json alone, checked against published sizes and a measured run."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from qjax.cli import plan
from qjax.cli import quantize as q
from qjax.cli.estimate import estimate
from qjax.core import InputError

ROOT = pathlib.Path(__file__).parents[2]
CONFIGS = ROOT / "tests" / "data" / "configs"
SCALE = ROOT / "experiments" / "scale.json"
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "qwen3-30b-a3b")
# A fixed machine, so that no test measures this one (other work shares it).
CPU = plan.cpu(gflops=150.0, memory_gb_per_s=10.0, memory_bytes=128e9)
CALIBRATION = q.Settings(nsamples=128, seqlen=2048, eval_windows=0)


def model(name: str) -> plan.Model:
  return plan.read_model(str(CONFIGS / f"{name}.json"))


def forecast(name: str, devices: str, s: q.Settings = CALIBRATION, **kwargs) -> plan.Forecast:
  count, device = plan.parse_devices(devices) if devices != "cpu" else (1, CPU)
  return plan.forecast(model(name), s, device=device, devices=count, **kwargs)


@pytest.mark.parametrize(
  "name, params",
  [("llama-3.1-8b", 8.03e9), ("llama-3.1-70b", 70.55e9), ("qwen3-30b-a3b", 30.53e9)],
)
def test_configs_have_the_published_parameter_counts(name, params):
  sizes = plan.estimate_sizes(model(name).config)
  assert sizes.linear_params + sizes.other_params == pytest.approx(params, rel=2e-3)
  assert model(name).dtype_bytes == 2  # bfloat16 checkpoints


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("devices", ["8xH100", "4xH200", "v5p-16", "cpu"])
def test_plan_forecasts_every_config_on_every_device(name, devices):
  f = forecast(name, devices)
  assert f.seconds > 0 and f.calibration_flops > 0 and f.rounding_flops > 0
  assert 0 < f.peak_bytes <= f.device.memory_bytes * f.device.usable
  assert {"read", "forward", "statistics", "round"} <= {s.name for s in f.stages}
  text = plan.report(f)
  assert "peak memory per device" in text and "gguf Q4_K_M" in text and "gptq" in text


def test_a_larger_model_needs_more_memory_and_time():
  small, large = forecast("llama-3.1-8b", "8xH100"), forecast("llama-3.1-70b", "8xH100")
  assert large.peak_bytes > small.peak_bytes
  assert large.seconds > small.seconds
  assert large.calibration_flops > 5 * small.calibration_flops


def test_more_devices_lower_the_memory_and_time_per_device():
  one, two, eight = (forecast("llama-3.1-8b", f"{n}xH200") for n in (1, 2, 8))
  assert one.peak_bytes > two.peak_bytes > eight.peak_bytes
  assert one.seconds > two.seconds > eight.seconds
  assert one.memory.block == eight.memory.block  # the block is replicated, the windows split


def test_gguf_and_gptq_sizes_match_published_files():
  sizes = forecast("llama-3.1-8b", "1xH200").sizes
  # Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf as llama.cpp writes it: 4.92 GB.
  assert sizes["gguf Q4_K_M"] == pytest.approx(4.92e9, rel=0.02)
  # 4-bit GPTQ checkpoints of Llama 3.1 8B in groups of 128 (e.g. hugging-quants' GPTQ-INT4): 5.73 GB.
  assert sizes["gptq"] == pytest.approx(5.73e9, rel=0.03)
  assert sizes["compressed-tensors"] < sizes["gptq"]  # no g_idx, no zero points when symmetric
  # bartowski/Meta-Llama-3.1-70B-Instruct-GGUF's Q4_K_M file: 42.52 GB.
  assert forecast("llama-3.1-70b", "8xH100").sizes["gguf Q4_K_M"] == pytest.approx(42.52e9, rel=0.005)


@pytest.mark.parametrize("gguf_type, published", [("Q8_0", 32.48e9), ("Q6_K", 25.10e9), ("Q5_K_M", 21.74e9)])
def test_moe_gguf_sizes_match_published_files(gguf_type, published):
  """bartowski/Qwen_Qwen3-30B-A3B-GGUF's files (llama.cpp b5200): every expert stored, routers in F32."""
  sizes = plan.output_sizes(model("qwen3-30b-a3b").config, q.settings_spec(CALIBRATION), gguf_type)
  assert sizes[f"gguf {gguf_type}"] == pytest.approx(published, rel=0.005)


def test_refuses_what_does_not_fit_naming_the_flag():
  small = plan.cpu(gflops=150.0, memory_gb_per_s=10.0, memory_bytes=8e9)
  with pytest.raises(InputError, match=r"--devices=1xcpu: the block, .* and head need [\d.]+ GiB .* more than cpu"):
    plan.forecast(model("llama-3.1-70b"), CALIBRATION, device=small)
  with pytest.raises(InputError, match=r"--devices=1xH100: calibration needs .* use 2 or more devices"):
    forecast("llama-3.1-70b", "1xH100")
  with pytest.raises(InputError, match=r"--eval_windows=16"):
    forecast("llama-3.1-70b", "8xH100", dataclasses.replace(CALIBRATION, eval_windows=16))
  with pytest.raises(InputError, match=r"--batch_size=8 must be a multiple of the 16 devices"):
    forecast("llama-3.1-8b", "v5e-16")


def test_parse_devices():
  assert plan.parse_devices("8xH100") == (8, plan.DEVICES["H100"])
  assert plan.parse_devices("A100") == (1, plan.DEVICES["A100-80GB"])
  assert plan.parse_devices("v5e-16") == (16, plan.DEVICES["v5e"])
  assert plan.parse_devices("v5p-8") == (4, plan.DEVICES["v5p"])  # TensorCores: two a chip
  with pytest.raises(InputError, match="--devices=8xB300: unknown device"):
    plan.parse_devices("8xB300")


def test_settings_from_args_reads_quantize_flags():
  s = plan.settings_from_args(["--model=/tmp/llama8b", "--method=rtn", "--nsamples=8", "--nosym", "--bits=3"])
  assert (s.method, s.nsamples, s.sym, s.bits) == ("rtn", 8, False, 3)


def test_on_this_machine_the_plan_is_quantizes_own_estimate():
  """plan splits `estimate`'s work over stages; with fast memory and disk its compute stages add up to it."""
  s = dataclasses.replace(CALIBRATION, nsamples=8, seqlen=256)
  m = model("llama-3.1-8b")
  f = plan.forecast(m, s, device=plan.cpu(gflops=150.0, memory_gb_per_s=1e6), disk_gb_per_s=1e6)
  e = estimate(m.config, q.plan(s, m.config).recipe, calibration_tokens=8 * 256, seqlen=256,
               batch_size=s.batch_size, eval_windows=0, gflops_per_second=150.0, memory_gb_per_s=1e6)  # fmt: skip
  compute = sum(st.seconds for st in f.stages if st.name not in ("read", "write"))
  assert compute == pytest.approx(e.quantize_seconds, rel=1e-3)


def test_the_command_prints_a_plan():
  result = subprocess.run(
    [sys.executable, "-c", "from qjax.cli import run; run()", "plan", f"--config={CONFIGS / 'qwen3-30b-a3b.json'}",
     "--devices=4xH100", "--eval_windows=0", "--export=gguf:Q4_K_M", "--method=none"],
    capture_output=True, text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert "128 experts" in result.stdout and "<- --export" in result.stdout


def test_plan_matches_the_run_measured_here():
  """experiments/scale.json (scripts/bench_scale.py): `qjax quantize` runs of the Llama-3.1-8B-shaped model on this
  machine. The plan at the machine's recorded rates must be within 30% of each run's time, and its memory between
  30% below and 50% above the peak RSS (a plan may err on the safe side, not by double)."""
  if not SCALE.exists():
    pytest.fail(f"{SCALE} is missing: run scripts/bench_scale.py to measure the runs this test checks.")
  scale = json.loads(SCALE.read_text())
  machine = scale["machine"]
  device = plan.cpu(gflops=machine["gflops_f32"], memory_gb_per_s=machine["memory_gb_per_s"])
  measured = plan.read_model(str(ROOT / scale["config"]))  # tests/data/configs/llama-3.1-8b.json
  off = {}
  for name, run in scale["runs"].items():
    f = plan.forecast(measured, plan.settings_from_args(run["argv"]), device=device,
                      disk_gb_per_s=machine["disk_gb_per_s"])  # fmt: skip
    time_off = f.seconds / run["seconds"] - 1
    # A run's peak measured again after the code changed (on fewer blocks of the same shapes: the same peak).
    peak = run.get("peak_rss_bytes_current_code", run["peak_rss_bytes"])
    memory_off = f.peak_bytes / peak - 1
    off[name] = (round(time_off, 3), round(memory_off, 3))
    assert abs(time_off) <= 0.30, (name, f.seconds, run["seconds"], off)
    assert -0.30 <= memory_off <= 0.5, (name, f.peak_bytes, peak, off)
  print("plan / measured - 1 (time, memory):", off)
