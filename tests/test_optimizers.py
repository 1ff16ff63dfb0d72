"""Optimizers from configs, against hand-computed updates in numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from retrieval_jax.training import (default_optimizer_config, make_optimizer, make_schedule,
                                    param_paths, trainable_mask)


def _params() -> dict:
  """A Retriever-shaped tree: two sub-models, each with its "params" collection."""
  return {"backbone": {"params": {"conv5_2": {"kernel": jnp.full((2, 3), 1.0)},
                                  "conv5_3": {"kernel": jnp.full((3,), -2.0)}}},
          "head": {"params": {"p": jnp.array([3.0]), "whiten": {"kernel": jnp.ones((2, 2))}}}}


def _grads(seed: int = 0, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), _params())


def _run(tx, grads_seq, params=None):
  """Applies ``tx`` to a sequence of gradient trees; returns (params after each step, updates)."""
  params = _params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compile instead of op-by-op dispatch of every step
  history, updates_seq = [], []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
    updates_seq.append(updates)
  return history, updates_seq


def _close(a, b, **kw):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_param_paths_are_slash_joined():
  assert param_paths(_params()) == [
      "backbone/params/conv5_2/kernel", "backbone/params/conv5_3/kernel", "head/params/p",
      "head/params/whiten/kernel"]


def test_schedule_is_per_epoch_exponential_decay():
  schedule = make_schedule({"learning_rate": 0.01, "lr_decay": 0.1}, steps_per_epoch=5)
  steps = np.arange(25)
  expected = 0.01 * np.exp(-0.1 * (steps // 5))
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6)


def test_schedule_with_accumulation_follows_the_update_epochs():
  # 6 micro-steps per epoch, updates every 2: update u covers micro-steps 2u, 2u+1.
  schedule = make_schedule({"learning_rate": 1.0, "lr_decay": 0.1, "accumulate_steps": 2},
                           steps_per_epoch=6)
  steps = np.arange(18)
  expected = np.exp(-0.1 * ((steps // 2) * 2 // 6))
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6)


def test_adam_applies_the_decayed_rate_each_epoch():
  # With a constant gradient Adam's bias-corrected step is lr * g / |g| = lr * sign(g) (eps 0),
  # so the update size is the learning rate in force (float32 bias corrections round at 1e-5).
  tx = make_optimizer({"optimizer": "adam", "learning_rate": 0.01, "lr_decay": 0.1,
                       "adam_eps": 0.0}, steps_per_epoch=4)
  grads = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.5), _params())
  _, updates = _run(tx, [grads] * 12)
  sizes = [float(u["head"]["params"]["p"][0]) for u in updates]
  np.testing.assert_allclose(sizes, -0.01 * np.exp(-0.1 * (np.arange(12) // 4)), rtol=1e-4)


def test_lr_multiplier_and_weight_decay_match_hand_computed_sgd():
  cfg = {"optimizer": "sgd", "learning_rate": 0.1, "lr_decay": 0.0, "momentum": 0.0,
         "weight_decay": 0.01, "param_groups": [{"pattern": "^head/", "lr_multiplier": 10.0},
                                                {"pattern": "conv5_3", "lr_multiplier": 0.5}]}
  params, grads = _params(), _grads()
  (new,), _ = _run(make_optimizer(cfg, steps_per_epoch=10), [grads])
  multipliers = {"backbone/params/conv5_2/kernel": 1.0, "backbone/params/conv5_3/kernel": 0.5,
                 "head/params/p": 10.0, "head/params/whiten/kernel": 10.0}
  for path, p, g, n in zip(param_paths(params), jax.tree_util.tree_leaves(params),
                           jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(new)):
    expected = np.asarray(p) - 0.1 * multipliers[path] * (np.asarray(g) + 0.01 * np.asarray(p))
    np.testing.assert_allclose(n, expected, rtol=1e-6, err_msg=path)


def test_lr_multiplier_scales_the_first_adam_update():
  cfg = {"optimizer": "adam", "learning_rate": 1e-3, "lr_decay": 0.0,
         "param_groups": [{"pattern": "^head/", "lr_multiplier": 4.0}]}
  grads = _grads()
  _, (scaled,) = _run(make_optimizer(cfg, steps_per_epoch=10), [grads])
  _, (plain,) = _run(make_optimizer({**cfg, "param_groups": []}, steps_per_epoch=10), [grads])
  _close(scaled["head"], jax.tree_util.tree_map(lambda u: 4.0 * u, plain["head"]), rtol=1e-6)
  _close(scaled["backbone"], plain["backbone"], rtol=1e-6)


def test_sgd_momentum_matches_the_pytorch_recursion():
  # torch.optim.SGD (dampening 0): b_t = mu * b_{t-1} + g_t, p -= lr * b_t.
  cfg = {"optimizer": "sgd", "learning_rate": 0.1, "lr_decay": 0.0, "momentum": 0.9}
  g1, g2 = _grads(1), _grads(2)
  history, _ = _run(make_optimizer(cfg, steps_per_epoch=10), [g1, g2])
  p0 = _params()
  b1 = g1
  p1 = jax.tree_util.tree_map(lambda p, b: p - 0.1 * b, p0, b1)
  b2 = jax.tree_util.tree_map(lambda b, g: 0.9 * b + g, b1, g2)
  p2 = jax.tree_util.tree_map(lambda p, b: p - 0.1 * b, p1, b2)
  _close(history[0], p1, rtol=1e-6)
  _close(history[1], p2, rtol=1e-6)


def test_frozen_groups_stay_unchanged_and_others_move():
  # DLRTN: only conv5_3 and later are trained.
  cfg = {"optimizer": "adam", "learning_rate": 0.01, "weight_decay": 0.1,
         "param_groups": [{"pattern": "conv5_2", "frozen": True}]}
  tx = make_optimizer(cfg, steps_per_epoch=10)
  params = _params()
  history, _ = _run(tx, [_grads(i) for i in range(3)])
  _close(history[-1]["backbone"]["params"]["conv5_2"], params["backbone"]["params"]["conv5_2"],
         rtol=0, atol=0)
  for path in (("backbone", "params", "conv5_3", "kernel"), ("head", "params", "p")):
    before, after = params, history[-1]
    for key in path:
      before, after = before[key], after[key]
    assert np.all(np.abs(np.asarray(after) - np.asarray(before)) > 1e-3), path
  assert trainable_mask(cfg, params) == {
      "backbone": {"params": {"conv5_2": {"kernel": False}, "conv5_3": {"kernel": True}}},
      "head": {"params": {"p": True, "whiten": {"kernel": True}}}}


def test_frozen_gradients_do_not_count_in_clipping():
  # A huge frozen gradient must not shrink the trainable update through the global norm.
  cfg = {"optimizer": "sgd", "learning_rate": 1.0, "lr_decay": 0.0, "momentum": 0.0,
         "grad_clip_norm": 100.0, "param_groups": [{"pattern": "^backbone/", "frozen": True}]}
  grads = _grads()
  grads["backbone"] = jax.tree_util.tree_map(lambda g: g * 1e6, grads["backbone"])
  _, (updates,) = _run(make_optimizer(cfg, steps_per_epoch=10), [grads])
  _close(updates["head"], jax.tree_util.tree_map(lambda g: -g, grads["head"]), rtol=1e-6)
  assert optax.tree.norm(updates["backbone"]) == 0.0


def test_clipping_bounds_the_update_norm():
  cfg = {"optimizer": "sgd", "learning_rate": 1.0, "lr_decay": 0.0, "momentum": 0.0,
         "grad_clip_norm": 2.0}
  grads = _grads(scale=10.0)
  assert optax.tree.norm(grads) > 2.0
  _, (updates,) = _run(make_optimizer(cfg, steps_per_epoch=10), [grads])
  np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-5)
  # Below the threshold, nothing changes.
  small = _grads(scale=0.01)
  _, (updates,) = _run(make_optimizer(cfg, steps_per_epoch=10), [small])
  _close(updates, jax.tree_util.tree_map(lambda g: -g, small), rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulation_updates_every_k_steps_like_one_big_batch(momentum):
  base = {"optimizer": "sgd", "learning_rate": 0.1, "lr_decay": 0.0, "momentum": momentum}
  micro = [_grads(i) for i in range(6)]
  history, updates = _run(make_optimizer({**base, "accumulate_steps": 3}, 10), micro)
  for i in (0, 1, 3, 4):  # between updates the params do not move
    assert optax.tree.norm(updates[i]) == 0.0
  big = [jax.tree_util.tree_map(lambda *g: sum(g) / 3, *micro[j:j + 3]) for j in (0, 3)]
  reference, _ = _run(make_optimizer(base, 10), big)
  _close(history[2], reference[0], rtol=1e-5, atol=1e-7)
  _close(history[5], reference[1], rtol=1e-5, atol=1e-7)


def test_config_dict_input_and_defaults():
  cfg = default_optimizer_config()
  cfg.grad_clip_norm = 1.0
  cfg.param_groups = [{"pattern": "^head/", "lr_multiplier": 2.0}]
  tx = make_optimizer(cfg, steps_per_epoch=3)
  history, _ = _run(tx, [_grads()])
  assert set(history[0]) == {"backbone", "head"}
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert math.isclose(float(make_schedule(cfg, 3)(0)), cfg.learning_rate, rel_tol=1e-6)


@pytest.mark.parametrize("overrides, field", [
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "1e-3"}, "learning_rate"),
    ({"lr_decay": -0.1}, "lr_decay"),
    ({"momentum": 1.0}, "momentum"),
    ({"nesterov": "yes"}, "nesterov"),
    ({"adam_b2": 1.5}, "adam_b2"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"accumulate_steps": 0}, "accumulate_steps"),
    ({"accumulate_steps": 2.0}, "accumulate_steps"),
    ({"lr": 0.1}, "unknown field"),
    ({"param_groups": "head"}, "param_groups"),
    ({"param_groups": [{"lr_multiplier": 2.0}]}, r"param_groups\[0\]\.pattern"),
    ({"param_groups": [{"pattern": "(", "frozen": True}]}, r"param_groups\[0\]\.pattern"),
    ({"param_groups": [{"pattern": "a", "lr_multiplier": 2.0, "frozen": True}]},
     r"param_groups\[0\] must set exactly one"),
    ({"param_groups": [{"pattern": "a"}]}, r"param_groups\[0\] must set exactly one"),
    ({"param_groups": [{"pattern": "a", "lr_multiplier": -1.0}]},
     r"param_groups\[0\]\.lr_multiplier"),
    ({"param_groups": [{"pattern": "a", "frozen": "yes"}]}, r"param_groups\[0\]\.frozen"),
    ({"param_groups": [{"pattern": "a", "lr": 2.0}]}, r"param_groups\[0\] has unknown key"),
])
def test_bad_fields_raise_naming_them(overrides, field):
  with pytest.raises(ValueError, match=field):
    make_optimizer(overrides, steps_per_epoch=10)


def test_bad_steps_per_epoch_raises():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    make_optimizer({}, steps_per_epoch=0)


def test_group_matching_nothing_raises_at_init_naming_the_pattern():
  tx = make_optimizer({"param_groups": [{"pattern": "conv4_", "frozen": True}]}, 10)
  with pytest.raises(ValueError, match=r"param_groups\[0\]\.pattern 'conv4_'.*matches no"):
    tx.init(_params())
  shadowed = make_optimizer({"param_groups": [{"pattern": "^head/", "lr_multiplier": 2.0},
                                              {"pattern": "head/params/p", "frozen": True}]}, 10)
  with pytest.raises(ValueError, match=r"param_groups\[1\]\.pattern .*earlier groups"):
    shadowed.init(_params())
