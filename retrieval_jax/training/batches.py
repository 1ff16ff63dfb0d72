"""Training batches: image indices (tuples, m-per-class batches) to padded ``uint8`` arrays.

Every training image is resized so its long side is ``image_size`` (never enlarged, as
extraction resizes; sides rounded to the network stride, as :meth:`Retriever.input_size` does)
and padded at the bottom and right into one square ``[S, S]`` bucket, so a training step
compiles once whatever the photos' aspect ratios. The mask marks the real pixels; the model
pools only those.

Randomness (augmentation) is a pure function of ``(seed, epoch, step, slot)``: each image of a
batch gets its own generator, so the result does not depend on the loading threads' order, and
a run resumed at step ``i`` of epoch ``e`` builds exactly the batches an uninterrupted run
builds.
"""

from __future__ import annotations

import concurrent.futures
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from retrieval_jax import multiscale
from retrieval_jax.data.buckets import pad_batch
from retrieval_jax.data.images import load_image, resize_to
from retrieval_jax.data.transforms import colour_jitter, random_flip, random_resized_crop_params

_AUGMENT_STREAM = zlib.crc32(b"augment")


def training_size(image_hw: tuple[int, int], image_size: int, stride: int) -> tuple[int, int]:
  """The size an image is trained at: long side ``image_size`` (never enlarged), each side
  rounded to the nearest multiple of ``stride`` and at least one stride (so a thin photo keeps
  one feature-map cell), at most ``image_size`` (itself a multiple of ``stride``)."""
  h, w = multiscale.scale_sizes(image_hw, (1.0,), image_size)[0]
  return tuple(min(image_size, max(stride, int(round(side / stride)) * stride))
               for side in (h, w))


class ImageBatcher:
  """Loads, augments, resizes and pads training images into ``[S, S]`` buckets.

  Args:
    images: the training set's images (``uint8 [H, W, 3]`` arrays or paths; any sequence).
    image_size: ``S``, a multiple of ``stride``.
    stride: the network's stride (``Retriever.stride``).
    augment: the ``data.augment`` config section, or None for none (descriptors for mining
      are always computed without augmentation).
    seed: the run's seed.
    num_workers: loading threads (0: load in the calling thread).
  """

  def __init__(self, images: Sequence[Any], *, image_size: int, stride: int,
               augment: ml_collections.ConfigDict | None = None, seed: int = 0,
               num_workers: int = 2):
    if image_size % stride:
      raise ValueError(f"data.image_size {image_size} must be a multiple of the network stride "
                       f"{stride}, so every training image fits its bucket after rounding.")
    self.images = images
    self.image_size = image_size
    self.stride = stride
    self.augment = augment if augment is not None and augment.enabled else None
    self.seed = seed
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, "train-images")
                  if num_workers else None)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True)

  # ------------------------------------------------------------------------------ one image

  def load(self, index: int, key: tuple[int, ...] | None = None) -> np.ndarray:
    """Image ``index`` at its training size; augmented with the generator of ``key`` (a tuple
    of non-negative ints) when augmentation is enabled and ``key`` is given."""
    image = self.images[int(index)]
    if not isinstance(image, np.ndarray):
      image = load_image(image)
    if self.augment is not None and key is not None:
      return self._augmented(image, np.random.default_rng([self.seed, *key, _AUGMENT_STREAM]))
    return resize_to(image, training_size(image.shape[:2], self.image_size, self.stride))

  def _augmented(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop (area fraction ``crop_scale``, aspect ``crop_ratio``) resized straight to its
    training size, horizontal flip, colour jitter; the order of torchvision's pipeline."""
    aug = self.augment
    if tuple(aug.crop_scale) != (1.0, 1.0):
      top, left, h, w = random_resized_crop_params(*image.shape[:2], rng,
                                                   tuple(aug.crop_scale), tuple(aug.crop_ratio))
      image = image[top:top + h, left:left + w]
    image = resize_to(image, training_size(image.shape[:2], self.image_size, self.stride))
    image = random_flip(image, rng, aug.flip_p)
    return colour_jitter(image, rng, aug.brightness, aug.contrast, aug.saturation, aug.hue)

  def _load_all(self, indices: Sequence[int], keys: Sequence[tuple[int, ...] | None]
                ) -> list[np.ndarray]:
    if self._pool is None:
      return [self.load(i, k) for i, k in zip(indices, keys)]
    return list(self._pool.map(self.load, indices, keys))

  def _padded(self, indices: Sequence[int], keys: Sequence[tuple[int, ...] | None], rows: int
              ) -> tuple[np.ndarray, np.ndarray]:
    return pad_batch(self._load_all(indices, keys), (self.image_size, self.image_size), rows,
                     dtype=np.uint8)

  # ------------------------------------------------------------------------------ batches

  def tuple_batch(self, rows: np.ndarray, batch_size: int, *, epoch: int, step: int
                  ) -> dict[str, np.ndarray]:
    """A tuple step's batch.

    Args:
      rows: int ``[t, n]`` image indices (query, positive, negatives), ``t <= batch_size``.
      batch_size: ``T``, the global batch; rows past ``t`` are padding (``valid`` False).
      epoch, step: where the batch sits (the augmentation's randomness).

    Returns:
      ``pixels`` uint8 ``[T, n, S, S, 3]``, ``mask`` bool ``[T, n, S, S]``, ``valid`` bool ``[T]``.
    """
    t, n = rows.shape
    flat = rows.reshape(-1).tolist()
    keys = [(epoch, step, slot) for slot in range(len(flat))]
    pixels, mask = self._padded(flat, keys, batch_size * n)
    s = self.image_size
    return {"pixels": pixels.reshape(batch_size, n, s, s, 3),
            "mask": mask.reshape(batch_size, n, s, s), "valid": np.arange(batch_size) < t}

  def image_batch(self, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  epoch: int, step: int) -> dict[str, np.ndarray]:
    """A batch step's batch: ``pixels [B, S, S, 3]``, ``mask``, ``labels`` int32 ``[B]``,
    ``valid`` (padding past ``len(indices)``)."""
    b = len(indices)
    pixels, mask = self._padded(indices.tolist(), [(epoch, step, slot) for slot in range(b)],
                                batch_size)
    padded_labels = np.full(batch_size, -1, np.int32)
    padded_labels[:b] = labels
    return {"pixels": pixels, "mask": mask, "labels": padded_labels,
            "valid": np.arange(batch_size) < b}

  def plain_batches(self, indices: np.ndarray, batch_size: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Un-augmented ``(pixels [batch_size, S, S, 3], mask, real rows)`` over ``indices`` in
    order (the last batch padded), for describing images with the current model; the next
    batch loads while the caller computes."""
    chunks = [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    return prefetch(lambda c: (*self._padded(c, [None] * len(c), batch_size), len(c)), chunks)


def prefetch(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
  """``fn(item)`` for each item in order, computing the next one in a thread while the caller
  consumes the current one (host loading overlaps the device step)."""
  with concurrent.futures.ThreadPoolExecutor(1, "prefetch") as pool:
    pending = None
    for item in items:
      future = pool.submit(fn, item)
      if pending is not None:
        yield pending.result()
      pending = future
    if pending is not None:
      yield pending.result()
