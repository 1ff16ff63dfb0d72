"""Shape buckets: rounding, fixed lists, batch plans that cover every image once, padding."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval_jax.data.buckets import (Batch, BucketGrouper, bucket_shape, bucket_sizes,
                                        pad_batch, plan_batches)


@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(1, 512))
def test_bucket_shape_rounds_each_side_up_to_the_step(height, width, step):
  got = bucket_shape(height, width, step)
  assert got == (math.ceil(height / step) * step, math.ceil(width / step) * step)
  assert 0 <= got[0] - height < step and 0 <= got[1] - width < step


def test_fixed_buckets_take_the_smallest_that_holds_the_image():
  buckets = [(512, 512), (384, 512), (512, 384), (256, 256)]
  assert bucket_shape(200, 250, buckets=buckets) == (256, 256)
  assert bucket_shape(300, 500, buckets=buckets) == (384, 512)
  assert bucket_shape(500, 300, buckets=buckets) == (512, 384)
  assert bucket_shape(400, 400, buckets=buckets) == (512, 512)
  with pytest.raises(ValueError, match="no bucket holds a 600x100 image"):
    bucket_shape(600, 100, buckets=buckets)
  with pytest.raises(ValueError, match="exactly one of step"):
    bucket_shape(10, 10, 32, buckets=buckets)
  with pytest.raises(ValueError, match="exactly one of step"):
    bucket_shape(10, 10)
  with pytest.raises(ValueError, match=r"buckets\[1\] must be a \(height, width\) pair"):
    bucket_shape(10, 10, buckets=[(32, 32), 32])
  with pytest.raises(ValueError, match="step must be a positive integer"):
    bucket_shape(10, 10, 0)


def test_bucket_sizes_are_the_grid_and_agree_with_rounding(rng):
  sizes = bucket_sizes(1024, 256)
  assert len(sizes) == 16 and len(set(sizes)) == 16
  assert sum(max(s) == 1024 for s in sizes) == 7  # the buckets of long side exactly 1024
  areas = [h * w for h, w in sizes]
  assert areas == sorted(areas)
  sizes = bucket_sizes(1000, 96)  # 1000 rounds up to 1056 = 11 * 96
  assert len(sizes) == 121 and max(max(s) for s in sizes) == 1056
  for height, width in rng.integers(1, 1001, (200, 2)):
    assert bucket_shape(int(height), int(width), buckets=sizes) == bucket_shape(
        int(height), int(width), 96)


def _reference_plan(shapes, batch_size, step):
  """The grouping Retriever.extract used before: dict by bucket, buckets sorted, chunks."""
  groups = {}
  for i, (h, w) in enumerate(shapes):
    groups.setdefault((-(-h // step) * step, -(-w // step) * step), []).append(i)
  return [(bucket, tuple(members[s:s + batch_size])) for bucket, members in sorted(groups.items())
          for s in range(0, len(members), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_plan_covers_every_index_once_in_same_bucket_batches(rng, batch_size):
  shapes = [tuple(int(v) for v in s) for s in rng.integers(1, 700, (150, 2))]
  plan = plan_batches(shapes, batch_size, 128)
  assert [(b.bucket, b.indices) for b in plan] == _reference_plan(shapes, batch_size, 128)
  indices = [i for batch in plan for i in batch.indices]
  assert sorted(indices) == list(range(len(shapes)))
  for k, batch in enumerate(plan):
    assert 1 <= len(batch.indices) <= batch_size
    assert all(bucket_shape(*shapes[i], 128) == batch.bucket for i in batch.indices)
    last_of_bucket = k + 1 == len(plan) or plan[k + 1].bucket != batch.bucket
    assert len(batch.indices) == batch_size or last_of_bucket
  assert plan_batches(np.asarray(shapes), batch_size, 128) == plan  # an [N, 2] array works too


def test_grouper_streams_full_batches_as_soon_as_they_fill():
  grouper = BucketGrouper(2, 100)
  assert grouper.add(0, 50, 50) is None
  assert grouper.add(1, 150, 50) is None
  assert grouper.add(2, 99, 100) == Batch((100, 100), (0, 2))
  assert grouper.add(3, 120, 10) == Batch((200, 100), (1, 3))
  assert grouper.add(4, 300, 300) is None
  assert grouper.add(5, 1, 1) is None
  assert grouper.flush() == [Batch((100, 100), (5,)), Batch((300, 300), (4,))]
  assert grouper.flush() == []
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    BucketGrouper(0, 100)


def test_pad_batch_places_images_top_left_with_their_masks(rng):
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (8, 3), (8, 8))]
  x, mask = pad_batch(images, (8, 8), 5)
  assert x.shape == (5, 8, 8, 3) and x.dtype == np.uint8
  assert mask.shape == (5, 8, 8) and mask.dtype == bool
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    assert mask[i].sum() == h * w and mask[i, :h, :w].all()  # the mask is the true size
    np.testing.assert_array_equal(x[i, :h, :w], image)
    assert not x[i][~mask[i]].any()  # zeros outside
  # Padding rows: zeros, one valid pixel at the top-left.
  assert not x[3:].any()
  assert mask[3:].sum() == 2 and mask[3:, 0, 0].all()
  xf, _ = pad_batch(images, (8, 8), 3, dtype=np.float32)
  assert xf.dtype == np.float32
  np.testing.assert_array_equal(xf, x[:3].astype(np.float32))


def test_pad_batch_errors(rng):
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="at most batch_size = 1; got 2"):
    pad_batch([image, image], (4, 4), 1)
  with pytest.raises(ValueError, match=r"images\[0\] is 4x4, larger than the bucket 4x3"):
    pad_batch([image], (4, 3), 1)
  with pytest.raises(ValueError, match=r"images\[1\] must be \[h, w, 3\]"):
    pad_batch([image, image[..., :1]], (4, 4), 2)
