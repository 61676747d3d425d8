"""Compare quantization recipes on one model, each evaluated in the runtime a user would run it in.

Every recipe quantizes the model as `qjax quantize` would (--bits, --group_size, the calibration flags), is written
in its own format under --out (GPTQ, AWQ and compressed-tensors directories, GGUF files: the files you would ship),
and is scored on the same evaluation windows against the float model's logits, computed once and stored there:
in qjax's forward always, and in llama.cpp (GGUF) or transformers (the Hugging Face formats) when installed. It
writes compare.md, compare.json and compare.png (KL divergence against bits per weight) and prints, for GPU serving
and for CPU runtimes, the smallest file within --kl_budget. A rerun of the same command resumes: finished recipes
are kept.

A recipe is METHOD (a `qjax quantize --method`: exported as GPTQ, or AWQ for the awq methods), a llama.cpp file
type (Q4_K_M, with +imatrix for an importance matrix, +alloc for types allocated per tensor to the recipe's size,
+4.5bpw to that budget), or METHOD@FORMAT (gptq@Q4_K_M: GPTQ rounding into the Q4_K_M file; gptq@compressed-tensors;
awq+gptq@gptq); compressed-tensors and GPTQ rows take +alloc (bit widths per linear allocated to the size of
--bits) or +<N>bpw too.

Example:
  qjax compare                                           # the default set on the built-in default model
  qjax compare --recipes=gptq,awq+gptq,Q4_K_M,Q4_K_M+imatrix --out=runs/compare-mine
  qjax compare --model=path/to/hf_llama --kl_budget=0.02 --eval_windows=16
"""

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
from absl import flags

from qjax.calib import text as texts
from qjax.calib.quantize import needs_calibration
from qjax.cli import Interrupted, interrupted
from qjax.cli import quantize as q
from qjax.cli.estimate import estimate, measure_gflops, minutes
from qjax.core import InputError
from qjax.eval import evaluate
from qjax.eval.runtimes import StoredLogits, llama_cpp_logits, missing, runtime_for, transformers_logits
from qjax.eval.sensitivity import affine_bits_per_weight
from qjax.formats import open_checkpoint
from qjax.formats.default_model import BUILTIN_MODELS
from qjax.formats.output import MARKER, atomic_file, check_free_space, check_output, output_kind
from qjax.formats.targets import GROUP_SIZES, export, parse_target
from qjax.models import logits_fn
from qjax.transforms.gguf_recipes import RECIPES

FLAGS = flags.FLAGS
FLAGS.set_default("nsamples", 16)  # `qjax quantize`'s flags, with a comparison's defaults
FLAGS.set_default("seqlen", 256)
FLAGS.set_default("eval_windows", 8)

DEFAULT_RECIPES = ["rtn", "gptq", "awq", "awq+gptq", "gptq@compressed-tensors", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M",
                   "Q4_K_M+alloc", "Q4_K_M+imatrix", "Q4_K_M+imatrix+alloc", "gptq@Q4_K_M", "Q3_K_M",
                   "Q3_K_M+imatrix+alloc"]  # fmt: skip
_RECIPES = flags.DEFINE_list(
  "recipes", DEFAULT_RECIPES, "Recipes to compare: METHOD (rtn, gptq, awq, awq+gptq, …: GPTQ files, AWQ files for "
  "the awq methods), a llama.cpp file type (Q4_K_M, Q4_K_M+imatrix, Q4_K_M+alloc: types allocated per tensor to its "
  "size, Q4_K_M+4.5bpw: to 4.5 bits per weight, …), or METHOD@FORMAT (gptq@Q4_K_M, "
  "gptq@compressed-tensors, awq+gptq@gptq). Example: --recipes=gptq,awq+gptq,Q4_K_M."
)  # fmt: skip
_EVAL_SEQLEN = flags.DEFINE_integer("eval_seqlen", 512, "Tokens per evaluation window. Example: --eval_seqlen=1024.")
_KL_BUDGET = flags.DEFINE_float(
  "kl_budget", 0.05, "The verdict's budget: the smallest file whose mean KL divergence from the float model is at "
  "most this, per runtime family. Example: --kl_budget=0.02."
)  # fmt: skip
# quantize's flags that compare sets itself, per recipe
_OWN_FLAGS = ("method", "recipe", "export", "imatrix", "target_bpw", "rules", "checkpoint_dir")
SHARED_FLAGS = ("model", "out", "overwrite", "bits", "group_size", "nsamples", "seqlen", "calib", "seed", "eval_text",
                "eval_windows", "batch_size", "allocation_types", "allocation_bits",
                "allocation_group_sizes")  # fmt: skip
"""`qjax quantize`'s flags that compare reads too (its --help lists them); --out is the comparison's directory
(default runs/compare-<model>), and --overwrite starts a comparison there afresh when its settings changed."""

GPU_SERVING = "GPU serving (vLLM, TGI, transformers)"
CPU = "CPU and Apple (llama.cpp)"
# From the full default comparison on this project's 2-core machines (experiments/compare.md): a window through
# llama.cpp or transformers took 0.8-1.3 times as long as through qjax's forward, and writing an export and reading
# it back about this many seconds per billion parameters.
_RUNTIME_COST = {"qjax": 1.0, "llama.cpp": 1.0, "transformers": 1.0}
_EXPORT_SECONDS_PER_BPARAM = 60.0


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One recipe to compare: a method rounding into a format (GGUF: with an importance matrix, or allocated)."""

  name: str
  method: str
  export: str
  imatrix: bool = False
  target_bpw: str | None = None  # `qjax quantize --target_bpw`: bits per weight, or a file type's size

  @property
  def kind(self) -> str:
    return parse_target(self.export).kind

  @property
  def family(self) -> str:
    return CPU if self.kind == "gguf" else GPU_SERVING


def parse_recipe(text: str) -> Candidate:
  """``"gptq"``, ``"Q4_K_M+imatrix"``, ``"gptq@Q4_K_M"``, ``"gptq@compressed-tensors"`` -> a `Candidate`.

  A llama.cpp file type takes modifiers after ``+``: ``imatrix``, ``alloc`` (types allocated per tensor to the
  recipe's own size) or ``<N>bpw`` (allocated to N bits per weight); a compressed-tensors or GPTQ format ``alloc``
  (bit widths allocated to the size of --bits, `UNIFORM`) or ``<N>bpw``.

  Raises:
    ValueError: naming --recipes and what is allowed.

  Examples:
    >>> parse_recipe("Q4_K_M+imatrix")
    Candidate(name='Q4_K_M+imatrix', method='none', export='gguf:Q4_K_M', imatrix=True, target_bpw=None)
    >>> parse_recipe("awq+gptq").export, parse_recipe("gptq@Q4_K_M").export, parse_recipe("Q3_K_M+3.9bpw").target_bpw
    ('awq', 'gguf:Q4_K_M', '3.9')
  """
  method, at, fmt = text.strip().rpartition("@")
  if not at:
    method, fmt = ("none", text.strip()) if text.partition("+")[0].strip() in RECIPES else (text.strip(), "")
  if method not in q.cli_recipes.METHODS:
    raise ValueError(f"--recipes: {text!r}: unknown method {method!r}; one of {', '.join(q.cli_recipes.METHODS)}, "
                     f"or a llama.cpp file type ({', '.join(RECIPES)}).")  # fmt: skip
  fmt, *modifiers = fmt.split("+")
  imatrix, target_bpw = False, None
  for m in modifiers:
    if m == "imatrix":
      imatrix = True
    elif m == "alloc":
      target_bpw = fmt if fmt in RECIPES else UNIFORM
    elif m.endswith("bpw") and m[:-3].replace(".", "", 1).isdigit():
      target_bpw = m[:-3]
    else:
      raise ValueError(f"--recipes: {text!r}: unknown modifier {m!r}; after a llama.cpp file type: +imatrix, +alloc "
                       "(types allocated to its size) or +<N>bpw (allocated to N bits per weight); after "
                       "compressed-tensors or gptq: +alloc or +<N>bpw.")  # fmt: skip
  if not fmt:
    fmt = "awq" if "awq" in method else "gptq"
  export = f"gguf:{fmt}" if fmt in RECIPES else fmt
  try:
    target = parse_target(export, flag=f"--recipes ({text!r})")
  except ValueError:
    raise ValueError(f"--recipes: {text!r}: unknown format {fmt!r}; a llama.cpp file type ({', '.join(RECIPES)}) or "
                     "gptq, gptq_v2, awq, compressed-tensors.") from None  # fmt: skip
  if target.kind == "qjax" or (target.is_gguf and not target.quantizes):
    raise ValueError(f"--recipes: {text!r}: compare quantized files (GGUF types, gptq, awq, compressed-tensors).")
  if imatrix and not target.quantizes:
    raise ValueError(f"--recipes: {text!r}: +imatrix applies to llama.cpp file types (Q4_K_M+imatrix).")
  if target_bpw and not (target.quantizes or target.kind == "compressed-tensors" or target.is_gptq):
    raise ValueError(f"--recipes: {text!r}: +alloc and +<N>bpw apply to llama.cpp file types, compressed-tensors "
                     "and gptq (Q4_K_M+alloc, gptq@compressed-tensors+alloc).")  # fmt: skip
  return Candidate(text.strip(), method, export, imatrix, target_bpw)


UNIFORM = "uniform"
"""An affine row's +alloc budget: the bits per weight of every linear at --bits on the row's grid."""


def group_size_for(config, wanted: int, given: bool) -> int:
  """--group_size, or when it was not given and does not divide every linear's input width, the largest group
  size that does (every Hugging Face format needs whole groups)."""
  widths = {config.hidden_size, config.num_attention_heads * config.head_dim}
  widths |= {config.intermediate_size} | ({config.expert_size} if config.num_experts else set())
  if given or wanted == -1 or all(w % wanted == 0 for w in widths):
    return wanted
  fits = [g for g in GROUP_SIZES if 0 < g <= wanted and all(w % g == 0 for w in widths)]
  return max(fits, default=-1)


def _row_settings(base: q.Settings, c: Candidate, out: str, config) -> q.Settings:
  sym = base.sym and "awq" not in c.method  # AWQ's checkpoints store zero points (AutoAWQ's default, GEMM)
  s = dataclasses.replace(base, method=c.method, export=c.export, imatrix=c.imatrix, target_bpw=c.target_bpw,
                          sym=sym, out=out, eval_windows=0, overwrite=True)  # fmt: skip
  if c.target_bpw == UNIFORM:
    s = dataclasses.replace(s, target_bpw=repr(affine_bits_per_weight(q.settings_spec(s), config)))
  return s


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name)


def _file_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _evaluate(fn, eval_windows, reference, label: str) -> dict[str, float]:
  """The row's metrics in one runtime, with its prefill throughput: tokens per second inside `fn`, timed after a
  first window that compiles (qjax) or warms caches (the others)."""
  calls = []

  def timed(ids):
    tick = time.perf_counter()
    logits = np.asarray(fn(ids))
    calls.append((time.perf_counter() - tick, ids.shape[0] * ids.shape[1]))
    return logits

  tick = time.perf_counter()
  timed(eval_windows[:1])
  r = evaluate(timed, eval_windows, reference_fn=reference, label=f"  {label}")
  seconds, tokens = map(sum, zip(*calls[1:], strict=True))
  return {"kl": r.kl_divergence, "kl_p99": r.kl_p99, "top1": r.top1_agreement, "delta_p": r.delta_p,
          "perplexity": r.perplexity, "prefill_tokens_per_second": tokens / seconds,
          "seconds": time.perf_counter() - tick}  # fmt: skip


def _run_identity(s: q.Settings, eval_seqlen: int) -> dict[str, Any]:
  keep = ("model", "bits", "group_size", "sym", "desc_act", "nsamples", "seqlen", "calib", "seed", "eval_text",
          "eval_windows", "damp_percent", "mse", "expert_policy", "expert_kappa", "allocation_types",
          "allocation_bits", "allocation_group_sizes")  # fmt: skip
  return {**{k: getattr(s, k) for k in keep}, "eval_seqlen": eval_seqlen}


def _open_comparison(out: str, identity: dict, *, overwrite: bool) -> list[dict]:
  """Marks --out (checked) as a comparison, and returns the finished rows of a previous run of the same one there."""
  if not os.path.isdir(out) or not os.listdir(out):
    os.makedirs(out, exist_ok=True)
    from qjax import __version__

    with open(os.path.join(out, MARKER), "w") as f:  # a container, marked first: its rows are each written whole
      json.dump({"kind": "compare", "qjax": __version__}, f)
    return []
  assert output_kind(out) == "compare"  # check_output refused anything else
  try:
    with open(os.path.join(out, "compare.json")) as f:
      previous = json.load(f)
  except FileNotFoundError:
    return []
  except ValueError as e:
    raise InputError(f"{out}/compare.json: unreadable ({e}); pass --overwrite to start the comparison afresh.") from e
  if previous.get("settings") != identity:
    if not overwrite:
      changed = sorted(k for k in identity if previous.get("settings", {}).get(k) != identity[k])
      raise InputError(f"--out={out}: holds a comparison with other settings ({', '.join(changed)}); pass "
                       "--overwrite to start it afresh, or choose another --out.")  # fmt: skip
    os.remove(os.path.join(out, "compare.json"))
    if os.path.exists(os.path.join(out, "reference.safetensors")):
      os.remove(os.path.join(out, "reference.safetensors"))
    return []
  return list(previous.get("rows", []))


def _estimates(candidates, plans, config, s: q.Settings, eval_seqlen: int, gflops: float, todo) -> list[float]:
  """Forecast seconds of each row: quantize, export and read back, evaluate in each runtime. The first allocated
  row of each grid still to run measures the rounding errors; the others reuse them."""
  params = _param_count(config)
  out = []
  firsts = {}
  for i in todo:
    if plans[i].target_bpw:
      firsts.setdefault(_errors_key(plans[i]), i)
  for i, (c, p) in enumerate(zip(candidates, plans, strict=True)):
    allocation = i in firsts.values()
    tokens = s.nsamples * s.seqlen if needs_calibration(p.recipe) or allocation else 0
    e = estimate(config, p.recipe, calibration_tokens=tokens, seqlen=eval_seqlen, batch_size=s.batch_size,
                 eval_windows=s.eval_windows, gflops_per_second=gflops, ggml_sweep=p.ggml_sweep,
                 allocation=allocation, allocation_sweeps=q.allocation_sweeps(s, p) if allocation else 0)  # fmt: skip
    runtime = runtime_for(c.kind)
    evals = e.eval_seconds * (1 + (_RUNTIME_COST[runtime] if runtime and not missing(runtime, c.kind) else 0))
    out.append(e.quantize_seconds + evals + _EXPORT_SECONDS_PER_BPARAM * params / 1e9)
  return out


def _errors_key(p: q.Plan) -> tuple:
  """What an allocation's rounding errors depend on besides the model and windows: llama.cpp's types, or the grid
  and the rounding (GPTQ's options, or None: to nearest)."""
  return ("gguf",) if p.target.quantizes else (p.spec.group_size, p.spec.symmetric, p.gptq_config)


def _param_count(config) -> int:
  from qjax.models.checkpoint import param_shapes

  return sum(int(np.prod(shape)) for shape in param_shapes(config).values())


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  try:
    compare()
  except (KeyboardInterrupt, Exception) as e:
    if interrupted(e):
      out = FLAGS.out or "runs/compare-<model>"
      raise Interrupted(f"interrupted; finished recipes are kept in {out}; rerun the same command to resume.") from None
    raise


def compare() -> None:
  """The command: every recipe of --recipes not yet in --out, quantized, exported, scored; then the outputs."""
  for name in _OWN_FLAGS:
    if FLAGS[name].present:
      raise ValueError(f"--{name} is `qjax quantize`'s; qjax compare takes --recipes.")
  start = time.perf_counter()
  candidates = [parse_recipe(r) for r in _RECIPES.value]
  if len({c.name for c in candidates}) < len(candidates):
    raise ValueError(f"--recipes: a recipe is listed twice in {','.join(_RECIPES.value)}.")
  base = q.Settings.from_flags()
  checkpoint = open_checkpoint(base.model)
  config = checkpoint.config
  group_size = group_size_for(config, base.group_size, FLAGS["group_size"].present)
  if group_size != base.group_size:
    print(f"group size {group_size}: {base.group_size} does not divide every linear's input width, and the GPTQ, "
          "AWQ and compressed-tensors formats need whole groups (--group_size sets it).")  # fmt: skip
  base = dataclasses.replace(base, group_size=group_size)
  eval_seqlen = _EVAL_SEQLEN.value
  out = base.out or os.path.join("runs", f"compare-{_slug(os.path.basename(base.model.rstrip('/')))}")
  models = os.path.join(out, "models")
  rows_settings = [_row_settings(base, c, os.path.join(models, _slug(c.name)), config) for c in candidates]
  plans = [q.plan(s, config, method_given=True) for s in rows_settings]  # every recipe checked before any work
  tokenizer = checkpoint.tokenizer()
  if base.eval_windows < 1:
    raise ValueError("--eval_windows must be at least 1: a comparison evaluates every recipe.")
  tokens = texts.tokenize(tokenizer, texts.load_text(base.eval_text, "evaluation"))
  eval_windows = texts.eval_windows(tokens, eval_seqlen, max_windows=base.eval_windows)
  inputs = [base.model] if base.model not in BUILTIN_MODELS else []
  inputs += [t for t in (base.calib, base.eval_text) if t != "default"]
  identity = _run_identity(base, eval_seqlen)
  check_output(out, "compare", inputs=inputs)
  need = 4 * eval_windows.size * config.vocab_size + len(candidates) * _param_count(config) * 9 // 8 + (64 << 20)
  check_free_space(out, need, "the float logits and every recipe's files (at most 9 bits/weight)",
                   "free some space or choose another --out")  # fmt: skip
  done = {r["recipe"]: r for r in _open_comparison(out, identity, overwrite=base.overwrite)}
  todo = [i for i, c in enumerate(candidates) if c.name not in done]
  gflops = measure_gflops()
  forecast = _estimates(candidates, plans, config, base, eval_seqlen, gflops, todo)
  reference_path = os.path.join(out, "reference.safetensors")
  total = sum(forecast[i] for i in todo)
  if not os.path.exists(reference_path):  # the float model's forward over the windows, once
    total += estimate(config, plans[0].recipe, calibration_tokens=0, seqlen=eval_seqlen, batch_size=1,
                      eval_windows=base.eval_windows, gflops_per_second=gflops).eval_seconds  # fmt: skip
  print(
    f"qjax compare: {len(candidates)} recipes on {base.model} ({len(done)} already done in {out}), "
    f"{len(eval_windows)} windows of {eval_seqlen} tokens; estimate ~{minutes(total)} at {gflops:.0f} GFLOP/s."
  )
  for i in todo:
    c = candidates[i]
    runtime = runtime_for(c.kind)
    why = runtime and missing(runtime, c.kind)
    where = "qjax" + (f" + {runtime}" if runtime and not why else f" ({runtime}: {why})" if runtime else "")
    print(f"  {c.name:24s} {plans[i].label:28s} in {where:36s} ~{minutes(forecast[i])}")

  if not os.path.exists(reference_path):
    with atomic_file(reference_path) as tmp:
      StoredLogits.write(tmp, logits_fn(config, checkpoint.params()), eval_windows,
                         {"model": base.model, "eval_seqlen": str(eval_seqlen)})  # fmt: skip
  reference = StoredLogits(reference_path, eval_windows)
  float_ppl = evaluate(reference, eval_windows, show_progress=False).perplexity

  calibrate = any(needs_calibration(p.recipe) or p.target_bpw for p in plans)
  calib_windows = q.calibration_windows(base, tokenizer) if calibrate else None
  rows = dict(done)
  summary = dict(settings=identity, float_perplexity=float_ppl, eval_tokens=int(eval_windows.shape[0] *
                 (eval_seqlen - 1)), kl_budget=_KL_BUDGET.value)  # fmt: skip
  ordered = lambda: [rows[c.name] for c in candidates if c.name in rows]
  errors: dict[tuple, dict] = {}  # the rounding errors, measured once per grid and shared by its allocated rows
  for n, i in enumerate(todo, 1):
    c, s, p = candidates[i], rows_settings[i], plans[i]
    print(f"[{n}/{len(todo)}] {c.name}: {p.label}", flush=True)
    tick = time.perf_counter()
    allocation = None
    if p.target_bpw:
      key = _errors_key(p)
      allocation = q.allocate(s, p, checkpoint, calib_windows, show_progress=True, errors=errors.get(key))
      errors[key] = allocation.errors
    p, out_config, qparams = q.quantize_with(s, checkpoint=checkpoint, windows=calib_windows, show_progress=True,
                                             allocation=allocation)  # fmt: skip
    quantize_seconds = time.perf_counter() - tick
    path = export(p.target, s.out, out_config, qparams, tokenizer, name=base.model, description=p.label,
                  overwrite=True, actorder=p.actorder)  # fmt: skip
    if allocation is not None:
      q.write_allocation(s.out, s, p, allocation)
    row = dict(recipe=c.name, label=p.label, format=str(p.target), family=c.family, path=os.path.relpath(path, out),
               size_mb=_file_bytes(path) / 2**20, quantize_seconds=quantize_seconds, runtimes={})  # fmt: skip
    row["bpw"] = 8 * _file_bytes(path) / _param_count(out_config)
    row["runtimes"]["qjax"] = _evaluate(logits_fn(out_config, qparams), eval_windows, reference, "qjax")
    del qparams
    runtime = runtime_for(c.kind)
    why = runtime and missing(runtime, c.kind)
    if runtime and why:
      row["runtimes"][runtime] = {"missing": why}
    elif runtime:
      opened = llama_cpp_logits(path, eval_seqlen) if runtime == "llama.cpp" else transformers_logits(path)
      with opened as fn:
        row["runtimes"][runtime] = _evaluate(fn, eval_windows, reference, runtime)
    row["seconds"] = time.perf_counter() - tick
    row["estimate_seconds"] = forecast[i]
    rows[c.name] = row
    _write_json(os.path.join(out, "compare.json"), {**summary, "rows": ordered()})
    print(f"  {_row_line(row)}  ({minutes(row['seconds'])}; estimate {minutes(forecast[i])})", flush=True)
  summary.update(rows=ordered(), seconds=time.perf_counter() - start, estimate_seconds=total)
  write_outputs(out, summary, model_name=base.model)
  print()
  print(open(os.path.join(out, "compare.md")).read())
  print(f"wrote {out}/compare.{{md,json,png}} and each recipe's files under {models}; total "
        f"{minutes(time.perf_counter() - start)} (estimate {minutes(total)})")  # fmt: skip


def _write_json(path: str, value) -> None:
  with atomic_file(path) as tmp, open(tmp, "w") as f:
    json.dump(value, f, indent=2)


def own_measure(row: dict) -> tuple[str, dict]:
  """The runtime a row is judged in: its format's own when it ran, else qjax's forward."""
  for runtime, m in row["runtimes"].items():
    if runtime != "qjax" and "missing" not in m:
      return runtime, m
  return "qjax", row["runtimes"]["qjax"]


def _row_line(row: dict) -> str:
  parts = [f"{runtime} KL {m['kl']:.4f}" for runtime, m in row["runtimes"].items() if "missing" not in m]
  return f"{row['size_mb']:.1f} MB, {row['bpw']:.2f} bits/weight; " + ", ".join(parts)


def verdict(rows: list[dict], kl_budget: float) -> list[str]:
  """Per runtime family: the smallest file whose KL divergence, measured in its own runtime, is within budget."""
  lines = []
  for family in (GPU_SERVING, CPU):
    members = [r for r in rows if r["family"] == family]
    if not members:
      continue
    fits = [r for r in members if own_measure(r)[1]["kl"] <= kl_budget]
    if fits:
      best = min(fits, key=lambda r: (r["size_mb"], own_measure(r)[1]["kl"]))
      runtime, m = own_measure(best)
      lines.append(f"{family}: {best['recipe']} ({best['label']}), {best['size_mb']:.1f} MB, KL {m['kl']:.4f} in "
                   f"{runtime}: the smallest within KL {kl_budget:g}.")  # fmt: skip
    else:
      best = min(members, key=lambda r: own_measure(r)[1]["kl"])
      runtime, m = own_measure(best)
      lines.append(f"{family}: none within KL {kl_budget:g}; the closest is {best['recipe']} ({best['size_mb']:.1f} "
                   f"MB, KL {m['kl']:.4f} in {runtime}).")  # fmt: skip
  return lines


def write_outputs(out: str, summary: dict, *, model_name: str) -> None:
  """compare.json, compare.md (the table and the verdict) and compare.png (KL against bits per weight)."""
  rows = summary["rows"]
  _write_json(os.path.join(out, "compare.json"), summary)
  lines = [
    f"{model_name}: {summary['eval_tokens']} scored tokens, float perplexity {summary['float_perplexity']:.3f}. "
    "Every row is scored against the same stored float logits; KL is the mean KL divergence per token, p99 its 99th "
    "percentile, Δp the mean absolute change in the correct token's probability; prefill tok/s is the runtime's own "
    "forward over the evaluation windows on this machine; bits/weight is the file's size over the model's parameters.",
    "",
    "| recipe | format | runtime | KL | KL p99 | top-1 | Δp | perplexity | prefill tok/s | size MB | bits/weight |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    for runtime, m in r["runtimes"].items():
      if "missing" in m:
        lines.append(f"| {r['recipe']} | {r['format']} | {runtime} | ({m['missing']}) | | | | | | | |")
        continue
      lines.append(
        f"| {r['recipe']} | {r['format']} | {runtime} | {m['kl']:.4f} | {m['kl_p99']:.3f} | {100 * m['top1']:.1f}% | "
        f"{m['delta_p']:.4f} | {m['perplexity']:.3f} | {m['prefill_tokens_per_second']:.0f} | {r['size_mb']:.1f} | "
        f"{r['bpw']:.2f} |"
      )
  lines += ["", *verdict(rows, summary["kl_budget"])]
  with atomic_file(os.path.join(out, "compare.md")) as tmp, open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  _plot(os.path.join(out, "compare.png"), rows, summary["kl_budget"])


def _plot(path: str, rows: list[dict], kl_budget: float) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  markers = {"gguf": "s", "gptq": "o", "gptq_v2": "o", "awq": "^", "compressed-tensors": "D"}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, marker in markers.items():
    pts = [(r, own_measure(r)) for r in rows if r["format"].partition(":")[0] == kind]
    if pts:
      ax.scatter([r["bpw"] for r, _ in pts], [m["kl"] for r, (_, m) in pts], marker=marker, label=kind)
    for r, (_, m) in pts:
      ax.annotate(r["recipe"], (r["bpw"], m["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.axhline(kl_budget, color="gray", linestyle="--", label=f"KL budget {kl_budget:g}")
  ax.set_xlabel("bits per weight (file size / parameters)")
  ax.set_ylabel("mean KL divergence from float (own runtime)")
  ax.set_yscale("log")
  ax.legend(fontsize=8)
  fig.tight_layout()
  with atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
