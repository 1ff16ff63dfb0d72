"""l2n: cirtorch's x / (||x|| + eps), with a finite gradient at the zero vector."""

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.normalization import L2_EPS, l2n


def test_values_match_the_published_formula(rng):
  x = rng.normal(size=(5, 7)).astype(np.float32)
  x[2] = 0.0
  want = x / (np.linalg.norm(x, axis=1, keepdims=True) + L2_EPS)
  np.testing.assert_allclose(l2n(x), want, rtol=1e-6)
  np.testing.assert_allclose(l2n(x.T, axis=0), want.T, rtol=1e-6)
  assert not np.asarray(l2n(x))[2].any()


def test_gradient_is_finite_at_zero_and_exact_elsewhere(rng):
  v = jnp.asarray(rng.normal(size=4))
  g = np.asarray(jax.grad(lambda u: l2n(u)[0])(v), np.float64)
  x = np.asarray(v, np.float64)
  n = np.linalg.norm(x)
  # d/dx_j [x_0 / (n + eps)] = delta_0j / (n + eps) - x_0 x_j / (n (n + eps)^2)
  want = np.eye(4)[0] / (n + L2_EPS) - x[0] * x / (n * (n + L2_EPS) ** 2)
  np.testing.assert_allclose(g, want, rtol=1e-4)
  at_zero = np.asarray(jax.grad(lambda u: l2n(u).sum())(jnp.zeros(4)))
  np.testing.assert_allclose(at_zero, np.full(4, 1.0 / L2_EPS), rtol=1e-5)
