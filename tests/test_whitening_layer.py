"""The whitening layer reproduces apply_whitening's projection and can be frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.models.whitening_layer import Whitening, whitening_params
from retrieval_jax.whitening import apply_whitening, learn_pca_whitening


def test_layer_initialised_from_pca_matches_apply_whitening(rng):
  X = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
  mean, P = learn_pca_whitening(X)
  params = {"params": whitening_params(mean, P, dims=5)}
  projected = Whitening(5).apply(params, X.astype(np.float32))
  # Independent: the definition P[:5] (x - m) in float64.
  want = (X - mean) @ P[:5].T
  np.testing.assert_allclose(projected, want, rtol=1e-4, atol=1e-4)
  unit = projected / (np.linalg.norm(projected, axis=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(unit, apply_whitening(X.astype(np.float32), mean, P, dims=5),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainable", [True, False])
def test_gradients_reach_the_layer_only_when_trainable(rng, trainable):
  x = jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))
  layer = Whitening(3, trainable=trainable)
  params = layer.init(jax.random.PRNGKey(0), x)
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
  norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads))
  assert (norm > 0) == trainable


def test_bad_whitening_params():
  with pytest.raises(ValueError, match="dims must be in"):
    whitening_params(np.zeros(3), np.eye(3), dims=4)
  with pytest.raises(ValueError, match="P must be"):
    whitening_params(np.zeros(2), np.eye(3))
