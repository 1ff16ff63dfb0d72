"""Pictures of retrieval results, drawn with Pillow alone (no matplotlib).

>>> grid = result_grid(query_images, top_images, correct=hits, query_boxes=boxes)
>>> save_png(grid, "results.png")

:func:`result_grid` puts one query per row (blue frame, its box in yellow when given) followed
by its top results as thumbnails, framed green (correct), red (wrong) or grey (junk or unknown)
when the ground truth is known, with an optional caption (rank, score) under each.
``retrieval-jax search --grid`` and the demo use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retrieval_jax._atomic import write_atomic
from retrieval_jax.data.images import load_image

CORRECT = (0, 160, 60)
WRONG = (215, 30, 30)
NEUTRAL = (160, 160, 160)
QUERY = (40, 90, 220)
BOX = (255, 205, 0)
BACKGROUND = (255, 255, 255)


def to_pil(image: Any) -> Image.Image:
  """An RGB Pillow image from a path, a Pillow image or an ``[H, W]`` / ``[H, W, C]`` array
  (uint8, or floats in [0, 1])."""
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, (str, os.PathLike)):
    return Image.fromarray(load_image(image))
  array = np.asarray(image)
  if array.dtype != np.uint8:
    array = np.clip(np.nan_to_num(array.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape "
                     f"{array.shape}.")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def thumbnail(image: Any, size: int, box: Sequence[float] | None = None) -> Image.Image:
  """``image`` fitted into a ``size x size`` white square (aspect kept), with ``box``
  ``(x0, y0, x1, y1)`` (pixels of the original; NaN: none) outlined in yellow."""
  pil = to_pil(image)
  width, height = pil.size
  scale = size / max(width, height, 1)
  new = (max(1, round(width * scale)), max(1, round(height * scale)))
  small = pil.resize(new, Image.BILINEAR)
  if box is not None and np.all(np.isfinite(np.asarray(box, np.float64))):
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    ImageDraw.Draw(small).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX,
                                    width=2)
  cell = Image.new("RGB", (size, size), BACKGROUND)
  cell.paste(small, ((size - new[0]) // 2, (size - new[1]) // 2))
  return cell


def _frame_color(correct: Sequence[Sequence[bool | None]] | None, q: int, r: int
                 ) -> tuple[int, int, int]:
  if correct is None:
    return NEUTRAL
  value = correct[q][r]
  return NEUTRAL if value is None else (CORRECT if value else WRONG)


def result_grid(queries: Sequence[Any], results: Sequence[Sequence[Any]], *,
                correct: Sequence[Sequence[bool | None]] | None = None,
                query_boxes: Sequence[Sequence[float]] | None = None,
                captions: Sequence[Sequence[str]] | None = None,
                query_captions: Sequence[str] | None = None,
                thumb_size: int = 128) -> Image.Image:
  """One row per query: the query, then its results, as framed thumbnails.

  Args:
    queries: ``Q`` images (paths, Pillow images or arrays).
    results: ``Q`` sequences of result images, best first (rows may differ in length).
    correct: optional, per result: True (green frame), False (red) or None (grey: junk or
      unknown); all grey when omitted.
    query_boxes: optional ``Q`` boxes ``(x0, y0, x1, y1)`` of the query images (NaN: none),
      outlined in yellow.
    captions: optional text under each result (e.g. ``"1  0.83"``).
    query_captions: optional text under each query.
    thumb_size: side of a thumbnail in pixels.

  Returns:
    The RGB grid.
  """
  if len(results) != len(queries):
    raise ValueError(f"results has {len(results)} rows for {len(queries)} queries.")
  if not queries:
    raise ValueError("result_grid needs at least one query.")
  for name, rows in (("correct", correct), ("captions", captions)):
    if rows is not None and [len(r) for r in rows] != [len(r) for r in results]:
      raise ValueError(f"{name} must have one entry per result, row by row.")
  if thumb_size < 8:
    raise ValueError(f"thumb_size must be >= 8; got {thumb_size}.")
  frame, pad, gap = max(2, thumb_size // 32), 6, 18
  font = ImageFont.load_default()
  text_h = 14 if captions is not None or query_captions is not None else 0
  cell_w, cell_h = thumb_size + 2 * frame, thumb_size + 2 * frame + text_h
  columns = max(len(r) for r in results)
  width = pad + cell_w + gap + columns * (cell_w + pad)
  height = pad + len(queries) * (cell_h + pad)
  grid = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(grid)

  def place(image: Any, x: int, y: int, color: tuple[int, int, int], text: str | None,
            box: Sequence[float] | None = None) -> None:
    draw.rectangle([x, y, x + cell_w - 1, y + thumb_size + 2 * frame - 1], fill=color)
    grid.paste(thumbnail(image, thumb_size, box), (x + frame, y + frame))
    if text:
      draw.text((x + frame, y + thumb_size + 2 * frame + 1), text, fill=(0, 0, 0), font=font)

  for q, (query, row) in enumerate(zip(queries, results)):
    y = pad + q * (cell_h + pad)
    box = None if query_boxes is None else query_boxes[q]
    place(query, pad, y, QUERY, None if query_captions is None else query_captions[q], box)
    for r, image in enumerate(row):
      x = pad + cell_w + gap + r * (cell_w + pad)
      place(image, x, y, _frame_color(correct, q, r),
            None if captions is None else captions[q][r])
  return grid


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
  """Writes ``image`` as PNG, atomically (temporary file, then ``os.replace``)."""
  write_atomic(path, lambda f: image.save(f, format="PNG"))
