"""The camera: viewpoint homographies, bilinear warping, and what a photo does to pixels.

A planar object seen from a viewpoint is a homography of its texture. :func:`view_homography`
builds it from a pinhole camera looking at the plane (yaw, pitch, roll), :func:`fit_homography`
places the result in the frame at a given size and position, and :func:`warp` samples the source
over the output grid at once (inverse mapping, bilinear, from a mip level matched to the
downscaling so small objects do not alias). The photometric functions (illumination, blur,
noise, JPEG-like blocking) are vectorised over the whole image.

Images are float32 in [0, 1], ``[H, W, 3]``; masks ``[H, W]``. Homographies are float64
``[3, 3]`` mapping column vectors ``(x, y, 1)`` of pixel coordinates, where pixel ``(i, j)`` has
its centre at ``(x, y) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import numpy as np


def view_homography(width: float, height: float, yaw: float, pitch: float, roll: float,
                    focal: float = 1.5) -> np.ndarray:
  """The homography from a ``width x height`` plane to a normalised image, seen by a pinhole
  camera rotated by ``yaw``/``pitch`` (out of plane) and ``roll`` (in plane), in radians.

  The plane is centred at the origin, scaled so its long side is 1, and placed at distance 2.2
  along the optical axis; ``focal`` is in units of that distance (a moderate field of view, so
  oblique views show real perspective foreshortening).

  Returns:
    float64 ``[3, 3]`` from plane pixel coordinates to normalised image coordinates.
  """
  s = 1.0 / max(width, height)
  center = np.array([[s, 0, -0.5 * width * s], [0, s, -0.5 * height * s], [0, 0, 1.0]])
  cy, sy = np.cos(yaw), np.sin(yaw)
  cp, sp = np.cos(pitch), np.sin(pitch)
  cr, sr = np.cos(roll), np.sin(roll)
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
  rot = rz @ rx @ ry
  # Plane point (u, v, 0) -> camera rot @ (u, v, 0) + (0, 0, 2.2): columns r1, r2 and t.
  extrinsic = np.stack([rot[:, 0], rot[:, 1], np.array([0.0, 0.0, 2.2])], axis=1)
  intrinsic = np.diag([focal * 2.2, focal * 2.2, 1.0])
  return intrinsic @ extrinsic @ center


def viewing_angle(yaw: float | np.ndarray, pitch: float | np.ndarray) -> np.ndarray:
  """Degrees between the plane's normal and the optical axis for a ``yaw``/``pitch`` view."""
  return np.degrees(np.arccos(np.clip(np.cos(yaw) * np.cos(pitch), -1.0, 1.0)))


def view_direction(yaw: float, pitch: float) -> np.ndarray:
  """Unit vector of the optical axis in the plane's frame; the angle between two views' vectors
  is their viewpoint change (roll, an in-plane rotation, does not count)."""
  cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
  # The optical axis in plane coordinates is the third row of the rotation; roll (rz) leaves it
  # unchanged, so it is the third row of rx @ ry.
  return np.array([-cp * sy, sp, cp * cy])


def apply_homography(h: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Maps ``[N, 2]`` points ``(x, y)`` through ``h``; returns ``[N, 2]``."""
  p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ h.T
  return p[:, :2] / p[:, 2:3]


def fit_homography(h: np.ndarray, width: float, height: float, long_side: float,
                   center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Composes ``h`` with the similarity that makes the projected plane's bounding box
  ``long_side`` pixels on its long side, centred at ``center = (x, y)`` pixels.

  Returns:
    ``(homography [3, 3], projected corners [4, 2])`` in output pixel coordinates.
  """
  corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
  p = apply_homography(h, corners)
  lo, hi = p.min(axis=0), p.max(axis=0)
  s = long_side / max(hi[0] - lo[0], hi[1] - lo[1])
  mid = (lo + hi) / 2
  sim = np.array([[s, 0, center[0] - s * mid[0]], [0, s, center[1] - s * mid[1]], [0, 0, 1.0]])
  out = sim @ h
  return out, apply_homography(out, corners)


def polygon_area(points: np.ndarray) -> float:
  """Area of a simple polygon ``[N, 2]`` (shoelace formula)."""
  x, y = points[:, 0], points[:, 1]
  return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _halve(image: np.ndarray) -> np.ndarray:
  """2x2 box downsampling (odd edges dropped): one mip level."""
  h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
  x = image[:h, :w]
  return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def mip_levels(image: np.ndarray, levels: int = 4) -> list[np.ndarray]:
  """``[image, image / 2, image / 4, ...]`` (box-filtered), down to 8 px on the short side."""
  out = [image]
  while len(out) < levels and min(out[-1].shape[:2]) >= 16:
    out.append(_halve(out[-1]))
  return out


def warp(mips: list[np.ndarray], h: np.ndarray, out_height: int, out_width: int,
         box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple]:
  """Samples a source through homography ``h`` (source pixels -> output pixels).

  Every output pixel of ``box`` is mapped back through ``h^-1`` at once and read bilinearly from
  the mip level whose resolution matches the local scale (the area ratio at the box centre), so
  a strongly shrunk object is filtered instead of aliased. Samples outside the source are 0
  (a source with an alpha channel thus becomes transparent there).

  Args:
    mips: :func:`mip_levels` of the source ``[h, w, C]``.
    h: float64 ``[3, 3]`` from level-0 source pixel coordinates to output pixel coordinates.
    out_height, out_width: the output frame.
    box: ``(y0, y1, x0, x1)`` part of the frame to compute; the whole frame when None.

  Returns:
    ``(patch [y1 - y0, x1 - x0, C] float32, (y0, y1, x0, x1))``.
  """
  y0, y1, x0, x1 = box if box is not None else (0, out_height, 0, out_width)
  inv = np.linalg.inv(h)
  # Local scale at the box centre: sqrt of the Jacobian determinant of the inverse map.
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  probe = apply_homography(inv, np.array([[cx, cy], [cx + 1, cy], [cx, cy + 1]]))
  (ax, ay), (bx, by) = probe[1] - probe[0], probe[2] - probe[0]
  jac = abs(ax * by - ay * bx)
  level = int(np.clip(np.floor(np.log2(max(np.sqrt(jac), 1e-6))), 0, len(mips) - 1))
  src = mips[level]
  factor = 2.0 ** level
  ys = np.arange(y0, y1, dtype=np.float32) + np.float32(0.5)
  xs = np.arange(x0, x1, dtype=np.float32) + np.float32(0.5)
  inv = inv.astype(np.float32)
  # Projective map of the grid, written out so no [H*W, 3] matrix is built.
  den = inv[2, 0] * xs[None, :] + inv[2, 1] * ys[:, None] + inv[2, 2]
  u = (inv[0, 0] * xs[None, :] + inv[0, 1] * ys[:, None] + inv[0, 2]) / den
  v = (inv[1, 0] * xs[None, :] + inv[1, 1] * ys[:, None] + inv[1, 2]) / den
  # Level-l pixel centres sit at (i + 0.5) * 2^l in level-0 coordinates.
  u = u * np.float32(1 / factor) - np.float32(0.5)
  v = v * np.float32(1 / factor) - np.float32(0.5)
  sh, sw = src.shape[:2]
  inside = (u > -1) & (u < sw) & (v > -1) & (v < sh)
  iu, iv = np.floor(u), np.floor(v)
  fu, fv = (u - iu)[..., None], (v - iv)[..., None]
  iu, iv = iu.astype(np.int64), iv.astype(np.int64)
  # Taps outside the source read 0, so edges fade over one pixel (antialiased silhouettes).
  padded = np.pad(src, ((1, 1), (1, 1), (0, 0)))
  a = np.clip(iu + 1, 0, sw + 1)
  b = np.clip(iu + 2, 0, sw + 1)
  c = np.clip(iv + 1, 0, sh + 1)
  d = np.clip(iv + 2, 0, sh + 1)
  out = ((padded[c, a] * (1 - fu) + padded[c, b] * fu) * (1 - fv)
         + (padded[d, a] * (1 - fu) + padded[d, b] * fu) * fv)
  out *= inside[..., None]
  return out.astype(np.float32), (y0, y1, x0, x1)


def paste(canvas: np.ndarray, rgba: np.ndarray, box: tuple[int, int, int, int]) -> None:
  """Composites a warped ``[h, w, 4]`` RGBA patch with premultiplied colour over the ``box =
  (y0, y1, x0, x1)`` part of ``canvas``, in place ("over" operator)."""
  y0, y1, x0, x1 = box
  region = canvas[y0:y1, x0:x1]
  region *= 1 - rgba[..., 3:4]
  region += rgba[..., :3]


def bounding_box(corners: np.ndarray, height: int, width: int, pad: int = 2
                 ) -> tuple[int, int, int, int] | None:
  """Integer ``(y0, y1, x0, x1)`` of the projected corners clipped to the frame; None when the
  object lies entirely outside."""
  lo = np.floor(corners.min(axis=0)).astype(int) - pad
  hi = np.ceil(corners.max(axis=0)).astype(int) + pad
  x0, y0 = max(lo[0], 0), max(lo[1], 0)
  x1, y1 = min(hi[0], width), min(hi[1], height)
  if x1 <= x0 or y1 <= y0:
    return None
  return int(y0), int(y1), int(x0), int(x1)


# --------------------------------------------------------------------------- photometric


def illumination(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Global exposure (up to ``2**(+-1.2 strength)``), gamma, a per-channel colour cast and a
  linear shading gradient across the frame. ``strength`` in [0, 1] scales all four."""
  h, w = image.shape[:2]
  exposure = 2.0 ** (rng.uniform(-1.0, 1.0) * 1.2 * strength)
  gamma = 2.0 ** (rng.uniform(-1.0, 1.0) * 0.5 * strength)
  cast = 1.0 + rng.uniform(-1.0, 1.0, 3).astype(np.float32) * 0.15 * strength
  angle = rng.uniform(0, 2 * np.pi)
  yy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
  xx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
  shading = 1.0 + strength * 0.8 * (np.cos(angle) * xx + np.sin(angle) * yy)
  out = np.clip(image, 0, 1) ** gamma * (exposure * cast) * shading[..., None]
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur (kernel radius ``ceil(2.5 sigma)``, edges replicated)."""
  if sigma < 0.3:
    return image
  radius = int(np.ceil(2.5 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
  taps /= taps.sum()
  h, w = image.shape[:2]
  padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
  rows = sum(t * padded[k:k + h] for k, t in enumerate(taps))
  padded = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="edge")
  return sum(t * padded[:, k:k + w] for k, t in enumerate(taps)).astype(np.float32)


def motion_blur(image: np.ndarray, length: int, horizontal: bool) -> np.ndarray:
  """Box blur of ``length`` pixels along one axis (camera shake)."""
  if length < 2:
    return image
  axis = 1 if horizontal else 0
  n = image.shape[axis]
  pad = [(0, 0)] * 3
  pad[axis] = (length // 2, length - 1 - length // 2)
  padded = np.pad(image, pad, mode="edge")
  out = np.zeros_like(image)
  for k in range(length):
    out += np.take(padded, np.arange(k, k + n), axis=axis)
  return out / length


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
  """Sensor noise: Gaussian, stronger in the dark (``sigma * (1.5 - value)``), plus a little
  chroma noise."""
  # One draw per channel, correlated through a shared part: luminance noise with some chroma.
  noise = rng.standard_normal(image.shape, dtype=np.float32)
  noise = 0.8 * noise.mean(axis=-1, keepdims=True) + 0.3 * noise
  out = image + sigma * (1.5 - image) * noise
  return np.clip(out, 0.0, 1.0).astype(np.float32)


# The JPEG luminance quantisation table (ITU-T T.81 Annex K), and the DCT-II basis.
_JPEG_Q = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
_k = np.arange(8)
_DCT = (np.sqrt(np.where(_k == 0, 1.0, 2.0) / 8.0)[:, None]
        * np.cos((2 * _k[None, :] + 1) * _k[:, None] * np.pi / 16)).astype(np.float32)


def jpeg_like(image: np.ndarray, quality: int) -> np.ndarray:
  """JPEG-like artefacts: 8x8 block DCT of Y, Cb, Cr, quantised with the standard luminance table
  scaled for ``quality`` (1-100, libjpeg's rule; chroma quantised twice as coarsely), then
  inverted. Blocking and ringing as a real encoder makes, without an encoder."""
  h, w = image.shape[:2]
  ph, pw = -h % 8, -w % 8
  x = np.pad(image * 255.0, ((0, ph), (0, pw), (0, 0)), mode="edge")
  to_ycc = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]],
                    np.float32)
  ycc = x @ to_ycc.T
  ycc[..., 0] -= 128.0
  scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
  q = np.clip(np.floor((_JPEG_Q * scale + 50.0) / 100.0), 1, 255)
  qs = np.stack([q, 2 * q, 2 * q], axis=-1)  # [8, 8, 3]
  hb, wb = x.shape[0] // 8, x.shape[1] // 8
  # [hb, 8, wb, 8, 3] -> [hb, wb, 3, 8, 8]: batched 8x8 matrix products (D X D^T), far faster
  # than one einsum over all axes.
  blocks = ycc.reshape(hb, 8, wb, 8, 3).transpose(0, 2, 4, 1, 3)
  coef = _DCT @ blocks @ _DCT.T
  q3 = qs.transpose(2, 0, 1)  # [3, 8, 8]
  coef = np.round(coef / q3) * q3
  blocks = _DCT.T @ coef @ _DCT
  ycc = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 2)).reshape(hb * 8, wb * 8, 3)
  ycc[..., 0] += 128.0
  rgb = ycc @ np.linalg.inv(to_ycc).T.astype(np.float32)
  return np.clip(rgb[:h, :w] / 255.0, 0.0, 1.0).astype(np.float32)
