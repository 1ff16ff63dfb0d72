"""Procedural textures, patterns and crops of real photos: the raw material of the scenes.

Everything works on float32 images in [0, 1] (``[H, W]`` masks/fields or ``[H, W, 3]`` RGB) and
is vectorised over the whole pixel grid: a texture is a handful of array expressions, never a
Python loop over pixels. Every function draws its randomness from the ``np.random.Generator`` it
is given, so a texture is a pure function of the generator's state.

Real photos come from the sample images bundled inside scikit-image (``skimage/data/*.png``,
read from the installed package with Pillow, never downloaded). When scikit-image is not
installed the photo bank is empty and photos are replaced by procedural textures, so the
generated images then differ (still deterministic for a given environment).
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

# Bundled scikit-image sample photos used as real-looking material (file names inside
# skimage/data). Only files shipped with the wheel: the fetcher is never called, so nothing is
# downloaded.
_PHOTO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png", "grass.png",
                "gravel.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png",
                "motorcycle_right.png", "color.png", "clock_motion.png", "cell.png")
# Photos are stored at most this long side: crops are small, and smaller sources resample faster.
_PHOTO_MAX_SIDE = 384


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes ``[h, w]`` or ``[h, w, C]`` float32 to ``[height, width(, C)]``, corner-aligned.

  Corner alignment (the first and last samples land on the first and last pixels) is what an
  upsampled noise lattice needs: its extreme nodes stay on the image borders.
  """
  h, w = image.shape[:2]
  ys = np.linspace(0.0, h - 1.0, height, dtype=np.float32)
  xs = np.linspace(0.0, w - 1.0, width, dtype=np.float32)
  y0 = np.minimum(ys.astype(np.int64), h - 1)
  x0 = np.minimum(xs.astype(np.int64), w - 1)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = ys - y0, xs - x0
  fy = fy.reshape((height,) + (1,) * (image.ndim - 1))
  fx = fx.reshape((width,) + (1,) * (image.ndim - 2))
  # Separable: rows first (on the narrow source), then columns.
  rows = image[y0] * (1 - fy) + image[y1] * fy
  return (rows[:, x0] * (1 - fx) + rows[:, x1] * fx).astype(np.float32)


def value_noise(rng: np.random.Generator, height: int, width: int, cells: int = 4,
                octaves: int = 3, channels: int = 1) -> np.ndarray:
  """Fractal value noise: random lattices of ``cells * 2**k`` nodes, upsampled and summed with
  halving amplitudes, then stretched to [0, 1].

  Returns:
    float32 ``[height, width, channels]``.
  """
  out = np.zeros((height, width, channels), np.float32)
  amplitude, total = 1.0, 0.0
  aspect = width / max(height, 1)
  for k in range(octaves):
    ny = max(2, int(round(cells * 2 ** k)) + 1)
    nx = max(2, int(round(cells * 2 ** k * aspect)) + 1)
    lattice = rng.random((ny, nx, channels), dtype=np.float32)
    out += amplitude * resize_bilinear(lattice, height, width)
    total += amplitude
    amplitude *= 0.5
  out /= total
  lo, hi = out.min(), out.max()
  return (out - lo) / max(hi - lo, 1e-6)


def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates normalised to [0, 1): ``(yy [H, 1], xx [1, W])`` for broadcasting."""
  yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
  xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
  return yy, xx


def random_color(rng: np.random.Generator, saturation: tuple[float, float] = (0.2, 0.9),
                 value: tuple[float, float] = (0.25, 0.95)) -> np.ndarray:
  """An RGB float32 ``[3]`` colour from a uniform hue and the given saturation/value ranges."""
  h = rng.random()
  s = rng.uniform(*saturation)
  v = rng.uniform(*value)
  # HSV -> RGB, vectorised over the three channels (the usual sector formula).
  k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
  rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return rgb.astype(np.float32)


def pattern(rng: np.random.Generator, height: int, width: int, kind: str | None = None
            ) -> np.ndarray:
  """A periodic or structured pattern in [0, 1], float32 ``[height, width]``.

  Kinds: ``stripes`` (oriented sine bars), ``checker``, ``bricks`` (offset rows with mortar),
  ``dots`` (a lattice of discs), ``rings`` (concentric), ``waves`` (noise-warped stripes),
  ``noise`` (value noise). ``None`` picks one at random.
  """
  kinds = ("stripes", "checker", "bricks", "dots", "rings", "waves", "noise")
  if kind is None:
    kind = kinds[int(rng.integers(len(kinds)))]
  yy, xx = grid(height, width)
  aspect = width / max(height, 1)
  xx = xx * aspect  # isotropic units: one unit = the image height
  freq = rng.uniform(3.0, 14.0)
  if kind == "stripes":
    angle = rng.uniform(0.0, np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    return (0.5 + 0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  if kind == "checker":
    angle = rng.uniform(0.0, np.pi / 2)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
  if kind == "bricks":
    rows = freq
    row = np.floor(yy * rows)
    u = xx * rows / rng.uniform(1.5, 3.0) + 0.5 * (row % 2)
    mortar = rng.uniform(0.06, 0.15)
    fv, fu = (yy * rows) % 1.0, u % 1.0
    inside = (fv > mortar) & (fu > mortar * 0.6)
    return np.where(inside, 1.0, 0.15).astype(np.float32)
  if kind == "dots":
    radius = rng.uniform(0.15, 0.45)
    fu, fv = (xx * freq) % 1.0 - 0.5, (yy * freq) % 1.0 - 0.5
    return (fu ** 2 + fv ** 2 < radius ** 2).astype(np.float32)
  if kind == "rings":
    cy, cx = rng.uniform(0, 1), rng.uniform(0, aspect)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return (0.5 + 0.5 * np.sin(2 * np.pi * freq * r)).astype(np.float32)
  if kind == "waves":
    warp = value_noise(rng, height, width, cells=3, octaves=2)[..., 0]
    angle = rng.uniform(0.0, np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy + 0.3 * warp
    return (0.5 + 0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  if kind == "noise":
    return value_noise(rng, height, width, cells=int(rng.integers(2, 8)), octaves=4)[..., 0]
  raise ValueError(f"kind must be one of {kinds} or None; got {kind!r}.")


@functools.lru_cache(maxsize=1)
def photo_bank() -> tuple[np.ndarray, ...]:
  """The bundled scikit-image sample photos as float32 ``[h, w, 3]`` RGB in [0, 1] (long side at
  most 384 px), in a fixed order; empty when scikit-image is not installed."""
  try:
    import skimage.data  # noqa: PLC0415 (optional dependency)
  except ImportError:
    return ()
  folder = os.path.dirname(skimage.data.__file__)
  photos = []
  for name in _PHOTO_FILES:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):  # a trimmed install: use what is there, in the same order
      continue
    with Image.open(path) as image:
      image = image.convert("RGB")
      scale = _PHOTO_MAX_SIDE / max(image.size)
      if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.BILINEAR)
      photo = np.asarray(image, dtype=np.float32) / 255.0
    photo.setflags(write=False)
    photos.append(photo)
  return tuple(photos)


def photo_crop(rng: np.random.Generator, height: int, width: int,
               bank: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
  """A random crop of a bank photo (random size, position and mirror), resized to
  ``[height, width, 3]``; a coloured procedural texture when the bank is empty."""
  bank = photo_bank() if bank is None else bank
  if not bank:
    return colored_texture(rng, height, width, allow_photo=False)
  photo = bank[int(rng.integers(len(bank)))]
  ph, pw = photo.shape[:2]
  frac = rng.uniform(0.25, 0.8)
  target = width / max(height, 1)
  ch = max(8, int(min(ph, pw / target) * frac))
  cw = max(8, min(pw, int(ch * target)))
  y = int(rng.integers(0, ph - ch + 1))
  x = int(rng.integers(0, pw - cw + 1))
  crop = photo[y:y + ch, x:x + cw]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return resize_bilinear(np.ascontiguousarray(crop), height, width)


def colored_texture(rng: np.random.Generator, height: int, width: int,
                    allow_photo: bool = True) -> np.ndarray:
  """A colour texture ``[height, width, 3]``: a pattern mixing two random colours, modulated by
  value noise, or (when ``allow_photo`` and the bank is not empty, 30%) a tinted photo crop."""
  if allow_photo and photo_bank() and rng.random() < 0.3:
    tint = 0.6 + 0.4 * random_color(rng, (0.0, 0.5), (0.7, 1.0))
    return photo_crop(rng, height, width) * tint
  a, b = random_color(rng), random_color(rng)
  mix = pattern(rng, height, width)[..., None]
  shade = 0.75 + 0.25 * value_noise(rng, height, width, cells=3, octaves=3)
  return np.clip((a * mix + b * (1 - mix)) * shade, 0.0, 1.0).astype(np.float32)
