"""Config files for the command line: ``get_config()`` Python files and ``--config.a.b=value``
overrides typed by the field they set (ml_collections), shared by ``train`` and ``evaluate``."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any

import ml_collections

CONFIG_PREFIX = "--config."


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the Python file at ``path``."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"--config: {path} is not a file.")
  spec = importlib.util.spec_from_file_location(f"_retrieval_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config: {path} defines no get_config().")
  return module.get_config()


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
      raise ValueError(f"{CONFIG_PREFIX}{field}: {'.'.join(parents[:i + 1])} is not a config section.")
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
