"""Named quantization schemes: ``--method`` strings such as ``awq+gptq`` or ``rotate+rtn`` as recipes of parts.

A scheme is zero or more transforms that prepare the float weights, then one rounding:

* ``rotate``: a randomized Hadamard rotation of the residual stream folded into the weights
  (QuaRot), applied to the checkpoint as it streams (`qjax.models.rotate.RotatedCheckpoint`);
* ``awq``: activation-aware scales and clipping (`qjax.calib.awq.awq`; scales only before ``gptq``);
* ``lwc``: clipping ranges learned with optax (`qjax.calib.lwc.learned_clipping`);
* the rounding: ``rtn`` (the default when only preparations are named), ``gptq``, or, with a
  GGUF export, llama.cpp's k-quant encoders on the recipe's per-tensor types.

Each part is an ordinary transform, so the same recipes read as a few lines in a script:
``quantize_blocks(LlamaBlocks(checkpoint), [awq(spec, clip=False), rules_transform([(pat, gptq(spec))])], windows)``.
"""

from typing import NamedTuple

PREPARATIONS = ("rotate", "awq", "lwc")
ROUNDINGS = ("rtn", "gptq")


class Scheme(NamedTuple):
  """A parsed ``--method``.

  Attributes:
    preparations: transforms before rounding, in the order given.
    rounding: "rtn", "gptq", or None (GGUF export: the recipe's encoders; ``none``: nothing).
  """

  preparations: tuple[str, ...]
  rounding: str | None

  @property
  def needs_calibration(self) -> bool:
    return self.rounding == "gptq" or any(p in ("awq", "lwc") for p in self.preparations)


def parse_method(method: str, *, gguf_export: bool = False) -> Scheme:
  """Parses ``none``, ``rtn``, ``gptq``, ``awq``, ``awq+gptq``, ``rotate+rtn``, ``lwc`` …

  Raises:
    ValueError: naming the unknown part, or a preparation after the rounding.
    NotImplementedError: for a rounding combined with a GGUF export (it would round twice).
  """
  if method == "none":
    return Scheme((), None)
  parts = method.split("+")
  unknown = [p for p in parts if p not in PREPARATIONS + ROUNDINGS]
  if unknown:
    raise ValueError(
      f"--method={method}: unknown part {unknown[0]!r}; combine {'/'.join(PREPARATIONS)} (in that order) "
      f"with one of {'/'.join(ROUNDINGS)}, e.g. awq+gptq."
    )
  *preparations, last = parts
  if last in PREPARATIONS:
    preparations, last = [*preparations, last], None
  if any(p in ROUNDINGS for p in preparations):
    raise ValueError(f"--method={method}: the rounding ({'/'.join(ROUNDINGS)}) must come last.")
  if sorted(preparations, key=PREPARATIONS.index) != preparations or len(set(preparations)) != len(preparations):
    raise ValueError(f"--method={method}: preparations must appear once each, in the order {'+'.join(PREPARATIONS)}.")
  if gguf_export and last is not None:
    raise NotImplementedError(
      f"--method={method} with a GGUF export: {last}'s rounding into ggml block grids is not built, and "
      "re-quantizing its result would round twice; use --method=none (or awq / rotate, which only prepare "
      "the weights) to encode them as llama.cpp does."
    )
  return Scheme(tuple(preparations), last if last is not None or gguf_export else "rtn")
