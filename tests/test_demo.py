"""The end-to-end demo (``retrieval-jax demo``) on a seconds-long tiny config, its precision-recall
curve against brute force, and the command line's error handling."""

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from retrieval_jax import cli, demo, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
# configs/demo.py's smoke recipe: an untrained tiny ResNet on the tiny preset at 64 px.
TINY = ["--config.data.preset=tiny", "--config.model.backbone=tiny_resnet",
        "--config.model.pretrained=False", "--config.data.image_size=64",
        "--config.eval.max_size=64", "--config.mining.num_negatives=2",
        "--config.mining.query_size=12", "--config.mining.pool_size=24",
        "--config.train.epochs=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """``(output directory, report.json, printed text)`` of one tiny demo run via the CLI."""
  out = tmp_path_factory.mktemp("demo")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    status = cli.main(["demo", "--out", str(out), "--config", str(REPO / "configs" / "demo.py"),
                       "--no-progress", "--search-queries", "4", "-k", "5", *TINY])
  assert status == 0
  return out, json.loads((out / "report.json").read_text()), printed.getvalue()


def test_demo_writes_report_and_figures(tiny_run):
  out, report, printed = tiny_run
  for name, min_size in (("training_curve.png", (600, 400)), ("pr_curve.png", (500, 400)),
                         ("results.png", (5 * 128, 4 * 128))):
    with Image.open(out / name) as image:
      assert image.format == "PNG"
      assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], name
      pixels = np.asarray(image.convert("RGB"), np.float32)
    assert pixels.std() > 5.0, f"{name} is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{name} is nearly uniform"
  assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # atomic writes
  assert (out / "index" / "manifest.json").is_file()
  assert (out / "train" / "retriever" / "config.json").is_file()
  # The printed table: before, after and change rows, then the search summary.
  assert "before: untrained (random weights)" in printed
  assert "after: fine-tuned (6 steps)" in printed
  assert "ScaNN index" in printed


def test_demo_report_is_consistent(tiny_run):
  out, report, _ = tiny_run
  n_db, n_q = report["dataset"]["database"], report["dataset"]["queries"]
  assert report["dataset"]["name"] == "synthetic_landmarks/tiny:test"
  assert report["extraction"]["max_size"] == 64
  assert report["extraction"]["query_crop"] == "query_boxes"
  for stage in ("before", "after"):
    assert set(report["mAP"][stage]) == set(metrics.PROTOCOLS)
    for protocol, value in report["mAP"][stage].items():
      assert 0.0 <= value <= 1.0
      assert value == report["scores"][stage][protocol]["mAP"]
      assert report["mAP"]["change"][protocol] == pytest.approx(
          report["mAP"]["after"][protocol] - report["mAP"]["before"][protocol])
    ranks = np.load(out / stage / "ranks.npy")  # the runner's full rankings
    assert ranks.shape == (n_q, n_db)
    assert (np.sort(ranks, axis=1) == np.arange(n_db)).all()
  assert report["training"]["steps"] == 6 and report["training"]["epochs"] == 2

  search = report["search"]
  assert search["kind"] == "scann" and search["rows"] == n_db and search["k"] == 5
  assert len(search["queries"]) == 4
  assert len({e["query"] for e in search["queries"]}) == 4
  for entry in search["queries"]:
    assert 0 <= entry["query"] < n_q
    ids = [r["id"] for r in entry["results"]]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(0 <= i < n_db for i in ids)
    assert [r["rank"] for r in entry["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in entry["results"]]
    assert scores == sorted(scores, reverse=True)
    assert entry["correct"] == sum(r["correct"] is True for r in entry["results"])
  assert 0.0 <= search["exact_agreement"] <= 1.0

  pr = report["precision_recall"]
  assert len(pr["recall"]) == len(pr["before"]) == len(pr["after"]) == 101
  for curve in (pr["before"], pr["after"]):
    assert all(0.0 <= p <= 1.0 for p in curve)
    assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))  # interpolated: non-increasing

  records = [json.loads(line) for line in
             (out / "train" / "metrics.jsonl").read_text().splitlines()]
  curve = demo.read_training_curve(out / "train")
  assert len(curve["loss"]) == sum(r["kind"] == "train" for r in records) == 6
  assert len(curve["val_map"]) == 3  # before training and after each epoch


def _brute_force_pr(ranks, gnd, levels):
  """Interpolated precision by enumeration: per query, walk the list without its junk."""
  curves = []
  for row, g in zip(ranks, gnd):
    ok = {int(i) for i in g["ok"]}
    junk = {int(i) for i in g.get("junk", ())} - ok
    if not ok:
      continue
    kept = [int(i) for i in row if int(i) not in junk]
    hits = np.cumsum([i in ok for i in kept])
    precision = hits / np.arange(1, len(kept) + 1)
    recall = hits / len(ok)
    curves.append([max([p for p, r in zip(precision, recall) if r >= level - 1e-9], default=0.0)
                   for level in levels])
  return np.mean(curves, axis=0)


def test_precision_recall_curve_by_hand():
  # Junk (4) removed, the list reads 1 3 0 9 5 6 2: positives at 1, 4 and 7 -> precision 1, 1/2,
  # 3/7 at recall 1/3, 2/3, 1.
  ranks = np.array([[1, 4, 3, 0, 9, 5, 6, 2, 7, 8]])
  gnd = [{"ok": [1, 2, 9], "junk": [4]}]
  np.testing.assert_allclose(metrics.precision_recall_curve(ranks, gnd, [0.0, 0.5, 1.0]),
                             [1.0, 0.5, 3 / 7])
  perfect = metrics.precision_recall_curve(ranks, [{"ok": [1, 4], "junk": []}])
  np.testing.assert_allclose(perfect, np.ones(101))


def test_precision_recall_curve_matches_brute_force():
  levels = np.linspace(0, 1, 11)  # 0.3 * 10 positives is not exactly 3 in floating point
  # Hand-made: junk ahead of positives, a positive beyond a truncated list (n_db=10, 8 ranked),
  # a query without positives (excluded), a query whose positives are all junk-adjacent.
  ranks = np.array([[3, 1, 4, 0, 5, 9, 2, 6],
                    [0, 1, 2, 3, 4, 5, 6, 7],
                    [0, 1, 2, 3, 4, 5, 6, 7],
                    [7, 6, 5, 4, 3, 2, 1, 0]])
  gnd = [{"ok": [1, 2, 9], "junk": [4]},
         {"ok": [8], "junk": []},
         {"ok": [], "junk": [3]},
         {"ok": [7, 0], "junk": [6, 1, 0]}]
  got = metrics.precision_recall_curve(ranks, gnd, levels, n_db=10)
  np.testing.assert_allclose(got, _brute_force_pr(ranks, gnd, levels), rtol=0, atol=1e-12)
  # Random full rankings with 10 positives (levels land exactly on recalls) and junk.
  rng = np.random.default_rng(0)
  for _ in range(20):
    n_db, n_q = 40, 6
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    gnd = []
    for _ in range(n_q):
      chosen = rng.permutation(n_db)
      gnd.append({"ok": chosen[:10], "junk": chosen[10:10 + rng.integers(0, 6)]})
    got = metrics.precision_recall_curve(ranks, gnd, levels)
    np.testing.assert_allclose(got, _brute_force_pr(ranks, gnd, levels), rtol=0, atol=1e-12)


def test_precision_recall_curve_rejects_bad_input():
  with pytest.raises(ValueError, match="recall_levels"):
    metrics.precision_recall_curve(np.array([[0, 1]]), [{"ok": [0]}], [0.5, 1.5])
  with pytest.raises(ValueError, match="no positives"):
    metrics.precision_recall_curve(np.array([[0, 1]]), [{"ok": []}])


def test_run_demo_rejects_other_data_sources(tmp_path):
  with pytest.raises(ValueError, match="data.source must be 'synthetic'"):
    demo.run_demo({"data": {"source": "folder", "train": "x", "val": "y"}}, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--bad-flag"], "unrecognized arguments: --bad-flag"),
    (["--config", "no/such/config.py"], "--config: no/such/config.py is not a file."),
    (["--config.train.epochs"], "--config.train.epochs needs a value"),
    (["--config.train.nope=3"], "train.nope is not a config field"),
])
def test_demo_cli_errors(argv, message, capsys, tmp_path):
  assert cli.main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("retrieval-jax demo: error: ") and message in err
  assert err.count("\n") == 1  # one line
  assert not (tmp_path / "out").exists()


def test_cli_dispatch(capsys):
  assert cli.main(["--help"]) == 0
  assert "demo" in capsys.readouterr().out
  assert cli.main(["no-such-command"]) == 2
  assert "unknown command 'no-such-command'" in capsys.readouterr().err
