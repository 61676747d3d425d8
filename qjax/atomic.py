"""Directories that appear complete or not at all: written to a temporary sibling, then renamed."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str, *, replace: bool = True) -> Iterator[str]:
  """Yields an empty temporary directory beside `out_dir` that becomes `out_dir` when the block succeeds.

  An interrupted or failing write leaves no `out_dir` (and no temporary directory) behind.

  Args:
    out_dir: the directory to create; its parent is created if missing.
    replace: remove an existing `out_dir` once the new one is complete; otherwise refuse it.

  Raises:
    FileExistsError: with ``replace=False``, if `out_dir` exists (also when another process
      finished it first).

  Examples:
    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "model")
    >>> with atomic_directory(out) as tmp:
    ...   open(os.path.join(tmp, "config.json"), "w").close()
    >>> os.listdir(out)
    ['config.json']
  """
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
  try:
    yield tmp
    if replace:
      if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
      os.replace(tmp, out_dir)
    else:
      try:
        os.rename(tmp, out_dir)
      except OSError as e:
        raise FileExistsError(f"{out_dir}: already exists.") from e
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
