"""What the reader fuzzers share: tiny models written to disk, and `run_case`, which runs one case under a time bound,
records every file it opens, and accepts only a consistent model or a clean refusal.

A clean refusal is an `InputError` (or `FileNotFoundError` for a missing path) whose message is one line naming the
case's directory or file. Anything else is a defect: another exception, no answer within the time bound, a file
opened outside the case directory, or a model that loaded but is not the one its config describes.

Environment:
  QJAX_FUZZ_EXAMPLES: cases over all fuzzers together (default 4000), split by each fuzzer's share.
  QJAX_FUZZ_COLLECT=1: record defects and carry on (what `scripts/fuzz.py` sets) instead of failing at the first.
  QJAX_FUZZ_STATS: a JSON file the case counts and defects are written to when the process exits.
  QJAX_FUZZ_CASE_SECONDS: the time bound of one case (default 10).
"""

import atexit
import collections
import contextlib
import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import traceback
import warnings

import numpy as np
from safetensors.numpy import save_file

from qjax.core import Fp8Grid, InputError, NvFp4Grid, QSpec, dequantize, is_qarray
from qjax.core.tree import leaves_with_paths
from qjax.models import checkpoint
from qjax.models.checkpoint import hf_tensor_shapes, param_shapes, set_nested
from qjax.models.config import LlamaConfig

TOTAL = int(os.environ.get("QJAX_FUZZ_EXAMPLES", "4000"))
COLLECT = os.environ.get("QJAX_FUZZ_COLLECT") == "1"
STATS_FILE = os.environ.get("QJAX_FUZZ_STATS")
CASE_SECONDS = float(os.environ.get("QJAX_FUZZ_CASE_SECONDS", "10"))
REFUSALS = (InputError, FileNotFoundError)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = LlamaConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
)  # fmt: skip
LINEARS = r"model/layers_\d+/(self_attn|mlp)/\w+_proj/kernel"

CASES: collections.Counter = collections.Counter()
DEFECTS: dict[str, dict[str, str]] = collections.defaultdict(dict)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # loaded, or which refusal


def examples(share: float) -> int:
  """This fuzzer's number of cases: its share of `TOTAL`."""
  return max(1, round(TOTAL * share))


# ---- one case ----


class Hang(BaseException):
  """A case ran past its time bound (a BaseException, so no ``except Exception`` under test swallows it)."""


_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
  if event == "open" and _opened is not None and isinstance(args[0], str | bytes):
    _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # Python-level opens: open(), os.open, numpy's memmap


@contextlib.contextmanager
def recording_opens():
  """Every path opened meanwhile: Python's opens (audit hook) and safetensors' (a wrapper; it opens in Rust)."""
  global _opened
  real = checkpoint.safe_open
  opened: list[str] = []

  def recorded(path, *args, **kwargs):
    opened.append(os.fsdecode(path))
    return real(path, *args, **kwargs)

  _opened, checkpoint.safe_open = opened, recorded
  try:
    yield opened
  finally:
    _opened, checkpoint.safe_open = None, real


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raises `Hang` in the main thread after `seconds`; a last-resort watchdog ends the process if that cannot
  interrupt the call (a blocking open inside Rust code retries after the signal)."""

  def on_alarm(signum, frame):
    raise Hang()

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  faulthandler.dump_traceback_later(3 * seconds + 30, exit=True)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
    faulthandler.cancel_dump_traceback_later()


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


# What libraries read about the machine on first use (transformers, torch): not a model file, whatever a case says.
SYSTEM_FILES = re.compile(r"/proc/(self|\d+)/(mountinfo|cgroup|status|stat|maps)|/proc/sys/kernel/random/boot_id|/sys/")


def _allowed_roots(case_dir: str) -> list[str]:
  """Where a case may open files: its directory, the Python installation (lazy imports) and the repository."""
  roots = {case_dir, sys.prefix, sys.base_prefix, sys.exec_prefix, REPO}
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # jax's own cache of compiled programs (scripts/env.sh sets it)
    roots.add(os.environ["JAX_COMPILATION_CACHE_DIR"])
  return [os.path.realpath(r) for r in roots]


def _where(e: BaseException) -> str:
  """``file:line`` of the innermost frame in qjax (else the innermost), to tell defects apart."""
  frames = traceback.extract_tb(e.__traceback__)
  ours = [f for f in frames if f"{os.sep}qjax{os.sep}" in f.filename] or frames
  return f"{os.path.relpath(ours[-1].filename, REPO)}:{ours[-1].lineno}" if ours else "?"


def _judge_refusal(e: BaseException, case_dir: str) -> str | None:
  """A refusal must be one line that names the case's directory or a file in it."""
  message = str(e)
  if "\n" in message:
    return f"{type(e).__name__} message spans lines @ {_where(e)}"
  if case_dir not in message:
    return f"{type(e).__name__} message names no file of the case @ {_where(e)}: {message[:100]}"
  return None


def _kind_of_refusal(e: BaseException, case_dir: str) -> str:
  """A refusal's message with the paths, numbers and quoted values taken out, to count refusals by kind."""
  message = str(e).replace(case_dir, "").replace("/model.safetensors", "")
  message = re.sub(r"'[^']*'|\"[^\"]*\"|\[.*?\]|\(.*?\)|\d+", "_", message)
  return f"{type(e).__name__}: {message[:70]}"


def run_case(fuzzer: str, case_dir: str, load, check=None) -> None:
  """Runs ``load()`` (then ``check(result)``) as one fuzz case and records a defect if it misbehaves.

  Raises:
    AssertionError: describing the defect, unless `COLLECT`.
  """
  CASES[fuzzer] += 1
  defect = None
  with recording_opens() as opened, warnings.catch_warnings():
    warnings.simplefilter("ignore")  # warnings about odd but readable values are not defects
    try:
      with time_limit(CASE_SECONDS):
        result = load()
        if check is not None:
          check(result)
      OUTCOMES[fuzzer]["loaded"] += 1
    except REFUSALS as e:
      defect = _judge_refusal(e, case_dir)
      example = str(e)
      OUTCOMES[fuzzer][_kind_of_refusal(e, case_dir)] += 1
    except Hang:
      defect = example = f"no answer within {CASE_SECONDS} s"
    except Exception as e:
      defect = f"{type(e).__name__} @ {_where(e)}"
      example = f"{type(e).__name__}: {str(e)[:300]}"
  roots = _allowed_roots(case_dir)
  outside = {p for p in map(os.path.realpath, opened) if not any(_inside(p, r) for r in roots)}
  outside = sorted(p for p in outside if not SYSTEM_FILES.match(p))
  if outside and defect is None:
    defect = example = f"opened files outside the case directory: {outside[:3]}"
  if defect is None:
    return
  DEFECTS[fuzzer].setdefault(defect, example)
  if not COLLECT:
    raise AssertionError(f"{fuzzer}: {defect}\n{example}")


def _write_stats() -> None:
  if STATS_FILE:
    with open(STATS_FILE, "w") as f:
      outcomes = {k: dict(v.most_common()) for k, v in OUTCOMES.items()}
      json.dump({"cases": dict(CASES), "defects": dict(DEFECTS), "outcomes": outcomes}, f, indent=1)


atexit.register(_write_stats)


def fresh_case(root: str, name: str = "case") -> str:
  """An empty directory for one case (the previous case's files, FIFOs and links removed)."""
  case_dir = os.path.join(root, name)
  if os.path.lexists(case_dir):
    shutil.rmtree(case_dir)
  os.makedirs(case_dir)
  return case_dir


# ---- tiny models on disk ----


def random_params(config: LlamaConfig = TINY, seed: int = 0) -> dict:
  """A Flax parameter tree of `config` with random float32 leaves."""
  rng = np.random.default_rng(seed)
  params: dict = {}
  for path, shape in param_shapes(config).items():
    set_nested(params, tuple(path.split("/")), rng.standard_normal(shape).astype(np.float32))
  return params


def write_config(model_dir: str, config: LlamaConfig = TINY, **extra) -> None:
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump({**config.to_hf_dict(), **extra}, f)


def write_hf_dir(model_dir: str, config: LlamaConfig = TINY, *, shards: int = 1) -> None:
  """A float Hugging Face directory (config and safetensors, no tokenizer); with ``shards > 1``, an index too."""
  rng = np.random.default_rng(0)
  tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in hf_tensor_shapes(config).items()}
  os.makedirs(model_dir, exist_ok=True)
  write_config(model_dir, config)
  if shards == 1:
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  names = sorted(tensors)
  weight_map = {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = names[i::shards]
    save_file({n: tensors[n] for n in part}, os.path.join(model_dir, file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, file))
  with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def tokenizer_entries() -> list:
  """GGUF ``tokenizer.*`` metadata of a 63-token byte-level BPE vocabulary with one merge."""
  import gguf

  from qjax.formats.gguf import KeyValue

  chars = [chr(c) for c in (*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1), *range(48, 58))]
  tokens = ["<s>", "</s>", *chars[:-2], "ab"]
  string, array, u32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
  return [
    KeyValue("tokenizer.ggml.model", "gpt2", string),
    KeyValue("tokenizer.ggml.pre", "smollm", string),
    KeyValue("tokenizer.ggml.tokens", tokens, array, string),
    KeyValue("tokenizer.ggml.token_type", [3, 3] + [1] * (len(tokens) - 2), array, gguf.GGUFValueType.INT32),
    KeyValue("tokenizer.ggml.merges", ["a b"], array, string),
    KeyValue("tokenizer.ggml.bos_token_id", 0, u32),
    KeyValue("tokenizer.ggml.eos_token_id", 1, u32),
  ]


def write_gguf_file(path: str, config: LlamaConfig = TINY, *, recipe: str | None = None) -> None:
  """A GGUF of random weights written by qjax: F32, or the ggml types of a GGUF recipe (e.g. "Q8_0")."""
  from qjax.formats.gguf import write_gguf

  params = random_params(config)
  if recipe is not None:
    from qjax.transforms import gguf_recipes, quantize_params

    params = quantize_params(params, gguf_recipes.gguf_recipe(recipe, config))
  write_gguf(path, config, params, tokenizer_entries(), overwrite=True)


class _NoTokenizer:
  def save_pretrained(self, path: str) -> None:
    """Nothing: the fuzzed readers do not read tokenizers."""


def quantized_params(spec: QSpec, config: LlamaConfig = TINY) -> dict:
  from qjax.transforms import Rule, quantize_params, rtn

  return quantize_params(random_params(config), [Rule(LINEARS, rtn(spec))])


def write_quantized_dir(model_dir: str, kind: str, config: LlamaConfig = TINY) -> None:
  """A 4-bit group-32 directory of random weights as qjax writes it: ``kind`` "gptq", "awq", "compressed-tensors" or
  "qjax"; or "compressed-tensors-fp8", FP8 weights with a scale per channel; or "compressed-tensors-nvfp4" and
  "qjax-nvfp4", NVFP4 weights."""
  from qjax.formats import save_awq, save_gptq, save_quantized
  from qjax.formats.compressed_tensors import save_compressed_tensors

  if kind == "gptq":
    save_gptq(model_dir, config, quantized_params(QSpec(bits=4, group_size=32, symmetric=False), config), None)
  elif kind == "awq":
    save_awq(model_dir, config, quantized_params(QSpec(bits=4, group_size=32, symmetric=False), config), None)
  elif kind == "compressed-tensors":
    params = quantized_params(QSpec(bits=4, group_size=32, symmetric=False), config)
    save_compressed_tensors(model_dir, config, params, None)
  elif kind == "compressed-tensors-fp8":
    params = quantized_params(QSpec(bits=8, group_size=-1, scale_dtype=np.float32, grid=Fp8Grid()), config)
    save_compressed_tensors(model_dir, config, params, None)
  elif kind == "compressed-tensors-nvfp4":
    save_compressed_tensors(model_dir, config, quantized_params(QSpec(bits=4, group_size=16, grid=NvFp4Grid()), config),
                            None)  # fmt: skip
  elif kind == "qjax-nvfp4":
    params = quantized_params(QSpec(bits=4, group_size=16, grid=NvFp4Grid()), config)
    save_quantized(model_dir, config, params, _NoTokenizer(), metadata={"source_model": "tiny"})
  else:
    params = quantized_params(QSpec(bits=4, group_size=32, symmetric=False), config)
    save_quantized(model_dir, config, params, _NoTokenizer(), metadata={"source_model": "tiny"})


# ---- what a loaded model must be ----


def check_model(config: LlamaConfig, params) -> None:
  """A loaded model is the model its config describes: every parameter, with its shape, finite when dequantized."""
  expected = param_shapes(config)
  leaves = dict(leaves_with_paths(params))
  assert set(leaves) == set(expected), sorted(set(leaves) ^ set(expected))[:5]
  for path, leaf in leaves.items():
    assert tuple(leaf.shape) == expected[path], (path, leaf.shape, expected[path])
    values = np.asarray(dequantize(leaf) if is_qarray(leaf) else leaf, np.float32)
    assert np.isfinite(values).all(), f"{path} is not finite"


def gguf_layout(path: str) -> dict[str, tuple[int, int]]:
  """Where each header part of a GGUF file lies: ``"<field or tensor>#<part>"`` -> (byte offset, size).

  Parts as `gguf`'s reader splits them: ``GGUF.kv_count#0``; a metadata entry's key length (#0), key (#1), type (#2)
  and value parts (a scalar: #3; a string: length #3, bytes #4; an array: item type #3, count #4, then the items);
  a tensor's name length (#0), name (#1), dimension count (#2), dimensions (#3), ggml type (#4) and offset (#5).
  """
  import gguf

  reader = gguf.GGUFReader(path)
  base = reader.data.ctypes.data
  fields = [*reader.fields.items(), *((t.name, t.field) for t in reader.tensors)]
  return {f"{name}#{i}": (part.ctypes.data - base, part.nbytes) for name, field in fields for i, part in
          enumerate(field.parts)}  # fmt: skip


def patch_bytes(path: str, offset: int, data: bytes) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)
