"""Data-parallel steps: 4 forced CPU devices (conftest) against 1 device, padding, gathered batch
losses, frozen parameters, batch statistics, input checks, and a 2-process ``jax.distributed``
run on localhost.

SGD is used wherever devices are compared: its update is proportional to the gradient, so a
gradient counted once per device would show in the params (Adam's scale invariance hides it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as dw
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.training import (check_batch_size, create_train_state, data_mesh,
                                    make_batch_step, make_optimizer, make_pair_step,
                                    make_schedule, make_triplet_step, make_tuple_step,
                                    merge_variables, split_variables, sum_and_count,
                                    trainable_mask)

TOL = dict(rtol=1e-5, atol=1e-6)
SGD = {"optimizer": "sgd", "learning_rate": 0.5, "momentum": 0.9, "lr_decay": 0.0}


@pytest.fixture(scope="module")
def meshes():
  assert jax.device_count() == 4
  return data_mesh(), data_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
  """The standard run (2 gathered batch-hard steps, 2 tuple steps) on one device."""
  return dw.train(data_mesh(jax.devices()[:1]), *dw.standard_batches())


def _state(cfg=SGD, steps_per_epoch=10):
  tx = make_optimizer(cfg, steps_per_epoch)
  return create_train_state(dw.init_variables(), tx, rng=0), tx


def _assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))  # NaN == NaN would pass
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


# ------------------------------------------------------------------------------ state


def test_split_and_merge_variables_round_trip():
  variables = dw.init_variables()
  params, model_state = split_variables(variables)
  assert set(params) == set(model_state) == {"backbone", "head"}
  assert set(params["backbone"]) == {"params"} and set(model_state["backbone"]) == {"batch_stats"}
  assert model_state["head"] == {}
  assert merge_variables(params, model_state) == variables
  single = variables["backbone"]  # one module's collections
  p, s = split_variables(single)
  assert set(p) == {"params"} and set(s) == {"batch_stats"}
  assert merge_variables(p, s) == single


def test_split_and_merge_refuse_bad_trees():
  with pytest.raises(ValueError, match=r"variables\['head'\]"):
    split_variables({"backbone": {"params": {}}, "head": 3})
  with pytest.raises(ValueError, match="both define 'params/w'"):
    merge_variables({"params": {"w": 1}}, {"params": {"w": 2}})


def test_create_train_state():
  state, tx = _state()
  assert int(state.step) == 0 and state.rng.shape == (2,)
  assert merge_variables(state.params, state.model_state) == state.variables
  _assert_trees_close(state.variables, dw.init_variables())


# ------------------------------------------------------------------------------ equivalence


def test_four_devices_match_one_device(meshes, reference):
  """Gathered batch-hard and tuple-contrastive steps, second batch of each padded."""
  four = dw.train(meshes[0], *dw.standard_batches())
  assert set(four) == set(reference)
  for key in reference:
    assert np.all(np.isfinite(reference[key])), key
    np.testing.assert_allclose(four[key], reference[key], **TOL, err_msg=key)
  # The steps learnt something (the comparison is not between two untouched states).
  initial = split_variables(dw.init_variables())[0]
  assert abs(float(four["head/params/Dense_0/kernel"].ravel()[0])
             - float(initial["head"]["params"]["Dense_0"]["kernel"].ravel()[0])) > 1e-3


def _pair_loss(x1, x2, valid, is_positive):
  d = jnp.sqrt(jnp.sum((x1 - x2) ** 2, -1) + 1e-12)
  values = jnp.where(is_positive, 0.5 * d ** 2, 0.5 * jnp.maximum(dw.MARGIN - d, 0.0) ** 2)
  return sum_and_count(values, valid)


def _triplet_loss(anchors, positives, negatives, valid):
  d_ap = jnp.sum((anchors - positives) ** 2, -1)[:, None]
  d_an = jnp.sum((anchors[:, None] - negatives) ** 2, -1)
  return sum_and_count(0.5 * jnp.maximum(dw.MARGIN + d_ap - d_an, 0.0), valid)  # [t, k]


@pytest.mark.parametrize("kind", ["pair", "triplet"])
def test_pair_and_triplet_steps_match_one_device(meshes, kind):
  if kind == "pair":
    batch = dw.tuple_batch(5, 8, 2, pad=3)
    batch["is_positive"] = np.arange(8) % 2 == 0
    factory, loss = make_pair_step, _pair_loss
  else:
    batch = dw.tuple_batch(6, 4, 3, pad=1)
    factory, loss = make_triplet_step, _triplet_loss
  results = []
  for mesh in meshes:
    state, tx = _state()
    step = factory(dw.embed, loss, tx, mesh)
    state, metrics = step(state, batch)
    results.append((state.params, metrics))
  (p4, m4), (p1, m1) = results
  assert int(m4["valid"]) == int(m1["valid"]) == int(batch["valid"].sum())
  for key in ("loss", "grad_norm", "param_norm"):
    assert np.isfinite(float(m1[key])), key
    np.testing.assert_allclose(m4[key], m1[key], **TOL, err_msg=key)
  _assert_trees_close(p4, p1)
  assert float(m4["loss"]) > 0


def test_padding_contributes_nothing(meshes):
  """A padded global batch on 4 devices = its real rows alone on 1 device (tuple and gathered
  batch steps): padding changes neither the loss nor the update."""
  padded = dw.tuple_batch(7, 8, 4, pad=3)
  real = {k: v[:5] for k, v in padded.items()}
  hard_padded = dw.labelled_batch(8, 8, 3, pad=2)
  hard_real = {k: v[:6] for k, v in hard_padded.items()}
  out = {}
  for name, mesh, batch, hard_batch in (("padded", meshes[0], padded, hard_padded),
                                        ("real", meshes[1], real, hard_real)):
    state, tx = _state()
    state, m_tuple = make_tuple_step(dw.embed, dw.tuple_contrastive, tx, mesh)(state, batch)
    state, m_hard = make_batch_step(dw.embed, dw.batch_hard, tx, mesh)(state, hard_batch)
    out[name] = (state.params, m_tuple, m_hard)
  for i in (1, 2):
    assert np.isfinite(float(out["real"][i]["grad_norm"]))
    np.testing.assert_allclose(out["padded"][i]["grad_norm"], out["real"][i]["grad_norm"], **TOL)
    np.testing.assert_allclose(out["padded"][i]["loss"], out["real"][i]["loss"], **TOL)
    assert int(out["padded"][i]["valid"]) == int(out["real"][i]["valid"])
  _assert_trees_close(out["padded"][0], out["real"][0])


def test_local_batch_loss_and_batch_statistics(meshes):
  """``gather=False`` (a loss that decomposes over images) with batch norm in training mode:
  the running means (pmean of per-device updates over equal shards) equal the 1-device ones."""

  def centre_loss(embeddings, labels, valid):
    return sum_and_count(jnp.sum(embeddings ** 2, -1) * (labels + 1), valid)

  batch = dw.labelled_batch(9, 8, 3)
  batch["mask"][:] = True  # equal valid cells per image: batch mean = mean of shard means
  stats = []
  for mesh in meshes:
    state, tx = _state()
    step = make_batch_step(dw.embed_train_bn, centre_loss, tx, mesh, gather=False,
                           mutable_model_state=True)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    stats.append(state.model_state["backbone"]["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_allclose(stats[0], stats[1], **TOL)
  initial = dw.init_variables()["backbone"]["batch_stats"]["BatchNorm_0"]["mean"]
  assert np.abs(np.asarray(stats[0]) - np.asarray(initial)).max() > 1e-3


def test_frozen_params_are_not_updated_and_metrics():
  cfg = {**SGD, "lr_decay": 0.1, "param_groups": [{"pattern": "^backbone/", "frozen": True}]}
  state, tx = _state(cfg, steps_per_epoch=1)
  before = jax.tree_util.tree_map(np.array, state.params)
  # jax.make_mesh's default Explicit axis type works as well as data_mesh's Auto.
  step = make_tuple_step(dw.embed, dw.tuple_contrastive, tx, jax.make_mesh((4,), ("data",)),
                         learning_rate_fn=make_schedule(cfg, 1),
                         trainable=trainable_mask(cfg, state.params))
  state, metrics = step(state, dw.tuple_batch(10, 4, 3))
  first = state  # placed on the mesh by the step: the next step donates its buffers
  state, metrics = step(state, dw.tuple_batch(11, 4, 3))
  assert set(metrics) == {"loss", "grad_norm", "update_norm", "param_norm", "valid",
                          "learning_rate"}
  assert int(state.step) == 2
  np.testing.assert_allclose(metrics["learning_rate"], 0.5 * np.exp(-0.1), rtol=1e-6)
  _assert_trees_close(state.params["backbone"], before["backbone"], rtol=0, atol=0)
  assert np.abs(np.asarray(state.params["head"]["params"]["Dense_0"]["kernel"])
                - before["head"]["params"]["Dense_0"]["kernel"]).max() > 1e-3
  np.testing.assert_allclose(
      metrics["param_norm"],
      np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(state.params))),
      rtol=1e-5)
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(first.params))


def test_rng_is_per_step_and_device(meshes):
  """``with_rng``: the key depends on the step and the device; the state's key is unchanged."""

  def noisy_embed(variables, pixels, mask, rng):
    out = dw.embed(variables, pixels, mask)
    return out + 0.05 * jax.random.normal(rng, out.shape)

  state, tx = _state({**SGD, "learning_rate": 1e-9})
  step = make_tuple_step(noisy_embed, dw.tuple_contrastive, tx, meshes[0], with_rng=True)
  batch = dw.tuple_batch(12, 4, 3)
  # Tuples 0 and 1 live on different devices; making them identical shows per-device keys.
  for key in batch:
    batch[key][1] = batch[key][0]
  rng = np.asarray(state.rng)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] != losses[1]
  np.testing.assert_array_equal(state.rng, rng)


# ------------------------------------------------------------------------------ bad input


def test_batch_not_divisible_by_devices_raises_before_compiling(meshes):
  state, tx = _state()
  step = make_tuple_step(dw.embed, dw.tuple_contrastive, tx, meshes[0])
  with pytest.raises(ValueError, match=r"batch_size.*6 rows.*4 device"):
    step(state, dw.tuple_batch(0, 6, 3))
  with pytest.raises(ValueError, match="batch_size.*device count 4"):
    check_batch_size(6, meshes[0])
  check_batch_size(8, meshes[0])
  check_batch_size(3, meshes[1])


def test_bad_batches_raise_naming_the_entry(meshes):
  state, tx = _state()
  tuple_step = make_tuple_step(dw.embed, dw.tuple_contrastive, tx, meshes[1])
  batch = dw.tuple_batch(0, 4, 3)
  with pytest.raises(ValueError, match=r"batch\['pixels'\]"):
    tuple_step(state, {**batch, "pixels": batch["pixels"][:, 0]})
  with pytest.raises(ValueError, match=r"batch\['mask'\]"):
    tuple_step(state, {**batch, "mask": batch["mask"][..., :4]})
  with pytest.raises(ValueError, match=r"batch\['valid'\]"):
    tuple_step(state, {**batch, "valid": batch["valid"][:3]})
  with pytest.raises(ValueError, match="'mask' entry"):
    tuple_step(state, {"pixels": batch["pixels"]})
  batch_step = make_batch_step(dw.embed, dw.batch_hard, tx, meshes[1])
  images = dw.labelled_batch(0, 4, 2)
  with pytest.raises(ValueError, match="'labels' entry"):
    batch_step(state, {k: v for k, v in images.items() if k != "labels"})
  pair_step = make_pair_step(dw.embed, _pair_loss, tx, meshes[1])
  with pytest.raises(ValueError, match=r"pairs \[P, 2"):
    pair_step(state, {**batch, "is_positive": np.ones(4, bool)})
  with pytest.raises(ValueError, match="mesh"):
    make_tuple_step(dw.embed, dw.tuple_contrastive, tx, meshes[1], axis="batch")
  with pytest.raises(ValueError, match="tx"):
    make_tuple_step(dw.embed, dw.tuple_contrastive, "adam", meshes[1])


# ------------------------------------------------------------------------------ multi-process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_distributed_run_matches_one_process(tmp_path, reference):
  """Two ``jax.distributed`` processes on localhost (gloo CPU collectives), 2 CPU devices each,
  each feeding its half of every global batch: the same losses and params as one process."""
  worker = Path(__file__).with_name("distributed_worker.py")
  out = tmp_path / "result.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                         env.get("PYTHONPATH", "")]))
  port = _free_port()
  start = time.monotonic()
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=max(1.0, 150 - (time.monotonic() - start)))[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
  result = np.load(out)
  assert int(result["device_count"]) == 4 and int(result["local_device_count"]) == 2
  for key in reference:
    np.testing.assert_allclose(result[key], reference[key], **TOL, err_msg=key)
