"""Cost of regional pooling relative to global GeM on the same feature map.

A 1024x768 image at stride 32 gives a 24x32 map; with C = 2048 (ResNet-50/101 conv5) this
measures, jitted, the time of ``regional_pool`` on the L = 3 R-MAC grid (20 regions + the full
map) and on REMAP's 40-region grid (L = 4 without the full map), each as a ratio to ``gem`` on
the same map, plus ``rmac`` and the masked (bucketed) variants. Ratios are what to compare
across machines; the absolute times are printed for context only.

Run:  python benchmarks/pooling.py [--batch 1] [--channels 2048] [--repeats 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import harness
from retrieval_jax import pooling
from retrieval_jax.regions import rmac_regions

BASELINE = "gem (baseline)"
QUICK = ["--repeats", "30"]
FULL = ["--repeats", "200"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--channels", type=int, default=2048)
  parser.add_argument("--height", type=int, default=768, help="input image height in pixels")
  parser.add_argument("--width", type=int, default=1024, help="input image width in pixels")
  parser.add_argument("--stride", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def run(args: argparse.Namespace) -> list[dict]:
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
      BASELINE: (jax.jit(pooling.gem), x),
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
  times = harness.round_robin(
      {name: (lambda fn=fn, inputs=inputs: jax.block_until_ready(fn(*inputs)))
       for name, (fn, *inputs) in cases.items()}, repeats=args.repeats)
  seconds = {name: harness.median(t) for name, t in times.items()}
  base = seconds[BASELINE]
  shape = f"[{args.batch},{h},{w},{args.channels}]"
  return [harness.row(f"{name} {shape}", s / base, "time / global gem", 1e3 * s, "ms",
                      operation=name, seconds=s, shape=[args.batch, h, w, args.channels])
          for name, s in seconds.items() if name != BASELINE]


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  h, w = args.height // args.stride, args.width // args.stride
  print(f"feature map [B={args.batch}, H={h}, W={w}, C={args.channels}] "
        f"({args.height}x{args.width} px at stride {args.stride}); backend "
        f"{jax.default_backend()} x{jax.device_count()}; median of {args.repeats} runs")
  print(f"{'operation':<44} {'ratio to gem':>12} {'ms':>9}")
  base_ms = rows[0]["value"] / rows[0]["ratio"] if rows else float("nan")
  print(f"{BASELINE:<44} {1.0:>12.2f} {base_ms:>9.3f}")
  for r in rows:
    print(f"{r['operation']:<44} {r['ratio']:>12.2f} {r['value']:>9.3f}")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("pooling", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
