"""Landmarks: planar "facades" built from one shared vocabulary of parts, each laid out,
coloured and textured its own way.

Every landmark is a wall with a silhouette (flat, gable, arch, stepped or dome top), a grid of
windows (rectangular, arched or round), floor bands, pillars, a door, an emblem and a sign
panel. The vocabulary is common to all, so landmarks look alike at the category level ("a
building") and generic features respond to all of them similarly; the layout (rows, columns,
proportions, positions), colours and textures differ per instance, which is what instance-level
retrieval has to pick up. A landmark is a pure function of its generator: the same seed renders
the same pixels.
"""

from __future__ import annotations

import numpy as np

from retrieval_jax.data.synthetic import textures

_ROOFS = ("flat", "gable", "arch", "stepped", "dome")
_WINDOWS = ("rect", "arched", "round")


def _over(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray | float) -> None:
  """Paints ``color`` (``[3]`` or ``[H, W, 3]``) where ``mask`` (``[H, W]`` in [0, 1]) is set."""
  m = mask[..., None]
  canvas *= 1 - m
  canvas += m * color


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, top: float) -> np.ndarray:
  """Window/door shape inside its cell; ``u``, ``v`` in [-1, 1] across the cell."""
  if kind == "rect":
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)
  if kind == "arched":  # a rectangle with a half-disc on top
    body = (np.abs(u) <= 1) & (v >= top) & (v <= 1)
    cap = (u ** 2 + ((v - top) / (1 + top)) ** 2 <= 1) & (v < top)
    return body | cap
  return u ** 2 + v ** 2 <= 1  # round


def render_landmark(rng: np.random.Generator, long_side: int) -> np.ndarray:
  """Renders one landmark's canonical, frontal view.

  Args:
    rng: the landmark's own generator (its identity).
    long_side: pixels on the long side of the canonical image.

  Returns:
    float32 ``[h, w, 4]`` RGBA in [0, 1]; alpha is the silhouette (1 on the building, 0 around
    its roof line).
  """
  aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))  # width / height
  if aspect >= 1:
    w, h = long_side, max(16, int(round(long_side / aspect)))
  else:
    h, w = long_side, max(16, int(round(long_side * aspect)))
  yy, xx = textures.grid(h, w)

  # Silhouette: a body below `top` and a roof shape above it.
  roof = _ROOFS[int(rng.integers(len(_ROOFS)))]
  top = 0.0 if roof == "flat" else rng.uniform(0.15, 0.4)
  dx = np.abs(xx - 0.5) * 2  # 0 at the centre line, 1 at the sides
  if roof == "flat":
    alpha = np.ones((h, w), bool)
  elif roof == "gable":
    alpha = yy >= top * dx
  elif roof == "arch":
    alpha = (yy >= top) | (dx ** 2 + ((yy - top) / top) ** 2 <= 1)
  elif roof == "stepped":
    steps = int(rng.integers(2, 5))
    alpha = yy >= top * np.floor(dx * steps + 0.999) / steps
  else:  # dome: a narrower drum with a half-disc on it
    radius = rng.uniform(0.25, 0.45)
    alpha = (yy >= top) | ((dx / (2 * radius)) ** 2 + ((yy - top) / top) ** 2 <= 1)
  alpha = np.broadcast_to(alpha, (h, w)).astype(np.float32)

  # Wall: a low-saturation base colour modulated by a material texture.
  wall = textures.random_color(rng, (0.05, 0.7), (0.4, 0.95))
  if textures.photo_bank() and rng.random() < 0.3:
    material = textures.photo_crop(rng, h, w).mean(axis=-1, keepdims=True)
    material = 0.7 + 0.6 * (material - material.mean())
  else:
    material = 0.8 + 0.25 * textures.pattern(rng, h, w)[..., None] * rng.uniform(0.2, 1.0)
  material = material * (0.85 + 0.3 * textures.value_noise(rng, h, w, cells=3, octaves=3))
  canvas = np.clip(wall * material, 0, 1).astype(np.float32)

  # The roof zone gets its own colour and pattern (tiles, slates, copper).
  if roof != "flat":
    roof_color = textures.random_color(rng, (0.2, 0.8), (0.2, 0.7))
    tiles = 0.75 + 0.35 * textures.pattern(rng, h, w)[..., None]
    _over(canvas, (yy < top + 0.02).astype(np.float32) * alpha, roof_color * tiles)

  # Floor bands and pillars: the structural rhythm of the facade.
  floors = int(rng.integers(1, 6))
  body_top = top + 0.03
  if rng.random() < 0.7:
    band_color = textures.random_color(rng, (0.1, 0.7), (0.2, 0.9))
    band = rng.uniform(0.01, 0.03)
    edges = body_top + (1 - body_top) * np.arange(1, floors + 1) / (floors + 1)
    bands = (np.abs(yy - edges[None, :]) < band).any(axis=1, keepdims=True) & (yy > top)
    _over(canvas, np.broadcast_to(bands, (h, w)).astype(np.float32), band_color)
  cols = int(rng.integers(1, 7))
  if rng.random() < 0.5:
    pillar_color = textures.random_color(rng, (0.0, 0.4), (0.5, 1.0))
    width = rng.uniform(0.015, 0.04)
    centers = np.arange(cols + 1) / cols
    pillars = (np.abs(xx[..., None] - centers) < width).any(axis=-1) & (yy > body_top)
    _over(canvas, np.broadcast_to(pillars, (h, w)).astype(np.float32), pillar_color)

  # Windows: a rows x cols lattice of one shape, with glass and frame colours; some are lit.
  x0, x1 = rng.uniform(0.04, 0.2), rng.uniform(0.8, 0.96)
  y0, y1 = body_top + rng.uniform(0.02, 0.08), rng.uniform(0.62, 0.8)
  rows = int(rng.integers(1, 6))
  shape = _WINDOWS[int(rng.integers(len(_WINDOWS)))]
  fill = rng.uniform(0.45, 0.8)  # window size within its cell
  cu, cv = (xx - x0) / (x1 - x0) * cols, (yy - y0) / (y1 - y0) * rows
  in_grid = (cu >= 0) & (cu < cols) & (cv >= 0) & (cv < rows)
  u = ((cu % 1.0) - 0.5) * 2 / fill
  v = ((cv % 1.0) - 0.5) * 2 / fill
  windows = _shape_mask(shape, u, v, -0.3) & in_grid
  frames = _shape_mask(shape, u / 1.15, v / 1.15, -0.3) & in_grid & ~windows
  glass = textures.random_color(rng, (0.1, 0.7), (0.05, 0.45))
  lit = textures.random_color(rng, (0.2, 0.8), (0.7, 1.0))
  cell_lit = rng.random((rows, cols)) < rng.uniform(0.0, 0.4)
  ri = np.clip(cv.astype(int), 0, rows - 1)
  ci = np.clip(cu.astype(int), 0, cols - 1)
  lit_px = cell_lit[ri, ci]
  glass_px = np.where(lit_px[..., None], lit, glass) * (0.8 + 0.4 * (1 - (v + 1) / 2))[..., None]
  _over(canvas, frames.astype(np.float32), textures.random_color(rng, (0.0, 0.5), (0.6, 1.0)))
  _over(canvas, windows.astype(np.float32), np.clip(glass_px, 0, 1))

  # A door at the bottom and an emblem (disc, diamond or star) with its own pattern.
  dw, dh = rng.uniform(0.08, 0.22), rng.uniform(0.12, 0.22)
  dc = rng.uniform(0.2, 0.8)
  door = _shape_mask("arched", (xx - dc) / (dw / 2), (yy - (1 - dh / 2)) / (dh / 2), -0.2)
  _over(canvas, door.astype(np.float32), textures.random_color(rng, (0.2, 0.9), (0.1, 0.6)))
  ex, ey = rng.uniform(0.2, 0.8), rng.uniform(max(0.1, top * 0.6), 0.5)
  er = rng.uniform(0.06, 0.18)
  ax, ay = (xx - ex) * aspect / er, (yy - ey) / er
  kind = int(rng.integers(3))
  if kind == 0:
    emblem = ax ** 2 + ay ** 2 <= 1
  elif kind == 1:
    emblem = np.abs(ax) + np.abs(ay) <= 1
  else:
    angle = np.arctan2(ay, ax)
    emblem = np.sqrt(ax ** 2 + ay ** 2) <= 0.55 + 0.45 * np.cos(5 * angle) ** 2
  e1, e2 = textures.random_color(rng, (0.5, 1.0)), textures.random_color(rng, (0.5, 1.0))
  inner = textures.pattern(rng, h, w)[..., None]
  _over(canvas, emblem.astype(np.float32), e1 * inner + e2 * (1 - inner))

  # Sign panels: rectangles of a bold two-colour pattern on the wall, the most instance-specific
  # details (shop fronts, murals).
  for _ in range(1 + int(rng.random() < 0.5)):
    sx, sy = rng.uniform(0.05, 0.6), rng.uniform(max(top, 0.2), 0.75)
    sw, sh = rng.uniform(0.15, 0.4), rng.uniform(0.06, 0.2)
    panel = (xx >= sx) & (xx <= sx + sw) & (yy >= sy) & (yy <= sy + sh)
    p1, p2 = textures.random_color(rng, (0.6, 1.0)), textures.random_color(rng, (0.0, 1.0))
    mix = textures.pattern(rng, h, w)[..., None]
    _over(canvas, panel.astype(np.float32), p1 * mix + p2 * (1 - mix))

  # Weathering: darker towards the bottom and in noisy patches.
  dirt = 1.0 - 0.25 * rng.random() * textures.value_noise(rng, h, w, cells=4, octaves=3)
  canvas *= dirt * (1.0 - 0.1 * yy[..., None])
  return np.concatenate([np.clip(canvas, 0, 1), alpha[..., None]], axis=-1).astype(np.float32)
