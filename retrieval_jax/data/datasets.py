"""The two dataset shapes every source produces: a training set and a retrieval test set.

The synthetic benchmark, the TFDS builders, custom folders/CSVs and the ORL faces all return
these, so training, mining and evaluation read one format whatever the source.

Images are an ``ImageSequence``: any ``Sequence`` whose items are RGB ``uint8 [H, W, 3]`` arrays
or image file paths. A list works; so does a lazy sequence that decodes on ``__getitem__`` (a
TFDS data source, a million-image folder), which is why the containers never copy ``images``.

Boxes are pixel coordinates ``(x0, y0, x1, y1)`` of the image as stored (before any resizing),
as the revisitop ``bbx`` field; a crop is ``data.transforms.crop_box(image, box)``: Pillow's
``img.crop(bbx)``, each coordinate rounded half-to-even, as cirtorch crops revisitop queries.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

ImageSource = Union[np.ndarray, str, os.PathLike]
ImageSequence = Sequence[ImageSource]

#: Ground-truth families and the index lists each query dict holds.
GND_KEYS = {
    "revisited": ("easy", "hard", "junk"),  # ROxford/RParis, synthetic: metrics.revisited_gnd
    "original": ("good", "ok", "junk"),  # Oxford5k/Paris6k: metrics.original_gnd
    "ok_junk": ("ok", "junk"),  # Holidays, UKBench, INSTRE, custom sets: compute_map as is
}


def _check_boxes(name: str, boxes: Any, n: int) -> np.ndarray | None:
  if boxes is None:
    return None
  boxes = np.asarray(boxes, dtype=np.float32)
  if boxes.shape != (n, 4):
    raise ValueError(f"{name} must have shape ({n}, 4) (x0, y0, x1, y1 per image); got "
                     f"{boxes.shape}.")
  given = ~np.isnan(boxes).any(axis=1)  # a NaN row means "no box"
  bad = given & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]) | (boxes[:, :2] < 0)
                 .any(axis=1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{name}[{i}] = {boxes[i].tolist()} is not a box (need 0 <= x0 < x1 and "
                     f"0 <= y0 < y1).")
  return boxes


def _check_ids(name: str, ids: Any, n: int) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.shape != (n,) or not (np.issubdtype(ids.dtype, np.integer) or n == 0):
    raise ValueError(f"{name} must be {n} integer ids (one per image); got {ids.dtype} "
                     f"{ids.shape}.")
  return ids.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class InstanceSet:
  """Training images grouped into instances (cirtorch "clusters", landmark ids, classes).

  Attributes:
    name: what the set is, for messages (``"synthetic_landmarks/tiny:train"``).
    images: ``N`` images (arrays or paths).
    cluster_ids: int64 ``[N]``, the instance of each image; any integers, not necessarily
      contiguous.
    boxes: optional float32 ``[N, 4]`` object boxes (NaN rows: none).
    positive_pairs: optional int64 ``[P, 2]`` explicit ``(query, positive)`` image index pairs
      (retrieval-SfM-120k ``qidxs``/``pidxs``); when absent, positives come from the clusters.
  """

  name: str
  images: ImageSequence
  cluster_ids: np.ndarray
  boxes: np.ndarray | None = None
  positive_pairs: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.images)
    object.__setattr__(self, "cluster_ids",
                       _check_ids(f"{self.name}: cluster_ids", self.cluster_ids, n))
    object.__setattr__(self, "boxes", _check_boxes(f"{self.name}: boxes", self.boxes, n))
    if self.positive_pairs is not None:
      pairs = np.asarray(self.positive_pairs)
      if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"{self.name}: positive_pairs must be an integer [P, 2] array of "
                         f"(query, positive) image indices; got {pairs.dtype} {pairs.shape}.")
      if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"{self.name}: positive_pairs index out of range [0, {n}).")
      object.__setattr__(self, "positive_pairs", pairs.astype(np.int64))

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_clusters(self) -> int:
    return int(np.unique(self.cluster_ids).size)


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
  """A test set: a database, queries and per-query ground truth over database indices.

  Attributes:
    name: what the set is, for messages (``"roxford5k"``).
    database: ``N`` database images (arrays or paths).
    queries: ``Q`` query images. For benchmarks whose queries are database images (Holidays,
      UKBench) these are the same sources and ``query_db_indices`` says which.
    gnd: ``Q`` dicts of int index lists into ``database``, with the keys of ``gnd_kind``
      (see ``GND_KEYS``); a ``"bbx"`` key may repeat the query box as revisitop does.
    gnd_kind: ``"revisited"``, ``"original"`` or ``"ok_junk"``.
    query_boxes: optional float32 ``[Q, 4]`` query crops (NaN rows: whole image).
    query_db_indices: optional int64 ``[Q]``, the database index of each query image
      (``metrics.exclude_query_gnd``).
    database_ids: optional int64 ``[N]`` instance ids of database images (-1: distractor), for
      label-based scores (UKBench N-S, recall@k).
  """

  name: str
  database: ImageSequence
  queries: ImageSequence
  gnd: Sequence[Mapping[str, Any]]
  gnd_kind: str = "revisited"
  query_boxes: np.ndarray | None = None
  query_db_indices: np.ndarray | None = None
  database_ids: np.ndarray | None = None

  def __post_init__(self):
    n, q = len(self.database), len(self.queries)
    if self.gnd_kind not in GND_KEYS:
      raise ValueError(f"{self.name}: gnd_kind must be one of {tuple(GND_KEYS)}; got "
                       f"{self.gnd_kind!r}.")
    if len(self.gnd) != q:
      raise ValueError(f"{self.name}: gnd has {len(self.gnd)} entries for {q} queries.")
    gnd = []
    for i, entry in enumerate(self.gnd):
      clean = dict(entry)
      for key in GND_KEYS[self.gnd_kind]:
        if key not in entry:
          raise ValueError(f"{self.name}: gnd[{i}] has no {key!r} list (a {self.gnd_kind} "
                           f"ground truth needs {GND_KEYS[self.gnd_kind]}).")
        idx = np.asarray(entry[key]).reshape(-1)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0
                         or idx.max() >= n):
          raise ValueError(f"{self.name}: gnd[{i}][{key!r}] must hold database indices in "
                           f"[0, {n}); got {idx[:5].tolist()}...")
        clean[key] = idx.astype(np.int64)
      gnd.append(clean)
    object.__setattr__(self, "gnd", gnd)
    object.__setattr__(self, "query_boxes",
                       _check_boxes(f"{self.name}: query_boxes", self.query_boxes, q))
    if self.query_db_indices is not None:
      own = _check_ids(f"{self.name}: query_db_indices", self.query_db_indices, q)
      if own.size and (own.min() < 0 or own.max() >= n):
        raise ValueError(f"{self.name}: query_db_indices must be in [0, {n}).")
      object.__setattr__(self, "query_db_indices", own)
    if self.database_ids is not None:
      object.__setattr__(self, "database_ids",
                         _check_ids(f"{self.name}: database_ids", self.database_ids, n))
