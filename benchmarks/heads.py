"""Cost of each retrieval head relative to the backbone that feeds it.

ResNet-50 at 1024x768 (one image, jitted, float32) gives stage3 [48x64x1024] and stage4
[24x32x2048]; each head runs jitted on those maps and is reported as a percentage of the
backbone's time: global GeM, R-MAC (L = 3, 21 regions), R-GAC (GeM regions), REMAP (40 regions
on each of 2 taps, with the FC) and DARAC (21 regions x max and average, 42 vectors).

Run:  python benchmarks/heads.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import models


def _median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _random_variables(module, *example, rng):
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
  return variables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--height", type=int, default=768)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  rng = np.random.default_rng(0)

  backbone = models.build_backbone("resnet50", taps=("stage3", "stage4"))
  image = jnp.asarray(rng.normal(size=(1, args.height, args.width, 3)).astype(np.float32))
  bb_vars = _random_variables(backbone, jnp.zeros((1, 64, 64, 3)), rng=rng)
  backbone_fn = jax.jit(backbone.apply)
  taps = backbone_fn(bb_vars, image)
  backbone_ms = _median_ms(backbone_fn, bb_vars, image, repeats=args.repeats)
  last = taps["stage4"]

  heads = {
      "GeM (global)": (models.GlobalPoolHead("gem"), (last,)),
      "R-MAC, L=3 (21 regions)": (models.RegionalHead("max", levels=3), (last,)),
      "R-GAC, L=3 (21 regions, GeM)": (models.RegionalHead("gem", levels=3), (last,)),
      "REMAP, 40 regions x 2 taps + FC": (
          models.RemapHead(levels=4, out_dims=3072), ([taps["stage3"], taps["stage4"]],)),
      "DARAC, 21 regions x (max, avg)": (models.DaracHead(levels=3), (last,)),
  }
  rows = {}
  for name, (head, inputs) in heads.items():
    variables = _random_variables(head, *inputs, rng=rng)
    rows[name] = _median_ms(jax.jit(head.apply), variables, *inputs, repeats=args.repeats * 4)

  print(f"ResNet-50 at {args.height}x{args.width}: {backbone_ms:.1f} ms per image "
        f"(backend {jax.default_backend()}); stage4 {tuple(last.shape)}")
  print(f"{'head':<34} {'ms':>8} {'% of backbone':>14}")
  for name, ms in rows.items():
    print(f"{name:<34} {ms:>8.2f} {100 * ms / backbone_ms:>13.2f}%")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": platform.platform(), "jax": jax.__version__,
                 "backbone_ms": backbone_ms, "head_ms": rows}, f, indent=2)


if __name__ == "__main__":
  main()
