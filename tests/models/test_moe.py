"""Mixtures of experts (Mixtral, Qwen3-MoE): routing and grouped matmuls against a float64 reference, and logits
equal to transformers' through qjax's loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calib import text as texts
from qjax.models.moe import group_by_expert, grouped_matmul, route
from tests.model_factory import assert_logits_match_transformers, write_random_moe


def test_grouped_matmul_is_each_tokens_experts_and_both_methods_agree():
  rng = np.random.default_rng(0)
  n, d, f, e, k = 37, 16, 24, 6, 3
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(e, d, f)).astype(np.float32)
  weights, experts = route(jnp.asarray(rng.normal(size=(n, e)) * 3, jnp.float32), k, normalize=True)
  experts = np.asarray(experts)
  assert (np.sort(experts, axis=1)[:, 1:] != np.sort(experts, axis=1)[:, :-1]).all()  # k distinct experts
  np.testing.assert_allclose(np.asarray(weights).sum(1), 1, rtol=1e-6)
  rows, row_of_pair = group_by_expert(jnp.asarray(x), jnp.asarray(experts), e)
  assert np.asarray(rows.group_sizes).tolist() == np.bincount(experts.ravel(), minlength=e).tolist()
  want = np.einsum("nd,nkdf->nkf", x.astype(np.float64), w.astype(np.float64)[experts])
  for method in ("tiles", "ragged"):
    got = np.asarray(grouped_matmul(rows, jnp.asarray(w), method=method))[np.asarray(row_of_pair)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Rows that belong to no pair are padding: zero.
  used = np.zeros(rows.x.shape[0], bool)
  used[np.asarray(row_of_pair).ravel()] = True
  assert not np.asarray(rows.x)[~used].any()


@pytest.mark.parametrize(
  "family,kwargs",
  [
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Dense layers between sparse ones (layer 0 listed, layer 2 skipped by the step), 3 of 5 experts per token,
    # the chosen probabilities left unnormalised.
    ("Qwen3Moe", dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=48, mlp_only_layers=[0],
                      decoder_sparse_step=2, norm_topk_prob=False, layers=4)),
    ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=32, norm_topk_prob=True)),
  ],
  ids=["mixtral", "qwen3moe-dense-layers-odd-k", "qwen3moe-top1"],
)
def test_moe_logits_match_transformers(tmp_path, family, kwargs):
  path = write_random_moe(str(tmp_path / "moe"), family=family, **kwargs)
  tokens = texts.tokenize(texts_tokenizer(path), texts.load_text("default", "evaluation"))[:40]
  checkpoint = assert_logits_match_transformers(path, np.asarray(tokens)[None], family)
  config = checkpoint.config
  assert config.num_experts == (kwargs.get("num_experts") or kwargs["num_local_experts"])
  if family == "Qwen3Moe" and "mlp_only_layers" in kwargs:
    assert config.dense_layers == (0, 2) and [config.moe(i) for i in range(4)] == [False, True, False, True]
    assert "experts" not in checkpoint.layer_params(0)["mlp"]
  block = checkpoint.layer_params(1)["mlp"]
  assert block["experts"]["down_proj"]["kernel"].shape == (config.num_experts, config.expert_size, 64)


def texts_tokenizer(path):
  from qjax.formats import open_checkpoint

  return open_checkpoint(path).tokenizer()
