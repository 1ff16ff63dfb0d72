"""Reading Keras HDF5 weight files with h5py (no TensorFlow or Keras needed).

Layouts:

- legacy, by layer name: a full model saved with ``model.save("x.h5")`` keeps its layer groups
  under ``model_weights/``; a weights-only file (Keras 2 ``save_weights``, and the Keras
  applications' released ``*_weights_tf_dim_ordering_tf_kernels*.h5``) keeps them at the top
  level. Each group lists its datasets in the ``weight_names`` attribute, e.g.
  ``conv1_conv/kernel:0`` (Keras 2) or ``conv1_conv/kernel`` (Keras 3's legacy writer).
- Keras 3 native ``.weights.h5``: ``layers/<class>_<n>/vars/<i>``, named by layer class and
  position only; a converter can map it only by position (see :func:`keras3_layers_in_order`).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import numpy as np


@contextlib.contextmanager
def open_h5(path_or_h5file: str | os.PathLike | Any):
  """Yields an open ``h5py`` file for a path (closing it after), or passes an open one through."""
  import h5py  # optional dependency (extra "keras")

  if isinstance(path_or_h5file, (h5py.File, h5py.Group)):
    yield path_or_h5file
    return
  try:
    f = h5py.File(path_or_h5file, "r")
  except OSError as err:
    raise ValueError(f"{os.fspath(path_or_h5file)} is not a readable HDF5 file: {err}") from err
  with f:
    yield f


def is_keras3_weights_file(h5: Any) -> bool:
  """True for Keras 3's native ``.weights.h5`` layout (weights by layer position)."""
  root = h5["model_weights"] if "model_weights" in h5 else h5
  return "layer_names" not in root.attrs and "layers" in root and "vars" in root


def _decode(name: Any) -> str:
  return name.decode("utf8") if isinstance(name, bytes) else str(name)


def read_layer_weights(h5: Any) -> dict[str, dict[str, np.ndarray]]:
  """Reads a legacy-layout file as ``{layer: {weight: array}}``, e.g.
  ``{"conv1_conv": {"kernel": ..., "bias": ...}}``; layers without weights are left out.

  Weight names drop their path and the ``:0`` suffix. Raises ``ValueError`` for a Keras 3
  ``.weights.h5`` file, which has no layer names.
  """
  import h5py

  if is_keras3_weights_file(h5):
    raise ValueError(
        "this is a Keras 3 '.weights.h5' file, which stores weights by layer position, not by "
        "layer name; save the model in the legacy HDF5 format (model.save('model.h5')) or use "
        "the Keras applications' weight files.")
  root = h5["model_weights"] if "model_weights" in h5 else h5
  layers = ([_decode(n) for n in root.attrs["layer_names"]] if "layer_names" in root.attrs
            else list(root.keys()))
  out: dict[str, dict[str, np.ndarray]] = {}
  for layer in layers:
    if layer not in root or not isinstance(root[layer], h5py.Group):
      continue
    group = root[layer]
    if "weight_names" in group.attrs:
      names = [_decode(n) for n in group.attrs["weight_names"]]
    else:
      names = []
      group.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    weights = {name.split("/")[-1].split(":")[0]: np.asarray(group[name][()]) for name in names}
    if weights:
      out[layer] = weights
  return out


def keras3_layers_in_order(h5: Any, layer_class: str) -> list[list[np.ndarray]]:
  """The ``vars`` of every ``layers/<layer_class>[_<n>]`` group of a Keras 3 ``.weights.h5``
  file, in creation order (``conv2d``, ``conv2d_1``, ...); each entry lists ``vars/0, 1, ...``.
  """
  layers = h5["layers"]
  names = [n for n in layers if re.fullmatch(re.escape(layer_class) + r"(_\d+)?", n)]
  names.sort(key=lambda n: int(n.rsplit("_", 1)[1]) if n != layer_class else 0)
  out = []
  for name in names:
    variables = layers[name].get("vars", {})
    out.append([np.asarray(variables[k][()]) for k in sorted(variables, key=int)])
  return out


def keras3_weighted_layers(h5: Any) -> list[str]:
  """Names of the layers of a Keras 3 ``.weights.h5`` file that hold any weight."""
  layers = h5["layers"]
  return [n for n in layers if len(layers[n].get("vars", {})) > 0]
