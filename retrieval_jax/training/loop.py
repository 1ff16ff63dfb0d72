"""The train loop: epochs of mined tuples (or m-per-class batches), validation, checkpoints.

>>> summary = train(cfg, "runs/demo")          # cfg from training.default_train_config()
>>> Retriever.load("runs/demo/retriever")      # the trained model

Per epoch ``e``:

1. **Sampling.** Tuple losses: when mining is due (``mining.refresh_every_epochs``; always at
   the first epoch), the epoch's (query, positive) pairs and negative pool are drawn from
   ``(seed, e)`` (:mod:`retrieval_jax.data.samplers`), the current model describes them
   (un-augmented, batches split over the devices) and :func:`retrieval_jax.mining.mine_negatives`
   picks each query's nearest pool images of distinct other clusters (``mining.negatives =
   "semi_hard"``: the nearest farther than the tuple's positive); ``"random"`` draws random
   negatives instead (no model). Epochs where mining is not due reuse
   the last mined tuples. With ``mining.refresh_every_tuples`` the remaining tuples of the epoch
   are re-mined whenever that many tuples were trained on since the last mining (REMAP).
   Batch losses: :func:`retrieval_jax.data.samplers.m_per_class_batches` of ``(seed, e)``.
2. **Steps** over the tuples in an order drawn from ``(seed, e)``, ``train.batch_size`` per step
   (the last batch padded), with a tqdm bar (loss, tuples/s) and one JSON line per logged step in
   ``metrics.jsonl`` (plus TensorBoard scalars in ``tb/`` when ``tensorboardX`` is installed).
3. **Validation** mAP (:func:`retrieval_jax.evaluation.evaluate` on the validation
   ``RetrievalSet``; the medium protocol of revisited sets) every ``train.eval_every_epochs``,
   at the last epoch and before training (the "before" number).

Checkpoints (orbax ``CheckpointManager``, ``workdir/checkpoints/<global step>``, written to a
temporary directory and renamed when complete) hold the :class:`~retrieval_jax.training.
TrainState`, the epoch's tuples as mined and the loop position (epoch, steps done in it, tuples
since the last mining, the validation history). The latest ``train.keep_checkpoints`` are kept,
and the best by validation mAP besides.

**Resume.** ``train(cfg, workdir)`` on a workdir with checkpoints continues from the latest.
Every random choice is a pure function of ``(seed, epoch[, step, slot])`` and the mined tuples
are restored rather than re-mined, so an interrupted and an uninterrupted run take the same
steps on the same batches and end with equal parameters (``tests/test_train_loop.py`` kills a
run with SIGKILL and compares).

**DLRTN** (``loss.name = "dlrtn"``). The state holds a third sub-network next to ``backbone``
and ``head``: ``classifier`` (:class:`~retrieval_jax.models.DLRTNClassifier`, one class per
training cluster). The step embeds each tuple, the classifier maps its (query, positive)
descriptors to logits, and :func:`dlrtn_per_tuple` adds ``classification_weight`` x their
softmax loss (label: the query's cluster) to the triplet loss of the mined negatives. Param
paths ``classifier/params/...`` take part in ``optimizer.param_groups``; validation and the saved
``retriever/`` use only backbone and head.

**Stages** (``cfg.stages``, :func:`~retrieval_jax.training.config.stage_configs`). Stage ``i``
runs in ``workdir/stage_<i>`` as a run of its own (checkpoints, logs, resume) and ends by saving
its full variables in ``stage_<i>/variables``; stage ``i + 1`` starts from them: the backbone
as it was, the head rebuilt from the stage's ``model`` keeping every parameter of the same path
and shape (R-MAC -> R-GAC adds a fresh ``xi``), the classifier likewise, and a fresh optimizer.
A stage with ``summary.json`` and ``variables`` is complete and skipped on resume.

**REMAP initialisation** (``model.pooling = "remap"``, ``train.remap_init = "data"``). Before
the first step of a fresh run (never on resume: the checkpoints hold the initialised head) the
initial network describes the images of labelled training pairs
(:meth:`_Trainer.remap_init_pairs`: ``train.remap_init_pairs`` matching pairs of
``(seed, epoch 0)`` and as many non-matching ones) with
:func:`~retrieval_jax.models.remap_region_descriptors`, and
:func:`~retrieval_jax.models.remap_init_from_data` sets the KL region weights from their
per-region distances and the FC from the PCA-whitening of the described images' ``p`` (REMAP
§III-B/C); training, and the "before" validation, start from that head. The weights and the
pairs are saved in ``workdir/remap_init.npz`` (:func:`retrieval_jax.kl_weighting.load_weights`).
A stage continuing a previous stage's REMAP head keeps it.

**Divergence.** A non-finite loss or gradient norm stops training with
:class:`TrainingDivergedError` naming the step; that state is never saved, so the latest
checkpoint is the last good one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from retrieval_jax import losses
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.samplers import (epoch_rng, m_per_class_batches, random_negatives,
                                         random_tuples, sample_pairs, sample_pool)
from retrieval_jax.evaluation.runner import evaluate
from retrieval_jax.kl_weighting import save_weights
from retrieval_jax.mining import RefreshSchedule, active_triplets, mine_negatives
from retrieval_jax.retriever import Retriever
from retrieval_jax.training.batches import ImageBatcher, prefetch
from retrieval_jax.models.dlrtn_classifier import DLRTNClassifier
from retrieval_jax.models.remap import remap_init_from_data, remap_region_descriptors
from retrieval_jax.models.variables_io import load_variables, save_variables
from retrieval_jax.training.config import (LOSSES, check_training_set, default_train_config,
                                           loss_kind, stage_configs, update_config,
                                           validate_config)
from retrieval_jax.training.optimizers import make_optimizer, make_schedule, trainable_mask
from retrieval_jax.training.state import TrainState, create_train_state
from retrieval_jax.training.steps import (data_mesh, make_batch_step, make_tuple_step, replicate,
                                          shard_batch, sum_and_count)

log = logging.getLogger(__name__)

StepHook = Callable[[dict[str, Any]], None]


class TrainingDivergedError(RuntimeError):
  """A non-finite loss or gradient norm; the message names the step and the last checkpoint."""


# ------------------------------------------------------------------------------ config, data


def resolve_config(cfg: ml_collections.ConfigDict | dict | None) -> ml_collections.ConfigDict:
  """:func:`default_train_config` updated with ``cfg`` (recursively); unknown fields fail."""
  full = default_train_config()
  given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg or {})
  update_config(full, given)
  return full


def load_datasets(data: ml_collections.ConfigDict) -> tuple[InstanceSet, RetrievalSet]:
  """The training set and the validation set the ``data`` section names."""
  if data.source == "synthetic":
    from retrieval_jax.data.synthetic import generate  # noqa: PLC0415 (only when used)
    bench = generate(data.preset, seed=data.seed, image_size=data.synthetic_image_size)
    return bench.train, bench.val
  if data.source in ("folder", "csv"):
    from retrieval_jax.data import custom  # noqa: PLC0415
    for field in ("train", "val"):
      if not pathlib.Path(data[field]).exists():
        raise ValueError(f"data.{field}: {data[field]} does not exist.")
    if data.source == "folder":
      return (custom.folder_instance_set(data.train).dataset,
              custom.folder_retrieval_set(
                  data.val, queries_per_instance=data.val_queries_per_instance).dataset)
    return custom.csv_instance_set(data.train).dataset, custom.csv_retrieval_set(data.val).dataset
  # TFDS: importing the builders registers them; names may carry a config ("name/config").
  import tensorflow_datasets as tfds  # noqa: PLC0415

  from retrieval_jax.data import builders  # noqa: PLC0415

  name, _, config = data.train.partition("/")
  builder = tfds.builder(name, data_dir=data.data_dir, config=config or None)
  builder.download_and_prepare()
  val_name, _, val_config = data.val.partition("/")
  return (builders.tfds_instance_set(builder, "train"),
          builders.load_retrieval_set(val_name, data_dir=data.data_dir,
                                      config=val_config or None))


def make_loss_fn(cfg: ml_collections.ConfigDict) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``cfg.loss`` as the steps' loss contract (``-> (local sum, count)``).

  Tuple losses (``make_tuple_step``): ``loss_fn(tuples [t, 2 + k, D], valid [t], **extras)``,
  the per-tuple losses summed and counted (:func:`training.sum_and_count`), so the step's loss
  is the mean over the global batch's valid tuples. Batch losses (``make_batch_step``, gathered):
  ``loss_fn(embeddings [B, D], labels [B], valid [B], **extras)`` sees the whole global batch
  and returns ``(mean, 1)``. The extra ``loss_scale`` (only present when
  ``train.debug_nan_at_step`` is set) multiplies the loss: NaN at that step, 1 elsewhere.
  """
  name, c = cfg.loss.name, cfg.loss
  if name == "dlrtn":
    def dlrtn_tuple_loss(tuples, valid, labels, loss_scale=None):
      values = dlrtn_per_tuple(tuples["descriptors"], tuples["logits"][:, 0], labels,
                               margin=c.margin, classification_weight=c.classification_weight)
      if loss_scale is not None:
        values = values * loss_scale
      return sum_and_count(values, valid)

    return dlrtn_tuple_loss
  if LOSSES[name].kind == "tuple":
    per_tuple = {
        "contrastive": lambda t, v: losses.tuple_contrastive_loss(t, margin=c.margin, valid=v,
                                                                  reduction="none"),
        "triplet": lambda t, v: losses.tuple_triplet_loss(t, margin=c.margin, squared=c.squared,
                                                          valid=v, reduction="none"),
        "lrml": lambda t, v: losses.lrml_loss(t, tau=c.tau, valid=v, reduction="none"),
    }[name]

    def tuple_loss(tuples, valid, loss_scale=None):
      values = per_tuple(tuples, valid)
      if loss_scale is not None:
        values = values * loss_scale
      return sum_and_count(values, valid)

    return tuple_loss

  per_batch = {
      "batch_hard": lambda e, y, v: losses.batch_hard_triplet_loss(
          e, y, margin=c.margin, squared=c.squared, valid=v),
      "batch_all": lambda e, y, v: losses.batch_all_triplet_loss(
          e, y, margin=c.margin, squared=c.squared, valid=v),
      "nra": lambda e, y, v: losses.nra_loss(e, y, alpha=c.alpha, eps=c.eps, valid=v),
      "smooth_ap": lambda e, y, v: losses.smooth_ap_loss(e, y, temperature=c.temperature,
                                                         valid=v),
  }[name]

  def batch_loss(embeddings, labels, valid, loss_scale=None):
    value = per_batch(embeddings, labels, valid)
    if loss_scale is not None:
      value = value * jnp.mean(loss_scale)
    return value, jnp.ones((), jnp.int32)

  return batch_loss


def dlrtn_per_tuple(descriptors: jax.Array, logits: jax.Array, labels: jax.Array, *,
                    margin: float, classification_weight: float) -> jax.Array:
  """DLRTN's joint loss (Min et al. Eq. 5) per tuple, ``[T]`` (the loop takes the mean).

  With one negative per tuple this is :func:`retrieval_jax.losses.dlrtn_loss` (``"none"``):
  ``0.5 max(0, m + ||q - p||^2 - ||q - n||^2) + lambda * CE(logits, label)``; with ``k``
  negatives the triplet term is summed over them (:func:`losses.tuple_triplet_loss`) and the
  classification term counted once.

  Args:
    descriptors: float ``[T, 2 + k, D]`` (query, positive, negatives).
    logits: float ``[T, C]``: the classifier on the pair ``[q, p]`` of each tuple.
    labels: int ``[T]``: the query's class (training cluster index).
    margin, classification_weight: ``m`` (paper 0.75) and ``lambda`` (paper 1.5).
  """
  if descriptors.shape[1] == 3:
    return losses.dlrtn_loss(descriptors[:, 0], descriptors[:, 1], descriptors[:, 2], logits,
                             labels, margin=margin, classification_weight=classification_weight,
                             reduction="none")
  ranking = losses.tuple_triplet_loss(descriptors, margin=margin, squared=True, reduction="none")
  return ranking + classification_weight * losses.softmax_cross_entropy(logits, labels,
                                                                        reduction="none")


def headline_map(metrics: dict[str, Any]) -> float:
  """The validation number checkpoints are ranked by: medium mAP of revisited protocols, the
  plain mAP otherwise."""
  if "medium" in metrics:
    return float(metrics["medium"]["mAP"])
  return float(metrics["mAP"])


# ------------------------------------------------------------------------------ logging


class MetricsLog:
  """``metrics.jsonl`` (one flushed JSON object per record) and, when ``tensorboardX`` is
  installed, TensorBoard event files in ``tb/``.

  On resume, records after the restored step are dropped from the JSONL file (they belong to
  the lost part of the interrupted run and are about to be redone), and TensorBoard is told to
  purge them (``purge_step``).
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.path = workdir / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(f"{line}\n" for line in kept))
      os.replace(tmp, self.path)
    elif self.path.exists():
      self.path.unlink()
    self._file = self.path.open("a")
    self.tensorboard = None
    try:
      import tensorboardX  # noqa: PLC0415 (optional: metrics.jsonl is always written)
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard event files (metrics.jsonl "
                  "has every number); pip install tensorboardX to get them.")
    else:
      self.tensorboard = tensorboardX.SummaryWriter(
          str(workdir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

  def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
    record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **values}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self.tensorboard is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          # TensorBoard tags allow no "@" (mP@k).
          self.tensorboard.add_scalar(f"{kind}/{key}".replace("@", "_at_"), value, int(step))
      self.tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


# ------------------------------------------------------------------------------ the trainer


def _progress(total: int, initial: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm  # noqa: PLC0415
  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
              unit="step")


CLASSIFIER = "classifier"  # DLRTN's classification sub-network, next to backbone and head


def _carry_over(fresh: Any, previous: Any) -> Any:
  """``fresh`` with every leaf that ``previous`` has at the same path, shape and dtype taken from
  ``previous`` (a rebuilt head keeps the parameters the old one shares with it)."""
  if previous is None:
    return fresh
  old = {jax.tree_util.keystr(path): leaf
         for path, leaf in jax.tree_util.tree_flatten_with_path(previous)[0]}

  def pick(path, leaf):
    prev = old.get(jax.tree_util.keystr(path))
    if prev is not None and np.shape(prev) == np.shape(leaf) and \
        np.asarray(prev).dtype == np.asarray(leaf).dtype:
      return prev
    return leaf

  return jax.tree_util.tree_map_with_path(pick, fresh)


def retriever_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """The ``backbone`` and ``head`` variables of a training state's variables (without the
  training-only sub-networks, e.g. DLRTN's classifier)."""
  return {k: v for k, v in variables.items() if k != CLASSIFIER}


def load_backbone(directory: str | os.PathLike, backbone: str) -> dict[str, Any]:
  """The backbone variables of a saved Retriever (``train.init_backbone``).

  Raises:
    ValueError: a missing directory, or a Retriever of another backbone, naming
      ``train.init_backbone``.
  """
  path = pathlib.Path(directory)
  if not (path / "config.json").is_file():
    raise ValueError(f"train.init_backbone: {path} is not a saved Retriever (no config.json); "
                     f"make one with `retrieval-jax convert ... --backbone {backbone}`.")
  saved = Retriever.load(path)
  if saved.config.backbone.replace("-", "_") != backbone.replace("-", "_"):
    raise ValueError(f"train.init_backbone: {path} holds a {saved.config.backbone!r} backbone; "
                     f"model.backbone is {backbone!r}.")
  return saved.variables["backbone"]


class _Trainer:
  """One training run's objects; :func:`train` drives it.

  ``init_variables`` (a previous stage's final variables): the backbone continues from them,
  the head is rebuilt from ``cfg.model`` keeping the parameters the previous head shares with
  it (same path and shape; a new R-GAC head gets a fresh ``xi``), and so is DLRTN's classifier.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: pathlib.Path,
               init_variables: dict[str, Any] | None = None,
               datasets: tuple[InstanceSet, RetrievalSet] | None = None):
    self.cfg = cfg
    self.workdir = workdir
    self.kind = loss_kind(cfg)
    self.seed = cfg.train.seed
    self.batch_size = cfg.train.batch_size
    self.train_set, self.val_set = datasets or load_datasets(cfg.data)
    check_training_set(cfg, self.train_set, cfg.mining.pool_size)
    self.ids = np.asarray(self.train_set.cluster_ids)
    if init_variables is None and cfg.train.init_backbone:
      init_variables = {"backbone": load_backbone(cfg.train.init_backbone, cfg.model.backbone)}
    if init_variables is None:
      from retrieval_jax.models import PRETRAINED  # noqa: PLC0415
      if cfg.model.pretrained and cfg.model.backbone.replace("_", "-") not in PRETRAINED:
        log.warning("model.backbone %r has no pretrained package: it starts from random "
                    "weights; convert ImageNet weights (retrieval-jax convert) and set "
                    "train.init_backbone.", cfg.model.backbone)
      self.retriever = Retriever.from_config(cfg.model)
    else:
      fresh = Retriever.from_backbone_variables(cfg.model, init_variables["backbone"])
      fresh.variables["head"] = _carry_over(fresh.variables["head"], init_variables.get("head"))
      self.retriever = fresh
    variables = dict(self.retriever.variables)
    embed_fn = self.retriever.embed
    if cfg.loss.name == "dlrtn":
      # DLRTN: class = training cluster, numbered 0..C-1; the classifier sees the (query,
      # positive) descriptors of each tuple.
      clusters, self.class_ids = np.unique(self.ids, return_inverse=True)
      self.classifier = DLRTNClassifier(num_classes=len(clusters))
      dims = jax.eval_shape(self.retriever.embed, variables,
                            jnp.zeros((1, cfg.data.image_size, cfg.data.image_size, 3),
                                      jnp.uint8),
                            jnp.ones((1, cfg.data.image_size, cfg.data.image_size), bool))
      probe = jnp.zeros((1, dims.shape[-1]), jnp.float32)
      classifier_vars = jax.jit(self.classifier.init)(jax.random.PRNGKey(self.seed + 2), probe,
                                                      probe)
      variables[CLASSIFIER] = _carry_over(
          dict(classifier_vars), (init_variables or {}).get(CLASSIFIER))
      embed_fn = self._dlrtn_embed
    self.batcher = ImageBatcher(self.train_set.images, image_size=cfg.data.image_size,
                                stride=self.retriever.stride, augment=cfg.data.augment,
                                seed=self.seed, num_workers=cfg.data.num_workers)
    self.mesh = data_mesh()
    self.devices = self.mesh.devices.size
    self.schedule = RefreshSchedule(cfg.mining.refresh_every_epochs,
                                    cfg.mining.refresh_every_tuples)
    self.steps_per_epoch = self._count_steps()
    tx = make_optimizer(cfg.optimizer, self.steps_per_epoch)
    self.tx = tx
    self.initial_state = create_train_state(variables, tx, rng=self.seed)
    # A head carried over from a previous stage's REMAP head was trained: never re-estimated.
    carried = (init_variables or {}).get("head", {}).get("params", {})
    self.remap_init_due = (cfg.model.pooling == "remap" and cfg.train.remap_init == "data"
                           and not any(k.startswith("klw_") for k in carried))
    frozen = any(g.get("frozen") for g in cfg.optimizer.param_groups)
    options = dict(learning_rate_fn=make_schedule(cfg.optimizer, self.steps_per_epoch),
                   trainable=trainable_mask(cfg.optimizer, self.initial_state.params)
                   if frozen else None)
    factory = make_tuple_step if self.kind == "tuple" else make_batch_step
    self.step_fn = factory(embed_fn, make_loss_fn(cfg), tx, self.mesh, **options)
    self.describe_fn = jax.jit(self.retriever.embed)
    # One Retriever for validation, its variables swapped per evaluation, so its extraction
    # programs compile once.
    self.eval_retriever = Retriever(self.retriever.config, self.retriever.variables)
    self.eval_cfg = ml_collections.ConfigDict(cfg.eval.to_dict())
    self.eval_cfg.output_dir = None  # descriptors change every evaluation: nothing to reuse
    self.eval_cfg.cache_dir = None
    self.eval_cfg.reuse_descriptors = False

  def _dlrtn_embed(self, variables: dict[str, Any], pixels: jax.Array, mask: jax.Array
                   ) -> dict[str, jax.Array]:
    """The tuple step's outputs for DLRTN: ``descriptors [t * n, D]`` and the classifier's
    ``logits`` of each tuple's (query, positive) pair, repeated on the tuple's ``n`` rows
    (``[t * n, C]``) so the step reshapes them with the descriptors."""
    descriptors = self.retriever.embed(variables, pixels, mask)
    n = 2 + self.cfg.mining.num_negatives
    tuples = descriptors.reshape((-1, n) + descriptors.shape[1:])
    logits = self.classifier.apply(variables[CLASSIFIER], tuples[:, 0], tuples[:, 1])
    return {"descriptors": descriptors, "logits": jnp.repeat(logits, n, axis=0)}

  # ---------------------------------------------------------------------------- sampling

  def _count_steps(self) -> int:
    if self.kind == "batch":
      d = self.cfg.data
      batches = m_per_class_batches(self.ids, d.classes_per_batch, d.samples_per_class,
                                    allow_repeats=d.allow_repeats, seed=self.seed, epoch=0)
      return len(batches)
    pairs = sample_pairs(self.ids, positive_pairs=self.train_set.positive_pairs,
                         num_pairs=self.cfg.mining.query_size, seed=self.seed, epoch=0)
    return -(-len(pairs) // self.batch_size)

  def _over_images(self, fn: Callable[..., Any], state: TrainState, indices: np.ndarray) -> Any:
    """``fn(variables, pixels, mask)`` (jitted) over training images (un-augmented, in the
    order of ``indices``) with the state's variables, batches split over the devices; each
    output leaf as float32 numpy, the batches' rows concatenated."""
    variables = replicate(state.variables, self.mesh)
    per_batch = self.devices * -(-self.cfg.mining.describe_batch_size // self.devices)
    parts = []
    for pixels, mask, n in self.batcher.plain_batches(np.asarray(indices), per_batch):
      x = shard_batch({"pixels": pixels, "mask": mask}, self.mesh)
      parts.append(jax.tree_util.tree_map(lambda a, n=n: np.asarray(a, np.float32)[:n],
                                          fn(variables, x["pixels"], x["mask"])))
    return jax.tree_util.tree_map(lambda *rows: np.concatenate(rows), *parts)

  def describe(self, state: TrainState, indices: np.ndarray) -> np.ndarray:
    """float32 ``[len(indices), D]`` descriptors of training images with the state's model."""
    return self._over_images(self.describe_fn, state, indices)

  def _descriptor_table(self, state: TrainState, needed: np.ndarray) -> np.ndarray:
    """``[N, D]`` descriptors with rows for ``needed`` and NaN elsewhere (never chosen)."""
    needed = np.unique(needed)
    described = self.describe(state, needed)
    table = np.full((len(self.ids), described.shape[1]), np.nan, np.float32)
    table[needed] = described
    return table

  def mine(self, state: TrainState, epoch: int) -> np.ndarray:
    """The epoch's rows: int64 ``[T, 2 + k]`` tuples or ``[steps, k * n]`` class batches."""
    cfg, ids = self.cfg, self.ids
    if self.kind == "batch":
      d = cfg.data
      return m_per_class_batches(ids, d.classes_per_batch, d.samples_per_class,
                                 allow_repeats=d.allow_repeats, seed=self.seed, epoch=epoch)
    m, pairs_given = cfg.mining, self.train_set.positive_pairs
    if m.negatives == "random":
      return random_tuples(ids, m.query_size, m.num_negatives, positive_pairs=pairs_given,
                           seed=self.seed, epoch=epoch).as_array()
    # The queries do not depend on the positive strategy (same stream), so a random draw
    # tells which images the model must describe.
    pairs = sample_pairs(ids, positive_pairs=pairs_given, num_pairs=m.query_size,
                         seed=self.seed, epoch=epoch)
    pool = sample_pool(len(ids), m.pool_size, seed=self.seed, epoch=epoch)
    needed = [pairs.reshape(-1), pool]
    if m.positive != "random":
      needed.append(np.flatnonzero(np.isin(ids, ids[pairs[:, 0]])))
    table = self._descriptor_table(state, np.concatenate(needed))
    if m.positive != "random":
      pairs = sample_pairs(ids, positive_pairs=pairs_given, num_pairs=m.query_size,
                           seed=self.seed, epoch=epoch, positive=m.positive, descriptors=table)
    rows = self._with_negatives(pairs, pool, table)
    if m.active_only:
      q, p, n = (table[rows[:, j]] for j in range(3))
      squared = cfg.loss.squared if cfg.loss.name == "triplet" else True  # DLRTN: Eq. 1
      active = active_triplets(q, p, n, margin=cfg.loss.margin, squared=squared)
      if active.any():
        # Keep the epoch's length (and the schedule's epochs) by cycling the active tuples.
        kept = rows[active]
        rows = kept[np.arange(len(rows)) % len(kept)]
      else:
        log.warning("epoch %d: no mined tuple violates the margin; training on all.", epoch)
    return rows

  def _with_negatives(self, pairs: np.ndarray, pool: np.ndarray, table: np.ndarray
                      ) -> np.ndarray:
    far = None
    if self.cfg.mining.negatives == "semi_hard":  # farther than the tuple's positive
      far = np.linalg.norm(table[pairs[:, 0]].astype(np.float64) - table[pairs[:, 1]], axis=1)
    positions, _ = mine_negatives(table[pairs[:, 0]], table[pool], self.ids[pairs[:, 0]],
                                  self.ids[pool], self.cfg.mining.num_negatives,
                                  farther_than=far)
    return np.concatenate([pairs, pool[positions]], axis=1).astype(np.int64)

  def remine_rest(self, state: TrainState, rows: np.ndarray, order: np.ndarray, start: int,
                  epoch: int) -> np.ndarray:
    """``rows`` with fresh negatives for the tuples not yet trained on (``order[start:]``),
    mined with the current model against the epoch's pool (``refresh_every_tuples``)."""
    rest = order[start:]
    pool = sample_pool(len(self.ids), self.cfg.mining.pool_size, seed=self.seed, epoch=epoch)
    needed = [rows[rest, 0], pool]
    if self.cfg.mining.negatives == "semi_hard":  # the positives' distances bound the negatives
      needed.append(rows[rest, 1])
    table = self._descriptor_table(state, np.concatenate(needed))
    rows = rows.copy()
    rows[rest] = self._with_negatives(rows[rest, :2], pool, table)
    return rows

  def order(self, rows: np.ndarray, epoch: int) -> np.ndarray:
    return epoch_rng(self.seed, epoch, "order").permutation(len(rows))

  def batch(self, rows: np.ndarray, order: np.ndarray, epoch: int, step: int,
            nan: bool) -> dict[str, np.ndarray]:
    if self.kind == "batch":
      indices = rows[order[step]]
      out = self.batcher.image_batch(indices, self.ids[indices], self.batch_size, epoch=epoch,
                                     step=step)
    else:
      chosen = rows[order[step * self.batch_size:(step + 1) * self.batch_size]]
      out = self.batcher.tuple_batch(chosen, self.batch_size, epoch=epoch, step=step)
      if self.cfg.loss.name == "dlrtn":
        labels = np.zeros(self.batch_size, np.int32)  # padding rows: any class, masked out
        labels[:len(chosen)] = self.class_ids[chosen[:, 0]]
        out["labels"] = labels
    if self.cfg.train.debug_nan_at_step is not None:
      out["loss_scale"] = np.full(self.batch_size, np.nan if nan else 1.0, np.float32)
    return out

  # ---------------------------------------------------------------------------- REMAP init

  def remap_init_pairs(self) -> tuple[np.ndarray, np.ndarray]:
    """The labelled pairs REMAP's initialisation estimates from: int64 ``[2N, 2]`` image
    indices and bool ``[2N]`` (True: matching).

    Rows ``0..N-1`` are the matching pairs :func:`sample_pairs` draws at ``(seed, epoch 0)``
    (``N = train.remap_init_pairs``, default ``mining.query_size``); rows ``N..2N-1`` pair each
    of their queries with a random image of another cluster (:func:`random_negatives`, same
    seed and epoch). Pure functions of the seed, so a re-run estimates from the same pairs.
    """
    n = self.cfg.train.remap_init_pairs or self.cfg.mining.query_size
    pairs = sample_pairs(self.ids, positive_pairs=self.train_set.positive_pairs, num_pairs=n,
                         seed=self.seed, epoch=0)
    negatives = random_negatives(self.ids[pairs[:, 0]], self.ids, 1, seed=self.seed, epoch=0)
    rows = np.concatenate([pairs, np.stack([pairs[:, 0], negatives[:, 0]], 1)])
    return rows.astype(np.int64), np.arange(len(rows)) < len(pairs)

  def region_descriptors(self, state: TrainState, indices: np.ndarray) -> list[np.ndarray]:
    """REMAP's ``r_l = L2(zeta(o_l))`` of training images (un-augmented, in the order of
    ``indices``) with the state's backbone: one float32 ``[len(indices), R, C_l]`` per tap."""
    retriever, head = self.retriever, self.retriever.head

    def regions(variables, pixels, mask):
      maps, masks = retriever.feature_maps(variables, pixels, mask)
      return [remap_region_descriptors(maps[t], head.levels, head.include_full_map, m)
              for t, m in zip(retriever.taps, masks)]

    return self._over_images(jax.jit(regions), state, indices)

  def init_remap_from_data(self) -> dict[str, Any]:
    """Replaces :attr:`initial_state` by one whose REMAP head has KLW and FC estimated from
    data (:func:`~retrieval_jax.models.remap_init_from_data`; REMAP §III-B/C) and returns what
    it did (``pairs``, ``images``, the new ``klw_<l>``).

    The initial network (frozen: nothing here is trained) describes every image of
    :meth:`remap_init_pairs` once; the KL weights come from the pairs' region distances and the
    PCA-whitening of the FC from ``p`` of each described image (each once). The optimizer
    state is rebuilt for the new parameters.
    """
    rows, same = self.remap_init_pairs()
    images = np.unique(rows)
    described = self.region_descriptors(self.initial_state, images)
    first, second = (np.searchsorted(images, rows[:, j]) for j in (0, 1))
    variables = dict(jax.device_get(self.initial_state.variables))
    components = np.shape(variables["head"]["params"]["fc"]["kernel"])[1]
    if components >= len(images):
      # M centred rows span at most M - 1 directions; learn_pca_whitening scales the others
      # by its jitter (~1e5), so they carry whatever new images have there, and gradients
      # through them are huge (a synthetic run's descriptors collapsed within one epoch).
      log.warning("REMAP init: the FC keeps %d PCA-whitening components but the %d described "
                  "images span at most %d: the rest get a jitter scale and training from them "
                  "can collapse; raise train.remap_init_pairs or set model.whiten_dims <= %d.",
                  components, len(images), len(images) - 1, len(images) - 1)
    head = remap_init_from_data(variables["head"], [d[first] for d in described],
                                [d[second] for d in described], same,
                                pca_region_descriptors=described,
                                stream_l2n=self.retriever.head.stream_l2n)
    variables["head"] = head
    self.initial_state = create_train_state(variables, self.tx, rng=self.seed)
    klw = {k: np.asarray(v) for k, v in head["params"].items() if k.startswith("klw_")}
    return {"pairs": rows, "same": same, "images": len(images), "klw": klw}

  # ---------------------------------------------------------------------------- evaluation

  def validate(self, state: TrainState) -> dict[str, Any]:
    self.eval_retriever.variables = retriever_variables(jax.device_get(state.variables))
    return evaluate(self.eval_retriever, self.val_set, self.eval_cfg)["metrics"]


def _batches(trainer: _Trainer, rows: np.ndarray, order: np.ndarray, epoch: int, first: int,
             global_step: int):
  """The epoch's batches from step ``first`` on (``global_step`` steps done before it), each
  built in a thread while the previous step runs."""
  nan_at = trainer.cfg.train.debug_nan_at_step

  def build(i: int) -> dict[str, np.ndarray]:
    return trainer.batch(rows, order, epoch, i, global_step + 1 + i - first == nan_at)

  return prefetch(build, range(first, trainer.steps_per_epoch))


# ------------------------------------------------------------------------------ checkpoints


def _checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  # Synchronous saves: when save() returns the checkpoint is complete on disk (orbax writes a
  # temporary directory and renames it), so a crash right after loses nothing that was saved.
  policy = AnyPreservationPolicy([
      LatestN(n=keep),
      BestN(get_metric_fn=lambda metrics: metrics["val_map"], reverse=False, n=1,
            keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def _host(tree: Any) -> Any:
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _save(manager: ocp.CheckpointManager, step: int, state: TrainState, rows: np.ndarray,
          position: dict[str, Any], val_map: float | None) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_host(state)),
      rows=ocp.args.StandardSave({"rows": np.asarray(rows)}),
      position=ocp.args.JsonSave(position)),
      metrics=None if val_map is None else {"val_map": val_map})


def _restore(manager: ocp.CheckpointManager, step: int, like: TrainState
             ) -> tuple[TrainState, np.ndarray, dict[str, Any]]:
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_host(like)), rows=ocp.args.StandardRestore(),
      position=ocp.args.JsonRestore()))
  state = jax.tree_util.tree_map(np.asarray, restored["state"])
  return state, np.asarray(restored["rows"]["rows"], np.int64), dict(restored["position"])


def _replace_retriever(retriever: Retriever, target: pathlib.Path) -> None:
  """Saves ``retriever`` at ``target``, replacing a previous one only once the new is
  complete (``Retriever.save`` is atomic but refuses an existing directory)."""
  if not target.exists():
    retriever.save(target)
    return
  fresh = target.with_name(f".{target.name}.new")
  shutil.rmtree(fresh, ignore_errors=True)
  retriever.save(fresh)
  old = target.with_name(f".{target.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  os.replace(target, old)
  os.replace(fresh, target)
  shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ train


def train(cfg: ml_collections.ConfigDict | dict, workdir: str | os.PathLike, *,
          resume: bool = True, on_step: StepHook | None = None) -> dict[str, Any]:
  """Trains the configured model; see the module docstring.

  Args:
    cfg: a training config (fields of :func:`~retrieval_jax.training.default_train_config`;
      missing ones take defaults).
    workdir: where checkpoints, ``metrics.jsonl``, ``tb/``, ``config.json``, ``summary.json``
      and the final ``retriever/`` go (and ``remap_init.npz`` with ``train.remap_init =
      "data"``). With ``cfg.stages``, stage ``i`` writes its own
      checkpoints, logs, summary and retriever under ``workdir/stage_<i>`` (plus its final
      variables, DLRTN's classifier included, in ``stage_<i>/variables`` for the next stage);
      ``workdir`` gets ``config.json``, the combined ``summary.json`` and the last stage's
      ``retriever/``.
    resume: continue from the latest checkpoint in ``workdir`` if there is one (staged: skip
      the finished stages and continue the first unfinished one from its checkpoints); False
      refuses a workdir that already holds checkpoints.
    on_step: called after every step (after its checkpoint, if any) with ``{"step", "epoch",
      "step_in_epoch", "loss"}`` (and ``"stage"`` in staged runs; steps count per stage).

  Returns:
    The summary (also ``workdir/summary.json``): ``steps``, ``epochs``, ``steps_per_epoch``,
    ``before_val_map``, ``final_val_map``, ``best_val_map``, ``best_step``, ``final_loss``,
    ``checkpoints`` (kept steps), ``resumed_from``, ``retriever`` (its directory),
    ``time_s``. Staged runs: ``stages`` (each stage's summary), ``steps`` / ``epochs`` summed,
    ``best_step`` counted over all stages' steps with ``best_stage``, the rest from the first
    (``before_val_map``) or the last stage.

  Raises:
    ValueError: an invalid config (naming the field, ``stages[i].<field>`` for a stage) or a
      dataset the sampler cannot use, before any training step.
    TrainingDivergedError: a non-finite loss or gradient norm.
  """
  start_time = time.perf_counter()
  cfg = resolve_config(cfg)
  validate_config(cfg, num_devices=jax.device_count())
  workdir = pathlib.Path(workdir).absolute()
  if not cfg.stages:
    return _train_stage(cfg, workdir, resume=resume, on_step=on_step)[0]
  configs = stage_configs(cfg)
  dirs = [workdir / f"stage_{i}" for i in range(len(configs))]
  if not resume:
    for d in dirs:
      if (d / "checkpoints").exists() and any(p.name.isdigit()
                                             for p in (d / "checkpoints").iterdir()):
        raise ValueError(f"{workdir} already holds checkpoints ({d.name}); resume, or choose a "
                         f"new workdir.")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  datasets = None  # loaded once, shared by the stages that run
  summaries: list[dict[str, Any]] = []
  for i, (stage_cfg, stage_dir) in enumerate(zip(configs, dirs)):
    summary_file = stage_dir / "summary.json"
    if resume and summary_file.exists() and (stage_dir / "variables").exists():
      log.info("stage %d is complete (%s); skipping it", i, stage_dir)
      summaries.append(json.loads(summary_file.read_text()))
      continue
    init = None if i == 0 else load_variables(dirs[i - 1] / "variables")
    if datasets is None:
      datasets = load_datasets(cfg.data)
    hook = None if on_step is None else (lambda info, i=i: on_step({**info, "stage": i}))
    log.info("stage %d of %d: loss %s, pooling %s", i + 1, len(configs), stage_cfg.loss.name,
             stage_cfg.model.pooling)
    summary, variables = _train_stage(stage_cfg, stage_dir, resume=resume, on_step=hook,
                                      init_variables=init, datasets=datasets)
    tmp = stage_dir / ".variables.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_variables(tmp, variables)
    shutil.rmtree(stage_dir / "variables", ignore_errors=True)
    os.replace(tmp, stage_dir / "variables")
    # The stage is complete once its summary is rewritten after the variables.
    summary_file.write_text(json.dumps(summary, indent=2))
    summaries.append(summary)
  _replace_retriever(Retriever.load(dirs[-1] / "retriever"), workdir / "retriever")
  offsets = np.cumsum([0] + [s["steps"] for s in summaries])
  best = max(range(len(summaries)), key=lambda j: -math.inf if summaries[j]["best_val_map"]
             is None else summaries[j]["best_val_map"])
  last = summaries[-1]
  combined = {
      "steps": int(offsets[-1]), "epochs": sum(s["epochs"] for s in summaries),
      "steps_per_epoch": last["steps_per_epoch"],
      "before_val_map": summaries[0]["before_val_map"],
      "final_val_map": last["final_val_map"], "best_val_map": summaries[best]["best_val_map"],
      "best_step": None if summaries[best]["best_step"] is None
      else int(offsets[best] + summaries[best]["best_step"]),
      "best_stage": best, "final_loss": last["final_loss"], "checkpoints": last["checkpoints"],
      "resumed_from": next((f"stage_{j}/{s['resumed_from']}" for j, s in enumerate(summaries)
                            if s["resumed_from"] is not None), None),
      "retriever": str(workdir / "retriever"),
      "time_s": round(time.perf_counter() - start_time, 2), "stages": summaries}
  (workdir / "summary.json").write_text(json.dumps(combined, indent=2))
  return combined


def _train_stage(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, resume: bool,
                 on_step: StepHook | None,
                 init_variables: dict[str, Any] | None = None,
                 datasets: tuple[InstanceSet, RetrievalSet] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """One run of a validated single-stage config: ``(summary, final variables)`` (the
  variables with every sub-network the state trains, e.g. DLRTN's classifier)."""
  start_time = time.perf_counter()
  manager_dir = workdir / "checkpoints"
  if manager_dir.exists() and any(p.name.isdigit() for p in manager_dir.iterdir()) and \
      not resume:
    raise ValueError(f"{workdir} already holds checkpoints; resume, or choose a new workdir.")
  trainer = _Trainer(cfg, workdir, init_variables=init_variables, datasets=datasets)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  manager = _checkpoint_manager(manager_dir, cfg.train.keep_checkpoints)
  spe, epochs, t = trainer.steps_per_epoch, cfg.train.epochs, cfg.train

  latest = manager.latest_step()
  remap_init = None
  if latest is None and trainer.remap_init_due:  # a resumed run restores the initialised head
    t0 = time.perf_counter()
    remap_init = trainer.init_remap_from_data()
    remap_init["time_s"] = time.perf_counter() - t0
    save_weights(workdir / "remap_init.npz", {**remap_init["klw"], "pairs": remap_init["pairs"],
                                               "same": remap_init["same"]})
  state: TrainState = trainer.initial_state
  rows: np.ndarray | None = None
  position = {"epoch": 0, "step_in_epoch": 0, "tuples_since_refresh": None,
              "before_val_map": None, "best_val_map": None, "best_step": None,
              "last_val_map": None, "last_loss": None}
  if latest is not None:
    state, rows, position = _restore(manager, latest, trainer.initial_state)
    log.info("resuming from step %d (epoch %d, step %d of %d)", latest, position["epoch"],
             position["step_in_epoch"], spe)
  # Placed as the step returns it, so the second step reuses the first step's program instead of
  # compiling another one for a differently placed state (~20 s on a CPU).
  state = replicate(state, trainer.mesh)
  metrics_log = MetricsLog(workdir, latest)
  if latest is None:
    metrics_log.write("config", 0, {"steps_per_epoch": spe, "devices": trainer.devices,
                                    "train_images": len(trainer.train_set),
                                    "loss": cfg.loss.name})
  if remap_init is not None:
    metrics_log.write("remap_init", 0, {"pairs": len(remap_init["pairs"]),
                                        "images": remap_init["images"],
                                        "time_s": remap_init["time_s"]})
  global_step = 0 if latest is None else latest
  last_loss = position.get("last_loss")

  def evaluate_now(step: int) -> float:
    metrics = trainer.validate(state)
    value = headline_map(metrics)
    flat = {"val_map": value}
    for name, scores in metrics.items():
      if isinstance(scores, dict):
        flat.update({f"{name}_{k}": float(v) for k, v in scores.items()
                     if isinstance(v, (int, float))})
    metrics_log.write("eval", step, flat)
    position["last_val_map"] = value
    if position["best_val_map"] is None or value > position["best_val_map"]:
      position["best_val_map"], position["best_step"] = value, step
    return value

  try:
    if latest is None and t.eval_at_start:
      position["before_val_map"] = evaluate_now(0)
    epoch = position["epoch"]
    if position["step_in_epoch"] >= spe:  # the checkpoint closed its epoch
      epoch += 1
      position.update(epoch=epoch, step_in_epoch=0)
    for epoch in range(epoch, epochs):
      first = position["step_in_epoch"]
      tsr = position["tuples_since_refresh"]
      if first == 0:
        # A new epoch: mine (always for REMAP-style tuple counts, which draw new pairs per
        # epoch; for epoch periods when due) or reuse the last mined tuples.
        if rows is None or trainer.kind == "batch" or cfg.mining.refresh_every_tuples or \
            trainer.schedule.due(epoch, tsr):
          t0 = time.perf_counter()
          rows = trainer.mine(state, epoch)
          tsr = 0
          metrics_log.write("mining", global_step, {"epoch": epoch, "rows": len(rows),
                                                    "time_s": time.perf_counter() - t0})
      order = trainer.order(rows, epoch)
      bar = _progress(spe, first, f"epoch {epoch + 1}/{epochs}", t.progress)
      batches = _batches(trainer, rows, order, epoch, first, global_step)
      for i in range(first, spe):
        if cfg.mining.refresh_every_tuples and i > first and trainer.kind == "tuple" and \
            trainer.schedule.due(epoch, tsr):
          rows = trainer.remine_rest(state, rows, order, i * trainer.batch_size, epoch)
          tsr = 0
          metrics_log.write("mining", global_step, {"epoch": epoch, "from_step": i})
          # The prefetched batches were built from the old negatives: rebuild from here.
          batches.close()
          batches = _batches(trainer, rows, order, epoch, i, global_step)
        t0 = time.perf_counter()
        batch = next(batches)
        state, metrics = trainer.step_fn(state, batch)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        global_step += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
          metrics_log.write("error", global_step, {"loss": loss, "grad_norm": grad_norm})
          kept = manager.latest_step()
          raise TrainingDivergedError(
              f"non-finite training values at step {global_step} (epoch {epoch + 1}, step "
              f"{i + 1} of {spe}): loss={loss}, grad_norm={grad_norm}. Stopped without saving "
              f"this state; the last good checkpoint is "
              + (f"step {kept} in {manager_dir}." if kept is not None else
                 "none (no checkpoint was written yet).")
              + " Lower optimizer.learning_rate or set optimizer.grad_clip_norm.")
        seconds = time.perf_counter() - t0
        valid = int(metrics["valid"])
        tsr = (tsr or 0) + valid
        last_loss = loss
        position.update(epoch=epoch, step_in_epoch=i + 1, tuples_since_refresh=tsr,
                        last_loss=loss)
        if global_step % t.log_every_steps == 0 or i + 1 == spe:
          metrics_log.write("train", global_step, {
              "epoch": epoch, "loss": loss, "grad_norm": grad_norm,
              "update_norm": float(metrics["update_norm"]),
              "param_norm": float(metrics["param_norm"]),
              "learning_rate": float(metrics["learning_rate"]), "valid": valid,
              "items_per_s": valid / max(seconds, 1e-9)})
        bar.set_postfix(loss=f"{loss:.4f}", tuples_s=f"{valid / max(seconds, 1e-9):.1f}")
        bar.update(1)
        val_map = None
        if i + 1 == spe:
          bar.close()
          every = t.eval_every_epochs
          if epoch + 1 == epochs or (every and (epoch + 1) % every == 0):
            val_map = evaluate_now(global_step)
        if i + 1 == spe or global_step % t.checkpoint_every_steps == 0:
          _save(manager, global_step, state, rows, position, val_map)
        if on_step is not None:
          on_step({"step": global_step, "epoch": epoch, "step_in_epoch": i + 1, "loss": loss})
      batches.close()
      position.update(step_in_epoch=0)
    manager.wait_until_finished()
    final_variables = jax.device_get(state.variables)
    retriever = Retriever(trainer.retriever.config, retriever_variables(final_variables))
    _replace_retriever(retriever, workdir / "retriever")
  finally:
    metrics_log.close()
    trainer.batcher.close()
    manager.close()

  summary = {
      "steps": global_step, "epochs": epochs, "steps_per_epoch": spe,
      "before_val_map": position["before_val_map"], "final_val_map": position["last_val_map"],
      "best_val_map": position["best_val_map"], "best_step": position["best_step"],
      "final_loss": last_loss, "checkpoints": sorted(manager.all_steps()),
      "resumed_from": latest, "retriever": str(workdir / "retriever"),
      "time_s": round(time.perf_counter() - start_time, 2)}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary, final_variables
