"""Files qjax did not write, examined before they are opened: regular files only, sizes bounded before reading.

A path a user (or a file) names may be a directory, a FIFO (opening it blocks until a writer comes), a device
(reading it may never end) or a file far larger than it should be; each is refused by `os.stat` alone, naming the
source, and a file replaced between the check and the open is caught by ``fstat`` on the opened descriptor.
"""

import os
import stat

from qjax.core.errors import InputError


def one_line(e: BaseException) -> str:
  """The first line of an exception's message, cut short, for a one-line error naming a file."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def regular_file(path: str, source: str, *, kind: str = "file") -> os.stat_result:
  """`os.stat` of `path`, which must be a regular file; it is not opened.

  Args:
    path: the file.
    source: what the message names (the file itself, or the file or flag that named it).
    kind: what the file should be, for the message (``"file"``, ``"text file"``).

  Raises:
    FileNotFoundError: if `path` does not exist.
    InputError: naming `source` when it is a directory, FIFO, device or cannot be examined.
  """
  named = "" if path == source else f" {path!r}"
  try:
    st = os.stat(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{source}: no such {kind}{named}.") from e
  except (OSError, ValueError) as e:
    raise InputError(f"{source}:{named} cannot be examined ({one_line(e)}).") from e
  if not stat.S_ISREG(st.st_mode):
    raise InputError(f"{source}:{named} expected a regular {kind}, got a directory, FIFO, socket or device.")
  return st


def read_bounded(path: str, *, max_bytes: int, content: str, kind: str = "file") -> bytes:
  """The bytes of a regular file of at most `max_bytes`, refused before reading when larger.

  Args:
    path: the file.
    max_bytes: the most it may hold; checked on the size before the open, and on what was read.
    content: what it holds, for the message (``"JSON"``, ``"text"``).
    kind: what the file should be, for the message.

  Raises:
    FileNotFoundError: if `path` does not exist.
    InputError: naming the file when it is not a regular file, is larger than `max_bytes` (or grew past it
      while read), or cannot be read.
  """
  size = regular_file(path, path, kind=kind).st_size
  too_big = f"{path}: expected at most {max_bytes} bytes of {content}, got"
  if size > max_bytes:
    raise InputError(f"{too_big} {size}.")
  try:
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
      if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the stat above
        raise InputError(f"{path}: expected a regular {kind}, got something else.")
      data = f.read(max_bytes + 1)
  except OSError as e:
    raise InputError(f"{path}: cannot be read ({one_line(e)}).") from e
  if len(data) > max_bytes:
    raise InputError(f"{too_big} more (it grew while read).")
  return data
