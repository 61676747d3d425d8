"""The `qjax` command: `qjax quantize | eval | convert | compare | bench | plan`.

Each subcommand is an absl app in its own module; absl flags are process-global, so
only the chosen subcommand's module is imported and only its flags exist.
"""

import importlib
import os
import signal
import sys
import threading
import traceback

from absl import app, flags, logging

COMMANDS = {
  "quantize": ("qjax.cli.quantize", "quantize a model (GPTQ, AWQ, RTN, GGUF recipes), report its cost, export it"),
  "eval": ("qjax.cli.evaluate", "perplexity, KL divergence and top-1 agreement of a model on a text"),
  "convert": ("qjax.cli.convert", "convert a GPTQ, AWQ, compressed-tensors or qjax model to another format"),
  "compare": ("qjax.cli.compare", "quantize with several recipes, score each in its own runtime, pick by budget"),
  "bench": ("qjax.cli.bench", "time a model's prefill and decode on this device"),
  "plan": ("qjax.cli.plan", "forecast a run's memory, time and output size from config.json, before booking devices"),
}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, KeyError, OSError)


class Interrupted(Exception):
  """Ctrl-C during a command: its message says what was kept and how to go on."""


# Python prints and drops an exception raised in a garbage-collection callback or a finalizer; JAX runs a callback
# on every collection, so a Ctrl-C landing there would be lost and the run would go on to the end.
_DROPPING_FRAMES = ("_xla_gc_callback", "__del__")
# Set by `on_sigint`. An error raised after it is the Ctrl-C in disguise: a C++ extension that calls back into
# Python (JAX's compilation caches compare keys with __eq__) turns a KeyboardInterrupt raised there into its own error.
_SIGINT = threading.Event()


def interrupted(e: BaseException) -> bool:
  """Whether `e` ends the command because the user pressed Ctrl-C."""
  return isinstance(e, KeyboardInterrupt) or _SIGINT.is_set()


def on_sigint(signum, frame) -> None:
  """Raises KeyboardInterrupt as Python's own handler does, except where Python would drop it (`_DROPPING_FRAMES`):
  there the signal is delivered again a moment later, outside that frame."""
  if frame is not None and frame.f_code.co_name in _DROPPING_FRAMES:
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    return
  _SIGINT.set()
  raise KeyboardInterrupt


def usage() -> str:
  lines = ["usage: qjax <command> [--flags]   (qjax <command> --help for its flags)", "", "commands:"]
  lines += [f"  {name:10s} {summary}" for name, (_, summary) in COMMANDS.items()]
  return "\n".join(lines)


def _describe(e: Exception) -> str:
  """One line for an error: the message, or for an OSError its file and cause (e.g. a full disk)."""
  if isinstance(e, OSError) and e.strerror:
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
  return str(e)


def _fail(command: str, message: str, hint: str) -> None:
  first = message.strip().splitlines()[0] if message.strip() else "failed"
  sys.stderr.write(f"qjax {command}: error: {first}\n  hint: {hint}\n")
  sys.exit(2)


def _parse(command: str, module):
  def parse(argv: list[str]) -> list[str]:
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
      print(f"qjax {command}: {COMMANDS[command][1]}\n\n{module.__doc__.strip()}\n")
      print(flags.FLAGS.module_help(module))
      for name in getattr(module, "SHARED_FLAGS", ()):  # another command's flags it reads too
        flag = flags.FLAGS[name]
        print(f"  --{name}: {flag.help}\n    (default: {flag.default!r})")
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _fail(command, str(e), f"see `qjax {command} --help`")

  return parse


def run(argv: list[str] | None = None) -> None:
  """Entry point of the `qjax` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  # transformers' advice (e.g. that PyTorch is not installed, which qjax does not need) is not for our users.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  if command not in COMMANDS:
    _fail("", f"unknown command {command!r}", f"one of: {', '.join(COMMANDS)}")
  module = importlib.import_module(COMMANDS[command][0])
  flags.DEFINE_bool("verbose", False, "Show full tracebacks of errors.")

  def main(args):
    # JAX and orbax log at INFO through absl; a user wants progress lines, not those.
    logging.set_verbosity(logging.INFO if flags.FLAGS.verbose else logging.WARNING)
    signal.signal(signal.SIGINT, on_sigint)
    try:
      module.main(args)
    except (KeyboardInterrupt, Exception) as e:
      if isinstance(e, Interrupted) or interrupted(e):
        sys.stderr.write(f"\nqjax {command}: {e if isinstance(e, Interrupted) else 'interrupted.'}\n")
        sys.exit(130)
      if not isinstance(e, USER_ERRORS):
        raise
      if flags.FLAGS.verbose:
        traceback.print_exc()
      _fail(command, _describe(e), "run with --verbose for the full traceback")

  app.run(main, argv=[f"qjax {command}", *argv[2:]], flags_parser=_parse(command, module))
