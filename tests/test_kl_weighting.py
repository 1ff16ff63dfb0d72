"""KL-divergence region weights (REMAP §III-B) against direct histogram computations, analytic
Gaussian divergences, and a constructed case where only some regions carry identity."""

import os

import numpy as np
import pytest

from retrieval_jax import kl_weighting as klw


def _kl_reference(match, non_match, bins, smoothing):
  """One region at a time with np.histogram on the shared [min, max] range, eps added to every
  bin probability, KL(P_match || P_nonmatch) = sum p log(p / q)."""
  out = []
  for r in range(match.shape[1]):
    lo = min(match[:, r].min(), non_match[:, r].min())
    hi = max(match[:, r].max(), non_match[:, r].max())
    p = np.histogram(match[:, r], bins=bins, range=(lo, hi))[0] / len(match) + smoothing
    q = np.histogram(non_match[:, r], bins=bins, range=(lo, hi))[0] / len(non_match) + smoothing
    p, q = p / p.sum(), q / q.sum()
    out.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))
  return np.array(out)


def _l2n(v):
  return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def test_kl_matches_histogram_reference(rng):
  match = rng.gamma(2.0, 0.3, size=(300, 5))
  non_match = rng.gamma(3.0, 0.4, size=(500, 5)) + np.arange(5) * 0.1
  for bins, smoothing in [(64, 1e-6), (10, 0.05), (2, 1e-6)]:
    np.testing.assert_allclose(klw.region_kl_divergence(match, non_match, bins, smoothing),
                               _kl_reference(match, non_match, bins, smoothing), rtol=1e-10)


def test_kl_direction_and_value_on_gaussians(rng):
  n = 200_000
  p = rng.normal(0.0, 1.0, size=(n, 1))
  # KL(N(0,1) || N(0,4)) = log 2 + 1/8 - 1/2 ~ 0.318; the reverse is -log 2 + 2 - 1/2 ~ 0.807.
  q = rng.normal(0.0, 2.0, size=(n, 1))
  forward = klw.region_kl_divergence(p, q)[0]
  assert abs(forward - (np.log(2) + 1 / 8 - 1 / 2)) < 0.01
  # The reverse lives in the wide sample's tails, where the narrow one has almost no mass, so it
  # is estimated low; it still tells the direction apart.
  assert 0.6 < klw.region_kl_divergence(q, p)[0] < 0.81
  # KL(N(0,1) || N(1,1)) = 1/2, symmetric in the means.
  shifted = rng.normal(1.0, 1.0, size=(n, 1))
  assert abs(klw.region_kl_divergence(p, shifted)[0] - 0.5) < 0.03


def test_identical_and_constant_regions_give_zero(rng):
  same_dist = klw.region_kl_divergence(rng.normal(size=(50_000, 1)), rng.normal(size=(50_000, 1)))
  assert 0 <= same_dist[0] < 5e-3
  const = klw.region_kl_divergence(np.full((10, 2), 0.7), np.full((20, 2), 0.7))
  np.testing.assert_array_equal(const, [0.0, 0.0])


def _pairs(rng, n_pairs=400, regions=6, dim=16, noise=(0.05, None, 0.3, None, 0.8, None)):
  """Half matching, half non-matching pairs. Region r is informative when noise[r] is a number
  (the matching image repeats the region up to that noise) and pure noise when None."""
  a = rng.normal(size=(n_pairs, regions, dim))
  b = rng.normal(size=(n_pairs, regions, dim))
  same = np.arange(n_pairs) < n_pairs // 2
  for r, sigma in enumerate(noise):
    if sigma is not None:
      b[same, r] = a[same, r] + sigma * rng.normal(size=(int(same.sum()), dim))
  return a, b, same


def test_informative_regions_rank_first(rng):
  a, b, same = _pairs(rng)
  weights = klw.estimate_region_weights(a, b, same)
  assert weights.shape == (6,) and np.all(weights >= 0)
  order = np.argsort(-weights)
  # Informative regions first, cleaner ones ahead; noise regions near zero.
  np.testing.assert_array_equal(order[:3], [0, 2, 4])
  assert weights[[1, 3, 5]].max() < 0.25 * weights[4]


def test_estimate_uses_l2_normalised_region_distances(rng):
  a, b, same = _pairs(rng, n_pairs=100)
  a[:, :, 0] *= 50.0  # scale must not matter after the per-region L2 normalisation
  d = np.linalg.norm(_l2n(a) - _l2n(b), axis=-1)
  want = _kl_reference(d[same], d[~same], 64, 1e-6)
  np.testing.assert_allclose(klw.estimate_region_weights(a, b, same), want, rtol=1e-10)
  np.testing.assert_allclose(klw.region_pair_distances(a, b), d, rtol=1e-12)
  assert np.all(d <= 2 + 1e-9)


@pytest.mark.parametrize("mode,reduce", [("mean", np.mean), ("max", np.max), ("sum", np.sum)])
def test_normalisations(rng, mode, reduce):
  a, b, same = _pairs(rng, n_pairs=80)
  raw = klw.estimate_region_weights(a, b, same)
  got = klw.estimate_region_weights(a, b, same, normalize=mode)
  np.testing.assert_allclose(got, raw / reduce(raw), rtol=1e-12)
  assert np.isclose(reduce(got), 1.0)


def test_save_and_load_round_trip(tmp_path, rng):
  path = tmp_path / "klw.npz"
  weights = {"klw_0": rng.random(40), "klw_1": rng.random(40).astype(np.float32)}
  klw.save_weights(path, weights)
  klw.save_weights(path, weights)  # overwriting is atomic and leaves no temporary file
  loaded = klw.load_weights(path)
  assert sorted(loaded) == ["klw_0", "klw_1"]
  for k, value in weights.items():
    np.testing.assert_array_equal(loaded[k], value)
    assert loaded[k].dtype == value.dtype
  assert os.listdir(tmp_path) == ["klw.npz"]


def test_bad_inputs_name_the_argument(rng):
  m, n = rng.random((5, 3)), rng.random((6, 3))
  with pytest.raises(ValueError, match="bins"):
    klw.region_kl_divergence(m, n, bins=1)
  with pytest.raises(ValueError, match="smoothing"):
    klw.region_kl_divergence(m, n, smoothing=0.0)
  with pytest.raises(ValueError, match="matching_distances and non_matching_distances"):
    klw.region_kl_divergence(m, rng.random((6, 4)))
  with pytest.raises(ValueError, match="non_matching_distances"):
    klw.region_kl_divergence(m, np.zeros((0, 3)))
  with pytest.raises(ValueError, match="matching_distances must be a 2-D"):
    klw.region_kl_divergence(m[0], n)
  bad = m.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="matching_distances must be finite"):
    klw.region_kl_divergence(bad, n)
  a, b, same = _pairs(rng, n_pairs=20)
  with pytest.raises(ValueError, match="region_descriptors_a and region_descriptors_b"):
    klw.estimate_region_weights(a, b[:, :3], same)
  with pytest.raises(ValueError, match="region_descriptors_b must be a 3-D"):
    klw.estimate_region_weights(a, b[:, 0], same)
  with pytest.raises(ValueError, match="same must be a bool"):
    klw.estimate_region_weights(a, b, same.astype(int))
  with pytest.raises(ValueError, match="same must mark both"):
    klw.estimate_region_weights(a, b, np.ones(20, bool))
  with pytest.raises(ValueError, match="normalize"):
    klw.estimate_region_weights(a, b, same, normalize="l2")
  with pytest.raises(ValueError, match="weights"):
    klw.save_weights("unused.npz", {})
