"""Hypothesis strategies shared by the pooling and head tests."""

from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st


@st.composite
def padded_bucket(draw, shape: tuple[int, int, int, int],
                  fill: Callable[[np.random.Generator, tuple[int, int, int]], np.ndarray]):
  """``shape[0]`` images of drawn valid sizes, padded bottom/right into one ``shape`` bucket.

  The padding holds large values (50..51), so any leak through the mask changes a result.
  Returns ``(x, mask, sizes, rng)``; ``fill(rng, (h, w, C))`` draws each image's values.
  """
  batch, height, width, channels = shape
  sizes = [(draw(st.integers(1, height)), draw(st.integers(1, width))) for _ in range(batch)]
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  x = (50.0 + rng.random(shape)).astype(np.float32)
  mask = np.zeros(shape[:3], bool)
  for b, (h, w) in enumerate(sizes):
    x[b, :h, :w] = fill(rng, (h, w, channels))
    mask[b, :h, :w] = True
  return x, mask, sizes, rng
