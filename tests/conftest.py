"""Test set-up: four CPU devices, so multi-device code runs on any machine.

XLA reads ``XLA_FLAGS`` once, when the backend starts, so the flag is set here, before any test
module imports jax.
"""

import os

_FORCE_DEVICES = "--xla_force_host_platform_device_count=4"
if _FORCE_DEVICES.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FORCE_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# torchvision (parity tests) must load before TensorFlow (TFDS builders, ScaNN's op library):
# torchvision.models imports triton, whose native library segfaults when TensorFlow 2.20 is
# already loaded, while the other order works. Collection imports test modules alphabetically,
# so settle the order here.
try:
  import torchvision.models  # noqa: E402, F401
except ImportError:
  pass

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests compile new shapes; keep them bounded and free of wall-clock deadlines.
settings.register_profile("retrieval_jax", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("retrieval_jax")


@pytest.fixture
def rng() -> np.random.Generator:
  """A fixed-seed generator per test, so every test is deterministic on its own."""
  return np.random.default_rng(0)



@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops jax's compiled programs after each test module: most are closures of that module
  alone, and a worker that kept them all grew by about 4 GB over the suite."""
  yield
  jax.clear_caches()
