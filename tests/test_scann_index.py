"""ScaNN index (search/scann_index.py) and build_index (search/auto.py) against exact search."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("scann")

from retrieval_jax.search import (ExactIndex, ScannIndex, build_index, default_params,  # noqa: E402
                                  exact_search, synthetic)


def _recall(truth, found):
  return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found)]))


@pytest.fixture(scope="module")
def clustered():
  return synthetic.clustered_descriptors(20_000, 64, 200, spread=synthetic.HARD_SPREAD, seed=7)


@pytest.fixture(scope="module")
def ah_index(clustered):
  database, _, _, _ = clustered
  return ScannIndex.build(database, metadata=[f"db/{i}.jpg" for i in range(len(database))],
                          model_id="gem-test")


def test_brute_force_mode_equals_argsort(clustered):
  database, queries, _, _ = clustered
  ids = np.arange(len(database))[::-1] + 100  # any unique ids
  index = ScannIndex.build(database, ids=ids, mode="brute_force")
  scores, found = index.search(queries, 10)
  expected = np.argsort(-(queries.astype(np.float64) @ database.T.astype(np.float64)), axis=1,
                        kind="stable")[:, :10]
  np.testing.assert_array_equal(found, ids[expected])
  np.testing.assert_allclose(scores, np.sum(queries[:, None] * database[expected], -1), atol=1e-5)


def test_default_ah_recall_on_hard_set(clustered, ah_index):
  database, queries, database_labels, query_labels = clustered
  _, truth = exact_search(queries, database, 10)
  truth = np.asarray(truth)
  # The set is hard: a real share of the true neighbours lies outside the query's cluster.
  assert synthetic.own_cluster_fraction(truth, database_labels, query_labels) < 0.95
  assert ah_index.params["num_leaves"] == 141
  assert _recall(truth, ah_index.search(queries, 10)[1]) >= 0.95


def test_save_load_round_trip_is_identical(tmp_path, clustered, ah_index):
  _, queries, _, _ = clustered
  ah_index.save(tmp_path / "index")
  loaded = ScannIndex.load(tmp_path / "index", model_id="gem-test", dim=64)
  for kwargs in ({}, {"leaves_to_search": 5, "reorder_k": 20}):
    expected = ah_index.search(queries, 10, **kwargs)
    got = loaded.search(queries, 10, **kwargs)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
  assert loaded.params == ah_index.params
  assert loaded.lookup(got[1][0, :2]) == [f"db/{i}.jpg" for i in got[1][0, :2]]
  manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
  assert (manifest["dim"], manifest["count"], manifest["model_id"]) == (64, 20_000, "gem-test")
  # Saving again over an existing index replaces it atomically.
  ah_index.save(tmp_path / "index")
  ScannIndex.load(tmp_path / "index")


def test_corrupted_or_mismatched_directory_is_refused(tmp_path, ah_index):
  path = tmp_path / "index"
  ah_index.save(path)
  with pytest.raises(ValueError, match="built for descriptor model 'gem-test'"):
    ScannIndex.load(path, model_id="another-model")
  with pytest.raises(ValueError, match="holds 64-D descriptors; expected dim 128"):
    ScannIndex.load(path, dim=128)
  with pytest.raises(ValueError, match="describes a 'scann' index; expected 'exact'"):
    ExactIndex.load(path)
  victim = sorted((path / "scann").glob("*.npy"))[0]
  data = bytearray(victim.read_bytes())
  data[-1] ^= 0xFF
  victim.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"{victim.name} does not match its sha256"):
    ScannIndex.load(path)
  victim.unlink()
  with pytest.raises(ValueError, match=f"{victim.name} is listed in .* but missing"):
    ScannIndex.load(path)
  (path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
    ScannIndex.load(path)
  with pytest.raises(ValueError, match="is not a saved index"):
    ScannIndex.load(tmp_path)


def test_bad_arguments_are_refused(ah_index):
  with pytest.raises(ValueError, match="mode must be one of"):
    ScannIndex.build(np.zeros((10, 4), np.float32), mode="fast")
  with pytest.raises(ValueError, match="dimension D=64"):
    ah_index.search(np.zeros((2, 32), np.float32), 10)
  with pytest.raises(ValueError, match="k must be an int"):
    ah_index.search(np.zeros((2, 64), np.float32), 0)
  with pytest.raises(ValueError, match="metadata must have one entry per descriptor row"):
    ScannIndex.build(np.ones((10, 4), np.float32), metadata=["a"])


def test_default_params_follow_the_database_size():
  assert default_params(10_000)["num_leaves"] == 0  # no tree for small databases
  params = default_params(1_000_000)
  assert params["num_leaves"] == 1000 and params["leaves_to_search"] == 350


def test_build_index_modes(clustered):
  database, queries, _, _ = clustered
  small = build_index(database[:5_000])
  assert isinstance(small, ExactIndex) and small.auto_report["choice"] == "exact"
  assert isinstance(build_index(database, mode="scann", num_leaves=50), ScannIndex)
  assert isinstance(build_index(database, mode="exact"), ExactIndex)
  with pytest.raises(ValueError, match="mode must be one of"):
    build_index(database, mode="fastest")


def test_auto_calibration_meets_the_recall_target_and_is_not_slower(monkeypatch):
  from retrieval_jax.search import auto
  monkeypatch.setattr(auto, "MIN_ROWS_FOR_SCANN", 10_000)  # exercise calibration at test size
  database, queries, _, _ = synthetic.clustered_descriptors(30_000, 32, 100, seed=8)
  index = build_index(database, recall_target=0.95)
  report = index.auto_report
  assert report["choice"] in ("scann", "exact") and report["tried"]
  if report["choice"] == "scann":
    best = report["tried"][-1]
    assert best["recall"] >= 0.95
    assert best["seconds_per_query"] < report["exact_seconds_per_query"]
    _, truth = exact_search(queries, database, 10)
    assert _recall(np.asarray(truth), index.search(queries, 10)[1]) >= 0.9


@pytest.mark.slow
def test_acceptance_100k_x_512_default_recall():
  database, queries, _, _ = synthetic.clustered_descriptors(100_000, 512, 200, seed=9)
  start = time.perf_counter()
  index = ScannIndex.build(database)
  _, truth = exact_search(queries, database, 10)
  assert _recall(np.asarray(truth), index.search(queries, 10)[1]) >= 0.95
  print(f"100k x 512 build + search: {time.perf_counter() - start:.1f} s")
