"""Reading photos as RGB uint8 arrays, whatever their mode, and resizing them.

Every decoded image becomes ``uint8 [H, W, 3]`` RGB: grayscale is replicated, palettes are
expanded, alpha is composited over white (a transparent background reads as paper, not as
black), 16-bit and 32-bit integer images are scaled from their full range to 8 bits, float
images from [0, 1], CMYK is converted by Pillow, and the EXIF orientation is applied so photos
from phones come out upright.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps


class ImageReadError(ValueError):
  """An image file that cannot be read; the message names the path and the reason."""


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """Converts a Pillow image of any mode to ``uint8 [H, W, 3]`` RGB (see the module docstring)."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
    values = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
    return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode == "I":
    values = np.asarray(image, dtype=np.int64)
    # 32-bit integer PNGs/TIFFs usually hold 16-bit data; scale by the range actually used.
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    values = np.clip(values, 0, top) * (255.0 / top)
    return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode == "F":
    values = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0
    return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
  return np.asarray(image.convert("RGB"))


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to ``uint8 [H, W, 3]`` RGB, upright.

  Raises:
    ImageReadError: missing, unreadable, truncated or non-image file, naming the path.
  """
  try:
    with Image.open(path) as image:
      image.load()  # decode now: a truncated file fails here, not later
      return to_rgb_uint8(ImageOps.exif_transpose(image))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    raise ImageReadError(f"cannot read image {os.fspath(path)}: {err}") from err


def load_images(paths: Sequence[str | os.PathLike], *, skip_unreadable: bool = False
                ) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
  """Loads many images, reporting every failure with its path.

  Args:
    paths: image files.
    skip_unreadable: when False (default) the first unreadable file raises; when True it is
      skipped and listed in the returned failures, never silently.

  Returns:
    ``(images, kept, failures)``: the decoded images, the indices into ``paths`` they came from,
    and ``(path, reason)`` for each skipped file.
  """
  images, kept, failures = [], [], []
  for i, path in enumerate(paths):
    try:
      images.append(load_image(path))
      kept.append(i)
    except ImageReadError as err:
      if not skip_unreadable:
        raise
      failures.append((os.fspath(path), str(err)))
  return images, kept, failures


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes ``uint8 [H, W, 3]`` to ``size = (height, width)`` with Pillow's bilinear filter
  (antialiased when shrinking, as cirtorch's ``imresize``); the same size is returned as is."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
