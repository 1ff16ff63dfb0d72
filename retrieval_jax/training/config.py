"""The training config: one ``ml_collections.ConfigDict`` with a section per concern.

>>> cfg = default_train_config()
>>> cfg.loss.name, cfg.loss.margin = "triplet", 0.1
>>> validate_config(cfg, num_devices=jax.device_count())   # ValueError naming the field

Sections (every field, with its default, is in :func:`default_train_config`):

- ``model``: the fields of :func:`retrieval_jax.retriever.default_config` (backbone, pooling,
  pretrained, ...); :meth:`Retriever.from_config` builds the model from it.
- ``data``: the training :class:`~retrieval_jax.data.datasets.InstanceSet` and the validation
  :class:`~retrieval_jax.data.datasets.RetrievalSet` (``source`` synthetic | folder | csv |
  tfds), the training image size ``image_size`` (long side; every image is padded into one
  square ``[S, S]`` bucket so the step compiles once), augmentation, and the m-per-class batch
  shape of batch losses.
- ``loss``: ``name`` (a key of :data:`LOSSES`) and its hyper-parameters.
- ``mining``: tuple sampling and hard-negative mining (cirtorch's ``qsize``, ``poolsize``,
  ``nnum``), the positive strategy and when to re-mine.
- ``optimizer``: the fields of :func:`retrieval_jax.training.default_optimizer_config`.
- ``train``: epochs, global batch size, seed, evaluation / checkpoint periods.
- ``eval``: the fields of :func:`retrieval_jax.evaluation.default_eval_config`, used for the
  periodic validation mAP.
- ``stages``: optional multi-stage training (DLRTN + RGMP): a list of partial configs run in
  order, each the top-level config updated with its fields (sections ``model`` (not its
  backbone), ``loss``, ``mining``, ``optimizer``, ``train``), each starting from the previous
  stage's final variables; :func:`stage_configs` expands them. Empty: one run of the config.

:func:`validate_config` checks everything that can be checked without data or a model and
raises ``ValueError`` naming the dotted field (``loss.margin must be >= 0; got -0.1``);
:func:`check_training_set` checks the loaded training set against the config (enough clusters
for the negatives or for the m-per-class batches).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from retrieval_jax.data.datasets import InstanceSet
from retrieval_jax.data.samplers import POSITIVE_STRATEGIES
from retrieval_jax.evaluation.runner import default_eval_config
from retrieval_jax.models import BACKBONES
from retrieval_jax.retriever import POOLINGS, check_multiscale, default_config
from retrieval_jax.training.optimizers import default_optimizer_config, make_optimizer

DATA_SOURCES = ("synthetic", "folder", "csv", "tfds")
NEGATIVES = ("hard", "semi_hard", "random")
REMAP_INITS = ("data", "none")  # train.remap_init


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """What the loop needs to know about a loss.

  Attributes:
    kind: ``"tuple"`` (query, positive, k mined negatives; :func:`training.make_tuple_step`) or
      ``"batch"`` (m-per-class labelled batches; :func:`training.make_batch_step`).
    hyper: the ``loss.*`` fields it reads, each with the check its value must pass:
      ``">=0"``, ``">0"`` or ``"bool"``.
  """

  kind: str
  hyper: Mapping[str, str]


#: The losses ``loss.name`` may name (implementations in :mod:`retrieval_jax.losses`; the loop
#: maps each name to its function in :func:`retrieval_jax.training.loop.make_loss_fn`).
LOSSES: dict[str, LossSpec] = {
    "contrastive": LossSpec("tuple", {"margin": ">=0"}),  # cirtorch tuples
    "triplet": LossSpec("tuple", {"margin": ">=0", "squared": "bool"}),  # REMAP / DLRTN Eq. 1
    "lrml": LossSpec("tuple", {"tau": ">0"}),  # LRML ranked contrastive
    "batch_hard": LossSpec("batch", {"margin": ">=0", "squared": "bool"}),
    "batch_all": LossSpec("batch", {"margin": ">=0", "squared": "bool"}),
    "nra": LossSpec("batch", {"alpha": ">0", "eps": ">0"}),  # DARAC
    # DLRTN Eq. 5: triplet (squared, Eq. 1) + lambda x softmax loss of a classifier on [q, d+].
    "dlrtn": LossSpec("tuple", {"margin": ">=0", "classification_weight": ">=0"}),
    "smooth_ap": LossSpec("batch", {"temperature": ">0"}),
}


def default_train_config() -> ml_collections.ConfigDict:
  """Every field :func:`retrieval_jax.training.train` reads, with its default."""
  optional_int = lambda: ml_collections.FieldReference(None, field_type=int)  # noqa: E731
  optional_str = lambda: ml_collections.FieldReference(None, field_type=str)  # noqa: E731
  return ml_collections.ConfigDict({
      "model": default_config(),
      "data": {
          "source": "synthetic",  # synthetic | folder | csv | tfds
          # synthetic: the benchmark preset and seed (train split + val retrieval split).
          "preset": "tiny",
          "seed": 0,
          "synthetic_image_size": optional_int(),  # photos' long side; None: the preset's (256)
          # folder / csv: paths of the training set and the validation set
          # (retrieval_jax.data.custom layouts); tfds: builder names (prepared in data_dir).
          "train": optional_str(),
          "val": optional_str(),
          "data_dir": optional_str(),  # tfds only
          "val_queries_per_instance": optional_int(),  # folder val set without queries/ dir
          # Training images: resized to this long side (sides rounded to the network stride, as
          # extraction does) and padded into one [S, S] bucket; a multiple of the stride.
          "image_size": 256,
          "augment": {
              "enabled": False,
              "crop_scale": (1.0, 1.0),  # random crop area fraction (1, 1: no crop)
              "crop_ratio": (3 / 4, 4 / 3),
              "flip_p": 0.5,
              "brightness": 0.0,
              "contrast": 0.0,
              "saturation": 0.0,
              "hue": 0.0,
          },
          # Batch losses: train.batch_size = classes_per_batch x samples_per_class.
          "classes_per_batch": optional_int(),
          "samples_per_class": optional_int(),
          "allow_repeats": False,  # m-per-class: allow classes smaller than samples_per_class
          "num_workers": 2,  # image loading threads
      },
      "loss": {
          "name": "contrastive",
          "margin": 0.7,  # contrastive (cirtorch 0.7 for GeM) / triplet (0.1) / batch_*
          "squared": True,  # triplet losses: squared Euclidean distances
          "tau": 1.25,  # lrml
          "alpha": 4.0,  # nra
          "eps": 1e-4,  # nra
          "temperature": 0.01,  # smooth_ap
          "classification_weight": 1.5,  # dlrtn: lambda (Eq. 5)
      },
      "mining": {
          # hard: the nearest (mined with the current model) | semi_hard: the nearest farther
          # than the tuple's positive (FaceNet) | random (no model)
          "negatives": "hard",
          "num_negatives": 5,  # cirtorch nnum; per tuple, distinct clusters
          "query_size": optional_int(),  # tuples per epoch (cirtorch qsize); None: all queries
          "pool_size": optional_int(),  # candidate negatives per epoch; None: whole train set
          "positive": "random",  # random | hardest | closest
          "refresh_every_epochs": ml_collections.FieldReference(1, field_type=int),
          "refresh_every_tuples": optional_int(),  # REMAP: 3000 (set epochs to None)
          "active_only": False,  # keep only tuples whose first triplet violates the margin
          "describe_batch_size": 16,  # images per descriptor batch when mining
      },
      "optimizer": default_optimizer_config(),
      "train": {
          "epochs": 3,
          "batch_size": 4,  # global: tuples (tuple losses) or images (batch losses) per step
          "seed": 0,
          "eval_every_epochs": 1,  # 0: only at the start and the end
          "eval_at_start": True,  # the "before" validation mAP
          "checkpoint_every_steps": 100,  # also at every epoch end
          "keep_checkpoints": 3,  # latest N; the best by validation mAP is kept besides
          "log_every_steps": 1,
          "progress": True,  # tqdm progress bar
          "debug_nan_at_step": optional_int(),  # test hook: the loss becomes NaN at this step
          # A saved Retriever (e.g. `retrieval-jax convert` of torchvision ImageNet weights)
          # whose backbone variables start training (backbones without a pretrained package:
          # VGG16, ResNet-101, ...). Same model.backbone required. None: model.pretrained.
          "init_backbone": optional_str(),
          # REMAP heads (model.pooling = "remap"), fresh runs only: "data" sets the KL region
          # weights (KLW) and the FC (PCA + whitening) from region descriptors of labelled
          # training pairs computed with the initial network before the first step (REMAP
          # Sec. III-B/C; training.loop docstring); "none" keeps 1 and the random FC.
          "remap_init": "none",
          # Matching pairs drawn for it (as many non-matching ones besides); None:
          # mining.query_size (None: every available pair). Host memory grows with it: every
          # described image keeps its [R, C_l] region vectors per layer.
          "remap_init_pairs": optional_int(),
      },
      "eval": _default_eval(),
      # [{section: {field: value}}, ...]: training stages (module docstring); [] for one run.
      "stages": [],
  })


def _default_eval() -> ml_collections.ConfigDict:
  cfg = default_eval_config()
  cfg.max_size = 256  # validation photos at a training-like size; set it to data.image_size
  cfg.num_workers = 2
  return cfg


# --------------------------------------------------------------------------- validation


def quick_synthetic(cfg: ml_collections.ConfigDict, **train: Any) -> ml_collections.ConfigDict:
  """Turns a paper config into its ``quick`` variant, in place: ImageNet EfficientNet-Lite0 on
  the synthetic ``small`` preset at 128 px, single-scale, a few epochs of 120 mined tuples from a
  pool of 300 photos, validated at the training size (the demo's measured recipe: validating
  ImageNet-tuned weights at 256 px after training at 128 px hides the gain); minutes on a CPU.
  The paper's loss, mining rule and optimizer are kept (a paper's learning rate is tuned for
  days of training, so the variants raise it); ``train`` overrides fields of the ``train``
  section (``epochs``, ``batch_size``, ...). Returns ``cfg``.
  """
  cfg.model.backbone = "efficientnet_lite0"
  cfg.model.pretrained = True
  cfg.model.scales = cfg.eval.scales = (1.0,)
  cfg.train.init_backbone = None
  cfg.data.source = "synthetic"
  cfg.data.preset = "small"
  cfg.data.train = cfg.data.val = cfg.data.data_dir = None
  cfg.data.image_size = 128
  cfg.mining.query_size = 120
  cfg.mining.pool_size = 300
  cfg.eval.max_size = cfg.data.image_size
  cfg.train.update({"epochs": 3, "batch_size": 4, "checkpoint_every_steps": 50, **train})
  return cfg


def select_variant(cfg: ml_collections.ConfigDict, variant: str,
                   variants: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Applies ``variants[variant]`` (a function of the config) for ``get_config(variant)``; the
  empty variant is the config as written. Raises naming the known variants."""
  if variant:
    if variant not in variants:
      raise ValueError(f"unknown variant {variant!r}; known: {sorted(variants)}.")
    variants[variant](cfg)
  return cfg


def _fail(field: str, message: str) -> None:
  raise ValueError(f"{field} {message}")


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _int(cfg: ml_collections.ConfigDict, field: str, minimum: int, *,
         optional: bool = False) -> int | None:
  value = _get(cfg, field)
  if value is None and optional:
    return None
  if not _is_int(value) or value < minimum:
    _fail(field, f"must be an integer >= {minimum}{' or None' if optional else ''}; got "
                 f"{value!r}.")
  return int(value)


def _real(cfg: ml_collections.ConfigDict, field: str, check: str) -> float:
  value = _get(cfg, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    _fail(field, f"must be a finite number; got {value!r}.")
  if (check == ">=0" and value < 0) or (check == ">0" and value <= 0):
    _fail(field, f"must be {check[:-1]} {check[-1]}; got {value!r}.")
  return float(value)


def _choice(cfg: ml_collections.ConfigDict, field: str, choices: tuple) -> Any:
  value = _get(cfg, field)
  if value not in choices:
    _fail(field, f"must be one of {list(choices)}; got {value!r}.")
  return value


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
  node = cfg
  for part in field.split("."):
    node = node[part]
  return node


def _check_keys(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                prefix: str = "") -> None:
  """Unknown fields (typos in a config file or an override) fail, naming the field."""
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      known = sorted(reference.keys())
      raise ValueError(f"{name} is not a config field; {prefix.rstrip('.') or 'the config'} "
                       f"has {known}.")
    if isinstance(reference[key], ml_collections.ConfigDict) and key != "optimizer":
      if not isinstance(cfg[key], (ml_collections.ConfigDict, Mapping)):
        raise ValueError(f"{name} must be a section with fields {sorted(reference[key].keys())};"
                         f" got {cfg[key]!r}.")
      _check_keys(cfg[key], reference[key], f"{name}.")


#: The sections a stage may override; the data and the evaluation stay those of the run.
STAGE_SECTIONS = ("model", "loss", "mining", "optimizer", "train")
#: Fields a stage may not change: every stage continues the previous stage's backbone.
STAGE_FIXED = ("model.backbone", "model.pretrained")


def update_config(node: ml_collections.ConfigDict, values: Mapping[str, Any],
                  prefix: str = "") -> None:
  """Sets the fields of ``node`` named in the nested mapping ``values``, recursively.

  Lists become tuples, except ``param_groups`` and ``stages`` (lists of mappings).

  Raises:
    ValueError: an unknown field or a value of the wrong type, named ``prefix`` + dotted path.
  """
  for key, value in values.items():
    name = f"{prefix}{key}"
    if key not in node:
      raise ValueError(f"{name} is not a config field; {prefix.rstrip('.') or 'the config'} "
                       f"has {sorted(node.keys())}.")
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, Mapping) and \
        key != "param_groups":
      update_config(node[key], value, f"{name}.")
    else:
      keep_list = key in ("param_groups", "stages")
      try:
        node[key] = tuple(value) if isinstance(value, list) and not keep_list else value
      except TypeError as err:
        raise ValueError(f"{name}: {value!r} does not fit the field's type ({err}).") from None


def stage_configs(cfg: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The configs of ``cfg.stages``: stage ``i`` is ``cfg`` (without ``stages``) updated with
  ``cfg.stages[i]``; ``[cfg]`` when there are no stages.

  Raises:
    ValueError: a stage that is not a mapping, names a section outside :data:`STAGE_SECTIONS`
      or a field of :data:`STAGE_FIXED`, or an unknown field / a value of the wrong type, named
      ``stages[i].<field>``.
  """
  stages = cfg.stages
  if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, (list, tuple)):
    _fail("stages", f"must be a list of partial configs (mappings); got {stages!r}.")
  base = {k: v for k, v in cfg.to_dict().items() if k != "stages"}
  if not stages:
    single = default_train_config()  # the fields' types, as resolve_config keeps them
    update_config(single, base)
    return [single]
  out = []
  for i, overrides in enumerate(stages):
    name = f"stages[{i}]"
    if isinstance(overrides, ml_collections.ConfigDict):
      overrides = overrides.to_dict()
    if not isinstance(overrides, Mapping):
      _fail(name, f"must be a mapping of config sections; got {overrides!r}.")
    for section, fields in overrides.items():
      if section not in STAGE_SECTIONS:
        _fail(f"{name}.{section}", f"cannot be set per stage; a stage may set "
                                   f"{list(STAGE_SECTIONS)} (every stage trains on the same "
                                   f"data and is evaluated alike).")
      if not isinstance(fields, Mapping):
        _fail(f"{name}.{section}", f"must be a mapping of fields; got {fields!r}.")
      for fixed in STAGE_FIXED:
        top, _, field = fixed.partition(".")
        if section == top and field in fields:
          _fail(f"{name}.{fixed}", f"cannot be set per stage: every stage continues the "
                                   f"previous stage's weights; set {fixed} at the top level.")
    stage = default_train_config()
    update_config(stage, base)
    update_config(stage, overrides, f"{name}.")
    out.append(stage)
  return out


def loss_kind(cfg: ml_collections.ConfigDict) -> str:
  """``"tuple"`` or ``"batch"``: which step and which sampler ``cfg.loss.name`` uses."""
  return LOSSES[cfg.loss.name].kind


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Checks a training config before anything heavy runs.

  Args:
    cfg: a config built from :func:`default_train_config` (every field present; unknown
      fields are refused).
    num_devices: devices the global batch is split over (``jax.device_count()``).

  Raises:
    ValueError: the first invalid field, named by its dotted path, with the value and the rule
      (e.g. ``train.batch_size 6 is not divisible by the 4 devices``).
  """
  _check_keys(cfg, default_train_config())
  stages = stage_configs(cfg)  # checks the stages' structure and fields
  if cfg.stages:
    # The top level first: an error there is the top-level field's, not a stage's.
    _validate_one(_without_stages(cfg), num_devices)
    for i, stage in enumerate(stages):
      try:
        _validate_one(stage, num_devices)
      except ValueError as err:
        raise ValueError(f"stages[{i}].{err}") from None
    return
  _validate_one(cfg, num_devices)


def _without_stages(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  out = default_train_config()
  update_config(out, {k: v for k, v in cfg.to_dict().items() if k != "stages"})
  return out


def _validate_one(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """:func:`validate_config` of one stage (a config without ``stages``)."""
  # Model.
  backbone = str(cfg.model.backbone).replace("-", "_")
  if backbone not in BACKBONES:
    _fail("model.backbone", f"{cfg.model.backbone!r} is unknown; known: {sorted(BACKBONES)}.")
  _choice(cfg, "model.pooling", POOLINGS)
  for scales in (cfg.model.scales, cfg.eval.scales):  # eval.scales are combined the same way
    try:
      check_multiscale(cfg.model.multiscale, cfg.model.multiscale_weights, scales)
    except ValueError as e:
      raise ValueError(f"model.{e}") from None
  # Data.
  source = _choice(cfg, "data.source", DATA_SOURCES)
  if source == "synthetic":
    from retrieval_jax.data.synthetic import PRESETS  # noqa: PLC0415 (light, but only here)
    _choice(cfg, "data.preset", tuple(PRESETS))
    _int(cfg, "data.seed", 0)
    _int(cfg, "data.synthetic_image_size", 32, optional=True)
  else:
    for field in ("data.train", "data.val"):
      if not _get(cfg, field):
        _fail(field, f"must name the {'training' if field.endswith('train') else 'validation'} "
                     f"set for data.source={source!r}; got {_get(cfg, field)!r}.")
    if source == "tfds" and not cfg.data.data_dir:
      _fail("data.data_dir", "must be the TFDS data directory for data.source='tfds'.")
  _int(cfg, "data.image_size", 32)
  _int(cfg, "data.num_workers", 0)
  augment = cfg.data.augment
  for field in ("crop_scale", "crop_ratio"):
    pair = tuple(augment[field])
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in pair) or \
        pair[0] > pair[1]:
      _fail(f"data.augment.{field}", f"must be (low, high) with 0 < low <= high; got {pair!r}.")
  if tuple(augment.crop_scale)[1] > 1:
    _fail("data.augment.crop_scale", f"must lie in (0, 1]; got {tuple(augment.crop_scale)!r}.")
  if not 0 <= augment.flip_p <= 1:
    _fail("data.augment.flip_p", f"must be a probability in [0, 1]; got {augment.flip_p!r}.")
  for field in ("brightness", "contrast", "saturation", "hue"):
    _real(cfg, f"data.augment.{field}", ">=0")
  # Loss.
  name = cfg.loss.name
  if name not in LOSSES:
    _fail("loss.name", f"{name!r} is unknown; known losses: {sorted(LOSSES)}.")
  spec = LOSSES[name]
  for field, check in spec.hyper.items():
    if check == "bool":
      if not isinstance(cfg.loss[field], bool):
        _fail(f"loss.{field}", f"must be True or False; got {cfg.loss[field]!r}.")
    else:
      _real(cfg, f"loss.{field}", check)
  # Train.
  _int(cfg, "train.epochs", 1)
  batch = _int(cfg, "train.batch_size", 1)
  if batch % num_devices:
    _fail("train.batch_size", f"{batch} is not divisible by the {num_devices} devices (the "
                              f"global batch is split evenly over them).")
  _int(cfg, "train.seed", 0)
  _int(cfg, "train.eval_every_epochs", 0)
  _int(cfg, "train.checkpoint_every_steps", 1)
  _int(cfg, "train.keep_checkpoints", 1)
  _int(cfg, "train.log_every_steps", 1)
  _int(cfg, "train.debug_nan_at_step", 1, optional=True)
  if _choice(cfg, "train.remap_init", REMAP_INITS) == "data" and cfg.model.pooling != "remap":
    _fail("train.remap_init", f"'data' initialises a REMAP head, but model.pooling is "
                              f"{cfg.model.pooling!r}; use 'none' (or model.pooling='remap').")
  _int(cfg, "train.remap_init_pairs", 1, optional=True)
  # Sampling.
  if spec.kind == "batch":
    k = _int(cfg, "data.classes_per_batch", 1, optional=True)
    n = _int(cfg, "data.samples_per_class", 1, optional=True)
    if k is None or n is None or k * n != batch:
      _fail("data.classes_per_batch x data.samples_per_class",
            f"({k} x {n}) != train.batch_size {batch}; {name} trains on m-per-class batches of "
            f"classes_per_batch classes with samples_per_class images each.")
    if k < 2:
      _fail("data.classes_per_batch", f"must be >= 2 ({name} needs negatives); got {k}.")
    if n < 2:
      _fail("data.samples_per_class", f"must be >= 2 ({name} needs positives); got {n}.")
  else:
    _choice(cfg, "mining.negatives", NEGATIVES)
    _int(cfg, "mining.num_negatives", 1)
    _int(cfg, "mining.query_size", 1, optional=True)
    _int(cfg, "mining.pool_size", 1, optional=True)
    _choice(cfg, "mining.positive", POSITIVE_STRATEGIES)
    _int(cfg, "mining.describe_batch_size", 1)
    epochs = _int(cfg, "mining.refresh_every_epochs", 1, optional=True)
    tuples = _int(cfg, "mining.refresh_every_tuples", 1, optional=True)
    if (epochs is None) == (tuples is None):
      _fail("mining.refresh_every_epochs / mining.refresh_every_tuples",
            f"exactly one must be set; got {epochs!r} and {tuples!r}.")
    if cfg.mining.positive != "random" and cfg.mining.negatives == "random":
      _fail("mining.positive", f"{cfg.mining.positive!r} needs descriptors, which "
                               "mining.negatives='random' never computes; use 'random'.")
    if not isinstance(cfg.mining.active_only, bool):
      _fail("mining.active_only", f"must be True or False; got {cfg.mining.active_only!r}.")
    if cfg.mining.active_only and (name not in ("triplet", "dlrtn") or epochs is None or
                                   cfg.mining.negatives == "random"):
      _fail("mining.active_only", "needs loss.name='triplet' or 'dlrtn', "
                                  "mining.negatives='hard' or 'semi_hard' and "
                                  "mining.refresh_every_epochs (DLRTN keeps the mined triplets "
                                  "that violate the triplet margin).")
  # Optimizer: its own validation, with the section's name in front.
  try:
    make_optimizer(cfg.optimizer, 1)
  except ValueError as err:
    raise ValueError(f"optimizer.{err}") from None


def check_training_set(cfg: ml_collections.ConfigDict, train_set: InstanceSet,
                       pool_size: int | None = None) -> None:
  """Checks that ``train_set`` can feed the configured sampler, before training starts.

  Raises:
    ValueError: too few clusters for ``mining.num_negatives`` (tuple losses: the query's own
      cluster plus one per negative), no cluster with two images (no positive), or too few
      classes with ``data.samples_per_class`` images for the m-per-class batches.
  """
  ids = np.asarray(train_set.cluster_ids)
  clusters, counts = np.unique(ids, return_counts=True)
  if loss_kind(cfg) == "batch":
    k, n = cfg.data.classes_per_batch, cfg.data.samples_per_class
    minimum = min(n, 2) if cfg.data.allow_repeats else n
    eligible = int((counts >= minimum).sum())
    if eligible < k:
      raise ValueError(
          f"data: the training set {train_set.name!r} has {eligible} classes with >= {minimum} "
          f"images, fewer than data.classes_per_batch={k}; lower data.classes_per_batch or "
          f"data.samples_per_class (or set data.allow_repeats).")
    return
  if train_set.positive_pairs is None and not (counts >= 2).any():
    raise ValueError(f"data: the training set {train_set.name!r} has no cluster with two "
                     f"images, so no (query, positive) pair exists.")
  k = cfg.mining.num_negatives
  if clusters.size < k + 1:
    raise ValueError(
        f"data: the training set {train_set.name!r} has {clusters.size} clusters, but "
        f"mining.num_negatives={k} needs {k + 1} (the query's own and {k} others, one negative "
        f"per cluster); lower mining.num_negatives or use a larger set.")
  if pool_size is not None and pool_size < k + 1:
    raise ValueError(f"mining.pool_size={pool_size} cannot hold {k} negatives of distinct "
                     f"clusters other than the query's; raise it to at least {k + 1} (more for "
                     f"hard negatives).")
