"""Scenes: one photo of a landmark (or of none) in a cluttered setting, and what it shows.

A photo is drawn in two independent random streams. The *geometry* stream fixes everything the
ground truth depends on: the frame's aspect ratio, the viewpoint (yaw, pitch, roll), the
object's size and position (possibly cut by the frame), the occluders in front of it and the
illumination strength. The *pixel* stream fixes the rest: background, clutter behind the
object, the occluders' appearance, colour cast, shadow, blur, noise and JPEG quality. Because
the streams are separate, :func:`render_scene` with ``render=False`` measures a photo's
visibility (and so the ground truth) without painting it, and gets exactly the numbers the
painted photo has.

Visibility (:class:`SceneStats`): ``visible_fraction`` is the object's visible pixel mass (its
warped alpha inside the frame and not under an occluder) over its whole projected pixel mass
(the same warp without the frame), so both frame truncation and occlusion count.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from retrieval_jax.data.synthetic import camera, textures
from retrieval_jax.data.synthetic.landmarks import render_landmark

# Frame aspect ratios (width / height) and how often each occurs: mostly landscape, as photos.
_ASPECTS = np.array([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3])
_ASPECT_P = np.array([0.3, 0.2, 0.1, 0.1, 0.2, 0.1])
# Probability that a photo of a landmark with a site shows the site behind it.
_SITE_P = 0.7


@dataclasses.dataclass(frozen=True)
class Regime:
  """How a kind of photo is taken (ranges the geometry stream samples from).

  Attributes:
    scale: range of the object's size, as the fraction of the frame its bounding box fills
      (1: it touches the frame on one side); drawn as ``lo + (hi - lo) * u**0.7``, skewed
      towards large objects.
    yaw_sd, pitch_sd, roll_sd: standard deviations of the viewpoint angles in degrees.
    max_yaw, max_pitch: clips of |yaw| and |pitch| in degrees.
    crop_p: probability that the object is allowed to extend beyond the frame.
    crop_max: how far, as a fraction of its bounding box.
    occluders: probabilities of 0, 1, 2, 3 occluders in front of the object.
    occluder_size: range of an occluder's radius relative to the object's long side.
    illumination: range of the illumination-change strength in [0, 1].
  """

  scale: tuple[float, float]
  yaw_sd: float
  pitch_sd: float
  roll_sd: float
  max_yaw: float
  max_pitch: float
  crop_p: float
  crop_max: float
  occluders: tuple[float, float, float, float]
  occluder_size: tuple[float, float]
  illumination: tuple[float, float]


REGIMES = {
    # Database, distractor and training photos: anything from a clean view to a barely visible
    # corner of the building.
    "view": Regime(scale=(0.3, 1.0), yaw_sd=25.0, pitch_sd=10.0, roll_sd=4.0, max_yaw=70.0,
                   max_pitch=40.0, crop_p=0.3, crop_max=0.6,
                   occluders=(0.5, 0.3, 0.15, 0.05), occluder_size=(0.15, 0.4),
                   illumination=(0.0, 0.9)),
    # The guaranteed positive of each test instance: large, frontal, whole, unoccluded.
    "clear": Regime(scale=(0.55, 0.9), yaw_sd=8.0, pitch_sd=4.0, roll_sd=2.0, max_yaw=15.0,
                    max_pitch=8.0, crop_p=0.0, crop_max=0.0, occluders=(1.0, 0.0, 0.0, 0.0),
                    occluder_size=(0.1, 0.2), illumination=(0.0, 0.3)),
    # Queries, as the Oxford ones: the landmark well in view, at most a small occluder.
    "query": Regime(scale=(0.5, 0.85), yaw_sd=10.0, pitch_sd=5.0, roll_sd=3.0, max_yaw=20.0,
                    max_pitch=10.0, crop_p=0.0, crop_max=0.0, occluders=(0.7, 0.3, 0.0, 0.0),
                    occluder_size=(0.08, 0.15), illumination=(0.0, 0.4)),
}


@dataclasses.dataclass(frozen=True)
class Landmark:
  """A rendered landmark ready for warping: RGBA mip levels, its canonical size, and optionally
  its site (the surroundings its photos share, as a real landmark's street and sky)."""

  mips: tuple[np.ndarray, ...]  # float32 [h / 2^l, w / 2^l, 4], colour premultiplied by alpha
  width: int
  height: int
  site: np.ndarray | None = None  # float32 [S, S, 3]

  @property
  def alpha_mips(self) -> list[np.ndarray]:
    return [m[..., 3:4] for m in self.mips]


def make_landmark(rng: np.random.Generator, long_side: int, site_size: int = 0) -> Landmark:
  """Renders a landmark (:func:`render_landmark`), its mip levels and, when ``site_size`` > 0,
  a ``site_size``-pixel square site (drawn after the landmark from the same stream)."""
  rgba = render_landmark(rng, long_side)
  # Premultiplied colour: bilinear taps across the silhouette's edge then blend correctly
  # (straight colour would bleed the wall's colour from outside the roof line).
  rgba[..., :3] *= rgba[..., 3:]
  mips = camera.mip_levels(rgba, levels=5)
  site = _background(rng, site_size, site_size) if site_size > 0 else None
  for array in (*mips, site):
    if array is not None:
      array.setflags(write=False)
  return Landmark(tuple(mips), rgba.shape[1], rgba.shape[0], site)


@dataclasses.dataclass(frozen=True)
class SceneStats:
  """What one photo shows of its landmark (all zero / NaN for a photo without one).

  Attributes:
    visible_fraction: visible part of the object's projected area (truncation and occlusion).
    visible_area: visible object pixels over the frame's pixels.
    object_scale: fraction of the frame the object's (whole, projected) bounding box fills:
      ``max(box_width / frame_width, box_height / frame_height)``.
    yaw, pitch, roll: viewpoint angles in radians.
    illumination: illumination-change strength in [0, 1].
    box: float32 ``[4]`` ``(x0, y0, x1, y1)`` pixel box of the visible object (NaN if none).
  """

  visible_fraction: float
  visible_area: float
  object_scale: float
  yaw: float
  pitch: float
  roll: float
  illumination: float
  box: np.ndarray


def _sample_geometry(rng: np.random.Generator, regime: Regime, image_size: int,
                     landmark: Landmark | None) -> dict:
  """Draws, in a fixed order, everything the ground truth depends on."""
  aspect = float(_ASPECTS[rng.choice(len(_ASPECTS), p=_ASPECT_P)])
  if aspect >= 1:
    width, height = image_size, max(16, int(round(image_size / aspect)))
  else:
    height, width = image_size, max(16, int(round(image_size * aspect)))
  r = regime
  yaw = np.radians(np.clip(rng.normal(0, r.yaw_sd), -r.max_yaw, r.max_yaw))
  pitch = np.radians(np.clip(rng.normal(0, r.pitch_sd), -r.max_pitch, r.max_pitch))
  roll = np.radians(rng.normal(0, r.roll_sd))
  # Skewed towards large objects (most photos of a landmark are of the landmark), with a tail of
  # small ones.
  scale = r.scale[0] + (r.scale[1] - r.scale[0]) * rng.random() ** 0.7
  crop = rng.uniform(0, r.crop_max) if rng.random() < r.crop_p else 0.0
  u_x, u_y = rng.random(), rng.random()
  n_occ = int(rng.choice(4, p=r.occluders))
  occ = [(int(rng.integers(4)), rng.random(), rng.random(), rng.uniform(*r.occluder_size),
          rng.uniform(0.5, 1.5), rng.uniform(0, np.pi), rng.normal(0, 0.15, 6))
         for _ in range(n_occ)]
  illum = rng.uniform(*r.illumination)
  geo = {"width": width, "height": height, "yaw": float(yaw), "pitch": float(pitch),
         "roll": float(roll), "illumination": float(illum), "scale": float(scale)}
  if landmark is None:
    return geo
  base = camera.view_homography(landmark.width, landmark.height, yaw, pitch, roll)
  _, unit = camera.fit_homography(base, landmark.width, landmark.height, 1.0, (0.0, 0.0))
  bw1, bh1 = np.ptp(unit, axis=0)
  long_side = scale / max(bw1 / width, bh1 / height)
  bw, bh = bw1 * long_side, bh1 * long_side

  def place(extent: float, frame: float, u: float) -> float:
    lo, hi = extent / 2 - crop * extent, frame - extent / 2 + crop * extent
    if hi < lo:  # larger than the frame on this side: centre it
      return frame / 2
    return lo + u * (hi - lo)

  center = (place(bw, width, u_x), place(bh, height, u_y))
  homography, corners = camera.fit_homography(base, landmark.width, landmark.height, long_side,
                                              center)
  occluders = []
  for kind, ox, oy, size, elong, angle, harmonics in occ:
    # Occluders stand in front of the object: their centres fall inside its bounding box.
    cx = corners[:, 0].min() + ox * bw
    cy = corners[:, 1].min() + oy * bh
    radius = size * max(bw, bh)
    occluders.append((kind, cx, cy, radius, elong, angle, harmonics))
  geo.update(homography=homography, corners=corners, occluders=occluders,
             object_scale=float(max(bw / width, bh / height)))
  return geo


def shape_mask(kind: int, height: int, width: int, cx: float, cy: float, radius: float,
               elong: float, angle: float, harmonics: np.ndarray) -> np.ndarray:
  """A filled shape over an ``height x width`` frame, float32 ``[H, W]`` in {0, 1}.

  Kinds: 0 ellipse, 1 rotated rectangle, 2 pole with a crown (a tree, a lamp post, a person), 3
  blob (a disc whose radius varies with three angular harmonics).
  """
  # Computed only over the shape's reach (blobs grow by up to ~1.5x, poles reach 3 radii down).
  reach = radius * max(1.0, elong) * 1.6 + 2
  y0, y1 = int(max(0, cy - reach)), int(min(height, cy + 3 * reach))
  x0, x1 = int(max(0, cx - reach)), int(min(width, cx + reach))
  out = np.zeros((height, width), np.float32)
  if y1 <= y0 or x1 <= x0:
    return out
  out[y0:y1, x0:x1] = _shape_window(kind, np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy,
                                    np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx,
                                    radius, elong, angle, harmonics)
  return out


def _shape_window(kind: int, yy: np.ndarray, xx: np.ndarray, radius: float, elong: float,
                  angle: float, harmonics: np.ndarray) -> np.ndarray:
  """:func:`shape_mask` on offsets ``yy [h, 1]``, ``xx [1, w]`` from the shape's centre."""
  c, s = np.cos(angle), np.sin(angle)
  if kind == 0:
    u, v = (c * xx + s * yy) / radius, (-s * xx + c * yy) / (radius * elong)
    return (u ** 2 + v ** 2 <= 1).astype(np.float32)
  if kind == 1:
    u, v = (c * xx + s * yy) / radius, (-s * xx + c * yy) / (radius * elong)
    return ((np.abs(u) <= 1) & (np.abs(v) <= 1)).astype(np.float32)
  if kind == 2:
    pole = (np.abs(xx) <= radius * 0.12) & (yy >= 0) & (yy <= 3 * radius)
    crown = xx ** 2 + (yy + radius * 0.4) ** 2 <= (radius * 0.6) ** 2
    return (pole | crown).astype(np.float32)
  theta = np.arctan2(yy, xx)
  rim = radius * np.clip(1 + harmonics[0] * np.cos(2 * theta + harmonics[1] * 10)
                  + harmonics[2] * np.cos(3 * theta + harmonics[3] * 10)
                  + harmonics[4] * np.cos(5 * theta + harmonics[5] * 10), 0.2, 1.5)
  return (xx ** 2 + yy ** 2 <= rim ** 2).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Photo crop, outdoor (sky gradient over textured ground) or procedural texture."""
  choice = rng.random()
  if choice < 0.4 and textures.photo_bank():
    return textures.photo_crop(rng, height, width)
  if choice < 0.75:
    horizon = rng.uniform(0.35, 0.85)
    sky_top = textures.random_color(rng, (0.1, 0.6), (0.5, 1.0))
    sky_low = textures.random_color(rng, (0.0, 0.3), (0.6, 1.0))
    yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None, None]
    sky = sky_top + (sky_low - sky_top) * np.clip(yy / horizon, 0, 1)
    clouds = textures.value_noise(rng, height, width, cells=3, octaves=3)
    sky = sky + 0.3 * (clouds - 0.5) * rng.uniform(0, 1)
    ground = textures.colored_texture(rng, height, width)
    return np.clip(np.where(yy < horizon, sky, ground), 0, 1).astype(np.float32)
  return textures.colored_texture(rng, height, width)


def _paste_landmark(canvas: np.ndarray, landmark: Landmark, homography: np.ndarray,
                    corners: np.ndarray) -> None:
  height, width = canvas.shape[:2]
  box = camera.bounding_box(corners, height, width)
  if box is not None:
    patch, box = camera.warp(list(landmark.mips), homography, height, width, box)
    camera.paste(canvas, patch, box)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, pool: tuple[Landmark, ...],
             max_clutter: int) -> None:
  """Unrelated landmarks and textured shapes behind the object, in place."""
  height, width = canvas.shape[:2]
  n_landmarks = int(rng.integers(0, max_clutter + 1)) if pool else 0
  for _ in range(n_landmarks):
    other = pool[int(rng.integers(len(pool)))]
    base = camera.view_homography(other.width, other.height, np.radians(rng.normal(0, 30)),
                                  np.radians(rng.normal(0, 10)), np.radians(rng.normal(0, 5)))
    long_side = rng.uniform(0.15, 0.45) * max(height, width)
    center = (rng.uniform(0, width), rng.uniform(0.2, 1.0) * height)
    h, corners = camera.fit_homography(base, other.width, other.height, long_side, center)
    _paste_landmark(canvas, other, h, corners)
  for _ in range(int(rng.integers(0, 4))):
    mask = shape_mask(int(rng.integers(4)), height, width, rng.uniform(0, width),
                      rng.uniform(0, height), rng.uniform(0.05, 0.25) * max(height, width),
                      rng.uniform(0.4, 2.0), rng.uniform(0, np.pi), rng.normal(0, 0.15, 6))
    _paint(rng, canvas, mask)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
  """Fills ``mask`` with a fresh colour texture (computed over the mask's bounding box only)."""
  rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
  color = textures.random_color(rng)  # drawn even when empty: a fixed number of draws
  if rows.size == 0:
    return
  y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  if rng.random() < 0.5:
    fill = textures.colored_texture(rng, y1 - y0, x1 - x0)
  else:
    shade = textures.value_noise(rng, y1 - y0, x1 - x0, cells=2, octaves=2)
    fill = color * (0.7 + 0.5 * shade)
  m = mask[y0:y1, x0:x1, None]
  region = canvas[y0:y1, x0:x1]
  region += m * (np.clip(fill, 0, 1) - region)


def _finish(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
  """Illumination, a cast shadow, blur, noise and JPEG-like artefacts, then uint8."""
  height, width = image.shape[:2]
  image = camera.illumination(image, rng, strength)
  if rng.random() < strength:  # a shadow edge across the frame, as from another building
    angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(-0.3, 0.3)
    yy = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    side = np.cos(angle) * xx + np.sin(angle) * yy > offset
    image = image * np.where(side, 1.0 - 0.6 * strength, 1.0)[..., None]
  blur = rng.random()
  if blur < 0.35:
    image = camera.gaussian_blur(image, rng.uniform(0.4, 1.6))
  elif blur < 0.45:
    image = camera.motion_blur(image, int(rng.integers(2, 6)), bool(rng.random() < 0.5))
  image = camera.add_noise(image, rng, rng.uniform(0.0, 0.04))
  image = camera.jpeg_like(image, int(rng.integers(25, 96)))
  return np.round(image * 255.0).astype(np.uint8)


def render_scene(geometry_rng: np.random.Generator, pixel_rng: np.random.Generator,
                 regime: Regime, image_size: int, landmark: Landmark | None,
                 clutter_pool: tuple[Landmark, ...], max_clutter: int, render: bool = True
                 ) -> tuple[np.ndarray | None, SceneStats]:
  """Takes one photo.

  Args:
    geometry_rng: the stream of everything the ground truth depends on (see module docstring).
    pixel_rng: the stream of appearance-only randomness.
    regime: how the photo is taken (:data:`REGIMES`).
    image_size: long side of the frame in pixels.
    landmark: the photographed object, or None for a scene of clutter only.
    clutter_pool: landmarks that may appear behind the object (never the photographed ones).
    max_clutter: at most this many clutter landmarks per photo.
    render: False to measure visibility only (the returned image is then None).

  Returns:
    ``(image uint8 [H, W, 3] or None, stats)``.
  """
  geo = _sample_geometry(geometry_rng, regime, image_size, landmark)
  height, width = geo["height"], geo["width"]
  nan_box = np.full(4, np.nan, np.float32)
  stats = SceneStats(0.0, 0.0, 0.0, geo["yaw"], geo["pitch"], geo["roll"], geo["illumination"],
                     nan_box)
  occluded = np.zeros((height, width), np.float32)
  if landmark is not None:
    for kind, cx, cy, radius, elong, angle, harmonics in geo["occluders"]:
      occluded = np.maximum(occluded, shape_mask(kind, height, width, cx, cy, radius, elong,
                                                 angle, harmonics))
    corners = geo["corners"]
    # The whole projected object, frame ignored: the denominator of visible_fraction.
    lo = np.floor(corners.min(axis=0)).astype(int) - 2
    hi = np.ceil(corners.max(axis=0)).astype(int) + 2
    full, _ = camera.warp(landmark.alpha_mips, geo["homography"], height, width,
                          (lo[1], hi[1], lo[0], hi[0]))
    total = float(full.sum())
    # The frame's part of it: rows/cols of the full warp that fall inside [0, H) x [0, W).
    fy0, fx0 = max(0, -lo[1]), max(0, -lo[0])
    fy1 = min(hi[1] - lo[1], height - lo[1])
    fx1 = min(hi[0] - lo[0], width - lo[0])
    alpha = np.zeros((height, width), np.float32)
    if fy1 > fy0 and fx1 > fx0:
      alpha[lo[1] + fy0:lo[1] + fy1, lo[0] + fx0:lo[0] + fx1] = full[fy0:fy1, fx0:fx1, 0]
    seen = alpha * (1 - occluded)
    visible = float(seen.sum())
    rows = np.nonzero((seen > 0.5).any(axis=1))[0]
    cols = np.nonzero((seen > 0.5).any(axis=0))[0]
    box = (np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
           if rows.size else nan_box)
    stats = dataclasses.replace(
        stats, visible_fraction=min(1.0, visible / max(total, 1e-6)),
        visible_area=visible / (height * width), object_scale=geo["object_scale"], box=box)
  if not render:
    return None, stats

  on_site = pixel_rng.random() < _SITE_P
  if landmark is not None and landmark.site is not None and on_site:
    # A window of the landmark's site: the same surroundings from a slightly different spot.
    size = landmark.site.shape[0]
    frac = pixel_rng.uniform(0.55, 0.85)
    ch = int(size * frac * min(1.0, height / width))
    cw = int(size * frac * min(1.0, width / height))
    y, x = int(pixel_rng.integers(0, size - ch + 1)), int(pixel_rng.integers(0, size - cw + 1))
    canvas = textures.resize_bilinear(landmark.site[y:y + ch, x:x + cw], height, width)
  else:
    canvas = _background(pixel_rng, height, width)
  _clutter(pixel_rng, canvas, clutter_pool, max_clutter)
  if landmark is not None:
    _paste_landmark(canvas, landmark, geo["homography"], geo["corners"])
    for kind, cx, cy, radius, elong, angle, harmonics in geo["occluders"]:
      _paint(pixel_rng, canvas, shape_mask(kind, height, width, cx, cy, radius, elong, angle,
                                           harmonics))
  return _finish(pixel_rng, canvas, geo["illumination"]), stats


@functools.lru_cache(maxsize=128)
def cached_landmark(key: tuple[int, ...], long_side: int, site_size: int = 0) -> Landmark:
  """The landmark of generator key ``key`` (``np.random.default_rng(list(key))``), memoised:
  views of one landmark share its rendering."""
  return make_landmark(np.random.default_rng(list(key)), long_side, site_size)
