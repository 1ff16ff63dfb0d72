"""Host-side loading in worker threads: decode, crop, augment and resize while the device works.

Pillow decodes and resizes with the GIL released, so a few threads keep a device fed without
the start-up and pickling cost of processes. Two layers:

- :class:`ThreadedLoader` maps ``load_fn`` over a sequence in worker threads and yields the
  results **in input order**, at most ``prefetch`` items ahead of the consumer (bounded memory).
- :class:`BatchLoader` builds on it: decode (:func:`images.load_image`), optional query-box crop
  and augmentation, resize to one or more target sizes ("views", e.g. scales), group into shape
  buckets (:class:`buckets.BucketGrouper`) and yield padded ``uint8`` batches with their masks and
  the input positions they hold, optionally placed on the device one batch ahead.

A worker's exception re-raises in the consumer with its own type and traceback, plus a note
naming the item (its path, for files); unreadable files can be skipped and reported instead.
Stopping early (``break``, ``close()``, an exception in the consumer) cancels the queued work and
joins the threads before the generator returns.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from retrieval_jax import multiscale
from retrieval_jax._validation import check_positive_int
from retrieval_jax.data.buckets import BucketGrouper, Shape, pad_batch
from retrieval_jax.data.images import ImageReadError, load_image, resize_to
from retrieval_jax.data.transforms import Transform, crop_box

#: Name prefix of the worker threads (tests and debuggers find them by it).
THREAD_PREFIX = "retrieval_jax-loader"


@dataclasses.dataclass(frozen=True)
class _Failure:
  """A skipped item, as a worker returns it."""

  item: str
  reason: str


def describe_item(name: str, index: int, item: Any) -> str:
  """How messages name an item: the path of a file, ``name[index]`` otherwise."""
  if isinstance(item, (str, os.PathLike)):
    return os.fspath(item)
  return f"{name}[{index}]"


class ThreadedLoader:
  """Ordered parallel map: ``load_fn(i, items[i])`` for every ``i``, computed by worker threads,
  yielded as ``(i, result)`` in input order.

  ``items[i]`` is read inside the worker, so a lazy sequence (one that decodes in
  ``__getitem__``) is read in parallel too. Each iteration starts fresh worker threads and joins
  them when it ends, however it ends.

  Attributes:
    failures: ``(item, reason)`` for every item skipped in the latest iteration (``item`` as
      :func:`describe_item`), in input order; filled while iterating.
  """

  def __init__(self, items: Sequence[Any], load_fn: Callable[[int, Any], Any], *,
               num_workers: int = 2, prefetch: int | None = None,
               skip: tuple[type[BaseException], ...] = (), name: str = "items"):
    """
    Args:
      items: the inputs (any sequence: ``len`` and ``[]``).
      load_fn: ``(index, item) -> result``, called in a worker thread.
      num_workers: worker threads; 0 runs ``load_fn`` in the consumer's thread (debugging).
      prefetch: most items submitted ahead of the consumer (queued, running or done but not yet
        consumed); default ``4 * num_workers``. It bounds memory: a slow consumer stalls the
        workers instead of piling results up.
      skip: exception types that skip an item (recorded in :attr:`failures`) instead of
        raising; any other exception propagates.
      name: what messages call the sequence (the caller's argument name).
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or (
        num_workers < 0):
      raise ValueError(f"num_workers must be a non-negative integer; got {num_workers!r}.")
    self.items = items
    self.load_fn = load_fn
    self.num_workers = int(num_workers)
    self.prefetch = check_positive_int(
        "prefetch", 4 * max(self.num_workers, 1) if prefetch is None else prefetch)
    if self.prefetch < self.num_workers:
      raise ValueError(f"prefetch must be at least num_workers = {self.num_workers} (otherwise "
                       f"workers idle); got {self.prefetch}.")
    self.skip = tuple(skip)
    self.name = name
    self.failures: list[tuple[str, str]] = []

  def __len__(self) -> int:
    return len(self.items)

  def _run(self, index: int) -> Any:
    item = None
    try:
      item = self.items[index]
      return self.load_fn(index, item)
    except self.skip as err:
      # Described here, in the worker: reading items[index] again could decode it again.
      return _Failure(describe_item(self.name, index, item), str(err))
    except Exception as err:
      # The exception keeps its type (callers catch ImageReadError, ValueError, ...); the note
      # shows in its traceback, wherever it is re-raised.
      err.add_note(f"while loading {self.name}[{index}]"
                   + (f" = {os.fspath(item)}" if isinstance(item, (str, os.PathLike)) else ""))
      raise

  def __iter__(self) -> Iterator[tuple[int, Any]]:
    self.failures = []  # bound now, so a caller can hold it before the first item
    return self._generate(self.failures)

  def _generate(self, failures: list[tuple[str, str]]) -> Iterator[tuple[int, Any]]:
    count = len(self.items)
    if self.num_workers == 0:
      for index in range(count):
        value = self._run(index)
        if isinstance(value, _Failure):
          failures.append((value.item, value.reason))
        else:
          yield index, value
      return
    executor = concurrent.futures.ThreadPoolExecutor(self.num_workers,
                                                     thread_name_prefix=THREAD_PREFIX)
    pending: collections.deque = collections.deque()
    submitted = 0
    try:
      while pending or submitted < count:
        while submitted < count and len(pending) < self.prefetch:
          pending.append((submitted, executor.submit(self._run, submitted)))
          submitted += 1
        index, future = pending.popleft()
        value = future.result()  # a worker's exception re-raises here
        if isinstance(value, _Failure):
          failures.append((value.item, value.reason))
        else:
          yield index, value
    finally:
      # Reached on exhaustion, on an error and on close() (GeneratorExit at the yield): drop
      # the queued items, let the running ones finish, and join the threads.
      executor.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class LoadedBatch:
  """One padded batch of :class:`BatchLoader`.

  Attributes:
    x: ``uint8 [B, H, W, 3]`` (numpy, or a ``jax.Array`` when put on the device); rows past
      ``len(indices)`` are padding.
    mask: ``bool [B, H, W]``, True on real pixels (padding rows: pixel ``(0, 0)`` only).
    indices: input positions of rows ``0 .. len(indices) - 1``.
    view: which of the image's views (``sizes_fn`` outputs, e.g. scales) the batch holds.
  """

  x: Any
  mask: Any
  indices: tuple[int, ...]
  view: int = 0

  @property
  def bucket(self) -> Shape:
    return tuple(self.x.shape[1:3])


class BatchLoader:
  """Decodes, resizes and buckets images in worker threads; yields padded batches.

  Per image, in a worker thread: decode (a path) or check (an array), crop to its box, apply the
  augmentation, resize to each target size. In the consumer: group each view's images by bucket
  (:class:`buckets.BucketGrouper`) and pad every full batch (:func:`buckets.pad_batch`); the
  partial batches come last, view by view. Every kept image appears in exactly one batch per
  view, and the batches are the same whatever the thread timing.

  With ``device_put`` (or a ``sharding``) each batch is copied to the device one batch ahead:
  while the consumer's program runs on batch ``i``, batch ``i + 1`` is already on its way and
  the threads decode the images after it.

  Attributes:
    failures: ``(path, reason)`` of the unreadable files skipped in the latest iteration.
  """

  def __init__(self, images: Sequence[Any], *, batch_size: int, step: int | None = None,
               buckets: Sequence[Shape] | None = None, max_size: int | None = None,
               sizes_fn: Callable[[int, Shape], Sequence[Shape]] | None = None,
               boxes: Any = None, augment: Transform | None = None, seed: int = 0,
               num_workers: int = 2, prefetch: int | None = None,
               skip_unreadable: bool = False, device_put: bool = False,
               sharding: jax.sharding.Sharding | None = None, name: str = "images"):
    """
    Args:
      images: file paths and/or RGB ``uint8 [H, W, 3]`` arrays (any sequence; a lazy one is
        read in the workers).
      batch_size: rows per batch.
      step, buckets: the bucketing (:func:`buckets.bucket_shape`): round sides up to multiples
        of ``step``, or a fixed list of ``(H, W)``.
      max_size: resize so the long side is at most this (:func:`transforms.resize_max`: never
        enlarged); None keeps the size. Ignored when ``sizes_fn`` is given.
      sizes_fn: ``(index, (h, w)) -> [(h1, w1), ...]``, the target size of each view of an
        image of size ``(h, w)`` (after its crop and augmentation); it may raise to reject an
        image. Default: one view, ``max_size`` as above.
      boxes: optional ``[N, 4]`` ``(x0, y0, x1, y1)`` crops on the stored images
        (:func:`transforms.crop_box`); NaN rows mean the whole image.
      augment: optional ``(image, rng) -> image`` (e.g. :class:`transforms.TrainAugment`); image
        ``i`` gets ``np.random.default_rng((seed, i))``, so the result does not depend on
        which thread runs it.
      seed: the augmentation seed (change it every epoch).
      num_workers, prefetch: :class:`ThreadedLoader`'s; prefetch defaults to
        ``max(2 * batch_size, 4 * num_workers)`` so the next batch decodes while the device runs.
      skip_unreadable: skip unreadable files (listed in :attr:`failures`) instead of raising
        :class:`images.ImageReadError`.
      device_put: yield ``jax.Array`` batches placed with ``jax.device_put``.
      sharding: where to put them (implies ``device_put``); its spec must fit both ``x``
        ``[B, H, W, 3]`` and ``mask`` ``[B, H, W]``, e.g. a ``NamedSharding`` over the batch
        axis only.
      name: what messages call ``images`` (the caller's argument name).
    """
    self.images = images
    self.batch_size = check_positive_int("batch_size", batch_size)
    BucketGrouper(self.batch_size, step, buckets=buckets)  # checks the bucketing now
    self.step, self.buckets = step, buckets
    self.max_size = None if max_size is None else check_positive_int("max_size", max_size)
    self.sizes_fn = sizes_fn
    self.boxes = None
    if boxes is not None:
      self.boxes = np.asarray(boxes, np.float64)
      if self.boxes.shape != (len(images), 4):
        raise ValueError(f"boxes must have shape ({len(images)}, 4), one (x0, y0, x1, y1) per "
                         f"image (NaN rows: none); got {self.boxes.shape}.")
    self.augment = augment
    self.seed = seed
    self.num_workers = num_workers
    self.prefetch = (max(2 * self.batch_size, 4 * max(int(num_workers), 1)) if prefetch is None
                     else prefetch)
    self.skip_unreadable = skip_unreadable
    self.device_put = device_put or sharding is not None
    self.sharding = sharding
    self.name = name
    self.failures: list[tuple[str, str]] = []

  def prepare(self, index: int, source: Any) -> list[np.ndarray]:
    """The views of one image (what a worker computes): decode or check, crop, augment,
    resize."""
    if isinstance(source, np.ndarray):
      image = source
      if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{self.name}[{index}] must be an RGB uint8 [H, W, 3] array; got "
                         f"{image.dtype} {image.shape}.")
    else:
      image = load_image(source)
    if self.boxes is not None and not np.isnan(self.boxes[index]).any():
      image = crop_box(image, self.boxes[index])
    if self.augment is not None:
      image = self.augment(image, np.random.default_rng((self.seed, index)))
    if self.sizes_fn is not None:
      sizes = self.sizes_fn(index, image.shape[:2])
    elif self.max_size is not None:
      sizes = multiscale.scale_sizes(image.shape[:2], (1.0,), self.max_size)
    else:
      sizes = [image.shape[:2]]
    return [resize_to(image, tuple(size)) for size in sizes]

  def _host_batches(self) -> Iterator[LoadedBatch]:
    loader = ThreadedLoader(self.images, self.prepare, num_workers=self.num_workers,
                            prefetch=self.prefetch, name=self.name,
                            skip=(ImageReadError,) if self.skip_unreadable else ())
    groupers: dict[int, BucketGrouper] = {}
    waiting: dict[tuple[int, int], np.ndarray] = {}

    def assemble(view, batch):
      x, mask = pad_batch([waiting.pop((view, i)) for i in batch.indices], batch.bucket,
                          self.batch_size)
      return LoadedBatch(x, mask, batch.indices, view)

    items = iter(loader)
    self.failures = loader.failures  # filled as the iteration goes
    try:
      for index, views in items:
        for view, image in enumerate(views):
          if view not in groupers:
            groupers[view] = BucketGrouper(self.batch_size, self.step, buckets=self.buckets)
          waiting[view, index] = image
          full = groupers[view].add(index, *image.shape[:2])
          if full is not None:
            yield assemble(view, full)
      for view in sorted(groupers):
        for batch in groupers[view].flush():
          yield assemble(view, batch)
    finally:
      items.close()  # joins the worker threads when the consumer stops early

  def __iter__(self) -> Iterator[LoadedBatch]:
    host = self._host_batches()
    if not self.device_put:
      yield from host
      return
    ahead = None
    try:
      for batch in host:
        # device_put is asynchronous: the copy runs while the consumer works on `ahead`.
        placed = LoadedBatch(jax.device_put(batch.x, self.sharding),
                             jax.device_put(batch.mask, self.sharding), batch.indices,
                             batch.view)
        if ahead is not None:
          yield ahead
        ahead = placed
      if ahead is not None:
        yield ahead
    finally:
      host.close()


__all__ = ["BatchLoader", "LoadedBatch", "THREAD_PREFIX", "ThreadedLoader", "describe_item"]
