"""Orthogonal rotations that spread weight outliers: randomized Hadamard matrices (QuaRot).

A rotation ``R`` of the residual stream leaves a transformer's function unchanged when it
is folded into the weights around it (``x R · Rᵀ W = x W``), but mixes every input channel
of a linear into every other, so no single channel's outlier dominates a quantization group.
QuaRot uses ``R = H diag(±1) / sqrt(n)`` with ``H`` a Hadamard matrix.

Hadamard matrices exist for orders 1, 2 and multiples of 4; this module builds those it
can as Kronecker products of Sylvester (``2^k``) and Paley I (``q + 1`` for a prime
``q ≡ 3 mod 4``) matrices, e.g. ``576 = 12 · 48``. For other orders it falls back to a random
orthogonal matrix (QR of a Gaussian matrix, SpinQuant's initialisation).
"""

import functools

import numpy as np


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def paley(q: int) -> np.ndarray:
  """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
  if not (_is_prime(q) and q % 4 == 3):
    raise ValueError(f"`paley` expected a prime q ≡ 3 (mod 4), got {q}.")
  residues = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
  jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
  s = np.zeros((q + 1, q + 1), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = jacobsthal
  return s + np.eye(q + 1, dtype=np.int64)


def sylvester(n: int) -> np.ndarray:
  """The Sylvester Hadamard matrix of order ``n = 2^k``."""
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  if h.shape[0] != n:
    raise ValueError(f"`sylvester` expected a power of two, got {n}.")
  return h


@functools.cache
def _factorization(n: int) -> tuple[int, ...] | None:
  """Orders whose product is `n`, each a power of two or ``q + 1`` (Paley), or None."""
  if n & (n - 1) == 0:
    return (n,)
  for m in range(4, n + 1, 4):
    if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
      rest = _factorization(n // m)
      if rest is not None:
        return (m, *rest)
  return None


def hadamard(n: int) -> np.ndarray | None:
  """A Hadamard matrix of order `n` (entries ±1, ``H Hᵀ = n I``), or None if not constructible here."""
  orders = _factorization(n)
  if orders is None:
    return None
  h = np.ones((1, 1), np.int64)
  for m in orders:
    h = np.kron(h, sylvester(m) if m & (m - 1) == 0 else paley(m - 1))
  return h


def random_rotation(n: int, *, seed: int = 0) -> np.ndarray:
  """A random orthogonal (n, n) float64 matrix: ``H diag(±1) / sqrt(n)``, or a QR rotation without ``H``.

  Examples:
    >>> r = random_rotation(576)
    >>> bool(np.allclose(r @ r.T, np.eye(576)))
    True
  """
  rng = np.random.default_rng(seed)
  h = hadamard(n)
  if h is None:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))
  return h * rng.choice([-1.0, 1.0], size=n)[None, :] / np.sqrt(n)
