"""The benchmark: instances, splits, presets, visibility metadata and revisited ground truth.

Splits (instances are disjoint across them: each has its own instance seeds and ids):

* ``train``: ``train_instances`` landmarks x ``train_views`` photos each, instance-major
  (``cluster_ids`` = instance id), boxes of the visible object; ready for tuple mining and
  m-per-class batches.
* ``val`` and ``test``: a database of ``db_views`` photos per instance (the first a clear,
  frontal view, the others anything from easy to barely visible) plus distractors (photos of
  landmarks that are not in the set, or of clutter only), shuffled; and
  ``queries_per_instance`` query photos per instance with the object's box, as Oxford's.

Ground truth follows the annotation of Radenovic et al., "Revisiting Oxford and Paris",
CVPR 2018 (Easy / Hard / Unclear = junk / Negative), made exact with the generated visibility
of each database photo of the query's instance (:func:`visibility_labels`):

* junk (unclear): ``visible_fraction < 0.25`` or ``visible_area < 0.015`` (less than a quarter
  of the building is in view, or what is visible covers under 1.5% of the photo);
* easy: otherwise, when ``visible_fraction >= 0.7`` and ``object_scale >= 0.45`` and the
  viewpoint change from the query is at most 30 degrees and the illumination-change strength is
  at most 0.6 (clearly depicted: no severe truncation or occlusion, no large viewpoint change, no
  extreme illumination, the landmark occupies a large area);
* hard: every other photo of the instance (depicted, but truncated, occluded, small, seen from
  a large angle or strongly lit);
* negative: photos of other instances and distractors (not listed).

The viewpoint change of a pair is the angle between the two cameras' optical axes in the
landmark's frame (:func:`viewpoint_change`), so it is per (query, database photo).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np

from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.synthetic import camera, scenes

# Ground-truth thresholds (see the module docstring).
JUNK_MAX_VISIBLE = 0.25
JUNK_MAX_AREA = 0.015
EASY_MIN_VISIBLE = 0.7
EASY_MIN_SCALE = 0.45
EASY_MAX_VIEWPOINT = 30.0
EASY_MAX_ILLUMINATION = 0.6
EASY, HARD, JUNK = 0, 1, 2

# Keys of the generator streams: np.random.default_rng([seed, ROLE, SPLIT, ...]).
_SPLITS = {"train": 0, "val": 1, "test": 2}
_LANDMARK, _DISTRACTOR, _CLUTTER, _GEOMETRY, _PIXELS, _ORDER = 1, 2, 3, 4, 5, 6
_TRAIN, _DB, _DISTRACT_VIEW, _QUERY = 0, 1, 2, 3
# Instance ids: split offsets keep them disjoint (and readable) whatever the counts.
_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
# Probability that a distractor photo shows a (non-test) landmark rather than clutter alone.
_DISTRACTOR_LANDMARK_P = 0.75


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes of a synthetic benchmark.

  Attributes:
    name: preset name (for messages and dataset names).
    train_instances: landmarks of the training split.
    train_views: photos per training landmark.
    val_instances: landmarks of the validation retrieval set (0: an empty val set).
    val_distractors: distractor photos in the validation database.
    test_instances: landmarks of the test retrieval set.
    db_views: database photos per val/test landmark (the first is always a clear view).
    distractors: distractor photos in the test database.
    queries_per_instance: query photos per val/test landmark.
    image_size: long side of every photo in pixels (the short side follows a random aspect
      ratio among 4:3, 3:2, 16:9, 1:1, 3:4, 2:3).
    clutter_pool: unrelated landmarks per split that appear in the background.
    max_clutter: at most this many of them per photo.
  """

  name: str = "custom"
  train_instances: int = 8
  train_views: int = 6
  val_instances: int = 3
  val_distractors: int = 4
  test_instances: int = 6
  db_views: int = 6
  distractors: int = 12
  queries_per_instance: int = 2
  image_size: int = 256
  clutter_pool: int = 16
  max_clutter: int = 2

  def __post_init__(self):
    minimum = {"train_instances": 0, "train_views": 1, "val_instances": 0, "val_distractors": 0,
               "test_instances": 1, "db_views": 1, "distractors": 0, "queries_per_instance": 1,
               "clutter_pool": 0, "max_clutter": 0, "image_size": 32}
    for field, low in minimum.items():
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"SyntheticConfig.{field} must be an integer >= {low}; got {value!r}.")

  @property
  def landmark_size(self) -> int:
    """Long side of a landmark's canonical rendering (objects fill at most the frame; 3/4 of
    it keeps rendering cheap with little upsampling)."""
    return max(32, int(round(0.75 * self.image_size)))


PRESETS: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(name="tiny", train_instances=8, train_views=6, val_instances=3,
                            val_distractors=4, test_instances=6, db_views=6, distractors=12,
                            queries_per_instance=2, clutter_pool=6),
    "small": SyntheticConfig(name="small", train_instances=60, train_views=10, val_instances=10,
                             val_distractors=60, test_instances=30, db_views=10,
                             distractors=300, queries_per_instance=2),
    "medium": SyntheticConfig(name="medium", train_instances=300, train_views=10,
                              val_instances=30, val_distractors=300, test_instances=150,
                              db_views=10, distractors=2000, queries_per_instance=2,
                              clutter_pool=32),
    "large": SyntheticConfig(name="large", train_instances=3000, train_views=10,
                             val_instances=100, val_distractors=1000, test_instances=1500,
                             db_views=10, distractors=15000, queries_per_instance=2,
                             clutter_pool=64),
}


def resolve_config(preset: str | SyntheticConfig, image_size: int | None = None
                   ) -> SyntheticConfig:
  """The config of a preset name (a key of :data:`PRESETS`) or a config, with ``image_size``
  overridden when given."""
  if isinstance(preset, SyntheticConfig):
    cfg = preset
  elif isinstance(preset, str) and preset in PRESETS:
    cfg = PRESETS[preset]
  else:
    raise ValueError(f"preset must be one of {sorted(PRESETS)} or a SyntheticConfig; got "
                     f"{preset!r}.")
  if image_size is not None:
    cfg = dataclasses.replace(cfg, image_size=image_size)  # __post_init__ validates it
  return cfg


def _check_seed(seed: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
  return int(seed)


# --------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class ViewMetadata:
  """Per-photo visibility, struct of arrays over ``N`` photos (see :class:`scenes.SceneStats`).

  Attributes:
    instance_ids: int64 ``[N]``, the photographed instance (-1: distractor).
    visible_fraction, visible_area, object_scale: float32 ``[N]`` (0 for no object).
    yaw, pitch, roll: float32 ``[N]`` viewpoint angles in radians.
    illumination: float32 ``[N]`` illumination-change strength in [0, 1].
    boxes: float32 ``[N, 4]`` visible-object boxes ``(x0, y0, x1, y1)`` (NaN: none).
  """

  instance_ids: np.ndarray
  visible_fraction: np.ndarray
  visible_area: np.ndarray
  object_scale: np.ndarray
  yaw: np.ndarray
  pitch: np.ndarray
  roll: np.ndarray
  illumination: np.ndarray
  boxes: np.ndarray

  @classmethod
  def from_stats(cls, instance_ids: Sequence[int], stats: Sequence[scenes.SceneStats]
                 ) -> ViewMetadata:
    def col(name):
      return np.array([getattr(s, name) for s in stats], np.float32).reshape(len(stats))

    boxes = np.stack([s.box for s in stats]).astype(np.float32) if stats else np.zeros((0, 4),
                                                                                        np.float32)
    return cls(np.asarray(instance_ids, np.int64).reshape(len(stats)), col("visible_fraction"),
               col("visible_area"), col("object_scale"), col("yaw"), col("pitch"), col("roll"),
               col("illumination"), boxes)

  def __len__(self) -> int:
    return len(self.instance_ids)

  @property
  def viewing_angle(self) -> np.ndarray:
    """float32 ``[N]`` degrees between the optical axis and the facade's normal."""
    return camera.viewing_angle(self.yaw, self.pitch).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RetrievalMetadata:
  """Visibility of a retrieval set's database photos and queries."""

  database: ViewMetadata
  queries: ViewMetadata


def viewpoint_change(yaw_a, pitch_a, yaw_b, pitch_b) -> np.ndarray:
  """Degrees between the optical axes of views ``a`` and ``b`` (broadcasting arrays), in the
  landmark's frame; in-plane roll does not count."""
  ya, pa, yb, pb = np.broadcast_arrays(*(np.asarray(x, np.float64)
                                         for x in (yaw_a, pitch_a, yaw_b, pitch_b)))
  da, db = camera.view_direction(ya, pa), camera.view_direction(yb, pb)  # [3, ...]
  cos = np.clip((da * db).sum(axis=0), -1.0, 1.0)
  return np.degrees(np.arccos(cos))


def visibility_labels(visible_fraction, visible_area, object_scale, viewpoint, illumination
                      ) -> np.ndarray:
  """EASY (0), HARD (1) or JUNK (2) per photo of the query's instance (rule in the module
  docstring), for broadcasting arrays.

  Args:
    visible_fraction, visible_area, object_scale, illumination: the database photo's metadata.
    viewpoint: the viewpoint change from the query in degrees (:func:`viewpoint_change`).

  Returns:
    int64 labels of the broadcast shape.
  """
  vf = np.asarray(visible_fraction)
  junk = (vf < JUNK_MAX_VISIBLE) | (np.asarray(visible_area) < JUNK_MAX_AREA)
  easy = ((vf >= EASY_MIN_VISIBLE) & (np.asarray(object_scale) >= EASY_MIN_SCALE)
          & (np.asarray(viewpoint) <= EASY_MAX_VIEWPOINT)
          & (np.asarray(illumination) <= EASY_MAX_ILLUMINATION))
  return np.where(junk, JUNK, np.where(easy, EASY, HARD)).astype(np.int64)


def ground_truth(meta: RetrievalMetadata) -> list[dict[str, np.ndarray]]:
  """Revisited ground truth of every query: ``{"easy", "hard", "junk"}`` int64 database
  indices, ascending (photos of other instances and distractors are negatives)."""
  db, q = meta.database, meta.queries
  gnd = []
  for j in range(len(q)):
    same = np.nonzero(db.instance_ids == q.instance_ids[j])[0]
    view = viewpoint_change(q.yaw[j], q.pitch[j], db.yaw[same], db.pitch[same])
    labels = visibility_labels(db.visible_fraction[same], db.visible_area[same],
                               db.object_scale[same], view, db.illumination[same])
    gnd.append({"easy": same[labels == EASY], "hard": same[labels == HARD],
                "junk": same[labels == JUNK]})
  return gnd


# --------------------------------------------------------------------------- photos


class _Split:
  """The photos of one split of one benchmark, each a pure function of its index."""

  def __init__(self, cfg: SyntheticConfig, seed: int, split: str):
    self.cfg, self.seed, self.split = cfg, seed, split
    self.code = _SPLITS[split]
    self.offset = _ID_OFFSET[split]
    self.pool = tuple(
        scenes.cached_landmark((seed, _CLUTTER, self.code, k), cfg.landmark_size)
        for k in range(cfg.clutter_pool))
    if split == "train":
      self.instances, self.views, self.distractors = cfg.train_instances, cfg.train_views, 0
    elif split == "val":
      self.instances, self.views, self.distractors = (cfg.val_instances, cfg.db_views,
                                                      cfg.val_distractors)
    else:
      self.instances, self.views, self.distractors = (cfg.test_instances, cfg.db_views,
                                                      cfg.distractors)
    n_db = self.instances * self.views + self.distractors
    # The database is shuffled (as a crawled collection is), with its own stream.
    self.order = (np.arange(n_db) if split == "train"
                  else np.random.default_rng([seed, _ORDER, self.code]).permutation(n_db))

  def landmark(self, instance: int) -> scenes.Landmark:
    return scenes.cached_landmark((self.seed, _LANDMARK, self.code, instance),
                                  self.cfg.landmark_size, int(1.5 * self.cfg.image_size))

  def _photo(self, kind: int, index: tuple[int, ...], regime: str,
             landmark: scenes.Landmark | None, render: bool):
    key = [self.seed, self.code, kind, *index]
    return scenes.render_scene(
        np.random.default_rng([_GEOMETRY, *key]), np.random.default_rng([_PIXELS, *key]),
        scenes.REGIMES[regime], self.cfg.image_size, landmark, self.pool, self.cfg.max_clutter,
        render=render)

  def train_photo(self, n: int, render: bool = True):
    """Training photo ``n`` (instance-major): ``(image, stats, instance id)``."""
    instance, view = divmod(n, self.views)
    image, stats = self._photo(_TRAIN, (instance, view), "view", self.landmark(instance), render)
    return image, stats, self.offset + instance

  def database_photo(self, position: int, render: bool = True):
    """Database photo at ``position`` of the shuffled database: ``(image, stats, id)``."""
    n = int(self.order[position])
    if n < self.instances * self.views:
      instance, view = divmod(n, self.views)
      regime = "clear" if view == 0 else "view"
      image, stats = self._photo(_DB, (instance, view), regime, self.landmark(instance), render)
      return image, stats, self.offset + instance
    d = n - self.instances * self.views
    # Whether the distractor shows a landmark is part of its identity, so it is drawn from a
    # stream of its own.
    pick = np.random.default_rng([self.seed, _DISTRACTOR, self.code, d, 0]).random()
    landmark = None
    if pick < _DISTRACTOR_LANDMARK_P:
      landmark = scenes.make_landmark(np.random.default_rng([self.seed, _DISTRACTOR, self.code,
                                                             d, 1]), self.cfg.landmark_size)
    image, stats = self._photo(_DISTRACT_VIEW, (d,), "view", landmark, render)
    # A distractor's landmark is nobody's instance: its visibility is not ground truth.
    stats = scenes.SceneStats(0.0, 0.0, 0.0, stats.yaw, stats.pitch, stats.roll,
                              stats.illumination, np.full(4, np.nan, np.float32))
    return image, stats, -1

  def query_photo(self, j: int, render: bool = True):
    """Query ``j`` (instance-major): ``(image, stats, instance id)``."""
    instance, k = divmod(j, self.cfg.queries_per_instance)
    image, stats = self._photo(_QUERY, (instance, k), "query", self.landmark(instance), render)
    return image, stats, self.offset + instance

  @property
  def num_train(self) -> int:
    return self.instances * self.views

  @property
  def num_database(self) -> int:
    return len(self.order)

  @property
  def num_queries(self) -> int:
    return self.instances * self.cfg.queries_per_instance if self.split != "train" else 0


def iter_train(preset: str | SyntheticConfig = "tiny", *, seed: int = 0,
               image_size: int | None = None) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
  """Streams the training photos in order: ``(image, cluster_id, box)`` (see :func:`generate`);
  nothing is kept in memory, for large presets."""
  split = _Split(resolve_config(preset, image_size), _check_seed(seed), "train")
  for n in range(split.num_train):
    image, stats, instance = split.train_photo(n)
    yield image, instance, stats.box


def iter_database(preset: str | SyntheticConfig = "tiny", *, split: str = "test", seed: int = 0,
                  image_size: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
  """Streams a retrieval split's database photos in order: ``(image, instance id or -1)``."""
  part = _retrieval_split(preset, split, seed, image_size)
  for p in range(part.num_database):
    image, _, instance = part.database_photo(p)
    yield image, instance


def iter_queries(preset: str | SyntheticConfig = "tiny", *, split: str = "test", seed: int = 0,
                 image_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams a retrieval split's queries in order: ``(image, box)``."""
  part = _retrieval_split(preset, split, seed, image_size)
  for j in range(part.num_queries):
    image, stats, _ = part.query_photo(j)
    yield image, stats.box


def retrieval_metadata(preset: str | SyntheticConfig = "tiny", *, split: str = "test",
                       seed: int = 0, image_size: int | None = None) -> RetrievalMetadata:
  """A retrieval split's visibility metadata without painting any photo (a fraction of the cost
  of generating it); ``ground_truth`` of it is the split's ground truth."""
  part = _retrieval_split(preset, split, seed, image_size)
  db = [part.database_photo(p, render=False) for p in range(part.num_database)]
  qs = [part.query_photo(j, render=False) for j in range(part.num_queries)]
  return RetrievalMetadata(ViewMetadata.from_stats([d[2] for d in db], [d[1] for d in db]),
                           ViewMetadata.from_stats([q[2] for q in qs], [q[1] for q in qs]))


def _retrieval_split(preset, split: str, seed: int, image_size: int | None) -> _Split:
  if split not in ("val", "test"):
    raise ValueError(f"split must be 'val' or 'test'; got {split!r}.")
  return _Split(resolve_config(preset, image_size), _check_seed(seed), split)


# --------------------------------------------------------------------------- in memory


@dataclasses.dataclass(frozen=True)
class SyntheticBenchmark:
  """A generated benchmark, in memory.

  Attributes:
    config: the sizes it was generated with.
    seed: the seed.
    train: the training photos (``cluster_ids`` = instance ids, boxes of the visible object).
    val, test: retrieval sets (revisited ground truth, query boxes, ``database_ids``).
    train_meta: visibility of the training photos.
    val_meta, test_meta: visibility of the val/test database photos and queries.
    seconds: wall time the generation took.
  """

  config: SyntheticConfig
  seed: int
  train: InstanceSet
  val: RetrievalSet
  test: RetrievalSet
  train_meta: ViewMetadata
  val_meta: RetrievalMetadata
  test_meta: RetrievalMetadata
  seconds: float


def _retrieval_set(split: _Split, name: str) -> tuple[RetrievalSet, RetrievalMetadata]:
  db = [split.database_photo(p) for p in range(split.num_database)]
  qs = [split.query_photo(j) for j in range(split.num_queries)]
  meta = RetrievalMetadata(ViewMetadata.from_stats([d[2] for d in db], [d[1] for d in db]),
                           ViewMetadata.from_stats([q[2] for q in qs], [q[1] for q in qs]))
  boxes = meta.queries.boxes if len(qs) else np.zeros((0, 4), np.float32)
  retrieval = RetrievalSet(name=name, database=[d[0] for d in db], queries=[q[0] for q in qs],
                           gnd=ground_truth(meta), gnd_kind="revisited", query_boxes=boxes,
                           database_ids=meta.database.instance_ids)
  return retrieval, meta


def generate(preset: str | SyntheticConfig = "tiny", *, seed: int = 0,
             image_size: int | None = None) -> SyntheticBenchmark:
  """Generates a whole benchmark in memory (see the package docstring for sizes and times).

  Every photo is a pure function of ``(seed, split, role, index)``: the same arguments give
  bit-identical arrays, in any order or chunking (:func:`iter_train` and friends stream the
  same photos).

  Args:
    preset: a key of :data:`PRESETS` (``tiny``, ``small``, ``medium``, ``large``) or a config.
    seed: non-negative integer.
    image_size: long side of the photos; default the config's (256).

  Returns:
    A :class:`SyntheticBenchmark`.
  """
  cfg = resolve_config(preset, image_size)
  seed = _check_seed(seed)
  start = time.perf_counter()
  train_split = _Split(cfg, seed, "train")
  photos = [train_split.train_photo(n) for n in range(train_split.num_train)]
  train_meta = ViewMetadata.from_stats([p[2] for p in photos], [p[1] for p in photos])
  prefix = f"synthetic_landmarks/{cfg.name}"
  train = InstanceSet(name=f"{prefix}:train", images=[p[0] for p in photos],
                      cluster_ids=train_meta.instance_ids, boxes=train_meta.boxes)
  val, val_meta = _retrieval_set(_Split(cfg, seed, "val"), f"{prefix}:val")
  test, test_meta = _retrieval_set(_Split(cfg, seed, "test"), f"{prefix}:test")
  return SyntheticBenchmark(cfg, seed, train, val, test, train_meta, val_meta, test_meta,
                            time.perf_counter() - start)
