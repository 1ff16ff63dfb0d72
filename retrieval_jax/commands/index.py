"""``retrieval-jax index``: build a search index from the output of ``retrieval-jax extract``.

    retrieval-jax index --descriptors descs/ --out index/                 # mode auto
    retrieval-jax index --descriptors descs/ --out index/ --mode scann

``--mode auto`` uses exact search below 50,000 rows and otherwise builds ScaNN, keeping it only
if it reaches ``--recall-target`` (recall@10 against exact search) faster than exact search
(``retrieval_jax.search.build_index``). The image paths become the index metadata, and the
descriptor model id is stored, so ``retrieval-jax search`` refuses queries from another model.
The directory holds a manifest with the sha256 of every file and is written atomically.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from retrieval_jax.commands import _common

NAME = "index"
MODES = ("auto", "exact", "scann")


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("--descriptors", required=True, metavar="DIR",
                      help="a directory written by 'retrieval-jax extract'")
  parser.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
  parser.add_argument("--mode", choices=MODES, default="auto",
                      help="exact search, ScaNN, or auto (default): chosen by size and a "
                           "measured recall/speed check")
  parser.add_argument("--recall-target", type=float, default=0.95, metavar="R",
                      help="recall@10 that auto must reach with ScaNN (default 0.95)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing index")
  return parser


def read_descriptors(directory: str | pathlib.Path) -> tuple[np.ndarray, list[str], dict]:
  """``(descriptors float32 [N, D], paths, extract.json)`` of an ``extract`` directory.

  Raises:
    CommandError: a missing directory or file, or files that disagree on the row count.
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise _common.CommandError(f"--descriptors {root}: no such directory (write one with "
                               f"'retrieval-jax extract').")
  missing = [name for name in ("descriptors.npy", "paths.json") if not (root / name).is_file()]
  if missing:
    raise _common.CommandError(f"--descriptors {root}: missing {', '.join(missing)}; is it an "
                               f"output directory of 'retrieval-jax extract'?")
  descriptors = np.load(root / "descriptors.npy", allow_pickle=False)
  paths = json.loads((root / "paths.json").read_text())
  info = {}
  if (root / "extract.json").is_file():
    info = json.loads((root / "extract.json").read_text())
  if descriptors.ndim != 2 or len(descriptors) != len(paths):
    raise _common.CommandError(f"--descriptors {root}: descriptors.npy has shape "
                               f"{descriptors.shape} for {len(paths)} paths in paths.json.")
  return np.asarray(descriptors, np.float32), [str(p) for p in paths], info


def _auto_reason(num_rows: int, recall_target: float, report: dict) -> str:
  from retrieval_jax.search.auto import MIN_ROWS_FOR_SCANN  # noqa: PLC0415

  if report.get("reason") == "static rule":
    return (f"fewer than {MIN_ROWS_FOR_SCANN:,} rows" if num_rows < MIN_ROWS_FOR_SCANN
            else f"recall target {recall_target} is above what ScaNN promises")
  if report.get("choice") == "scann":
    return "ScaNN reached the recall target faster than exact search"
  return "ScaNN was not faster at the recall target"


def _run(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.out)
  if (out / "manifest.json").exists() and not args.overwrite:
    raise _common.CommandError(f"--out {out}: already holds an index; pass --overwrite to "
                               f"replace it.")
  if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                            and not (out / "manifest.json").exists())):
    raise _common.CommandError(f"--out {out}: exists and is not an index directory; choose a "
                               f"new path.")
  if not 0.0 < args.recall_target <= 1.0:
    raise _common.CommandError(f"--recall-target must be in (0, 1]; got {args.recall_target}.")
  descriptors, paths, info = read_descriptors(args.descriptors)
  from retrieval_jax.search import build_index  # noqa: PLC0415 (jax: only once args are good)

  start = time.perf_counter()
  index = build_index(descriptors, mode=args.mode, recall_target=args.recall_target,
                      metadata=paths, model_id=info.get("model_id", ""))
  index.save(out)
  seconds = time.perf_counter() - start
  how = f"{index.kind} search"
  report = getattr(index, "auto_report", None)
  if args.mode == "auto" and report:
    how += f" (auto: {_auto_reason(index.num_rows, args.recall_target, report)})"
  print(f"indexed {index.num_rows} descriptors ({index.dim}-D) for {how} in {seconds:.1f} s "
        f"-> {out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax index``; returns the exit status."""
  return _common.run(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
