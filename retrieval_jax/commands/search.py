"""``retrieval-jax search``: the top-k database images of query images.

    retrieval-jax search q1.jpg queries/ --index index/ --retriever runs/demo/train/retriever \\
        -k 10 --json results.json --grid results.png
    retrieval-jax search --dataset synthetic:tiny --retriever runs/demo/train/retriever \\
        -k 8 --grid results.png

With ``--index`` (built by ``retrieval-jax index``), the queries are image files, folders or
text lists, described with the same model and settings as the index (a different model is
refused); results are the database image paths. With ``--dataset`` (see ``retrieval-jax
datasets``), the queries and the database are the benchmark's (queries cropped to their boxes
unless ``--no-crop``) and every result is judged against the ground truth: correct, wrong or
junk, in the printout, the JSON and the grid (green, red, grey frames).

Prints each query's ranked list (rank, inner-product score, path); ``--json FILE`` writes the
same, ``--grid FILE.png`` draws queries in rows with their results as thumbnails.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np

from retrieval_jax._atomic import write_json
from retrieval_jax.commands import _common

NAME = "search"


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("queries", nargs="*", metavar="QUERIES",
                      help="query image files, folders or text lists (with --index)")
  source = parser.add_argument_group("database (one of)").add_mutually_exclusive_group(
      required=True)
  source.add_argument("--index", metavar="DIR", help="an index built by 'retrieval-jax index'")
  source.add_argument("--dataset", metavar="NAME",
                      help="a benchmark: synthetic:tiny, revisited_landmarks/roxford5k, "
                           "folder:PATH, ... (its queries, database and ground truth)")
  _common.add_retriever_args(parser)
  _common.add_extraction_args(parser)
  parser.add_argument("-k", "--top-k", dest="k", type=_common.positive_int, default=10,
                      help="results per query (default 10)")
  parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
  parser.add_argument("--grid", metavar="FILE.png", help="draw queries and results as a PNG")
  parser.add_argument("--grid-rows", type=_common.positive_int, default=10, metavar="N",
                      help="queries drawn in the grid (default 10)")
  parser.add_argument("--thumb-size", type=_common.positive_int, default=128, metavar="PX",
                      help="grid thumbnail side (default 128)")
  data = parser.add_argument_group("with --dataset")
  data.add_argument("--num-queries", type=_common.positive_int, metavar="N",
                    help="only the first N queries (default all)")
  data.add_argument("--no-crop", action="store_true", help="do not crop queries to their boxes")
  data.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
  data.add_argument("--manual-dir", metavar="DIR", help="downloaded files of a benchmark")
  data.add_argument("--seed", type=int, default=0, help="synthetic benchmark seed (default 0)")
  data.add_argument("--image-size", type=_common.positive_int, metavar="PX",
                    help="synthetic photo size (default the preset's, 256)")
  return parser


# --------------------------------------------------------------------------- index mode


def _load_index(directory: str):
  """The saved index at ``directory`` and its manifest."""
  root = pathlib.Path(directory)
  manifest_file = root / "manifest.json"
  if not manifest_file.is_file():
    raise _common.CommandError(f"--index {root}: not an index directory (no manifest.json); "
                               f"build one with 'retrieval-jax index'.")
  manifest = json.loads(manifest_file.read_text())
  from retrieval_jax import search  # noqa: PLC0415

  kinds = {"exact": search.ExactIndex, "scann": search.ScannIndex,
           "sharded": search.ShardedIndex}
  kind = manifest.get("kind")
  if kind not in kinds:
    raise _common.CommandError(f"--index {root}: unknown index kind {kind!r}.")
  return kinds[kind].load(root), manifest


def _id_to_path(index: Any) -> dict[int, str]:
  """User id -> metadata (image path) over an index (or the shards of a sharded one)."""
  mapping: dict[int, str] = {}
  for part in getattr(index, "shards", [index]):
    if part.metadata is None:
      raise _common.CommandError("the index was built without image paths (metadata); build "
                                 "it with 'retrieval-jax index' from an extract directory.")
    mapping.update(zip((int(i) for i in part.ids), part.metadata))
  return mapping


def _check_model(retriever: Any, manifest: dict, settings: dict[str, Any]) -> None:
  built = _common.parse_model_id(manifest.get("model_id", ""))
  if "retriever" not in built:
    return
  ours = _common.parse_model_id(_common.model_id(retriever, settings))
  if ours["retriever"] != built["retriever"]:
    raise _common.CommandError(
        f"the index holds descriptors of another model (fingerprint {built['retriever']}; "
        f"this one is {ours['retriever']}); search with the --retriever/--pretrained that "
        f"'retrieval-jax extract' used.")


def _index_mode(args: argparse.Namespace, retriever: Any) -> dict[str, Any]:
  if not args.queries:
    raise _common.CommandError("no query images given; name files, folders or lists before "
                               "--index.")
  paths = _common.image_list(args.queries)
  index, manifest = _load_index(args.index)
  built = _common.parse_model_id(manifest.get("model_id", ""))
  if args.max_size is None and "max_size" in built:
    args.max_size = int(built["max_size"])
  if args.scales is None and "scales" in built:
    args.scales = tuple(built["scales"])
  settings = _common.extraction_settings(retriever, args)
  _check_model(retriever, manifest, settings)
  names = _id_to_path(index)
  queries = retriever.extract(paths, settings["max_size"], settings["scales"], args.batch_size,
                              num_workers=args.workers)
  k = min(args.k, index.num_rows)
  scores, ids = index.search(queries, k)
  results = []
  for q, path in enumerate(paths):
    rows = [{"rank": r + 1, "id": int(i), "path": names[int(i)], "score": float(s)}
            for r, (i, s) in enumerate(zip(ids[q], scores[q])) if int(i) >= 0]
    results.append({"query": path, "results": rows})
  return {"index": str(args.index), "dataset": None, "k": k, **settings,
          "queries": results}


# --------------------------------------------------------------------------- dataset mode


def _truth(dataset: Any, q: int) -> tuple[set[int], set[int]]:
  """``(positives, junk)`` database indices of query ``q`` (revisited: easy + hard)."""
  gnd = dataset.gnd[q]
  ok_keys = {"revisited": ("easy", "hard"), "original": ("good", "ok"),
             "ok_junk": ("ok",)}[dataset.gnd_kind]
  ok = {int(i) for key in ok_keys for i in gnd[key]}
  junk = {int(i) for i in gnd["junk"]}
  if dataset.query_db_indices is not None:
    junk.add(int(dataset.query_db_indices[q]))
  return ok, junk - ok


def _dataset_mode(args: argparse.Namespace, retriever: Any) -> dict[str, Any]:
  if args.queries:
    raise _common.CommandError(f"--dataset brings its own queries; drop {args.queries[0]!r} "
                               f"(or search your images with --index).")
  loader = _common.DatasetLoader(data_dir=args.data_dir, manual_dir=args.manual_dir,
                                 seed=args.seed, image_size=args.image_size)
  dataset = loader.retrieval_set(args.dataset)
  settings = _common.extraction_settings(retriever, args)
  count = len(dataset.queries) if args.num_queries is None else min(args.num_queries,
                                                                       len(dataset.queries))
  crop = not args.no_crop and dataset.query_boxes is not None
  boxes = dataset.query_boxes[:count] if crop else None
  query_images = [dataset.queries[i] for i in range(count)]
  extract = dict(max_size=settings["max_size"], scales=settings["scales"],
                 batch_size=args.batch_size, num_workers=args.workers)
  database = retriever.extract(dataset.database, **extract)
  queries = retriever.extract(query_images, boxes=boxes, **extract)
  from retrieval_jax.search import ExactIndex  # noqa: PLC0415

  k = min(args.k, len(database))
  scores, ids = ExactIndex.build(database).search(queries, k)
  results = []
  for q in range(count):
    ok, junk = _truth(dataset, q)
    rows = []
    for r, (i, s) in enumerate(zip(ids[q], scores[q])):
      i = int(i)
      rows.append({"rank": r + 1, "id": i, "path": _common.image_label(dataset.database, i,
                                                                         "database"),
                   "score": float(s),
                   "correct": None if i in junk else i in ok})
    results.append({"query": _common.image_label(dataset.queries, q, "queries"),
                    "box": None if boxes is None else [float(v) for v in boxes[q]],
                    "positives": len(ok), "results": rows})
  return {"index": None, "dataset": dataset.name, "k": k, "query_crop": crop, **settings,
          "queries": results, "_dataset": dataset}


# --------------------------------------------------------------------------- output


def _print(report: dict[str, Any]) -> None:
  judged = report["dataset"] is not None
  marks = {True: "  +", False: "  -", None: "  junk"}
  for q, entry in enumerate(report["queries"]):
    print(f"query {q + 1}/{len(report['queries'])}: {entry['query']}")
    for row in entry["results"]:
      mark = marks[row["correct"]] if judged else ""
      print(f"  {row['rank']:>3}  {row['score']:7.4f}  {row['path']}{mark}")
  if judged:
    hits = sum(row["correct"] is True for e in report["queries"] for row in e["results"])
    judged_rows = sum(row["correct"] is not None for e in report["queries"]
                      for row in e["results"])
    print(f"correct: {hits} of {judged_rows} non-junk results in the top {report['k']} "
          f"(+ correct, - wrong; junk not counted)")


def _grid(report: dict[str, Any], args: argparse.Namespace) -> None:
  from retrieval_jax import visualize  # noqa: PLC0415

  entries = report["queries"][:args.grid_rows]
  dataset = report.get("_dataset")
  if dataset is None:
    queries = [e["query"] for e in entries]
    results = [[row["path"] for row in e["results"]] for e in entries]
    correct = None
  else:
    queries = [dataset.queries[q] for q in range(len(entries))]
    results = [[dataset.database[row["id"]] for row in e["results"]] for e in entries]
    correct = [[row["correct"] for row in e["results"]] for e in entries]
  boxes = [e.get("box") or [np.nan] * 4 for e in entries]
  captions = [[f"{row['rank']}  {row['score']:.3f}" for row in e["results"]] for e in entries]
  image = visualize.result_grid(queries, results, correct=correct, query_boxes=boxes,
                                captions=captions, query_captions=[f"query {q + 1}"
                                                                   for q in range(len(entries))],
                                thumb_size=args.thumb_size)
  visualize.save_png(image, args.grid)
  print(f"grid of {len(entries)} queries -> {args.grid}")


def _run(args: argparse.Namespace) -> int:
  if args.grid is not None and not args.grid.lower().endswith(".png"):
    raise _common.CommandError(f"--grid {args.grid}: the grid is a PNG; name it *.png.")
  if args.index is not None and not pathlib.Path(args.index).is_dir():
    raise _common.CommandError(f"--index {args.index}: no such directory.")
  retriever = _common.load_retriever(args)
  report = (_index_mode if args.index is not None else _dataset_mode)(args, retriever)
  _print(report)
  if args.json:
    write_json(args.json, {k: v for k, v in report.items() if not k.startswith("_")})
    print(f"results -> {args.json}")
  if args.grid:
    _grid(report, args)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax search``; returns the exit status."""
  return _common.run(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
