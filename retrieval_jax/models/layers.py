"""Layers shared by the backbone families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF "SAME": output ``ceil(size / stride)``, the odd padding element after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """A ``k x k`` depthwise convolution with TF "SAME" padding, as a sum of shifted products.

  Same parameters as ``nn.Conv(C, (k, k), feature_group_count=C)`` (``kernel [k, k, 1, C]``,
  optional ``bias [C]``), so converters and batch-norm folding treat it as a convolution. XLA's
  CPU backend runs grouped convolutions with one group per channel far slower than the
  ``k^2`` fused multiply-adds written out here; on accelerators both are memory bound.

  ``[B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), C]``.
  """
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    (top, bottom), (left, right) = (_same_padding(x.shape[1], k, s),
                                    _same_padding(x.shape[2], k, s))
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - k) // s + 1
    out_w = (x.shape[2] - k) // s + 1
    y = None
    for i in range(k):
      for j in range(k):
        tap = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :] * kernel[i, j, 0]
        y = tap if y is None else y + tap
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(
          self.dtype)
    return y


class Conv(nn.Module):
  """``nn.Conv`` with the same parameters (HWIO ``kernel``, optional ``bias``) and results, that
  runs ``1 x 1`` kernels as a matrix product.

  XLA's CPU backend runs a ``1 x 1`` convolution 1.1-5x slower than the equivalent ``dot``
  (measured on ResNet-50's bottleneck shapes, batch 8), and ResNet and EfficientNet spend most
  of their FLOPs there; a strided ``1 x 1`` convolution without padding is a subsampled matrix
  product. Other kernels go to ``lax.conv_general_dilated``.

  ``[B, H, W, C] -> [B, H', W', features]``.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = "SAME"  # "SAME" (TF rule), "VALID", or ((top, bottom), (left, right))
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, groups = self.kernel_size, self.stride, self.feature_group_count
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1] // groups, self.features),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    unpadded = self.padding in ("SAME", "VALID") or np.all(np.asarray(self.padding) == 0)
    if k == 1 and groups == 1 and unpadded:
      y = jnp.einsum("bhwc,co->bhwo", x[:, ::s, ::s], kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y
