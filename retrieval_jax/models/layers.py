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


def explicit_padding(padding: Any, size_hw: tuple[int, int], k: int,
                     s: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """``((top, bottom), (left, right))`` of ``"SAME"`` (TF rule), ``"VALID"`` or explicit pads."""
  if padding == "SAME":
    return _same_padding(size_hw[0], k, s), _same_padding(size_hw[1], k, s)
  if padding == "VALID":
    return (0, 0), (0, 0)
  (top, bottom), (left, right) = padding
  return (int(top), int(bottom)), (int(left), int(right))


def shifted_taps(x: jax.Array, k: int, stride: int, padding: Any) -> list[jax.Array]:
  """The ``k^2`` inputs of a ``k x k`` convolution, one per kernel cell in row-major order:
  ``[B, H, W, C] -> k^2 x [B, H', W', C]``, tap ``(i, j)`` meeting kernel cell ``(i, j)``."""
  (top, bottom), (left, right) = explicit_padding(padding, x.shape[1:3], k, stride)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  return [x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride, :]
          for i, j in np.ndindex(k, k)]


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
    y = None
    for (i, j), tap in zip(np.ndindex(k, k), shifted_taps(x, k, s, "SAME")):
      y = tap * kernel[i, j, 0] if y is None else y + tap * kernel[i, j, 0]
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(
          self.dtype)
    return y


# im2col columns (k * k * input channels) up to which a convolution runs as one matrix product:
# the 3x3 stems on RGB input (27 columns), where XLA's CPU convolution is slowest.
IM2COL_MAX_COLUMNS = 32


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Any) -> jax.Array:
  """A convolution as one matrix product over its ``k x k`` patches (im2col).

  ``[B, H, W, C], [k, k, C, O] -> [B, H', W', O]``, the same result as
  ``lax.conv_general_dilated`` with NHWC / HWIO layouts. The patch tensor is ``k^2`` times the
  input, so this pays only for few input channels.
  """
  # Columns ordered (row, column, channel): the row-major flattening of the HWIO kernel.
  patches = jnp.concatenate(shifted_taps(x, kernel.shape[0], stride, padding), axis=-1)
  return jnp.einsum("bhwc,co->bhwo", patches, kernel.reshape(-1, kernel.shape[-1]))


class Conv(nn.Module):
  """``nn.Conv`` with the same parameters (HWIO ``kernel``, optional ``bias``) and results, that
  runs ``1 x 1`` kernels and convolutions of few input channels as matrix products.

  XLA's CPU backend runs a ``1 x 1`` convolution 1.1-5x slower than the equivalent ``dot``
  (measured on ResNet-50's bottleneck shapes, batch 8), and ResNet and EfficientNet spend most
  of their FLOPs there; a strided ``1 x 1`` convolution without padding is a subsampled matrix
  product. A kernel with at most ``IM2COL_MAX_COLUMNS`` patch entries (EfficientNet-Lite's
  3x3 stem on RGB) runs as :func:`im2col_conv`: 1.26-2.5x faster than XLA's convolution for
  Lite0's stem at 224-512 px, batch 2-8 (``benchmarks/cpu_kernels.py`` times each layer). Other
  kernels go to ``lax.conv_general_dilated``.

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
    elif groups == 1 and k * k * x.shape[-1] <= IM2COL_MAX_COLUMNS:
      y = im2col_conv(x, kernel, s, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y
