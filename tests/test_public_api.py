import importlib

import pytest

import qjax
from qjax.schemes import Scheme, parse_method

PACKAGES = ["qjax", "qjax.core", "qjax.quantizers", "qjax.transforms", "qjax.calib", "qjax.models", "qjax.formats",
            "qjax.eval", "qjax.kernels"]  # fmt: skip


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_exists(name):
  module = importlib.import_module(name)
  missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
  assert not missing, missing


def test_top_level_surface():
  assert {"QSpec", "QArray", "quantize_params", "chain", "gptq", "awq", "quantize_blocks"} <= set(qjax.__all__)


@pytest.mark.parametrize(
  ("method", "gguf", "expected"),
  [
    ("rtn", False, Scheme((), "rtn")),
    ("awq+gptq", False, Scheme(("awq",), "gptq")),
    ("rotate+awq", False, Scheme(("rotate", "awq"), "rtn")),
    ("awq", True, Scheme(("awq",), None)),
    ("none", True, Scheme((), None)),
  ],
)
def test_parse_method(method, gguf, expected):
  assert parse_method(method, gguf_export=gguf) == expected


@pytest.mark.parametrize(
  ("method", "message"),
  [("gptq+awq", "must come last"), ("awq+rotate", "in the order"), ("magic", "unknown part 'magic'")],
)
def test_bad_methods(method, message):
  with pytest.raises(ValueError, match=message):
    parse_method(method)
  with pytest.raises(NotImplementedError, match="round twice"):
    parse_method("gptq", gguf_export=True)
