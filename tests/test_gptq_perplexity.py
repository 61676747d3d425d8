"""GPTQ against RTN on the default model's perplexity, at 4 and 3 bits with groups of 128."""

import pytest

from qjax.calib import text as texts
from qjax.cli.quantize import Settings
from qjax.eval.metrics import evaluate
from qjax.formats import open_checkpoint
from qjax.models import logits_fn
from tests.model_factory import quantize_like_cli


@pytest.mark.slow
def test_gptq_is_clearly_better_than_rtn_at_4_and_3_bits():
  checkpoint = open_checkpoint("default")
  tokenizer = checkpoint.tokenizer()
  calib = texts.calibration_windows(texts.tokenize(tokenizer, texts.load_text("default", "calibration")), 16, 256)
  evaluation = texts.eval_windows(texts.tokenize(tokenizer, texts.load_text("default", "evaluation")), 512,
                                  max_windows=4)  # fmt: skip
  ppl = {}
  for bits in (4, 3):
    for method in ("rtn", "gptq"):
      s = Settings(method=method, bits=bits, group_size=128, nsamples=16, seqlen=256)
      _, _, params = quantize_like_cli(s, checkpoint=checkpoint, windows=calib)
      ppl[method, bits] = evaluate(logits_fn(checkpoint.config, params), evaluation, show_progress=False).perplexity
  for bits in (4, 3):
    assert ppl["gptq", bits] < 0.9 * ppl["rtn", bits], ppl
