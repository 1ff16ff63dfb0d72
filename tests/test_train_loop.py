"""The train loop: config errors naming fields, an end-to-end run, SIGKILL + resume giving the
uninterrupted run's parameters, and NaN detection keeping the last good checkpoint.

One tiny config (untrained tiny ResNet, synthetic ``tiny`` at 64 px, 2 epochs of 3 steps of 4
tuples on the 4 forced CPU devices) serves every run; it lives in a config file so the
subprocesses (the killed run, the resumed CLI run) read exactly what the in-process run reads.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from retrieval_jax import Retriever
from retrieval_jax.data.datasets import InstanceSet
from retrieval_jax.data.images import resize_to
from retrieval_jax.data.samplers import random_negatives, sample_pairs, sample_pool
from retrieval_jax.kl_weighting import estimate_region_weights
from retrieval_jax.models import remap_region_descriptors, whitening_params
from retrieval_jax.models.common import preprocess
from retrieval_jax.training.batches import training_size
from retrieval_jax.config_files import apply_override, load_config_file
from retrieval_jax.commands.train import main as train_main
from retrieval_jax.training.config import (check_training_set, default_train_config,
                                           validate_config)
from retrieval_jax.training.loop import TrainingDivergedError, _Trainer, resolve_config, train
from retrieval_jax.whitening import learn_pca_whitening

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # 2 epochs x 3 steps (12 tuples / batch 4)
KILL_AT = 5  # after the mid-epoch checkpoint at step 4 (epoch 2, step 1 of 3)

TINY_CONFIG = textwrap.dedent("""
    from retrieval_jax.training.config import default_train_config

    def get_config():
      cfg = default_train_config()
      cfg.model.backbone = "tiny_resnet"
      cfg.model.pretrained = False
      cfg.data.preset = "tiny"
      cfg.data.synthetic_image_size = 64
      cfg.data.image_size = 64
      cfg.data.num_workers = 1
      cfg.eval.max_size = 64
      cfg.eval.num_workers = 1
      cfg.loss.name = "contrastive"
      cfg.mining.num_negatives = 2
      cfg.mining.query_size = 12
      cfg.mining.pool_size = 24
      cfg.optimizer.learning_rate = 1e-3
      cfg.train.epochs = 2
      cfg.train.batch_size = 4
      cfg.train.checkpoint_every_steps = 2
      cfg.train.keep_checkpoints = 3
      cfg.train.progress = False
      return cfg
    """)

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from retrieval_jax.config_files import load_config_file
    from retrieval_jax.training.loop import train

    def hook(info):
      if info["step"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a crash

    train(load_config_file(sys.argv[1]), sys.argv[2], on_step=hook)
    """)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("configs") / "tiny.py"
  path.write_text(TINY_CONFIG)
  return path


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory):
  """The reference run, in this process: ``(workdir, summary)``."""
  workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
  return workdir, train(load_config_file(str(config_file)), workdir)


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _leaves(workdir: pathlib.Path) -> list[np.ndarray]:
  return jax.tree_util.tree_leaves(Retriever.load(workdir / "retriever").variables)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------ config errors


def _config(**fields) -> object:
  cfg = default_train_config()
  for field, value in fields.items():
    apply_override(cfg, field.replace("__", "."), repr(value))
  return cfg


@pytest.mark.parametrize("fields, message", [
    ({"loss__name": "arcface"},
     r"loss\.name 'arcface' is unknown; known losses: \[.*'contrastive'.*'triplet'"),
    ({"loss__margin": -0.1}, r"loss\.margin must be >= 0; got -0\.1"),
    ({"loss__name": "lrml", "loss__tau": 0.0}, r"loss\.tau must be > 0; got 0\.0"),
    ({"train__batch_size": 6}, r"train\.batch_size 6 is not divisible by the 4 devices"),
    ({"loss__name": "nra", "train__batch_size": 8, "data__classes_per_batch": 3,
      "data__samples_per_class": 4},
     r"data\.classes_per_batch x data\.samples_per_class \(3 x 4\) != train\.batch_size 8"),
    ({"mining__positive": "farthest"}, r"mining\.positive must be one of"),
    ({"mining__refresh_every_tuples": 100},
     r"mining\.refresh_every_epochs / mining\.refresh_every_tuples exactly one"),
    ({"model__backbone": "resnet7"}, r"model\.backbone 'resnet7' is unknown"),
    ({"optimizer__learning_rate": -1.0}, r"optimizer\.learning_rate must be > 0"),
    ({"data__augment__flip_p": 2.0}, r"data\.augment\.flip_p must be a probability"),
    ({"train__remap_init": "kl"}, r"train\.remap_init must be one of \['data', 'none'\]; got 'kl'"),
    ({"train__remap_init": "data"},
     r"train\.remap_init 'data' initialises a REMAP head, but model\.pooling is 'gem'"),
    ({"model__pooling": "remap", "train__remap_init": "data", "train__remap_init_pairs": 0},
     r"train\.remap_init_pairs must be an integer >= 1 or None; got 0"),
])
def test_invalid_config_fails_naming_the_field(fields, message, tmp_path):
  cfg = _config(**fields)
  with pytest.raises(ValueError, match=message):
    validate_config(cfg, num_devices=4)
  # train() refuses it before touching the data or the workdir.
  with pytest.raises(ValueError, match=message):
    train(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_unknown_field_and_bad_type():
  with pytest.raises(ValueError, match=r"train\.epoch is not a config field"):
    apply_override(default_train_config(), "train.epoch", "3")
  with pytest.raises(ValueError, match=r"--config\.train\.epochs=many: does not fit"):
    apply_override(default_train_config(), "train.epochs", "many")
  cfg = default_train_config()
  apply_override(cfg, "mining.query_size", "None")
  apply_override(cfg, "data.augment.crop_scale", "(0.5, 1.0)")
  apply_override(cfg, "loss.name", "triplet")
  assert cfg.mining.query_size is None and cfg.data.augment.crop_scale == (0.5, 1.0)
  assert cfg.loss.name == "triplet"


def test_too_few_clusters_fail_clearly(tmp_path):
  ids = np.repeat(np.arange(3), 2)
  small = InstanceSet("three", [np.zeros((8, 8, 3), np.uint8)] * 6, ids)
  cfg = default_train_config()
  cfg.mining.num_negatives = 5
  with pytest.raises(ValueError, match=r"'three' has 3 clusters, but mining\.num_negatives=5 "
                                       r"needs 6"):
    check_training_set(cfg, small)
  cfg.loss.name, cfg.data.classes_per_batch, cfg.data.samples_per_class = "nra", 4, 2
  with pytest.raises(ValueError, match=r"3 classes with >= 2 images, fewer than "
                                       r"data\.classes_per_batch=4"):
    check_training_set(cfg, small)
  # Through train(): the synthetic tiny preset has 8 training instances.
  cfg = _config(data__synthetic_image_size=32, mining__num_negatives=8,
                model__backbone="tiny_resnet", model__pretrained=False)
  with pytest.raises(ValueError, match=r"has 8 clusters, but mining\.num_negatives=8 needs 9"):
    train(cfg, tmp_path / "run")


def test_cli_bad_config_exits_with_one_line(config_file, tmp_path, capsys):
  for argv, message in (
      ([f"--config={config_file}", "--config.loss.margin=-1"], "loss.margin must be >= 0"),
      (["--config", str(config_file), "--config.train.epoch", "2"],
       "train.epoch is not a config field"),
      (["--config", str(tmp_path / "missing.py")], "is not a file"),
      (["--config", str(config_file), "--bogus"], "unrecognized arguments: --bogus")):
    assert train_main([*argv, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ a run


def test_end_to_end_run_writes_everything(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["steps"] == STEPS and summary["steps_per_epoch"] == 3
  assert summary["resumed_from"] is None
  for key in ("before_val_map", "final_val_map", "best_val_map"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["best_val_map"] == max(summary["before_val_map"], summary["final_val_map"],
                                        summary["best_val_map"])
  records = _records(workdir)
  train_records = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train_records)
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train_records)
  assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3, 6]  # before, per epoch
  assert [r["epoch"] for r in records if r["kind"] == "mining"] == [0, 1]
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  # Latest 3 kept (step 2 deleted); the best by val mAP too, which may be one of them.
  assert {3, 4, 6} <= set(_checkpoint_steps(workdir)) and 2 not in _checkpoint_steps(workdir)
  assert summary["checkpoints"] == _checkpoint_steps(workdir)
  # The saved retriever is the final state, and it changed during training.
  trained = Retriever.load(workdir / "retriever")
  restored = ocp.CheckpointManager(workdir / "checkpoints").restore(
      STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  head = restored["params"]["head"]["params"]
  for name, value in head.items():
    np.testing.assert_array_equal(np.asarray(trained.variables["head"]["params"][name]),
                                  np.asarray(value))
  initial = Retriever.from_config(trained.config)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree_util.tree_leaves(trained.variables["backbone"]["params"]),
      jax.tree_util.tree_leaves(initial.variables["backbone"]["params"]))]
  assert max(moved) > 1e-4
  descriptors = trained.extract([np.full((64, 48, 3), 120, np.uint8)], max_size=64)
  assert descriptors.shape[0] == 1 and np.all(np.isfinite(descriptors))


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(uninterrupted, config_file,
                                                            tmp_path):
  workdir = tmp_path / "killed"
  script = tmp_path / "kill.py"
  script.write_text(KILL_SCRIPT)
  env = dict(os.environ)  # the forced 4 CPU devices (conftest) carry over
  # The resumed process loads the killed one's compiled programs instead of compiling again.
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  killed = subprocess.run([sys.executable, str(script), str(config_file), str(workdir),
                           str(KILL_AT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 4 in _checkpoint_steps(workdir) and max(_checkpoint_steps(workdir)) == 4
  assert not (workdir / "retriever").exists()

  resumed = subprocess.run([sys.executable, "-m", "retrieval_jax.cli", "train", "--config",
                            str(config_file), "--workdir", str(workdir)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from"] == 4 and summary["steps"] == STEPS

  reference = _leaves(uninterrupted[0])
  for a, b in zip(_leaves(workdir), reference, strict=True):
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # The lost step 5 was dropped from the log and redone once.
  steps = [r["step"] for r in _records(workdir) if r["kind"] == "train"]
  assert steps == list(range(1, STEPS + 1))
  np.testing.assert_allclose(summary["final_val_map"], uninterrupted[1]["final_val_map"],
                             atol=1e-6)


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(config_file, tmp_path):
  cfg = load_config_file(str(config_file))
  cfg.train.debug_nan_at_step = 3
  cfg.train.eval_at_start = False
  cfg.train.epochs = 1
  workdir = tmp_path / "nan"
  with pytest.raises(TrainingDivergedError,
                     match=r"non-finite training values at step 3 \(epoch 1, step 3 of 3\): "
                           r"loss=nan.*last good checkpoint is step 2"):
    train(cfg, workdir)
  assert _checkpoint_steps(workdir) == [2]  # the epoch-end checkpoint (step 3) was not saved
  restored = ocp.CheckpointManager(workdir / "checkpoints").restore(
      2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  assert int(restored["step"]) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored["params"]))
  assert _records(workdir)[-1]["kind"] == "error"
  assert not (workdir / "retriever").exists()


# ------------------------------------------------------------------------------ REMAP init


def _remap_config() -> object:
  """Tiny REMAP: untrained tiny ResNet (streams stage3 + stage4, D = 32 + 64), 2 grid levels
  (8 regions), an 8-dim FC (the top components are well defined from ~26 images), the synthetic
  ``tiny`` preset at 64 px; 12 matching + 12 non-matching pairs for the initialisation."""
  cfg = default_train_config()
  cfg.model.update(backbone="tiny_resnet", pretrained=False, pooling="remap", remap_levels=2,
                   whiten_dims=8)
  cfg.data.update(preset="tiny", synthetic_image_size=64, image_size=64, num_workers=1)
  cfg.eval.update(max_size=64, num_workers=1)
  cfg.loss.update(name="triplet", margin=0.1)
  cfg.mining.update(num_negatives=1, query_size=4, pool_size=16)
  cfg.train.update(epochs=1, batch_size=4, progress=False, eval_at_start=False,
                   remap_init="data", remap_init_pairs=12)
  return cfg


def _unpadded_region_descriptors(retriever: Retriever, images: list[np.ndarray],
                                 image_size: int) -> list[np.ndarray]:
  """REMAP's region vectors per tap, ``[N, R, C_l]``, one unpadded image at a time (no bucket,
  no mask, no devices): the trainer's padded, masked, sharded batches must give the same."""
  levels = retriever.head.levels

  @jax.jit
  def regions(variables, pixels):
    maps = retriever.backbone.apply(variables, preprocess(pixels, retriever.preprocessing))
    return [remap_region_descriptors(maps[tap], levels)[0] for tap in retriever.taps]

  out = []
  for image in images:
    pixels = resize_to(image, training_size(image.shape[:2], image_size, retriever.stride))
    out.append(regions(retriever.variables["backbone"], jnp.asarray(pixels)[None]))
  return [np.stack([np.asarray(r[layer]) for r in out]) for layer in range(len(out[0]))]


def test_remap_init_from_data_matches_an_independent_estimate(uninterrupted, tmp_path):
  cfg = resolve_config(_remap_config())
  # The backbone of the reference run's saved Retriever (the paper configs' init_backbone
  # path), which also spares this test a random initialisation of its own (~13 s of XLA
  # compilation on a CPU).
  cfg.train.init_backbone = str(uninterrupted[0] / "retriever")
  validate_config(cfg, num_devices=jax.device_count())
  trainer = _Trainer(cfg, tmp_path)
  try:
    before = jax.device_get(trainer.initial_state.variables)
    info = trainer.init_remap_from_data()
  finally:
    trainer.batcher.close()
  head = jax.device_get(trainer.initial_state.variables)["head"]["params"]

  # The pairs: the documented draw, a pure function of the seed.
  ids = np.asarray(trainer.train_set.cluster_ids)
  pairs = sample_pairs(ids, num_pairs=12, seed=0, epoch=0)
  negatives = random_negatives(ids[pairs[:, 0]], ids, 1, seed=0, epoch=0)[:, 0]
  expected_rows = np.concatenate([pairs, np.stack([pairs[:, 0], negatives], 1)])
  np.testing.assert_array_equal(info["pairs"], expected_rows)
  np.testing.assert_array_equal(info["same"], np.arange(24) < 12)
  assert np.all(ids[expected_rows[:12, 0]] == ids[expected_rows[:12, 1]])
  assert np.all(ids[expected_rows[12:, 0]] != ids[expected_rows[12:, 1]])

  # Region vectors of the same images with the initial network (the trainer's Retriever keeps
  # it), computed independently.
  images = np.unique(expected_rows)
  described = _unpadded_region_descriptors(
      trainer.retriever, [trainer.train_set.images[i] for i in images], cfg.data.image_size)
  first, second = (np.searchsorted(images, expected_rows[:, j]) for j in (0, 1))
  same = np.arange(24) < 12
  weights = [estimate_region_weights(d[first], d[second], same) for d in described]
  for layer, w in enumerate(weights):
    assert w.shape == (8,) and np.all(w >= 0) and np.ptp(w) > 0
    np.testing.assert_allclose(head[f"klw_{layer}"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(info["klw"][f"klw_{layer}"], w, rtol=1e-4, atol=1e-6)

  # The FC: PCA-whitening of p = [sum_r klw_r r(r)]_l of each described image, top 8 rows.
  p = np.concatenate([np.einsum("mrc,r->mc", d, w) for d, w in zip(described, weights)], 1)
  expected = whitening_params(*learn_pca_whitening(p), dims=8)
  kernel = np.asarray(head["fc"]["kernel"])
  signs = np.sign(np.sum(kernel * expected["kernel"], axis=0))  # eigenvectors' signs are free
  np.testing.assert_allclose(kernel, expected["kernel"] * signs, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(head["fc"]["bias"], expected["bias"] * signs, rtol=1e-3, atol=1e-4)
  # Nothing else changed: the backbone is the initial one, the saved Retriever's.
  saved = Retriever.load(uninterrupted[0] / "retriever").variables["backbone"]
  for a, b, c in zip(jax.tree_util.tree_leaves(before["backbone"]),
                     jax.tree_util.tree_leaves(trainer.initial_state.variables["backbone"]),
                     jax.tree_util.tree_leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))




# ------------------------------------------------------------------------------ semi-hard


def test_semi_hard_mining_takes_negatives_beyond_each_positive(uninterrupted, config_file,
                                                               tmp_path):
  cfg = load_config_file(str(config_file))
  cfg.loss.update(name="triplet", margin=0.1)
  cfg.mining.update(negatives="semi_hard", num_negatives=1)
  cfg.train.init_backbone = str(uninterrupted[0] / "retriever")  # no random init to compile
  cfg = resolve_config(cfg)
  validate_config(cfg, num_devices=jax.device_count())
  trainer = _Trainer(cfg, tmp_path)
  state = trainer.initial_state
  try:
    mined = trainer.mine(state, 0)
    # REMAP's refresh every K tuples re-mines the rest of the epoch's tuples the same way.
    order = trainer.order(mined, 0)
    rows = trainer.remine_rest(state, np.where(np.arange(3) == 2, -1, mined), order, 0, 0)
    table = trainer._descriptor_table(state, np.arange(len(trainer.ids)))
  finally:
    trainer.batcher.close()
  np.testing.assert_array_equal(rows, mined)
  ids = trainer.ids
  pool = sample_pool(len(ids), cfg.mining.pool_size, seed=cfg.train.seed, epoch=0)
  d_pos = np.linalg.norm(table[rows[:, 0]] - table[rows[:, 1]], axis=1)
  d_neg = np.linalg.norm(table[rows[:, 0]] - table[rows[:, 2]], axis=1)
  for r, (q, _, n) in enumerate(rows):
    others = pool[ids[pool] != ids[q]]
    d = np.linalg.norm(table[others] - table[q], axis=1)
    beyond = d > d_pos[r] + 1e-6
    # The nearest negative beyond the positive, or the nearest of all when none is beyond.
    want = others[beyond][np.argmin(d[beyond])] if beyond.any() else others[np.argmin(d)]
    assert n == want, r
  assert (d_neg > d_pos).mean() > 0.5
