"""A tiny retrieval model, losses and batches for the step tests, and the worker that trains it
in one process of a multi-process ``jax.distributed`` run.

As a module (``import distributed_worker``) it only defines the model and data, so the tests
compute single-process references with exactly the same code. As a script:

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FILE

it joins ``localhost:PORT`` (CPU collectives: gloo), feeds its own rows of each global batch
with ``jax.make_array_from_process_local_data``, takes two batch-hard steps (all-gathered global
batch) and two tuple steps, and (process 0) writes losses and final params to ``OUT_FILE``
(``.npz``). The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=<local devices>``.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZE = 8  # image side
DIMS = 3  # descriptor dimension
MARGIN = 0.7


class Backbone(nn.Module):
  """A conv and a frozen-statistics batch norm: params and a ``batch_stats`` collection."""

  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not self.train, momentum=0.5)(x)
    return nn.relu(x)


class Head(nn.Module):
  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    return nn.Dense(DIMS)(pooled)


def init_variables(seed: int = 0) -> dict[str, Any]:
  """``{"backbone": {"params", "batch_stats"}, "head": {"params"}}``, as a Retriever has."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  backbone = jax.jit(Backbone().init)(k1, jnp.zeros((1, SIZE, SIZE, 3)))
  head = jax.jit(Head().init)(k2, jnp.zeros((1, 4)))
  # Non-trivial running statistics, so that the frozen batch norm does something.
  stats = jax.tree_util.tree_map(lambda x: x + 0.1, backbone["batch_stats"])
  return {"backbone": {"params": backbone["params"], "batch_stats": stats},
          "head": {"params": head["params"]}}


def _describe(variables, pixels, mask, train: bool):
  """uint8 ``[B, H, W, 3]``, bool ``[B, H, W]`` -> L2-normalised ``[B, DIMS]``."""
  x = jnp.where(mask[..., None], pixels.astype(jnp.float32) / 255.0, 0.0)
  if train:
    maps, updates = Backbone(train=True).apply(variables["backbone"], x,
                                               mutable=["batch_stats"])
  else:
    maps, updates = Backbone().apply(variables["backbone"], x), None
  weights = mask[..., None].astype(maps.dtype)
  pooled = jnp.sum(maps * weights, (1, 2)) / jnp.maximum(jnp.sum(weights, (1, 2)), 1.0)
  out = Head().apply(variables["head"], pooled)
  out = out / (jnp.linalg.norm(out, axis=-1, keepdims=True) + 1e-6)
  return out, updates


def embed(variables, pixels, mask):
  """The Retriever ``describe`` shape, frozen batch norm."""
  return _describe(variables, pixels, mask, train=False)[0]


def embed_train_bn(variables, pixels, mask):
  """Batch norm in training mode: returns ``(descriptors, new model_state)``."""
  out, updates = _describe(variables, pixels, mask, train=True)
  return out, {"backbone": dict(updates), "head": {}}


def _sq_dist(a, b):
  return jnp.sum(jnp.square(a - b), axis=-1)


def tuple_contrastive(tuples, valid):
  """Contrastive loss (survey Eq. 2.16) of (q, p, n_1..n_k) tuples; mean over pairs."""
  from retrieval_jax.training import sum_and_count
  q = tuples[:, :1]
  d = jnp.sqrt(_sq_dist(q, tuples[:, 1:]) + 1e-12)  # [t, 1 + k]
  values = jnp.concatenate([0.5 * d[:, :1] ** 2,
                            0.5 * jnp.maximum(MARGIN - d[:, 1:], 0.0) ** 2], axis=1)
  return sum_and_count(values, valid)


def batch_hard(embeddings, labels, valid):
  """Batch-hard triplet loss over every pair of the batch; mean over anchors with a positive."""
  d = _sq_dist(embeddings[:, None], embeddings[None, :])
  same = labels[:, None] == labels[None, :]
  pair_ok = valid[:, None] & valid[None, :] & ~jnp.eye(len(labels), dtype=bool)
  pos = jnp.max(jnp.where(same & pair_ok, d, -jnp.inf), axis=1)
  neg = jnp.min(jnp.where(~same & pair_ok, d, jnp.inf), axis=1)
  anchors = valid & jnp.isfinite(pos) & jnp.isfinite(neg)
  values = 0.5 * jnp.maximum(MARGIN + jnp.where(anchors, pos - neg, 0.0), 0.0)
  return jnp.sum(jnp.where(anchors, values, 0.0)), jnp.sum(anchors.astype(jnp.int32))


def tuple_batch(seed: int, tuples: int, width: int, pad: int = 0) -> dict[str, np.ndarray]:
  """Random tuples ``[T, width, 8, 8, 3]``; the last ``pad`` tuples are invalid padding, and
  every image has a ragged valid region (bucket padding at the bottom/right)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (tuples, width, SIZE, SIZE, 3), dtype=np.uint8)
  mask = np.ones((tuples, width, SIZE, SIZE), bool)
  heights = rng.integers(4, SIZE + 1, (tuples, width))
  for idx in np.ndindex(tuples, width):
    mask[idx][heights[idx]:] = False
  valid = np.arange(tuples) < tuples - pad
  pixels[~valid] = 0
  mask[~valid] = False  # padding: empty images
  return {"pixels": pixels, "mask": mask, "valid": valid}


def labelled_batch(seed: int, images: int, classes: int, pad: int = 0) -> dict[str, np.ndarray]:
  """Random labelled images ``[B, 8, 8, 3]`` for batch losses; the last ``pad`` are padding."""
  batch = tuple_batch(seed, images, 1, pad)
  rng = np.random.default_rng(seed + 1000)
  return {"pixels": batch["pixels"][:, 0], "mask": batch["mask"][:, 0], "valid": batch["valid"],
          "labels": rng.integers(0, classes, images).astype(np.int32)}


def train(mesh, batches_hard, batches_tuple) -> dict[str, np.ndarray]:
  """Two batch-hard steps (gathered), then two tuple steps, from the same initial state; each
  process passes its ``local_rows`` of every global batch. Returns the losses, gradient norms
  and final params (``"/"``-joined paths)."""
  from retrieval_jax.training import (create_train_state, make_batch_step, make_optimizer,
                                      make_tuple_step)
  # SGD: its update is proportional to the gradient, so a gradient counted N times (one per
  # device) shows in the params; Adam's update would hide it (scale invariance).
  tx = make_optimizer({"optimizer": "sgd", "learning_rate": 0.5, "momentum": 0.9,
                       "lr_decay": 0.0}, steps_per_epoch=10)
  state = create_train_state(init_variables(), tx, rng=0)
  hard = make_batch_step(embed, batch_hard, tx, mesh)
  tup = make_tuple_step(embed, lambda t, v: tuple_contrastive(t, v), tx, mesh)
  losses, grad_norms = [], []
  for step, batches in ((hard, batches_hard), (tup, batches_tuple)):
    for batch in batches:
      state, metrics = step(state, local_rows(batch))
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return {"losses": np.asarray(losses), "grad_norms": np.asarray(grad_norms), **flat}


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch (processes in order)."""
  n, i = jax.process_count(), jax.process_index()
  return {k: np.split(v, n)[i] for k, v in batch.items()}


def standard_batches() -> tuple[list[dict], list[dict]]:
  """The global batches both the workers and the single-process reference train on."""
  hard = [labelled_batch(1, 8, 3), labelled_batch(2, 8, 3, pad=2)]
  tuples = [tuple_batch(3, 4, 4), tuple_batch(4, 4, 4, pad=1)]
  return hard, tuples


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_file = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  # CPU cross-process collectives (gloo is the default in this jax; set it explicitly, and before
  # the backend starts, so a changed default cannot silently leave the processes unconnected).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  from retrieval_jax.training import data_mesh
  assert jax.process_count() == num_processes, jax.process_count()
  mesh = data_mesh()
  result = train(mesh, *standard_batches())
  result["device_count"] = np.asarray(jax.device_count())
  result["local_device_count"] = np.asarray(jax.local_device_count())
  if process_id == 0:
    np.savez(out_file, **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
