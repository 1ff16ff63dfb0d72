"""``retrieval-jax extract``: describe images (folders, files, text lists) with a retriever.

    retrieval-jax extract photos/ more.txt --retriever runs/demo/train/retriever --out descs/
    retrieval-jax extract photos/ --pretrained efficientnet-lite0 --pooling gem \\
        --max-size 512 --dtype float16 --out descs/

Writes into ``--out``: ``descriptors.npy`` (``[N, D]`` L2-normalised rows, float32 or
``--dtype float16``), ``paths.json`` (the ``N`` absolute image paths, row order) and
``extract.json`` (count, dimension, dtype, the model id and extraction settings, skipped
files). Each file is written atomically. ``retrieval-jax index --descriptors DIR`` reads them.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from retrieval_jax._atomic import write_json, write_npy
from retrieval_jax.commands import _common

NAME = "extract"
FILES = ("descriptors.npy", "paths.json", "extract.json")


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("images", nargs="+", metavar="IMAGES",
                      help="image files, folders (searched recursively) or text files listing "
                           "one image path per line")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
  _common.add_retriever_args(parser)
  _common.add_extraction_args(parser)
  parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="stored descriptor type (default float32)")
  parser.add_argument("--skip-unreadable", action="store_true",
                      help="leave out unreadable images (listed in extract.json) instead of "
                           "stopping at the first")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace descriptors already in --out")
  return parser


def _run(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.out)
  if out.exists() and not out.is_dir():
    raise _common.CommandError(f"--out {out}: exists and is not a directory.")
  existing = [f for f in FILES if (out / f).exists()]
  if existing and not args.overwrite:
    raise _common.CommandError(f"--out {out}: already holds {', '.join(existing)}; pass "
                               f"--overwrite to replace them.")
  paths = _common.image_list(args.images)
  retriever = _common.load_retriever(args)
  settings = _common.extraction_settings(retriever, args)
  start = time.perf_counter()
  descriptors = retriever.extract(paths, settings["max_size"], settings["scales"],
                                  args.batch_size, skip_unreadable=args.skip_unreadable,
                                  num_workers=args.workers)
  seconds = time.perf_counter() - start
  skipped = list(getattr(retriever, "last_failures", []) or [])
  failed = {str(path) for path, _ in skipped}
  kept = [p for p in paths if p not in failed]
  if not kept:
    raise _common.CommandError(f"none of the {len(paths)} images could be read.")
  descriptors = np.asarray(descriptors, args.dtype)
  write_npy(out / "descriptors.npy", descriptors)
  write_json(out / "paths.json", kept)
  write_json(out / "extract.json", {
      "count": len(kept), "dim": int(descriptors.shape[1]), "dtype": args.dtype,
      "model_id": _common.model_id(retriever, settings), **settings,
      "retriever": args.retriever or f"pretrained:{args.pretrained}/{args.pooling}",
      "skipped": [{"path": str(p), "reason": str(r)} for p, r in skipped],
      "seconds": round(seconds, 3)})
  print(f"extracted {len(kept)} descriptors ({descriptors.shape[1]}-D, {args.dtype}) in "
        f"{seconds:.1f} s -> {out}")
  if skipped:
    print(f"skipped {len(skipped)} unreadable image(s), listed in {out / 'extract.json'}; "
          f"first: {skipped[0][1]}", file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax extract``; returns the exit status."""
  return _common.run(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
