"""``retrieval-jax demo``: off-the-shelf vs fine-tuned retrieval on the synthetic benchmark.

    retrieval-jax demo --out runs/demo        # what `make demo` runs (about 6 minutes on 2 cores)
    retrieval-jax demo --out runs/smoke --config.data.preset=tiny \\
        --config.model.backbone=tiny_resnet --config.model.pretrained=False \\
        --config.data.image_size=64 --config.eval.max_size=64 --config.mining.num_negatives=2 \\
        --config.mining.query_size=12 --config.mining.pool_size=24 --config.train.epochs=2

Scores the config's starting model (ImageNet EfficientNet-Lite0 + GeM for configs/demo.py) on
the synthetic test split (revisited Easy / Medium / Hard mAP, queries cropped to their boxes),
fine-tunes it in OUT/train (resumed when interrupted), scores it again, indexes the test
database with ScaNN (OUT/index) and searches a few queries, then prints a table and writes
OUT/report.json, training_curve.png, pr_curve.png and results.png
(retrieval_jax.demo.run_demo). The config defaults to the repository's configs/demo.py;
--config.<dotted.field>=<value> overrides a field, as for 'retrieval-jax train'. A wrong flag,
a missing file or a bad config value prints one line and exits 2; a diverged run exits 1.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from retrieval_jax.commands import _common
from retrieval_jax.config_files import apply_override, load_config_file

NAME = "demo"
#: The repository's demo config (next to the package in a source checkout or editable install).
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("--out", default="runs/demo", metavar="DIR",
                      help="report, figures, index and the training run (default runs/demo)")
  parser.add_argument("--config", default=None, metavar="FILE",
                      help=f"a training config file defining get_config() (default "
                           f"{DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name} of the repository)")
  parser.add_argument("--search-queries", type=_common.positive_int, default=4, metavar="N",
                      help="test queries searched with the ScaNN index (default 4)")
  parser.add_argument("-k", "--top-k", dest="k", type=_common.positive_int, default=8,
                      help="results per searched query (default 8)")
  parser.add_argument("--no-resume", action="store_true",
                      help="refuse an OUT whose training already holds checkpoints")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def _run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  if args.config is None:
    if not DEFAULT_CONFIG.is_file():
      raise _common.CommandError(f"no --config given and {DEFAULT_CONFIG} does not exist (not a "
                                 f"source checkout); pass --config configs/demo.py.")
    args.config = str(DEFAULT_CONFIG)
  cfg = load_config_file(args.config)
  for field, text in overrides:
    apply_override(cfg, field, text)
  # Our messages (phases, resume) at INFO; orbax/absl chatter only from WARNING up.
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("retrieval_jax").setLevel(logging.INFO)

  # Heavy imports (jax, models) only once the command line is known to be good.
  from retrieval_jax.demo import format_summary, run_demo  # noqa: PLC0415
  from retrieval_jax.training.loop import TrainingDivergedError  # noqa: PLC0415

  try:
    report = run_demo(cfg, args.out, search_queries=args.search_queries, top_k=args.k,
                      resume=not args.no_resume, progress=not args.no_progress)
  except TrainingDivergedError as err:
    print(f"{_common.PROG} {NAME}: stopped: {err}", file=sys.stderr)
    return 1
  print()
  print(format_summary(report))
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax demo``; returns the exit status."""
  return _common.run_with_overrides(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
