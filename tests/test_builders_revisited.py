"""Revisited Oxford/Paris and R1M builders on fake trees in the revisitop layout."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

import builder_fixtures as bf
from retrieval_jax.data.builders import loading, revisited  # noqa: F401  (registers builders)
from retrieval_jax.data.builders._base import ManualDataError
from retrieval_jax.data.images import ImageReadError, load_image


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("revisited")
  manual, data_dir = str(root / "manual"), str(root / "data")
  gnd = bf.make_revisited(manual)
  r1m = bf.make_r1m(manual)
  oxford = bf.prepare("revisited_landmarks", "roxford5k", data_dir, manual)
  distractors = bf.prepare("revisitop1m", "r1m", data_dir, manual)
  return {"manual": manual, "data_dir": data_dir, "gnd": gnd, "r1m": r1m, "oxford": oxford,
          "distractors": distractors}


def test_roxford_matches_the_sources(prepared):
  gnd, manual = prepared["gnd"], prepared["manual"]
  jpg = os.path.join(manual, "roxford5k", "jpg")
  s = loading.tfds_retrieval_set(prepared["oxford"])
  assert s.name == "revisited_landmarks/roxford5k" and s.gnd_kind == "revisited"
  assert (len(s.database), len(s.queries)) == (6, 2)
  for i, name in enumerate(gnd["imlist"]):
    np.testing.assert_array_equal(s.database[i], load_image(os.path.join(jpg, name + ".jpg")))
  for i, name in enumerate(gnd["qimlist"]):
    np.testing.assert_array_equal(s.queries[i], load_image(os.path.join(jpg, name + ".jpg")))
  for got, want in zip(s.gnd, gnd["gnd"]):
    for key in ("easy", "hard", "junk"):
      np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_allclose(s.query_boxes, [g["bbx"] for g in gnd["gnd"]])
  assert s.query_db_indices is None  # revisited queries are not database images
  np.testing.assert_array_equal(s.database_ids, -1)
  assert s.database[-1].shape == (30, 40, 3) and s.database[-1].dtype == np.uint8


def test_order_is_source_order(prepared):
  builder = prepared["oxford"]
  assert builder.info.disable_shuffling
  assert bf.stored_ids(builder, "database") == prepared["gnd"]["imlist"]
  assert bf.stored_ids(builder, "query") == prepared["gnd"]["qimlist"]
  source = builder.as_data_source("database")
  assert [int(source[i]["index"]) for i in range(len(source))] == list(range(6))


def test_r1m_distractors_follow_the_database(prepared):
  s = loading.tfds_retrieval_set(prepared["oxford"], distractors=prepared["distractors"])
  assert len(s.database) == 6 + 3 and s.name.endswith("+revisitop1m/r1m")
  jpg = os.path.join(prepared["manual"], "revisitop1m", "jpg")
  for i, name in enumerate(prepared["r1m"]):
    np.testing.assert_array_equal(s.database[6 + i], load_image(os.path.join(jpg, name)))
  assert bf.stored_ids(prepared["distractors"], "database") == prepared["r1m"]
  np.testing.assert_array_equal(s.database_ids, -1)
  np.testing.assert_array_equal(s.gnd[0]["easy"], [0, 2])  # indices unchanged by distractors


def test_load_retrieval_set_reuses_prepared_data(prepared):
  s = loading.load_retrieval_set("revisited_landmarks", data_dir=prepared["data_dir"],
                                 config="roxford5k", manual_dir=prepared["manual"],
                                 distractors="revisitop1m")
  assert len(s.database) == 9 and len(s.queries) == 2


def test_missing_manual_dir_names_files_and_place(tmp_path):
  missing = str(tmp_path / "nowhere")
  builder = tfds.builder("revisited_landmarks", data_dir=str(tmp_path / "d"), config="rparis6k")
  with pytest.raises(ManualDataError) as err:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=missing))
  assert missing in str(err.value) and "gnd_rparis6k.pkl" in str(err.value)
  assert "http://cmp.felk.cvut.cz/revisitop/data/datasets" in str(err.value)
  # A manual dir holding only the other benchmark: the missing files are named in full.
  bf.make_revisited(str(tmp_path / "m"), "roxford5k")
  with pytest.raises(ManualDataError) as err:
    bf.prepare("revisited_landmarks", "rparis6k", str(tmp_path / "d"), str(tmp_path / "m"))
  assert os.path.join(str(tmp_path / "m"), "rparis6k", "gnd_rparis6k.pkl") in str(err.value)


def _broken(data: dict, case: str) -> dict:
  if case == "no_gnd":
    del data["gnd"]
  elif case == "no_hard":
    del data["gnd"][1]["hard"]
  else:
    data["gnd"][0]["junk"] = [6]
  return data


@pytest.mark.parametrize("case, needle", [
    ("no_gnd", "missing key 'gnd'"),
    ("no_hard", "gnd[1] (query 'bodleian_q00002') has no 'hard'"),
    ("out_of_range", "gnd[0] (query 'all_souls_q00001')['junk'] holds index 6"),
])
def test_malformed_ground_truth_names_pickle_and_query(tmp_path, case, needle):
  manual = str(tmp_path / "m")
  data = _broken(bf.make_revisited(manual), case)
  path = os.path.join(manual, "roxford5k", "gnd_roxford5k.pkl")
  with open(path, "wb") as f:
    pickle.dump(data, f)
  with pytest.raises(ManualDataError) as err:
    bf.prepare("revisited_landmarks", "roxford5k", str(tmp_path / "d"), manual)
  assert path in str(err.value) and needle in str(err.value)


def test_corrupt_image_fails_or_is_skipped_and_counted(tmp_path, caplog):
  manual, data_dir = str(tmp_path / "m"), str(tmp_path / "d")
  bf.make_revisited(manual)
  bad = os.path.join(manual, "roxford5k", "jpg", "all_souls_000002.jpg")
  bf.corrupt(bad)
  with pytest.raises(ImageReadError, match="all_souls_000002.jpg"):
    bf.prepare("revisited_landmarks", "roxford5k", data_dir, manual)
  with caplog.at_level(logging.WARNING):
    builder = bf.prepare("revisited_landmarks", "roxford5k_skip_unreadable", data_dir, manual)
  assert "skipped 1 unreadable" in caplog.text
  assert builder.info.metadata["num_skipped_unreadable"] == 1
  assert builder.info.metadata["skipped_unreadable"] == {
      "database": [os.path.join("roxford5k", "jpg", "all_souls_000002.jpg")]}
  s = loading.tfds_retrieval_set(builder)
  assert len(s.database) == 5
  # Database image 2 is gone: later indices shift down, lists drop it.
  np.testing.assert_array_equal(s.gnd[0]["easy"], [0])
  np.testing.assert_array_equal(s.gnd[0]["hard"], [3])
  np.testing.assert_array_equal(s.gnd[0]["junk"], [4])
  np.testing.assert_array_equal(s.gnd[1]["junk"], [2, 0])
