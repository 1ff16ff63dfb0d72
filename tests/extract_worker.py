"""A tiny untrained Retriever, a tiny image set, and the worker that extracts its share of the
set in one process of a multi-process ``jax.distributed`` run.

As a module (``import extract_worker``) it only defines the retriever, the images and the
extraction settings, so the test computes its single-process reference with exactly the same
code. As a script:

    python tests/extract_worker.py PROCESS_ID NUM_PROCESSES PORT STORE_DIR OUT_FILE

it joins ``localhost:PORT`` (CPU collectives: gloo), runs ``evaluation.extract_to_store`` with
the process index and count left to jax (``jax.process_index()`` / ``jax.process_count()``), so it
writes only its own shard into the shared ``STORE_DIR``, waits for every process
(``multihost_utils.sync_global_devices``), then reads the complete shard set and writes it,
with what it extracted, to ``OUT_FILE`` (``.npz``).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

KEY = "tiny.database.multiprocess"
N_IMAGES = 10
SETTINGS = {"max_size": 64, "scales": (1.0,), "batch_size": 2, "num_workers": 1,
            "chunk_size": 2}


def tiny_retriever():
  """An untrained tiny_resnet + GeM Retriever, weights drawn with numpy (He-normal kernels,
  identity batch norm): no jitted initialiser to compile."""
  from retrieval_jax.models import build_backbone
  from retrieval_jax.retriever import Retriever, default_config

  cfg = default_config()
  cfg.update({"backbone": "tiny_resnet", "pretrained": False, "pooling": "gem", "max_size": 64,
              "bucket_step": 32, "batch_size": 2})
  shapes = jax.eval_shape(build_backbone("tiny_resnet").init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path).split("'")[-2]
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("var", "scale") else 0.0, np.float32)

  backbone = jax.tree_util.tree_map_with_path(draw, shapes)
  return Retriever(cfg, {"backbone": backbone, "head": {"params": {"p": np.float32(3.0)}}})


def images() -> list[np.ndarray]:
  """``N_IMAGES`` random photos of a few sizes (so the two processes meet several buckets)."""
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, (64 - 16 * (i % 2), 48 + 8 * (i % 3), 3), dtype=np.uint8)
          for i in range(N_IMAGES)]


def boxes() -> np.ndarray:
  """Crops for some images (NaN rows: the whole image), to check they follow the slicing."""
  out = np.full((N_IMAGES, 4), np.nan, np.float32)
  out[1::3] = [4, 4, 40, 40]
  return out


def main(argv: list[str]) -> None:
  process_id, num_processes, port = int(argv[1]), int(argv[2]), int(argv[3])
  store_dir, out_file = argv[4], argv[5]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  from jax.experimental import multihost_utils

  from retrieval_jax.evaluation import DescriptorStore, extract_to_store
  store = DescriptorStore(store_dir)
  info = extract_to_store(tiny_retriever(), images(), store, KEY, boxes=boxes(), **SETTINGS)
  multihost_utils.sync_global_devices("extract_worker: shards written")
  complete = store.open(KEY, N_IMAGES).read()
  np.savez(out_file, rows=np.asarray(info.rows), reused=np.asarray(info.reused),
           path=np.asarray(str(info.path)), process_index=np.asarray(jax.process_index()),
           process_count=np.asarray(jax.process_count()), complete=complete)
  multihost_utils.sync_global_devices("extract_worker: read")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
