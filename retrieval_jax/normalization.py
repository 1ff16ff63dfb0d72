"""L2 normalisation with the published epsilon convention (DESIGN §4.1)."""

from __future__ import annotations

import jax.numpy as jnp

L2_EPS = 1e-6


def l2n(x: jnp.ndarray, axis: int = -1, eps: float = L2_EPS) -> jnp.ndarray:
  """L2-normalises ``x`` along ``axis`` as ``x / (||x||_2 + eps)``.

  The epsilon is added to the norm (not to the squared norm and not as a max), which is what
  cirtorch / revisitop compute, so descriptors match theirs bit for bit up to float rounding. An
  all-zero vector stays zero, and its gradient is finite: the norm is taken with the double-
  ``where`` square root of :func:`retrieval_jax.distances.safe_sqrt` (``jnp.linalg.norm`` has a
  NaN gradient at 0, which would poison a whole training step through one empty region or a
  MAC of an all-zero ReLU map).

  Args:
    x: array of any shape, e.g. descriptors ``[N, D]`` or region vectors ``[B, R, C]``.
    axis: the axis holding the vector components.
    eps: added to the norm.

  Returns:
    Array of the same shape and dtype as ``x``.
  """
  x = jnp.asarray(x)
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return x / (norm + eps)
