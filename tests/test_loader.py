"""The threaded loader on real files: order, batches, errors, early stop, device placement."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from retrieval_jax.data.buckets import bucket_shape
from retrieval_jax.data.images import ImageReadError
from retrieval_jax.data.loader import THREAD_PREFIX, BatchLoader, ThreadedLoader
from retrieval_jax.data.transforms import TrainAugment

FORMATS = ("jpg", "png", "pgm", "webp")


def _loader_threads():
  return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Photos of many sizes in four formats (PGM as 8-bit gray), written with Pillow."""
  directory = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(1)
  paths = []
  for k in range(14):
    h, w = (int(v) for v in rng.integers(40, 260, 2))
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8)
    image = Image.fromarray(pixels)
    fmt = FORMATS[k % 4]
    path = directory / f"photo{k:02d}.{fmt}"
    (image.convert("L") if fmt == "pgm" else image).save(path)
    paths.append(path)
  return paths


def _expected(path, max_size):
  """Independent reference: Pillow open, RGB, cirtorch's thumbnail size, bilinear resize."""
  with Image.open(path) as image:
    rgb = image.convert("RGB")
  thumb = rgb.copy()
  thumb.thumbnail((max_size, max_size))
  return np.asarray(rgb.resize(thumb.size, Image.BILINEAR))


def test_batches_hold_every_file_once_resized_and_masked(files):
  loader = BatchLoader(files, batch_size=3, step=64, max_size=128, num_workers=2)
  batches = list(loader)
  seen = [i for b in batches for i in b.indices]
  assert sorted(seen) == list(range(len(files)))
  for batch in batches:
    assert batch.x.dtype == np.uint8 and batch.x.shape[0] == 3 and batch.view == 0
    for row, index in enumerate(batch.indices):
      want = _expected(files[index], 128)
      h, w = want.shape[:2]
      assert max(h, w) <= 128 and bucket_shape(h, w, 64) == batch.bucket
      assert batch.mask[row].sum() == h * w and batch.mask[row, :h, :w].all()
      np.testing.assert_array_equal(batch.x[row, :h, :w], want)
    for row in range(len(batch.indices), 3):  # padding rows
      assert batch.mask[row].sum() == 1 and not batch.x[row].any()
  assert loader.failures == []


def test_threaded_loader_keeps_input_order_with_jittered_work():
  rng = np.random.default_rng(0)
  delays = rng.uniform(0, 0.01, 40)
  delays[::5] = 0.03  # some items far slower than their successors
  threads, running, most = set(), [0], [0]
  lock = threading.Lock()

  def load(index, item):
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
      threads.add(threading.current_thread().name)
    time.sleep(delays[index])
    with lock:
      running[0] -= 1
    return item * 10

  out = list(ThreadedLoader(list(range(40)), load, num_workers=2, prefetch=6))
  assert out == [(i, i * 10) for i in range(40)]
  assert len(threads) == 2 and most[0] == 2  # two threads, truly in parallel
  assert not _loader_threads()


def test_worker_errors_reraise_with_the_path(files, tmp_path):
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  items = files[:3] + [broken] + files[3:6]
  with pytest.raises(ImageReadError, match="broken.jpg"):
    list(BatchLoader(items, batch_size=2, step=64, max_size=64))
  assert not _loader_threads()

  def picky(index, item):
    if index == 2:
      raise KeyError("no such thing")
    return item

  with pytest.raises(KeyError) as info:
    list(ThreadedLoader([str(p) for p in files[:5]], picky, num_workers=2))
  assert info.value.__notes__ == [f"while loading items[2] = {files[2]}"]  # type kept, path named
  with pytest.raises(ValueError, match=r"photos\[1\] must be an RGB uint8 \[H, W, 3\] array"):
    list(BatchLoader([files[0], np.zeros((4, 4), np.uint8)], batch_size=2, step=8,
                     name="photos"))


def test_skip_unreadable_reports_failures_in_order(files, tmp_path):
  broken, missing = tmp_path / "broken.png", tmp_path / "missing.webp"
  broken.write_bytes(files[1].read_bytes()[:40])  # truncated PNG
  items = [files[0], broken, files[1], missing, files[2]]
  loader = BatchLoader(items, batch_size=4, step=64, max_size=64, skip_unreadable=True)
  batches = list(loader)
  assert sorted(i for b in batches for i in b.indices) == [0, 2, 4]
  assert [p for p, _ in loader.failures] == [str(broken), str(missing)]
  assert all("cannot read image" in reason for _, reason in loader.failures)


def test_early_close_cancels_work_and_joins_threads():
  calls = []

  def slow(index, item):
    calls.append(index)
    time.sleep(0.02)
    return item

  batches = iter(ThreadedLoader(list(range(100)), slow, num_workers=2, prefetch=4))
  assert next(batches) == (0, 0) and next(batches) == (1, 1)
  assert _loader_threads()
  batches.close()
  assert not _loader_threads()  # joined before close() returned
  assert len(calls) <= 6  # consumed 2, at most prefetch = 4 more were submitted
  for _ in ThreadedLoader(list(range(100)), slow, num_workers=2):
    break  # the abandoned generator is closed and joins its threads too
  assert not _loader_threads()


def test_batch_loader_close_and_consumer_errors_join_threads(files):
  loader = BatchLoader(files * 3, batch_size=2, step=64, max_size=64, num_workers=2)
  batches = iter(loader)
  next(batches)
  batches.close()
  assert not _loader_threads()
  with pytest.raises(RuntimeError, match="consumer failed"):
    for _ in loader:
      raise RuntimeError("consumer failed")
  assert not _loader_threads()


def test_device_batches_are_sharded_and_equal_host_batches(files):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  host = list(BatchLoader(files, batch_size=4, step=64, max_size=96))
  device = list(BatchLoader(files, batch_size=4, step=64, max_size=96, sharding=sharding))
  assert [b.indices for b in device] == [b.indices for b in host]
  for d, h in zip(device, host):
    assert isinstance(d.x, jax.Array) and d.x.sharding == sharding
    assert d.mask.sharding == sharding
    np.testing.assert_array_equal(np.asarray(d.x), h.x)
    np.testing.assert_array_equal(np.asarray(d.mask), h.mask)


def test_views_boxes_and_augmentation(files):
  boxes = np.full((len(files), 4), np.nan)
  boxes[0] = (10.5, 5.2, 30.7, 33.5)  # Pillow crops (10, 5, 31, 34)
  sizes_fn = lambda i, hw: [hw, (max(hw[0] // 2, 1), max(hw[1] // 2, 1))]  # noqa: E731
  batches = list(BatchLoader(files, batch_size=4, step=32, sizes_fn=sizes_fn, boxes=boxes))
  for view in (0, 1):
    assert sorted(i for b in batches if b.view == view for i in b.indices) == \
        list(range(len(files)))
  with Image.open(files[0]) as image:
    crop = np.asarray(image.convert("RGB").crop(tuple(boxes[0])))
  first = next(b for b in batches if b.view == 0 and 0 in b.indices)
  row = first.indices.index(0)
  assert first.mask[row].sum() == 29 * 21
  np.testing.assert_array_equal(first.x[row, :29, :21], crop)
  # Augmentation seeds come from (seed, index): the same batches on 2 threads and inline.
  augment = TrainAugment(size=48, brightness=0.4, hue=0.1)
  threaded = list(BatchLoader(files, batch_size=4, step=48, augment=augment, seed=3))
  inline = list(BatchLoader(files, batch_size=4, step=48, augment=augment, seed=3,
                            num_workers=0))
  other_seed = list(BatchLoader(files, batch_size=4, step=48, augment=augment, seed=4))
  for a, b in zip(threaded, inline):
    assert a.indices == b.indices
    np.testing.assert_array_equal(a.x, b.x)
  assert any((a.x != c.x).any() for a, c in zip(threaded, other_seed))
