"""The synthetic benchmark: determinism, shapes, ground truth from visibility, splits, errors."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from retrieval_jax.data import synthetic
from retrieval_jax.data.synthetic import camera, scenes, textures
from retrieval_jax.metrics import compute_map, revisited_gnd

# A handful of photos: cheap configs for seed and size checks.
_MICRO = dataclasses.replace(synthetic.PRESETS["tiny"], name="micro", train_instances=2,
                             train_views=2, val_instances=0, val_distractors=0,
                             test_instances=1, db_views=2, distractors=1,
                             queries_per_instance=1)


@pytest.fixture(scope="module")
def bench() -> synthetic.SyntheticBenchmark:
  return synthetic.generate("tiny", seed=0)


def _digest(b: synthetic.SyntheticBenchmark) -> str:
  h = hashlib.sha256()
  for image in [*b.train.images, *b.val.database, *b.val.queries, *b.test.database,
                *b.test.queries]:
    h.update(np.ascontiguousarray(image).tobytes())
    h.update(str(image.shape).encode())
  h.update(b.train.cluster_ids.tobytes())
  h.update(b.train.boxes.tobytes())
  for rs in (b.val, b.test):
    h.update(rs.database_ids.tobytes())
    h.update(rs.query_boxes.tobytes())
    for entry in rs.gnd:
      for key in ("easy", "hard", "junk"):
        h.update(key.encode() + entry[key].tobytes())
  return h.hexdigest()


def test_same_seed_is_bit_identical(bench):
  assert _digest(synthetic.generate("tiny", seed=0)) == _digest(bench)


def test_different_seeds_differ():
  a, b = synthetic.generate(_MICRO, seed=0), synthetic.generate(_MICRO, seed=1)
  assert _digest(a) != _digest(b)
  assert not np.array_equal(a.train.images[0], b.train.images[0]) or (
      a.train.images[0].shape != b.train.images[0].shape)


def test_photos_do_not_depend_on_generation_order(bench):
  # A smaller config with the same clutter pool renders the same first training photos, and the
  # streaming iterators and the painting-free metadata pass match the in-memory benchmark.
  micro = synthetic.generate(_MICRO, seed=0)
  views = synthetic.PRESETS["tiny"].train_views
  for n, mine in enumerate(micro.train.images):
    instance, view = divmod(n, _MICRO.train_views)
    np.testing.assert_array_equal(mine, bench.train.images[instance * views + view])
  for (image, cluster, box), full, full_id, full_box in zip(
      synthetic.iter_train("tiny"), bench.train.images, bench.train.cluster_ids,
      bench.train.boxes):
    np.testing.assert_array_equal(image, full)
    assert cluster == full_id
    np.testing.assert_array_equal(box, full_box)
  for (image, box), full, full_box in zip(synthetic.iter_queries("tiny"), bench.test.queries,
                                          bench.test.query_boxes):
    np.testing.assert_array_equal(image, full)
    np.testing.assert_array_equal(box, full_box)
  meta = synthetic.retrieval_metadata("tiny", split="test")
  for field in dataclasses.fields(synthetic.ViewMetadata):
    np.testing.assert_array_equal(getattr(meta.database, field.name),
                                  getattr(bench.test_meta.database, field.name))
    np.testing.assert_array_equal(getattr(meta.queries, field.name),
                                  getattr(bench.test_meta.queries, field.name))


def test_sizes_shapes_and_aspect_ratios(bench):
  cfg = synthetic.PRESETS["tiny"]
  assert len(bench.train) == cfg.train_instances * cfg.train_views
  assert len(bench.test.database) == cfg.test_instances * cfg.db_views + cfg.distractors
  assert len(bench.test.queries) == cfg.test_instances * cfg.queries_per_instance
  assert len(bench.val.database) == cfg.val_instances * cfg.db_views + cfg.val_distractors
  images = [*bench.train.images, *bench.test.database, *bench.test.queries]
  for image in images:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) == cfg.image_size
  aspects = {round(im.shape[1] / im.shape[0], 2) for im in images}
  assert len(aspects) >= 3 and min(aspects) < 1 < max(aspects)
  # Not flat: real content (texture, clutter) in every photo.
  assert min(float(im.std()) for im in images) > 5.0
  small = synthetic.generate(_MICRO, image_size=64)
  assert all(max(im.shape[:2]) == 64 for im in small.train.images)


def test_splits_have_disjoint_instances(bench):
  train = set(bench.train.cluster_ids.tolist())
  val = set(bench.val.database_ids.tolist()) - {-1}
  test = set(bench.test.database_ids.tolist()) - {-1}
  assert len(train) == 8 and len(val) == 3 and len(test) == 6
  assert not train & val and not train & test and not val & test
  cfg = synthetic.PRESETS["tiny"]
  ids, counts = np.unique(bench.test.database_ids, return_counts=True)
  assert counts[ids == -1][0] == cfg.distractors
  assert (counts[ids != -1] == cfg.db_views).all()
  # Queries are photos of test instances, train photos of train instances.
  assert set(bench.test_meta.queries.instance_ids.tolist()) == test
  np.testing.assert_array_equal(bench.train_meta.instance_ids, bench.train.cluster_ids)


def _expected_labels(db: synthetic.ViewMetadata, q: synthetic.ViewMetadata, j: int,
                     same: np.ndarray) -> dict[str, set]:
  """The docstring's rule, written out independently of ``visibility_labels``."""
  out = {"easy": set(), "hard": set(), "junk": set()}
  da = np.array([-np.cos(q.pitch[j]) * np.sin(q.yaw[j]), np.sin(q.pitch[j]),
                 np.cos(q.pitch[j]) * np.cos(q.yaw[j])])
  for i in same:
    dv = np.array([-np.cos(db.pitch[i]) * np.sin(db.yaw[i]), np.sin(db.pitch[i]),
                   np.cos(db.pitch[i]) * np.cos(db.yaw[i])])
    angle = np.degrees(np.arccos(np.clip(da @ dv, -1, 1)))
    if db.visible_fraction[i] < 0.25 or db.visible_area[i] < 0.015:
      out["junk"].add(int(i))
    elif (db.visible_fraction[i] >= 0.7 and db.object_scale[i] >= 0.45 and angle <= 30
          and db.illumination[i] <= 0.6):
      out["easy"].add(int(i))
    else:
      out["hard"].add(int(i))
  return out


@pytest.mark.parametrize("split", ["test", "val"])
def test_ground_truth_follows_visibility_rules(bench, split):
  rs = getattr(bench, split)
  meta = getattr(bench, f"{split}_meta")
  db, q = meta.database, meta.queries
  np.testing.assert_array_equal(rs.database_ids, db.instance_ids)
  for j, entry in enumerate(rs.gnd):
    same = np.nonzero(db.instance_ids == q.instance_ids[j])[0]
    expected = _expected_labels(db, q, j, same)
    for key in ("easy", "hard", "junk"):
      assert set(entry[key].tolist()) == expected[key], (split, j, key)
    listed = np.concatenate([entry["easy"], entry["hard"], entry["junk"]])
    assert sorted(listed.tolist()) == same.tolist()  # every photo of it, each once
    assert (rs.database_ids[listed] != -1).all()
    assert len(entry["easy"]) + len(entry["hard"]) >= 1, f"{split} query {j} has no positive"
  # Distractors show nothing of any instance.
  distract = db.instance_ids == -1
  assert (db.visible_fraction[distract] == 0).all() and np.isnan(db.boxes[distract]).all()


def test_all_labels_occur_and_queries_are_clear(bench):
  labels = {k: sum(len(g[k]) for g in bench.test.gnd) for k in ("easy", "hard", "junk")}
  assert labels["easy"] > 0 and labels["hard"] > 0
  q = bench.test_meta.queries
  assert (q.visible_fraction >= 0.7).all() and (q.object_scale >= 0.45).all()
  for protocol in ("easy", "medium", "hard"):
    gnd = revisited_gnd(bench.test.gnd, protocol)
    if all(len(g["ok"]) == 0 for g in gnd):
      continue
    # A perfect ranking (positives first) scores 1 under every protocol.
    ranks = np.stack([np.concatenate([g["ok"], np.setdiff1d(np.arange(len(bench.test.database)),
                                                            g["ok"])]) for g in gnd])
    valid = [i for i, g in enumerate(gnd) if len(g["ok"])]
    assert compute_map(ranks[valid], [gnd[i] for i in valid])[0] == pytest.approx(1.0)


def test_boxes_lie_inside_their_images(bench):
  for images, boxes in ((bench.test.queries, bench.test.query_boxes),
                        (bench.val.queries, bench.val.query_boxes),
                        (bench.train.images, bench.train.boxes)):
    for image, box in zip(images, boxes):
      if np.isnan(box).any():
        continue
      h, w = image.shape[:2]
      x0, y0, x1, y1 = box
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
  assert not np.isnan(bench.test.query_boxes).any()
  assert np.isnan(bench.train.boxes).any(axis=1).mean() < 0.5


def test_bad_arguments_raise_naming_the_field():
  with pytest.raises(ValueError, match="preset"):
    synthetic.generate("huge")
  with pytest.raises(ValueError, match="image_size"):
    synthetic.generate("tiny", image_size=16)
  with pytest.raises(ValueError, match="train_views"):
    synthetic.SyntheticConfig(train_views=0)
  with pytest.raises(ValueError, match="distractors"):
    synthetic.SyntheticConfig(distractors=-1)
  with pytest.raises(ValueError, match="test_instances"):
    synthetic.SyntheticConfig(test_instances=0)
  with pytest.raises(ValueError, match="seed"):
    synthetic.generate(_MICRO, seed=-1)
  with pytest.raises(ValueError, match="split"):
    synthetic.retrieval_metadata("tiny", split="train")


def test_visibility_labels_rule_boundaries():
  vf = np.array([0.2, 0.3, 0.7, 0.7, 0.7, 0.7, 0.69, 0.9])
  area = np.array([0.5, 0.01, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
  scale = np.array([0.9, 0.9, 0.45, 0.44, 0.9, 0.9, 0.9, 0.9])
  view = np.array([0.0, 0.0, 30.0, 0.0, 31.0, 0.0, 0.0, 0.0])
  illum = np.array([0.0, 0.0, 0.6, 0.0, 0.0, 0.61, 0.0, 0.0])
  labels = synthetic.visibility_labels(vf, area, scale, view, illum)
  assert labels.tolist() == [2, 2, 0, 1, 1, 1, 1, 0]


def test_viewpoint_change_is_the_angle_between_optical_axes():
  yaw = np.radians([0.0, 30.0, -45.0])
  np.testing.assert_allclose(synthetic.viewpoint_change(0.0, 0.0, yaw, 0.0), [0, 30, 45],
                             atol=1e-9)
  np.testing.assert_allclose(synthetic.viewpoint_change(np.radians(20), 0.0, np.radians(-20),
                                                        0.0), 40, atol=1e-9)
  np.testing.assert_allclose(synthetic.viewpoint_change(0.0, np.radians(25), 0.0, 0.0), 25,
                             atol=1e-9)


def test_warp_with_identity_homography_copies_the_source(rng):
  source = rng.random((20, 30, 4), dtype=np.float32)
  out, box = camera.warp(camera.mip_levels(source), np.eye(3), 20, 30)
  assert box == (0, 20, 0, 30)
  np.testing.assert_allclose(out, source, atol=1e-5)
  shifted, _ = camera.warp(camera.mip_levels(source), np.array([[1, 0, 3], [0, 1, 2],
                                                                [0, 0, 1.0]]), 20, 30)
  np.testing.assert_allclose(shifted[2:, 3:], source[:-2, :-3], atol=1e-5)
  assert (shifted[:2] == 0).all() and (shifted[:, :3] == 0).all()  # outside the source


def test_frontal_view_is_a_similarity_and_oblique_views_foreshorten():
  h = camera.view_homography(40, 20, 0.0, 0.0, 0.0)
  corners = camera.apply_homography(h, np.array([[0, 0], [40, 0], [40, 20], [0, 20.0]]))
  np.testing.assert_allclose(corners[1, 1], corners[0, 1])  # horizontal edges stay level
  np.testing.assert_allclose(np.ptp(corners[:, 0]) / np.ptp(corners[:, 1]), 2.0)
  oblique = camera.apply_homography(camera.view_homography(40, 20, np.radians(50), 0.0, 0.0),
                                    np.array([[0, 0], [0, 20], [40, 0], [40, 20.0]]))
  left, right = np.ptp(oblique[:2, 1]), np.ptp(oblique[2:, 1])
  assert abs(left - right) / max(left, right) > 0.2  # the far side looks shorter


def test_jpeg_like_is_near_identity_at_high_quality_and_blocky_at_low(rng):
  image = textures.value_noise(rng, 48, 64, cells=4, octaves=3, channels=3)
  fine = camera.jpeg_like(image, 98)
  coarse = camera.jpeg_like(image, 10)
  assert np.abs(fine - image).mean() < 0.01
  assert np.abs(coarse - image).mean() > 2 * np.abs(fine - image).mean()
  assert fine.shape == image.shape and fine.dtype == np.float32


def test_render_scene_measures_truncation():
  # The same photo with the object partly pushed out of the frame shows less of it.
  landmark = scenes.make_landmark(np.random.default_rng(0), 96)
  inside = dataclasses.replace(scenes.REGIMES["clear"], scale=(0.6, 0.6))
  cut = dataclasses.replace(inside, crop_p=1.0, crop_max=0.6)
  fractions = []
  for regime in (inside, cut):
    stats = [scenes.render_scene(np.random.default_rng([k]), np.random.default_rng([k, 1]),
                                 regime, 128, landmark, (), 0, render=False)[1]
             for k in range(12)]
    fractions.append(np.array([s.visible_fraction for s in stats]))
  np.testing.assert_allclose(fractions[0], 1.0, atol=0.02)
  assert fractions[1].min() < 0.9 and (fractions[1] <= fractions[0] + 1e-6).all()


def test_photo_bank_uses_bundled_scikit_image_photos():
  pytest.importorskip("skimage")
  bank = textures.photo_bank()
  assert len(bank) >= 10
  assert all(p.dtype == np.float32 and p.ndim == 3 and max(p.shape[:2]) <= 384 for p in bank)
