"""Plain convolutional stacks (VGG-16, VGG-19, AlexNet) as one Flax module family, with taps
and converters from torchvision state dicts and Keras VGG16 ``.h5`` files.

A stack is a sequence of convolutions (each followed by ReLU) and max pools, described by a
:class:`PlainArch` layer spec; :class:`ConvStack` runs any spec. For retrieval the last max pool
is removed, as cirtorch does (``features[:-1]``) and as LRML does ("remove the last pooling
layer"), so by default the model returns the last convolution's map after ReLU: VGG ``conv5_3``
(``conv5_4`` for VGG-19) at stride 16, AlexNet ``conv5``. With ``num_classes`` set, the torchvision
classifier (adaptive average pool, fc6, fc7, fc8) is added and ``"logits"`` becomes a tap.

Which preprocessing (``retrieval_jax.models.common.preprocess``) goes with which weights:

- torchvision (and cirtorch, which fine-tunes torchvision's VGG/AlexNet): ``"torchvision"``,
  RGB in [0, 1] normalised by the ImageNet mean and std.
- Keras ``VGG16`` (``vgg16_weights_tf_dim_ordering_tf_kernels*.h5``, converted from the original
  Caffe model): ``"caffe"``, RGB -> BGR in [0, 255] minus the ImageNet BGR mean, no scaling.

Feature maps are NHWC. Parameters are float32; ``dtype`` sets the compute dtype.

References:
  Simonyan, Zisserman: Very Deep Convolutional Networks for Large-Scale Image Recognition,
  ICLR 2015 (VGG). Krizhevsky, Sutskever, Hinton: ImageNet Classification with Deep
  Convolutional Neural Networks, NeurIPS 2012 (AlexNet; torchvision follows the "one weird
  trick" variant, Krizhevsky 2014). Radenovic et al., TPAMI 2018 (cirtorch, ``features[:-1]``).
  Fan et al., Appl. Sci. 2019 (LRML, AlexNet/VGG16 backbones).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models.common import assemble_variables, check_source_keys, check_taps
from retrieval_jax.models.keras_h5 import (is_keras3_weights_file, keras3_layers_in_order,
                                           keras3_weighted_layers, open_h5, read_layer_weights)

# --------------------------------------------------------------------------------------------
# Layer specs.


class ConvSpec(NamedTuple):
  """A convolution followed by ReLU; its tap (post-ReLU) and parameters are named ``name``."""
  name: str
  features: int
  kernel: int
  stride: int = 1
  padding: int = 1  # symmetric zero padding, as torch's ``padding=`` (not "SAME")


class PoolSpec(NamedTuple):
  """A max pool without padding (torch ``MaxPool2d(window, stride)``, floor mode)."""
  name: str
  window: int
  stride: int


@dataclasses.dataclass(frozen=True)
class PlainArch:
  """The layer spec of a plain stack and its torchvision-style classifier.

  Attributes:
    name: the architecture name (messages, registry key).
    layers: convolutions and pools in order; the last entry is the pool retrieval drops.
    classifier_pool: side of the adaptive average pool before the classifier (7 VGG, 6 AlexNet).
    hidden: width of fc6 and fc7.
    classifier_indices: the ``classifier.<idx>`` of fc6, fc7, fc8 in torchvision's
      ``nn.Sequential`` (the dropouts and ReLUs take the other indices).
    dropout_before: the fully connected layers whose input goes through dropout in training
      (torchvision VGG: fc7, fc8, i.e. after ReLU6/7; AlexNet: fc6, fc7).
  """
  name: str
  layers: tuple[ConvSpec | PoolSpec, ...]
  classifier_pool: int
  hidden: int = 4096
  classifier_indices: tuple[int, int, int] = (0, 3, 6)
  dropout_before: tuple[str, ...] = ("fc7", "fc8")

  @property
  def convs(self) -> tuple[ConvSpec, ...]:
    return tuple(l for l in self.layers if isinstance(l, ConvSpec))

  @property
  def last_conv(self) -> str:
    return self.convs[-1].name

  @property
  def last_pool(self) -> str:
    return self.layers[-1].name

  def tap_names(self, with_logits: bool) -> list[str]:
    """Every tap in network order; ``"logits"`` last when there is a classifier."""
    return [l.name for l in self.layers] + (["logits"] if with_logits else [])

  def tap_channels(self) -> dict[str, int]:
    """Channels of every convolution and pool tap (the classifier's are ``num_classes``)."""
    out, channels = {}, 3
    for layer in self.layers:
      if isinstance(layer, ConvSpec):
        channels = layer.features
      out[layer.name] = channels
    return out

  def tap_strides(self) -> dict[str, int]:
    """Nominal stride of every convolution and pool tap, relative to the input."""
    out, stride = {}, 1
    for layer in self.layers:
      stride *= layer.stride
      out[layer.name] = stride
    return out

  def torch_feature_indices(self) -> dict[str, int]:
    """``features.<idx>`` of each convolution in torchvision's ``nn.Sequential``.

    Every convolution is followed by its ReLU (two indices), every pool takes one.
    """
    out, idx = {}, 0
    for layer in self.layers:
      if isinstance(layer, ConvSpec):
        out[layer.name] = idx
        idx += 2
      else:
        idx += 1
    return out


def _vgg_layers(blocks: Sequence[int]) -> tuple[ConvSpec | PoolSpec, ...]:
  """VGG: ``blocks[b]`` 3x3 convolutions (padding 1) of width 64..512, then a 2x2/2 pool."""
  layers: list[ConvSpec | PoolSpec] = []
  for b, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512, 512)), start=1):
    layers += [ConvSpec(f"conv{b}_{i}", width, 3) for i in range(1, n + 1)]
    layers.append(PoolSpec(f"pool{b}", 2, 2))
  return tuple(layers)


PLAIN_ARCHS: dict[str, PlainArch] = {
    "vgg16": PlainArch("vgg16", _vgg_layers((2, 2, 3, 3, 3)), classifier_pool=7),
    "vgg19": PlainArch("vgg19", _vgg_layers((2, 2, 4, 4, 4)), classifier_pool=7),
    # torchvision's AlexNet (the single-GPU "one weird trick" widths 64/192/384/256/256).
    "alexnet": PlainArch(
        "alexnet",
        (ConvSpec("conv1", 64, 11, stride=4, padding=2), PoolSpec("pool1", 3, 2),
         ConvSpec("conv2", 192, 5, padding=2), PoolSpec("pool2", 3, 2),
         ConvSpec("conv3", 384, 3), ConvSpec("conv4", 256, 3), ConvSpec("conv5", 256, 3),
         PoolSpec("pool3", 3, 2)),
        classifier_pool=6, classifier_indices=(1, 4, 6), dropout_before=("fc6", "fc7")),
}


def get_arch(arch: str | PlainArch) -> PlainArch:
  """Resolves an architecture name to its spec (a :class:`PlainArch` is returned as is)."""
  if isinstance(arch, PlainArch):
    return arch
  if arch not in PLAIN_ARCHS:
    raise ValueError(f"unknown plain architecture {arch!r}; known: {sorted(PLAIN_ARCHS)}.")
  return PLAIN_ARCHS[arch]


# --------------------------------------------------------------------------------------------
# Adaptive average pooling, exactly as torch bins it.


def _adaptive_bins(size_in: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]`` averaging matrix of torch's adaptive average pooling.

  Bin ``i`` covers ``[floor(i * n / m), ceil((i + 1) * n / m))``: bins overlap when ``n`` is not
  a multiple of ``m`` and repeat cells when ``m > n`` (upsampling).
  """
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
  """torch's ``adaptive_avg_pool2d`` for NHWC maps.

  Args:
    x: ``[B, H, W, C]``.
    output_size: ``s`` or ``(s_h, s_w)``.

  Returns:
    ``[B, s_h, s_w, C]`` in ``x.dtype``; ``x`` itself when the size already matches.
  """
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  _, h, w, _ = x.shape
  # Separable: average rows, then columns. HIGHEST precision so accelerators do not round the
  # averages to bfloat16/TF32 (the matrices are tiny).
  if h != out_h:
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(_adaptive_bins(h, out_h), x.dtype), x,
                   precision=jax.lax.Precision.HIGHEST)
  if w != out_w:
    x = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(_adaptive_bins(w, out_w), x.dtype), x,
                   precision=jax.lax.Precision.HIGHEST)
  return x


# --------------------------------------------------------------------------------------------
# The module.


class ConvStack(nn.Module):
  """A plain stack of convolution + ReLU and max-pool layers (VGG, AlexNet), NHWC.

  Output when ``taps`` is None: the last pool if ``keep_last_pool``, else the last
  convolution's map after ReLU (retrieval's choice: ``features[:-1]``), also when a classifier
  is configured (ask for the ``"logits"`` tap). With ``taps``, a dict ``{tap: array}`` in the
  order asked; ``init`` builds every layer, applying stops after the last requested tap.

  Taps: VGG ``conv1_1`` .. ``conv5_3`` (``conv5_4`` for VGG-19), all after ReLU, and ``pool1`` ..
  ``pool5``; AlexNet ``conv1`` .. ``conv5``, ``pool1`` .. ``pool3``; ``"logits"`` with
  ``num_classes``. Nominal strides: VGG ``convB_*`` ``2**(B-1)``, ``poolB`` ``2**B``; AlexNet
  conv1 4, pool1/conv2 8, pool2/conv3-5 16, pool3 32 (see :meth:`PlainArch.tap_strides`).

  Attributes:
    arch: an architecture name in :data:`PLAIN_ARCHS` or a :class:`PlainArch`.
    taps: names of the maps to return, or None for the default output above.
    num_classes: adds torchvision's classifier: adaptive average pool of the last pool to
      ``classifier_pool`` squared (7 VGG, 6 AlexNet), flatten in (H, W, C) order, fc6 (4096) ReLU,
      fc7 (4096) ReLU, fc8 (``num_classes``), with dropout 0.5 where torchvision has it.
    keep_last_pool: return the last pool instead of the last convolution by default.
    dropout_rate: the classifier's dropout rate (active only with ``train=True``, which then
      needs a ``"dropout"`` rng).
    dtype: compute dtype; parameters stay float32.
  """
  arch: str | PlainArch = "vgg16"
  taps: Sequence[str] | None = None
  num_classes: int | None = None
  keep_last_pool: bool = False
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  def default_tap(self) -> str:
    """The tap returned when ``taps`` is None (see the class docstring)."""
    spec = get_arch(self.arch)
    return spec.last_pool if self.keep_last_pool else spec.last_conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    """Runs the stack.

    Args:
      x: ``[B, H, W, C_in]`` preprocessed images (see the module docstring for which
        preprocessing goes with which weights).
      train: enables the classifier's dropout (no effect on convolutions and pools).
      mask: optional bool ``[B, H, W]`` (pixels, top-left aligned) of the real image in a padded
        shape bucket: every convolution's input is zeroed outside the valid region at its
        resolution, so padding acts like the layer's own zero padding (exact for VGG with sides
        that are multiples of 32; AlexNet's 11x11/4 stem is only approximately aligned).

    Returns:
      The default map ``[B, H', W', C]``, or a dict of taps.
    """
    spec = get_arch(self.arch)
    check_taps(self.taps, spec.tap_names(self.num_classes is not None), spec.name)
    if np.ndim(x) != 4:
      raise ValueError(f"x must be [B, H, W, C] (NHWC); got shape {np.shape(x)}.")
    wanted = list(self.taps) if self.taps is not None else [self.default_tap()]
    # init builds every layer whatever the taps, so one set of variables serves any taps (and
    # the converters); applying stops after the last requested tap.
    remaining = (set(spec.tap_names(self.num_classes is not None)) if self.is_initializing()
                 else set(wanted))
    features: dict[str, jax.Array] = {}
    input_shape = tuple(np.shape(x))
    x = jnp.asarray(x, self.dtype)
    mask = None if mask is None else jnp.asarray(mask, bool)

    for layer in spec.layers:
      if not remaining:
        break  # taps are static: nothing after the last requested one is built or run
      if isinstance(layer, ConvSpec):
        if mask is not None:
          x = x * mask[..., None].astype(x.dtype)
        pad = ((layer.padding, layer.padding),) * 2
        x = nn.Conv(layer.features, (layer.kernel, layer.kernel), (layer.stride, layer.stride),
                    padding=pad, dtype=self.dtype, param_dtype=jnp.float32, name=layer.name)(x)
        x = nn.relu(x)
      else:
        x = nn.max_pool(x, (layer.window, layer.window), (layer.stride, layer.stride),
                        padding="VALID")
      if mask is not None and layer.stride > 1:
        mask = mask[:, ::layer.stride, ::layer.stride]
      if 0 in x.shape[1:3]:
        raise ValueError(f"{spec.name}: input of shape {input_shape} is too small; {layer.name} "
                         f"has an empty output {x.shape}.")
      if layer.name in remaining:
        features[layer.name] = x
        remaining.discard(layer.name)

    if remaining:  # only "logits" can remain
      x = adaptive_avg_pool(x, spec.classifier_pool)
      # Flattened in NHWC (h, w, c) order; torch flattens (c, h, w), which the converter
      # accounts for by permuting fc6's input rows.
      x = x.reshape(x.shape[0], -1)
      widths = {"fc6": spec.hidden, "fc7": spec.hidden, "fc8": self.num_classes}
      for name, width in widths.items():
        if name in spec.dropout_before:
          x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=name)(x)
        if name != "fc8":
          x = nn.relu(x)
      features["logits"] = x

    if self.taps is None:
      return features[wanted[0]]
    return {t: features[t] for t in self.taps}


def vgg16(**kwargs) -> ConvStack:
  """VGG-16 (configuration D); keyword arguments are :class:`ConvStack` attributes."""
  return ConvStack(arch="vgg16", **kwargs)


def vgg19(**kwargs) -> ConvStack:
  """VGG-19 (configuration E); keyword arguments are :class:`ConvStack` attributes."""
  return ConvStack(arch="vgg19", **kwargs)


def alexnet(**kwargs) -> ConvStack:
  """torchvision's AlexNet; keyword arguments are :class:`ConvStack` attributes."""
  return ConvStack(arch="alexnet", **kwargs)


# --------------------------------------------------------------------------------------------
# Converters.

# Any input the module accepts; eval_shape only traces, so its size costs nothing.
_CHECK_INPUT_SHAPE = (1, 224, 224, 3)


def _missing_error(source: str, arch: str, missing: Sequence[str], unexpected: Sequence[str],
                   what: str = "tensor") -> ValueError:
  msg = f"{source} does not match {arch}: {len(missing)} missing {what}(s), first {missing[:5]}"
  if unexpected:
    msg += f"; {len(unexpected)} unexpected, first {list(unexpected)[:5]}"
  return ValueError(msg + "; is it a checkpoint of another architecture?")


def _fc6_rows_nchw_to_nhwc(kernel: np.ndarray, channels: int, side: int) -> np.ndarray:
  """Reorders fc6's input rows from torch's (C, H, W) flatten order to our (H, W, C) order.

  ``kernel`` is ``[C*H*W, hidden]`` (already transposed); other shapes are returned unchanged so
  the shape check reports them.
  """
  if kernel.shape[0] != channels * side * side:
    return kernel
  hidden = kernel.shape[1]
  return (kernel.reshape(channels, side, side, hidden).transpose(1, 2, 0, 3)
          .reshape(side * side * channels, hidden))


def plain_from_torchvision(state_dict: Mapping[str, Any], arch: str | PlainArch,
                           num_classes: int | None = None) -> dict[str, Any]:
  """Converts a torchvision VGG / AlexNet ``state_dict`` to :class:`ConvStack` variables.

  Convolutions ``features.<idx>.weight [O, I, kh, kw]`` become HWIO kernels; the classifier's
  ``classifier.<idx>.weight [out, in]`` become ``[in, out]`` Dense kernels, and fc6's input rows
  are permuted from torch's (C, H, W) flatten order to (H, W, C). cirtorch checkpoints of VGG and
  AlexNet keep torchvision's ``features.<idx>`` names (drop their ``pool.*``/``whiten.*``
  entries first). Use ``preprocess(..., "torchvision")`` with these weights.

  Args:
    state_dict: tensor name -> array (numpy, or CPU torch tensors).
    arch: ``"vgg16"``, ``"vgg19"``, ``"alexnet"`` or a :class:`PlainArch`.
    num_classes: convert the classifier too (fc8 must have this many outputs); when None,
      ``classifier.*`` tensors are allowed and ignored.

  Returns:
    ``{"params": ...}`` for ``ConvStack(arch, num_classes=num_classes)``, float32 numpy.

  Raises:
    ValueError: listing the first missing tensors (and unexpected ones), the first unexpected
      tensors, or the first tensors with wrong shapes.
  """
  spec = get_arch(arch)
  source = "torchvision state dict"
  needed: dict[str, tuple[str, ...]] = {}
  for name, idx in spec.torch_feature_indices().items():
    needed[f"features.{idx}.weight"] = ("params", name, "kernel")
    needed[f"features.{idx}.bias"] = ("params", name, "bias")
  if num_classes is not None:
    for name, idx in zip(("fc6", "fc7", "fc8"), spec.classifier_indices):
      needed[f"classifier.{idx}.weight"] = ("params", name, "kernel")
      needed[f"classifier.{idx}.bias"] = ("params", name, "bias")
  # Without a classifier, classifier.* is allowed and left unused (a full torchvision model).
  considered = [k for k in state_dict if num_classes is not None or not k.startswith("classifier.")]
  missing = [k for k in needed if k not in state_dict]
  if missing:
    raise _missing_error(source, spec.name, missing, sorted(set(considered) - set(needed)))
  check_source_keys(considered, needed, source, spec.name)

  flat = {}
  for key, path in needed.items():
    value = np.asarray(state_dict[key], np.float32)
    if path[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif path[-1] == "kernel" and value.ndim == 2:
      value = value.T  # [out, in] -> [in, out]
      if path[1] == "fc6":
        value = _fc6_rows_nchw_to_nhwc(value, spec.convs[-1].features, spec.classifier_pool)
    flat[path] = value
  module = ConvStack(arch=spec, num_classes=num_classes)
  return assemble_variables(flat, module, _CHECK_INPUT_SHAPE, source, spec.name)


# Keras VGG16 layer names -> ours.
_KERAS_VGG16_CONVS = {f"block{b}_conv{i}": f"conv{b}_{i}"
                      for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)}
_KERAS_VGG16_FCS = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}


def _keras3_vgg16_layers(f) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
  """Reads a Keras 3 ``.weights.h5`` of VGG16, mapping layers by position.

  Keras 3 names layers in this format by class (``conv2d``, ``conv2d_1``, ..., ``dense``, ...)
  in the model's layer order, so the i-th ``conv2d`` is the i-th convolution. Returns the layer
  weights under Keras VGG16 names and the names of other layers that hold weights.
  """
  out, used = {}, set()
  for keras_names, layer_class in ((list(_KERAS_VGG16_CONVS), "conv2d"),
                                   (list(_KERAS_VGG16_FCS), "dense")):
    stored = keras3_layers_in_order(f, layer_class)
    for i, (keras_name, variables) in enumerate(zip(keras_names, stored)):
      if len(variables) == 2:
        out[keras_name] = {"kernel": variables[0], "bias": variables[1]}
        used.add(layer_class if i == 0 else f"{layer_class}_{i}")
  other = [n for n in keras3_weighted_layers(f) if n not in used]
  return out, other


def vgg16_from_keras_h5(path_or_h5file: str | os.PathLike | Any,
                        num_classes: int | None = None) -> dict[str, Any]:
  """Converts Keras ``VGG16`` weights in an ``.h5`` file to ``ConvStack("vgg16")`` variables.

  Layouts read (Keras layer names ``block1_conv1`` .. ``block5_conv3``, ``fc1``, ``fc2``,
  ``predictions``):

  - weights only, Keras 2 (``model.save_weights("x.h5")``, and the released
    ``vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5``): ``<layer>/<layer>/kernel:0``;
  - a full model (``model.save("x.h5")``, Keras 2 and Keras 3's legacy format):
    ``model_weights/<layer>/<layer>/kernel[:0]``;
  - Keras 3 ``model.save_weights("x.weights.h5")``: ``layers/conv2d[_i]/vars/{0,1}`` and
    ``layers/dense[_i]/vars/{0,1}``, in layer order.

  Keras kernels are already HWIO / ``[in, out]``, and Keras flattens NHWC before ``fc1`` as we
  do, so nothing is permuted. Keras VGG16 has no adaptive pooling: its classifier equals ours
  for inputs whose pool5 is 7x7 (224..255 px). Use ``preprocess(..., "caffe")`` with these
  weights (BGR, ImageNet BGR mean subtracted, [0, 255] scale).

  Args:
    path_or_h5file: a path, or an open ``h5py.File``/``h5py.Group``.
    num_classes: convert fc1, fc2 and predictions too (a ``_notop`` file then fails); when None
      they are allowed and ignored.

  Returns:
    ``{"params": ...}`` for ``ConvStack("vgg16", num_classes=num_classes)``, float32 numpy.

  Raises:
    ValueError: naming missing layers, unexpected layers with weights, or wrong shapes.
  """
  if not hasattr(path_or_h5file, "attrs"):  # a path: open it once, then convert
    with open_h5(path_or_h5file) as f:
      return vgg16_from_keras_h5(f, num_classes)
  f = path_or_h5file
  source = "Keras VGG16 .h5 file"
  wanted = dict(_KERAS_VGG16_CONVS)
  if num_classes is not None:
    wanted.update(_KERAS_VGG16_FCS)

  if is_keras3_weights_file(f):
    layers, other = _keras3_vgg16_layers(f)
  else:
    layers = read_layer_weights(f)
    other = [name for name in layers if name not in _KERAS_VGG16_CONVS
             and name not in _KERAS_VGG16_FCS]
  ignored = set() if num_classes is not None else set(_KERAS_VGG16_FCS)
  missing = [name for name in wanted if name not in layers]
  if missing:
    raise _missing_error(source, "vgg16", missing, other, what="layer")
  held = set(layers) | set(other)  # every layer that holds weights
  check_source_keys([n for n in held if n not in ignored], wanted, source, "vgg16")

  flat = {}
  for keras_name, ours in wanted.items():
    weights = layers[keras_name]
    for kind in ("kernel", "bias"):
      if kind not in weights:
        raise ValueError(f"{source}: layer {keras_name!r} has no {kind}; found "
                         f"{sorted(weights)}.")
      flat[("params", ours, kind)] = np.asarray(weights[kind], np.float32)
  module = ConvStack(arch="vgg16", num_classes=num_classes)
  return assemble_variables(flat, module, _CHECK_INPUT_SHAPE, source, "vgg16")
