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

    python benchmarks/train_step.py [--steps 10] [--batch 4]

Printed: tuples/s per device count and the ratio to 1 device; mining seconds and share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
  parser.add_argument("--batch", type=int, default=4, help="tuples per step (global)")
  parser.add_argument("--size", type=int, default=128, help="input side in pixels")
  parser.add_argument("--query-size", type=int, default=120)
  parser.add_argument("--pool-size", type=int, default=300)
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    print(json.dumps(_measure(args.child, args.steps, args.batch, args.size, args.query_size,
                              args.pool_size)))
    return
  results = {}
  for devices in (1, 4):
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(devices), "--steps", str(args.steps),
         "--batch", str(args.batch), "--size", str(args.size), "--query-size",
         str(args.query_size), "--pool-size", str(args.pool_size)],
        check=True, capture_output=True, text=True)
    results[devices] = json.loads(out.stdout.strip().splitlines()[-1])
  base = results[1]["tuples_per_s"]
  print(f"triplet step, EfficientNet-Lite0 + GeM, {args.size}x{args.size}, batch {args.batch} "
        f"tuples (3 images each), {os.cpu_count()} CPUs")
  print(f"{'devices':>8} {'tuples/s':>9} {'ratio to 1':>11} {'first step (compile) s':>23}")
  for devices, r in results.items():
    print(f"{devices:>8} {r['tuples_per_s']:>9.2f} {r['tuples_per_s'] / base:>11.2f} "
          f"{r['first_step_s']:>23.1f}")
  r = results[1]
  print(f"mining per epoch ({args.query_size} queries + pool {args.pool_size}, described and "
        f"mined): {r['mining_s']:.1f} s vs the epoch's steps {r['epoch_steps_s']:.1f} s -> "
        f"{100 * r['mining_share']:.0f} % of the epoch")


if __name__ == "__main__":
  main()
