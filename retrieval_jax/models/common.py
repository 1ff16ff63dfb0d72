"""Conventions shared by every backbone family: batch-norm modes, taps, input preprocessing,
and folding batch norm into the preceding convolution.

Naming convention the families follow (and :func:`fold_batch_norm` relies on): a convolution
named ``"<name>"`` that is followed by batch norm has that norm named ``"<name>_bn"`` in the same
parent module. With ``norm="folded"`` the norm is absent and the convolution has a bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NormMode = Literal["frozen", "train", "folded"]
NORM_MODES = ("frozen", "train", "folded")
Preprocessing = Literal["torchvision", "efficientnet_lite", "caffe", "inception"]

# Per-channel statistics of ImageNet in RGB order, as torchvision and Keras use them.
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def check_norm_mode(norm: str) -> None:
  if norm not in NORM_MODES:
    raise ValueError(f"norm must be one of {NORM_MODES}; got {norm!r}.")


def batch_norm(norm: NormMode, train: bool, *, epsilon: float, name: str, dtype: Any,
               momentum: float = 0.9):
  """The normalisation after a convolution, as a callable ``x -> x``.

  - ``"frozen"`` (default for retrieval fine-tuning with small tuple batches, as the papers do):
    running statistics are used and never updated, even when ``train`` is True; scale and bias
    stay trainable.
  - ``"train"``: batch statistics when ``train`` is True (and running averages are updated),
    running statistics otherwise.
  - ``"folded"``: identity; the statistics and affine were folded into the preceding
    convolution's kernel and bias by :func:`fold_batch_norm` (REMAP merges BN before
    fine-tuning).
  """
  check_norm_mode(norm)
  if norm == "folded":
    return lambda x: x
  return nn.BatchNorm(use_running_average=norm == "frozen" or not train, momentum=momentum,
                      epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)


def select_taps(features: Mapping[str, jax.Array], taps: Sequence[str] | None,
                default: str, model: str):
  """Returns ``features[default]`` when ``taps`` is None, else ``{name: features[name]}``.

  Raises ``ValueError`` naming the unknown tap and listing the available ones.
  """
  if taps is None:
    return features[default]
  check_taps(taps, list(features), model)
  return {t: features[t] for t in taps}


def check_taps(taps: Sequence[str] | None, available: Sequence[str], model: str) -> None:
  """Validates tap names before any computation (lets a family stop at the last tap asked)."""
  if taps is None:
    return
  if isinstance(taps, str):
    raise ValueError(f"taps must be a sequence of names, e.g. ({taps!r},); got the string "
                     f"{taps!r}.")
  unknown = [t for t in taps if t not in available]
  if unknown:
    raise ValueError(f"{model} has no tap {unknown[0]!r}; available taps: {list(available)}.")


def preprocess(images, mode: Preprocessing, dtype: Any = jnp.float32) -> jax.Array:
  """Maps RGB images with values in [0, 255] to the input a backbone's weights expect.

  Args:
    images: ``[B, H, W, 3]`` RGB, values in [0, 255] (uint8 or float).
    mode: ``"torchvision"`` ((x/255 - mean) / std, ImageNet statistics), ``"efficientnet_lite"``
      ((x - 127) / 128, TF EfficientNet-Lite), ``"caffe"`` (RGB -> BGR minus the ImageNet BGR
      mean: Keras VGG16), ``"inception"`` (x / 127.5 - 1: Keras ResNet50V2).
    dtype: output dtype.

  Returns:
    ``[B, H, W, 3]`` in ``dtype``.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3] RGB; got shape {x.shape}.")
  if mode == "torchvision":
    x = (x / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
  elif mode == "efficientnet_lite":
    x = (x - 127.0) / 128.0
  elif mode == "caffe":
    x = x[..., ::-1] - _CAFFE_MEAN_BGR
  elif mode == "inception":
    x = x / 127.5 - 1.0
  else:
    raise ValueError(f"mode must be one of torchvision, efficientnet_lite, caffe, inception; "
                     f"got {mode!r}.")
  return x.astype(dtype)


def fold_batch_norm(variables: Mapping[str, Any], epsilon: float) -> dict[str, Any]:
  """Folds every ``"<name>_bn"`` batch norm into the convolution ``"<name>"`` before it.

  ``y = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta`` becomes one convolution with
  kernel ``k * s`` and bias ``(b - mean) * s + beta`` where ``s = gamma / sqrt(var + eps)``
  (per output channel, the kernel's last axis). The result is the ``params`` of the same
  architecture built with ``norm="folded"``; it has no ``batch_stats``.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a model built with a BN norm mode.
    epsilon: the batch norm's epsilon (1e-5 torchvision, 1e-3 EfficientNet-Lite).

  Returns:
    ``{"params": folded params}``.
  """
  params = jax.tree_util.tree_map(np.asarray, dict(variables["params"]))
  stats = jax.tree_util.tree_map(np.asarray, dict(variables.get("batch_stats", {})))

  def fold(p: dict, s: dict, path: str) -> dict:
    out = {}
    for key, value in p.items():
      if key.endswith("_bn") and key[:-3] in p:
        continue  # consumed by its convolution below
      if isinstance(value, Mapping) and f"{key}_bn" in p and "kernel" in value:
        bn, bn_stats = p[f"{key}_bn"], s.get(f"{key}_bn")
        if bn_stats is None:
          raise ValueError(f"batch_stats has no entry for {path}{key}_bn.")
        scale = bn["scale"] / np.sqrt(bn_stats["var"] + epsilon)
        bias = value.get("bias", 0.0)
        out[key] = {"kernel": (value["kernel"] * scale).astype(np.float32),
                    "bias": ((bias - bn_stats["mean"]) * scale + bn["bias"]).astype(np.float32)}
      elif isinstance(value, Mapping):
        out[key] = fold(dict(value), dict(s.get(key, {})), f"{path}{key}/")
      else:
        out[key] = value
    return out

  return {"params": fold(params, stats, "")}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def check_source_keys(source_keys, used_keys, source: str, arch: str) -> None:
  """Raises if a checkpoint holds tensors a converter did not use (a different architecture).

  Args:
    source_keys: every tensor name in the checkpoint.
    used_keys: the names the converter consumed.
    source: what the checkpoint is, for the message (e.g. ``"torchvision state dict"``).
    arch: the architecture being converted to.
  """
  unexpected = sorted(set(source_keys) - set(used_keys))
  if unexpected:
    raise ValueError(
        f"{source} does not match {arch}: {len(unexpected)} unexpected tensor(s), first "
        f"{unexpected[:5]}; is it a checkpoint of another architecture?")


def assemble_variables(flat: Mapping[tuple[str, ...], Any], module: nn.Module,
                       input_shape: Sequence[int], source: str, arch: str) -> dict[str, Any]:
  """Builds Flax variables from converted arrays and checks them against ``module``.

  The converter maps checkpoint tensors to flat paths such as
  ``("params", "stage1_block0", "conv1", "kernel")`` (already transposed to Flax layout). This
  compares them with the variables ``module.init`` would create (shapes only, via
  ``jax.eval_shape``: nothing is computed) and raises ``ValueError`` listing the first missing
  and unexpected paths and shape mismatches.

  Args:
    flat: converted arrays by variable path (collection first).
    module: the Flax module the variables are for.
    input_shape: an input shape ``(1, H, W, 3)`` valid for the module.
    source: what the checkpoint is, for the message.
    arch: the architecture name, for the message.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (whatever collections the module has), float32
    numpy arrays.
  """
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))
  want = _flatten(expected)
  have = {tuple(k): v for k, v in flat.items()}
  missing = [("/".join(k)) for k in want if k not in have]
  unexpected = [("/".join(k)) for k in have if k not in want]
  mismatched = [f"{'/'.join(k)}: {tuple(np.shape(v))} != {tuple(want[k].shape)}"
                for k, v in have.items() if k in want and tuple(np.shape(v)) != want[k].shape]
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing, first {missing[:5]}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected, first {unexpected[:5]}")
    if mismatched:
      parts.append(f"{len(mismatched)} with wrong shapes (got != expected), first "
                   f"{mismatched[:5]}")
    raise ValueError(f"{source} does not convert to {arch}: " + "; ".join(parts) + ".")
  return _unflatten({k: np.asarray(v, np.float32) for k, v in have.items()})
