import jax


def test_four_cpu_devices_are_forced():
  # conftest.py sets XLA_FLAGS before jax starts; multi-device tests rely on it.
  assert jax.device_count() == 4
  assert all(d.platform == "cpu" for d in jax.devices())
