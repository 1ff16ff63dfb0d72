"""Host-side image transforms: query crops, the max-size resize, and training augmentation.

All functions take and return RGB ``uint8 [H, W, 3]`` numpy arrays and work through Pillow, so
they match the PyTorch pipelines the papers used pixel for pixel:

- :func:`crop_box` is cirtorch's ``img.crop(bbx)`` on the stored image (revisitop query boxes).
- :func:`resize_max` is cirtorch's ``imresize`` size rule (``Image.thumbnail``: long side at most
  ``max_size``, aspect kept, never enlarged unless asked) with the bilinear antialiased filter of
  :func:`retrieval_jax.data.images.resize_to`; the size comes from
  :func:`retrieval_jax.multiscale.scale_sizes`, the one place sizes are computed.
- :func:`random_resized_crop`, :func:`random_flip` and :func:`colour_jitter` are torchvision's
  ``RandomResizedCrop``, ``RandomHorizontalFlip`` and ``ColorJitter`` on PIL images: the same
  draws in the same order, taken from an ``np.random.Generator`` instead of torch's global one,
  so an augmentation is a pure function of the image and the generator (reproducible per
  example, safe in worker threads that each own a generator).

:class:`TrainAugment` bundles the three with config-friendly fields; :class:`Compose` chains any
``(image, rng) -> image`` steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from retrieval_jax import multiscale
from retrieval_jax._validation import check_positive_int
from retrieval_jax.data.images import resize_to

#: A random transform: ``(image uint8 [H, W, 3], rng) -> image``.
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check_image(name: str, image: Any) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
    raise ValueError(f"{name} must be a non-empty RGB uint8 [H, W, 3] array; got {image.dtype} "
                     f"{image.shape}.")
  return image


def _check_size(size: Any) -> tuple[int, int]:
  """``size``: an int (square) or an ``(height, width)`` pair of positive ints."""
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    side = check_positive_int("size", size)
    return side, side
  if isinstance(size, (tuple, list)) and len(size) == 2:
    return check_positive_int("size[0]", size[0]), check_positive_int("size[1]", size[1])
  raise ValueError(f"size must be a positive int or a (height, width) pair; got {size!r}.")


def _check_range(name: str, value: Any, low_bound: float = 0.0) -> tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or
      not all(math.isfinite(float(v)) for v in value)):
    raise ValueError(f"{name} must be a (min, max) pair of finite numbers; got {value!r}.")
  low, high = float(value[0]), float(value[1])
  if not low_bound < low <= high:
    raise ValueError(f"{name} must satisfy {low_bound} < min <= max; got {value!r}.")
  return low, high


# ---------------------------------------------------------------------------------- evaluation


def crop_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
  """The region ``box = (x0, y0, x1, y1)`` of an image, exactly as Pillow's ``Image.crop``.

  cirtorch crops revisitop queries with ``img.crop(bbx)`` on the decoded, unresized image.
  Pillow rounds each coordinate to the nearest integer with Python's ``round`` (halves to even:
  ``2.5 -> 2``, ``3.5 -> 4``) and keeps columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``;
  parts of the box outside the image come out black, as Pillow's do.

  Args:
    image: ``uint8 [H, W, 3]``.
    box: four finite numbers, pixel coordinates of the stored image, ``x0 <= x1``, ``y0 <= y1``.

  Returns:
    ``uint8 [round(y1) - round(y0), round(x1) - round(x0), 3]`` (a view when the box lies inside
    the image).

  Raises:
    ValueError: a malformed box, or one that is empty after rounding (Pillow would return a
      0-pixel image, which no network can describe).
  """
  image = _check_image("image", image)
  values = np.asarray(box, dtype=np.float64)
  if values.shape != (4,) or not np.isfinite(values).all():
    raise ValueError(f"box must be four finite numbers (x0, y0, x1, y1); got {box!r}.")
  x0, y0, x1, y1 = (int(round(float(v))) for v in values)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"box {tuple(values.tolist())} must have x0 < x1 and y0 < y1 after rounding "
                     f"to pixels; got ({x0}, {y0}, {x1}, {y1}).")
  height, width = image.shape[:2]
  if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
    return image[y0:y1, x0:x1]
  out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
  top, left = max(y0, 0), max(x0, 0)
  bottom, right = min(y1, height), min(x1, width)
  if bottom > top and right > left:
    out[top - y0:bottom - y0, left - x0:right - x0] = image[top:bottom, left:right]
  return out


def resize_max(image: np.ndarray, max_size: int, *, upscale: bool = False) -> np.ndarray:
  """Resizes so the long side is at most ``max_size``, keeping the aspect ratio.

  The size is cirtorch's: ``imresize`` calls ``Image.thumbnail((max_size, max_size))``, which
  only ever shrinks, so an image already within ``max_size`` is returned as is (the default). The
  short side is rounded as ``thumbnail`` rounds it (:func:`multiscale.scale_sizes`). The filter
  is Pillow's antialiased bilinear (:func:`images.resize_to`).

  Args:
    image: ``uint8 [H, W, 3]``.
    max_size: positive int, the largest long side.
    upscale: also enlarge smaller images so their long side is exactly ``max_size`` (some
      training recipes resize every image to one size; cirtorch never does).

  Returns:
    ``uint8 [h, w, 3]`` with ``max(h, w) == max_size``, or the image itself when it already fits
    and ``upscale`` is False.
  """
  image = _check_image("image", image)
  max_size = check_positive_int("max_size", max_size)
  size = multiscale.scale_sizes(image.shape[:2], (1.0,), max_size)[0]
  if upscale and max(size) < max_size:
    # scale_sizes' rule for an absolute long side (up or down), rounded as thumbnail rounds.
    size = multiscale._fit_long_side(*image.shape[:2], max_size)
  return resize_to(image, size)


# ---------------------------------------------------------------------------------- training


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)
                               ) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``: a crop ``(top, left, h, w)``.

  Up to ten tries draw an area fraction ``U(scale)`` and a log-uniform aspect ratio
  ``w / h`` in ``ratio``; the first crop that fits is placed uniformly. After ten misses the
  fallback is a central crop of the whole image, clamped to the ratio range.

  Args:
    height, width: image size in pixels.
    rng: the generator (only ``uniform`` and ``integers`` are called, in torchvision's order).
    scale: ``(min, max)`` fraction of the image area, ``0 < min <= max``.
    ratio: ``(min, max)`` aspect ratio ``w / h``, ``0 < min <= max``.

  Returns:
    ``(top, left, h, w)`` ints with the crop inside the image.
  """
  height = check_positive_int("height", height)
  width = check_positive_int("width", width)
  scale = _check_range("scale", scale)
  ratio = _check_range("ratio", ratio)
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * float(rng.uniform(scale[0], scale[1]))
    aspect = math.exp(float(rng.uniform(log_low, log_high)))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int | tuple[int, int],
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's ``RandomResizedCrop(size, scale, ratio)`` on a PIL image: a crop from
  :func:`random_resized_crop_params`, resized (bilinear, antialiased) to ``size``.

  Args:
    image: ``uint8 [H, W, 3]``.
    rng: the generator.
    size: output side (square) or ``(height, width)``.
    scale, ratio: as :func:`random_resized_crop_params`.

  Returns:
    ``uint8 [size_h, size_w, 3]``.
  """
  image = _check_image("image", image)
  size = _check_size(size)
  top, left, h, w = random_resized_crop_params(*image.shape[:2], rng, scale, ratio)
  return resize_to(image[top:top + h, left:left + w], size)


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """torchvision's ``RandomHorizontalFlip(p)``: mirrors left-right when ``rng.random() < p``.

  Returns:
    the mirrored image (a view) or ``image`` itself.
  """
  image = _check_image("image", image)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be a probability in [0, 1]; got {p!r}.")
  return image[:, ::-1] if rng.random() < p else image


def _jitter_range(name: str, value: Any, center: float, bound: tuple[float, float]
                  ) -> tuple[float, float] | None:
  """torchvision's ``ColorJitter._check_input``: a strength ``v`` means ``[center - v,
  center + v]`` (clipped at 0 for the factors), a pair is used as is; no change is None."""
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
    if not value >= 0:
      raise ValueError(f"{name} must be a non-negative number or a (min, max) pair; got "
                       f"{value!r}.")
    low, high = center - float(value), center + float(value)
    if center == 1.0:
      low = max(low, 0.0)
  elif isinstance(value, (tuple, list)) and len(value) == 2:
    low, high = float(value[0]), float(value[1])
  else:
    raise ValueError(f"{name} must be a non-negative number or a (min, max) pair; got "
                     f"{value!r}.")
  if not bound[0] <= low <= high <= bound[1]:
    raise ValueError(f"{name} range must lie within {bound} with min <= max; got "
                     f"({low}, {high}).")
  return None if low == high == center else (low, high)


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL ``adjust_hue``: shifts the 8-bit HSV hue by ``factor`` of a turn,
  wrapping (the shift is ``int32(factor * 255)`` taken modulo 256, as torchvision's cast)."""
  h, s, v = image.convert("HSV").split()
  shifted = (np.asarray(h, np.uint8) + np.uint8(int(factor * 255) % 256)).astype(np.uint8)
  return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


def colour_jitter(image: np.ndarray, rng: np.random.Generator, brightness: Any = 0.0,
                  contrast: Any = 0.0, saturation: Any = 0.0, hue: Any = 0.0) -> np.ndarray:
  """torchvision's ``ColorJitter``: brightness, contrast, saturation and hue in a random order.

  The draws are torchvision's: a permutation of the four operations, then one uniform factor
  per enabled operation (brightness, contrast, saturation, hue). Each operation is Pillow's, as
  torchvision applies them to PIL images (``ImageEnhance.Brightness``, ``Contrast``, ``Color``;
  the hue shift in HSV).

  Args:
    image: ``uint8 [H, W, 3]``.
    rng: the generator (``permutation`` and ``uniform`` are called).
    brightness, contrast, saturation: a strength ``v >= 0`` (factor drawn from
      ``[max(0, 1 - v), 1 + v]``) or a ``(min, max)`` factor range; 0 disables the operation.
    hue: a strength ``0 <= v <= 0.5`` (shift drawn from ``[-v, v]`` of a turn) or a range
      within ``[-0.5, 0.5]``; 0 disables it.

  Returns:
    ``uint8 [H, W, 3]``; the input itself when every operation is disabled.
  """
  image = _check_image("image", image)
  ranges = [_jitter_range("brightness", brightness, 1.0, (0.0, math.inf)),
            _jitter_range("contrast", contrast, 1.0, (0.0, math.inf)),
            _jitter_range("saturation", saturation, 1.0, (0.0, math.inf)),
            _jitter_range("hue", hue, 0.0, (-0.5, 0.5))]
  order = rng.permutation(4)
  factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in ranges]
  if all(f is None for f in factors):
    return image
  out = Image.fromarray(np.ascontiguousarray(image))
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for op in order:
    factor = factors[int(op)]
    if factor is None:
      continue
    out = _adjust_hue(out, factor) if op == 3 else enhancers[int(op)](out).enhance(factor)
  return np.asarray(out)


# ---------------------------------------------------------------------------------- composing


@dataclasses.dataclass(frozen=True)
class Compose:
  """Applies ``(image, rng) -> image`` steps in order, all drawing from the same generator."""

  steps: tuple[Transform, ...]

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for step in self.steps:
      image = step(image, rng)
    return image


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """Training augmentation: random resized crop, horizontal flip, colour jitter, in that order
  (torchvision's ``Compose([RandomResizedCrop, RandomHorizontalFlip, ColorJitter])``).

  Build it from a config with ``TrainAugment(**cfg)``; zero strengths switch steps off
  (``flip_p=0``, jitter 0), and ``size=None`` skips the crop (images keep their size).

  Attributes:
    size: output side or ``(height, width)``; None: no crop.
    scale, ratio: :func:`random_resized_crop`'s ranges.
    flip_p: probability of a horizontal flip.
    brightness, contrast, saturation, hue: :func:`colour_jitter`'s strengths.
  """

  size: int | tuple[int, int] | None = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  brightness: float | tuple[float, float] = 0.0
  contrast: float | tuple[float, float] = 0.0
  saturation: float | tuple[float, float] = 0.0
  hue: float | tuple[float, float] = 0.0

  def __post_init__(self):
    # Check everything now, so a bad config fails when it is read, not in a worker thread.
    if self.size is not None:
      _check_size(self.size)
    _check_range("scale", tuple(self.scale))
    _check_range("ratio", tuple(self.ratio))
    if not 0.0 <= self.flip_p <= 1.0:
      raise ValueError(f"flip_p must be a probability in [0, 1]; got {self.flip_p!r}.")
    for name, center, bound in (("brightness", 1.0, (0.0, math.inf)),
                                ("contrast", 1.0, (0.0, math.inf)),
                                ("saturation", 1.0, (0.0, math.inf)), ("hue", 0.0, (-0.5, 0.5))):
      _jitter_range(name, getattr(self, name), center, bound)

  def steps(self) -> Compose:
    """The augmentation as a :class:`Compose` of the enabled steps."""
    steps: list[Transform] = []
    if self.size is not None:
      steps.append(lambda image, rng: random_resized_crop(image, rng, self.size,
                                                          tuple(self.scale), tuple(self.ratio)))
    steps.append(lambda image, rng: random_flip(image, rng, self.flip_p))
    steps.append(lambda image, rng: colour_jitter(image, rng, self.brightness, self.contrast,
                                                  self.saturation, self.hue))
    return Compose(tuple(steps))

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return self.steps()(image, rng)


__all__ = [
    "Compose", "TrainAugment", "Transform", "colour_jitter", "crop_box", "random_flip",
    "random_resized_crop", "random_resized_crop_params", "resize_max",
]
