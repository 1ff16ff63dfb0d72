"""retrieval-SfM-120k and GLDv2-clean training builders on fake trees in the official layouts."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest

import builder_fixtures as bf
from retrieval_jax.data.builders import gldv2, loading, sfm120k  # noqa: F401  (registers)
from retrieval_jax.data.builders._base import ManualDataError
from retrieval_jax.data.images import load_image


def test_sfm120k_images_clusters_and_pairs(tmp_path):
  manual = str(tmp_path / "m")
  db = bf.make_sfm(manual)
  builder = bf.prepare("retrieval_sfm", "sfm120k", str(tmp_path / "d"), manual)
  assert builder.info.disable_shuffling
  for split in ("train", "val"):
    s = loading.tfds_instance_set(builder, split)
    assert bf.stored_ids(builder, split) == db[split]["cids"]
    np.testing.assert_array_equal(s.cluster_ids, db[split]["cluster"])
    np.testing.assert_array_equal(s.positive_pairs,
                                  np.stack([db[split]["qidxs"], db[split]["pidxs"]], axis=1))
    assert s.boxes is None
    for i, cid in enumerate(db[split]["cids"]):
      np.testing.assert_array_equal(s.images[i], load_image(bf.sfm_path(manual, cid)))


def test_sfm120k_skips_unreadable_and_reindexes_pairs(tmp_path, caplog):
  manual = str(tmp_path / "m")
  db = bf.make_sfm(manual)
  bf.corrupt(bf.sfm_path(manual, db["train"]["cids"][1]))
  with caplog.at_level(logging.WARNING):
    builder = bf.prepare("retrieval_sfm", "sfm120k_skip_unreadable", str(tmp_path / "d"), manual)
  assert "skipped 1 unreadable" in caplog.text
  assert builder.info.metadata["num_skipped_unreadable"] == 1
  s = loading.tfds_instance_set(builder, "train")
  assert len(s) == 4
  # Pairs (0, 1), (2, 3), (1, 0): the two touching image 1 go, (2, 3) becomes (1, 2).
  np.testing.assert_array_equal(s.positive_pairs, [[1, 2]])
  np.testing.assert_array_equal(s.cluster_ids, [0, 1, 1, 2])


def test_sfm120k_malformed_pickle_names_file_and_key(tmp_path):
  manual = str(tmp_path / "m")
  db = bf.make_sfm(manual)
  del db["val"]["pidxs"]
  path = os.path.join(manual, "train", "retrieval-SfM-120k", "retrieval-SfM-120k.pkl")
  with open(path, "wb") as f:
    pickle.dump(db, f)
  with pytest.raises(ManualDataError) as err:
    bf.prepare("retrieval_sfm", "sfm120k", str(tmp_path / "d"), manual)
  assert path in str(err.value) and "['val'] has no 'pidxs'" in str(err.value)


def test_gldv2_clean_in_csv_order(tmp_path):
  manual = str(tmp_path / "m")
  rows = bf.make_gldv2(manual)
  builder = bf.prepare("google_landmarks_v2", "clean", str(tmp_path / "d"), manual)
  s = loading.tfds_instance_set(builder)
  ids = [i for _, row in rows for i in row]
  assert bf.stored_ids(builder, "train") == ids
  np.testing.assert_array_equal(s.cluster_ids, [7, 7, 42, 3, 3, 3])
  assert s.positive_pairs is None and s.boxes is None and s.num_clusters == 3
  for i, image_id in enumerate(ids):
    np.testing.assert_array_equal(s.images[i], load_image(bf.gldv2_path(manual, image_id)))


def test_gldv2_missing_image_names_the_file(tmp_path):
  manual = str(tmp_path / "m")
  bf.make_gldv2(manual)
  os.remove(bf.gldv2_path(manual, "f000000000000003"))
  with pytest.raises(ValueError, match="f000000000000003.jpg"):
    bf.prepare("google_landmarks_v2", "clean", str(tmp_path / "d"), manual)
