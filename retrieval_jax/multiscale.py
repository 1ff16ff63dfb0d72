"""Multi-scale descriptors: the resize targets of each scale, and combining their descriptors.

Every paper we follow tests multi-scale: cirtorch / LRML (§4, "multi-scale evaluation") extract
at ``1, 1/sqrt(2), 1/2`` times a 1024-pixel image and combine with the learned GeM ``p``; DARAC
(§4) sums L2-normalised descriptors of 299, 540 and 1020-pixel images; REMAP (§V-E, Eq. 3) weights
two scales as ``X = 2 X1 + 1.4 X2``.

Pure functions: :func:`scale_sizes` runs on the host (sizes are static shapes);
:func:`combine_scales` is jax and jit-able (``method`` static).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax._validation import (check_finite, check_ndim, check_positive_int,
                                       is_concrete)
from retrieval_jax.normalization import L2_EPS, l2n

CombineMethod = Literal["sum", "weighted", "gem"]
COMBINE_METHODS = ("sum", "weighted", "gem")

# Published scale sets, for configs.
CIRTORCH_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)  # relative to the 1024-px image
DARAC_SIZES = (299, 540, 1020)  # long side in pixels (MR-DARAC)
REMAP_SIZES = (1024, 1280)  # long side of REMAP's 1024x768 and 1280x960 images
REMAP_WEIGHTS = (2.0, 1.4)  # REMAP Eq. 3: X = 2 X1 + 1.4 X2

# A scale up to this value is a factor of the image size; above it, a long side in pixels.
RELATIVE_SCALE_LIMIT = 4.0


def _fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
  """Aspect-preserving size with the long side ``long_side``, rounded as Pillow's
  ``Image.thumbnail`` (cirtorch's ``imresize``) does: the short side is whichever of
  ``floor`` / ``ceil`` of its exact value keeps the aspect ratio ``w / h`` closest (ties to the
  floor), and at least 1."""
  aspect = width / height
  if width <= height:
    # Pillow: the box is square, so x / y = 1 >= aspect; solve for the width.
    exact = long_side * aspect
    short = min(math.floor(exact), math.ceil(exact), key=lambda n: abs(aspect - n / long_side))
    return long_side, max(short, 1)
  exact = long_side / aspect
  short = min(math.floor(exact), math.ceil(exact),
              key=lambda n: 0 if n == 0 else abs(aspect - long_side / n))
  return max(short, 1), long_side


def scale_sizes(image_hw: tuple[int, int], scales: Sequence[float],
                max_size: int | None = None) -> list[tuple[int, int]]:
  """Resize targets ``(h, w)`` of an image for each scale, in the order of ``scales``.

  Each scale is read on its own:

  - ``s <= 4`` (:data:`RELATIVE_SCALE_LIMIT`) is a factor of the base size (cirtorch's
    ``1, 1/sqrt(2), 1/2``). The base is the image, first shrunk to fit a
    ``max_size x max_size`` box when ``max_size`` is given (never enlarged, as cirtorch's
    ``imresize`` with Pillow's ``thumbnail``: long side ``max_size``, short side rounded as
    :func:`_fit_long_side`). Each side is then ``max(1, floor(side * s))`` in float64, as
    ``torch.nn.functional.interpolate(scale_factor=s)`` computes its output size.
  - ``s > 4`` is an absolute long side in pixels (DARAC's 299, 540, 1020; REMAP's 1024, 1280):
    the image is resized (down or up) to that long side, the short side rounded as Pillow's
    ``thumbnail``. ``max_size`` does not apply to these.

  Args:
    image_hw: ``(height, width)`` of the image in pixels, positive ints.
    scales: non-empty sequence of finite positive numbers.
    max_size: optional positive int, the largest long side of the base image for relative
      scales (DESIGN §3: ``Retriever.extract(max_size=1024)``).

  Returns:
    list of ``(height, width)`` int tuples, one per scale.
  """
  if not isinstance(image_hw, (tuple, list, np.ndarray)) or len(image_hw) != 2:
    raise ValueError(f"image_hw must be a (height, width) pair; got {image_hw!r}.")
  height = check_positive_int("image_hw[0]", image_hw[0])
  width = check_positive_int("image_hw[1]", image_hw[1])
  if isinstance(scales, (str, bytes)) or not isinstance(scales, (Sequence, np.ndarray)):
    raise ValueError(f"scales must be a sequence of positive numbers; got {scales!r}.")
  if len(scales) == 0:
    raise ValueError("scales must hold at least one scale; got an empty sequence.")
  for i, s in enumerate(scales):
    if (isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or
        not math.isfinite(s) or s <= 0):
      raise ValueError(f"scales[{i}] must be a finite positive number; got {s!r}.")
  if max_size is not None:
    max_size = check_positive_int("max_size", max_size)

  base_h, base_w = height, width
  if max_size is not None and max(height, width) > max_size:
    base_h, base_w = _fit_long_side(height, width, max_size)
  sizes = []
  for s in scales:
    if s <= RELATIVE_SCALE_LIMIT:
      sizes.append((max(1, math.floor(base_h * float(s))), max(1, math.floor(base_w * float(s)))))
    else:
      if s != math.floor(s):
        raise ValueError(f"scales above {RELATIVE_SCALE_LIMIT} are long sides in pixels and must "
                         f"be whole numbers; got {s!r}.")
      sizes.append(_fit_long_side(height, width, int(s)))
  return sizes


def _check_scalar_or_vector(name: str, value, length: int, what: str) -> jax.Array:
  if is_concrete(value):
    value = np.asarray(value, np.float64)
  if np.ndim(value) not in (0, 1) or (np.ndim(value) == 1 and np.shape(value)[0] != length):
    raise ValueError(f"{name} must be a scalar or have shape [{length}] ({what}); got shape "
                     f"{tuple(np.shape(value))}.")
  check_finite(name, value)
  return jnp.asarray(value)


def combine_scales(descriptors, method: CombineMethod = "sum", weights=None, p=None,
                   eps: float = L2_EPS) -> jax.Array:
  """Combines descriptors of the same images at ``S`` scales into one L2-normalised descriptor.

  - ``"sum"``: ``l2n(sum_s v_s)`` (MR-DARAC; Gordo et al.: L2-normalised, summed, L2 again).
  - ``"weighted"``: ``l2n(sum_s w_s v_s)`` (REMAP Eq. 3, ``weights = (2, 1.4)``:
    :data:`REMAP_WEIGHTS`).
  - ``"gem"``: ``l2n((mean_s v_s^p)^(1/p))`` with ``p`` the learned GeM exponent (cirtorch's
    ``extract_ms``, which uses it for GeM heads without whitening and ``p = 1`` otherwise).
    ``v_s^p`` needs non-negative descriptors (GeM without whitening gives them); concrete
    negative entries raise, traced ones give NaN, as in cirtorch.

  The per-scale descriptors are used as given: the heads return them L2-normalised, so each scale
  counts with its weight (or equally).

  Args:
    descriptors: float ``[S, N, D]``, scale-major.
    method: ``"sum"``, ``"weighted"`` or ``"gem"``.
    weights: ``[S]`` non-negative finite weights, not all zero (``"weighted"`` only).
    p: positive finite exponent, scalar or ``[D]`` (``"gem"`` only; may be traced).
    eps: the L2 epsilon (DESIGN §4.1).

  Returns:
    ``[N, D]`` L2-normalised rows.
  """
  check_ndim("descriptors", descriptors, 3, "[S, N, D] (scales, images, dims)")
  n_scales, _, dims = np.shape(descriptors)
  if n_scales == 0:
    raise ValueError("descriptors must hold at least one scale; got S = 0.")
  if method not in COMBINE_METHODS:
    raise ValueError(f"method must be one of {COMBINE_METHODS}; got {method!r}.")
  if weights is not None and method != "weighted":
    raise ValueError(f"weights are only used by method='weighted'; got them with {method!r}.")
  if p is not None and method != "gem":
    raise ValueError(f"p is only used by method='gem'; got it with method={method!r}.")
  check_finite("descriptors", descriptors)
  v = jnp.asarray(descriptors)
  if not jnp.issubdtype(v.dtype, jnp.floating):
    v = v.astype(jnp.float32)

  if method == "sum":
    return l2n(jnp.sum(v, axis=0), eps=eps)

  if method == "weighted":
    if weights is None:
      raise ValueError(f"method='weighted' needs weights, one per scale (S = {n_scales}); got "
                       "None.")
    if is_concrete(weights):
      weights = np.asarray(weights, np.float64)  # lists and tuples too (REMAP_WEIGHTS)
    if np.shape(weights) != (n_scales,):
      raise ValueError(f"weights must have shape [S] = ({n_scales},), one per scale; got shape "
                       f"{tuple(np.shape(weights))}.")
    check_finite("weights", weights)
    if is_concrete(weights) and ((weights < 0).any() or not (weights > 0).any()):
      raise ValueError(
          f"weights must be non-negative and not all zero; got {weights.tolist()}.")
    w = jnp.asarray(weights, v.dtype)
    return l2n(jnp.einsum("s,snd->nd", w, v), eps=eps)

  if p is None:
    raise ValueError("method='gem' needs p, the GeM exponent (e.g. the head's learned p); got "
                     "None.")
  p = _check_scalar_or_vector("p", p, dims, "one exponent, or one per dimension D")
  if is_concrete(p) and not bool(jnp.all(p > 0)):
    raise ValueError(f"p must be positive; got {np.asarray(p).tolist()}.")
  if is_concrete(v) and bool(jnp.any(v < 0)):
    raise ValueError("descriptors must be non-negative for method='gem' (v^p of a negative entry "
                     "is undefined): combine whitened descriptors with 'sum' or 'weighted'.")
  p = p.astype(v.dtype)
  return l2n(jnp.power(jnp.mean(jnp.power(v, p), axis=0), 1.0 / p), eps=eps)


__all__ = [
    "CIRTORCH_SCALES", "COMBINE_METHODS", "DARAC_SIZES", "RELATIVE_SCALE_LIMIT", "REMAP_SIZES",
    "REMAP_WEIGHTS", "combine_scales", "scale_sizes",
]
