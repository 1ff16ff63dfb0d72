"""The ``synthetic_landmarks`` TFDS builder: prepared offline, equal to ``synthetic.generate``."""

from __future__ import annotations

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from retrieval_jax.data import synthetic  # noqa: E402
from retrieval_jax.data.builders import synthetic_landmarks  # noqa: E402  (registers the name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  builder = tfds.builder("synthetic_landmarks/tiny",
                         data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare()
  return builder, synthetic.generate("tiny", seed=synthetic_landmarks.SEED)


def _rows(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def test_builder_is_registered_with_every_preset():
  assert isinstance(tfds.builder_cls("synthetic_landmarks"), type)
  names = [c.name for c in synthetic_landmarks.SyntheticLandmarks.BUILDER_CONFIGS]
  assert names == ["tiny", "small", "medium", "large"]


def test_splits_equal_the_in_memory_benchmark(prepared):
  builder, bench = prepared
  assert set(builder.info.splits) == {"train", "database", "query", "val_database", "val_query"}
  train = _rows(builder, "train")
  assert len(train) == len(bench.train)
  for i, row in enumerate(train):
    np.testing.assert_array_equal(row["image"], bench.train.images[i])  # PNG: lossless
    assert row["cluster_id"] == bench.train.cluster_ids[i] and row["index"] == i
    np.testing.assert_array_equal(row["box"], bench.train.boxes[i])
  for prefix, rs in (("", bench.test), ("val_", bench.val)):
    db = _rows(builder, f"{prefix}database")
    assert len(db) == len(rs.database)
    for i, row in enumerate(db):
      np.testing.assert_array_equal(row["image"], rs.database[i])
      assert row["instance_id"] == rs.database_ids[i] and row["index"] == i
      assert np.isnan(row["box"]).all() and row["query_db_index"] == -1
    queries = _rows(builder, f"{prefix}query")
    assert len(queries) == len(rs.queries)
    for i, row in enumerate(queries):
      np.testing.assert_array_equal(row["image"], rs.queries[i])
      np.testing.assert_array_equal(row["box"], rs.query_boxes[i])
      for key in ("easy", "hard", "junk"):
        np.testing.assert_array_equal(row["gnd"][key], rs.gnd[i][key])
  labels = builder.info.metadata["labels"]
  np.testing.assert_array_equal(labels["database"], bench.test.database_ids)
  np.testing.assert_array_equal(labels["train"], bench.train.cluster_ids)


def test_round_trip_through_the_generic_readers(prepared):
  loading = pytest.importorskip("retrieval_jax.data.builders.loading")
  prepared_builder, bench = prepared
  # A fresh builder reads what was written (features, splits, metadata) from disk.
  builder = tfds.builder("synthetic_landmarks/tiny", data_dir=str(prepared_builder.data_dir_root))
  assert builder.info.metadata["labels"]["database"] == bench.test.database_ids.tolist()
  test = loading.tfds_retrieval_set(builder, database_split="database", query_split="query")
  assert test.gnd_kind == "revisited"
  np.testing.assert_array_equal(test.database_ids, bench.test.database_ids)
  np.testing.assert_array_equal(test.query_boxes, bench.test.query_boxes)
  for mine, theirs in zip(test.gnd, bench.test.gnd):
    for key in ("easy", "hard", "junk"):
      np.testing.assert_array_equal(mine[key], theirs[key])
  for i in (0, len(bench.test.database) - 1):
    np.testing.assert_array_equal(test.database[i], bench.test.database[i])
  np.testing.assert_array_equal(test.queries[0], bench.test.queries[0])
  val = loading.tfds_retrieval_set(builder, database_split="val_database",
                                   query_split="val_query")
  np.testing.assert_array_equal(val.database_ids, bench.val.database_ids)
  train = loading.tfds_instance_set(builder, "train")
  np.testing.assert_array_equal(train.cluster_ids, bench.train.cluster_ids)
  np.testing.assert_array_equal(train.boxes, bench.train.boxes)
  np.testing.assert_array_equal(train.images[3], bench.train.images[3])
