"""`qjax compare`: recipes parsed and checked up front, each scored in its own runtime against stored float logits
(checked here against llama.cpp and transformers called directly), resumed, and its verdict."""

import json
import os
import pathlib

import numpy as np
import pytest

from qjax.cli.compare import CPU, GPU_SERVING, Candidate, group_size_for, parse_recipe, verdict
from qjax.models import LlamaConfig
from tests.cli.test_cli import qjax
from tests.model_factory import write_random_llama


def test_recipes_parse_into_method_and_format():
  assert parse_recipe("gptq") == Candidate("gptq", "gptq", "gptq")
  assert parse_recipe("awq") == Candidate("awq", "awq", "awq")
  assert parse_recipe("gptq@compressed-tensors") == Candidate("gptq@compressed-tensors", "gptq", "compressed-tensors")
  assert parse_recipe("Q3_K_M").family == CPU and parse_recipe("rtn@gptq_v2").family == GPU_SERVING
  assert parse_recipe("awq+gptq@Q4_K_M+imatrix") == Candidate("awq+gptq@Q4_K_M+imatrix", "awq+gptq", "gguf:Q4_K_M",
                                                                True)  # fmt: skip
  assert parse_recipe("Q4_K_M+imatrix+alloc") == Candidate("Q4_K_M+imatrix+alloc", "none", "gguf:Q4_K_M", True,
                                                           "Q4_K_M")  # fmt: skip
  assert parse_recipe("gptq@Q3_K_M+4.5bpw").target_bpw == "4.5"
  assert parse_recipe("gptq@compressed-tensors+alloc").target_bpw == "uniform"  # the size of --bits
  assert parse_recipe("rtn@gptq+3.5bpw").target_bpw == "3.5"


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("gptqq", "unknown method 'gptqq'"),
    ("gptq@Q9_K", "unknown format 'Q9_K'"),
    ("gptq+imatrix", "unknown method 'gptq+imatrix'"),
    ("gptq@gptq+imatrix", "+imatrix applies to llama.cpp file types"),
    ("rtn@qjax", "compare quantized files"),
    ("none@F16", "unknown format 'F16'"),
    ("Q4_K_M+4.5", "unknown modifier '4.5'"),
    ("awq+alloc", "unknown method 'awq+alloc'"),
    ("awq@awq+alloc", "+alloc and +<N>bpw apply to llama.cpp file types, compressed-tensors and gptq"),
  ],
)
def test_bad_recipes_are_named(text, message):
  with pytest.raises(ValueError, match="--recipes") as e:
    parse_recipe(text)
  assert message in str(e.value)


def test_group_size_falls_back_to_one_that_divides_every_width():
  config = LlamaConfig(vocab_size=8, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)  # fmt: skip
  assert group_size_for(config, 128, given=False) == 64  # SmolLM2's 576 = 4.5 x 128
  assert group_size_for(config, 128, given=True) == 128  # the user's choice: the exports then refuse it, by name
  assert group_size_for(config, 32, given=False) == 32


def _row(recipe, family, size, **kls):
  runtimes = {name.replace("_", "."): {"kl": kl} for name, kl in kls.items()}
  return dict(recipe=recipe, label=recipe, family=family, size_mb=size, runtimes=runtimes)


def test_verdict_takes_the_smallest_file_within_budget_in_its_own_runtime():
  rows = [
    _row("Q8_0", CPU, 140, qjax=0.004, llama_cpp=0.005),
    _row("Q4_K_M", CPU, 100, qjax=0.03, llama_cpp=0.06),  # within budget in qjax's forward, not in llama.cpp
    _row("Q5_K_M", CPU, 110, qjax=0.02, llama_cpp=0.04),
    _row("gptq", GPU_SERVING, 106, qjax=0.2, transformers=0.2),
  ]
  cpu, gpu = verdict(rows, 0.05)[1], verdict(rows, 0.05)[0]
  assert cpu.startswith(f"{CPU}: Q5_K_M") and "in llama.cpp" in cpu
  assert gpu.startswith(f"{GPU_SERVING}: none within KL 0.05; the closest is gptq")


def _kl(ref_logits, logits):
  """Mean KL(reference || model) of next-token distributions, float64 numpy."""

  def log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp, lq = log_softmax(ref_logits[:, :-1]), log_softmax(logits[:, :-1])
  return float(np.sum(np.exp(lp) * (lp - lq), -1).mean())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # third-party deprecation warnings while loading
def test_compare_scores_each_format_in_its_runtime_and_resumes(tmp_path):
  llama_cpp = pytest.importorskip("llama_cpp")
  torch = pytest.importorskip("torch")
  pytest.importorskip("gptqmodel")
  from transformers import AutoModelForCausalLM

  model = write_random_llama(str(tmp_path / "model"), hidden=256, intermediate=512, heads=4, kv_heads=2)
  out = tmp_path / "cmp"
  args = [f"--model={model}", "--eval_windows=2", "--eval_seqlen=32", f"--out={out}"]
  printed = qjax("compare", "--recipes=rtn,Q4_K_M", *args).stdout
  summary = json.loads((out / "compare.json").read_text())
  rtn, q4 = summary["rows"]
  assert set(rtn["runtimes"]) == {"qjax", "transformers"} and set(q4["runtimes"]) == {"qjax", "llama.cpp"}
  assert (out / "compare.png").stat().st_size > 0 and "| Q4_K_M | gguf:Q4_K_M | llama.cpp |" in printed
  assert f"{CPU}: " in printed and f"{GPU_SERVING}: " in printed

  # The same windows through the float model in transformers, and the GGUF file through llama.cpp, here directly.
  from safetensors.numpy import load_file

  windows = load_file(str(out / "reference.safetensors"))["windows"]
  assert windows.shape == (2, 32)
  with torch.no_grad():
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    float_logits = hf(torch.tensor(windows)).logits.numpy()
  llm = llama_cpp.Llama(model_path=str(out / q4["path"]), n_ctx=32, n_batch=32, logits_all=True, verbose=False)
  theirs = []
  for window in windows:
    llm.reset()
    llm.eval(window.tolist())
    theirs.append(np.array(llm.scores[:32], np.float32))
  llm.close()
  kl = _kl(float_logits, np.stack(theirs))
  print(f"Q4_K_M: llama.cpp KL {kl:.6f} computed directly, {q4['runtimes']['llama.cpp']['kl']:.6f} by qjax compare")
  assert abs(q4["runtimes"]["llama.cpp"]["kl"] - kl) <= 1e-4 * kl
  # transformers reads the RTN GPTQ export as qjax's forward does (float32 activations both)
  assert (
    abs(rtn["runtimes"]["transformers"]["kl"] - rtn["runtimes"]["qjax"]["kl"]) < 2e-3 * rtn["runtimes"]["qjax"]["kl"]
  )
  assert rtn["bpw"] > q4["bpw"] > 4  # 16-bit embeddings in the GPTQ directory; Q4_K_M's are 4- to 6-bit

  # A rerun with one more recipe computes only that one.
  printed = qjax("compare", "--recipes=rtn,Q4_K_M,Q8_0", *args).stdout
  assert "(2 already done" in printed and "[1/1] Q8_0" in printed
  again = json.loads((out / "compare.json").read_text())
  assert again["rows"][:2] == summary["rows"] and again["rows"][2]["recipe"] == "Q8_0"
  assert again["rows"][2]["runtimes"]["llama.cpp"]["kl"] < q4["runtimes"]["llama.cpp"]["kl"]

  # Other settings in the same directory are refused before any work, naming what changed.
  refused = qjax("compare", "--recipes=rtn", args[0], "--eval_windows=3", *args[2:], check=False)
  assert refused.returncode == 2 and "other settings (eval_windows)" in refused.stderr
  # A directory of the user's own files is refused, and left as it was.
  theirs_dir = tmp_path / "mine"
  theirs_dir.mkdir()
  (theirs_dir / "notes.txt").write_text("mine")
  refused = qjax("compare", "--recipes=rtn", *args[:-1], f"--out={theirs_dir}", check=False)
  assert refused.returncode == 2 and "holds files qjax did not write" in refused.stderr
  assert os.listdir(theirs_dir) == ["notes.txt"] and pathlib.Path(theirs_dir, "notes.txt").read_text() == "mine"
