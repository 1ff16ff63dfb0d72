"""A whitening projection as a Flax layer, initialised from PCA-w or Lw and then trained or kept
fixed (LRML §3.1.2: "a whitening layer at the end of the network ... learned end to end";
REMAP §III-D: "FC layer initialised with PCA + whitening"; DLRTN's shared region FC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def whitening_params(mean, P, dims: int | None = None) -> dict[str, np.ndarray]:
  """Dense parameters computing ``P[:dims] (x - mean)`` (the projection of
  :func:`retrieval_jax.whitening.apply_whitening`, before its L2 normalisation).

  Args:
    mean: ``[D]`` from ``learn_pca_whitening`` / ``learn_lw``.
    P: ``[K, D]`` projection, rows = components in decreasing order.
    dims: keep the first ``dims`` components (default all ``K``).

  Returns:
    ``{"kernel": [D, dims], "bias": [dims]}`` float32, to put under the layer's name in
    ``params``.
  """
  P = np.asarray(P, np.float64)
  mean = np.asarray(mean, np.float64)
  if P.ndim != 2 or mean.shape != (P.shape[1],):
    raise ValueError(f"P must be [K, D] and mean [D]; got P {P.shape} and mean {mean.shape}.")
  dims = P.shape[0] if dims is None else dims
  if not 1 <= dims <= P.shape[0]:
    raise ValueError(f"dims must be in [1, {P.shape[0]}]; got {dims}.")
  P = P[:dims]
  return {"kernel": P.T.astype(np.float32), "bias": (-(P @ mean)).astype(np.float32)}


class Whitening(nn.Module):
  """``x @ kernel + bias`` over the last axis; ``trainable=False`` keeps it fixed (no gradient
  reaches the parameters, so an optimizer leaves them as initialised).

  Initialise from learned whitening by replacing the layer's params with
  :func:`whitening_params` (e.g. ``params["whiten"] = whitening_params(mean, P, dims)``).

  ``[..., D] -> [..., features]``.
  """
  features: int
  trainable: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if not self.trainable:
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    return (jnp.asarray(x, self.dtype) @ kernel.astype(self.dtype)) + bias.astype(self.dtype)
