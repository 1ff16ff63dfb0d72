"""``Retriever``: a backbone, a head and their weights, ready to turn photos into descriptors.

>>> retriever = Retriever.from_pretrained("efficientnet-lite0", pooling="gem")
>>> descriptors = retriever.extract(["a.jpg", "b.png"], max_size=1024)   # [2, D], unit rows

Extraction decodes and resizes in worker threads (:class:`data.loader.BatchLoader`) while the
device runs the previous batch: each image (cropped to its query box if given) is resized (long
side ``max_size``, never enlarged, then each scale; sides rounded to multiples of the network
stride), padded into a shape bucket (:mod:`data.buckets`: height and width rounded up to
``bucket_step`` pixels (default: a quarter of ``max_size``, so at most 4 x 4 shapes and small
images are not padded to a large bucket), padding at the bottom and right, zeros in the
normalised input space)
and run at a fixed batch size, so a folder of photos of many sizes compiles one
program per bucket shape, not one per image. The head pools only the valid feature-map cells
(``ceil(h / stride) x ceil(w / stride)``), and the backbone zeroes the input of every spatial
convolution and pool outside the real image, so a bucketed image gets its unpadded descriptor
(cosine >= 0.9999 in ``tests/test_retriever.py``; exact up to float reassociation for
EfficientNet-Lite, ResNet and VGG, approximate for AlexNet's 11x11/4 stem).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retrieval_jax import multiscale
from retrieval_jax._atomic import give_default_mode
from retrieval_jax.data.loader import BatchLoader
from retrieval_jax.models import BACKBONES, PRETRAINED, build_backbone, load_pretrained
from retrieval_jax.models.common import preprocess
from retrieval_jax.models.darac import DaracHead
from retrieval_jax.models.heads import GlobalPoolHead, RegionalHead
from retrieval_jax.models.remap import RemapHead
from retrieval_jax.models.variables_io import load_variables, save_variables

_GLOBAL = ("gem", "mac", "spoc")
_REGIONAL = {"rmac": "max", "rgac": "gem"}
POOLINGS = _GLOBAL + tuple(_REGIONAL) + ("darac", "remap")
# REMAP's multi-layer aggregation uses the last two convolutional blocks (§III-B, Table II).
REMAP_TAPS = {"resnet": ("stage3", "stage4"), "resnext": ("stage3", "stage4"),
              "vgg": ("conv5_2", "conv5_3"), "alexnet": ("conv4", "conv5"),
              "efficientnet": ("stage7", "head"), "tiny": ("stage3", "stage4")}


def _remap_taps(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  if cfg.remap_taps is not None:
    return tuple(cfg.remap_taps)
  key = cfg.backbone.replace("-", "_")
  for prefix, taps in REMAP_TAPS.items():
    if key.startswith(prefix):
      return taps
  raise ValueError(f"no default REMAP taps for backbone {cfg.backbone!r}; set remap_taps.")


def default_config() -> ml_collections.ConfigDict:
  """The fields :meth:`Retriever.from_config` reads, with their defaults."""
  return ml_collections.ConfigDict({
      "backbone": "efficientnet_lite0",  # a key of retrieval_jax.models.BACKBONES
      "pretrained": True,  # ImageNet weights when the backbone has a pretrained package
      "pooling": "gem",  # gem | mac | spoc | rmac | rgac | darac | remap
      "p": 3.0,  # GeM p (global) or xi (R-GAC) initial value
      "levels": 3,  # R-MAC grid levels (rmac / rgac / darac; remap uses remap_levels)
      "remap_levels": 4,  # REMAP's grid: 40 regions on a 24x32 map (Table I)
      "remap_taps": None,  # REMAP's streams; None: the family's last two (see REMAP_TAPS)
      "whiten_dims": None,  # a whitening layer of this size (initialise it from data)
      "preprocessing": None,  # None: the backbone family's usual one
      "max_size": 1024,
      "scales": (1.0,),
      # how scales combine: gem (the head's p for global GeM without whitening, else the mean,
      # as cirtorch) | sum | weighted (by multiscale_weights)
      "multiscale": "gem",
      "multiscale_weights": None,  # one per scale for "weighted" (REMAP Eq. 3: (2.0, 1.4))
      # pixels: bucket sides are multiples of this; None: max_size / 4 rounded up to the stride
      "bucket_step": None,
      "batch_size": 8,
  })


MULTISCALE = ("gem", "sum", "weighted")


def check_multiscale(method: str, weights: Sequence[float] | None,
                     scales: Sequence[float]) -> None:
  """Raises unless ``multiscale`` (``method``) is known and ``multiscale_weights`` fits it:
  positive numbers, one per scale when there are several, given only for ``"weighted"``."""
  if method not in MULTISCALE:
    raise ValueError(f"multiscale must be one of {MULTISCALE}; got {method!r}.")
  if method != "weighted":
    if weights is not None:
      raise ValueError(f"multiscale_weights are only used with multiscale='weighted'; got "
                       f"{weights!r} with {method!r}.")
    return
  if weights is None or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                and w > 0 for w in weights):
    raise ValueError(f"multiscale='weighted' needs multiscale_weights, positive numbers one per "
                     f"scale; got {weights!r}.")
  if len(scales) > 1 and len(weights) != len(scales):
    raise ValueError(f"multiscale_weights has {len(weights)} weights for {len(scales)} scales "
                     f"{tuple(scales)}; give one per scale.")


def _build_head(cfg: ml_collections.ConfigDict):
  if cfg.pooling in _GLOBAL:
    return GlobalPoolHead(cfg.pooling, p_init=cfg.p, whiten_dims=cfg.whiten_dims)
  if cfg.pooling in _REGIONAL:
    return RegionalHead(_REGIONAL[cfg.pooling], levels=cfg.levels, xi_init=cfg.p,
                        whiten_dims=cfg.whiten_dims)
  if cfg.pooling == "darac":
    return DaracHead(levels=cfg.levels, whiten_dims=cfg.whiten_dims)
  if cfg.pooling == "remap":
    return RemapHead(levels=cfg.remap_levels, layers=len(_remap_taps(cfg)),
                     out_dims=cfg.whiten_dims)
  raise ValueError(f"pooling must be one of {POOLINGS}; got {cfg.pooling!r}.")


# XLA options for programs that run once (initialisers): on a CPU, optimising the threefry
# random-number code takes seconds (6 s for ``tiny_resnet``'s init on 2 cores; 1.3 s without
# the backend optimisations), and the values differ by at most one float32 ulp.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def _init_once(module: nn.Module, *args: Any) -> dict[str, Any]:
  """``module.init(*args)`` compiled as one program, unoptimised on a CPU (see above)."""
  lowered = jax.jit(module.init).lower(*args)
  options = _RUN_ONCE_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(*args)


@functools.lru_cache(maxsize=None)
def _random_init(backbone: str) -> dict[str, Any]:
  """Random variables of a backbone (key 0), once per name and process."""
  return _init_once(build_backbone(backbone), jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


class Retriever:
  """Backbone + head + variables; see the module docstring. Build it with
  :meth:`from_pretrained`, :meth:`from_config` or :meth:`load`."""

  def __init__(self, cfg: ml_collections.ConfigDict, variables: dict[str, Any]):
    key = cfg.backbone.replace("-", "_")
    if key not in BACKBONES:
      raise ValueError(f"config backbone {cfg.backbone!r} is unknown; available: "
                       f"{sorted(BACKBONES)}.")
    self.config = cfg
    self.taps = _remap_taps(cfg) if cfg.pooling == "remap" else (BACKBONES[key].default_tap,)
    self.backbone = build_backbone(key, taps=self.taps)
    self.head = _build_head(cfg)
    self.variables = variables
    self.preprocessing = cfg.preprocessing or BACKBONES[key].preprocessing
    probe = jax.eval_shape(self.backbone.init_with_output, jax.random.PRNGKey(0),
                           jnp.zeros((1, 256, 256, 3)))[0]
    self.tap_strides = {t: 256 // probe[t].shape[1] for t in self.taps}
    self.stride = max(self.tap_strides.values())
    self.compiled_shapes: set[tuple[int, ...]] = set()  # one XLA program per entry

    self._describe = jax.jit(self.embed)

  def embed(self, variables: dict[str, Any], pixels: jax.Array, pixel_mask: jax.Array
            ) -> jax.Array:
    """The descriptors of a padded batch, un-jitted: what training steps differentiate.

    Args:
      variables: ``{"backbone": ..., "head": ...}`` flax variables (``self.variables`` or a
        training state's).
      pixels: uint8 ``[B, H, W, 3]``, normalised here (a quarter of float32's bytes to copy).
      pixel_mask: bool ``[B, H, W]``, True on the real image (top-left), False on padding.

    Returns:
      float ``[B, D]`` descriptors (the head's output, L2-normalised rows).
    """
    maps, masks = self.feature_maps(variables, pixels, pixel_mask)
    if self.config.pooling == "remap":
      return self.head.apply(variables["head"], [maps[t] for t in self.taps], masks=masks)
    return self.head.apply(variables["head"], maps[self.taps[0]], mask=masks[0])

  def feature_maps(self, variables: dict[str, Any], pixels: jax.Array, pixel_mask: jax.Array
                   ) -> tuple[dict[str, jax.Array], list[jax.Array]]:
    """The backbone half of :meth:`embed`: ``(maps, masks)``, the backbone's tap maps by name
    and, per tap of :attr:`taps`, bool ``[B, h_t, w_t]`` valid cells."""
    # The padding is zero in the normalised space.
    images = jnp.where(pixel_mask[..., None], preprocess(pixels, self.preprocessing), 0.0)
    # Every backbone re-masks its spatial layers' inputs, so padding does not leak into the
    # valid cells.
    maps = self.backbone.apply(variables["backbone"], images, mask=pixel_mask)
    # Valid cells of a tap at stride s: ceil(h / s) x ceil(w / s), top-left.
    masks = [pixel_mask[:, ::self.tap_strides[t], ::self.tap_strides[t]] for t in self.taps]
    return maps, masks

  # ------------------------------------------------------------------------------ building

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | dict | None = None) -> Retriever:
    """Builds from a config (fields of :func:`default_config`; missing ones take defaults).

    The backbone gets ImageNet weights when ``cfg.pretrained`` and a pretrained package exists
    for it (``retrieval_jax.models.PRETRAINED``), random weights otherwise; the head starts at
    its initial values (p, xi) and a random whitening layer if ``whiten_dims`` is set
    (initialise it from data with ``models.learn_head_whitening``).
    """
    full = default_config()
    unknown = sorted(set(dict(cfg or {})) - set(full))
    if unknown:
      raise ValueError(f"config has unknown field(s) {unknown}; known: {sorted(full)}.")
    full.update(dict(cfg or {}))
    full.scales = tuple(full.scales)
    if full.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}; got {full.pooling!r}.")
    check_multiscale(full.multiscale, full.multiscale_weights, full.scales)
    key = full.backbone.replace("-", "_")
    pretrained_name = key.replace("_", "-")
    if full.pretrained and pretrained_name in PRETRAINED:
      _, backbone_vars = load_pretrained(pretrained_name)
    else:
      if key not in BACKBONES:
        raise ValueError(f"config backbone {full.backbone!r} is unknown; available: "
                         f"{sorted(BACKBONES)}.")
      # Fresh containers around the cached arrays: callers may edit their own variable dicts.
      backbone_vars = jax.tree_util.tree_map(lambda leaf: leaf, _random_init(key))
    return cls.from_backbone_variables(full, backbone_vars)

  @classmethod
  def from_backbone_variables(cls, cfg: ml_collections.ConfigDict,
                              backbone_variables: dict[str, Any]) -> Retriever:
    """A Retriever on given backbone variables (converted or trained weights) with a freshly
    initialised head, built from a full config (:func:`default_config` fields)."""
    key = cfg.backbone.replace("-", "_")
    if key not in BACKBONES:
      raise ValueError(f"config backbone {cfg.backbone!r} is unknown; available: "
                       f"{sorted(BACKBONES)}.")
    taps = _remap_taps(cfg) if cfg.pooling == "remap" else (BACKBONES[key].default_tap,)
    maps = jax.eval_shape(build_backbone(key, taps=taps).apply, backbone_variables,
                          jnp.zeros((1, 128, 128, 3)))
    maps = [jnp.zeros(maps[t].shape) for t in taps]
    head = _build_head(cfg)
    head_vars = _init_once(head, jax.random.PRNGKey(1), maps if cfg.pooling == "remap" else maps[0])
    return cls(cfg, {"backbone": dict(backbone_variables), "head": dict(head_vars)})

  @classmethod
  def from_pretrained(cls, name: str = "efficientnet-lite0", *, pooling: str = "gem",
                      **overrides: Any) -> Retriever:
    """ImageNet backbone ``name`` (a key of ``PRETRAINED``) with a ``pooling`` head."""
    if name.replace("_", "-") not in PRETRAINED:
      raise ValueError(f"no pretrained weights for {name!r}; available: {sorted(PRETRAINED)}.")
    return cls.from_config(ml_collections.ConfigDict(
        {"backbone": name, "pretrained": True, "pooling": pooling, **overrides}))

  # ------------------------------------------------------------------------------ saving

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``config.json`` and the variables (orbax) to ``directory``, atomically: a
    temporary sibling directory is renamed into place once complete."""
    target = pathlib.Path(directory).absolute()
    if target.exists():
      raise ValueError(f"directory {target} already exists; choose a new one.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
      (tmp / "config.json").write_text(self.config.to_json(indent=2))
      save_variables(tmp / "variables", self.variables)
      give_default_mode(tmp, directory=True)
      os.replace(tmp, target)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, directory: str | os.PathLike) -> Retriever:
    """Restores what :meth:`save` wrote."""
    path = pathlib.Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
      raise ValueError(f"{path} is not a saved Retriever: {config_file} is missing.")
    cfg = default_config()
    cfg.update(json.loads(config_file.read_text()))
    cfg.scales = tuple(cfg.scales)
    return cls(cfg, load_variables(path / "variables"))

  # ------------------------------------------------------------------------------ extraction

  def input_size(self, image_hw: tuple[int, int], scale: float = 1.0,
                 max_size: int | None = None) -> tuple[int, int]:
    """The network input size of an image: :func:`multiscale.scale_sizes`, then each side
    rounded to the nearest multiple of the stride (a side shorter than half a stride rounds to
    0, which :meth:`extract` reports as too small).

    The rounding (an aspect change of at most ``stride / 2`` pixels per side) keeps every
    stride-2 layer on even sizes, so TF-"SAME" backbones (EfficientNet-Lite) pad the same way
    (nothing top/left) alone and inside a bucket; otherwise odd sizes shift the sampling grid of
    every downsampling layer by a pixel relative to the bucket.
    """
    max_size = self.config.max_size if max_size is None else max_size
    h, w = multiscale.scale_sizes(image_hw, (scale,), max_size)[0]
    s = self.stride
    return int(round(h / s)) * s, int(round(w / s)) * s

  def _input_sizes(self, index: int, image_hw: tuple[int, int], scales: tuple[float, ...],
                   max_size: int) -> list[tuple[int, int]]:
    """:meth:`input_size` at each scale, refusing an image that vanishes at one of them."""
    sizes = []
    for scale in scales:
      size = self.input_size(image_hw, scale, max_size)
      if min(size) < self.stride:
        raw = multiscale.scale_sizes(image_hw, (scale,), max_size)[0]
        raise ValueError(
            f"images_or_paths[{index}] is {raw[0]}x{raw[1]} px after resizing (max_size "
            f"{max_size}, scale {scale}), smaller than half the network stride {self.stride} "
            f"on one side; use a larger max_size or drop it.")
      sizes.append(size)
    return sizes

  def extract(self, images_or_paths: Sequence[Any], max_size: int | None = None,
              scales: Sequence[float] | None = None, batch_size: int | None = None, *,
              boxes: Any = None, skip_unreadable: bool = False,
              num_workers: int = 2) -> np.ndarray:
    """Descriptors of photos, in input order.

    Worker threads decode and resize (:class:`data.loader.BatchLoader`) while the device runs
    the previous batch; batches are padded ``uint8`` shape buckets (:mod:`data.buckets`),
    normalised on the device with the padding set to zero.

    Args:
      images_or_paths: file paths and/or RGB ``uint8 [H, W, 3]`` arrays.
      max_size: long side after resizing (never enlarged); default from the config.
      scales: relative factors or absolute long sides (see
        :func:`retrieval_jax.multiscale.scale_sizes`); several are combined as the config's
        ``multiscale`` says (by default as cirtorch: GeM with the head's learned p for a global
        GeM head without whitening, the mean of the scales for every other head).
      batch_size: images per program run; default from the config.
      boxes: optional ``[N, 4]`` ``(x0, y0, x1, y1)`` crops of the stored images (revisitop
        query boxes; NaN rows: whole image), cropped before resizing as cirtorch does
        (:func:`data.transforms.crop_box`).
      skip_unreadable: skip unreadable files (listed in ``self.last_failures``) instead of
        raising; their rows are then absent from the result.
      num_workers: decoding threads (0: decode in the calling thread).

    Returns:
      float32 ``[N, D]`` L2-normalised rows.

    Raises:
      ImageReadError: an unreadable file (with its path), unless skipped.
      ValueError: an image whose resized short side is below the network stride, naming it.
    """
    cfg = self.config
    max_size = cfg.max_size if max_size is None else max_size
    scales = tuple(cfg.scales if scales is None else scales)
    batch_size = cfg.batch_size if batch_size is None else batch_size
    # A fixed step fits one max_size only: 256 px suits 1024-px photos but would pad 128-px ones
    # to 4x their area.
    step = cfg.bucket_step or -(-max(1, max_size // 4) // self.stride) * self.stride
    loader = BatchLoader(
        images_or_paths, batch_size=batch_size, step=step, boxes=boxes,
        sizes_fn=lambda i, hw: self._input_sizes(i, hw, scales, max_size),
        num_workers=num_workers, skip_unreadable=skip_unreadable, device_put=True,
        name="images_or_paths")
    rows: list[dict[int, np.ndarray]] = [{} for _ in scales]
    running: list[tuple[Any, Any]] = []  # (batch, descriptors still on the device)
    for batch in loader:
      self.compiled_shapes.add(tuple(batch.x.shape))
      # Dispatch is asynchronous: the host fetches the previous batch's descriptors (and the
      # loader prepares the next batch) while the device computes this one.
      running.append((batch, self._describe(self.variables, batch.x, batch.mask)))
      while len(running) > 1:
        done, out = running.pop(0)
        rows[done.view].update(zip(done.indices, np.asarray(out)))
    for done, out in running:
      rows[done.view].update(zip(done.indices, np.asarray(out)))
    self.last_failures = loader.failures
    kept = sorted(rows[0])  # the input positions that were read, in input order
    per_scale = [np.stack([r[i] for i in kept]) if kept else np.zeros((0, 0), np.float32)
                 for r in rows]
    if len(per_scale) == 1:
      return per_scale[0]
    method, options = self._scale_combination()
    return np.asarray(multiscale.combine_scales(np.stack(per_scale), method, **options))

  def _scale_combination(self) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` for :func:`multiscale.combine_scales` under the config's
    ``multiscale``.

    ``"gem"`` follows cirtorch's rule: the generalised mean with the head's learned ``p`` only
    for a global GeM head without whitening; every other head (MAC, SPoC, regional, DARAC,
    REMAP, or any whitened output, whose entries can be negative) takes ``p = 1``, the mean of
    the scales' descriptors, which after L2 normalisation is ``"sum"``. ``"weighted"`` uses
    ``multiscale_weights``, one per scale.
    """
    cfg = self.config
    if cfg.multiscale == "weighted":
      return "weighted", {"weights": tuple(cfg.multiscale_weights)}
    if cfg.multiscale != "gem":
      return cfg.multiscale, {}
    head_params = self.variables["head"].get("params", {})
    if cfg.pooling == "gem" and not cfg.whiten_dims and "p" in head_params:
      return "gem", {"p": float(np.asarray(head_params["p"]).mean())}
    return "sum", {}
