"""The per-tensor error report: a ggml tensor's error, computed a block of rows at a time (an embedding or head is
0.5B weights), is the error of the whole dequantized matrix."""

import numpy as np
import pytest

from qjax.core import dequantize
from qjax.eval import report
from qjax.quantizers.kquants import kquant_quantize


@pytest.mark.parametrize("axis, shape", [(0, (512, 96)), (1, (300, 256))])  # a kernel (in, out); an embedding
def test_ggml_errors_in_row_blocks_equal_the_whole_matrixs(axis, shape, monkeypatch):
  monkeypatch.setattr(report, "ERROR_BLOCK_ELEMENTS", 1000)  # several blocks, the last one short
  w = np.random.default_rng(axis).standard_normal(shape).astype(np.float32)
  q = kquant_quantize(w, type_name="Q4_K", axis=axis)
  log = report.TensorLog()
  log.record("w", w, q)
  whole = np.linalg.norm(np.asarray(dequantize(q), np.float64) - w) / np.linalg.norm(w.astype(np.float64))
  assert log.rows["w"]["relative_error"] == pytest.approx(whole, rel=1e-6)
  assert 0.02 < whole < 0.2  # Q4_K of Gaussian weights: a real error, not zero
