"""Perplexity, KL divergence against a reference model, and top-1 agreement on the same tokens."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from qjax.core.progress import progress

LogitsFn = Callable[[Int[Array, "b t"]], Float[Array, "b t v"]]


class EvalResult(NamedTuple):
  """Next-token metrics over the scored tokens (every token of a window but its first).

  Attributes:
    perplexity: ``exp(nll)``.
    nll: mean negative log-likelihood per token, in nats.
    kl_divergence: mean ``KL(reference || model)`` of next-token distributions, or None.
    top1_agreement: fraction of positions where both models' argmax agree, or None.
    tokens: number of scored tokens.
    reference_perplexity: the reference model's perplexity on the same tokens, or None.
    kl_p99: the 99th percentile of the per-token KL divergences (the tail a mean hides), or None.
    delta_p: mean ``|p_reference(correct token) - p_model(correct token)|``, or None.
  """

  perplexity: float
  nll: float
  kl_divergence: float | None
  top1_agreement: float | None
  tokens: int
  reference_perplexity: float | None = None
  kl_p99: float | None = None
  delta_p: float | None = None

  def as_dict(self) -> dict:
    return self._asdict()


@jax.jit
def window_sums(
  logits: Float[Array, "b t v"], ids: Int[Array, "b t"], ref_logits: Float[Array, "b t v"] | None = None
) -> dict[str, Array]:
  """Sums over a batch of windows: NLL of ``ids[:, 1:]``, and KL / top-1 matches / |Δp| of the correct token
  against `ref_logits`; ``kl_tokens`` is each position's KL divergence, shape (b, t - 1), not a sum."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)
  sums = {"nll": -target_logp.sum()}
  if ref_logits is not None:
    ref_logp = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
    ref_target_logp = jnp.take_along_axis(ref_logp, targets[..., None], axis=-1)
    sums["ref_nll"] = -ref_target_logp.sum()
    kl_tokens = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    sums["kl"] = kl_tokens.sum()
    sums["kl_tokens"] = kl_tokens
    sums["top1"] = jnp.sum(jnp.argmax(ref_logp, -1) == jnp.argmax(logp, -1))
    sums["delta_p"] = jnp.abs(jnp.exp(ref_target_logp) - jnp.exp(target_logp)).sum()
  return sums


def evaluate(
  logits_fn: LogitsFn,
  windows: np.ndarray,
  *,
  reference_fn: LogitsFn | None = None,
  batch_size: int = 1,
  label: str = "eval",
  show_progress: bool = True,
) -> EvalResult:
  """Perplexity of `logits_fn` on token windows, and its divergence from `reference_fn`.

  Args:
    logits_fn: ``ids (b, t) -> logits (b, t, vocab)``.
    windows: (n, seqlen) int token windows (see `qjax.calib.text.eval_windows`).
    reference_fn: optional reference model on the same windows (e.g. the float model).
    batch_size: windows per call.
    label: progress label.
    show_progress: print a progress line with ETA.
  """
  totals: dict[str, float] = {}
  kl_tokens = []
  batches = range(0, len(windows), batch_size)
  for start in progress(batches, total=len(batches), label=label, enabled=show_progress):
    ids = jnp.asarray(windows[start : start + batch_size])
    ref = None if reference_fn is None else reference_fn(ids)
    sums = window_sums(logits_fn(ids), ids, ref)
    if "kl_tokens" in sums:
      kl_tokens.append(np.asarray(sums.pop("kl_tokens")).ravel())
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = int(windows.shape[0] * (windows.shape[1] - 1))
  nll = totals["nll"] / n
  return EvalResult(
    perplexity=float(np.exp(nll)),
    nll=nll,
    kl_divergence=totals["kl"] / n if "kl" in totals else None,
    top1_agreement=totals["top1"] / n if "top1" in totals else None,
    tokens=n,
    reference_perplexity=float(np.exp(totals["ref_nll"] / n)) if "ref_nll" in totals else None,
    kl_p99=float(np.percentile(np.concatenate(kl_tokens), 99)) if kl_tokens else None,
    delta_p=totals["delta_p"] / n if "delta_p" in totals else None,
  )
