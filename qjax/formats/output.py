"""Writing outputs without losing anything: qjax writes only where it may, and completes a write or leaves nothing.

An output directory may be written only if it does not exist, is empty, or holds a previous qjax output of the
same kind (recognised by its `MARKER` file); a previous qjax output of another kind is replaced only with
``overwrite``; anything else (a directory of someone else's files, a file, the model being read) is refused before
any work. Every output is built in a temporary sibling (`TMP_PREFIX`, holding a `PARTIAL` marker) and renamed into
place when complete; a previous output is moved aside (`OLD_PREFIX`) and removed only after the new one is in
place. A run killed at any point leaves either the old output or the new one, plus marked siblings that the next
write of the same output removes. Nothing without qjax's own marker is ever removed.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from qjax.core.errors import InputError

MARKER = "qjax_output.json"
"""Written last into every directory qjax outputs: ``{"kind": ..., "qjax": version}``."""

PARTIAL = ".qjax_partial.json"
"""Written first into a temporary output directory: ``{"out": final path}``; removed when the output is complete."""

TMP_PREFIX = ".qjax-tmp-"
OLD_PREFIX = ".qjax-old-"


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def output_kind(path: str) -> str | None:
  """The kind of qjax output at `path` (its marker's ``kind``), or None if qjax did not write it."""
  try:
    with open(os.path.join(path, MARKER)) as f:
      kind = json.load(f).get("kind")
  except (OSError, ValueError, AttributeError):
    return None
  return kind if isinstance(kind, str) else None


def check_output(path: str, kind: str, *, overwrite: bool = False, inputs: Iterable[str] = ()) -> None:
  """Raises unless `path` may receive an output of `kind` (see the module docstring); call before any work.

  Args:
    path: the output directory.
    kind: what will be written there (``"qjax"``, ``"gptq"``, ``"awq"``, ``"gguf"``, ``"checkpoint"`` …).
    overwrite: allow replacing a previous qjax output of another kind.
    inputs: paths being read (the model, texts): the output may not be, contain, or lie inside any of them.

  Raises:
    InputError: naming the path and why, with the way out.
  """
  out = _real(path)
  for given in inputs:
    source = _real(given)
    if _within(out, source) or _within(source, out):
      where = "is" if out == source else "is inside" if _within(out, source) else "contains"
      raise InputError(f"{path}: the output {where} the input {given}; choose an output outside it.")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise InputError(f"{path}: exists and is not a directory; choose a new output directory.")
  if os.path.isdir(out) and os.listdir(out):
    found = output_kind(out)
    if found is None:
      raise InputError(f"{path}: holds files qjax did not write; choose a new or empty output directory.")
    if found != kind and not overwrite:
      raise InputError(f"{path}: holds a previous qjax {found} output; pass --overwrite to replace it with {kind}.")
  _check_writable_parent(path, out)


def check_free_space(path: str, need: int, what: str, remedy: str) -> None:
  """Raises `InputError` naming `path` unless the disk it will be written to has `need` bytes free for `what`."""
  parent = os.path.dirname(_real(path))
  while not os.path.isdir(parent):  # check_output made sure the nearest existing ancestor is a directory
    parent = os.path.dirname(parent)
  free = shutil.disk_usage(parent).free
  if free < need:
    raise InputError(f"{path}: {free / 2**30:.1f} GiB free in {parent}, {what} need about {need / 2**30:.1f} GiB; "
                     f"{remedy}.")  # fmt: skip


def _check_writable_parent(given: str, out: str) -> None:
  """Raises unless the nearest existing ancestor of `out` is a directory qjax may write into."""
  parent = os.path.dirname(out)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f"{given}: {parent} is not a directory, so nothing can be written under it.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise InputError(f"{given}: cannot write into {parent} (permission denied).")


def clean_stale(path: str) -> list[str]:
  """Removes what a killed write of `path` left beside it (marked temporary and moved-aside directories)."""
  out = _real(path)
  parent, name = os.path.dirname(out), os.path.basename(out)
  removed = []
  if not os.path.isdir(parent):
    return removed
  for entry in os.listdir(parent):
    candidate = os.path.join(parent, entry)
    if entry.startswith(f"{TMP_PREFIX}{name}-") and _partial_of(candidate) == out:
      shutil.rmtree(candidate, ignore_errors=True)
      removed.append(candidate)
    elif entry.startswith(f"{OLD_PREFIX}{name}-") and output_kind(candidate) is not None:
      shutil.rmtree(candidate, ignore_errors=True)
      removed.append(candidate)
  return removed


def _partial_of(path: str) -> str | None:
  try:
    with open(os.path.join(path, PARTIAL)) as f:
      return json.load(f).get("out")
  except (OSError, ValueError, AttributeError):
    return None


@contextlib.contextmanager
def atomic_directory(path: str, kind: str = "qjax", *, overwrite: bool = False) -> Iterator[str]:
  """Yields an empty temporary directory that becomes `path` (marked as a qjax output of `kind`) on success.

  Checks `path` first (`check_output`) and removes what a killed write of it left behind. An interrupted or
  failing write leaves `path` as it was and no temporary directory.

  Raises:
    InputError: if `path` may not be written (see `check_output`).

  Examples:
    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "model")
    >>> with atomic_directory(out, "qjax") as tmp:
    ...   open(os.path.join(tmp, "config.json"), "w").close()
    >>> sorted(os.listdir(out))
    ['config.json', 'qjax_output.json']
  """
  check_output(path, kind, overwrite=overwrite)
  clean_stale(path)
  out = _real(path)
  parent, name = os.path.dirname(out), os.path.basename(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    with open(os.path.join(tmp, PARTIAL), "w") as f:
      json.dump({"out": out}, f)
    yield tmp
    _finish(tmp, out, kind)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _finish(tmp: str, out: str, kind: str) -> None:
  from qjax import __version__

  with open(os.path.join(tmp, MARKER), "w") as f:
    json.dump({"kind": kind, "qjax": __version__}, f)
  os.remove(os.path.join(tmp, PARTIAL))
  old = None
  if os.path.isdir(out):
    if os.listdir(out):  # a previous qjax output (checked): moved aside, removed once the new one is in place
      old = tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{os.path.basename(out)}-", dir=os.path.dirname(out))
      os.rename(out, os.path.join(old, "output"))
    else:
      os.rmdir(out)
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary file path beside `path` that replaces it on success; nothing is left on failure.

  The caller checks `path` (`check_file_output`) before any work.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{path}: the output directory {directory} does not exist.")
  fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}-", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_file_output(path: str, *, overwrite: bool = False, is_ours=lambda p: False, inputs: Iterable[str] = ()):
  """Raises unless a file output may be written at `path`: absent, or (with `overwrite`) a file qjax wrote.

  Args:
    path: the output file.
    overwrite: allow replacing a file `is_ours` recognises.
    is_ours: ``path -> bool``, whether an existing file is a qjax output (e.g. a GGUF with qjax's metadata).
    inputs: paths being read, which the output may not be or lie inside.
  """
  out = _real(path)
  for given in inputs:
    if _within(out, _real(given)):
      raise InputError(f"{path}: the output is or lies inside the input {given}; choose another output.")
  if os.path.lexists(out):
    if os.path.isdir(out) or not os.path.isfile(out):
      raise InputError(f"{path}: exists and is not a regular file; choose a new output file.")
    if not is_ours(out):
      raise InputError(f"{path}: exists and qjax did not write it; choose a new output file.")
    if not overwrite:
      raise InputError(f"{path}: exists (a previous qjax output); pass --overwrite to replace it.")
  _check_writable_parent(path, out)
