"""DLRTN's classification sub-network: class logits for a (query, positive) pair.

Min et al. (DLRTN §III-A-2, Fig. 1, Eqs. 3-5) attach to the triplet network a "fusion
sub-network, which consists of a set of Fully-Connected layers (FC) and one fusion layer
(Concat)" fed by the query and positive streams; its softmax loss over the landmark / cluster
classes regularises the triplet loss. The logits of this module are what
:func:`retrieval_jax.losses.dlrtn_loss` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class DLRTNClassifier(nn.Module):
  """FC layers per stream (shared by query and positive), concat, FC layers, class logits.

  ``q``, ``p`` of shape ``[B, ...]`` (descriptors ``[B, D]`` or fixed-size feature maps
  ``[B, H, W, C]``, flattened) ``-> logits [B, num_classes]``::

      h_q = MLP_stream(flatten(q)),  h_p = MLP_stream(flatten(p))   # same weights
      logits = Dense(num_classes)(MLP_fused(concat[h_q, h_p]))

  The two streams share weights, as the streams of the triplet network do. The paper does not
  give the layer sizes; ``stream_features=()`` and ``fused_features=()`` reduce it to one
  linear classifier on ``[q, p]``. Hidden layers use ReLU.

  Attributes:
    num_classes: number of classes C (landmarks / clusters of the training set).
    stream_features: widths of the shared per-stream hidden layers.
    fused_features: widths of the hidden layers after the concatenation.
    dtype: computation dtype (parameters are float32).
  """
  num_classes: int
  stream_features: Sequence[int] = (512,)
  fused_features: Sequence[int] = ()
  dtype: Any = jnp.float32

  def setup(self):
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1; got {self.num_classes}.")
    self.stream = [nn.Dense(f, dtype=self.dtype, name=f"stream_{i}")
                   for i, f in enumerate(self.stream_features)]
    self.fused = [nn.Dense(f, dtype=self.dtype, name=f"fused_{i}")
                  for i, f in enumerate(self.fused_features)]
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")

  def _embed(self, x: jax.Array) -> jax.Array:
    h = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
    for layer in self.stream:
      h = nn.relu(layer(h))
    return h

  def __call__(self, q: jax.Array, p: jax.Array) -> jax.Array:
    if q.ndim < 2 or q.shape != p.shape:
      raise ValueError(
          f"q and p must be [B, ...] arrays of the same shape; got q {q.shape} and p {p.shape}.")
    h = jnp.concatenate([self._embed(q), self._embed(p)], axis=-1)
    for layer in self.fused:
      h = nn.relu(layer(h))
    return self.classifier(h)
