"""``retrieval-jax train``: train a retrieval model from a config file.

    retrieval-jax train --config configs/demo.py --workdir runs/demo \\
        [--config.train.epochs=3 --config.loss.name=triplet ...] [--no-resume] [--no-progress]

The config file defines ``get_config()`` returning a training config (fields of
:func:`retrieval_jax.training.default_train_config`), as big_vision and the flax examples do.
``--config.<dotted.field>=<value>`` (or ``--config.<field> <value>``) overrides a field; the
value is read as a Python literal (``3``, ``0.1``, ``None``, ``True``, ``(1.0, 0.5)``) and
otherwise as a string, and must fit the field's type. A run whose workdir holds checkpoints
resumes from the latest one. Errors in the config or the data print one line and exit 2; a
diverged run (NaN/Inf) exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retrieval_jax.commands import _common
from retrieval_jax.config_files import apply_override, load_config_file

NAME = "train"


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("--config", required=True, help="a Python file defining get_config()")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, metrics.jsonl, tb/ and the final retriever/ go here")
  parser.add_argument("--no-resume", action="store_true",
                      help="refuse a workdir that already holds checkpoints")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser


def _run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  cfg = load_config_file(args.config)
  for field, text in overrides:
    apply_override(cfg, field, text)
  if args.no_progress:
    cfg.train.progress = False
  # Our messages (resume, warnings) at INFO; orbax/absl chatter only from WARNING up.
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("retrieval_jax").setLevel(logging.INFO)

  # Heavy imports (jax, models) only once the command line is known to be good.
  from retrieval_jax.training.loop import TrainingDivergedError, train  # noqa: PLC0415

  try:
    summary = train(cfg, args.workdir, resume=not args.no_resume)
  except TrainingDivergedError as err:
    print(f"{_common.PROG} {NAME}: stopped: {err}", file=sys.stderr)
    return 1
  before, after = summary["before_val_map"], summary["final_val_map"]
  fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
  print(f"trained {summary['steps']} steps in {summary['time_s']:.0f} s; validation mAP "
        f"{fmt(before)} -> {fmt(after)} (best {fmt(summary['best_val_map'])} at step "
        f"{summary['best_step']}); model: {summary['retriever']}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax train``; returns the exit status (2: bad input, 1: diverged)."""
  return _common.run_with_overrides(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
