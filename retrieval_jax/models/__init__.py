"""Backbones (Flax linen, NHWC) with multi-layer taps, weight converters and pretrained weights,
and the retrieval heads on top of them (GeM/MAC/SPoC, R-MAC/R-GAC, DARAC, REMAP, whitening).

``build_backbone(name, taps=..., num_classes=..., norm=..., dtype=...)`` builds any family by
name; :data:`BACKBONES` lists the names with the input preprocessing of their usual weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn

from retrieval_jax.models import convert, darac, heads, remap, resnet, vgg
from retrieval_jax.models.common import NORM_MODES, fold_batch_norm, preprocess
from retrieval_jax.models.darac import (DaracHead, aggregation_parameter_count,
                                        darac_init_whitening, fold_darac_batch_norm)
from retrieval_jax.models.dlrtn_classifier import DLRTNClassifier
from retrieval_jax.models.efficientnet_lite import EfficientNetLite
from retrieval_jax.models.heads import (GlobalPoolHead, RegionalHead, learn_head_whitening,
                                        replace_whitening)
from retrieval_jax.models.pretrained import PRETRAINED, load_pretrained
from retrieval_jax.models.torch_pickle import (UnsafeCheckpointError, load_torch_pickle,
                                               load_torch_state_dict)
from retrieval_jax.models.remap import (RemapHead, effective_klw, fixed_rmac_regions,
                                        remap_init_from_data, remap_region_descriptors)
from retrieval_jax.models.variables_io import load_variables, save_variables
from retrieval_jax.models.whitening_layer import Whitening, whitening_params


class BackboneInfo(NamedTuple):
  """How to build a backbone and feed it.

  Attributes:
    build: ``(**options) -> nn.Module`` (options: taps, num_classes, norm (not VGG/AlexNet),
      dtype).
    preprocessing: the :func:`preprocess` mode of the weights this family usually comes with
      (torchvision for ResNet/VGG/AlexNet, Keras ``"inception"`` for ResNet v2,
      ``"efficientnet_lite"``). Keras VGG16 weights need ``"caffe"`` instead.
    default_tap: the tap returned when ``taps`` is None (the last convolutional map).
  """
  build: Callable[..., nn.Module]
  preprocessing: str
  default_tap: str


def _efficientnet_lite(variant: int) -> Callable[..., nn.Module]:
  return functools.partial(EfficientNetLite, variant)


BACKBONES: dict[str, BackboneInfo] = {
    **{name: BackboneInfo(build, "inception" if name.endswith("_v2") else "torchvision",
                          "stage4") for name, build in resnet.RESNET_ARCHS.items()},
    "vgg16": BackboneInfo(vgg.vgg16, "torchvision", "conv5_3"),
    "vgg19": BackboneInfo(vgg.vgg19, "torchvision", "conv5_4"),
    "alexnet": BackboneInfo(vgg.alexnet, "torchvision", "conv5"),
    **{f"efficientnet_lite{v}": BackboneInfo(_efficientnet_lite(v), "efficientnet_lite", "head")
       for v in range(5)},
}


def build_backbone(name: str, **options: Any) -> nn.Module:
  """Builds a backbone by name (``-`` and ``_`` are interchangeable: ``"efficientnet-lite0"``).

  Args:
    name: a key of :data:`BACKBONES`.
    **options: module attributes: ``taps`` (tuple of tap names, or None for the last conv map),
      ``num_classes`` (adds a classifier and the ``"logits"`` tap), ``norm`` (``"frozen"``,
      ``"train"``, ``"folded"``; not for VGG/AlexNet, which have no batch norm), ``dtype``.
  """
  key = name.replace("-", "_")
  if key not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}.")
  return BACKBONES[key].build(**options)


__all__ = [
    "aggregation_parameter_count", "BackboneInfo", "BACKBONES", "build_backbone", "convert",
    "darac", "darac_init_whitening", "DaracHead", "DLRTNClassifier", "effective_klw",
    "EfficientNetLite", "fixed_rmac_regions", "fold_batch_norm", "fold_darac_batch_norm",
    "GlobalPoolHead", "heads", "learn_head_whitening", "load_pretrained", "load_torch_pickle",
    "load_torch_state_dict", "load_variables", "NORM_MODES", "preprocess", "PRETRAINED",
    "RegionalHead", "remap", "remap_init_from_data", "remap_region_descriptors", "RemapHead",
    "replace_whitening", "resnet", "save_variables", "UnsafeCheckpointError", "vgg", "Whitening",
    "whitening_params"
]
