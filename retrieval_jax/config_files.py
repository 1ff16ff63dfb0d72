"""Config files for the command line: ``get_config()`` Python files and ``--config.a.b=value``
overrides typed by the field they set (ml_collections), shared by ``train`` and ``evaluate``."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pathlib
from typing import Any

import ml_collections

CONFIG_PREFIX = "--config."


def split_config_path(path: str) -> tuple[str, str | None]:
  """``"configs/x.py:quick"`` -> ``("configs/x.py", "quick")`` (ml_collections' config-string
  convention); a path without a ``:variant`` suffix (or an existing file whose name has a
  colon) -> ``(path, None)``."""
  if pathlib.Path(path).is_file():
    return path, None
  head, sep, variant = path.rpartition(":")
  if sep and head and "/" not in variant and "\\" not in variant:
    return head, variant
  return path, None


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the Python file at ``path``, or ``get_config(variant)`` for
  ``path:variant`` (``--config configs/dlrtn_rgmp.py:quick``)."""
  file_path, variant = split_config_path(path)
  file = pathlib.Path(file_path)
  if not file.is_file():
    raise ValueError(f"--config: {file_path} is not a file.")
  spec = importlib.util.spec_from_file_location(f"_retrieval_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config: {file_path} defines no get_config().")
  if variant is None:
    return module.get_config()
  try:
    parameters = inspect.signature(module.get_config).parameters
  except (TypeError, ValueError):
    parameters = {"variant": None}
  if not parameters:
    raise ValueError(f"--config: {file_path} has no variants (its get_config() takes no "
                     f"argument); got {path!r}.")
  return module.get_config(variant)


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string field (loss.name=triplet)


def apply_override(cfg: ml_collections.ConfigDict, field: str, text: str) -> None:
  """Sets the dotted ``field`` of ``cfg`` from its command-line ``text``.

  Raises:
    ValueError: an unknown field, or a value that does not fit the field's type, naming it.
  """
  *parents, leaf = field.split(".")
  node = cfg
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"{CONFIG_PREFIX}{field}: {'.'.join(parents[:i + 1])} is not a config "
                       f"section.")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f"{CONFIG_PREFIX}{field}: {field} is not a config field.")
  value = _parse_value(text)
  if isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError:
    # "123" for a string field: keep the text as written.
    try:
      node[leaf] = text
    except TypeError as err:
      raise ValueError(f"{CONFIG_PREFIX}{field}={text}: does not fit the field's type ({err})."
                       ) from None


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``argv`` without its ``--config.<field>=<value>`` (or ``--config.<field> <value>``)
  overrides, and the ``(field, text)`` overrides in command-line order."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(CONFIG_PREFIX):
      body = arg[len(CONFIG_PREFIX):]
      if "=" in body:
        field, text = body.split("=", 1)
      elif i + 1 < len(argv):
        field, text = body, argv[i + 1]
        i += 1
      else:
        raise ValueError(f"{arg} needs a value ({arg}=VALUE).")
      overrides.append((field, text))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides
