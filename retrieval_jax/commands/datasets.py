"""``retrieval-jax datasets``: the datasets you can name, and how to obtain each.

    retrieval-jax datasets                      # every name, one line each
    retrieval-jax datasets roxford5k            # what to download and where to put it
    retrieval-jax datasets revisited_landmarks  # all configs of a builder

Names work with ``retrieval-jax evaluate --dataset`` and ``retrieval-jax search --dataset``
(test sets) and ``--whitening-set`` (training sets). Benchmarks cannot be downloaded
automatically: fetch the files the instructions list into a manual directory and pass it as
``--manual-dir``; the dataset is prepared into ``--data-dir`` the first time it is used. The
synthetic benchmark is generated locally and needs nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from typing import Any

from retrieval_jax.commands import _common

NAME = "datasets"


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("name", nargs="?", metavar="NAME",
                      help="a dataset, config or builder name: details and download "
                           "instructions")
  return parser


def _first_line(text: str | None) -> str:
  lines = [line.strip() for line in (text or "").replace("``", "").splitlines() if line.strip()]
  return lines[0] if lines else ""


def _builders() -> list[dict[str, Any]]:
  """One entry per builder: name, summary, kind, configs (name, description), instructions."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  entries = []
  with tempfile.TemporaryDirectory() as scratch:  # instantiating writes nothing; be sure
    for builder, configs in _common.tfds_builder_names().items():
      cls = tfds.builder_cls(builder)
      features = cls(data_dir=scratch, config=configs[0]).info.features
      if builder == "revisitop1m":
        kind = "distractors"
      else:
        kind = "+".join(k for k, f in (("test", "gnd"), ("train", "cluster_id")) if f in features)
      described = {c.name: c.description for c in cls.BUILDER_CONFIGS}
      entries.append({
          "builder": builder, "summary": _first_line(cls.__doc__), "kind": kind,
          "configs": [(c, _first_line(described.get(c))) for c in configs],
          "instructions": getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)})
  return entries


_KIND_HELP = {
    "test": "test set (--dataset)",
    "train": "training set (--whitening-set, training configs)",
    "test+train": "test set (--dataset) and training set (synthetic:train)",
    "distractors": "distractors: append to a test set with --dataset <name>+r1m",
}


def _list() -> None:
  from retrieval_jax.data.synthetic import PRESETS  # noqa: PLC0415

  rows = [(f"{_common.SYNTHETIC_PREFIX}{p}", "test+train",
           f"generated in memory: {c.test_instances} landmarks x {c.db_views} views + "
           f"{c.distractors} distractors, {c.test_instances * c.queries_per_instance} queries; "
           f"train {c.train_instances} x {c.train_views}")
          for p, c in PRESETS.items()]
  for entry in _builders():
    manual = "" if entry["instructions"] is None else " [manual download]"
    rows += [(f"{entry['builder']}/{config}", entry["kind"], f"{description}{manual}")
             for config, description in entry["configs"]]
  rows += [("folder:PATH", "test+train", "your photos: PATH/<instance>/... (or PATH/queries/ + "
            "PATH/database/ for a test set)"),
           ("csv:PATH", "test+train", "your photos listed in a CSV (path,instance_id[,role]"
            "[,x0,y0,x1,y1])")]
  width = max(len(name) for name, _, _ in rows)
  print("Datasets (test sets for --dataset, training sets for --whitening-set):\n")
  for name, kind, text in rows:
    print(f"  {name:<{width}}  {kind:<11} {text}")
  print(f"\nA unique config alone also works (roxford5k). '{_common.PROG} datasets NAME' shows "
        f"how to obtain one.")


def _details(name: str) -> None:
  if name.startswith(_common.SYNTHETIC_PREFIX):
    preset = _common.synthetic_preset(name)
    print(f"{name}: the embedded synthetic benchmark, preset {preset!r}, generated in memory "
          f"(seed --seed, default 0).\nKind: {_KIND_HELP['test+train']}\n\nNothing to "
          f"download. Example:\n  {_common.PROG} evaluate --pretrained efficientnet-lite0 "
          f"--dataset {name} --out runs/{preset}")
    return
  builders = {e["builder"]: e for e in _builders()}
  if name in builders:
    entry, configs = builders[name], [c for c, _ in builders[name]["configs"]]
  else:
    builder, config = _common.resolve_builder(name)
    entry, configs = builders[builder], [config]
  builder = entry["builder"]
  described = dict(entry["configs"])
  print(f"{builder}: {entry['summary']}")
  print(f"Kind: {_KIND_HELP.get(entry['kind'], entry['kind'])}")
  for config in configs:
    print(f"  {builder}/{config}: {described[config]}")
  flag = "--whitening-set" if entry["kind"] == "train" else "--dataset"
  if entry["instructions"] is None:
    print("\nGenerated locally by its TFDS builder; nothing to download.")
  else:
    print("\nHow to obtain it (manual download):")
    print(textwrap.indent(textwrap.dedent(entry["instructions"]).strip("\n"), "  "))
    print(f"\nThen pass that folder as --manual-dir (default: <data-dir>/downloads/manual); it "
          f"is prepared into --data-dir (default {_common.DEFAULT_DATA_DIR}) on first use.")
  target = ("revisited_landmarks/roxford5k+r1m" if builder == "revisitop1m"
            else f"{builder}/{configs[0]}")
  example = (f"{_common.PROG} evaluate --retriever DIR {flag} {target} --manual-dir MANUAL "
             f"--data-dir DATA --out runs/eval")
  if flag == "--whitening-set":
    example = (f"{_common.PROG} evaluate --retriever DIR --dataset roxford5k --whitening lw "
               f"{flag} {target} --manual-dir MANUAL --data-dir DATA --out runs/eval")
  print(f"\nExample:\n  {example}")


def _run(args: argparse.Namespace) -> int:
  if args.name is None:
    _list()
  else:
    _details(args.name)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax datasets``; returns the exit status."""
  return _common.run(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
