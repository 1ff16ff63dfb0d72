"""DepthwiseConv equals XLA's grouped convolution with TF "SAME" padding."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from retrieval_jax.models.layers import DepthwiseConv


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
