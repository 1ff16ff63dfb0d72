"""``retrieval-jax evaluate``: score a model on a benchmark (mAP, mP@k; E/M/H when revisited).

    retrieval-jax evaluate --config my_eval.py --out runs/eval \\
        [--config.eval.rerank=alpha_qe --config.dataset.name=synthetic:small ...]
    retrieval-jax evaluate --checkpoint runs/demo/train/retriever --dataset roxford5k \\
        --data-dir ~/tensorflow_datasets --manual-dir ~/data/revisitop --out runs/roxford
    retrieval-jax evaluate --pretrained efficientnet-lite0 --dataset synthetic:small \\
        --whitening lw --whitening-set synthetic:train --rerank alpha_qe --out runs/syn

A config file defines ``get_config()`` returning (part of) ``default_config()`` of this
module: a ``retriever`` section (``checkpoint``: a saved Retriever directory, or ``model``: the
fields of ``Retriever.from_config``), a ``dataset`` section (``name`` as in ``retrieval-jax
datasets``, ``data_dir``, ``manual_dir``, ``whitening_set``, ...) and an ``eval`` section (the
fields of ``retrieval_jax.evaluation.default_eval_config``). Flags override the file, and
``--config.<section>.<field>=<value>`` overrides any field (with or without a file; values are
Python literals or bare words). Without a model flag or file the model is ImageNet
EfficientNet-Lite0 with GeM; without ``--dataset`` the dataset is ``synthetic:tiny``.

Prints the score table and writes ``report.json`` (and the descriptor cache) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys

import ml_collections

from retrieval_jax.commands import _common

NAME = "evaluate"


def default_config() -> ml_collections.ConfigDict:
  """Every field ``retrieval-jax evaluate`` reads, with its default."""
  from retrieval_jax.evaluation import default_eval_config  # noqa: PLC0415
  from retrieval_jax.retriever import default_config as model_config  # noqa: PLC0415

  return ml_collections.ConfigDict({
      "retriever": {
          "checkpoint": "",  # a saved Retriever directory; empty: build from `model`
          "model": model_config(),  # Retriever.from_config fields
      },
      "dataset": {
          "name": "synthetic:tiny",  # see `retrieval-jax datasets`
          "split": "test",  # synthetic: test | val
          "seed": 0,  # synthetic
          "image_size": 0,  # synthetic photo size; 0: the preset's
          "data_dir": "",  # TFDS data directory; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
          "manual_dir": "",  # a benchmark's downloaded files; empty: <data_dir>/downloads/manual
          "skip_unreadable": False,
          "queries_per_instance": 0,  # folder:PATH without queries/ + database/ subfolders
          "whitening_set": "",  # e.g. synthetic:train (needed by eval.whitening)
      },
      "eval": default_eval_config(),
  })


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("--config", metavar="FILE", help="a Python file defining get_config()")
  _common.add_retriever_args(parser, required=False)
  parser.add_argument("--dataset", metavar="NAME",
                      help="synthetic:tiny|small|..., <builder>/<config> (e.g. "
                           "revisited_landmarks/roxford5k, or roxford5k), folder:PATH, csv:PATH")
  parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
  parser.add_argument("--manual-dir", metavar="DIR",
                      help="the benchmark's downloaded files ('retrieval-jax datasets NAME')")
  parser.add_argument("--skip-unreadable", action="store_true",
                      help="leave out unreadable images instead of stopping")
  parser.add_argument("--no-crop", action="store_true",
                      help="do not crop queries to their boxes (reported)")
  parser.add_argument("--whitening", choices=("pca", "lw"), help="learn whitening on ...")
  parser.add_argument("--whitening-set", metavar="NAME",
                      help="... this training set: synthetic:train, <builder>/<config>, "
                           "folder:PATH, csv:PATH")
  parser.add_argument("--whitening-dims", type=_common.positive_int, metavar="D",
                      help="keep D whitening components")
  parser.add_argument("--rerank", choices=("aqe", "alpha_qe", "dba", "dba+aqe", "dba+alpha_qe"),
                      help="query expansion / database augmentation")
  _common.add_extraction_args(parser)
  parser.add_argument("--save-ranks", action="store_true", help="also write ranks.npy")
  parser.add_argument("--out", metavar="DIR", help="report.json and the descriptor cache")
  return parser


def resolve_config(args: argparse.Namespace, overrides: list[tuple[str, str]]
                   ) -> ml_collections.ConfigDict:
  """Defaults, updated by the config file, then the flags, then the overrides."""
  from retrieval_jax.config_files import apply_override, load_config_file  # noqa: PLC0415

  cfg = default_config()
  if args.config:
    loaded = load_config_file(args.config)
    unknown = sorted(set(loaded) - set(cfg))
    if unknown:
      raise _common.CommandError(f"--config {args.config}: unknown section(s) {unknown}; "
                                 f"expected {sorted(cfg)}.")
    cfg.update(loaded)
  if args.retriever:
    cfg.retriever.checkpoint = args.retriever
  elif args.pretrained:
    cfg.retriever.checkpoint = ""
    cfg.retriever.model.update({"backbone": args.pretrained, "pretrained": True,
                                "pooling": args.pooling})
  flags = {"dataset.name": args.dataset, "dataset.data_dir": args.data_dir,
           "dataset.manual_dir": args.manual_dir, "dataset.whitening_set": args.whitening_set,
           "eval.whitening": args.whitening, "eval.whitening_dims": args.whitening_dims,
           "eval.rerank": args.rerank, "eval.max_size": args.max_size,
           "eval.scales": args.scales, "eval.batch_size": args.batch_size,
           "eval.output_dir": args.out}
  if args.skip_unreadable:
    flags["dataset.skip_unreadable"] = True
  if args.no_crop:
    flags["eval.crop_queries"] = False
  if args.save_ranks:
    flags["eval.save_ranks"] = True
  if args.workers != 2:
    flags["eval.num_workers"] = args.workers
  for field, value in flags.items():
    if value is not None:
      section, leaf = field.split(".")
      cfg[section][leaf] = value
  for field, text in overrides:
    apply_override(cfg, field, text)
  return cfg


def build_retriever(cfg: ml_collections.ConfigDict):
  """The Retriever of the ``retriever`` section."""
  from retrieval_jax.models import PRETRAINED  # noqa: PLC0415
  from retrieval_jax.retriever import Retriever  # noqa: PLC0415

  if cfg.checkpoint:
    return _common.load_retriever(argparse.Namespace(retriever=cfg.checkpoint))
  model = cfg.model
  if model.pretrained and model.backbone.replace("_", "-") not in PRETRAINED:
    raise _common.CommandError(
        f"no ImageNet weights are installed for backbone {model.backbone!r} (available: "
        f"{', '.join(sorted(PRETRAINED))}); convert weights with 'retrieval-jax convert' and "
        f"pass --retriever, or set --config.retriever.model.pretrained=False for random ones.")
  return Retriever.from_config(model)


def _run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  cfg = resolve_config(args, overrides)
  if not cfg.eval.output_dir:
    raise _common.CommandError("--out DIR is required (or set eval.output_dir in the config).")
  ds = cfg.dataset
  if cfg.eval.whitening and not ds.whitening_set:
    raise _common.CommandError(f"--whitening {cfg.eval.whitening} needs --whitening-set, the "
                               f"training set to learn it on (e.g. synthetic:train).")
  if ds.whitening_set and not cfg.eval.whitening:
    raise _common.CommandError(f"--whitening-set {ds.whitening_set} is given without "
                               f"--whitening pca|lw.")
  loader = _common.DatasetLoader(
      data_dir=ds.data_dir or None, manual_dir=ds.manual_dir or None,
      skip_unreadable=ds.skip_unreadable, seed=ds.seed, image_size=ds.image_size or None,
      split=ds.split, queries_per_instance=ds.queries_per_instance or None)
  dataset = loader.retrieval_set(ds.name)
  whitening_set = loader.instance_set(ds.whitening_set) if ds.whitening_set else None
  retriever = build_retriever(cfg.retriever)
  from retrieval_jax.evaluation import evaluate, format_table  # noqa: PLC0415

  report = evaluate(retriever, dataset, cfg.eval, whitening_set=whitening_set)
  print(format_table(report))
  print(f"report -> {report['files'].get('report', cfg.eval.output_dir)}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax evaluate``; returns the exit status."""
  return _common.run_with_overrides(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
