"""Training throughput of the demo model: triplet-step tuples/s on 1 vs 4 devices, and mining's
share of an epoch.

The model is ``configs/demo.py``'s (ImageNet EfficientNet-Lite0 + GeM, 128 x 128 inputs, frozen
batch norm); the step is :func:`retrieval_jax.training.make_triplet_step` with one negative per
tuple (anchor, positive, negative), Adam, the state donated. Each device count runs in its own
process, because ``--xla_force_host_platform_device_count`` is read once when jax starts; on a
CPU the forced devices share the same cores, so the 4-device figure measures the cost of the
data-parallel program (per-device programs, gradient all-reduce), not a speed-up.

Mining: per epoch the demo describes ``query_size`` queries and a ``pool_size`` pool with the
current model and picks hard negatives (:func:`retrieval_jax.mining.mine_negatives`); the share is
that time over (that time + the epoch's steps).

    python benchmarks/train_step.py [--steps 10] [--batch 4] [--json out.json]

Printed: tuples/s per device count and the ratio to 1 device; mining seconds and share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness

QUICK = ["--steps", "5", "--query-size", "64", "--pool-size", "192"]
FULL = ["--steps", "30", "--batch", "16", "--query-size", "600", "--pool-size", "3000"]


def _measure(devices: int, steps: int, batch: int, size: int, query_size: int,
             pool_size: int) -> dict:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from retrieval_jax import Retriever, losses, mining
  from retrieval_jax.data.buckets import pad_batch
  from retrieval_jax.training import (create_train_state, data_mesh, make_optimizer,
                                      make_triplet_step, shard_batch, sum_and_count)
  from retrieval_jax.training.optimizers import default_optimizer_config

  retriever = Retriever.from_pretrained("efficientnet-lite0", pooling="gem")
  opt = default_optimizer_config()
  opt.learning_rate = 1e-5
  tx = make_optimizer(opt, steps_per_epoch=max(1, query_size // batch))
  state = create_train_state(retriever.variables, tx, 0)

  def loss_fn(anchors, positives, negatives, valid):
    per_tuple = losses.triplet_loss(anchors, positives, negatives[:, 0], margin=0.1,
                                    reduction="none")
    return sum_and_count(per_tuple, valid)

  mesh = data_mesh()
  step = make_triplet_step(retriever.embed, loss_fn, tx, mesh)
  rng = np.random.default_rng(0)
  host_batch = {"pixels": rng.integers(0, 256, (batch, 3, size, size, 3), dtype=np.uint8),
                "mask": np.ones((batch, 3, size, size), bool),
                "valid": np.ones((batch,), bool)}
  batch_on_device = shard_batch(host_batch, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch_on_device)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  # A second untimed step: the first one's output state carries the mesh sharding, which the
  # freshly created state did not, and may trigger one more compilation.
  state, metrics = step(state, shard_batch(host_batch, mesh))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, shard_batch(host_batch, mesh))
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps

  result = {"devices": devices, "tuples_per_s": batch / step_s, "step_s": step_s,
            "first_step_s": compile_s}
  if devices == 1:
    # Describe the epoch's queries and pool with the current model, then mine.
    images = rng.integers(0, 256, (query_size + pool_size, size, size, 3), dtype=np.uint8)
    chunk = 64
    describe = jax.jit(retriever.embed)
    variables = state.variables
    jax.block_until_ready(describe(variables, *pad_batch(images[:chunk], (size, size), chunk)))
    start = time.perf_counter()
    desc = np.concatenate([
        np.asarray(describe(variables, *pad_batch(images[i:i + chunk], (size, size), chunk)))
        [:len(images[i:i + chunk])] for i in range(0, len(images), chunk)])
    # The synthetic small preset's 60 training clusters.
    mining.mine_negatives(desc[:query_size], desc[query_size:],
                          rng.integers(0, 60, query_size), rng.integers(0, 60, pool_size), 5)
    mining_s = time.perf_counter() - start
    epoch_steps_s = step_s * query_size / batch
    result.update({"mining_s": mining_s, "epoch_steps_s": epoch_steps_s,
                   "mining_share": mining_s / (mining_s + epoch_steps_s)})
  return result


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
  parser.add_argument("--batch", type=int, default=4, help="tuples per step (global)")
  parser.add_argument("--size", type=int, default=128, help="input side in pixels")
  parser.add_argument("--query-size", type=int, default=120)
  parser.add_argument("--pool-size", type=int, default=300)
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 4],
                      help="forced device counts; the first is the baseline")
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child-out", help=argparse.SUPPRESS)
  return parser


def run(args: argparse.Namespace) -> list[dict]:
  results = {}
  for devices in args.devices:
    with tempfile.TemporaryDirectory(prefix="train_step_bench.") as tmp:
      out = os.path.join(tmp, "result.json")
      # A fresh process per device count: XLA reads the forced count once, at start-up.
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--child", str(devices), "--child-out",
           out, "--steps", str(args.steps), "--batch", str(args.batch), "--size",
           str(args.size), "--query-size", str(args.query_size), "--pool-size",
           str(args.pool_size)], capture_output=True, text=True)
      if proc.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"the {devices}-device process failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
      with open(out) as f:
        results[devices] = json.load(f)
  base_devices = args.devices[0]
  base = results[base_devices]["tuples_per_s"]
  setting = f"Lite0+GeM {args.size}px, {args.batch} tuples/step"
  rows = [harness.row(f"triplet step, {devices} forced CPU device(s), {setting}",
                      r["tuples_per_s"] / base, f"tuples/s / {base_devices} device",
                      r["tuples_per_s"], "tuples/s",
                      detail=f"first step {r['first_step_s']:.1f} s", **r)
          for devices, r in results.items()]
  if "mining_share" in results[base_devices]:
    r = results[base_devices]
    rows.append(harness.row(
        f"mining share of an epoch ({args.query_size} q + {args.pool_size} pool)",
        r["mining_share"], "mining / (mining + steps)", r["mining_s"], "s",
        detail=f"epoch steps {r['epoch_steps_s']:.1f} s", **r))
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  print(f"triplet step, EfficientNet-Lite0 + GeM, {args.size}x{args.size}, batch {args.batch} "
        f"tuples (3 images each), {os.cpu_count()} CPUs")
  print(f"{'devices':>8} {'tuples/s':>9} {'ratio to 1':>11} {'first step (compile) s':>23}")
  for r in rows[:len(args.devices)]:
    print(f"{r['devices']:>8} {r['tuples_per_s']:>9.2f} {r['ratio']:>11.2f} "
          f"{r['first_step_s']:>23.1f}")
  if len(rows) > len(args.devices):
    r = rows[-1]
    print(f"mining per epoch ({args.query_size} queries + pool {args.pool_size}, described and "
          f"mined): {r['mining_s']:.1f} s vs the epoch's steps {r['epoch_steps_s']:.1f} s -> "
          f"{100 * r['mining_share']:.0f} % of the epoch")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  if args.child is not None:
    result = _measure(args.child, args.steps, args.batch, args.size, args.query_size,
                      args.pool_size)
    if args.child_out:
      harness.write_json_atomic(args.child_out, result)
    else:
      print(json.dumps(result))
    return
  rows = run(args)
  print_report(rows, args)
  harness.finish("train_step", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
