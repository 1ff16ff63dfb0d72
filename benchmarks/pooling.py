"""Cost of regional pooling relative to global GeM on the same feature map.

A 1024x768 image at stride 32 gives a 24x32 map; with C = 2048 (ResNet-50/101 conv5) this
measures, jitted, the time of ``regional_pool`` on the L = 3 R-MAC grid (20 regions + the full
map) and on REMAP's 40-region grid (L = 4 without the full map), each as a ratio to ``gem`` on
the same map, plus ``rmac`` and the masked (bucketed) variants. Ratios are what to compare
across machines; the absolute times are printed for context only.

Run:  python benchmarks/pooling.py [--batch 1] [--channels 2048] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import pooling
from retrieval_jax.regions import rmac_regions


def _median_seconds(cases: dict, repeats: int) -> dict[str, float]:
  """Median time per case; cases run round-robin so machine drift hits them all alike."""
  for fn, *inputs in cases.values():
    jax.block_until_ready(fn(*inputs))  # compile and warm up
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, *inputs) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--channels", type=int, default=2048)
  parser.add_argument("--height", type=int, default=768, help="input image height in pixels")
  parser.add_argument("--width", type=int, default=1024, help="input image width in pixels")
  parser.add_argument("--stride", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()

  h, w = args.height // args.stride, args.width // args.stride
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.standard_normal((args.batch, h, w, args.channels)), 0),
                  jnp.float32)
  rmac_grid = rmac_regions(h, w, 3)
  remap_grid = rmac_regions(h, w, 4)[1:]
  # A bucket one cell larger each way, so the masked variants do real masking work.
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  mask = jnp.zeros(padded.shape[:3], bool).at[:, :h, :w].set(True)

  cases = {
      "gem (baseline)": (jax.jit(pooling.gem), x),
      f"regional_pool max, L=3 grid ({len(rmac_grid)} regions)":
          (jax.jit(lambda v: pooling.regional_pool(v, rmac_grid, "max")), x),
      f"regional_pool gem, L=3 grid ({len(rmac_grid)} regions)":
          (jax.jit(lambda v: pooling.regional_pool(v, rmac_grid, "gem")), x),
      f"regional_pool max, REMAP grid ({len(remap_grid)} regions)":
          (jax.jit(lambda v: pooling.regional_pool(v, remap_grid, "max")), x),
      f"regional_pool gem, REMAP grid ({len(remap_grid)} regions)":
          (jax.jit(lambda v: pooling.regional_pool(v, remap_grid, "gem")), x),
      "rmac L=3": (jax.jit(pooling.rmac), x),
      "rmac L=3, masked bucket": (jax.jit(lambda v, m: pooling.rmac(v, mask=m)), padded, mask),
      "gem, masked bucket": (jax.jit(lambda v, m: pooling.gem(v, mask=m)), padded, mask),
  }
  results = _median_seconds(cases, args.repeats)
  base = results["gem (baseline)"]

  print(f"feature map [B={args.batch}, H={h}, W={w}, C={args.channels}] "
        f"({args.height}x{args.width} px at stride {args.stride}); backend "
        f"{jax.default_backend()} x{jax.device_count()}; median of {args.repeats} runs")
  print(f"{'operation':<44} {'ratio to gem':>12} {'ms':>9}")
  for name, seconds in results.items():
    print(f"{name:<44} {seconds / base:>12.2f} {seconds * 1e3:>9.3f}")
  if args.json:
    report = {"machine": platform.platform(), "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "shape": [args.batch, h, w, args.channels],
              "seconds": results, "ratio_to_gem": {k: v / base for k, v in results.items()}}
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
