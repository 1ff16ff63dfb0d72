"""Compact codes in the evaluation runner (PQ with ADC, truncation) and ``evaluate_descriptors``.

Expected rankings are computed here with numpy: truncation as ``l2n(whitened[:, :d])``, PQ as
inner products with the decoded codes (``q . decode(encode(x))``, what asymmetric distance
computation approximates in float32), each ranked with a stable argsort and scored with
``metrics.compute_map``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from retrieval_jax import metrics, whitening
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.evaluation.runner import (evaluate, evaluate_descriptors, format_table,
                                             search)
from retrieval_jax.search.pq import ProductQuantizer

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def toy():
  """400 database rows in 8 clusters (+ 80 noise rows), 6 queries, 300 training rows."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(8, D))
  labels = np.concatenate([np.repeat(np.arange(8), 40), np.full(80, -1)])
  noise = np.where(labels[:, None] >= 0, 0.9, 3.0)
  database = _unit(np.where(labels[:, None] >= 0, centres[labels.clip(0)], 0)
                   + noise * rng.normal(size=(len(labels), D))).astype(np.float16)
  queries = _unit(centres[:6] + 0.9 * rng.normal(size=(6, D))).astype(np.float32)
  gnd = []
  for q in range(6):
    mine = np.flatnonzero(labels == q)
    gnd.append({"easy": mine[:20], "hard": mine[20:38], "junk": mine[38:]})
  ds = RetrievalSet(name="codes_toy", database=range(len(database)), queries=range(6), gnd=gnd)
  train_labels = np.repeat(np.arange(30), 10)
  train = _unit(rng.normal(size=(30, D))[train_labels] + 0.9 * rng.normal(size=(300, D)))
  train_set = InstanceSet(name="codes_toy:train", images=range(300), cluster_ids=train_labels)
  return {"ds": ds, "db": database, "q": queries, "train": train.astype(np.float32),
          "train_set": train_set}


def _ranks(q: np.ndarray, db: np.ndarray) -> np.ndarray:
  return np.argsort(-(np.asarray(q, np.float64) @ np.asarray(db, np.float64).T), axis=1,
                    kind="stable")


def _assert_scores(report, ranks, ds):
  for protocol in metrics.PROTOCOLS:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      m, *_ = metrics.compute_map(ranks, metrics.revisited_gnd(ds.gnd, protocol), (1, 5, 10))
    assert report["metrics"][protocol]["mAP"] == pytest.approx(m, abs=1e-12), protocol


def _saved_ranks(report) -> np.ndarray:
  return np.load(report["files"]["ranks"])


def _out(tmp_path, name):
  return {"output_dir": str(tmp_path / name), "save_ranks": True}


# --------------------------------------------------------------------------- PQ


def test_pq_16x8_is_16_bytes_per_image_and_ranks_by_adc(toy, tmp_path):
  ds, db, q = toy["ds"], toy["db"], toy["q"]
  report = evaluate_descriptors(q, db, ds, {"codes": "pq", "pq_train": "database",
                                            **_out(tmp_path, "pq")})
  codes = report["codes"]
  assert codes["bytes_per_image"] == 16  # 16 sub-vectors x 8 bits
  assert codes["codes_bytes"] == 16 * len(db)
  assert (codes["subvectors"], codes["bits"], codes["centroids"]) == (16, 8, 256)
  assert codes["trained_on"] == "codes_toy (database)" and codes["train_source"] == "database"
  assert codes["training_rows"] == len(db)
  assert "ADC" in report["search"]["method"] and report["search"]["full_ranking"]
  # Independently: the same seeded quantizer, ranked by q . decode(code) in float64.
  pq = ProductQuantizer.fit(db.astype(np.float32), 16, 8, iterations=20, seed=0)
  expected = _ranks(q, pq.decode(pq.encode(db.astype(np.float32))))
  np.testing.assert_array_equal(_saved_ranks(report), expected)
  _assert_scores(report, expected, ds)
  assert "PQ 16x8 (16 B/image, ADC) trained on codes_toy (database)" in format_table(report)


def test_pq_trained_on_the_named_set_after_whitening(toy, tmp_path):
  ds, db, q, train = toy["ds"], toy["db"], toy["q"], toy["train"]
  cfg = {"whitening": "pca", "whitening_dims": 16, "codes": "pq", "pq_subvectors": 4,
         **_out(tmp_path, "wpq")}
  report = evaluate_descriptors(q, db, ds, cfg, whitening_set=toy["train_set"],
                                train_descriptors=train)
  codes = report["codes"]
  assert codes["trained_on"] == "codes_toy:train" and codes["train_source"] == "whitening_set"
  assert codes["bytes_per_image"] == 4 and codes["dims"] == 16
  mean, proj = whitening.learn_pca_whitening(train)

  def whiten(x):
    y = (np.asarray(x, np.float64) - mean) @ proj[:16].T
    return (y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)).astype(np.float32)

  pq = ProductQuantizer.fit(whiten(train), 4, 8, iterations=20, seed=0)
  w_db = whiten(db.astype(np.float32))
  expected = _ranks(whiten(q), pq.decode(pq.encode(w_db)))
  got = _saved_ranks(report)
  # Whitening runs in float32 here and float64 above: a code may flip at a k-means boundary, so
  # compare the rankings' quality rather than every position.
  assert np.mean(got[:, :20] == expected[:, :20]) > 0.9
  _assert_scores(report, got, ds)
  for protocol in metrics.PROTOCOLS:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      m, *_ = metrics.compute_map(expected, metrics.revisited_gnd(ds.gnd, protocol))
    assert report["metrics"][protocol]["mAP"] == pytest.approx(m, abs=0.02)


def test_pq_defaults_to_the_whitening_set_when_given(toy):
  report = evaluate_descriptors(toy["q"], toy["db"], toy["ds"], {"codes": "pq"},
                                whitening_set=toy["train_set"], train_descriptors=toy["train"])
  assert report["codes"]["train_source"] == "whitening_set" and report["whitening"] is None
  assert report["codes"]["training_rows"] == 300


def test_pq_search_streams_in_blocks_with_the_same_ranks(toy):
  db = toy["db"].astype(np.float32)
  pq = ProductQuantizer.fit(db, 8, 4, iterations=5, seed=1)
  codes = pq.encode(db)
  expected = _ranks(toy["q"], pq.decode(codes))
  tiny_budget = 2 * len(db) * 4 / 2**20  # two queries' full rankings; database blocks of 25
  for k in (len(db), 7):
    for budget in (1024.0, tiny_budget):
      got = search(toy["q"], codes, k, budget, quantizer=pq)
      np.testing.assert_array_equal(got, expected[:, :k])


# --------------------------------------------------------------------------- truncation


def test_truncate_after_whitening_equals_leading_components(toy, tmp_path):
  ds, db, q, train = toy["ds"], toy["db"], toy["q"], toy["train"]
  kw = {"whitening_set": toy["train_set"], "train_descriptors": train}
  report = evaluate_descriptors(q, db, ds, {"whitening": "pca", "codes": "truncate",
                                            "truncate_dims": 8, **_out(tmp_path, "t")}, **kw)
  codes = report["codes"]
  assert codes == {"method": "truncate", "dims": 8, "from_dims": D, "after_whitening": True,
                   "storage": "float16", "bytes_per_image": 16}
  mean, proj = whitening.learn_pca_whitening(train)

  def cut(x):
    y = (np.asarray(x, np.float64) - mean) @ proj.T  # all components, then the first 8
    y = y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)
    return y[:, :8] / np.linalg.norm(y[:, :8], axis=1, keepdims=True)

  expected = _ranks(cut(q), cut(db.astype(np.float32)))
  got = _saved_ranks(report)
  assert np.mean(got == expected) > 0.98  # float32 vs float64 near-ties only
  _assert_scores(report, got, ds)
  # The same as learning the whitening with 8 dimensions kept.
  dims8 = evaluate_descriptors(q, db, ds, {"whitening": "pca", "whitening_dims": 8}, **kw)
  for protocol in metrics.PROTOCOLS:
    assert report["metrics"][protocol]["mAP"] == pytest.approx(
        dims8["metrics"][protocol]["mAP"], abs=1e-3)
  full = evaluate_descriptors(q, db, ds, {})
  assert full["codes"] == {"method": None, "dims": D, "storage": "float16",
                           "bytes_per_image": 2 * D}


# --------------------------------------------------------------------------- given descriptors


def test_memmap_database_streams_under_a_small_budget(toy, tmp_path):
  ds, q = toy["ds"], toy["q"]
  path = tmp_path / "db.npy"
  np.save(path, toy["db"])
  db = np.load(path, mmap_mode="r")
  small = evaluate_descriptors(q, db, ds, {"memory_budget_mb": 400 * 4 * 6 / 2**20,
                                           **_out(tmp_path, "small")})
  assert small["extraction"]["database_streamed"]
  assert small["extraction"]["database_dtype"] == "float16"
  assert small["search"]["database_chunk"] < len(db)
  expected = _ranks(q, toy["db"].astype(np.float32))
  np.testing.assert_array_equal(_saved_ranks(small), expected)
  _assert_scores(small, expected, ds)
  big = evaluate_descriptors(q, db, ds, {})
  assert not big["extraction"]["database_streamed"]
  assert big["metrics"] == small["metrics"]
  assert "descriptors given (32-D float16 memmap)" in format_table(small)
  # Streamed PQ: the encoded blocks and the ADC ranking do not depend on the budget.
  cfg = {"codes": "pq", "pq_subvectors": 8, "pq_bits": 4, "pq_train": "database"}
  a = evaluate_descriptors(q, db, ds, {**cfg, "memory_budget_mb": 400 * 4 * 6 / 2**20})
  b = evaluate_descriptors(q, toy["db"], ds, cfg)
  assert a["metrics"] == b["metrics"] and a["codes"]["bytes_per_image"] == 8


def test_evaluate_wires_codes_from_extracted_descriptors(tmp_path):
  from test_evaluation import FakeRetriever, _describe, _revisited_set, _train_set
  rng = np.random.default_rng(0)
  ds, train_set = _revisited_set(rng), _train_set(rng)
  report = evaluate(FakeRetriever(), ds, {"codes": "pq", "pq_subvectors": 4, "pq_bits": 2,
                                          **_out(tmp_path, "e")}, whitening_set=train_set)
  codes = report["codes"]
  assert codes["trained_on"] == "toy:train" and codes["bytes_per_image"] == 4
  assert codes["reused_descriptors"] is False
  train = _describe(train_set.images)
  pq = ProductQuantizer.fit(train, 4, 2, iterations=20, seed=0)
  q = _describe(ds.queries, ds.query_boxes)
  expected = _ranks(q, pq.decode(pq.encode(_describe(ds.database))))
  np.testing.assert_array_equal(_saved_ranks(report), expected)
  _assert_scores(report, expected, ds)
  trunc = evaluate(FakeRetriever(), ds, {"whitening": "pca", "codes": "truncate",
                                         "truncate_dims": 6}, whitening_set=train_set)
  assert trunc["codes"]["dims"] == 6 and trunc["whitening"]["dims"] == 12


def test_code_config_errors_name_the_field(toy):
  ds, db, q = toy["ds"], toy["db"], toy["q"]
  for cfg, field in [({"codes": "zip"}, "codes"), ({"truncate_dims": 8}, "truncate_dims"),
                     ({"codes": "truncate"}, "truncate_dims"),
                     ({"codes": "pq", "pq_bits": 9}, "pq_bits"),
                     ({"codes": "pq", "pq_subvectors": 0}, "pq_subvectors"),
                     ({"codes": "pq", "pq_train": "val"}, "pq_train"),
                     ({"codes": "pq", "rerank": "aqe"}, "rerank"),
                     ({"codes": "truncate", "truncate_dims": 33}, "truncate_dims"),
                     ({"codes": "pq", "pq_subvectors": 5}, "pq_subvectors"),
                     ({"codes": "pq", "pq_train": "whitening_set"}, "whitening_set")]:
    with pytest.raises(ValueError, match=field):
      evaluate_descriptors(q, db, ds, cfg)
  with pytest.raises(ValueError, match="queries"):
    evaluate_descriptors(q[:, :8], db, ds)
  with pytest.raises(ValueError, match="database has"):
    evaluate_descriptors(q, db[:10], ds)
  with pytest.raises(ValueError, match="train_descriptors"):
    evaluate_descriptors(q, db, ds, {"whitening": "pca"}, whitening_set=toy["train_set"])
  with pytest.raises(ValueError, match="whitening_set"):
    evaluate_descriptors(q, db, ds, {}, whitening_set=toy["train_set"],
                         train_descriptors=toy["train"])
