"""The error qjax raises for bad input: a file, a tensor inside it, or a flag, named in a one-line message."""


class InputError(ValueError):
  """Input qjax cannot use, found before any long work: the message is one line naming the file, tensor or flag,
  what was expected and what was found. ``qjax`` commands print it and exit with status 2."""
