"""README.md stays true: its code blocks run and its command lines parse.

- Every fenced block is tagged ``python``, ``bash`` or ``text`` (an untagged or other block
  would be skipped silently, so it is an error). Illustrative code that cannot run here (it
  needs a benchmark on disk) is fenced as ``text``.
- Every ``python`` block is executed, in README order, each in a fresh namespace, in one
  subprocess whose working directory is a temporary folder (blocks may use files an earlier
  block wrote there, as a reader following the README would). Tracebacks name README lines.
- Every ``retrieval-jax <command> ...`` line of a ``bash`` block names a command of
  ``retrieval_jax.cli``'s table and is parsed by that command's own argument parser, through
  its ``main`` (so ``--config.<field>=<value>`` overrides are split off as the command does);
  the overrides are then applied to the named config file (``train``) or to the command's
  config (``evaluate``), so a misspelt field fails too. Nothing is run beyond parsing.
- Every command of the table appears in a ``bash`` block, ``make`` lines name Makefile targets
  and ``pip install`` / ``TEST_EXTRAS`` extras exist in pyproject.toml.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib

import pytest

from retrieval_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = ("python", "bash", "text")
_FENCE = re.compile(r"^(\s*)```(.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
  language: str
  line: int  # 1-based README line of the first code line
  code: str


def readme_blocks() -> list[Block]:
  """The fenced code blocks of README.md, dedented, with their language tags."""
  blocks, lines, i = [], README.read_text().splitlines(), 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    start, body = i + 1, []
    i += 1
    while i < len(lines) and not _FENCE.match(lines[i]):
      body.append(lines[i])
      i += 1
    if i == len(lines):
      raise AssertionError(f"README.md:{start}: unclosed ``` block")
    blocks.append(Block(opening.group(2).strip(), start + 1,
                        textwrap.dedent("\n".join(body)) + "\n"))
    i += 1
  return blocks


def command_lines(language: str = "bash") -> list[tuple[int, list[str]]]:
  """``(README line, argv)`` of every command in the blocks of ``language``: backslash
  continuations joined, comments dropped."""
  commands = []
  for block in readme_blocks():
    if block.language != language:
      continue
    pending, first = "", None
    for offset, raw in enumerate(block.code.splitlines()):
      first = block.line + offset if first is None else first
      if raw.rstrip().endswith("\\"):
        pending += raw.rstrip()[:-1] + " "
        continue
      argv = shlex.split(pending + raw, comments=True)
      if argv:
        commands.append((first, argv))
      pending, first = "", None
  return commands


def test_every_block_has_a_known_language():
  blocks = readme_blocks()
  assert blocks, "README.md has no code blocks"
  bad = [f"README.md:{b.line - 1}: ```{b.language}" for b in blocks if b.language not in LANGUAGES]
  assert not bad, f"fence every block as one of {LANGUAGES} (nothing is skipped silently): {bad}"
  assert any(b.language == "python" for b in blocks)


# ----------------------------------------------------------------------------- python blocks

_RUNNER = r"""
import json, sys, time, traceback
blocks = json.loads(sys.stdin.read())
for block in blocks:
  start = time.perf_counter()
  # Pad with newlines so that tracebacks show README.md line numbers.
  code = compile("\n" * (block["line"] - 1) + block["code"], "README.md", "exec")
  try:
    exec(code, {"__name__": "__main__"})
  except BaseException:
    traceback.print_exc()
    print(f"README-BLOCK-FAILED {block['line']}", file=sys.stderr)
    sys.exit(1)
  print("README-BLOCK-TIME", json.dumps({"line": block["line"],
                                         "seconds": round(time.perf_counter() - start, 2)}))
"""


def test_python_blocks_run(tmp_path, request):
  blocks = [{"line": b.line, "code": b.code} for b in readme_blocks() if b.language == "python"]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  # One CPU device, as a user has (conftest forces four for the multi-device tests).
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  # Several blocks compile the same backbone programs: a persistent compilation cache lets later
  # blocks (and later runs: it lives in pytest's cache directory) reuse those compilations.
  cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
  cache_dir = cache.mkdir("readme_jax_compilation_cache") if cache else tmp_path / "jax_cache"
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  work = tmp_path / "work"
  work.mkdir()
  result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks),
                          capture_output=True, text=True, cwd=work, env=env, timeout=600)
  times = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
           if line.startswith("README-BLOCK-TIME ")]
  print("python blocks (README line: seconds):", {t["line"]: t["seconds"] for t in times})
  assert result.returncode == 0, (
      f"a python block of README.md failed (blocks run in order in a fresh namespace each, cwd "
      f"a temporary folder):\n{result.stderr[-6000:]}\nstdout:\n{result.stdout[-2000:]}")
  assert len(times) == len(blocks)


# ----------------------------------------------------------------------------- command lines


class _Parsed(BaseException):
  """Raised by the patched parser once a command line parsed: stops the command there."""

  def __init__(self, namespace: argparse.Namespace):
    super().__init__()
    self.namespace = namespace


def _parse_with_command(command: str, args: list[str], monkeypatch, capsys
                        ) -> argparse.Namespace | None:
  """Runs ``retrieval-jax command args`` up to its argument parsing and returns the parsed
  namespace (None after ``--help``); fails with the command's own error message."""
  original = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, args=None, namespace=None):
    raise _Parsed(original(self, args, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
  module = importlib.import_module(cli._SUBCOMMANDS[command][0])
  try:
    status = module.main(list(args))
  except _Parsed as parsed:
    return parsed.namespace
  except SystemExit as exit_:
    status = exit_.code
  finally:
    monkeypatch.undo()
  if status in (0, None) and any(a in ("-h", "--help") for a in args):
    return None
  err = capsys.readouterr().err.strip()
  pytest.fail(f"retrieval-jax {command} rejected {shlex.join(args)!r} (status {status}): {err}")


def _check_overrides(command: str, namespace: argparse.Namespace, args: list[str]) -> None:
  """Applies the ``--config.<field>=<value>`` overrides of ``args`` as the command would: to
  the command's own config (``evaluate``) or to the training config file it names (``train``,
  ``demo``: its default config when none is named)."""
  from retrieval_jax.config_files import (apply_override, load_config_file,  # noqa: PLC0415
                                          split_config_path, split_overrides)

  _, overrides = split_overrides(args)
  if not overrides:
    return
  module = importlib.import_module(cli._SUBCOMMANDS[command][0])
  if hasattr(module, "resolve_config"):  # evaluate: defaults + file + flags + overrides
    module.resolve_config(namespace, overrides)
    return
  config_file = getattr(namespace, "config", None) or getattr(module, "DEFAULT_CONFIG", None)
  if config_file is None:
    pytest.fail(f"retrieval-jax {command} takes no --config.<field> overrides: "
                f"{[field for field, _ in overrides]}")
  path, variant = split_config_path(str(config_file))
  config = load_config_file(str(ROOT / path) + (f":{variant}" if variant else ""))
  for field, text in overrides:
    apply_override(config, field, text)


_COMMANDS = [(line, argv) for line, argv in command_lines() if argv[0] == "retrieval-jax"]


def test_readme_shows_commands():
  assert _COMMANDS, "README.md has no retrieval-jax command lines in bash blocks"


@pytest.mark.parametrize("argv", [argv for _, argv in _COMMANDS],
                         ids=[f"README.md:{line}" for line, _ in _COMMANDS])
def test_command_line_parses(argv, monkeypatch, capsys):
  assert len(argv) > 1, "a bare 'retrieval-jax' line: name a command"
  command, args = argv[1], argv[2:]
  assert command in cli._SUBCOMMANDS, (
      f"retrieval-jax has no command {command!r}; commands: {sorted(cli._SUBCOMMANDS)}")
  namespace = _parse_with_command(command, args, monkeypatch, capsys)
  if namespace is not None:
    _check_overrides(command, namespace, args)


def test_every_command_is_shown():
  shown = {argv[1] for _, argv in _COMMANDS if len(argv) > 1}
  missing = sorted(set(cli._SUBCOMMANDS) - shown)
  assert not missing, f"README.md shows no example of: {missing} (add them to a bash block)"


def _extras() -> set[str]:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return set(tomllib.load(f)["project"]["optional-dependencies"])


def test_make_and_pip_lines():
  targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
  extras, checked = _extras(), 0
  for line, argv in command_lines():
    if argv[0] == "make":
      goals = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
      assert set(goals) <= targets, f"README.md:{line}: no Makefile target in {goals}"
      checked += 1
    named = [m for a in argv if "pip" in " ".join(argv) for m in re.findall(r"\.\[([\w,-]+)\]", a)]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("TEST_EXTRAS=")]
    for spec in named:
      assert set(spec.split(",")) <= extras, f"README.md:{line}: unknown extra in {spec!r}"
      checked += 1
  assert checked, "README.md shows no make or pip command"


def test_extras_table_matches_pyproject():
  text = README.read_text()
  table = text[text.index("| extra |"):].split("\n\n", 1)[0]
  documented = {name for row in table.splitlines()[2:]
                for name in re.findall(r"`([\w-]+)`", row.split("|")[1])}
  assert documented == _extras(), (
      f"README extras table {sorted(documented)} != pyproject extras {sorted(_extras())}")


# ----------------------------------------------------------------------------- methods table

_NAME = re.compile(r"^([A-Za-z_][\w.]*)(\(.*\))?$")


def _methods_rows() -> list[list[str]]:
  text = README.read_text()
  table = text[text.index("| method (paper) |"):].split("\n\n", 1)[0]
  return [row.split("|")[1:-1] for row in table.splitlines()[2:]]


def _resolve(dotted: str, where: str) -> object:
  """``retrieval_jax.<dotted>``: attributes, or submodules the package does not import."""
  obj = importlib.import_module("retrieval_jax")
  for part in dotted.split("."):
    if hasattr(obj, part):
      obj = getattr(obj, part)
      continue
    try:
      obj = importlib.import_module(f"{obj.__name__}.{part}")
    except (ImportError, AttributeError):
      pytest.fail(f"README.md ({where}): retrieval_jax.{dotted} does not exist")
  return obj


def test_methods_table_names_exist():
  """The configs of the methods table load (paper configs also as ``:quick``) and every name in
  its modules column resolves under ``retrieval_jax``."""
  from retrieval_jax.config_files import load_config_file  # noqa: PLC0415

  rows = _methods_rows()
  assert len(rows) >= 7
  configs = 0
  for method, _, config_cell, modules_cell in rows:
    for path in re.findall(r"`(configs/[\w]+\.py)`", config_cell):
      for variant in ("", ":quick"):
        load_config_file(str(ROOT / path) + variant)
      configs += 1
    for token in re.findall(r"`([^`]+)`", modules_cell):
      match = _NAME.match(token)
      if match:
        _resolve(match.group(1), f"methods table, {method.strip()}")
  assert configs >= 6
