import jax
import numpy as np

from qjax.eval import evaluate


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_perplexity_kl_and_top1_match_numpy():
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 11, size=(3, 9))
  table_a = rng.standard_normal((3, 9, 11)).astype(np.float32)
  table_b = (table_a + 0.5 * rng.standard_normal((3, 9, 11))).astype(np.float32)
  index = {tuple(w): i for i, w in enumerate(windows)}
  model = lambda ids: jax.numpy.asarray(np.stack([table_b[index[tuple(w)]] for w in np.asarray(ids)]))
  ref = lambda ids: jax.numpy.asarray(np.stack([table_a[index[tuple(w)]] for w in np.asarray(ids)]))
  result = evaluate(model, windows, reference_fn=ref, batch_size=2, show_progress=False)

  lp, lq = _log_softmax(table_a[:, :-1].astype(np.float64)), _log_softmax(table_b[:, :-1].astype(np.float64))
  targets = windows[:, 1:]
  nll = -np.take_along_axis(lq, targets[..., None], -1).mean()
  kl = np.sum(np.exp(lp) * (lp - lq), -1).mean()
  top1 = np.mean(lp.argmax(-1) == lq.argmax(-1))
  assert result.tokens == 3 * 8
  np.testing.assert_allclose(result.perplexity, np.exp(nll), rtol=1e-5)
  np.testing.assert_allclose(result.kl_divergence, kl, rtol=1e-4)
  np.testing.assert_allclose(result.top1_agreement, top1)
  ref_nll = -np.take_along_axis(lp, targets[..., None], -1).mean()
  np.testing.assert_allclose(result.reference_perplexity, np.exp(ref_nll), rtol=1e-5)
  np.testing.assert_allclose(result.kl_p99, np.percentile(np.sum(np.exp(lp) * (lp - lq), -1), 99), rtol=1e-4)
  p_target, q_target = (np.exp(np.take_along_axis(x, targets[..., None], -1)) for x in (lp, lq))
  np.testing.assert_allclose(result.delta_p, np.abs(p_target - q_target).mean(), rtol=1e-4)


def test_kl_of_a_model_against_itself_is_zero():
  windows = np.random.default_rng(1).integers(0, 7, size=(2, 5))
  fn = lambda ids: jax.nn.one_hot(ids, 7) * 3.0
  result = evaluate(fn, windows, reference_fn=fn, show_progress=False)
  assert abs(result.kl_divergence) < 1e-6 and result.top1_agreement == 1.0
