"""Residual networks (ResNet v1.5, ResNeXt, pre-activation ResNet v2) as one Flax module family,
with taps and converters from torchvision state dicts and Keras ``ResNet50V2`` ``.h5`` files.

One module, :class:`ResNet`, covers every variant; the named constructors (:func:`resnet50`,
:func:`resnext101_32x8d`, :func:`resnet50_v2`, ...) only choose its configuration.

v1 (``preact=False``) is torchvision's layout ("ResNet v1.5"):

- stem: 7x7/2 convolution (padding 3), BN, ReLU, 3x3/2 max pool (padding 1);
- bottleneck: 1x1, 3x3 (carries the stride and the groups), 1x1 (x4 channels), each followed by
  BN; ReLU after the first two and after the residual addition. Basic block: two 3x3;
- the first block of a stage downsamples (stride 2 in stages 2-4) and, when the shape changes,
  its shortcut is a 1x1 convolution with stride plus BN (``downsample``);
- padding is explicit and symmetric, ``((p, p), (p, p))`` with ``p = k // 2`` as torch's
  ``padding=`` (not "SAME", which pads asymmetrically at stride 2 and shifts every map by a
  pixel on even sizes).

v2 (``preact=True``) is Keras' ``ResNet50V2`` (``keras/src/applications/resnet.py``,
``ResNet(preact=True, use_bias=True)`` with ``stack_residual_blocks_v2``):

- stem: ``ZeroPadding2D(3)`` then a 7x7/2 convolution *with bias* and no BN/ReLU; then
  ``ZeroPadding2D(1)`` and a 3x3/2 max pool. The pool pads with zeros, not -inf: its input is not
  rectified, so zero padding changes the result on border cells and is reproduced here;
- block: BN + ReLU (``preact_bn``) first; the shortcut is a 1x1 convolution with bias on the
  pre-activated input in the first block of a stage (``_0_conv``, channels change), otherwise
  the raw input, subsampled by ``MaxPooling2D(1, strides)`` (i.e. ``x[:, ::s, ::s]``) when the
  block strides; then 1x1 (no bias) + BN + ReLU, ``ZeroPadding2D(1)`` + 3x3 with stride (no
  bias) + BN + ReLU, 1x1 with bias; the sum is not rectified;
- the stride sits on the 3x3 of the *last* block of stages 1-3 and stage 4 does not stride
  (``stack_residual_blocks_v2(..., stride1=1)`` for ``conv5``). So the stage outputs are at
  strides 8, 16, 32, 32, not 4, 8, 16, 32 as in v1 (see :meth:`ResNet.tap_strides`);
- after the last stage ``post_bn`` + ReLU; batch-norm epsilon 1.001e-5 (torchvision: 1e-5).

Taps (``taps=``): ``"stem"`` (after the max pool, stride 4), ``"stage1"`` .. ``"stage4"`` (the
output of each stage's last block: post-ReLU for v1; for v2 the un-rectified residual sum, i.e.
Keras' ``convN_blockM_out``, except the last stage, which is ``post_relu``), and ``"logits"``
with ``num_classes`` (global average pool and the ``fc`` layer). The module stops after the last
tap asked for.

Parameter names follow :mod:`retrieval_jax.models.common`: ``conv1`` and ``conv1_bn`` (stem),
``stage{s}_block{b}`` (``s`` from 1 like the taps, ``b`` from 0 like torchvision's
``layer{s}.{b}``) holding ``conv1..conv3`` with ``conv{k}_bn``, ``downsample`` (+ ``_bn`` in v1)
and ``preact_bn`` (v2); ``post_bn`` (v2); ``fc``.

Which preprocessing (``retrieval_jax.models.common.preprocess``) goes with which weights:
torchvision weights ``"torchvision"``; Keras ``ResNet50V2`` weights ``"inception"``
(``x / 127.5 - 1``). :attr:`ResNet.preprocessing` gives the default for the family.

Feature maps are NHWC. Parameters are float32; ``dtype`` sets the compute dtype.

References:
  He, Zhang, Ren, Sun: Deep Residual Learning for Image Recognition, CVPR 2016 (v1).
  He, Zhang, Ren, Sun: Identity Mappings in Deep Residual Networks, ECCV 2016 (v2).
  Xie, Girshick, Dollar, Tu, He: Aggregated Residual Transformations for Deep Neural Networks,
  CVPR 2017 (ResNeXt). torchvision ``models/resnet.py`` (v1.5: stride on the 3x3). Keras
  ``applications/resnet.py`` and ``resnet_v2.py`` (ResNet50V2 layer names and padding).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from retrieval_jax.models.common import (NormMode, assemble_variables, batch_norm,
                                         check_norm_mode, check_source_keys, check_taps,
                                         select_taps)
from retrieval_jax.models.keras_h5 import open_h5, read_layer_weights
from retrieval_jax.models.layers import Conv

BlockKind = Literal["basic", "bottleneck"]
_BLOCKS = ("basic", "bottleneck")

# torchvision's BatchNorm2d default eps / momentum 0.1 (= flax 0.9); Keras uses eps 1.001e-5
# in its ResNets and momentum 0.99.
TORCHVISION_BN_EPSILON = 1e-5
KERAS_BN_EPSILON = 1.001e-5

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu): an
# untruncated normal of variance 2 / fan_out (flax computes fan_out of grouped kernels the same
# way, H * W * out).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Shapes only (jax.eval_shape); any size that survives five stride-2 reductions works.
_CONVERT_INPUT_SHAPE = (1, 64, 64, 3)


def _conv(features: int, kernel: int, stride: int, *, name: str, dtype: Any, groups: int = 1,
          bias: bool = False) -> Conv:
  """A square convolution with torch-style symmetric zero padding ``k // 2`` on every side."""
  pad = kernel // 2
  return Conv(features, kernel, stride, padding=((pad, pad), (pad, pad)),
              feature_group_count=groups, use_bias=bias, dtype=dtype, kernel_init=_CONV_INIT,
              name=name)


class ResidualBlock(nn.Module):
  """One residual block: basic or bottleneck, post-activation (v1) or pre-activation (v2).

  Attributes:
    planes: the block's base width; the output has ``planes`` channels (basic) or
      ``4 * planes`` (bottleneck).
    stride: the stride of the 3x3 convolution carrying the downsampling (the first 3x3 of a
      basic block, the middle one of a bottleneck).
    shortcut_conv: a 1x1 projection on the shortcut (``downsample``) instead of the identity.
    block: ``"basic"`` or ``"bottleneck"``.
    groups: grouped 3x3 convolution (ResNeXt cardinality); bottleneck only.
    width_per_group: ResNeXt's ``d``; the 3x3 has ``int(planes * width_per_group / 64) *
      groups`` channels (torchvision's ``base_width``).
    preact: pre-activation (v2) ordering, see the module docstring.
    norm: batch-norm mode (``retrieval_jax.models.common.batch_norm``).
    epsilon, momentum: batch-norm constants.
    dtype: compute dtype.
  """
  planes: int
  stride: int = 1
  shortcut_conv: bool = False
  block: BlockKind = "bottleneck"
  groups: int = 1
  width_per_group: int = 64
  preact: bool = False
  norm: NormMode = "frozen"
  epsilon: float = TORCHVISION_BN_EPSILON
  momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
               ) -> jax.Array:
    """``[B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), C_out]``.

    ``mask``: optional bool ``[B, H, W]`` of valid cells at the block's input resolution; the
    input of every 3x3 convolution is zeroed outside it (see :class:`ResNet`).
    """
    def bn(name: str):
      return batch_norm(self.norm, train, epsilon=self.epsilon, name=name, dtype=self.dtype,
                        momentum=self.momentum)

    # A convolution followed by BN only needs a bias once BN has been folded into it.
    folded = self.norm == "folded"
    if self.block == "bottleneck":
      width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
      # (features, kernel, stride, groups) of conv1..conv3.
      convs = ((width, 1, 1, 1), (width, 3, self.stride, self.groups),
               (4 * self.planes, 1, 1, 1))
    else:
      convs = ((self.planes, 3, self.stride, 1), (self.planes, 3, 1, 1))
    out_features = convs[-1][0]

    # The main branch first, then the shortcut, so the variables come in torchvision's order.
    y = nn.relu(bn("preact_bn")(x)) if self.preact else x
    preactivated = y
    for k, (features, kernel, stride, groups) in enumerate(convs, start=1):
      last = k == len(convs)
      if mask is not None and kernel > 1:
        y = y * mask[..., None].astype(y.dtype)
      if mask is not None:
        mask = mask[:, ::stride, ::stride]
      if self.preact and last:
        # v2's last convolution feeds the addition directly: no BN, and Keras gives it a bias.
        y = _conv(features, kernel, stride, name=f"conv{k}", dtype=self.dtype, groups=groups,
                  bias=True)(y)
      else:
        y = _conv(features, kernel, stride, name=f"conv{k}", dtype=self.dtype, groups=groups,
                  bias=folded)(y)
        y = bn(f"conv{k}_bn")(y)
        if not last:
          y = nn.relu(y)

    if self.preact and self.shortcut_conv:
      # Keras: the projection (with bias, no norm) sees the pre-activated input.
      shortcut = _conv(out_features, 1, self.stride, name="downsample", dtype=self.dtype,
                       bias=True)(preactivated)
    elif self.preact:
      # Keras: the raw input, through MaxPooling2D(1, strides=stride), i.e. subsampling.
      shortcut = x[:, ::self.stride, ::self.stride, :]
    elif self.shortcut_conv:
      shortcut = _conv(out_features, 1, self.stride, name="downsample", dtype=self.dtype,
                       bias=folded)(x)
      shortcut = bn("downsample_bn")(shortcut)
    else:
      shortcut = x

    y = y + shortcut
    # v1 rectifies the sum; v2 leaves it to the next block's (or post_bn's) pre-activation.
    return y if self.preact else nn.relu(y)


class ResNet(nn.Module):
  """ResNet / ResNeXt (torchvision v1.5) or pre-activation ResNet v2 (Keras), with taps.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"``.
    groups: ResNeXt cardinality (bottleneck only).
    width_per_group: ResNeXt bottleneck width per group (64 for plain ResNets).
    preact: the pre-activation v2 layout of Keras ``ResNet50V2``.
    taps: ``None`` to return the last stage's map, else the names of the maps to return as a
      dict (see :meth:`tap_names`).
    num_classes: adds global average pooling and a dense ``fc`` layer, tap ``"logits"``.
    norm: ``"frozen"`` (default), ``"train"`` or ``"folded"`` (v1 only: v2's pre-activation
      norms follow additions, not convolutions, and cannot be folded).
    dtype: compute dtype (parameters stay float32).
    stem_width: channels of the 7x7 stem convolution.
    width: planes of the first stage, doubled in each following stage.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: BlockKind = "bottleneck"
  groups: int = 1
  width_per_group: int = 64
  preact: bool = False
  taps: Sequence[str] | None = None
  num_classes: int | None = None
  norm: NormMode = "frozen"
  dtype: Any = jnp.float32
  stem_width: int = 64
  width: int = 64

  def __post_init__(self):
    # Configuration errors surface when the module is built, not at the first call.
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {_BLOCKS}; got {self.block!r}.")
    if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
      raise ValueError("basic blocks support only groups=1 and width_per_group=64 (as "
                       f"torchvision); got groups={self.groups}, "
                       f"width_per_group={self.width_per_group}.")
    if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
      raise ValueError(f"stage_sizes must be positive block counts; got {self.stage_sizes!r}.")
    check_norm_mode(self.norm)
    if self.preact and self.norm == "folded":
      raise ValueError("norm='folded' is not available for pre-activation (v2) ResNets: their "
                       "preact_bn/post_bn follow additions, not convolutions; use 'frozen'.")
    if self.num_classes is not None and self.num_classes < 1:
      raise ValueError(f"num_classes must be positive or None; got {self.num_classes}.")
    check_taps(self.taps, self.tap_names(), "ResNet")
    super().__post_init__()

  @property
  def preprocessing(self) -> str:
    """The ``common.preprocess`` mode of the usual weights: Keras v2 ``"inception"``, else
    ``"torchvision"``."""
    return "inception" if self.preact else "torchvision"

  @property
  def epsilon(self) -> float:
    """Batch-norm epsilon of the weights' framework (Keras 1.001e-5, torchvision 1e-5)."""
    return KERAS_BN_EPSILON if self.preact else TORCHVISION_BN_EPSILON

  @property
  def momentum(self) -> float:
    """Running-average decay for ``norm="train"``: Keras 0.99, torchvision 0.9 (torch's 0.1)."""
    return 0.99 if self.preact else 0.9

  def tap_names(self) -> tuple[str, ...]:
    """Every tap in network order: ``stem``, ``stage1`` .. ``stageN`` (, ``logits``)."""
    names = ("stem",) + tuple(f"stage{s}" for s in range(1, len(self.stage_sizes) + 1))
    return names + (("logits",) if self.num_classes is not None else ())

  def stage_strides(self) -> tuple[int, ...]:
    """The stride each stage applies: v1 ``(1, 2, 2, 2)`` on its first block, v2
    ``(2, 2, 2, 1)`` on its last block (Keras ``stride1=1`` for the last stage)."""
    n = len(self.stage_sizes)
    if self.preact:
      return tuple(2 if s < n - 1 else 1 for s in range(n))
    return tuple(1 if s == 0 else 2 for s in range(n))

  def tap_strides(self) -> dict[str, int]:
    """Nominal stride of every spatial tap relative to the input (output sizes are
    ``ceil(size / stride)``): v1 stem 4, stages 4, 8, 16, 32; v2 stem 4, stages 8, 16, 32, 32."""
    out, stride = {"stem": 4}, 4
    for s, step in enumerate(self.stage_strides(), start=1):
      stride *= step
      out[f"stage{s}"] = stride
    return out

  def tap_channels(self) -> dict[str, int]:
    """Channels of every tap (``logits``: ``num_classes``)."""
    expansion = 4 if self.block == "bottleneck" else 1
    out = {"stem": self.stem_width}
    for s in range(len(self.stage_sizes)):
      out[f"stage{s + 1}"] = self.width * 2**s * expansion
    if self.num_classes is not None:
      out["logits"] = self.num_classes
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    """Runs the network up to the last requested tap.

    Args:
      x: ``[B, H, W, 3]`` preprocessed images (see :attr:`preprocessing`).
      train: batch statistics in ``norm="train"`` mode (``batch_stats`` must then be mutable).
      mask: optional bool ``[B, H, W]`` (pixels, top-left aligned): the real image inside a
        padded shape bucket. The input of every spatial convolution and max pool is zeroed
        outside the valid region at its resolution, so the padding acts like each layer's own
        padding on the unpadded image (zeros; for post-ReLU max pools zeros equal torch's -inf
        padding); with sides that are multiples of 32 the valid part of every map then equals
        the unpadded image's map.

    Returns:
      ``[B, ceil(H/32), ceil(W/32), C]`` (the last stage's map, ``C = 2048`` for bottleneck
      ResNets, 512 basic) when ``taps`` is None, else ``{tap: array}`` for the requested taps.
    """
    if x.ndim != 4:
      raise ValueError(f"x must be [B, H, W, C] (NHWC); got shape {x.shape}.")
    names = self.tap_names()
    n_stages = len(self.stage_sizes)
    wanted = [f"stage{n_stages}"] if self.taps is None else list(self.taps)
    # Taps are static, so stopping early is plain Python control flow; init always builds the
    # whole network so the variables do not depend on which taps were asked for.
    last = len(names) - 1 if self.is_initializing() else max(names.index(t) for t in wanted)

    def bn(name: str):
      return batch_norm(self.norm, train, epsilon=self.epsilon, name=name, dtype=self.dtype,
                        momentum=self.momentum)

    features: dict[str, jax.Array] = {}
    x = jnp.asarray(x, self.dtype)
    if mask is not None:
      x = x * jnp.asarray(mask, bool)[..., None].astype(x.dtype)
      mask = jnp.asarray(mask, bool)[:, ::2, ::2]  # at the stem conv's stride

    def masked(v):
      return v if mask is None else v * mask[..., None].astype(v.dtype)

    if self.preact:
      # Keras: conv1_pad (3) + conv1_conv with bias, no norm; pool1_pad pads with *zeros*.
      x = _conv(self.stem_width, 7, 2, name="conv1", dtype=self.dtype, bias=True)(x)
      x = jnp.pad(masked(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    else:
      x = _conv(self.stem_width, 7, 2, name="conv1", dtype=self.dtype,
                bias=self.norm == "folded")(x)
      x = nn.relu(bn("conv1_bn")(x))
      # torch pads the pool with -inf (flax's max_pool does too).
      x = nn.max_pool(masked(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    if mask is not None:
      mask = mask[:, ::2, ::2]
    features["stem"] = x

    for s, (blocks, stride) in enumerate(zip(self.stage_sizes, self.stage_strides())):
      if names.index(f"stage{s + 1}") > last:
        break
      planes = self.width * 2**s
      out_channels = planes * (4 if self.block == "bottleneck" else 1)
      for b in range(blocks):
        # v1 strides in the first block of a stage, v2 (Keras) in the last.
        block_stride = stride if b == (blocks - 1 if self.preact else 0) else 1
        # v1 projects whenever the shape changes; v2 strides through subsampling, so it
        # projects only when the channels change (Keras: block1 of every stage).
        changes = x.shape[-1] != out_channels or (block_stride != 1 and not self.preact)
        x = ResidualBlock(planes=planes, stride=block_stride, shortcut_conv=changes,
                          block=self.block, groups=self.groups,
                          width_per_group=self.width_per_group, preact=self.preact,
                          norm=self.norm, epsilon=self.epsilon,
                          momentum=self.momentum, dtype=self.dtype,
                          name=f"stage{s + 1}_block{b}")(x, train, mask)
        if mask is not None:
          mask = mask[:, ::block_stride, ::block_stride]
      if self.preact and s == n_stages - 1:
        x = nn.relu(bn("post_bn")(x))
      features[f"stage{s + 1}"] = x

    if self.num_classes is not None and names.index("logits") <= last:
      pooled = jnp.mean(x, axis=(1, 2))
      features["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                    name="fc")(pooled)
    return select_taps(features, self.taps, f"stage{n_stages}", "ResNet")


# --------------------------------------------------------------------------------------------
# Named architectures.

_OPTIONS = ("taps", "num_classes", "norm", "dtype")

_ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3)),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3)),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3)),
    "resnext50_32x4d": dict(stage_sizes=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x4d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=8),
    "resnet50_v2": dict(stage_sizes=(3, 4, 6, 3), preact=True),
    "resnet101_v2": dict(stage_sizes=(3, 4, 23, 3), preact=True),
    "resnet152_v2": dict(stage_sizes=(3, 8, 36, 3), preact=True),
    # Small networks for tests and demos: every code path, a fraction of the cost.
    "tiny_resnet": dict(stage_sizes=(1, 1, 1, 1), block="basic", stem_width=8, width=8),
    "tiny_resnet_v2": dict(stage_sizes=(2, 1, 1, 2), preact=True, stem_width=8, width=4),
}


def _build(arch: str, options: Mapping[str, Any]) -> ResNet:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"{arch}() got unexpected option(s) {unknown}; allowed: {list(_OPTIONS)} "
                    f"(build ResNet(...) directly to change the architecture).")
  return ResNet(**_ARCH_CONFIGS[arch], **options)


def resnet18(**options: Any) -> ResNet:
  """ResNet-18 (basic blocks, 2-2-2-2). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet18", options)


def resnet34(**options: Any) -> ResNet:
  """ResNet-34 (basic blocks, 3-4-6-3). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet34", options)


def resnet50(**options: Any) -> ResNet:
  """ResNet-50 v1.5 (bottlenecks, 3-4-6-3). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet50", options)


def resnet101(**options: Any) -> ResNet:
  """ResNet-101 v1.5 (bottlenecks, 3-4-23-3). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet101", options)


def resnet152(**options: Any) -> ResNet:
  """ResNet-152 v1.5 (bottlenecks, 3-8-36-3). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet152", options)


def resnext50_32x4d(**options: Any) -> ResNet:
  """ResNeXt-50 32x4d (torchvision). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnext50_32x4d", options)


def resnext101_32x4d(**options: Any) -> ResNet:
  """ResNeXt-101 32x4d (the paper's; not in torchvision). Options: as :func:`resnet50`."""
  return _build("resnext101_32x4d", options)


def resnext101_32x8d(**options: Any) -> ResNet:
  """ResNeXt-101 32x8d (torchvision). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnext101_32x8d", options)


def resnet50_v2(**options: Any) -> ResNet:
  """Keras ``ResNet50V2`` (pre-activation). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet50_v2", options)


def resnet101_v2(**options: Any) -> ResNet:
  """Keras ``ResNet101V2`` (pre-activation). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet101_v2", options)


def resnet152_v2(**options: Any) -> ResNet:
  """Keras ``ResNet152V2`` (pre-activation). Options: ``taps, num_classes, norm, dtype``."""
  return _build("resnet152_v2", options)


def tiny_resnet(**options: Any) -> ResNet:
  """A 4-stage basic-block v1 ResNet of widths 8-64, for fast tests. Options: as resnet50."""
  return _build("tiny_resnet", options)


def tiny_resnet_v2(**options: Any) -> ResNet:
  """A small pre-activation bottleneck ResNet (2-1-1-2 blocks, 16-128 channels), in Keras'
  v2 layout, for fast tests. Options: as :func:`resnet50`."""
  return _build("tiny_resnet_v2", options)


RESNET_ARCHS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext101_32x4d": resnext101_32x4d,
    "resnext101_32x8d": resnext101_32x8d,
    "resnet50_v2": resnet50_v2,
    "resnet101_v2": resnet101_v2,
    "resnet152_v2": resnet152_v2,
    "tiny_resnet": tiny_resnet,
    "tiny_resnet_v2": tiny_resnet_v2,
}


def get_resnet(arch: str, **options: Any) -> ResNet:
  """``RESNET_ARCHS[arch](**options)`` with an error listing the known names."""
  if arch not in RESNET_ARCHS:
    raise ValueError(f"unknown ResNet architecture {arch!r}; known: {sorted(RESNET_ARCHS)}.")
  return RESNET_ARCHS[arch](**options)


# --------------------------------------------------------------------------------------------
# Converters. Both walk the variables the module expects and name, for each, the checkpoint
# tensor it comes from, so a missing tensor is reported in the checkpoint's own names.

_Transform = Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _convert(tensors: Mapping[str, Any], module: ResNet,
             source_name: Callable[[tuple[str, ...]], tuple[str, _Transform]],
             ignorable: Sequence[str], source: str, arch: str) -> dict[str, Any]:
  """Maps checkpoint tensors onto ``module``'s variables; raises listing what does not fit.

  Args:
    tensors: tensor name -> array.
    module: the module to build variables for.
    source_name: Flax variable path -> (tensor name, transform to Flax layout).
    ignorable: tensor names that may be present without being used.
    source: what the checkpoint is, for messages.
    arch: the architecture, for messages.
  """
  expected = traverse_util.flatten_dict(
      jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(_CONVERT_INPUT_SHAPE)))
  flat, missing, used = {}, [], set()
  # params before batch_stats, each in network order, so the first missing names are telling.
  for path in sorted(expected, key=lambda p: p[0] != "params"):
    name, transform = source_name(path)
    if name not in tensors:
      missing.append(name)
      continue
    used.add(name)
    flat[path] = transform(np.asarray(tensors[name]))
  if missing:
    raise ValueError(f"{source} does not convert to {arch}: {len(missing)} missing tensor(s), "
                     f"first {missing[:5]}; is it a checkpoint of another architecture?")
  check_source_keys(tensors.keys(), used | set(ignorable), source, arch)
  return assemble_variables(flat, module, _CONVERT_INPUT_SHAPE, source, arch)


_BLOCK_RE = re.compile(r"stage(\d+)_block(\d+)")


def _torch_conv(a: np.ndarray) -> np.ndarray:
  # OIHW -> HWIO; other ranks are left alone so the shape check reports them.
  return np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a


def _torch_dense(a: np.ndarray) -> np.ndarray:
  return a.T if a.ndim == 2 else a  # torch Linear is (out, in)


_TORCH_BN_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


def _torchvision_name(path: tuple[str, ...]) -> tuple[str, _Transform]:
  """Flax path (``params/stage1_block0/conv1_bn/scale``) -> torchvision name
  (``layer1.0.bn1.weight``) and the layout transform."""
  *modules, leaf = path[1:]
  if modules == ["fc"]:
    return f"fc.{'weight' if leaf == 'kernel' else leaf}", (
        _torch_dense if leaf == "kernel" else _identity)
  prefix = ""
  if len(modules) == 2:
    match = _BLOCK_RE.fullmatch(modules[0])
    assert match, path
    prefix = f"layer{match[1]}.{match[2]}."
  layer = modules[-1]
  base = layer[:-3] if layer.endswith("_bn") else layer
  if not prefix and base == "conv1":
    torch_layer = "bn1" if layer.endswith("_bn") else "conv1"
  elif base == "downsample":
    torch_layer = "downsample.1" if layer.endswith("_bn") else "downsample.0"
  else:  # convK / convK_bn -> convK / bnK
    torch_layer = f"bn{base[4:]}" if layer.endswith("_bn") else base
  if layer.endswith("_bn"):
    return f"{prefix}{torch_layer}.{_TORCH_BN_LEAF[leaf]}", _identity
  return f"{prefix}{torch_layer}.{'weight' if leaf == 'kernel' else leaf}", (
      _torch_conv if leaf == "kernel" else _identity)


def resnet_from_torchvision(state_dict: Mapping[str, Any], arch: str,
                            num_classes: int | None = None) -> dict[str, Any]:
  """Converts a torchvision ResNet/ResNeXt state dict to Flax variables of ``arch``.

  Names: ``conv1``, ``bn1``, ``layer{s}.{b}.conv{k}`` / ``bn{k}`` / ``downsample.0`` (conv) /
  ``downsample.1`` (BN), ``fc``. Convolution kernels go OIHW -> HWIO, the linear layer
  (out, in) -> (in, out); BN ``weight, bias, running_mean, running_var`` become ``scale, bias``
  (params) and ``mean, var`` (batch_stats); ``num_batches_tracked`` is ignored, and so is
  ``fc.*`` when ``num_classes`` is None.

  Args:
    state_dict: tensor name -> array (numpy, or anything ``np.asarray`` accepts, e.g. CPU torch
      tensors: ``{k: v.numpy() for k, v in model.state_dict().items()}``).
    arch: a v1 name in :data:`RESNET_ARCHS` (e.g. ``"resnet50"``, ``"resnext101_32x8d"``).
    num_classes: convert the classifier too (``fc``, tap ``"logits"``); 1000 for ImageNet.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for ``RESNET_ARCHS[arch](num_classes=num_classes)``
    (any ``taps`` and ``dtype``; with ``norm="folded"`` apply ``common.fold_batch_norm`` with
    epsilon 1e-5).

  Raises:
    ValueError: unknown ``arch``, or a state dict that does not match it, listing the first
      missing tensors, unexpected tensors (another architecture) or wrong shapes.
  """
  module = get_resnet(arch, num_classes=num_classes)
  if module.preact:
    raise ValueError(f"{arch} is a pre-activation (Keras) ResNet; torchvision has none. Use "
                     f"resnet_v2_from_keras_h5.")
  keys = list(state_dict)
  ignorable = [k for k in keys if k.endswith(".num_batches_tracked")]
  if num_classes is None:
    ignorable += [k for k in keys if k.startswith("fc.")]
  return _convert(state_dict, module, _torchvision_name, ignorable,
                  "torchvision state dict", arch)


_KERAS_BN_LEAF = {("params", "scale"): "gamma", ("params", "bias"): "beta",
                  ("batch_stats", "mean"): "moving_mean",
                  ("batch_stats", "var"): "moving_variance"}


def _keras_name(path: tuple[str, ...]) -> tuple[str, _Transform]:
  """Flax path -> ``"<keras layer>/<weight>"`` (Keras kernels are already HWIO / (in, out))."""
  collection, *modules, leaf = path
  layer = modules[-1]
  if len(modules) == 2:
    match = _BLOCK_RE.fullmatch(modules[0])
    assert match, path
    prefix = f"conv{int(match[1]) + 1}_block{int(match[2]) + 1}_"
    base = layer[:-3] if layer.endswith("_bn") else layer
    number = "0" if base == "downsample" else base.removeprefix("conv")
    keras_layer = (prefix + "preact_bn" if layer == "preact_bn"
                   else f"{prefix}{number}_{'bn' if layer.endswith('_bn') else 'conv'}")
  else:
    keras_layer = {"conv1": "conv1_conv", "post_bn": "post_bn", "fc": "predictions"}[layer]
  if layer.endswith("_bn"):
    leaf = _KERAS_BN_LEAF[(collection, leaf)]
  return f"{keras_layer}/{leaf}", _identity


def resnet_v2_from_keras_h5(path_or_h5file: str | os.PathLike | Any,
                            num_classes: int | None = None,
                            arch: str = "resnet50_v2") -> dict[str, Any]:
  """Converts Keras ``ResNet50V2`` (``ResNet101V2``, ``ResNet152V2``) HDF5 weights to Flax.

  Layer names: ``conv1_conv`` (with bias), ``conv{S}_block{B}_preact_bn``,
  ``conv{S}_block{B}_{1,2,3}_conv``, ``conv{S}_block{B}_{1,2}_bn``, ``conv{S}_block{B}_0_conv``
  (the projection shortcut), ``post_bn``, ``predictions``; Keras stage ``S`` (2..5) and block
  ``B`` (from 1) become ``stage{S-1}_block{B-1}``. BN ``gamma, beta, moving_mean,
  moving_variance`` become ``scale, bias`` (params) and ``mean, var`` (batch_stats); kernels are
  already HWIO. ``predictions`` is ignored unless ``num_classes`` is set (then it must be 1000
  for ImageNet weights; the model outputs logits, Keras applies softmax on top).

  Args:
    path_or_h5file: a legacy ``.h5`` file (full model or weights only; see
      :mod:`retrieval_jax.models.keras_h5`), as a path or an open ``h5py.File``.
    num_classes: convert the classifier too (tap ``"logits"``).
    arch: a pre-activation name in :data:`RESNET_ARCHS`.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for ``RESNET_ARCHS[arch](num_classes=...)``; feed
    it images preprocessed with ``preprocess(images, "inception")``.

  Raises:
    ValueError: a file that does not match ``arch``, listing the first missing Keras weights
      (``"<layer>/<weight>"``), unexpected ones, or wrong shapes.
  """
  module = get_resnet(arch, num_classes=num_classes)
  if not module.preact:
    raise ValueError(f"{arch} is not a pre-activation ResNet; Keras v2 weights convert only to "
                     f"{[a for a in RESNET_ARCHS if a.endswith('_v2')]}.")
  with open_h5(path_or_h5file) as f:
    weights = {f"{layer}/{name}": value for layer, layer_weights in read_layer_weights(f).items()
               for name, value in layer_weights.items()}
  ignorable = [] if num_classes is not None else [k for k in weights
                                                  if k.startswith("predictions/")]
  return _convert(weights, module, _keras_name, ignorable, "Keras HDF5 weights", arch)
