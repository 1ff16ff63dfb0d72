"""The shared layers: DepthwiseConv equals XLA's grouped convolution with TF "SAME" padding;
Conv (1x1 as a product, few-channel kernels as im2col) equals a direct numpy convolution."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from retrieval_jax.models.layers import IM2COL_MAX_COLUMNS, Conv, DepthwiseConv


@pytest.mark.parametrize("size,kernel,stride", [((9, 13), 3, 1), ((9, 13), 3, 2),
                                                ((10, 7), 5, 2), ((4, 4), 5, 1), ((1, 6), 3, 2)])
def test_depthwise_equals_grouped_conv(rng, size, kernel, stride):
  x = rng.normal(size=(2, *size, 6)).astype(np.float32)
  reference = nn.Conv(6, (kernel, kernel), (stride, stride), padding="SAME",
                      feature_group_count=6, use_bias=True)
  variables = reference.init(jax.random.PRNGKey(0), x)
  variables = {"params": {"kernel": variables["params"]["kernel"],
                          "bias": rng.normal(size=6).astype(np.float32)}}
  want = reference.apply(variables, x)
  got = DepthwiseConv(kernel, stride, use_bias=True).apply(variables, x)
  assert got.shape == want.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _numpy_conv(x, kernel, stride, pads):
  """Cross-correlation written out: every output cell is a patch times the kernel."""
  (top, bottom), (left, right) = pads
  x = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  k = kernel.shape[0]
  out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
  return out


# Every path of Conv: im2col (k^2 C <= IM2COL_MAX_COLUMNS: the first four), the strided 1x1
# product, and XLA's convolution (3 x 3 x 4 = 36 columns).
@pytest.mark.parametrize("size,kernel,channels,stride,padding", [
    ((9, 13), 3, 3, 2, "SAME"), ((10, 7), 3, 3, 1, "SAME"), ((10, 7), 3, 3, 2, "VALID"),
    ((8, 8), 5, 1, 2, ((2, 1), (0, 3))), ((9, 9), 1, 8, 2, "SAME"), ((9, 9), 3, 4, 1, "SAME")])
def test_conv_paths_equal_a_direct_convolution(rng, size, kernel, channels, stride, padding):
  assert IM2COL_MAX_COLUMNS == 32  # the parameters above are chosen around this limit
  x = rng.normal(size=(2, *size, channels)).astype(np.float32)
  layer = Conv(5, kernel, stride, padding, use_bias=True)
  w = rng.normal(size=(kernel, kernel, channels, 5)).astype(np.float32)
  b = rng.normal(size=5).astype(np.float32)
  got = layer.apply({"params": {"kernel": w, "bias": b}}, x)
  if padding == "SAME":  # TF: output ceil(size / stride), the odd padding element after
    pads = []
    for n in size:
      total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
      pads.append((total // 2, total - total // 2))
  elif padding == "VALID":
    pads = [(0, 0), (0, 0)]
  else:
    pads = padding
  want = _numpy_conv(x, w, stride, pads) + b
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
