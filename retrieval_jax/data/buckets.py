"""Shape buckets: pad images of many sizes into a few array shapes, with a validity mask.

``jax.jit`` compiles one program per input shape. Photos come in every size, so extraction and
training pad each image at the bottom and right into a *bucket* (a larger ``(H, W)``) and run a
fixed batch size: a folder of photos compiles one program per bucket, not one per image. The
mask says which pixels are real; the backbones and heads use it so a padded image gets its
unpadded descriptor.

Buckets are either every ``(H, W)`` with sides rounded up to multiples of a ``step``
(:func:`bucket_shape`), or a fixed list, where an image takes the smallest bucket (by area) that
holds it (:func:`bucket_sizes` gives the full grid for a largest side).

:class:`BucketGrouper` streams images into full batches (bounded memory: at most
``batch_size - 1`` images wait per bucket); :func:`plan_batches` plans a known list of shapes
with the same grouping; :func:`pad_batch` builds the arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from retrieval_jax._validation import check_positive_int

Shape = tuple[int, int]


def _check_buckets(step: int | None, buckets: Sequence[Shape] | None
                   ) -> tuple[int | None, tuple[Shape, ...] | None]:
  if (step is None) == (buckets is None):
    raise ValueError(f"give exactly one of step (round sides up to multiples) and buckets (a "
                     f"fixed list); got step={step!r}, buckets={buckets!r}.")
  if step is not None:
    return check_positive_int("step", step), None
  checked = []
  for i, b in enumerate(buckets):
    if not isinstance(b, (tuple, list)) or len(b) != 2:
      raise ValueError(f"buckets[{i}] must be a (height, width) pair; got {b!r}.")
    checked.append((check_positive_int(f"buckets[{i}][0]", b[0]),
                    check_positive_int(f"buckets[{i}][1]", b[1])))
  if not checked:
    raise ValueError("buckets must hold at least one (height, width); got an empty list.")
  # Smallest area first (ties: fewer rows), so the first fit is the tightest one.
  return None, tuple(sorted(set(checked), key=lambda b: (b[0] * b[1], b)))


def _fit(height: int, width: int, step: int | None, buckets: tuple[Shape, ...] | None) -> Shape:
  if step is not None:
    return -(-height // step) * step, -(-width // step) * step
  for b in buckets:
    if height <= b[0] and width <= b[1]:
      return b
  raise ValueError(f"no bucket holds a {height}x{width} image; the largest are "
                   f"{sorted(buckets, key=lambda b: b[0] * b[1])[-3:]}: resize the images to fit "
                   f"or add a bucket.")


def bucket_shape(height: int, width: int, step: int | None = None, *,
                 buckets: Sequence[Shape] | None = None) -> Shape:
  """The bucket of an image: sides rounded up to multiples of ``step``, or the smallest-area
  bucket of ``buckets`` that holds it.

  Args:
    height, width: the image size in pixels, positive ints.
    step: positive int; or None when ``buckets`` is given.
    buckets: a fixed list of ``(H, W)``; or None when ``step`` is given.

  Returns:
    ``(H, W)`` with ``H >= height`` and ``W >= width``.

  Raises:
    ValueError: both or neither of ``step`` and ``buckets``, or no bucket holds the image.
  """
  step, fixed = _check_buckets(step, buckets)
  return _fit(check_positive_int("height", height), check_positive_int("width", width), step,
              fixed)


def bucket_sizes(max_size: int, step: int) -> list[Shape]:
  """Every bucket of images whose long side is at most ``max_size``: the ``(H, W)`` with both
  sides multiples of ``step`` up to ``max_size`` rounded up, smallest area first.

  With ``max_size = 1024, step = 256`` that is 16 shapes; images resized to a long side of
  exactly ``max_size`` fill only the ``2 * 4 - 1 = 7`` with a side of 1024.
  """
  max_size = check_positive_int("max_size", max_size)
  step = check_positive_int("step", step)
  sides = range(step, -(-max_size // step) * step + 1, step)
  return sorted(((h, w) for h in sides for w in sides), key=lambda b: (b[0] * b[1], b))


@dataclasses.dataclass(frozen=True)
class Batch:
  """A batch of one bucket: the positions (into the planned list) of its images, in order."""

  bucket: Shape
  indices: tuple[int, ...]


class BucketGrouper:
  """Groups images into batches of one bucket as they arrive.

  :meth:`add` returns a full batch as soon as a bucket holds ``batch_size`` images; :meth:`flush`
  returns the partial ones at the end. Within a bucket, images keep their arrival order, so the
  batches are a deterministic function of the sequence of added shapes.
  """

  def __init__(self, batch_size: int, step: int | None = None, *,
               buckets: Sequence[Shape] | None = None):
    self.batch_size = check_positive_int("batch_size", batch_size)
    self._step, self._buckets = _check_buckets(step, buckets)
    self._waiting: dict[Shape, list[int]] = {}

  def bucket(self, height: int, width: int) -> Shape:
    """The bucket an image of this size goes to (:func:`bucket_shape`)."""
    return _fit(check_positive_int("height", height), check_positive_int("width", width),
                self._step, self._buckets)

  def add(self, index: int, height: int, width: int) -> Batch | None:
    """Adds image ``index`` of size ``height x width``; returns its bucket's batch once full."""
    bucket = self.bucket(height, width)
    waiting = self._waiting.setdefault(bucket, [])
    waiting.append(index)
    if len(waiting) < self.batch_size:
      return None
    del self._waiting[bucket]
    return Batch(bucket, tuple(waiting))

  def flush(self) -> list[Batch]:
    """The partial batches still waiting, smallest bucket first; the grouper is then empty."""
    batches = [Batch(b, tuple(ix)) for b, ix in sorted(self._waiting.items())]
    self._waiting.clear()
    return batches


def plan_batches(shapes: Iterable[Shape], batch_size: int, step: int | None = None, *,
                 buckets: Sequence[Shape] | None = None) -> list[Batch]:
  """Groups images of known sizes into same-bucket batches of at most ``batch_size``.

  Args:
    shapes: ``(height, width)`` of each image (an ``[N, 2]`` array works too).
    batch_size: positive int.
    step, buckets: the bucketing (see :func:`bucket_shape`).

  Returns:
    Batches sorted by bucket (``(H, W)`` ascending), and within a bucket by position; every
    index ``0 .. N - 1`` is in exactly one batch, and only a bucket's last batch can be short.
  """
  grouper = BucketGrouper(batch_size, step, buckets=buckets)
  batches = []
  for i, shape in enumerate(shapes):
    if len(shape) < 2:
      raise ValueError(f"shapes[{i}] must be (height, width); got {shape!r}.")
    full = grouper.add(i, int(shape[0]), int(shape[1]))
    if full is not None:
      batches.append(full)
  return sorted(batches + grouper.flush(), key=lambda b: (b.bucket, b.indices[0]))


def pad_batch(images: Sequence[np.ndarray], bucket: Shape, batch_size: int, *,
              dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads images into one ``[batch_size, H, W, C]`` array with a validity mask.

  Each image sits at the top-left of its row, zeros elsewhere. Rows past ``len(images)`` (the
  padding of a short last batch) are all zeros with one valid pixel at ``(0, 0)``, so masked
  means and GeM never divide by an empty mask (no NaN in rows that are thrown away anyway).

  Args:
    images: ``[h_i, w_i, C]`` arrays with ``h_i <= H`` and ``w_i <= W``, one ``C`` for all.
    bucket: ``(H, W)``.
    batch_size: rows of the output, ``>= len(images)``.
    dtype: of ``x``; default the images' (``uint8`` for decoded photos: a quarter of the
      float32 bytes to copy to the device; normalise there).

  Returns:
    ``(x [batch_size, H, W, C], mask bool [batch_size, H, W])``.
  """
  batch_size = check_positive_int("batch_size", batch_size)
  height, width = (check_positive_int("bucket[0]", bucket[0]),
                   check_positive_int("bucket[1]", bucket[1]))
  if len(images) > batch_size:
    raise ValueError(f"images must number at most batch_size = {batch_size}; got "
                     f"{len(images)}.")
  channels = images[0].shape[-1] if len(images) else 3
  for i, image in enumerate(images):
    if image.ndim != 3 or image.shape[-1] != channels:
      raise ValueError(f"images[{i}] must be [h, w, {channels}]; got shape {image.shape}.")
    if image.shape[0] > height or image.shape[1] > width:
      raise ValueError(f"images[{i}] is {image.shape[0]}x{image.shape[1]}, larger than the "
                       f"bucket {height}x{width}.")
  if dtype is None:
    dtype = np.result_type(*images) if len(images) else np.uint8
  x = np.zeros((batch_size, height, width, channels), dtype)
  mask = np.zeros((batch_size, height, width), bool)
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    x[i, :h, :w] = image
    mask[i, :h, :w] = True
  mask[len(images):, 0, 0] = True
  return x, mask


__all__ = ["Batch", "BucketGrouper", "bucket_shape", "bucket_sizes", "pad_batch",
           "plan_batches"]
