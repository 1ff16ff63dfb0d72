"""DARAC head: deep aggregation of regional max and average activations (Schall et al., §III-B/C).

From the last convolutional map ``[B, H, W, C]`` (post-ReLU):

1. Regions (§III-B, Fig. 3): the 20 regions of a 3-level R-MAC grid plus the global map, 21 in
   all, each pooled by max AND by average: a ``42 x C`` matrix per image. Row order here: rows
   ``0..20`` max pooling, ``21..41`` average pooling, each in grid order (row 0 / 21 the global
   map, then levels 1..3 row-major; :func:`~retrieval_jax.regions.fixed_rmac_regions`).
   No normalisation of the pooled vectors: the paper feeds the raw ``42 x C`` matrix.
2. Aggregation network (§III-C, Fig. 4):
   - a convolution with ``l`` kernels of size ``42 x 1`` over the ``42 x C`` matrix: each output
     ``h[c, k] = sum_j K1[j, k] v[j, c] + b1[k]``, the same kernel for every channel ``c``
     (a ``42 -> l`` contraction shared across the C channels), giving ``l x C``;
   - ReLU;
   - batch normalisation of the ``l`` rows (one scale/offset and statistics per kernel,
     statistics over the batch and the C positions), "a representation similar to a PCA
     whitening output";
   - one ``l x 1`` kernel: ``y[c] = sum_k K2[k] h[c, k] + b2``, one C-vector.
   The paper trains on ``y`` directly ("without any normalization or post processing during
   the training procedure"); ``raw=True`` returns it.
3. Post-processing after training (§III-C, last paragraph): ``l2n``, PCA whitening learned on
   training descriptors, ``l2n`` again (a fixed ``Whitening`` layer "whiten",
   :func:`darac_init_whitening`).

Parameter count (§III-C: "The two aggregation layers ... only add 43l + l + 1 (incl. bias)
learnable parameters"): ``42 l + l`` for the first convolution, ``l + 1`` for the second,
705 for ``l = 16``, independent of C (2048 for their ResNet50 V2), because the kernels are
shared across channels. The paper's count leaves out the batch norm's ``2 l`` scale and offset;
they are redundant with the following linear ``l x 1`` convolution, into which
:func:`fold_darac_batch_norm` folds them (``norm="folded"`` then has exactly 705 parameters).

Region grid: the 42 x 1 kernel needs 21 regions on every map, but the reference R-MAC rule gives
14 + 1 on square maps (the paper's 299 x 299 training crops) and more on elongated ones; the grid
is therefore R-MAC with one extra window on the long side (identical to ``rmac_regions`` at
24 x 32 and at every long/short ratio in about (1.02, 1.8]; see :mod:`retrieval_jax.models.remap`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models.common import NormMode, batch_norm, check_norm_mode
from retrieval_jax.models.remap import grid_pool
from retrieval_jax.regions import grid_region_count
from retrieval_jax.models.whitening_layer import Whitening, whitening_params
from retrieval_jax.normalization import l2n
from retrieval_jax.whitening import learn_pca_whitening

# TensorFlow's batch-norm defaults (the paper's framework): epsilon 1e-3, momentum 0.99.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


def darac_region_matrix(x, levels: int = 3, mask=None) -> jax.Array:
  """The pooled ``2R x C`` matrix of DARAC §III-B (R = 21 for 3 levels: 20 + the global map).

  Args:
    x: float ``[B, H, W, C]``, the last convolutional map.
    levels: R-MAC levels (3 in the paper).
    mask: optional bool ``[B, H, W]`` for padded buckets (padding bottom/right): each image uses
      the grid of its own valid map and only valid cells are pooled.

  Returns:
    ``[B, 2R, C]``: rows ``0..R-1`` max pooling, ``R..2R-1`` average pooling, each in grid
    order (row 0 and R the global map).
  """
  maxima = grid_pool(x, levels, "max", include_full_map=True, mask=mask)
  means = grid_pool(x, levels, "avg", include_full_map=True, mask=mask)
  return jnp.concatenate([maxima, means], axis=1)


def aggregation_parameter_count(kernels: int = 16, levels: int = 3) -> int:
  """Parameters of the two aggregation convolutions: ``(2R + 1) l + l + 1``.

  With R = 21 regions (levels = 3) this is the paper's ``43 l + l + 1``: 705 for l = 16.
  """
  two_r = 2 * grid_region_count(levels, include_full_map=True)
  return (two_r + 1) * kernels + kernels + 1


class DaracHead(nn.Module):
  """DARAC aggregation (§III-C) over the last convolutional map, with optional PCA-w.

  Parameters: ``region_conv`` (``kernel [2R, l]``, ``bias [l]``: the 42 x 1 convolution),
  ``norm`` (batch norm over the l kernels; absent with ``norm="folded"``), ``kernel_conv``
  (``kernel [l, 1]``, ``bias [1]``: the l x 1 convolution), and with ``whiten_dims`` a fixed
  ``whiten`` (:class:`~retrieval_jax.models.whitening_layer.Whitening`).

  Attributes:
    levels: R-MAC levels (3: 20 regions + the global map = 21).
    kernels: ``l``, number of 42 x 1 kernels (16 in the paper).
    norm: batch-norm mode of :func:`~retrieval_jax.models.common.batch_norm`: ``"frozen"``
      (running statistics), ``"train"`` (batch statistics when ``train``), ``"folded"``
      (absorbed into ``kernel_conv`` by :func:`fold_darac_batch_norm`).
    whiten_dims: PCA-w output dimensions (<= C) for the post-processing, or None for none.
    bn_epsilon: batch-norm epsilon (TensorFlow's 1e-3).
    bn_momentum: running-average momentum (TensorFlow's 0.99).
    dtype: computation dtype.
  """
  levels: int = 3
  kernels: int = 16
  norm: NormMode = "frozen"
  whiten_dims: int | None = None
  bn_epsilon: float = BN_EPSILON
  bn_momentum: float = BN_MOMENTUM
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, raw: bool = False,
               whiten: bool = True) -> jax.Array:
    """Descriptors of a batch.

    Args:
      x: float ``[B, H, W, C]``.
      mask: optional bool ``[B, H, W]`` validity of padded-bucket cells.
      train: batch statistics in ``norm="train"`` mode (``batch_stats`` must be mutable).
      raw: return the aggregated vector ``y`` itself (the paper's training embedding).
      whiten: apply the PCA-w post-processing when ``whiten_dims`` is set; False gives the
        ``l2n(y)`` descriptors to learn it from.

    Returns:
      ``[B, C]`` (``[B, whiten_dims]`` whitened), L2-normalised unless ``raw``.
    """
    check_norm_mode(self.norm)
    if isinstance(self.kernels, bool) or not isinstance(self.kernels, int) or self.kernels < 1:
      raise ValueError(f"kernels must be a positive integer; got {self.kernels!r}.")
    v = darac_region_matrix(x, self.levels, mask).astype(self.dtype)  # [B, 2R, C]
    # One 2R-vector per channel: the 42 x 1 kernels slide along C with shared weights.
    v = jnp.swapaxes(v, 1, 2)  # [B, C, 2R]
    dense = {"dtype": self.dtype, "param_dtype": jnp.float32,
             "precision": jax.lax.Precision.HIGHEST}
    h = nn.Dense(self.kernels, name="region_conv", **dense)(v)  # [B, C, l]
    h = nn.relu(h)
    # Named "norm", not "region_conv_bn": fold_batch_norm would fold it into region_conv, across
    # the ReLU, which is wrong; it folds exactly into the following linear kernel_conv instead.
    h = batch_norm(self.norm, train, epsilon=self.bn_epsilon, name="norm", dtype=self.dtype,
                   momentum=self.bn_momentum)(h)
    y = nn.Dense(1, name="kernel_conv", **dense)(h)[..., 0]  # [B, C]
    if raw and not self.is_initializing():
      return y
    descriptor = l2n(y)
    if self.whiten_dims is None:
      return descriptor
    if not 1 <= self.whiten_dims <= y.shape[-1]:
      raise ValueError(f"whiten_dims must be in [1, C = {y.shape[-1]}]; got {self.whiten_dims}.")
    layer = Whitening(self.whiten_dims, trainable=False, dtype=self.dtype, name="whiten")
    if not (whiten or self.is_initializing()):  # init creates the layer's params either way
      return descriptor
    return l2n(layer(descriptor))


def fold_darac_batch_norm(variables: Mapping[str, Any],
                          epsilon: float = BN_EPSILON) -> dict[str, Any]:
  """Folds the batch norm into the following ``l x 1`` convolution (exact).

  ``y = sum_k K2_k (s_k (h_k - mu_k) + beta_k) + b2`` with ``s = gamma / sqrt(var + eps)`` is
  the convolution with kernel ``K2 * s`` and bias ``b2 + sum_k K2_k (beta_k - mu_k s_k)``.
  (The norm follows a ReLU, so it cannot go into ``region_conv``.)

  Args:
    variables: ``{"params", "batch_stats"}`` of a ``DaracHead`` with ``norm`` ``"frozen"`` or
      ``"train"``.
    epsilon: the batch norm's epsilon (the head's ``bn_epsilon``).

  Returns:
    ``{"params": ...}`` for the same head built with ``norm="folded"`` (705 aggregation
    parameters for l = 16).
  """
  params = jax.tree_util.tree_map(np.asarray, dict(variables["params"]))
  if "norm" not in params or "norm" not in variables.get("batch_stats", {}):
    raise ValueError("variables must hold params['norm'] and batch_stats['norm'] (a DaracHead "
                     "with norm='frozen' or 'train').")
  stats = variables["batch_stats"]["norm"]
  norm = params.pop("norm")
  scale = np.asarray(norm["scale"], np.float64) / np.sqrt(
      np.asarray(stats["var"], np.float64) + epsilon)
  shift = np.asarray(norm["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * scale
  conv = params["kernel_conv"]
  kernel = np.asarray(conv["kernel"], np.float64)  # [l, 1]
  params["kernel_conv"] = {
      "kernel": (kernel * scale[:, None]).astype(np.float32),
      "bias": (np.asarray(conv["bias"], np.float64) + shift @ kernel).astype(np.float32)}
  return {"params": params}


def darac_init_whitening(variables: Mapping[str, Any], descriptors) -> dict[str, Any]:
  """Sets the fixed PCA-w post-processing of a ``DaracHead`` from training descriptors.

  §III-C: "the extracted feature vector is L2 normalized and then we perform PCA whitening,
  where the principal components are determined on a subset of the training data set".

  Args:
    variables: the head's variables (with a ``whiten`` layer: ``whiten_dims`` set).
    descriptors: float ``[N, C]``, the head's L2-normalised outputs on training images
      (``head.apply(variables, x, whiten=False)``), ``N >= 2``.

  Returns:
    New variables with ``params["whiten"]`` = PCA-whitening (mean, first ``whiten_dims``
    components).
  """
  params = dict(variables["params"])
  if "whiten" not in params:
    raise ValueError("variables have no 'whiten' layer; build the DaracHead with whiten_dims.")
  dims = params["whiten"]["kernel"].shape[1]
  descriptors = np.asarray(descriptors)
  if descriptors.ndim != 2 or descriptors.shape[1] != params["whiten"]["kernel"].shape[0]:
    raise ValueError(f"descriptors must be [N, C = {params['whiten']['kernel'].shape[0]}]; got "
                     f"shape {descriptors.shape}.")
  mean, P = learn_pca_whitening(descriptors)
  params["whiten"] = whitening_params(mean, P, dims=dims)
  return {**dict(variables), "params": params}
