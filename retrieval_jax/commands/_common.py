"""What the ``retrieval-jax`` subcommands share: parsers, error reporting, retriever flags, image
lists, dataset names and atomic writes.

Errors a shell user can act on (a bad flag, a missing file, an unknown dataset, an unreadable
image, a bad config value) are printed as one line, ``retrieval-jax <command>: error: <what>``,
on stderr, and the command exits with status 2 (argparse's usage-error status), without a
traceback (set ``RETRIEVAL_JAX_DEBUG=1`` to see it). Anything else is a bug and keeps its
traceback.

Dataset names (``--dataset``), shared by ``evaluate`` and ``search``:

- ``synthetic:tiny`` | ``synthetic:small`` | ``synthetic:medium`` | ``synthetic:large``: the
  embedded benchmark (:mod:`retrieval_jax.data.synthetic`), generated in memory, test split.
- ``<builder>/<config>`` (``revisited_landmarks/roxford5k``), a config alone when it is unique
  (``roxford5k``) or a builder alone (its first config): a TFDS builder of
  :data:`retrieval_jax.data.builders.BUILDERS`, prepared in ``--data-dir`` from ``--manual-dir``
  on first use; a ``+r1m`` suffix appends the revisitop 1M distractors.
- ``folder:PATH`` / ``csv:PATH``: your own photos (:mod:`retrieval_jax.data.custom`).

Training-set names (``--whitening-set``): ``synthetic:train`` (the train split of the synthetic
preset being evaluated; ``synthetic:<preset>:train`` names another), ``<builder>/<config>``
(its ``train`` split; ``...:<split>`` another), ``folder:PATH``, ``csv:PATH``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

from retrieval_jax.config_files import split_overrides

PROG = "retrieval-jax"
#: Exit status of a usage or input error (argparse's own).
USAGE_ERROR = 2
#: Where TFDS keeps prepared datasets unless ``--data-dir`` says otherwise.
DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
SYNTHETIC_PREFIX = "synthetic:"
#: Set this environment variable to get the traceback of an input error instead of one line.
DEBUG_ENV = "RETRIEVAL_JAX_DEBUG"


class CommandError(ValueError):
  """An input problem the user can fix; reported as one line, exit status 2."""


# --------------------------------------------------------------------------- parsing, errors


class Parser(argparse.ArgumentParser):
  """``argparse`` with one-line usage errors (``--help`` still prints everything)."""

  def error(self, message: str) -> NoReturn:
    print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def make_parser(command: str, doc: str) -> Parser:
  """The parser of ``retrieval-jax <command>``, its help texts from the module docstring
  ``doc``: the first paragraph's text after ``: `` is the description, the rest the epilog
  (double backquotes removed)."""
  paragraphs = doc.replace("``", "").strip().split("\n\n")
  description = paragraphs[0].split(": ", 1)[-1]
  description = description[:1].upper() + description[1:]
  return Parser(prog=f"{PROG} {command}", description=description,
                epilog="\n\n".join(paragraphs[1:]) or None,
                formatter_class=argparse.RawDescriptionHelpFormatter)


def error_line(err: BaseException) -> str:
  """One line describing an input error (multi-line messages keep their first line)."""
  if isinstance(err, OSError) and err.filename is not None:
    what = err.strerror or type(err).__name__
    text = f"{os.fspath(err.filename)}: {what[0].lower() + what[1:]}"
  else:
    text = str(err).strip() or type(err).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  first = lines[0] if lines else type(err).__name__
  if type(err).__name__ == "ManualDataError":
    if first.endswith(":"):  # TFDS: "... does not exist or is empty. Create it ... using:"
      first = first.rsplit(". ", 1)[0] + "."
    named = re.match(r"([\w-]+/[\w-]+):", first)
    name = named.group(1).removesuffix("_skip_unreadable") if named else "NAME"
    first += f" Run '{PROG} datasets {name}' for what to download and where to put it."
  elif len(lines) > 1:
    first += " [...]"
  return first


def run(command: str, build_parser: Callable[[], argparse.ArgumentParser],
        body: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None) -> int:
  """Parses ``argv`` and runs ``body``, turning input errors into one line and status 2.

  Returns the exit status: ``body``'s (None: 0), 0 after ``--help``, 2 after a usage or input
  error (``ValueError``, which includes ``ImageReadError`` and ``ManualDataError``, and
  ``OSError`` such as a missing file), 130 after Ctrl-C.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = build_parser().parse_args(argv)
    status = body(args)
  except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, already printed)
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else USAGE_ERROR)
  except (ValueError, OSError) as err:
    if os.environ.get(DEBUG_ENV):
      raise
    print(f"{PROG} {command}: error: {error_line(err)}", file=sys.stderr)
    return USAGE_ERROR
  except KeyboardInterrupt:
    print(f"{PROG} {command}: interrupted", file=sys.stderr)
    return 130
  return 0 if status is None else int(status)


def run_with_overrides(command: str, build_parser: Callable[[], argparse.ArgumentParser],
                       body: Callable[[argparse.Namespace, list[tuple[str, str]]], int | None],
                       argv: Sequence[str] | None) -> int:
  """:func:`run` for commands that take ``--config.<field>=<value>`` overrides: they are split
  off before parsing and passed to ``body(args, overrides)`` in command-line order."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = split_overrides(argv)
  except ValueError as err:  # "--config.x needs a value"
    print(f"{PROG} {command}: error: {err}", file=sys.stderr)
    return USAGE_ERROR
  return run(command, build_parser, lambda args: body(args, overrides), rest)


def parse_scales(text: str) -> tuple[float, ...]:
  """``"1,0.707,0.5"`` -> ``(1.0, 0.707, 0.5)`` (for ``type=`` of an argparse option)."""
  try:
    scales = tuple(float(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,0.707,0.5; got "
                                     f"{text!r}") from None
  if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
    raise argparse.ArgumentTypeError(f"scales must be positive numbers; got {text!r}")
  return scales


def positive_int(text: str) -> int:
  """An argparse ``type=`` for integers >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
  return value


# --------------------------------------------------------------------------- retrievers


def add_retriever_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
  """``--retriever DIR`` (alias ``--checkpoint``) or ``--pretrained NAME [--pooling P]``."""
  group = parser.add_argument_group("model (one of)")
  choice = group.add_mutually_exclusive_group(required=required)
  choice.add_argument("--retriever", "--checkpoint", dest="retriever", metavar="DIR",
                      help="a saved Retriever directory (Retriever.save, 'retrieval-jax "
                           "convert', or a training run's retriever/)")
  choice.add_argument("--pretrained", metavar="NAME",
                      help="ImageNet weights of an installed package, e.g. efficientnet-lite0")
  group.add_argument("--pooling", default="gem",
                     help="head on top of --pretrained: gem (default), mac, spoc, rmac, rgac")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
  """``--max-size``, ``--scales``, ``--batch-size``, ``--workers`` (defaults: the model's)."""
  group = parser.add_argument_group("extraction")
  group.add_argument("--max-size", type=positive_int, metavar="PX",
                     help="long side after resizing (never enlarged); default: the model's")
  group.add_argument("--scales", type=parse_scales, metavar="S[,S...]",
                     help="multi-scale factors, e.g. 1,0.707,0.5; default: the model's")
  group.add_argument("--batch-size", type=positive_int, metavar="N",
                     help="images per device batch; default: the model's")
  group.add_argument("--workers", type=int, default=2, metavar="N",
                     help="image decoding threads (default 2)")


def load_retriever(args: argparse.Namespace):
  """The Retriever the ``--retriever`` / ``--pretrained`` flags name."""
  from retrieval_jax.retriever import Retriever  # noqa: PLC0415 (jax: only once args are good)

  if getattr(args, "retriever", None):
    path = pathlib.Path(args.retriever)
    if not path.exists():
      raise CommandError(f"--retriever {path}: no such directory.")
    return Retriever.load(path)
  return Retriever.from_pretrained(args.pretrained, pooling=args.pooling)


def extraction_settings(retriever: Any, args: argparse.Namespace) -> dict[str, Any]:
  """``max_size`` and ``scales`` from the flags, defaulting to the retriever's config."""
  max_size = args.max_size or retriever.config.max_size
  scales = tuple(args.scales or retriever.config.scales)
  return {"max_size": int(max_size), "scales": [float(s) for s in scales]}


def model_id(retriever: Any, settings: dict[str, Any]) -> str:
  """The descriptor-model id stored with descriptors and indexes: the retriever's weight and
  config fingerprint plus the extraction settings, as sorted JSON."""
  from retrieval_jax.evaluation.descriptors import retriever_fingerprint  # noqa: PLC0415

  return json.dumps({"retriever": retriever_fingerprint(retriever), **settings},
                    sort_keys=True)


def parse_model_id(text: str) -> dict[str, Any]:
  """:func:`model_id`'s fields (empty for ids written by other tools)."""
  try:
    value = json.loads(text)
  except (TypeError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- image lists


def _is_image(path: pathlib.Path) -> bool:
  from retrieval_jax.data.custom import IMAGE_EXTENSIONS  # noqa: PLC0415

  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_list(sources: Sequence[str]) -> list[str]:
  """Absolute image paths from folders, image files and text lists, in the order given.

  - a folder: its image files (extensions of ``data.custom.IMAGE_EXTENSIONS``), recursively,
    hidden files and folders skipped, sorted by relative path;
  - an image file: itself;
  - any other file: a list, one path per line (blank lines and ``#`` comments ignored;
    relative paths are relative to the list's folder).

  Raises:
    CommandError: a source or listed file that does not exist, or no images at all.
  """
  paths: list[str] = []
  for source in sources:
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
      found = []
      for directory, subdirs, names in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [pathlib.Path(directory) / n for n in names if _is_image(pathlib.Path(n))]
      if not found:
        raise CommandError(f"{source}: the folder holds no image files.")
      found.sort(key=lambda p: p.relative_to(path).as_posix())
      paths += [os.fspath(p.absolute()) for p in found]
    elif path.is_file() and _is_image(path):
      paths.append(os.fspath(path.absolute()))
    elif path.is_file():
      paths += _read_list(path)
    else:
      raise CommandError(f"{source}: no such file or folder.")
  if not paths:
    raise CommandError(f"no images in {', '.join(sources) or 'the arguments'}.")
  return paths


def _read_list(path: pathlib.Path) -> list[str]:
  try:
    text = path.read_text()
  except UnicodeDecodeError:
    raise CommandError(f"{path}: neither an image (by extension) nor a text list of image "
                       f"paths.") from None
  paths = []
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    item = pathlib.Path(line).expanduser()
    item = item if item.is_absolute() else path.parent / item
    if not item.is_file():
      raise CommandError(f"{path}, line {number}: {line}: no such file.")
    paths.append(os.fspath(item.absolute()))
  return paths


# --------------------------------------------------------------------------- datasets


def tfds_builder_names() -> dict[str, tuple[str, ...]]:
  from retrieval_jax.data.builders import BUILDERS  # noqa: PLC0415 (imports TFDS)

  return BUILDERS


def known_dataset_names() -> list[str]:
  """Every accepted ``--dataset`` name (folders and CSV files aside)."""
  from retrieval_jax.data.synthetic import PRESETS  # noqa: PLC0415

  names = [f"{SYNTHETIC_PREFIX}{p}" for p in PRESETS]
  names += [f"{b}/{c}" for b, configs in tfds_builder_names().items() for c in configs]
  return names


def resolve_builder(name: str) -> tuple[str, str]:
  """``(builder, config)`` of ``builder/config``, a unique config or a builder name.

  Raises:
    CommandError: an unknown or ambiguous name, listing the known ones.
  """
  builders = tfds_builder_names()
  builder, _, config = name.partition("/")
  if builder in builders:
    config = config or builders[builder][0]
    if config not in builders[builder]:
      raise CommandError(f"unknown config {config!r} of dataset builder {builder!r}; it has "
                         f"{', '.join(builders[builder])}.")
    return builder, config
  owners = [b for b, configs in builders.items() if name in configs]
  if len(owners) == 1:
    return owners[0], name
  if len(owners) > 1:
    raise CommandError(f"dataset {name!r} is ambiguous; write one of "
                       f"{', '.join(f'{b}/{name}' for b in owners)}.")
  known = known_dataset_names()
  known += sorted({c for configs in builders.values() for c in configs} | set(builders))
  close = difflib.get_close_matches(name, known, n=1)
  hint = f"did you mean {close[0]!r}? " if close else ""
  raise CommandError(f"unknown dataset {name!r}; {hint}'{PROG} datasets' lists the names "
                     f"(e.g. synthetic:tiny, roxford5k, folder:PATH).")


def synthetic_preset(spec: str) -> str:
  from retrieval_jax.data.synthetic import PRESETS  # noqa: PLC0415

  preset = spec[len(SYNTHETIC_PREFIX):]
  if preset not in PRESETS:
    raise CommandError(f"unknown dataset {spec!r}; the synthetic presets are "
                       f"{', '.join(SYNTHETIC_PREFIX + p for p in PRESETS)}.")
  return preset


def _custom_path(spec: str, prefix: str) -> pathlib.Path:
  path = pathlib.Path(spec[len(prefix):]).expanduser()
  if not path.exists():
    raise CommandError(f"--dataset {spec}: {path}: no such file or folder.")
  return path


class DatasetLoader:
  """Loads test and training sets by name (see the module docstring), caching the synthetic
  benchmark so a test set and its ``synthetic:train`` come from one generation."""

  def __init__(self, *, data_dir: str | None = None, manual_dir: str | None = None,
               skip_unreadable: bool = False, seed: int = 0, image_size: int | None = None,
               split: str = "test", queries_per_instance: int | None = None):
    self.data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
    self.manual_dir = manual_dir
    self.skip_unreadable = skip_unreadable
    self.seed, self.image_size, self.split = seed, image_size, split
    self.queries_per_instance = queries_per_instance
    self._synthetic: dict[str, Any] = {}
    self.last_preset: str | None = None

  def synthetic(self, preset: str):
    """The generated benchmark of ``preset`` (cached)."""
    if preset not in self._synthetic:
      from retrieval_jax.data import synthetic  # noqa: PLC0415

      self._synthetic[preset] = synthetic.generate(preset, seed=self.seed,
                                                   image_size=self.image_size)
    return self._synthetic[preset]

  def retrieval_set(self, spec: str):
    """The test set ``spec`` names (a ``RetrievalSet``)."""
    if spec.startswith(SYNTHETIC_PREFIX):
      self.last_preset = synthetic_preset(spec)
      if self.split not in ("test", "val"):
        raise CommandError(f"split must be test or val for {spec}; got {self.split!r}.")
      return getattr(self.synthetic(self.last_preset), self.split)
    from retrieval_jax.data import custom  # noqa: PLC0415

    if spec.startswith("folder:"):
      return custom.folder_retrieval_set(
          _custom_path(spec, "folder:"), queries_per_instance=self.queries_per_instance,
          skip_unreadable=self.skip_unreadable).dataset
    if spec.startswith("csv:"):
      return custom.csv_retrieval_set(_custom_path(spec, "csv:"),
                                      skip_unreadable=self.skip_unreadable).dataset
    name, plus, extra = spec.partition("+")
    distractors = None
    if plus:
      if extra != "r1m":
        raise CommandError(f"--dataset {spec}: the only distractor suffix is +r1m.")
      distractors = "revisitop1m"
    builder, config = resolve_builder(name)
    from retrieval_jax.data.builders import load_retrieval_set  # noqa: PLC0415

    return load_retrieval_set(builder, data_dir=self.data_dir, config=config,
                              manual_dir=self.manual_dir, skip_unreadable=self.skip_unreadable,
                              distractors=distractors)

  def instance_set(self, spec: str):
    """The training set ``spec`` names (an ``InstanceSet``, e.g. to learn whitening on)."""
    if spec.startswith(SYNTHETIC_PREFIX):
      parts = spec.split(":")
      if parts[-1] != "train" or len(parts) not in (2, 3):
        raise CommandError(f"unknown training set {spec!r}; use synthetic:train or "
                           f"synthetic:<preset>:train.")
      preset = parts[1] if len(parts) == 3 else (self.last_preset or "tiny")
      return self.synthetic(synthetic_preset(SYNTHETIC_PREFIX + preset)).train
    from retrieval_jax.data import custom  # noqa: PLC0415

    if spec.startswith("folder:"):
      return custom.folder_instance_set(_custom_path(spec, "folder:"),
                                        skip_unreadable=self.skip_unreadable).dataset
    if spec.startswith("csv:"):
      return custom.csv_instance_set(_custom_path(spec, "csv:"),
                                     skip_unreadable=self.skip_unreadable).dataset
    name, _, split = spec.partition(":")
    builder, config = resolve_builder(name)
    import tensorflow_datasets as tfds  # noqa: PLC0415

    from retrieval_jax.data.builders import tfds_instance_set  # noqa: PLC0415

    if self.skip_unreadable:
      config += "_skip_unreadable"
    prepared = tfds.builder(builder, data_dir=self.data_dir, config=config)
    prepared.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=self.manual_dir))
    return tfds_instance_set(prepared, split or "train")


def image_label(dataset_images: Sequence[Any], index: int, role: str) -> str:
  """A printable name of image ``index``: its path, or ``role[index]`` for in-memory arrays."""
  item = dataset_images[index] if isinstance(dataset_images, (list, tuple)) else None
  if isinstance(item, (str, os.PathLike)):
    return os.fspath(item)
  return f"{role}[{index}]"

