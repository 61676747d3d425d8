import re

import numpy as np
import pytest

from qjax.core import ClipSearch, QSpec, dequantize
from qjax.quantizers import rtn_quantize


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_with_mse_clip_beats_plain_rtn_on_student_t(bits):
  w = np.random.default_rng(0).standard_t(df=4, size=(512, 128)).astype(np.float32)
  spec = QSpec(bits=bits, group_size=64)
  plain = dequantize(rtn_quantize(w, spec=spec))
  clipped = dequantize(rtn_quantize(w, spec=spec, clip=ClipSearch()))
  assert np.mean((clipped - w) ** 2) < np.mean((plain - w) ** 2)


def test_more_bits_less_error():
  w = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
  errors = [np.mean((dequantize(rtn_quantize(w, spec=QSpec(bits=b, group_size=64))) - w) ** 2) for b in (2, 3, 4, 8)]
  assert errors == sorted(errors, reverse=True)
  assert errors[-1] < 1e-4


def test_group_size_must_divide():
  with pytest.raises(ValueError, match=re.escape("group_size=128 for shape=(576, 8) (in=576)")):
    rtn_quantize(np.zeros((576, 8), np.float32), spec=QSpec(bits=4, group_size=128))


def test_partial_last_group_matches_zero_padding():
  w = np.random.default_rng(2).standard_normal((576, 16)).astype(np.float32)
  spec = QSpec(bits=4, group_size=128, partial_groups=True)
  q = rtn_quantize(w, spec=spec)
  assert q.scale.shape == (5, 16)
  padded = np.concatenate([w, np.zeros((64, 16), np.float32)])
  full = rtn_quantize(padded, spec=QSpec(bits=4, group_size=128))
  np.testing.assert_array_equal(q.scale, full.scale)
  np.testing.assert_array_equal(dequantize(q), dequantize(full)[:576])
