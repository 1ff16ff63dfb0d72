"""The paper configs (``configs/*.py``): each recipe and its ``quick`` variant load through the
``path:variant`` convention and validate, carry the papers' hyper-parameters, and the DLRTN two
stages (joint loss with its classifier, then R-GAC training only the pooling) run end to end on
an untrained tiny ResNet (synthetic ``tiny`` at 64 px, a few steps)."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import Retriever, losses
from retrieval_jax.config_files import apply_override, load_config_file
from retrieval_jax.models import load_variables
from retrieval_jax.training.config import stage_configs, validate_config
from retrieval_jax.training.loop import _Trainer, dlrtn_per_tuple, train

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("gem_contrastive", "rmac_triplet", "dlrtn_rgmp", "lrml", "darac_nra", "remap")


def _load(name: str, variant: str = ""):
  return load_config_file(str(REPO / "configs" / f"{name}.py") + (f":{variant}" if variant
                                                                   else ""))


@pytest.mark.parametrize("variant", ["", "quick"])
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_config_loads_and_validates(name, variant):
  cfg = _load(name, variant)
  # On the 4 forced devices where the config's global batch splits over them.
  devices = 4 if cfg.train.batch_size % 4 == 0 else 1
  validate_config(cfg, num_devices=devices)
  module = (REPO / "configs" / f"{name}.py").read_text()
  # Honest about what was run: the paper recipes were not; each quick variant has its
  # measured validation mAP at the start and the end of training.
  measured = module[module.index("Our measurement:"):module.index('"""', 10)]
  assert "the paper recipe has not been run" in measured
  assert "``quick``" in measured and len(re.findall(r"\b0\.\d{3}\b", measured)) >= 4, measured
  assert "retrieval-jax train --config configs/" in module
  if variant == "quick":
    for stage in stage_configs(cfg):
      assert stage.model.backbone == "efficientnet_lite0" and stage.model.pretrained
      assert stage.data.source == "synthetic" and stage.data.preset == "small"
      # Quick: at most 8 epochs of 120 tuples (a quarter of an hour on 2 cores).
      assert stage.data.image_size == 128 and stage.train.epochs <= 8
      assert stage.train.init_backbone is None


def test_variant_errors():
  with pytest.raises(ValueError, match="unknown variant 'slow'"):
    _load("lrml", "slow")
  with pytest.raises(ValueError, match="has no variants"):
    load_config_file(str(REPO / "configs" / "demo.py") + ":quick")
  with pytest.raises(ValueError, match="missing.py is not a file"):
    load_config_file(str(REPO / "configs" / "missing.py") + ":quick")


def test_paper_hyper_parameters():
  dlrtn = _load("dlrtn_rgmp")
  first, second = stage_configs(dlrtn)
  assert (first.model.backbone, first.model.pooling, first.loss.name) == ("vgg16", "rmac", "dlrtn")
  assert first.loss.margin == 0.75 and first.loss.classification_weight == 1.5
  assert first.optimizer.optimizer == "adam" and first.optimizer.learning_rate == 1e-6
  assert first.optimizer.lr_decay == 0.1 and first.optimizer.weight_decay == 5e-4
  assert first.data.image_size == 256 and first.train.batch_size == 8
  assert first.mining.refresh_every_epochs == 5 and first.mining.active_only
  assert first.mining.num_negatives == 1
  assert second.model.backbone == "vgg16" and second.model.pooling == "rgac"
  assert second.model.p == 3.0 and second.loss.name == "triplet" and second.loss.margin == 0.75
  assert second.optimizer.param_groups == [{"pattern": "^backbone/", "frozen": True}]

  gem = _load("gem_contrastive")
  assert (gem.model.backbone, gem.model.pooling, gem.loss.name) == ("resnet101", "gem",
                                                                    "contrastive")
  assert gem.loss.margin == 0.85 and gem.optimizer.learning_rate == 5e-7
  assert gem.mining.num_negatives == 5 and gem.mining.query_size == 2000
  assert gem.mining.pool_size == 22000 and gem.data.image_size == 362
  assert gem.train.batch_size == 5

  rmac = _load("rmac_triplet")
  assert (rmac.model.backbone, rmac.model.pooling, rmac.loss.name) == ("resnet101", "rmac",
                                                                       "triplet")
  assert rmac.loss.margin == 0.1

  lrml = _load("lrml")
  assert lrml.loss.name == "lrml" and lrml.loss.tau == 1.25 and lrml.model.p == 2.32
  assert lrml.mining.num_negatives == 5 and lrml.optimizer.learning_rate == 7e-7
  assert lrml.data.image_size == 362 and lrml.train.epochs == 30

  darac = _load("darac_nra")
  assert (darac.model.backbone, darac.model.pooling, darac.loss.name) == ("resnet50_v2",
                                                                          "darac", "nra")
  assert darac.loss.alpha == 4.0 and darac.loss.eps == 1e-4
  assert (darac.data.classes_per_batch, darac.data.samples_per_class) == (16, 4)
  assert darac.optimizer.optimizer == "sgd" and darac.optimizer.learning_rate == 1e-4
  assert darac.model.scales == (299, 540, 1020)

  remap = _load("remap")
  assert remap.model.backbone.startswith("resnext101") and remap.model.pooling == "remap"
  assert remap.loss.name == "triplet" and remap.loss.margin == 0.1
  assert remap.mining.refresh_every_tuples == 3000 and remap.mining.refresh_every_epochs is None
  assert remap.train.batch_size * remap.optimizer.accumulate_steps == 64
  assert remap.optimizer.optimizer == "sgd" and remap.optimizer.learning_rate == 1e-3
  assert remap.optimizer.weight_decay == 5e-5 and remap.optimizer.momentum == 0.9


def test_dlrtn_per_tuple_is_the_library_loss():
  rng = np.random.default_rng(0)
  d = jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  labels = jnp.asarray([0, 2, 1, 1, 0])
  one = dlrtn_per_tuple(d[:, :3], logits, labels, margin=0.75, classification_weight=1.5)
  np.testing.assert_allclose(one, losses.dlrtn_loss(d[:, 0], d[:, 1], d[:, 2], logits, labels,
                                                    margin=0.75, classification_weight=1.5,
                                                    reduction="none"), rtol=1e-6)
  two = dlrtn_per_tuple(d, logits, labels, margin=0.75, classification_weight=1.5)
  expected = sum(losses.triplet_loss(d[:, 0], d[:, 1], d[:, j], margin=0.75, reduction="none")
                 for j in (2, 3)) + 1.5 * losses.softmax_cross_entropy(logits, labels,
                                                                       reduction="none")
  np.testing.assert_allclose(two, expected, rtol=1e-6)


def test_stage_fields_are_checked():
  cfg = _load("dlrtn_rgmp", "quick")
  apply_override(cfg, "stages", repr([{}, {"data": {"image_size": 64}}]))
  with pytest.raises(ValueError, match=r"stages\[1\]\.data cannot be set per stage"):
    validate_config(cfg, num_devices=4)
  apply_override(cfg, "stages", repr([{}, {"model": {"pooling": "rgem"}}]))
  with pytest.raises(ValueError, match=r"stages\[1\]\.model\.pooling must be one of"):
    validate_config(cfg, num_devices=4)


# ------------------------------------------------------------------------------ smoke run

SMOKE = {  # what a user passes as --config.<field>=<value>
    "model.backbone": "tiny_resnet", "model.pretrained": "False", "data.preset": "tiny",
    "data.synthetic_image_size": "64", "data.image_size": "64", "data.num_workers": "1",
    "eval.max_size": "64", "eval.num_workers": "1", "mining.query_size": "8",
    "mining.pool_size": "24", "mining.active_only": "False", "train.epochs": "1",
    "train.batch_size": "4", "train.eval_at_start": "False", "train.progress": "False",
    "optimizer.learning_rate": "0.01", "optimizer.lr_decay": "0.0",
    "optimizer.param_groups": "[]",
}


@pytest.fixture(scope="module")
def dlrtn_run(tmp_path_factory):
  cfg = _load("dlrtn_rgmp", "quick")
  for field, text in SMOKE.items():
    apply_override(cfg, field, text)
  stages = [dict(s) for s in cfg.stages]
  stages[1] = {**stages[1], "train": {"epochs": 1},
               "optimizer": {"learning_rate": 0.1, "param_groups": [
                   {"pattern": "^backbone/", "frozen": True}]}}
  apply_override(cfg, "stages", repr(stages))
  workdir = tmp_path_factory.mktemp("runs") / "dlrtn"
  steps = []
  summary = train(cfg, workdir, on_step=steps.append)
  return cfg, workdir, summary, steps


def test_two_stages_run_and_stage_two_trains_only_the_pooling(dlrtn_run):
  cfg, workdir, summary, steps = dlrtn_run
  assert [s["stage"] for s in steps] == [0, 0, 1, 1]  # 8 tuples / 4 per step, 1 epoch each
  assert all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
  assert summary["steps"] == 4 and len(summary["stages"]) == 2
  assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
  for i in (0, 1):
    assert (workdir / f"stage_{i}" / "checkpoints").is_dir()
  first = load_variables(workdir / "stage_0" / "variables")
  second = load_variables(workdir / "stage_1" / "variables")
  assert "classifier" in first and "classifier" not in second
  # Stage 2: the backbone is exactly stage 1's; R-GAC's xi moved away from its initial 3.
  for a, b in zip(jax.tree_util.tree_leaves(first["backbone"]),
                  jax.tree_util.tree_leaves(second["backbone"]), strict=True):
    np.testing.assert_array_equal(a, b)
  xi = float(np.asarray(second["head"]["params"]["xi"]))
  assert abs(xi - 3.0) > 1e-4, xi
  final = Retriever.load(workdir / "retriever")
  assert final.config.pooling == "rgac" and "classifier" not in final.variables
  out = final.extract([np.full((64, 48, 3), 120, np.uint8)], max_size=64)
  assert np.all(np.isfinite(out))
  # Re-running the finished run resumes past both stages without training again.
  again = train(cfg, workdir)
  assert again["steps"] == 4 and again["final_val_map"] == summary["final_val_map"]


def test_dlrtn_joint_loss_trains_the_classifier(dlrtn_run, tmp_path):
  cfg, workdir, _, steps = dlrtn_run
  stage_one = stage_configs(cfg)[0]
  assert stage_one.loss.name == "dlrtn"
  initial = _Trainer(stage_one, tmp_path).initial_state.params["classifier"]
  trained = load_variables(workdir / "stage_0" / "variables")["classifier"]
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
      jax.tree_util.tree_leaves(initial), jax.tree_util.tree_leaves(trained["params"]),
      strict=True)]
  assert max(moved) > 1e-5
  assert np.isfinite([s["loss"] for s in steps if s["stage"] == 0]).all()
