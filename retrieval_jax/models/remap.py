"""REMAP head: multi-layer, KL-divergence-weighted regional max pooling (Husain & Bober, §III).

For every backbone tap ``l`` (a "layer" of the paper; default two: its multi-layer aggregation
MLA uses the last two convolutional layers, Table II), a parallel "ROI stream" (§III-B):

    r_l = L2(zeta(o_l))                        [B, R, C_l]  ROI max pooling, per-region l2n
    P_l = sum_r alpha_{l,r} r_l(r)             [B, C_l]     KL-divergence weighting (KLW)

then (§III-C/D) ``p = [P_1, ..., P_N]`` (concatenation, ``D = sum_l C_l``), a fully connected
layer initialised with PCA + whitening of ``p`` and trained ("fc"), and L2 normalisation. As in
the §III-B equation ``P(x; l', alpha) = W(L2(zeta(f_l'(x))); alpha)``, a stream is *not*
re-normalised after its weighted sum: the magnitudes of the ``alpha`` (KL values, one set per
layer) set the relative weight of the layers in ``p`` (``stream_l2n=True`` re-normalises each
stream instead).

Regions (Table I): ``levels = 4`` gives r = 40 square regions on the 24 x 32 map of a
1024 x 768 image, the full map not included. Per-region weights need the same region count on
every map, so the grid is the R-MAC grid of DESIGN §4.2 with the number of extra positions on the
long side fixed at one (:func:`fixed_rmac_regions`): identical to
:func:`~retrieval_jax.regions.rmac_regions` (row 0 dropped) for every map whose aspect ratio
makes the reference pick one extra position (long/short between about 1.02 and 1.8: 24 x 32,
30 x 40, 32 x 24, ...), and ``L (L + 1) (L + 2) / 3`` regions (8, 20, 40, 70 for L = 2..5) on any
map.

Non-negative weights (§III-B: "We enforce non-negativity on weight vector a during the
training process"): the parameter ``klw_<l>`` stores ``alpha`` as initialised (KL values, or 1)
and the forward pass uses ``|alpha|``. A gradient step that overshoots zero reflects the weight
back instead of clamping it to a dead zero (``relu`` would stop its gradient), and no optimiser
cooperation is needed; only a weight that is exactly 0 gets no gradient (``d|a|/da = sign(0) =
0``), as a region whose KL estimate is 0 carries no signal. :func:`effective_klw` reads the
weights in use.

Dimensions (§III-D, §V "we pass an image through the trained REMAP network to obtain a
4096-dimensional descriptor"): ResNeXt-101's last two convolutional layers are both 2048-channel
maps ("an input tensor of size 32 x 24 x 2048", step (2) of §III-B), so ``D = 2048 + 2048 = 4096``
and the FC keeps 4096 (truncated to 128 for compact codes, §III-E); VGG16 gives 512 + 512 = 1024.
Taps at different depths work too (e.g. this library's ResNeXt ``stage3`` + ``stage4``:
1024 + 2048 = 3072, at strides 16 and 32; each tap gets the grid of its own map size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.kl_weighting import DEFAULT_BINS, DEFAULT_SMOOTHING, estimate_region_weights
from retrieval_jax.models.whitening_layer import Whitening, whitening_params
from retrieval_jax.normalization import l2n
from retrieval_jax.pooling import regional_pool
from retrieval_jax.regions import (fixed_rmac_region_table, fixed_rmac_regions,
                                   grid_region_count, table_index)
from retrieval_jax.whitening import learn_pca_whitening


def _check_tap(name: str, x, mask) -> tuple[jax.Array, jax.Array | None]:
  if np.ndim(x) != 4:
    raise ValueError(f"{name} must be a 4-D array [B, H, W, C]; got shape {np.shape(x)}.")
  if mask is not None and np.shape(mask) != np.shape(x)[:3]:
    raise ValueError(f"the mask of {name} must have shape [B, H, W] = {np.shape(x)[:3]}; got "
                     f"{np.shape(mask)}.")
  return jnp.asarray(x), None if mask is None else jnp.asarray(mask, bool)


def grid_pool(x, levels: int, method: str = "max", include_full_map: bool = False,
              mask=None) -> jax.Array:
  """Pools every region of :func:`fixed_rmac_regions` of ``x``'s map: ``[B, R, C]``.

  With ``mask`` (bool ``[B, H, W]``, padding at the bottom and right) each image uses the grid
  of its own valid ``h x w`` map, looked up inside the jitted program, and only valid cells are
  pooled, so a padded bucket pools exactly as the unpadded images.

  Args:
    x: float ``[B, H, W, C]``.
    levels: grid levels L.
    method: ``"max"`` (REMAP's ROI pooling, DARAC) or ``"avg"`` (DARAC).
    include_full_map: whether row 0 is the full (valid) map.
    mask: optional bool ``[B, H, W]``.

  Returns:
    ``[B, R, C]`` unnormalised, in grid order.
  """
  x, mask = _check_tap("x", x, mask)
  _, height, width, _ = x.shape
  if mask is None:
    return regional_pool(x, fixed_rmac_regions(height, width, levels, include_full_map), method)
  table = jnp.asarray(fixed_rmac_region_table(height, width, levels, include_full_map))
  regions = table[table_index(mask)]  # [B, R, 4]
  return regional_pool(x, regions, method, mask=mask)


def remap_region_descriptors(x, levels: int = 4, include_full_map: bool = False,
                             mask=None) -> jax.Array:
  """``r = L2(zeta(o))`` of REMAP §III-B: ROI max pooling then per-region l2n.

  Run this on the frozen network's taps to collect the region vectors that
  :func:`~retrieval_jax.kl_weighting.estimate_region_weights` needs.

  Args:
    x: float ``[B, H, W, C]``, one tap.
    levels: grid levels (4 -> 40 regions).
    include_full_map: add the full map as region 0.
    mask: optional bool ``[B, H, W]`` for padded buckets.

  Returns:
    ``[B, R, C]``, unit-norm rows (up to the 1e-6 epsilon; an all-zero region stays zero).
  """
  return l2n(grid_pool(x, levels, "max", include_full_map, mask))


def _as_streams(taps, masks) -> tuple[list, list]:
  """Taps (mapping or sequence) and masks (same structure, or None) as two parallel lists."""
  if isinstance(taps, Mapping):
    names = list(taps)
    tap_list = [taps[k] for k in names]
    if masks is None:
      mask_list = [None] * len(names)
    elif isinstance(masks, Mapping):
      unknown = [k for k in masks if k not in taps]
      if unknown:
        raise ValueError(f"masks has keys {unknown} that are not taps; taps: {names}.")
      mask_list = [masks.get(k) for k in names]
    else:
      raise ValueError(f"masks must be a mapping with the keys of taps {names} (or None); got "
                       f"{type(masks).__name__}.")
  elif isinstance(taps, Sequence) and not isinstance(taps, (str, bytes)):
    tap_list = list(taps)
    if masks is None:
      mask_list = [None] * len(tap_list)
    elif isinstance(masks, Sequence) and len(masks) == len(tap_list):
      mask_list = list(masks)
    else:
      raise ValueError(f"masks must be a sequence of {len(tap_list)} entries (one per tap, "
                       f"None allowed) or None; got {type(masks).__name__}.")
  else:
    raise ValueError(f"taps must be a mapping name -> [B, H, W, C] or a sequence of such maps; "
                     f"got {type(taps).__name__}.")
  return tap_list, mask_list


class RemapHead(nn.Module):
  """REMAP aggregation head (§III-B..D): ``l2n(FC([sum_r |alpha_{l,r}| r_l(r)]_l))``.

  Parameters: ``klw_<l>`` ``[R]`` for stream ``l = 0..layers-1`` (initialised to 1, R-MAC's
  ``alpha``; set from KL divergences by :func:`remap_init_from_data`) and ``fc``
  (:class:`~retrieval_jax.models.whitening_layer.Whitening`, ``[D, out_dims]`` kernel + bias,
  initialised from PCA-whitening of ``p`` by :func:`remap_init_from_data`).

  Attributes:
    levels: grid levels (4 -> r = 40, Table I).
    include_full_map: add the full map as a region (REMAP does not).
    layers: number of taps (streams); 2 in the paper.
    out_dims: FC outputs; None keeps ``D = sum_l C_l``.
    whiten_trainable: train the FC (True, as REMAP) or keep it fixed.
    stream_l2n: L2-normalise each stream before concatenation (not in the paper).
    dtype: computation dtype of the FC.
  """
  levels: int = 4
  include_full_map: bool = False
  layers: int = 2
  out_dims: int | None = None
  whiten_trainable: bool = True
  stream_l2n: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, taps, masks=None, *, project: bool = True) -> jax.Array:
    """Descriptors of a batch.

    Args:
      taps: ``layers`` feature maps ``[B, H_l, W_l, C_l]`` (a mapping, streams in its order, or
        a sequence); the batch B must agree.
      masks: None, or the same structure with bool ``[B, H_l, W_l]`` (or None) per tap.
      project: False returns ``p`` (the FC input, ``[B, D]``, not normalised), e.g. to learn
        the PCA-whitening that initialises the FC.

    Returns:
      ``[B, out_dims]`` L2-normalised (``[B, D]`` ``p`` when ``project`` is False).
    """
    tap_list, mask_list = _as_streams(taps, masks)
    if len(tap_list) != self.layers:
      raise ValueError(f"taps must hold layers = {self.layers} maps; got {len(tap_list)}.")
    n_regions = grid_region_count(self.levels, self.include_full_map)
    streams = []
    for i, (x, mask) in enumerate(zip(tap_list, mask_list)):
      x, mask = _check_tap(f"taps[{i}]", x, mask)
      if x.shape[0] != np.shape(tap_list[0])[0]:
        raise ValueError(f"taps must share the batch size; taps[0] has "
                         f"{np.shape(tap_list[0])[0]} and taps[{i}] {x.shape[0]}.")
      vectors = remap_region_descriptors(x, self.levels, self.include_full_map, mask)
      alpha = self.param(f"klw_{i}", nn.initializers.ones, (n_regions,), jnp.float32)
      # |alpha|: non-negative weights whatever the optimiser did (§III-B).
      stream = jnp.einsum("brc,r->bc", vectors, jnp.abs(alpha).astype(vectors.dtype),
                          precision=jax.lax.Precision.HIGHEST)
      streams.append(l2n(stream) if self.stream_l2n else stream)
    p = jnp.concatenate(streams, axis=-1)
    if self.out_dims is not None and not 1 <= self.out_dims <= p.shape[-1]:
      raise ValueError(f"out_dims must be in [1, D = {p.shape[-1]}] (PCA-whitening of D-dim "
                       f"streams has D components); got {self.out_dims}.")
    fc = Whitening(self.out_dims or p.shape[-1], trainable=self.whiten_trainable,
                   dtype=self.dtype, name="fc")
    if not (project or self.is_initializing()):
      return p
    out = l2n(fc(p))
    return out if project else p


def effective_klw(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The non-negative weights the forward pass uses, ``{"klw_<l>": |alpha_l|}``.

  Args:
    params: the head's ``params`` collection (``variables["params"]``).
  """
  return {k: np.abs(np.asarray(v)) for k, v in params.items() if k.startswith("klw_")}


def remap_init_from_data(variables: Mapping[str, Any], region_descriptors_a: Sequence,
                         region_descriptors_b: Sequence, same, *,
                         pca_region_descriptors: Sequence | None = None,
                         bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING,
                         normalize: str = "none", stream_l2n: bool = False) -> dict[str, Any]:
  """Initialises a :class:`RemapHead`'s ``klw_<l>`` from KL divergences and ``fc`` from PCA-w.

  1. ``klw_l = estimate_region_weights(a_l, b_l, same)`` per layer (REMAP §III-B), from region
     vectors of labelled pairs computed with the frozen network
     (:func:`remap_region_descriptors`, run batch by batch by the caller).
  2. ``p`` of every image (the rows of ``pca_region_descriptors``, default the ``a`` and ``b``
     images of the pairs) with the new weights, ``p = [sum_r klw_{l,r} r_l(r)]_l``; PCA
     whitening of ``p`` (:func:`~retrieval_jax.whitening.learn_pca_whitening`) becomes the FC
     (§III-C: "a fully connected layer with weights initialized by PCA+Whitening
     coefficients"), keeping the FC's current output width.

  Args:
    variables: the head's variables (from ``init``); not modified.
    region_descriptors_a: per layer, float ``[N, R, C_l]`` (first image of each pair).
    region_descriptors_b: per layer, float ``[N, R, C_l]`` (second image).
    same: bool ``[N]``, True for matching pairs.
    pca_region_descriptors: per layer, float ``[M, R, C_l]`` images to learn the PCA from
      (``M >= 2``); default the ``2N`` images of the pairs.
    bins, smoothing, normalize: passed to
      :func:`~retrieval_jax.kl_weighting.estimate_region_weights`.
    stream_l2n: must match the head's ``stream_l2n``.

  Returns:
    New variables with ``params["klw_<l>"]`` and ``params["fc"]`` replaced.
  """
  params = dict(variables["params"])
  klw_names = sorted((k for k in params if k.startswith("klw_")), key=lambda k: int(k[4:]))
  for name, value in (("region_descriptors_a", region_descriptors_a),
                      ("region_descriptors_b", region_descriptors_b),
                      ("pca_region_descriptors", pca_region_descriptors)):
    if value is None:
      continue
    if not isinstance(value, Sequence) or len(value) != len(klw_names):
      raise ValueError(f"{name} must be a sequence of {len(klw_names)} arrays [N, R, C_l] (one "
                       f"per layer of the head); got {type(value).__name__} of length "
                       f"{len(value) if isinstance(value, Sequence) else 'n/a'}.")
  weights = []
  for i, name in enumerate(klw_names):
    a = np.asarray(region_descriptors_a[i], np.float64)
    if a.ndim != 3 or a.shape[1] != params[name].shape[0]:
      raise ValueError(f"region_descriptors_a[{i}] must be [N, R = {params[name].shape[0]}, "
                       f"C]; got shape {a.shape}.")
    weights.append(estimate_region_weights(a, region_descriptors_b[i], same, bins, smoothing,
                                           normalize))
  if pca_region_descriptors is None:
    pca_region_descriptors = [np.concatenate([np.asarray(a), np.asarray(b)])
                              for a, b in zip(region_descriptors_a, region_descriptors_b)]
  streams = []
  for i, w in enumerate(weights):
    vectors = np.asarray(pca_region_descriptors[i], np.float64)
    if vectors.ndim != 3 or vectors.shape[1] != w.shape[0]:
      raise ValueError(f"pca_region_descriptors[{i}] must be [M, R = {w.shape[0]}, C]; got "
                       f"shape {vectors.shape}.")
    # The vectors come from remap_region_descriptors, already l2n'd per region.
    stream = np.einsum("mrc,r->mc", vectors, w)
    if stream_l2n:
      stream = stream / (np.linalg.norm(stream, axis=1, keepdims=True) + 1e-6)
    streams.append(stream)
  p = np.concatenate(streams, axis=1)
  fc = params["fc"]
  if p.shape[1] != fc["kernel"].shape[0]:
    raise ValueError(f"the concatenated streams have D = {p.shape[1]} but the head's fc expects "
                     f"{fc['kernel'].shape[0]}; do the region descriptors match its taps?")
  mean, P = learn_pca_whitening(p)
  params["fc"] = whitening_params(mean, P, dims=fc["kernel"].shape[1])
  for name, w in zip(klw_names, weights):
    params[name] = w.astype(np.float32)
  return {**dict(variables), "params": params}
