"""What every benchmark builder shares: manual-directory checks, image validation, the schema.

The benchmarks cannot be downloaded by TFDS on the user's behalf (some hosts are FTP or gone,
and the sets are licensed for research use), so every builder reads a *manual directory* laid
out as the official archives extract, and names the files to fetch and where to put them when
something is missing.

Schema (shared with every other builder in this package):

* ``disable_shuffling=True`` and integer keys, so example order is source order and the
  database indices in the ground truth stay valid.
* Retrieval builders have a ``database`` and a ``query`` split. TFDS allows one feature dict per
  dataset, so both splits carry the union of the features (``RETRIEVAL_FEATURE_DOC``): database
  rows fill the query-only fields with "none" values (NaN box, -1, empty ground truth).
* Training builders have ``train`` (and ``val``) splits with ``image``, ``image_id``,
  ``cluster_id`` and ``box``.
* Light per-split columns live in ``info.metadata`` (a JSON ``MetadataDict``) so readers need not
  scan millions of image records for them: ``labels[split]`` (database instance ids or training
  cluster ids, in example order), ``positive_pairs[split]`` (retrieval-SfM ``qidxs``/``pidxs``),
  ``skipped_unreadable[split]`` (files left out) and ``num_skipped_unreadable``.

Images are validated with ``retrieval_jax.data.images.load_image`` before anything is written.
An upright RGB or grayscale JPEG/PNG is stored byte for byte; anything else (EXIF-rotated, CMYK,
16-bit, palette, a manual rotation) is stored as a lossless PNG of the decoded RGB array, so
decoding a stored image always equals ``load_image`` of the source file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import io
import logging
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from retrieval_jax.data.images import ImageReadError, load_image

log = logging.getLogger(__name__)

_CHECK_BLOCK = 4096

#: Appended to a config name for the variant that skips unreadable images.
SKIP_SUFFIX = "_skip_unreadable"

RETRIEVAL_FEATURE_DOC = """Features (both splits, TFDS keeps one feature dict per dataset):
  image: uint8 [H, W, 3]; image_id: source file name; instance_id: int64 object/landmark id
  (-1 unknown or distractor); index: int64 position in the split; box: float32 [4] query box
  x0, y0, x1, y1 in pixels of the stored image (NaN: none; always NaN in `database`);
  query_db_index: int64 database index of a query image (-1: not in the database);
  gnd: int64 database index lists per query (empty in `database`)."""


class ManualDataError(ValueError):
  """A manual directory that is missing, incomplete or holds a file with the wrong schema."""


@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
  """A builder variant.

  Attributes:
    variant: which dataset of the family (``"roxford5k"``), shared by the ``_skip_unreadable``
      twin of a config.
    skip_unreadable: leave out images that cannot be decoded (logged, listed in
      ``info.metadata["skipped_unreadable"]``) instead of failing on the first one.
  """

  variant: str = ""
  skip_unreadable: bool = False


def with_skip_variants(configs: Sequence[ManualConfig]) -> list[ManualConfig]:
  """Returns ``configs`` followed by a ``<name>_skip_unreadable`` twin of each.

  Twins are separate configs (not a flag on one) so both can be prepared side by side: TFDS
  stores each config in its own folder.
  """
  twins = [dataclasses.replace(
      c, name=c.name + SKIP_SUFFIX, skip_unreadable=True,
      description=f"{c.description} Unreadable images are skipped and counted.")
           for c in configs]
  return [*configs, *twins]


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An image file to store, with an optional clockwise rotation (multiple of 90 degrees)."""

  path: str
  rotate: int = 0


@dataclasses.dataclass(frozen=True)
class QuerySpec:
  """One query before skipping: its image, box, ground truth and database position.

  ``gnd`` holds index lists into the *unskipped* database; ``db_index`` is -1 when the query is not
  a database image.
  """

  image_id: str
  image: ImageRef
  gnd: Mapping[str, Sequence[int]]
  box: Sequence[float] | None = None
  db_index: int = -1
  instance_id: int = -1


def group_queries(ids: Sequence[str], images: Sequence[ImageRef], groups: Sequence[int],
                  query_positions: Iterable[int]) -> list[QuerySpec]:
  """Queries that are database images of labelled groups (Holidays, UKBench).

  ``ok`` is the rest of the query's group and ``junk`` the query itself, so plain
  ``compute_map`` already follows the protocol of removing the query from its own ranking.
  """
  groups = np.asarray(groups)
  queries = []
  for i in query_positions:
    members = np.flatnonzero(groups == groups[i])
    queries.append(QuerySpec(image_id=ids[i], image=images[i],
                             gnd={"ok": members[members != i].tolist(), "junk": [i]},
                             db_index=i, instance_id=int(groups[i])))
  return queries


# --------------------------------------------------------------------------- features


def nan_box() -> np.ndarray:
  return np.full(4, np.nan, np.float32)


def retrieval_features(gnd_keys: Sequence[str], *, with_clusters: bool = False
                       ) -> tfds.features.FeaturesDict:
  """The union feature dict of the ``database`` and ``query`` splits (``RETRIEVAL_FEATURE_DOC``),
  plus ``cluster_id`` for datasets that keep a training split in the same feature dict."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": tfds.features.Text(),
      **({"cluster_id": np.int64} if with_clusters else {}),
      "instance_id": np.int64,
      "index": np.int64,
      "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "query_db_index": np.int64,
      "gnd": tfds.features.FeaturesDict(
          {key: tfds.features.Sequence(np.int64) for key in gnd_keys}),
  })


def training_features() -> tfds.features.FeaturesDict:
  """The feature dict of training splits: image, image_id, cluster_id, box (NaN: none)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": tfds.features.Text(),
      "cluster_id": np.int64,
      "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
  })


# --------------------------------------------------------------------------- file checks


def load_pickle(path: os.PathLike | str) -> Any:
  """Unpickles a ground-truth file (latin1, so Python 2 pickles with numpy arrays load too).

  Only open pickles from the official sources: unpickling can run code.

  Raises:
    ManualDataError: the file is not a readable pickle, naming it.
  """
  try:
    with open(path, "rb") as f:
      return pickle.load(f, encoding="latin1")
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
          IndexError, TypeError, ValueError) as err:
    raise ManualDataError(f"cannot read pickle {os.fspath(path)}: {err!r}") from err


def index_list(value: Any, where: str, n: int, *, one_based: bool = False) -> np.ndarray:
  """Validates a ground-truth index list and returns it as 0-based int64.

  Args:
    value: a list/array of integer indices (integral floats are accepted, as MATLAB stores them).
    where: what the list is, for messages (``"gnd_roxford5k.pkl: gnd[3]['hard']"``).
    n: the number of indexed items (database images); indices must be in ``[0, n)`` after
      conversion.
    one_based: subtract 1 first (MATLAB files).

  Raises:
    ManualDataError: not a flat integer list, or an index out of range.
  """
  try:
    idx = np.asarray(value, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as err:
    raise ManualDataError(f"{where} must be a list of integer indices; got "
                          f"{type(value).__name__}.") from err
  if idx.size and not np.all(np.isfinite(idx) & (idx == np.round(idx))):
    raise ManualDataError(f"{where} must hold integer indices; got {idx[:5].tolist()}...")
  idx = idx.astype(np.int64) - (1 if one_based else 0)
  bad = (idx < 0) | (idx >= n)
  if bad.any():
    shown = int(idx[np.argmax(bad)]) + (1 if one_based else 0)
    valid = f"[1, {n}] (1-based)" if one_based else f"[0, {n})"
    raise ManualDataError(f"{where} holds index {shown}, outside the valid range {valid}.")
  return idx


def check_box(value: Any, where: str) -> np.ndarray:
  """Validates an ``(x0, y0, x1, y1)`` pixel box and returns it as float32 [4].

  Raises:
    ManualDataError: not four finite numbers with ``0 <= x0 < x1`` and ``0 <= y0 < y1``.
  """
  try:
    box = np.asarray(value, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as err:
    raise ManualDataError(f"{where} must be 4 numbers (x0, y0, x1, y1); got {value!r}.") from err
  if (box.shape != (4,) or not np.all(np.isfinite(box)) or box[0] < 0 or box[1] < 0
      or box[2] <= box[0] or box[3] <= box[1]):
    raise ManualDataError(f"{where} must be a box x0, y0, x1, y1 with 0 <= x0 < x1 and "
                          f"0 <= y0 < y1; got {np.asarray(value).tolist()}.")
  return box.astype(np.float32)


def read_lines(path: os.PathLike | str) -> list[str]:
  """Returns the non-empty, stripped lines of a text file."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


# --------------------------------------------------------------------------- images


def _raw_storable(path: str) -> bool:
  """Whether the file's own bytes decode (by TF and PIL) to what ``load_image`` returns."""
  with Image.open(path) as image:
    orientation = image.getexif().get(0x0112, 1)
    return image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L") and orientation == 1


def _check_one(ref: ImageRef) -> tuple[bool, str]:
  """Returns ``(store the file's bytes as is, "")`` or ``(False, reason)`` for unreadable files."""
  try:
    load_image(ref.path)  # a full decode: truncated files fail here
    return ref.rotate == 0 and _raw_storable(ref.path), ""
  except ImageReadError as err:
    return False, str(err)
  except OSError as err:  # load_image succeeded but the header re-read failed (file changed)
    return False, f"cannot read image {ref.path}: {err}"


def image_value(ref: ImageRef, raw: bool) -> str | bytes:
  """What to hand to ``tfds.features.Image``: the path (bytes stored as is) or PNG bytes."""
  if raw:
    return ref.path
  array = load_image(ref.path)
  if ref.rotate:
    array = np.ascontiguousarray(np.rot90(array, k=-(ref.rotate // 90)))  # clockwise
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class CheckedImages:
  """Result of ``check_images``: which images are kept and how each is stored.

  Attributes:
    kept: int64 indices into the checked list, in order.
    raw: bool per kept image: store the file's bytes as is.
    skipped: ``(path, reason)`` of each unreadable image left out.
  """

  kept: np.ndarray
  raw: np.ndarray
  skipped: list[tuple[str, str]]


def check_images(refs: Sequence[ImageRef], *, skip_unreadable: bool, what: str,
                 max_workers: int | None = None) -> CheckedImages:
  """Decodes every image once, in threads (Pillow releases the GIL while decoding).

  Args:
    refs: the images, in source order.
    skip_unreadable: leave unreadable images out instead of raising.
    what: the builder/config/split, for messages.
    max_workers: decoding threads (default: up to 8, one per CPU).

  Returns:
    A ``CheckedImages``.

  Raises:
    ImageReadError: an unreadable image when ``skip_unreadable`` is False, naming the file.
  """
  workers = max_workers or min(8, os.cpu_count() or 1)
  results = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # In blocks, so a million-image split never holds a million pending futures.
    for start in range(0, len(refs), _CHECK_BLOCK):
      results.extend(pool.map(_check_one, refs[start:start + _CHECK_BLOCK]))
  kept, raw, skipped = [], [], []
  for i, (ref, (store_raw, reason)) in enumerate(zip(refs, results)):
    if reason:
      if not skip_unreadable:
        raise ImageReadError(f"{what}: {reason} (use the '{SKIP_SUFFIX}' config to skip "
                             f"unreadable images)")
      skipped.append((ref.path, reason))
      continue
    kept.append(i)
    raw.append(store_raw)
  return CheckedImages(np.asarray(kept, np.int64), np.asarray(raw, bool), skipped)


# --------------------------------------------------------------------------- builder base


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of every builder of this package: the shared schema, ArrayRecord storage.

  Data is written as ArrayRecord by default (pass ``file_format`` to override) because the
  readers in ``loading.py`` need random access (``as_data_source``); example order is source
  order (``disable_shuffling``, integer keys).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file (where TFDS looks for a ``checksums.tsv``).

    TFDS 4.9's own lookup, for builders in a package, tests
    ``importlib_resources.abc.Traversable``, a backport that Python >= 3.9 installs lack; its
    plain-file fallback is all this package needs.
    """
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _dataset_info(self, features: tfds.features.FeaturesDict, description: str,
                    homepage: str = "", citation: str = "") -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=description, features=features, homepage=homepage,
        citation=citation, disable_shuffling=True, metadata=tfds.core.MetadataDict())


class ManualBenchmarkBuilder(LocalBuilder, skip_registration=True):
  """Base of the benchmark builders: a manual directory in, the shared schema out.

  Subclasses set ``BUILDER_CONFIGS`` (``ManualConfig``\\ s), ``MANUAL_DOWNLOAD_INSTRUCTIONS``,
  ``_info`` (via ``_retrieval_info`` or ``_training_info``) and ``_split_generators`` (via
  ``_retrieval_splits`` or ``_training_split``).
  """

  # -- info

  def _retrieval_info(self, gnd_keys: Sequence[str], description: str, homepage: str,
                      citation: str) -> tfds.core.DatasetInfo:
    return self._dataset_info(retrieval_features(gnd_keys),
                              f"{description}\n\n{RETRIEVAL_FEATURE_DOC}", homepage, citation)

  def _training_info(self, description: str, homepage: str, citation: str
                     ) -> tfds.core.DatasetInfo:
    return self._dataset_info(training_features(), description, homepage, citation)

  # -- manual directory

  @property
  def _what(self) -> str:
    return f"{self.name}/{self.builder_config.name}"

  def _manual_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    """The manual directory, or a ManualDataError naming it and the files to put there."""
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError as err:  # TFDS: missing or empty; its message names the directory
      raise ManualDataError(f"{self._what}: {err}") from None

  def _require(self, root: str, relpaths: Iterable[str]) -> None:
    """Raises ManualDataError listing every missing file/folder with its full expected path."""
    missing = [os.path.join(root, rel) for rel in relpaths
               if not os.path.exists(os.path.join(root, rel))]
    if missing:
      raise ManualDataError(
          f"{self._what}: manual directory {root} lacks " + ", ".join(missing)
          + f".\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _check(self, refs: Sequence[ImageRef], split: str, root: str) -> CheckedImages:
    """Validates a split's images and records the skipped ones in the metadata and the log."""
    checked = check_images(refs, skip_unreadable=self.builder_config.skip_unreadable,
                           what=f"{self._what}:{split}")
    metadata = self.info.metadata
    if checked.skipped:
      names = [os.path.relpath(path, root) for path, _ in checked.skipped]
      metadata.setdefault("skipped_unreadable", {})[split] = names
      log.warning("%s:%s: skipped %d unreadable image(s), e.g. %s", self._what, split,
                  len(names), checked.skipped[0][1])
    metadata["num_skipped_unreadable"] = sum(
        len(v) for v in metadata.get("skipped_unreadable", {}).values())
    return checked

  # -- retrieval

  def _retrieval_splits(self, root: str, db_ids: Sequence[str], db_images: Sequence[ImageRef],
                        db_instances: Sequence[int] | None,
                        queries: Sequence[QuerySpec] | None, gnd_keys: Sequence[str]
                        ) -> dict[str, Iterator]:
    """Checks the images, drops unreadable ones (re-indexing the ground truth), returns splits.

    Args:
      root: the manual directory (skipped files are reported relative to it).
      db_ids, db_images: database image ids and files, in source order.
      db_instances: instance id per database image (None: all -1).
      queries: the queries (None: a database-only builder such as the R1M distractors).
      gnd_keys: the ground-truth keys each query's ``gnd`` holds.

    Returns:
      ``{"database": ..., "query": ...}`` example generators (``"query"`` only with queries).
    """
    n = len(db_ids)
    instances = np.full(n, -1, np.int64) if db_instances is None else np.asarray(
        db_instances, np.int64)
    db = self._check(db_images, "database", root)
    new_index = np.full(n, -1, np.int64)
    new_index[db.kept] = np.arange(len(db.kept))
    self.info.metadata.setdefault("labels", {})["database"] = instances[db.kept].tolist()

    def database_rows() -> Iterator[dict]:
      empty = {key: [] for key in gnd_keys}
      for new, (old, raw) in enumerate(zip(db.kept, db.raw)):
        yield {"image": image_value(db_images[old], raw), "image_id": db_ids[old],
               "instance_id": instances[old], "index": new, "box": nan_box(),
               "query_db_index": -1, "gnd": empty}

    splits = {"database": self._generate_examples(database_rows())}
    if queries is None:
      return splits
    q = self._check([spec.image for spec in queries], "query", root)

    def query_rows() -> Iterator[dict]:
      for new, (old, raw) in enumerate(zip(q.kept, q.raw)):
        spec = queries[old]
        gnd = {}
        for key in gnd_keys:
          idx = new_index[np.asarray(spec.gnd[key], np.int64)]
          gnd[key] = idx[idx >= 0]  # unreadable database images leave the ground truth
        box = nan_box() if spec.box is None else np.asarray(spec.box, np.float32)
        own = int(new_index[spec.db_index]) if spec.db_index >= 0 else -1
        yield {"image": image_value(spec.image, raw), "image_id": spec.image_id,
               "instance_id": spec.instance_id, "index": new, "box": box,
               "query_db_index": own, "gnd": gnd}

    splits["query"] = self._generate_examples(query_rows())
    return splits

  # -- training

  def _training_split(self, root: str, split: str, ids: Sequence[str],
                      images: Sequence[ImageRef], clusters: Sequence[int],
                      boxes: Sequence[Sequence[float] | None] | None = None,
                      pairs: np.ndarray | None = None) -> Iterator:
    """Checks a training split's images and returns its example generator.

    Args:
      root: the manual directory.
      split: the split name (``"train"``, ``"val"``).
      ids, images, clusters: per image, in source order.
      boxes: optional per-image boxes (None entries: no box).
      pairs: optional int [P, 2] (query, positive) indices into the unskipped images; pairs
        touching a skipped image are dropped, the rest re-indexed, and the result is stored in
        ``info.metadata["positive_pairs"][split]``.
    """
    clusters = np.asarray(clusters, np.int64)
    checked = self._check(images, split, root)
    metadata = self.info.metadata
    metadata.setdefault("labels", {})[split] = clusters[checked.kept].tolist()
    # Lets readers skip a scan of every record for boxes when there are none.
    metadata.setdefault("has_boxes", {})[split] = boxes is not None and any(
        boxes[i] is not None for i in checked.kept)
    if pairs is not None:
      new_index = np.full(len(ids), -1, np.int64)
      new_index[checked.kept] = np.arange(len(checked.kept))
      mapped = new_index[np.asarray(pairs, np.int64).reshape(-1, 2)]
      mapped = mapped[(mapped >= 0).all(axis=1)]
      metadata.setdefault("positive_pairs", {})[split] = {
          "query_index": mapped[:, 0].tolist(), "positive_index": mapped[:, 1].tolist()}

    def rows() -> Iterator[dict]:
      for old, raw in zip(checked.kept, checked.raw):
        box = None if boxes is None else boxes[old]
        yield {"image": image_value(images[old], raw), "image_id": ids[old],
               "cluster_id": clusters[old],
               "box": nan_box() if box is None else np.asarray(box, np.float32)}

    return self._generate_examples(rows())

  def _generate_examples(self, rows: Iterable[dict]) -> Iterator[tuple[int, dict]]:
    """Yields ``(position, example)``: integer keys keep source order (disable_shuffling)."""
    yield from enumerate(rows)
