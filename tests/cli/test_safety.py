"""Nothing lost: every way `qjax quantize` and `qjax convert` could delete, overwrite or half-write files.

Each data-loss case runs in a temporary directory holding marker files that must survive.
"""

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from qjax.calib import RunnerOptions, quantize_blocks
from qjax.cli.quantize import Settings, run
from qjax.core import InputError
from qjax.formats import convert_model, parse_target
from qjax.formats.output import MARKER, TMP_PREFIX, atomic_directory
from qjax.models import LlamaBlocks, SafetensorsCheckpoint
from tests.model_factory import random_windows, write_random_llama, write_random_moe


def _settings(model_dir, out, **kw):
  return Settings(**{**dict(model=model_dir, nsamples=2, seqlen=16, eval_windows=0, batch_size=2, out=out), **kw})


def _mine(directory) -> dict[str, str]:
  """A user's directory with two files of theirs."""
  os.makedirs(directory, exist_ok=True)
  files = {"notes.txt": "my notes", "data.bin": "precious"}
  for name, text in files.items():
    with open(os.path.join(directory, name), "w") as f:
      f.write(text)
  return files


def _intact(directory, files) -> bool:
  return all(pathlib.Path(directory, n).read_text() == t for n, t in files.items())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_an_out_directory_of_someone_elses_files_is_refused_and_kept(model_dir, tmp_path, method):
  out = str(tmp_path / "mine")
  files = _mine(out)
  with pytest.raises(InputError, match="holds files qjax did not write"):
    run(_settings(model_dir, out, method=method), show_progress=False)
  assert _intact(out, files) and sorted(os.listdir(out)) == sorted(files)
  assert not os.path.exists(out + ".checkpoint")


def test_out_dot_is_refused_without_emptying_the_directory(model_dir, tmp_path, monkeypatch):
  files = _mine(tmp_path)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(InputError, match="holds files qjax did not write"):
    run(_settings(model_dir, ".", method="rtn"), show_progress=False)
  assert _intact(tmp_path, files)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_at_or_inside_the_model_is_refused(model_dir, where):
  before = sorted(os.listdir(model_dir))
  out = model_dir if where == "same" else os.path.join(model_dir, "quantized")
  with pytest.raises(InputError, match=r"the output (is|is inside) the input"):
    run(_settings(model_dir, out, method="rtn"), show_progress=False)
  assert sorted(os.listdir(model_dir)) == before


def test_previous_outputs_same_kind_replaced_other_kind_needs_overwrite(model_dir, tmp_path):
  out = str(tmp_path / "q")
  run(_settings(model_dir, out, method="rtn"), show_progress=False)
  run(_settings(model_dir, out, method="rtn", group_size=64), show_progress=False)  # same kind: replaced
  assert json.loads(pathlib.Path(out, "config.json").read_text())["qjax"]["settings"]["group_size"] == 64
  with pytest.raises(InputError, match="previous qjax qjax output; pass --overwrite"):
    run(_settings(model_dir, out, method="rtn", export="gptq", group_size=32), show_progress=False)
  run(_settings(model_dir, out, method="rtn", export="gptq", group_size=32, overwrite=True), show_progress=False)
  assert json.loads(pathlib.Path(out, MARKER).read_text())["kind"] == "gptq"
  assert not [e for e in os.listdir(tmp_path) if e.startswith(".qjax-")]


def test_an_out_that_is_a_file_or_under_a_file_is_refused_before_any_work(model_dir, tmp_path):
  path = tmp_path / "file"
  path.write_text("mine")
  for out in (str(path), str(path / "model")):
    with pytest.raises(InputError, match="not a directory"):
      run(_settings(model_dir, out, method="gptq"), show_progress=False)
  assert not os.path.exists(str(path) + ".checkpoint")
  assert path.read_text() == "mine" and not os.path.exists(str(path) + ".checkpoint")


def test_a_bad_eval_text_is_found_before_quantizing(model_dir, tmp_path):
  out = str(tmp_path / "q")
  with pytest.raises(FileNotFoundError, match="no-such-text"):
    run(_settings(model_dir, out, method="gptq", eval_windows=2, eval_text=str(tmp_path / "no-such-text")),
        show_progress=False)  # fmt: skip
  assert not os.path.exists(out) and not os.path.exists(out + ".checkpoint")


def test_a_users_checkpoint_dir_is_never_deleted(model_dir, tmp_path):
  ckpt = str(tmp_path / "mine")
  files = _mine(ckpt)
  # rtn needs no checkpoints: the directory is neither used nor removed.
  run(_settings(model_dir, str(tmp_path / "rtn"), method="rtn", checkpoint_dir=ckpt), show_progress=False)
  assert _intact(ckpt, files)
  with pytest.raises(InputError, match="not a qjax checkpoint"):
    run(_settings(model_dir, str(tmp_path / "gptq"), method="gptq", checkpoint_dir=ckpt), show_progress=False)
  assert _intact(ckpt, files) and not os.path.exists(tmp_path / "gptq")
  empty = tmp_path / "empty"
  empty.mkdir()
  run(_settings(model_dir, str(tmp_path / "gptq"), method="gptq", checkpoint_dir=str(empty)), show_progress=False)
  assert empty.is_dir() and not os.listdir(empty)  # qjax's checkpoints removed, the user's directory kept


def test_the_runner_refuses_a_directory_that_is_not_its_checkpoint(model_dir, tmp_path):
  files = _mine(tmp_path / "ckpt")
  options = RunnerOptions(batch_size=2, show_progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
  with pytest.raises(InputError, match="not a qjax checkpoint"):
    quantize_blocks(LlamaBlocks(SafetensorsCheckpoint(model_dir)), [], random_windows(2, 16), options=options)
  assert _intact(tmp_path / "ckpt", files)


def test_a_killed_writes_leftovers_are_removed_by_the_next_write_and_only_those(tmp_path):
  out = str(tmp_path / "out")
  stale = tmp_path / f"{TMP_PREFIX}out-abc123"
  stale.mkdir()
  (stale / ".qjax_partial.json").write_text(json.dumps({"out": os.path.realpath(out)}))
  (stale / "model.safetensors").write_bytes(b"\0" * 1024)
  foreign = tmp_path / f"{TMP_PREFIX}out-mine"  # same prefix, no marker: not ours
  foreign.mkdir()
  with atomic_directory(out, "qjax") as tmp:
    open(os.path.join(tmp, "x"), "w").close()
  assert not stale.exists() and foreign.exists()
  assert sorted(os.listdir(out)) == sorted(["x", MARKER])


def test_a_full_disk_during_export_leaves_no_output(model_dir, tmp_path, monkeypatch):
  from qjax.formats import shards

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(shards, "write_safetensors", full)
  for export in (None, "gptq"):
    out = str(tmp_path / f"q-{export}")
    with pytest.raises(OSError, match="No space left"):
      run(_settings(model_dir, out, method="rtn", export=export, group_size=32), show_progress=False)
    assert not os.path.exists(out)
  import gguf

  monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
  out = str(tmp_path / "gguf")
  with pytest.raises(OSError, match="No space left"):
    run(_settings(model_dir, out, method="none", export="gguf:Q8_0"), show_progress=False)
  assert not os.path.exists(out) and not [e for e in os.listdir(tmp_path) if e.startswith(".qjax-")]


def test_convert_never_replaces_what_qjax_did_not_write(model_dir, tmp_path):
  source = str(tmp_path / "gptq")
  run(_settings(model_dir, source, method="rtn", export="gptq", group_size=32), show_progress=False)
  mine = tmp_path / "mine.gguf"
  mine.write_text("not a model")
  with pytest.raises(InputError, match="qjax did not write it"):
    convert_model(source, parse_target("gguf:Q4_0"), str(mine))
  assert mine.read_text() == "not a model"
  folder = str(tmp_path / "folder")
  files = _mine(folder)
  with pytest.raises(InputError, match="holds files qjax did not write"):
    convert_model(source, parse_target("awq"), folder)
  assert _intact(folder, files)
  out = str(tmp_path / "m.gguf")
  convert_model(source, parse_target("gguf:Q4_0"), out)
  with pytest.raises(InputError, match="pass --overwrite"):
    convert_model(source, parse_target("gguf:Q4_0"), out)
  convert_model(source, parse_target("gguf:Q4_0"), out, overwrite=True)
  with pytest.raises(InputError, match="the input"):
    convert_model(source, parse_target("awq"), source, overwrite=True)


def _cli(*args, **kwargs):
  # Python keeps SIGINT ignored if its parent ignored it (as pytest started in the background by a shell does);
  # the child installs the usual KeyboardInterrupt handler so that Ctrl-C is tested as a terminal delivers it.
  main = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from qjax.cli import run; run()"
  return subprocess.Popen(
    [sys.executable, "-c", main, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kwargs,
  )  # fmt: skip


def test_ctrl_c_is_one_line_saying_where_the_checkpoint_is(tmp_path):
  model_dir = write_random_llama(str(tmp_path / "model"), layers=8, hidden=128, intermediate=256)
  out = str(tmp_path / "q")
  proc = _cli("quantize", f"--model={model_dir}", "--nsamples=8", "--seqlen=64", "--batch_size=2", "--eval_windows=0",
              f"--out={out}")  # fmt: skip
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(out + ".checkpoint/blocks"):
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  assert proc.returncode == 130, stderr[-2000:]
  assert "Traceback" not in stderr
  expected = f"interrupted; finished blocks are checkpointed in {out}.checkpoint; rerun the same command to resume."
  assert lines[-1] == f"qjax quantize: {expected}"
  assert not os.path.exists(out)


def test_the_same_command_twice_gives_identical_bytes(model_dir, tmp_path):
  from safetensors import safe_open

  outs = [str(tmp_path / f"run{i}") for i in range(2)]
  for out in outs:
    run(_settings(model_dir, out, method="gptq", desc_act=True, nsamples=4, seqlen=32), show_progress=False)
  loaded = []
  for out in outs:
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
      loaded.append({k: f.get_tensor(k).tobytes() for k in f.keys()})
  assert loaded[0] == loaded[1]


def test_a_ctrl_c_python_would_drop_is_delivered_again(monkeypatch):
  """Inside JAX's garbage-collection callback an exception is printed and dropped: the handler re-sends the signal."""
  import types

  from qjax.cli import on_sigint

  sent = []
  monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
  in_gc = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="_xla_gc_callback"))
  on_sigint(signal.SIGINT, in_gc)  # returns instead of raising
  deadline = time.time() + 5
  while not sent and time.time() < deadline:
    time.sleep(0.01)
  assert sent == [(os.getpid(), signal.SIGINT)]
  with pytest.raises(KeyboardInterrupt):
    on_sigint(signal.SIGINT, types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="run")))


@pytest.mark.parametrize(
  "config, reason",
  [
    (dict(mlp_only_layers=[1]), r"layers \[1\] of this model are dense \(mlp_only_layers"),
    (dict(decoder_sparse_step=2), r"layers \[0, 2\] of this model are dense \(mlp_only_layers, decoder_sparse_step\)"),
    (dict(norm_topk_prob=False), r"renormalises .*\(norm_topk_prob=False\)"),
  ],
  ids=["mlp_only_layers", "decoder_sparse_step", "norm_topk_prob"],
)  # fmt: skip
def test_a_moe_llama_cpp_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, config, reason):
  """A Qwen3-MoE with a dense layer between sparse ones, or its top-k routing probabilities left unnormalised, has no
  GGUF form llama.cpp runs: --export=gguf:… is refused with the reason before calibrating, and writes nothing."""
  model = write_random_moe(str(tmp_path / "model"), family="Qwen3Moe", layers=3, hidden=64, intermediate=128,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                           **{"norm_topk_prob": True, **config})  # fmt: skip
  for step in ("allocate", "quantize_with", "export"):  # calibration, quantization, writing
    monkeypatch.setattr(
      f"qjax.cli.quantize.{step}", lambda *a, step=step, **k: pytest.fail(f"{step} ran before the refusal")
    )
  out = str(tmp_path / "q")
  with pytest.raises(NotImplementedError, match=rf"^--export=gguf:Q4_K_M: .*{reason}.*cannot be written to GGUF"):
    run(_settings(model, out, method="gptq", export="gguf:Q4_K_M"), show_progress=False)
  assert not os.path.exists(out) and not os.path.exists(out + ".checkpoint")
