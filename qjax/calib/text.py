"""Calibration and evaluation text, and how it is cut into token windows.

The built-in text is Python's own documentation topics (`pydoc_data.topics`, shipped
with every Python): about 490 KB of English technical prose. Topics are sorted by name
and every fourth one goes to the evaluation part, the rest to the calibration part, so
the two never share a passage. Any UTF-8 text file can replace either part.
"""

import numpy as np

from qjax.core.errors import InputError
from qjax.core.files import read_bounded

DEFAULT = "default"
MAX_TEXT_BYTES = 1 << 30  # a larger text is a mistake (or a device); it would be read whole into memory


def default_text() -> tuple[str, str]:
  """``(calibration, evaluation)`` parts of the built-in text."""
  from pydoc_data.topics import topics

  names = sorted(topics)
  calibration = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 4 != 3)
  evaluation = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 4 == 3)
  return calibration, evaluation


def load_text(source: str, part: str) -> str:
  """The text named by `source`: ``"default"`` (its `part`, "calibration" or "evaluation") or a file path.

  Raises:
    FileNotFoundError: if the file does not exist.
    InputError: naming the file when it is not a regular file (a directory, FIFO or device is never opened), is
      larger than 1 GiB, is not UTF-8 (with the offset of the first bad byte), or holds no text.
  """
  if source == DEFAULT:
    calibration, evaluation = default_text()
    return {"calibration": calibration, "evaluation": evaluation}[part]
  try:
    data = read_bounded(source, max_bytes=MAX_TEXT_BYTES, content="text", kind="text file")
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{source}: no such text file (use a UTF-8 text file, or 'default').") from e
  try:
    text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # newlines as text mode reads them
  except UnicodeDecodeError as e:
    raise InputError(f"{source}: expected UTF-8 text, got byte 0x{data[e.start]:02x} at offset {e.start}.") from e
  if not text.strip():
    raise InputError(f"{source}: expected some text, got {'an empty file' if not text else 'only whitespace'}.")
  return text


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids (n,) int32 of a whole text (no special tokens added in the middle)."""
  ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
  return np.asarray(ids, np.int32)


def eval_windows(tokens: np.ndarray, seqlen: int, *, max_windows: int | None = None) -> np.ndarray:
  """Non-overlapping windows (n, seqlen) from the start of `tokens`; the incomplete tail is dropped.

  Raises:
    ValueError: if the text holds fewer than `seqlen` tokens.
  """
  n = len(tokens) // seqlen
  if n == 0:
    raise ValueError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of seqlen={seqlen}.")
  if max_windows is not None:
    n = min(n, max_windows)
  return tokens[: n * seqlen].reshape(n, seqlen)


def calibration_windows(tokens: np.ndarray, nsamples: int, seqlen: int, *, seed: int = 0) -> np.ndarray:
  """`nsamples` windows (nsamples, seqlen) at seeded random offsets, as GPTQ's reference samples them.

  Raises:
    ValueError: if the text is shorter than one window.
  """
  if len(tokens) <= seqlen:
    raise ValueError(
      f"the calibration text has {len(tokens)} tokens, fewer than one sequence of seqlen={seqlen}; "
      "use a longer text or a smaller --seqlen."
    )
  starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen, size=nsamples)
  return np.stack([tokens[s : s + seqlen] for s in starts])
