"""The ``retrieval-jax`` command line.

Subcommands so far: ``demo``. Each subcommand lives in its own module and exposes
``main(argv)``; this file only dispatches, so ``retrieval-jax demo --help`` shows the
subcommand's own options.
"""

from __future__ import annotations

import sys

_SUBCOMMANDS = {
    "demo": ("retrieval_jax.demo", "run the interim end-to-end demo (simulated feature maps)"),
    "train": ("retrieval_jax.train", "train a model from a config file (configs/*.py)"),
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
  module.main(argv[1:])
  return 0


if __name__ == "__main__":
  sys.exit(main())
