"""Evaluation runner: its scores against compute_map on rankings computed by hand with numpy.

Most tests use ``FakeRetriever``, whose descriptor of an image is a fixed function of its pixels
(cell means), so the expected descriptors, rankings and scores are computed here independently
of the runner; one test runs a real (untrained, tiny) Retriever end to end.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from retrieval_jax import metrics, rerank, whitening
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.samplers import sample_pairs
from retrieval_jax.evaluation import (DescriptorArray, DescriptorStore, default_eval_config,
                                      descriptor_key, evaluate, extract_to_store, format_table,
                                      process_slice, retriever_fingerprint, score_ranks,
                                      search, write_report)

GRID = 2  # the fake descriptor: mean colour of each of GRID x GRID cells, D = 12


def _fake_descriptor(image: np.ndarray) -> np.ndarray:
  cells = [c.mean(axis=(0, 1)) for rows in np.array_split(image.astype(np.float64), GRID, 0)
           for c in np.array_split(rows, GRID, 1)]
  v = np.concatenate(cells) - 127.5
  return (v / (np.linalg.norm(v) + 1e-6)).astype(np.float32)


def _crop(image: np.ndarray, box) -> np.ndarray:
  if box is None or np.isnan(box).any():
    return image
  x0, y0, x1, y1 = (int(v) for v in box)
  return image[y0:y1, x0:x1]


class FakeRetriever:
  """``Retriever.extract``'s interface with known descriptors; records every call."""

  def __init__(self, salt: int = 0):
    self.config = {"fake": GRID, "salt": salt}
    self.variables = {"w": np.arange(3) + salt}
    self.calls: list[dict] = []

  def extract(self, images, max_size=None, scales=None, batch_size=None, *, boxes=None,
              skip_unreadable=False, num_workers=2):
    self.calls.append({"n": len(images), "boxes": boxes is not None, "scales": scales,
                       "max_size": max_size})
    return np.stack([_fake_descriptor(_crop(images[i], None if boxes is None else boxes[i]))
                     for i in range(len(images))]).reshape(len(images), -1)


def _f16(x) -> np.ndarray:
  """What the float16 store gives back."""
  return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _describe(images, boxes=None) -> np.ndarray:
  return _f16(np.stack([_fake_descriptor(_crop(im, None if boxes is None else boxes[i]))
                        for i, im in enumerate(images)]))


def _ranks(q: np.ndarray, db: np.ndarray) -> np.ndarray:
  return np.argsort(-(np.asarray(q, np.float64) @ np.asarray(db, np.float64).T), axis=1,
                    kind="stable")


def _images(rng, labels, size=16, noise=40):
  """Photos of a few instances: a per-instance pattern plus noise."""
  protos = rng.integers(0, 256, (max(labels) + 1, size, size, 3))
  return [np.clip(protos[c] + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
          for c in labels]


def _revisited_set(rng, kind="revisited"):
  db_labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # instance 3: a distractor
  database = _images(rng, db_labels)
  queries = _images(rng, [0, 1, 2])
  boxes = np.array([[2, 2, 14, 14], [0, 4, 12, 16], [4, 0, 16, 10]], np.float32)
  if kind == "revisited":
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [9]},
           {"easy": [3], "hard": [4, 5], "junk": []},
           {"easy": [6, 7, 8], "hard": [], "junk": [0]}]  # no hard positive: excluded in Hard
  else:
    gnd = [{"good": [0], "ok": [1, 2], "junk": [9]}, {"good": [3, 4], "ok": [5], "junk": []},
           {"good": [6], "ok": [7, 8], "junk": [0]}]
  return RetrievalSet(name=f"toy_{kind}", database=database, queries=queries, gnd=gnd,
                      gnd_kind=kind, query_boxes=boxes)


def _train_set(rng):
  labels = np.repeat(np.arange(8), 4)
  return InstanceSet(name="toy:train", images=_images(rng, list(labels)), cluster_ids=labels)


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  return {"revisited": _revisited_set(rng), "original": _revisited_set(rng, "original"),
          "train": _train_set(rng)}


def _expected_db_q(ds, crop=True):
  return (_describe(ds.database),
          _describe(ds.queries, ds.query_boxes if crop else None))


def _assert_revisited(report, ranks, ds, n_db=None):
  for protocol in metrics.PROTOCOLS:
    gnd = metrics.revisited_gnd(ds.gnd, protocol)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      m, _, mpk, _ = metrics.compute_map(ranks, gnd, (1, 5, 10), n_db=n_db)
    got = report["metrics"][protocol]
    assert got["mAP"] == pytest.approx(m, abs=1e-12)
    for k, v in zip((1, 5, 10), mpk):
      assert got[f"mP@{k}"] == pytest.approx(v, abs=1e-12)


# --------------------------------------------------------------------------- protocols


def test_revisited_scores_equal_compute_map_on_hand_ranks(toy, tmp_path):
  ds = toy["revisited"]
  fake = FakeRetriever()
  cfg = {"output_dir": str(tmp_path / "run"), "save_ranks": True, "scales": (1.0, 0.5),
         "max_size": 77}
  report = evaluate(fake, ds, cfg)
  db, q = _expected_db_q(ds)
  ranks = _ranks(q, db)
  np.testing.assert_array_equal(np.load(tmp_path / "run" / "ranks.npy"), ranks)
  _assert_revisited(report, ranks, ds)
  # The protocol's defaults and what the report states about them.
  assert report["extraction"]["query_crop"] == "query_boxes"
  assert report["extraction"]["scales"] == [1.0, 0.5]
  assert report["whitening"] is None and report["rerank"] is None
  assert report["search"]["full_ranking"] and report["search"]["top_k"] == 10
  assert report["excluded_queries"]["hard"] == [2]
  assert [c["boxes"] for c in fake.calls] == [False, True]  # database whole, queries cropped
  assert all(c["scales"] == (1.0, 0.5) and c["max_size"] == 77 for c in fake.calls)
  assert set(report["timings_s"]) >= {"extract_database", "extract_queries", "whitening",
                                      "rerank", "search", "metrics", "total"}
  assert {"jax", "flax", "retrieval_jax"} <= set(report["versions"])
  on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
  assert on_disk["metrics"] == report["metrics"] and on_disk["dataset"] == report["dataset"]
  table = format_table(report)
  assert "query crop: query_boxes" in table and "whitening: none" in table
  assert f"{100 * report['metrics']['hard']['mAP']:5.1f}" in table
  assert "excluded from the means: hard: 1" in table


def test_crop_off_is_explicit_and_reported(toy):
  ds = toy["revisited"]
  fake = FakeRetriever()
  report = evaluate(fake, ds, {"crop_queries": False})
  db, q = _expected_db_q(ds, crop=False)
  _assert_revisited(report, _ranks(q, db), ds)
  assert [c["boxes"] for c in fake.calls] == [False, False]
  assert report["extraction"]["crop_queries"] is False
  assert "crop_queries=False" in report["extraction"]["query_crop"]
  assert "crop_queries=False" in format_table(report)


def test_original_protocol(toy):
  ds = toy["original"]
  report = evaluate(FakeRetriever(), ds)
  db, q = _expected_db_q(ds)
  expected = metrics.compute_map(_ranks(q, db), metrics.original_gnd(ds.gnd))[0]
  assert report["metrics"] == {"mAP": pytest.approx(expected, abs=1e-12)}
  assert report["dataset"]["protocol"] == "original"


def test_ok_junk_with_queries_in_database_and_ukbench_ns(rng):
  # UKBench-like: groups of 4, every image queries the whole database (itself included).
  ids = np.repeat(np.arange(4), 4)
  images = _images(rng, list(ids))
  order = rng.permutation(len(ids))  # queries in another order than the database
  gnd = [{"ok": [j for j in np.flatnonzero(ids == ids[i]) if j != i], "junk": [i]}
         for i in order]
  ds = RetrievalSet(name="toy_ukbench", database=images, queries=[images[i] for i in order],
                    gnd=gnd, gnd_kind="ok_junk", query_db_indices=order, database_ids=ids)
  fake = FakeRetriever()
  report = evaluate(fake, ds)
  db = _describe(images)
  ranks = _ranks(db[order], db)
  expected_map = metrics.holidays_map(ranks, [{"ok": g["ok"]} for g in gnd], order)
  by_image = _ranks(db, db)
  expected_ns = (ids[by_image[:, :4]] == ids[:, None]).sum(axis=1).mean()
  assert report["metrics"]["mAP"] == pytest.approx(expected_map, abs=1e-12)
  assert report["metrics"]["N-S"] == pytest.approx(expected_ns, abs=1e-12)
  assert report["dataset"]["protocol"] == "ukbench"
  assert report["extraction"]["queries_from"].startswith("database")
  assert len(fake.calls) == 1  # queries reuse the database descriptors
  assert "N-S" in format_table(report)
  # Not UKBench-shaped (a group of 3): no N-S.
  ds3 = RetrievalSet(name="toy_holidays", database=images[:-1], queries=images[:2],
                     gnd=[{"ok": [1], "junk": []}, {"ok": [0], "junk": []}], gnd_kind="ok_junk",
                     query_db_indices=[0, 1], database_ids=ids[:-1])
  scored = score_ranks(_ranks(db[:2], db[:-1]), ds3)
  assert "N-S" not in scored["scores"]
  # The query's own image is junk (Holidays rule), so ranking it first does not count.
  assert scored["scores"]["mAP"] == pytest.approx(metrics.holidays_map(
      _ranks(db[:2], db[:-1]), [{"ok": [1]}, {"ok": [0]}], [0, 1]), abs=1e-12)


# --------------------------------------------------------------------------- whitening, rerank


@pytest.mark.parametrize("kind", ["pca", "lw"])
def test_whitening_learned_on_named_split(toy, kind):
  ds, train = toy["revisited"], toy["train"]
  report = evaluate(FakeRetriever(), ds, {"whitening": kind, "whitening_dims": 8},
                    whitening_set=train)
  x = _describe(train.images)
  if kind == "pca":
    mean, proj = whitening.learn_pca_whitening(x)
  else:
    pairs = sample_pairs(train.cluster_ids, seed=0)
    mean, proj = whitening.learn_lw(x, pairs[:, 0], pairs[:, 1])
  db, q = _expected_db_q(ds)
  db_w, q_w = (np.asarray(whitening.apply_whitening(v, mean, proj, 8)) for v in (db, q))
  _assert_revisited(report, _ranks(q_w, db_w), ds)
  w = report["whitening"]
  assert w["learned_on"] == "toy:train" and w["dims"] == 8 and w["images"] == len(train)
  assert w["method"] == {"pca": "PCA-w", "lw": "Lw"}[kind]
  assert (w["pairs"] is None) == (kind == "pca")
  assert "learned on toy:train" in format_table(report)


@pytest.mark.parametrize("method", ["aqe", "alpha_qe", "dba", "dba+alpha_qe"])
def test_rerank_equals_rerank_functions(toy, tmp_path, method):
  ds = toy["revisited"]
  fake = FakeRetriever()
  cfg = {"rerank": method, "qe_k": 2, "alpha": 2.0, "dba_k": 3, "dba_alpha": 1.5,
         "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / method),
         "save_ranks": True}
  report = evaluate(fake, ds, cfg)
  db, q = _expected_db_q(ds)
  if "dba" in method:
    db = np.asarray(rerank.database_side_augmentation(db, 3, 1.5))
  if method.endswith("aqe") and "alpha" not in method:
    q = np.asarray(rerank.average_query_expansion(q, db, 2))
  elif method.endswith("alpha_qe"):
    q = np.asarray(rerank.alpha_query_expansion(q, db, 2, 2.0))
  ranks = _ranks(q, db)
  np.testing.assert_array_equal(np.load(tmp_path / method / "ranks.npy"), ranks)
  _assert_revisited(report, ranks, ds)
  assert report["rerank"]["method"] == method
  assert ("qe_k" in report["rerank"]) == method.endswith("qe")
  # Reusing the descriptor cache: a second run extracts nothing.
  calls = len(fake.calls)
  again = evaluate(fake, ds, {**cfg, "output_dir": None, "save_ranks": False})
  assert len(fake.calls) == calls
  assert again["extraction"]["reused"] == {"database": True, "queries": True}
  assert again["metrics"] == report["metrics"]


# --------------------------------------------------------------------------- bounded memory


def test_search_chunks_match_argsort_with_ties(rng):
  db = rng.normal(size=(50, 6)).astype(np.float32)
  db[[7, 30, 41]] = db[3]  # exact ties: lower index first
  q = np.concatenate([db[[3]], rng.normal(size=(4, 6)).astype(np.float32)])
  expected = _ranks(q, db)
  budget = 60 * 4 / 2 ** 20  # 60 float32 cells: several query and database blocks
  np.testing.assert_array_equal(search(q, db, 50, budget), expected)
  np.testing.assert_array_equal(search(q, db, 7, budget), expected[:, :7])
  np.testing.assert_array_equal(search(q, db, 7), expected[:, :7])
  np.testing.assert_array_equal(expected[0, :4], [3, 7, 30, 41])
  with pytest.raises(ValueError, match="memory_budget_mb"):
    search(q, db, 50, 10 * 4 / 2 ** 20)


@pytest.mark.parametrize("cfg", [{}, {"rerank": "dba+alpha_qe", "qe_k": 2, "dba_k": 3},
                                 {"whitening": "pca", "whitening_dims": 8}])
def test_small_budget_streams_and_gives_the_same_ranks(toy, tmp_path, cfg):
  ds, train = toy["revisited"], toy["train"]
  wset = train if "whitening" in cfg else None
  big = evaluate(FakeRetriever(), ds, {**cfg, "output_dir": str(tmp_path / "big"),
                                       "save_ranks": True}, whitening_set=wset)
  # 40 float32 cells: the [10, 12] database no longer fits, so it streams from float16 shards
  # in 3-row blocks; the [3, 10] full ranking still does.
  small = evaluate(FakeRetriever(), ds, {**cfg, "output_dir": str(tmp_path / "small"),
                                         "save_ranks": True,
                                         "memory_budget_mb": 40 * 4 / 2 ** 20},
                   whitening_set=wset)
  assert big["search"]["database_in_memory"] and not small["search"]["database_in_memory"]
  assert small["search"]["database_chunk"] < len(ds.database)
  np.testing.assert_array_equal(np.load(tmp_path / "small" / "ranks.npy"),
                                np.load(tmp_path / "big" / "ranks.npy"))
  assert small["metrics"] == big["metrics"]


def test_truncated_top_k(toy):
  ds = toy["revisited"]
  db, q = _expected_db_q(ds)
  full = _ranks(q, db)
  # The deepest positive or junk image of any query sets the k beyond which nothing counts.
  k = 1 + max(int(np.flatnonzero(np.isin(full[i], np.concatenate(
      [g["easy"], g["hard"], g["junk"]]))).max()) for i, g in enumerate(ds.gnd))
  assert k < len(ds.database)
  deep = evaluate(FakeRetriever(), ds, {"top_k": k})
  assert not deep["search"]["full_ranking"] and deep["search"]["top_k"] == k
  _assert_revisited(deep, full, ds)  # the same numbers as the full ranking
  shallow = evaluate(FakeRetriever(), ds, {"top_k": 2})
  _assert_revisited(shallow, full[:, :2], ds, n_db=len(ds.database))
  assert shallow["metrics"]["medium"]["mAP"] < deep["metrics"]["medium"]["mAP"]
  # top_k=None falls back to auto_top_k when the [Q, N] int32 ranks exceed the budget.
  auto = evaluate(FakeRetriever(), ds, {"auto_top_k": 4, "memory_budget_mb": 25 * 4 / 2 ** 20})
  assert auto["search"]["top_k"] == 4


# --------------------------------------------------------------------------- store, shards


def test_store_round_trip_and_atomic_files(tmp_path, rng):
  store = DescriptorStore(tmp_path)
  x = rng.normal(size=(11, 5)).astype(np.float32)
  stored = store.write("k", 11, ((s, x[s:s + 4]) for s in range(0, 11, 4)))
  assert np.load(stored.paths[0]).dtype == np.float16
  np.testing.assert_array_equal(stored.read(), _f16(x))
  blocks = list(stored.chunks(3))
  assert [s for s, _ in blocks] == [0, 3, 6, 9]
  np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), _f16(x))
  idx = np.array([[10, 0], [4, 4]])
  np.testing.assert_array_equal(stored.take(idx), _f16(x)[idx])
  np.testing.assert_array_equal(DescriptorArray(x).take(idx), x[idx])
  with pytest.raises(ValueError, match="not finite"):
    store.write("bad", 2, iter([(0, np.array([[1.0], [1e6]]))]))
  with pytest.raises(ValueError, match="1 of 2 rows"):
    store.write("short", 2, iter([(0, np.ones((1, 5)))]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["k.shard000-of-001.npy"]


def test_process_sharding_writes_one_shard_per_process(tmp_path, rng):
  images = _images(rng, [0, 1, 2, 3, 0, 1, 2])
  store = DescriptorStore(tmp_path)
  key = descriptor_key("toy db", "database", "fake", len(images))
  assert [process_slice(7, p, 2) for p in (0, 1)] == [(0, 3), (3, 7)]
  fake = FakeRetriever()
  first = extract_to_store(fake, images, store, key, chunk_size=2, process_index=0,
                           process_count=2)
  assert first.rows == (0, 3) and not first.reused
  assert store.find(key, 7) is None
  with pytest.raises(ValueError, match="no complete descriptor shard set"):
    store.open(key, 7)
  second = extract_to_store(fake, images, store, key, chunk_size=2, process_index=1,
                            process_count=2)
  assert second.rows == (3, 7)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f"{key}.shard000-of-002.npy", f"{key}.shard001-of-002.npy"]
  assert [c["n"] for c in fake.calls] == [2, 1, 2, 2]  # each process its slice, in chunks
  np.testing.assert_array_equal(store.open(key, 7).read(), _describe(images))
  # A complete set is reused, whatever process count asks.
  assert extract_to_store(fake, images, store, key, process_index=0, process_count=1).reused
  assert len(fake.calls) == 4
  with pytest.raises(ValueError, match="process_index"):
    extract_to_store(fake, images, store, key, process_index=2, process_count=2)


# --------------------------------------------------------------------------- config, report


def test_config_errors_name_the_field(toy):
  ds, train = toy["revisited"], toy["train"]
  fake = FakeRetriever()
  for cfg, field in [({"scale": (1.0,)}, "unknown field"), ({"rerank": "qe"}, "rerank"),
                     ({"whitening": "zca"}, "whitening"), ({"top_k": 0}, "top_k"),
                     ({"save_ranks": True}, "save_ranks"), ({"qe_k": 11, "rerank": "aqe"},
                                                            "qe_k"),
                     ({"memory_budget_mb": 0}, "memory_budget_mb"), ({"scales": ()}, "scales")]:
    with pytest.raises(ValueError, match=field):
      evaluate(fake, ds, cfg)
  with pytest.raises(ValueError, match="whitening_set"):
    evaluate(fake, ds, {"whitening": "pca"})
  with pytest.raises(ValueError, match="whitening_set"):
    evaluate(fake, ds, {}, whitening_set=train)
  assert fake.calls == []  # every check runs before any extraction
  assert default_eval_config().crop_queries is True


def test_write_report_is_atomic_json(tmp_path):
  path = tmp_path / "out" / "report.json"
  write_report({"a": np.float32(0.5), "b": np.arange(2), "c": (1, 2)}, path)
  assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1], "c": [1, 2]}
  with pytest.raises(TypeError):
    write_report({"a": object.__new__(type("Unjsonable", (), {"__str__": None}))}, path)
  assert json.loads(path.read_text())["a"] == 0.5  # the old report survives a failed write
  assert [p.name for p in path.parent.iterdir()] == ["report.json"]


# --------------------------------------------------------------------------- a real model


def _untrained_tiny_retriever():
  """An untrained tiny_resnet + GeM Retriever. Its weights are drawn here (He-normal kernels,
  identity batch norm) rather than by ``Retriever.from_config``, whose jitted initialiser takes
  ~20 s to compile on a 2-core CPU."""
  import jax
  import jax.numpy as jnp

  from retrieval_jax.models import build_backbone
  from retrieval_jax.retriever import Retriever, default_config

  cfg = default_config()
  cfg.update({"backbone": "tiny_resnet", "pretrained": False, "pooling": "gem", "max_size": 64,
              "bucket_step": 32, "batch_size": 4})
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


def test_real_tiny_retriever_end_to_end():
  retriever = _untrained_tiny_retriever()
  rng = np.random.default_rng(1)
  db = [rng.integers(0, 256, (64, 48 + 8 * (i % 3), 3), dtype=np.uint8) for i in range(8)]
  queries = [db[1][8:56, 4:44], rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), db[5]]
  boxes = np.array([[0, 0, 40, 48], [8, 8, 56, 56], [np.nan] * 4], np.float32)
  gnd = [{"easy": [1], "hard": [0], "junk": []}, {"easy": [2, 3], "hard": [4], "junk": [7]},
         {"easy": [5], "hard": [6], "junk": []}]
  ds = RetrievalSet(name="tiny_real", database=db, queries=queries, gnd=gnd,
                    query_boxes=boxes)
  report = evaluate(retriever, ds, {"max_size": 64, "scales": (1.0, 0.75)})
  db_d = _f16(retriever.extract(db, 64, (1.0, 0.75)))
  q_d = _f16(retriever.extract(queries, 64, (1.0, 0.75), boxes=boxes))
  _assert_revisited(report, _ranks(q_d, db_d), ds)
  assert report["extraction"]["descriptor_dim"] == db_d.shape[1]
  # The cache identity follows the weights.
  before = retriever_fingerprint(retriever)
  assert retriever_fingerprint(retriever) == before
  retriever.variables["head"]["params"]["p"] = np.float32(3.5)
  assert retriever_fingerprint(retriever) != before


def test_reports_are_written_with_the_default_file_mode(tmp_path):
  import os  # noqa: PLC0415
  write_report({"mAP": 0.5}, tmp_path / "report.json")
  mask = os.umask(0)
  os.umask(mask)
  assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~mask
  assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
