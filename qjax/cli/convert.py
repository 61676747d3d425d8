"""Convert a quantized model to another format: GPTQ or AWQ checkpoints (from qjax, GPTQModel, AutoGPTQ,
AutoAWQ) and qjax directories to GGUF, GPTQ or AWQ.

To GGUF, groups whose grid a ggml block type holds are copied (a 4-bit asymmetric group of 32 is a Q4_1
block up to the fp16 rounding of its minimum, a symmetric one a Q4_0 block); the rest are requantized with
llama.cpp's encoders. A table reports, per source grid and type, the error added to the source weights.

Example:
  qjax convert --from=runs/gptq4-hf --to=gguf:Q4_1                  # writes runs/gptq4-hf-Q4_1.gguf
  qjax convert --from=path/to/Llama-GPTQ --to=gguf:Q4_K_M --out=model-q4km.gguf   # k-quants: requantized
  qjax convert --from=runs/gptq-w4g128 --to=gptq                    # a qjax directory as a GPTQ checkpoint
"""

import time

from absl import flags

from qjax.formats import convert
from qjax.formats.targets import Target, loader_note, parse_target

_FROM = flags.DEFINE_string(
    "from", None, "The quantized model: a GPTQ, AWQ or compressed-tensors Hugging Face directory, or a qjax directory. "
    "Example: --from=runs/gptq4-hf.", required=True,
)  # fmt: skip
_TO = flags.DEFINE_string(
    "to", None, "The target: gguf:<TYPE>, TYPE a llama.cpp file type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_M, "
    "Q4_K_M, Q5_K_M, Q6_K, …: its recipe's type for each quantized tensor) or F32/F16/BF16 to dequantize; or gptq, "
    "gptq_v2, awq, compressed-tensors (a Hugging Face directory). Example: --to=gguf:Q4_1.", required=True,
)  # fmt: skip
_OUT = flags.DEFINE_string(
  "out", None, "Output file (GGUF) or directory (default: <from>-<TYPE>.gguf, or <from>-<format>)."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a previous qjax output at --out (files qjax did not write are never replaced)."
)


def default_out(source: str, target: Target) -> str:
  base = source.rstrip("/")
  return f"{base}-{target.gguf_type}.gguf" if target.is_gguf else f"{base}-{target.kind}"


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  source = flags.FLAGS["from"].value
  target = parse_target(_TO.value, flag="--to")
  out = _OUT.value or default_out(source, target)
  start = time.perf_counter()
  report = convert.convert_model(source, target, out, overwrite=_OVERWRITE.value)
  if report:
    print(convert.summary(report))
  print(f"\nwrote {out}  ({time.perf_counter() - start:.0f}s)")
  if note := loader_note(target, out):
    print(note)
