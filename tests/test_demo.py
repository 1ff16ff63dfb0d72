"""The interim demo runs end to end and retrieves far better than chance."""

import json

import numpy as np

from retrieval_jax import cli, demo, metrics


def test_demo_small_run_writes_report_and_beats_chance(tmp_path):
  cfg = demo.SimulationConfig(channels=32, test_instances=6, views_per_instance=6, distractors=30,
                              train_instances=40, train_views=4, seed=3)
  report = demo.run(cfg, tmp_path)
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["mAP"] == report["mAP"]
  assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file

  # Chance level: the same ground truth scored on random rankings.
  bench = demo.build_benchmark(cfg)
  rng = np.random.default_rng(0)
  n_db = len(bench["db_maps"])
  ranks = np.stack([rng.permutation(n_db) for _ in bench["query_maps"]])
  chance = 100 * metrics.compute_map(ranks, metrics.revisited_gnd(bench["gnd"], "medium"))[0]
  for pipeline, scores in report["mAP"].items():
    assert 0.0 <= scores["medium"] <= 100.0
  assert report["mAP"]["GeM"]["medium"] > 3 * chance
  assert report["mAP"]["GeM + Lw + aQE (k=3, a=3)"]["medium"] > 3 * chance


def test_cli_dispatch(capsys):
  assert cli.main(["--help"]) == 0
  assert "demo" in capsys.readouterr().out
  assert cli.main(["no-such-command"]) == 2
  assert "unknown command 'no-such-command'" in capsys.readouterr().err
