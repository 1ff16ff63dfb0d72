"""Cost of each retrieval head relative to global GeM, and to the backbone that feeds them.

ResNet-50 at 1024x768 (one image, jitted, float32) gives stage3 [48x64x1024] and stage4
[24x32x2048]; each head runs jitted on those maps: global GeM (the baseline), R-MAC (L = 3,
21 regions), R-GAC (GeM regions), REMAP (40 regions on each of 2 taps, with the FC) and DARAC
(21 regions x max and average, 42 vectors). Reported: each head's time as a ratio to the GeM
head's (heads timed in turns, so load drift hits them alike) and as a percentage of the
backbone's time (what a regional head adds to the extraction of one image).

Run:  python benchmarks/heads.py [--repeats 5] [--head-repeats 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import harness
from retrieval_jax import models

BASELINE = "GeM (global)"
QUICK = ["--repeats", "3", "--head-repeats", "30"]
FULL = ["--repeats", "10", "--head-repeats", "200"]


def random_variables(module, *example, rng: np.random.Generator):
  """Random variables of ``module`` without compiling its init: shapes from ``eval_shape``,
  values from numpy (weights do not change the speed)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes)
  if "batch_stats" in variables:  # positive variances keep the activations finite
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
  return variables


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed backbone runs")
  parser.add_argument("--head-repeats", type=int, default=40, help="timed rounds of the heads")
  parser.add_argument("--height", type=int, default=768)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def run(args: argparse.Namespace) -> list[dict]:
  rng = np.random.default_rng(0)
  backbone = models.build_backbone("resnet50", taps=("stage3", "stage4"))
  image = jnp.asarray(rng.normal(size=(1, args.height, args.width, 3)).astype(np.float32))
  bb_vars = random_variables(backbone, jnp.zeros((1, 64, 64, 3)), rng=rng)
  backbone_fn = jax.jit(backbone.apply)
  taps = backbone_fn(bb_vars, image)
  backbone_s = harness.median(harness.round_robin(
      {"backbone": lambda: jax.block_until_ready(backbone_fn(bb_vars, image))},
      repeats=args.repeats)["backbone"])
  last = taps["stage4"]

  heads = {
      BASELINE: (models.GlobalPoolHead("gem"), (last,)),
      "R-MAC, L=3 (21 regions)": (models.RegionalHead("max", levels=3), (last,)),
      "R-GAC, L=3 (21 regions, GeM)": (models.RegionalHead("gem", levels=3), (last,)),
      "REMAP, 40 regions x 2 taps + FC": (
          models.RemapHead(levels=4, out_dims=3072), ([taps["stage3"], taps["stage4"]],)),
      "DARAC, 21 regions x (max, avg)": (models.DaracHead(levels=3), (last,)),
  }
  cases = {}
  for name, (head, inputs) in heads.items():
    variables = random_variables(head, *inputs, rng=rng)
    fn = jax.jit(head.apply)
    cases[name] = lambda fn=fn, v=variables, inputs=inputs: jax.block_until_ready(fn(v, *inputs))
  seconds = {name: harness.median(t)
             for name, t in harness.round_robin(cases, repeats=args.head_repeats).items()}
  base = seconds[BASELINE]
  size = f"{args.width}x{args.height}"
  rows = [harness.row(f"{name} at {size}", s / base, "time / global GeM head", 1e3 * s, "ms",
                      detail=f"{100 * s / backbone_s:.2f}% of ResNet-50",
                      head=name, percent_of_backbone=100 * s / backbone_s)
          for name, s in seconds.items()]
  rows.append(harness.row(f"ResNet-50 backbone at {size}", backbone_s / base,
                          "time / global GeM head", 1e3 * backbone_s, "ms",
                          head="backbone", stage4_shape=list(last.shape)))
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  backbone = rows[-1]
  print(f"ResNet-50 at {args.width}x{args.height}: {backbone['value']:.1f} ms per image "
        f"(backend {jax.default_backend()}); stage4 {tuple(backbone['stage4_shape'])}")
  print(f"{'head':<34} {'ms':>8} {'ratio to GeM':>13} {'% of backbone':>14}")
  for r in rows[:-1]:
    print(f"{r['head']:<34} {r['value']:>8.2f} {r['ratio']:>13.2f} "
          f"{r['percent_of_backbone']:>13.2f}%")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("heads", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
