"""The ``retrieval-jax`` command line.

Each subcommand lives in its own module (``retrieval_jax/commands/``) and exposes
``main(argv) -> exit code``; this file only dispatches, so ``retrieval-jax train --help`` shows
the subcommand's own options.
"""

from __future__ import annotations

import sys

_SUBCOMMANDS = {
    "train": ("retrieval_jax.commands.train", "train a model from a config file (configs/*.py)"),
    "evaluate": ("retrieval_jax.commands.evaluate",
                 "score a model on a benchmark (--config FILE or flags)"),
    "extract": ("retrieval_jax.commands.extract",
                "describe images (folders, files, lists) -> descriptors.npy + paths.json"),
    "index": ("retrieval_jax.commands.index",
              "build an exact or ScaNN index from an extract directory"),
    "search": ("retrieval_jax.commands.search",
               "top-k database images of query images (printed, --json, --grid PNG)"),
    "convert": ("retrieval_jax.commands.convert",
                "torchvision/Keras/efficientnet-pytorch weights -> a saved Retriever"),
    "datasets": ("retrieval_jax.commands.datasets", "list the datasets and how to obtain each"),
    "demo": ("retrieval_jax.commands.demo",
             "off-the-shelf vs fine-tuned retrieval, ScaNN search, figures (make demo)"),
}


def _usage() -> str:
  lines = ["usage: retrieval-jax <command> [options]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
  lines += ["", "Run 'retrieval-jax <command> --help' for a command's options."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  if argv[0] not in _SUBCOMMANDS:
    print(f"retrieval-jax: unknown command {argv[0]!r}.\n\n{_usage()}", file=sys.stderr)
    return 2
  module = __import__(_SUBCOMMANDS[argv[0]][0], fromlist=["main"])
  status = module.main(argv[1:])
  return 0 if status is None else int(status)


if __name__ == "__main__":
  sys.exit(main())
