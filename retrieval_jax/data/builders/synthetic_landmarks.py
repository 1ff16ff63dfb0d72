"""TFDS builder ``synthetic_landmarks``: the embedded synthetic benchmark, generated locally.

Nothing is downloaded: ``_split_generators`` runs :mod:`retrieval_jax.data.synthetic` (seed 0)
and streams its photos, so preparing ``tiny`` takes seconds and ``small`` about a minute plus
PNG encoding. Configs: ``tiny``, ``small``, ``medium``, ``large`` (the presets of
``retrieval_jax.data.synthetic.PRESETS``).

Splits and schema (shared with the other builders of this package, ``builders/_base.py``):

* ``train``: the training photos, instance-major; ``cluster_id`` = instance id, ``box`` = the
  visible object's box.
* ``database`` / ``query``: the test retrieval set; ``val_database`` / ``val_query``: the
  validation one. Database rows carry ``instance_id`` (-1: distractor) and ``index``; query rows
  carry ``box``, ``query_db_index`` (-1: queries are not database photos) and ``gnd`` with the
  revisited ``easy`` / ``hard`` / ``junk`` index lists.

TFDS keeps one feature dict per dataset, so every split carries the union of the fields; rows
fill fields that are not theirs with "none" values (NaN box, -1, empty ground truth). Example
order is generation order (``disable_shuffling=True``, integer keys), so ground-truth indices
stay valid. ``info.metadata`` holds ``labels[split]`` (training cluster ids, database instance
ids, in example order) and ``has_boxes[split]``, which the readers in ``builders/loading.py``
use instead of scanning every record.

>>> import retrieval_jax.data.builders.synthetic_landmarks  # registers the name
>>> builder = tfds.builder("synthetic_landmarks/tiny", data_dir="/tmp/tfds")
>>> builder.download_and_prepare()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from retrieval_jax.data import synthetic
from retrieval_jax.data.builders._base import LocalBuilder, nan_box, retrieval_features

#: The seed every config is generated with.
SEED = 0
_GND_KEYS = ("easy", "hard", "junk")


@dataclasses.dataclass(eq=False)
class SyntheticLandmarksConfig(tfds.core.BuilderConfig):
  """A preset of the synthetic benchmark (``preset`` is a key of ``synthetic.PRESETS``)."""

  preset: str = "tiny"


def _config(name: str) -> SyntheticLandmarksConfig:
  cfg = synthetic.PRESETS[name]
  return SyntheticLandmarksConfig(
      name=name, preset=name,
      description=(f"{cfg.train_instances} train landmarks x {cfg.train_views} views; test: "
                   f"{cfg.test_instances} landmarks x {cfg.db_views} database views + "
                   f"{cfg.distractors} distractors, {cfg.queries_per_instance} queries per "
                   f"landmark; {cfg.image_size} px long side; seed {SEED}."))


class SyntheticLandmarks(LocalBuilder):
  """The synthetic instance-retrieval benchmark (see the module docstring)."""

  BUILDER_CONFIGS = [_config(name) for name in ("tiny", "small", "medium", "large")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info(retrieval_features(_GND_KEYS, with_clusters=True),
                              (synthetic.__doc__ or "").split("\n\n")[0])

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # generated locally: nothing to download
    preset = self.builder_config.preset
    cfg = synthetic.PRESETS[preset]
    # Ground truth and instance ids need every database photo's visibility before the query
    # split is written; measuring it without painting costs a fraction of the generation.
    metas = {split: synthetic.retrieval_metadata(cfg, split=split, seed=SEED)
             for split in ("test", "val")}
    train_ids = np.repeat(np.arange(cfg.train_instances, dtype=np.int64), cfg.train_views)
    metadata = self.info.metadata
    metadata["labels"] = {"train": train_ids.tolist(),
                          "database": metas["test"].database.instance_ids.tolist(),
                          "val_database": metas["val"].database.instance_ids.tolist()}
    metadata["has_boxes"] = {"train": True, "database": False, "query": True,
                             "val_database": False, "val_query": True}
    metadata["preset"] = preset
    metadata["seed"] = SEED
    return {
        "train": self._generate_examples(cfg, "train"),
        "database": self._generate_examples(cfg, "database", "test", metas["test"]),
        "query": self._generate_examples(cfg, "query", "test", metas["test"]),
        "val_database": self._generate_examples(cfg, "database", "val", metas["val"]),
        "val_query": self._generate_examples(cfg, "query", "val", metas["val"]),
    }

  def _generate_examples(self, cfg: synthetic.SyntheticConfig, part: str, split: str = "test",
                         meta: synthetic.RetrievalMetadata | None = None
                         ) -> Iterator[tuple[int, dict]]:
    """``(key, example)`` of the ``train`` photos, or of a retrieval ``split``'s ``database``
    or ``query`` part; keys are positions, so the stored order is the generation order."""
    if part == "train":
      return self._train(cfg)
    if part == "database":
      return self._database(cfg, split, meta)
    return self._queries(cfg, split, meta)

  def _train(self, cfg: synthetic.SyntheticConfig) -> Iterator[tuple[int, dict]]:
    empty = {key: [] for key in _GND_KEYS}
    for i, (image, cluster, box) in enumerate(synthetic.iter_train(cfg, seed=SEED)):
      yield i, {"image": image, "image_id": f"train_{i:07d}", "cluster_id": cluster,
                "instance_id": cluster, "index": i, "box": box, "query_db_index": -1,
                "gnd": empty}

  def _database(self, cfg: synthetic.SyntheticConfig, split: str,
                meta: synthetic.RetrievalMetadata) -> Iterator[tuple[int, dict]]:
    empty = {key: [] for key in _GND_KEYS}
    prefix = "db" if split == "test" else "val_db"
    for i, (image, instance) in enumerate(synthetic.iter_database(cfg, split=split, seed=SEED)):
      if instance != meta.database.instance_ids[i]:  # the two passes must agree
        raise RuntimeError(f"{split} database photo {i}: instance {instance} differs from the "
                           f"metadata pass ({meta.database.instance_ids[i]}).")
      yield i, {"image": image, "image_id": f"{prefix}_{i:07d}", "cluster_id": instance,
                "instance_id": instance, "index": i, "box": nan_box(), "query_db_index": -1,
                "gnd": empty}

  def _queries(self, cfg: synthetic.SyntheticConfig, split: str,
               meta: synthetic.RetrievalMetadata) -> Iterator[tuple[int, dict]]:
    gnd = synthetic.ground_truth(meta)
    prefix = "query" if split == "test" else "val_query"
    for i, (image, box) in enumerate(synthetic.iter_queries(cfg, split=split, seed=SEED)):
      instance = int(meta.queries.instance_ids[i])
      yield i, {"image": image, "image_id": f"{prefix}_{i:07d}", "cluster_id": instance,
                "instance_id": instance, "index": i, "box": box, "query_db_index": -1,
                "gnd": {key: gnd[i][key] for key in _GND_KEYS}}
