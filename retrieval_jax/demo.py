"""The end-to-end demo: off-the-shelf retrieval, fine-tuning, retrieval again, a ScaNN search.

>>> report = run_demo(load_config_file("configs/demo.py"), "runs/demo")   # ``make demo``
>>> print(format_summary(report))

On the synthetic benchmark (:mod:`retrieval_jax.data.synthetic`, generated locally from the
config's ``data.preset`` and ``data.seed``; nothing is downloaded), :func:`run_demo`:

1. scores the model the config starts from (``model``: ImageNet EfficientNet-Lite0 + GeM in
   ``configs/demo.py``) on the **test** split: revisited Easy / Medium / Hard mAP, queries cropped
   to their boxes, at the validation settings (``eval.max_size``, ``eval.scales``), by
   :func:`retrieval_jax.evaluation.evaluate_descriptors`;
2. fine-tunes it with :func:`retrieval_jax.training.train` in ``<out>/train`` (resumable: an
   interrupted demo continues from its latest checkpoint);
3. scores the fine-tuned model (the final weights, ``<out>/train/retriever``) the same way;
4. builds a ScaNN index of the fine-tuned test database descriptors (``<out>/index``), loads it
   back and searches a few queries with it, judging each result by the medium protocol;
5. writes ``report.json`` (before / after scores, search results, config, timings, versions),
   ``training_curve.png`` (train loss and validation mAP per step, from ``metrics.jsonl``),
   ``pr_curve.png`` (interpolated precision-recall of the medium protocol, before vs after) and
   ``results.png`` (the searched queries and their top results framed green / red / grey), and
   the runner's own ``before/`` and ``after/`` reports with their ``ranks.npy``.

These are synthetic-benchmark numbers (procedural facades), not Oxford or Paris.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from retrieval_jax import metrics, visualize
from retrieval_jax.metrics import RECALL_LEVELS, precision_recall_curve
from retrieval_jax.data.datasets import RetrievalSet
from retrieval_jax.evaluation.descriptors import retriever_fingerprint
from retrieval_jax.evaluation.runner import evaluate_descriptors, write_report
from retrieval_jax.retriever import Retriever
from retrieval_jax.training.config import stage_configs, validate_config
from retrieval_jax.training.loop import load_backbone, resolve_config, train

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- description


class _CountingImages(Sequence):
  """``images`` that advances a progress bar as the loader reads each one (the loader's
  threads read every image once, a batch or two ahead of the device)."""

  def __init__(self, images: Sequence[Any], bar: Any):
    self.images, self.bar = images, bar

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("a counted image sequence is read one image at a time.")
    item = self.images[index]
    self.bar.update(1)
    return item


def _describe(retriever: Retriever, images: Sequence[Any], boxes: np.ndarray | None,
              eval_cfg: ml_collections.ConfigDict, desc: str, progress: bool) -> np.ndarray:
  """float32 ``[N, D]`` descriptors at the evaluation settings, with a progress bar."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  with tqdm(total=len(images), desc=desc, unit="img", disable=not progress,
            dynamic_ncols=True) as bar:
    return retriever.extract(_CountingImages(images, bar), eval_cfg.max_size, eval_cfg.scales,
                             eval_cfg.batch_size, boxes=boxes, num_workers=eval_cfg.num_workers)


def _evaluate(retriever: Retriever, test: RetrievalSet, eval_cfg: ml_collections.ConfigDict,
              out: pathlib.Path, label: str, progress: bool) -> dict[str, Any]:
  """The runner's report on ``test`` (written to ``out``), with the descriptors and ranks."""
  crop = eval_cfg.crop_queries and test.query_boxes is not None
  database = _describe(retriever, test.database, None, eval_cfg, f"{label}: database",
                       progress)
  queries = _describe(retriever, test.queries, test.query_boxes if crop else None, eval_cfg,
                      f"{label}: queries", progress)
  cfg = ml_collections.ConfigDict(eval_cfg.to_dict())
  cfg.update(output_dir=str(out), save_ranks=True, cache_dir=None)
  report = evaluate_descriptors(queries, database, test, cfg)
  report["extraction"].update(max_size=eval_cfg.max_size, scales=list(eval_cfg.scales),
                              query_crop="query_boxes" if crop else "none")
  return {"report": report, "ranks": np.load(out / "ranks.npy"), "queries": queries,
          "database": database}


def _initial_retriever(cfg: ml_collections.ConfigDict) -> Retriever:
  """The model training starts from, built as the train loop builds it (the first stage's
  model of a staged config)."""
  first = stage_configs(cfg)[0]
  if first.train.init_backbone:
    return Retriever.from_backbone_variables(
        first.model, load_backbone(first.train.init_backbone, first.model.backbone))
  return Retriever.from_config(first.model)


def _before_label(cfg: ml_collections.ConfigDict) -> str:
  from retrieval_jax.models import PRETRAINED  # noqa: PLC0415

  if cfg.train.init_backbone:
    return "initial (train.init_backbone)"
  if cfg.model.pretrained and cfg.model.backbone.replace("_", "-") in PRETRAINED:
    return "ImageNet (off the shelf)"
  return "untrained (random weights)"


# --------------------------------------------------------------------------- search


def _search(database: np.ndarray, queries: np.ndarray, chosen: np.ndarray, test: RetrievalSet,
            exact_ranks: np.ndarray, k: int, index_dir: pathlib.Path,
            model_id: str) -> dict[str, Any]:
  """Builds, saves and reloads a ScaNN index of ``database`` and searches the ``chosen``
  queries; each result is judged by the medium protocol (easy or hard: correct, junk: None)."""
  from retrieval_jax.search import ScannIndex, build_index  # noqa: PLC0415

  t = time.perf_counter()
  # One thread: ScaNN's threaded k-means would make the codebooks (and ties) vary per run.
  index = build_index(database, mode="scann", model_id=model_id, num_threads=1,
                      metadata=[f"database[{i}]" for i in range(len(database))])
  index.save(index_dir)
  build_s = time.perf_counter() - t
  index = ScannIndex.load(index_dir, model_id=model_id)  # searches what was saved
  k = min(k, index.num_rows)
  t = time.perf_counter()
  scores, ids = index.search(queries[chosen], k)
  search_s = time.perf_counter() - t
  medium = metrics.revisited_gnd(test.gnd, "medium")
  rows, agree = [], 0
  for q, found, found_scores in zip(chosen, ids, scores):
    ok, junk = set(medium[q]["ok"].tolist()), set(medium[q]["junk"].tolist())
    results = [{"rank": r + 1, "id": int(i), "score": float(s),
                "correct": None if int(i) in junk else int(i) in ok}
               for r, (i, s) in enumerate(zip(found, found_scores)) if int(i) >= 0]
    agree += len({r["id"] for r in results} & set(exact_ranks[q, :k].tolist()))
    judged = [r["correct"] for r in results if r["correct"] is not None]
    rows.append({"query": int(q), "positives": len(ok), "correct": sum(judged),
                 "judged": len(judged), "results": results})
  return {"index": str(index_dir), "kind": index.kind, "rows": index.num_rows, "dim": index.dim,
          "params": index.params, "k": k, "queries": rows,
          "correct": sum(r["correct"] for r in rows), "judged": sum(r["judged"] for r in rows),
          # ScaNN is approximate: how many of its top-k are also the exact top-k.
          "exact_agreement": agree / (k * len(chosen)) if len(chosen) else None,
          "build_s": build_s, "search_s": search_s}


# --------------------------------------------------------------------------- figures


def _save_figure(fig: Any, path: pathlib.Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  from PIL import Image  # noqa: PLC0415

  visualize.save_png(Image.open(buffer), path)  # atomic


def _figure(width: float, height: float) -> Any:
  # A Figure with its own Agg canvas: no pyplot, so no global backend is switched and nothing
  # needs a display.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def read_training_curve(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Train loss and validation mAP per step from a training run's ``metrics.jsonl``.

  Staged runs (``workdir/stage_<i>/metrics.jsonl``) are joined, each stage's steps offset by the
  steps before it.

  Returns:
    ``{"loss_step", "loss", "val_step", "val_map"}``: float arrays; ``val_map`` is the medium
    mAP of revisited validation sets (the loop's headline number).
  """
  workdir = pathlib.Path(workdir)
  files = [workdir / "metrics.jsonl"]
  if not files[0].exists():
    files = sorted(workdir.glob("stage_*/metrics.jsonl"), key=lambda p: int(p.parent.name[6:]))
  curve: dict[str, list[float]] = {"loss_step": [], "loss": [], "val_step": [], "val_map": []}
  offset = 0
  for path in files:
    last = 0
    for line in path.read_text().splitlines():
      if not line.strip():
        continue
      record = json.loads(line)
      step = offset + record["step"]
      last = max(last, record["step"])
      if record["kind"] == "train":
        curve["loss_step"].append(step)
        curve["loss"].append(record["loss"])
      elif record["kind"] == "eval":
        curve["val_step"].append(step)
        curve["val_map"].append(record["val_map"])
    offset += last
  return {name: np.asarray(values, np.float64) for name, values in curve.items()}


def _plot_training_curve(curve: dict[str, np.ndarray], title: str, path: pathlib.Path) -> None:
  fig = _figure(7.0, 5.5)
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.plot(curve["loss_step"], curve["loss"], color="tab:blue", linewidth=1.0, marker=".",
           markersize=3)
  top.set_ylabel("train loss")
  top.set_title(title, fontsize=11)
  top.grid(alpha=0.3)
  bottom.plot(curve["val_step"], 100 * curve["val_map"], color="tab:orange", marker="o")
  for step, value in zip(curve["val_step"], curve["val_map"]):
    bottom.annotate(f"{100 * value:.1f}", (step, 100 * value), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
  bottom.set_xlabel("step")
  bottom.set_ylabel("validation medium mAP (%)")
  bottom.grid(alpha=0.3)
  fig.tight_layout()
  _save_figure(fig, path)


def _plot_pr(levels: np.ndarray, curves: dict[str, np.ndarray], title: str,
             path: pathlib.Path) -> None:
  fig = _figure(6.0, 5.0)
  ax = fig.subplots()
  for (label, curve), color in zip(curves.items(), ("tab:gray", "tab:green")):
    ax.plot(levels, curve, label=label, color=color, linewidth=2)
  ax.set_xlabel("recall")
  ax.set_ylabel("interpolated precision (mean over queries)")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save_figure(fig, path)


def _results_grid(test: RetrievalSet, search: dict[str, Any], path: pathlib.Path) -> None:
  entries = search["queries"]
  boxes = test.query_boxes
  image = visualize.result_grid(
      [test.queries[e["query"]] for e in entries],
      [[test.database[r["id"]] for r in e["results"]] for e in entries],
      correct=[[r["correct"] for r in e["results"]] for e in entries],
      query_boxes=None if boxes is None else [boxes[e["query"]] for e in entries],
      captions=[[f"{r['rank']}  {r['score']:.3f}" for r in e["results"]] for e in entries],
      query_captions=[f"query {e['query']}: {e['correct']}/{e['judged']}" for e in entries])
  visualize.save_png(image, path)


# --------------------------------------------------------------------------- the demo


def _headline(report: dict[str, Any]) -> dict[str, float]:
  return {p: float(report["metrics"][p]["mAP"]) for p in metrics.PROTOCOLS}


def run_demo(cfg: ml_collections.ConfigDict | dict, out_dir: str | os.PathLike, *,
             search_queries: int = 4, top_k: int = 8, resume: bool = True,
             progress: bool = True) -> dict[str, Any]:
  """Runs the demo of the module docstring with a training config and returns its report.

  Args:
    cfg: a training config (``configs/demo.py``; fields of
      :func:`retrieval_jax.training.default_train_config`) on the synthetic benchmark
      (``data.source = "synthetic"``); ``eval`` sets how the test split is scored.
    out_dir: where everything goes (see the module docstring); training runs in
      ``out_dir/train``.
    search_queries: test queries searched with the ScaNN index (spread over the query list).
    top_k: results per searched query.
    resume: continue the training of a previous demo in ``out_dir`` (False: refuse it).
    progress: progress bars.

  Returns:
    The report, also in ``out_dir/report.json``: ``mAP`` (``before`` / ``after``, E/M/H as
    fractions), ``scores`` (the runner's metrics with mP@k), ``excluded_queries``,
    ``training`` (the train loop's summary), ``search``, ``precision_recall``, ``dataset``,
    ``extraction``, ``config``, ``files``, ``timings_s``, ``versions``.

  Raises:
    ValueError: an invalid config (naming the field), a data source other than synthetic,
      or ``resume=False`` with a previous training in ``out_dir``.
    TrainingDivergedError: training diverged.
  """
  start = time.perf_counter()
  cfg = resolve_config(cfg)
  validate_config(cfg, num_devices=jax.device_count())  # fail before generating any photo
  if cfg.data.source != "synthetic":
    raise ValueError(f"data.source must be 'synthetic' for the demo (it scores the synthetic "
                     f"test split); got {cfg.data.source!r}.")
  for name, value in (("search_queries", search_queries), ("top_k", top_k)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int; got {value!r}.")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  timings: dict[str, float] = {}

  from retrieval_jax.data.synthetic import generate  # noqa: PLC0415

  log.info("generating the synthetic benchmark %r (seed %d) ...", cfg.data.preset,
           cfg.data.seed)
  t = time.perf_counter()
  bench = generate(cfg.data.preset, seed=cfg.data.seed, image_size=cfg.data.synthetic_image_size)
  test = bench.test
  timings["generate"] = time.perf_counter() - t

  before_label = _before_label(cfg)
  log.info("1/4 scoring the %s model on %s", before_label.split(" (")[0], test.name)
  t = time.perf_counter()
  initial = _initial_retriever(cfg)
  # Training starts from the saved model scored here (train.init_backbone), so "before" is
  # exactly its starting point and the backbone is not initialised twice (a random init
  # compiles for seconds).
  shutil.rmtree(out / "initial", ignore_errors=True)
  initial.save(out / "initial")
  before = _evaluate(initial, test, cfg.eval, out / "before", "before", progress)
  timings["evaluate_before"] = time.perf_counter() - t

  log.info("2/4 fine-tuning in %s", out / "train")
  train_cfg = resolve_config(cfg)  # a copy
  train_cfg.train.init_backbone = str((out / "initial").absolute())
  train_cfg.train.progress = cfg.train.progress and progress
  t = time.perf_counter()
  summary = train(train_cfg, out / "train", resume=resume)
  timings["train"] = time.perf_counter() - t

  log.info("3/4 scoring the fine-tuned model")
  t = time.perf_counter()
  tuned = Retriever.load(summary["retriever"])
  after = _evaluate(tuned, test, cfg.eval, out / "after", "after", progress)
  timings["evaluate_after"] = time.perf_counter() - t

  log.info("4/4 ScaNN index of the fine-tuned database descriptors, figures")
  n_q = len(test.queries)
  chosen = np.unique(np.linspace(0, n_q - 1, min(search_queries, n_q)).round().astype(np.int64))
  model_id = json.dumps({"retriever": retriever_fingerprint(tuned),
                         "max_size": int(cfg.eval.max_size),
                         "scales": [float(s) for s in cfg.eval.scales]}, sort_keys=True)
  t = time.perf_counter()
  search = _search(after["database"], after["queries"], chosen, test, after["ranks"], top_k,
                   out / "index", model_id)
  timings["search"] = time.perf_counter() - t

  t = time.perf_counter()
  medium = metrics.revisited_gnd(test.gnd, "medium")
  pr = {"protocol": "medium", "interpolation": "max precision at recall >= level",
        "recall": RECALL_LEVELS,
        "before": precision_recall_curve(before["ranks"], medium, n_db=len(test.database)),
        "after": precision_recall_curve(after["ranks"], medium, n_db=len(test.database))}
  files = {"report": out / "report.json", "training_curve": out / "training_curve.png",
           "pr_curve": out / "pr_curve.png", "results": out / "results.png",
           "index": out / "index", "initial_retriever": out / "initial",
           "retriever": pathlib.Path(summary["retriever"]),
           "metrics": out / "train" / "metrics.jsonl", "before": out / "before" / "report.json",
           "after": out / "after" / "report.json"}
  curve = read_training_curve(out / "train")
  _plot_training_curve(curve, f"Fine-tuning {cfg.model.backbone} + {cfg.model.pooling} "
                              f"({cfg.loss.name} loss)\non {bench.train.name}",
                       files["training_curve"])
  before_map, after_map = _headline(before["report"]), _headline(after["report"])
  _plot_pr(RECALL_LEVELS, {
      f"{before_label}: mAP {100 * before_map['medium']:.1f}": pr["before"],
      f"fine-tuned: mAP {100 * after_map['medium']:.1f}": pr["after"]},
      f"{test.name}, medium protocol ({n_q} queries)", files["pr_curve"])
  _results_grid(test, search, files["results"])
  timings["figures"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start

  report = {
      "what": "retrieval_jax demo: off-the-shelf vs fine-tuned retrieval on the synthetic "
              "benchmark (procedural facades, not Oxford or Paris); mAP as fractions",
      "dataset": {"name": test.name, "preset": cfg.data.preset, "seed": cfg.data.seed,
                  "database": len(test.database), "queries": n_q,
                  "train_images": len(bench.train), "generate_s": bench.seconds},
      "extraction": after["report"]["extraction"],
      "mAP": {"before": before_map, "after": after_map,
              "change": {p: after_map[p] - before_map[p] for p in metrics.PROTOCOLS}},
      "before_model": before_label,
      "after_model": "the final weights of the training run",
      "scores": {"before": before["report"]["metrics"], "after": after["report"]["metrics"]},
      "excluded_queries": after["report"]["excluded_queries"],
      "training": summary,
      "search": search,
      "precision_recall": pr,
      "config": cfg.to_dict(),
      "files": files,
      "timings_s": {name: round(value, 2) for name, value in timings.items()},
      "versions": after["report"]["versions"],
  }
  write_report(report, files["report"])
  # The report as saved (JSON types only), so the caller and report.json agree.
  return json.loads(files["report"].read_text())


def format_summary(report: dict[str, Any]) -> str:
  """The report as a short printable table: before / after mAP (in %) and the search."""
  ds, maps, tr, se = report["dataset"], report["mAP"], report["training"], report["search"]
  ex = report["extraction"]
  lines = [
      f"{ds['name']}: {ds['database']} database photos, {ds['queries']} queries "
      f"(cropped to their boxes: {ex['query_crop'] == 'query_boxes'}), {ex['max_size']} px; "
      f"revisited mAP in %",
      f"{'model':<34} {'Easy':>6} {'Medium':>7} {'Hard':>6}"]
  rows = (("before: " + report["before_model"], maps["before"], "{:>6.1f}"),
          (f"after: fine-tuned ({tr['steps']} steps)", maps["after"], "{:>6.1f}"),
          ("change", maps["change"], "{:>+6.1f}"))
  for name, values, fmt in rows:
    e, m, h = (fmt.format(100 * values[p]) for p in metrics.PROTOCOLS)
    lines.append(f"{name:<34} {e} {m:>7} {h}")
  lines.append(
      f"ScaNN index ({se['rows']} x {se['dim']}, {se['index']}): {len(se['queries'])} queries, "
      f"top {se['k']}: {se['correct']} of {se['judged']} judged results correct (medium "
      f"protocol; junk not judged); {100 * se['exact_agreement']:.0f}% of the results are the "
      f"exact top {se['k']}.")
  for entry in se["queries"]:
    marks = "".join({True: "+", False: "-", None: "j"}[r["correct"]] for r in entry["results"])
    lines.append(f"  query {entry['query']:>3}: {marks}  ({entry['positives']} positives)")
  lines.append(f"total {report['timings_s']['total']:.0f} s (training "
               f"{report['timings_s']['train']:.0f} s); figures and report.json in "
               f"{pathlib.Path(report['files']['report']).parent}")
  return "\n".join(lines)
