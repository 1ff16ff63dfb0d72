"""Prepared TFDS datasets as ``RetrievalSet`` / ``InstanceSet``, with lazily decoded images.

Images are never loaded up front: ``TfdsImages`` is a ``Sequence`` over the builder's random
access data source that decodes one image per ``__getitem__`` (so a database with the R1M
distractors costs no memory until read). Light columns (database instance ids, training cluster
ids, SfM positive pairs) come from ``info.metadata`` when the builder stored them there (all
builders of this package do) and otherwise from one pass over the split's records.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from retrieval_jax.data.datasets import GND_KEYS, InstanceSet, RetrievalSet
from retrieval_jax.data.images import ImageReadError, to_rgb_uint8

__all__ = ["TfdsImages", "load_retrieval_set", "tfds_instance_set", "tfds_retrieval_set"]

_SKIP_SUFFIX = "_skip_unreadable"


def _data_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
  """The split's records with the image left encoded (bytes), for lazy decoding."""
  if split not in builder.info.splits:
    raise ValueError(f"{_name(builder)}: no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  try:
    return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  except NotImplementedError as err:  # prepared as TFRecord, which has no random access
    raise ValueError(f"{_name(builder)}: lazy image access needs the dataset prepared with "
                     f"file_format='array_record' (the default of this package's builders); "
                     f"it is stored as {builder.info.file_format}.") from err


def _name(builder: tfds.core.DatasetBuilder) -> str:
  config = builder.builder_config
  return builder.name if config is None else f"{builder.name}/{config.name}"


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsImages(Sequence):
  """The images of a TFDS split, decoded to RGB ``uint8 [H, W, 3]`` on ``__getitem__``.

  Args:
    source: a data source of the split whose ``"image"`` values are encoded bytes.
    name: the split, for messages.
  """

  def __init__(self, source: Sequence[dict], name: str):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"{self._name}: image index {index} out of range for {n} images.")
    data = self._source[index % n]["image"]
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        # Stored images are upright already (see builders/_base.py), so no EXIF transpose.
        return to_rgb_uint8(image)
    except (OSError, ValueError, SyntaxError) as err:
      raise ImageReadError(f"{self._name}: cannot decode stored image {index}: {err}") from err


class _ConcatImages(Sequence):
  """Two image sequences back to back (a benchmark database followed by distractors)."""

  def __init__(self, first: Sequence, second: Sequence):
    self._first, self._second = first, second

  def __len__(self) -> int:
    return len(self._first) + len(self._second)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n, head = len(self), len(self._first)
    if not -n <= index < n:
      raise IndexError(f"image index {index} out of range for {n} images.")
    index %= n
    return self._first[index] if index < head else self._second[index - head]


def _column(builder: tfds.core.DatasetBuilder, split: str, source: Sequence[dict], field: str
            ) -> np.ndarray:
  """A per-example int64 column: from ``metadata["labels"][split]`` or from the records."""
  labels = (builder.info.metadata or {}).get("labels", {}).get(split)
  if labels is not None and len(labels) == len(source):
    return np.asarray(labels, np.int64)
  return np.asarray([int(source[i][field]) for i in range(len(source))], np.int64)


def _gnd_kind(builder: tfds.core.DatasetBuilder) -> tuple[str, tuple[str, ...]]:
  gnd = builder.info.features["gnd"]
  keys = set(gnd.keys())
  for kind, kind_keys in GND_KEYS.items():
    if keys == set(kind_keys):
      return kind, kind_keys
  raise ValueError(f"{_name(builder)}: gnd feature keys {sorted(keys)} match no ground-truth "
                   f"kind {dict(GND_KEYS)}.")


def tfds_retrieval_set(builder: tfds.core.DatasetBuilder, database_split: str = "database",
                       query_split: str = "query", *,
                       distractors: tfds.core.DatasetBuilder | None = None,
                       distractor_split: str = "database") -> RetrievalSet:
  """A prepared retrieval builder as a ``RetrievalSet`` with lazily decoded images.

  Args:
    builder: a prepared builder with the retrieval schema (``builders/_base.py``).
    database_split, query_split: its split names.
    distractors: optional prepared builder whose ``distractor_split`` is appended to the
      database (``revisitop1m`` for ROxford5k+R1M / RParis6k+R1M); ground-truth indices are
      unchanged because distractors come last.
    distractor_split: the distractors' split.

  Returns:
    The ``RetrievalSet``; ``gnd_kind`` is inferred from the ``gnd`` feature's keys.
  """
  name = _name(builder)
  kind, keys = _gnd_kind(builder)
  db_source = _data_source(builder, database_split)
  database: Sequence = TfdsImages(db_source, f"{name}:{database_split}")
  database_ids = _column(builder, database_split, db_source, "instance_id")
  if distractors is not None:
    extra = _data_source(distractors, distractor_split)
    database = _ConcatImages(database, TfdsImages(extra, f"{_name(distractors)}:"
                                                  f"{distractor_split}"))
    database_ids = np.concatenate(
        [database_ids, _column(distractors, distractor_split, extra, "instance_id")])
    name = f"{name}+{_name(distractors)}"
  q_source = _data_source(builder, query_split)
  gnd, boxes, own = [], [], []
  for i in range(len(q_source)):
    record = q_source[i]
    if int(record["index"]) != i:
      raise ValueError(f"{name}:{query_split}: record {i} has index {int(record['index'])}; "
                       f"the split was not written in source order (disable_shuffling).")
    gnd.append({key: np.asarray(record["gnd"][key], np.int64) for key in keys})
    boxes.append(np.asarray(record["box"], np.float32))
    own.append(int(record["query_db_index"]))
  boxes = np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)
  own = np.asarray(own, np.int64)
  for entry, box in zip(gnd, boxes):
    if not np.isnan(box).any():
      entry["bbx"] = box  # revisitop's habit: the box rides along in the ground truth
  return RetrievalSet(
      name=name, database=database, queries=TfdsImages(q_source, f"{name}:{query_split}"),
      gnd=gnd, gnd_kind=kind,
      query_boxes=boxes if not np.isnan(boxes).all() else None,
      # RetrievalSet wants every query in the database or none: a mix (queries lost to
      # skipped database images) leaves the query/database link to ``gnd`` alone.
      query_db_indices=own if own.size and (own >= 0).all() else None,
      database_ids=database_ids)


def tfds_instance_set(builder: tfds.core.DatasetBuilder, split: str = "train") -> InstanceSet:
  """A prepared training builder's split as an ``InstanceSet`` with lazily decoded images.

  Positive pairs (retrieval-SfM ``qidxs``/``pidxs``) come from
  ``info.metadata["positive_pairs"][split]`` when present.
  """
  name = f"{_name(builder)}:{split}"
  source = _data_source(builder, split)
  clusters = _column(builder, split, source, "cluster_id")
  boxes = None
  if "box" in builder.info.features:
    # Boxes are rare in training sets; only scan the records when the metadata says some exist.
    if (builder.info.metadata or {}).get("has_boxes", {}).get(split, True):
      boxes = np.asarray([source[i]["box"] for i in range(len(source))], np.float32)
      boxes = boxes.reshape(-1, 4)
      if np.isnan(boxes).all():
        boxes = None
  pairs = (builder.info.metadata or {}).get("positive_pairs", {}).get(split)
  if pairs is not None:
    pairs = np.stack([np.asarray(pairs["query_index"], np.int64),
                      np.asarray(pairs["positive_index"], np.int64)], axis=1)
  return InstanceSet(name=name, images=TfdsImages(source, name), cluster_ids=clusters,
                     boxes=boxes, positive_pairs=pairs)


def load_retrieval_set(name: str, *, data_dir: str | os.PathLike, config: str | None = None,
                       manual_dir: str | os.PathLike | None = None,
                       skip_unreadable: bool = False, distractors: str | None = None
                       ) -> RetrievalSet:
  """Prepares a registered retrieval builder if needed and returns its ``RetrievalSet``.

  Args:
    name: the builder (``"revisited_landmarks"``); its module must have been imported.
    data_dir: where TFDS stores prepared data.
    config: the config (default: the builder's first).
    manual_dir: the manual directory (default: ``<data_dir>/downloads/manual``).
    skip_unreadable: use the ``<config>_skip_unreadable`` variant.
    distractors: optional distractor builder name (``"revisitop1m"``), prepared the same way
      and appended to the database.

  Returns:
    The ``RetrievalSet``.
  """
  def prepared(builder_name: str, config_name: str | None) -> tfds.core.DatasetBuilder:
    if config_name is None:
      configs = tfds.builder_cls(builder_name).BUILDER_CONFIGS
      config_name = configs[0].name if configs else None
    if skip_unreadable and config_name is not None and not config_name.endswith(_SKIP_SUFFIX):
      config_name += _SKIP_SUFFIX
    builder = tfds.builder(builder_name, data_dir=os.fspath(data_dir), config=config_name)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
    return builder

  extra = None if distractors is None else prepared(distractors, None)
  return tfds_retrieval_set(prepared(name, config), distractors=extra)
