"""Retrieval heads: feature map ``[B, H, W, C]`` (+ validity mask) -> L2-normalised ``[B, D]``.

Two heads cover the global and the regional descriptors of the papers:

- :class:`GlobalPoolHead`: MAC / SPoC / GeM with a learnable ``p``, then ``l2n``, an optional
  whitening layer and ``l2n`` again (cirtorch; LRML §3.1: "GeM pooling, Lw whitening and L2").
- :class:`RegionalHead`: R-MAC (Tolias et al.; Gordo et al.'s learned R-MAC) and R-GAC (DLRTN
  §III-B, regional generalized-mean pooling RGMP with a learnable ``xi``, Eq. 9), over the R-MAC
  grid or over given boxes (region proposals), as
  ``l2n(sum_r l2n(W(l2n(pool_r))))`` (DESIGN §4.1).

The math is in plain functions (:func:`global_descriptor`, :func:`regional_descriptor`,
:func:`rmac_grid_regions`, :func:`sum_regions`); the modules only own the parameters (``p`` /
``xi`` and the ``"whiten"`` :class:`~retrieval_jax.models.whitening_layer.Whitening` layer).

Whitening is initialised from data with :func:`learn_head_whitening` (PCA-w or Lw on the
vectors the head feeds its whitening, which ``before_whitening=True`` returns) and
:func:`replace_whitening`.

Parametrisation of ``p`` and ``xi``: the parameter holds the exponent itself (as cirtorch's
``GeM.p``, so checkpoints convert one to one) and the forward pass uses ``max(p, p_min)`` with
``p_min = 1``. Below 1 the generalized mean would fall under the arithmetic mean and towards 0
its ``1/p`` root explodes; at ``p_min`` the head is average pooling. A parameter pushed under
``p_min`` gets no gradient from the loss there (the clamp is flat), so it stays at the average
pooling it asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import pooling
from retrieval_jax._validation import check_ndim
from retrieval_jax.models.whitening_layer import Whitening, whitening_params
from retrieval_jax.normalization import L2_EPS, l2n
from retrieval_jax.regions import rmac_grid_regions
from retrieval_jax.whitening import learn_lw, learn_pca_whitening

GlobalPooling = Literal["gem", "mac", "spoc"]
RegionalPooling = Literal["max", "avg", "gem"]
GLOBAL_POOLINGS = ("gem", "mac", "spoc")
REGIONAL_POOLINGS = ("max", "avg", "gem")
P_MIN = 1.0
WHITEN_NAME = "whiten"

Projection = Callable[[jax.Array], jax.Array]


# --- functional core -----------------------------------------------------------------------------

def _pooling_dtype(x) -> jnp.ndarray:
  # GeM raises activations to the power p (x^3 spans 3x the exponent range of x): pool in at
  # least float32 even when the backbone runs in bfloat16. Heads are cheap next to backbones.
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def clamp_exponent(p, p_min: float = P_MIN) -> jax.Array:
  """The exponent the forward pass uses: ``max(p, p_min)`` (see the module docstring)."""
  return jnp.maximum(jnp.asarray(p, jnp.float32), p_min)


def pool_global(x, method: GlobalPooling = "gem", p=3.0, mask=None) -> jax.Array:
  """Global pooling by name: ``"mac"``, ``"spoc"`` or ``"gem"`` (unnormalised).

  Args:
    x: float ``[B, H, W, C]``.
    method: ``"mac"`` (max), ``"spoc"`` (mean) or ``"gem"`` (DESIGN §4.1; DLRTN Eq. 9 over the
      whole map).
    p: GeM exponent, scalar or ``[C]`` (``"gem"`` only).
    mask: optional bool ``[B, H, W]`` validity of padded cells.

  Returns:
    ``[B, C]``.
  """
  if method == "mac":
    return pooling.mac(x, mask=mask)
  if method == "spoc":
    return pooling.spoc(x, mask=mask)
  if method == "gem":
    return pooling.gem(x, p=p, mask=mask)
  raise ValueError(f"pooling must be one of {GLOBAL_POOLINGS}; got {method!r}.")


def global_descriptor(x, method: GlobalPooling = "gem", p=3.0, mask=None,
                      project: Projection | None = None, eps: float = L2_EPS) -> jax.Array:
  """``l2n(W(l2n(pool(x))))``, or ``l2n(pool(x))`` without a projection ``W``.

  The order is cirtorch's and LRML's (§3.1, Fig. 1): pooling, L2, whitening, L2. Without
  whitening the second ``l2n`` is skipped, so the descriptor is exactly cirtorch's
  ``L2N(GeM(x))``.

  Args:
    x: float ``[B, H, W, C]``.
    method: ``"gem"``, ``"mac"`` or ``"spoc"``.
    p: GeM exponent, scalar or ``[C]`` (used as given: clamp it with :func:`clamp_exponent`).
    mask: optional bool ``[B, H, W]`` (padded shape buckets).
    project: optional ``[..., C] -> [..., D]`` map, e.g. a whitening layer.
    eps: the L2 epsilon (DESIGN §4.1).

  Returns:
    ``[B, D]`` (``D = C`` without ``project``), L2-normalised rows.
  """
  vectors = l2n(pool_global(x, method, p, mask), eps=eps)
  if project is None:
    return vectors
  return l2n(project(vectors), eps=eps)


def sum_regions(vectors, valid=None, eps: float = L2_EPS) -> jax.Array:
  """``l2n(sum_r v_r)`` over the valid regions: ``[B, R, D]`` (+ ``[B, R]``) -> ``[B, D]``.

  Invalid rows (padded proposal lists, grid rows beyond an image's own grid) are zeroed before
  the sum: after a whitening layer with a bias even an all-zero region vector is not zero.
  """
  vectors = jnp.asarray(vectors)
  if valid is not None:
    vectors = jnp.where(jnp.asarray(valid, bool)[..., None], vectors, 0.0)
  return l2n(jnp.sum(vectors, axis=-2), eps=eps)


def region_vectors(x, regions, method: RegionalPooling = "max", p=3.0, mask=None,
                   eps: float = L2_EPS) -> jax.Array:
  """``l2n(pool_r)`` for every region: what a regional head feeds its whitening.

  Args:
    x: float ``[B, H, W, C]``.
    regions: int ``[R, 4]`` or ``[B, R, 4]`` rows ``(x, y, w, h)`` in cells.
    method: ``"max"`` (R-MAC, DLRTN Eq. 7), ``"avg"`` (Eq. 8) or ``"gem"`` (RGMP, Eq. 9).
    p: the RGMP exponent ``xi`` (``"gem"`` only).
    mask: optional bool ``[B, H, W]``.
    eps: the L2 epsilon.

  Returns:
    ``[B, R, C]``.
  """
  return l2n(pooling.regional_pool(x, regions, method, p=p, mask=mask), eps=eps)


def regional_descriptor(x, regions, method: RegionalPooling = "max", p=3.0, mask=None,
                        valid=None, project: Projection | None = None,
                        eps: float = L2_EPS) -> jax.Array:
  """R-MAC / R-GAC: ``l2n(sum_r l2n(W(l2n(pool_r))))`` (DESIGN §4.1; DLRTN §III-C).

  DLRTN aggregates RGMP region vectors "via PCA, l2 normalization and sum-pooling"; Gordo et
  al. and REMAP (§V-F, "RMAC pipeline") apply one shared PCA-whitening FC to every region. Without
  ``project`` the inner ``l2n(W(.))`` is skipped, which makes the max-pooled grid version exactly
  ``l2n(pooling.rmac(x))``.

  Args:
    x: float ``[B, H, W, C]``.
    regions: int ``[R, 4]`` or ``[B, R, 4]`` rows ``(x, y, w, h)`` in cells.
    method: ``"max"``, ``"avg"`` or ``"gem"``.
    p: the RGMP exponent ``xi`` (``"gem"`` only; scalar, shared by all regions).
    mask: optional bool ``[B, H, W]``.
    valid: optional bool ``[B, R]``; regions marked False do not contribute.
    project: optional ``[..., C] -> [..., D]`` map applied to every region vector.
    eps: the L2 epsilon.

  Returns:
    ``[B, D]`` L2-normalised.
  """
  vectors = region_vectors(x, regions, method, p, mask, eps)
  if project is not None:
    vectors = l2n(project(vectors), eps=eps)
  return sum_regions(vectors, valid, eps)


# --- whitening initialisation --------------------------------------------------------------------

def learn_head_whitening(vectors, method: Literal["pca", "lw"] = "pca", dims: int | None = None,
                         query_idx=None, positive_idx=None) -> dict[str, np.ndarray]:
  """Learns a head's whitening from the vectors it whitens and returns the layer's params.

  The vectors are what the head feeds its ``"whiten"`` layer (``before_whitening=True``):
  ``l2n(pool(x))`` rows for :class:`GlobalPoolHead`, the valid ``l2n(pool_r)`` rows for
  :class:`RegionalHead` (PCA-w "learned on region vectors", as Tolias et al. and Gordo et al.).

  Args:
    vectors: float ``[N, C]``, concrete.
    method: ``"pca"`` (PCA whitening, DESIGN §4.3) or ``"lw"`` (learned discriminative
      whitening from matching pairs, LRML Eqs. 2-3).
    dims: output dimension D (the head's ``whiten_dims``); default C.
    query_idx: int ``[n_pairs]`` rows of ``vectors`` (``"lw"`` only).
    positive_idx: int ``[n_pairs]`` rows matching ``query_idx`` (``"lw"`` only).

  Returns:
    ``{"kernel": [C, D], "bias": [D]}`` float32, computing ``P[:D] (v - mean)``: put it under
    ``params["whiten"]`` (see :func:`replace_whitening`).
  """
  if method == "pca":
    if query_idx is not None or positive_idx is not None:
      raise ValueError("query_idx and positive_idx are only used by method='lw'; got them with "
                       "method='pca'.")
    mean, P = learn_pca_whitening(vectors)
  elif method == "lw":
    if query_idx is None or positive_idx is None:
      raise ValueError("method='lw' needs query_idx and positive_idx (matching pairs); got "
                       f"query_idx={query_idx!r}, positive_idx={positive_idx!r}.")
    mean, P = learn_lw(vectors, query_idx, positive_idx)
  else:
    raise ValueError(f"method must be 'pca' or 'lw'; got {method!r}.")
  return whitening_params(mean, P, dims)


def replace_whitening(variables: Mapping[str, Any], whiten: Mapping[str, Any],
                      name: str = WHITEN_NAME) -> dict[str, Any]:
  """A copy of a head's ``variables`` with the whitening layer's params replaced.

  Args:
    variables: ``{"params": {..., name: {"kernel", "bias"}}}`` from ``head.init``.
    whiten: ``{"kernel": [C, D], "bias": [D]}``, e.g. from :func:`learn_head_whitening`.
    name: the whitening layer's name.

  Returns:
    New variables (the input is not modified), with the same shapes as before.
  """
  params = dict(variables.get("params", {}))
  if name not in params:
    raise ValueError(f"variables has no params[{name!r}]: build the head with whiten_dims set; "
                     f"params holds {sorted(params)}.")
  for key in ("kernel", "bias"):
    have, got = np.shape(params[name][key]), np.shape(whiten[key])
    if have != got:
      raise ValueError(f"whiten[{key!r}] must have shape {have} (the head's whitening layer); got "
                       f"{got}.")
  params[name] = {key: jnp.asarray(whiten[key], jnp.float32) for key in ("kernel", "bias")}
  return {**variables, "params": params}


# --- modules -------------------------------------------------------------------------------------

def _check_whiten_dims(whiten_dims) -> None:
  if whiten_dims is not None and (isinstance(whiten_dims, bool) or
                                  not isinstance(whiten_dims, (int, np.integer)) or
                                  whiten_dims < 1):
    raise ValueError(f"whiten_dims must be None or a positive int; got {whiten_dims!r}.")


def _exponent_param(module: nn.Module, name: str, init: float, shape: tuple[int, ...],
                    learn: bool, p_min: float) -> jax.Array:
  """A learnable exponent (GeM ``p`` / RGMP ``xi``) initialised at ``init``, clamped at use."""
  if not np.isfinite(init) or init < p_min:
    raise ValueError(f"{name}_init must be finite and >= p_min = {p_min}; got {init!r}.")
  value = module.param(name, nn.initializers.constant(init), shape, jnp.float32)
  if not learn:
    # Still a parameter, so learned and fixed heads have the same variables (checkpoints and
    # converted weights load into either).
    value = jax.lax.stop_gradient(value)
  return clamp_exponent(value, p_min)


class GlobalPoolHead(nn.Module):
  """Global pooling head: ``l2n(W(l2n(pool(x))))`` (cirtorch / LRML order; DESIGN §4.1).

  Attributes:
    pooling: ``"gem"`` (learnable ``p``), ``"mac"`` or ``"spoc"``.
    p_init: initial GeM exponent (3, as cirtorch, LRML and DLRTN).
    per_channel_p: one ``p`` per channel ``[C]`` instead of a scalar.
    learn_p: False keeps ``p`` at its value (the parameter exists but gets no gradient).
    whiten_dims: output dimension of the ``"whiten"`` layer; None for no whitening.
    whiten_trainable: False keeps the whitening fixed (e.g. at its PCA-w / Lw initialisation).
    p_min: the forward pass uses ``max(p, p_min)`` (module docstring).

  ``__call__(x [B, H, W, C], mask [B, H, W] | None) -> [B, D]``, ``D = whiten_dims or C``.
  Parameters: ``"p"`` (``"gem"`` only; ``[]`` or ``[C]``), ``"whiten"`` (``kernel [C, D]``,
  ``bias [D]``).
  """
  pooling: GlobalPooling = "gem"
  p_init: float = 3.0
  per_channel_p: bool = False
  learn_p: bool = True
  whiten_dims: int | None = None
  whiten_trainable: bool = True
  p_min: float = P_MIN

  @nn.compact
  def __call__(self, x, mask=None, *, before_whitening: bool = False) -> jax.Array:
    """Returns ``[B, D]`` descriptors, or with ``before_whitening`` the ``[B, C]``
    ``l2n(pool(x))`` vectors to learn the whitening from."""
    if self.pooling not in GLOBAL_POOLINGS:
      raise ValueError(f"pooling must be one of {GLOBAL_POOLINGS}; got {self.pooling!r}.")
    _check_whiten_dims(self.whiten_dims)
    x = _pooling_dtype(x)
    p = None
    if self.pooling == "gem":
      shape = (x.shape[-1],) if self.per_channel_p else ()
      p = _exponent_param(self, "p", self.p_init, shape, self.learn_p, self.p_min)
    if before_whitening:
      return global_descriptor(x, self.pooling, p, mask)
    project = None
    if self.whiten_dims is not None:
      project = Whitening(self.whiten_dims, self.whiten_trainable, name=WHITEN_NAME)
    return global_descriptor(x, self.pooling, p, mask, project)


class RegionalHead(nn.Module):
  """R-MAC / R-GAC head: ``l2n(sum_r l2n(W(l2n(pool_r))))`` (DESIGN §4.1; DLRTN §III-B/C).

  Regions are the R-MAC grid (full map included, as :func:`retrieval_jax.pooling.rmac`) unless
  ``__call__`` gets ``regions`` (e.g. RPN proposals converted with
  :func:`~retrieval_jax.regions.boxes_to_cells`) and, for padded proposal lists,
  ``region_mask``. With a ``mask`` (padded shape bucket) and no boxes each image uses the grid of
  its own valid map.

  Attributes:
    pooling: ``"max"`` (R-MAC), ``"gem"`` (R-GAC: RGMP, DLRTN Eq. 9, one learnable ``xi``
      shared by all regions) or ``"avg"``.
    levels: R-MAC grid levels L (3: 20 regions + the full map on a 24x32 map).
    xi_init: initial RGMP exponent (3, DLRTN §IV; learned values 2.65-2.85).
    learn_xi: False keeps ``xi`` fixed (the parameter exists but gets no gradient).
    whiten_dims: output dimension of the shared ``"whiten"`` layer; None for no whitening.
    whiten_trainable: False keeps the whitening fixed.
    p_min: the forward pass uses ``max(xi, p_min)``.

  ``__call__(x [B, H, W, C], mask [B, H, W] | None, regions [B, R, 4] | [R, 4] | None,
  region_mask [B, R] | None) -> [B, D]``. Parameters: ``"xi"`` (``"gem"`` only, scalar),
  ``"whiten"`` (``kernel [C, D]``, ``bias [D]``).
  """
  pooling: RegionalPooling = "max"
  levels: int = 3
  xi_init: float = 3.0
  learn_xi: bool = True
  whiten_dims: int | None = None
  whiten_trainable: bool = True
  p_min: float = P_MIN

  @nn.compact
  def __call__(self, x, mask=None, regions=None, region_mask=None, *,
               before_whitening: bool = False):
    """Returns ``[B, D]`` descriptors, or with ``before_whitening`` the pair
    ``(l2n(pool_r) [B, R, C], valid [B, R])`` to learn the whitening from
    (``vectors[valid]``)."""
    if self.pooling not in REGIONAL_POOLINGS:
      raise ValueError(f"pooling must be one of {REGIONAL_POOLINGS}; got {self.pooling!r}.")
    _check_whiten_dims(self.whiten_dims)
    check_ndim("x", x, 4, "[B, H, W, C] (NHWC feature map)")
    x = _pooling_dtype(x)
    batch, height, width, _ = x.shape
    if mask is not None and tuple(np.shape(mask)) != (batch, height, width):
      # Checked here too: the per-image grid lookup reads the mask before the pooling does.
      raise ValueError(f"mask must have shape [B, H, W] = {(batch, height, width)} matching x; "
                       f"got shape {tuple(np.shape(mask))}.")
    if regions is None:
      if region_mask is not None:
        raise ValueError("region_mask needs regions: the R-MAC grid has no padded rows to mask.")
      regions, valid = rmac_grid_regions(height, width, self.levels, mask)
    else:
      valid = _check_region_mask(region_mask, regions, batch)
    xi = None
    if self.pooling == "gem":
      xi = _exponent_param(self, "xi", self.xi_init, (), self.learn_xi, self.p_min)
    if before_whitening:
      vectors = region_vectors(x, regions, self.pooling, xi, mask)
      keep = jnp.ones(vectors.shape[:2], bool) if valid is None else jnp.broadcast_to(
          valid, vectors.shape[:2])
      return jnp.where(keep[..., None], vectors, 0.0), keep
    project = None
    if self.whiten_dims is not None:
      project = Whitening(self.whiten_dims, self.whiten_trainable, name=WHITEN_NAME)
    return regional_descriptor(x, regions, self.pooling, xi, mask, valid, project)


def _check_region_mask(region_mask, regions, batch: int):
  if np.ndim(regions) not in (2, 3) or np.shape(regions)[-1] != 4:
    raise ValueError(f"regions must have shape [R, 4] or [B, R, 4] with rows (x, y, w, h); got "
                     f"shape {tuple(np.shape(regions))}.")
  if region_mask is None:
    return None
  want = (batch, np.shape(regions)[-2])
  if tuple(np.shape(region_mask)) != want:
    raise ValueError(f"region_mask must have shape [B, R] = {want} matching x and regions; got "
                     f"shape {tuple(np.shape(region_mask))}.")
  return jnp.asarray(region_mask, bool)


__all__ = [
    "GLOBAL_POOLINGS", "P_MIN", "REGIONAL_POOLINGS", "WHITEN_NAME", "GlobalPoolHead",
    "RegionalHead", "clamp_exponent", "global_descriptor", "learn_head_whitening", "pool_global",
    "region_vectors", "regional_descriptor", "replace_whitening", "rmac_grid_regions",
    "sum_regions",
]
