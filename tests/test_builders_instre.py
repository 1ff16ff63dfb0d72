"""INSTRE builder on a fake tree with an Iscen et al. ``gnd_instre.mat``."""

from __future__ import annotations

import os

import numpy as np
import pytest

import builder_fixtures as bf
from retrieval_jax.data.builders import instre, loading  # noqa: F401  (registers)
from retrieval_jax.data.builders._base import ManualDataError
from retrieval_jax.data.images import load_image


def test_instre_matches_the_sources(tmp_path):
  manual = str(tmp_path / "m")
  want = bf.make_instre(manual)
  builder = bf.prepare("instre", "iscen", str(tmp_path / "d"), manual)
  s = loading.tfds_retrieval_set(builder)
  assert s.gnd_kind == "ok_junk" and (len(s.database), len(s.queries)) == (4, 2)
  assert bf.stored_ids(builder, "database") == want["imlist"]
  assert bf.stored_ids(builder, "query") == want["qimlist"]
  for i, rel in enumerate(want["imlist"]):
    np.testing.assert_array_equal(s.database[i], load_image(os.path.join(manual, "instre", rel)))
  for q, rel in enumerate(want["qimlist"]):
    np.testing.assert_array_equal(s.queries[q], load_image(os.path.join(manual, "instre", rel)))
    np.testing.assert_array_equal(s.gnd[q]["ok"], want["ok"][q])  # 1-based in the .mat
    assert s.gnd[q]["junk"].size == 0
  np.testing.assert_allclose(s.query_boxes, want["bbx"])


def test_instre_index_out_of_range_names_file_and_query(tmp_path):
  from scipy.io import loadmat, savemat
  manual = str(tmp_path / "m")
  bf.make_instre(manual)
  path = os.path.join(manual, "instre", "gnd_instre.mat")
  mat = loadmat(path)
  mat["gnd"][0, 1][0] = np.array([[5.0]])  # 1-based 5 > 4 database images
  savemat(path, {k: mat[k] for k in ("imlist", "qimlist", "gnd")})
  with pytest.raises(ManualDataError) as err:
    bf.prepare("instre", "iscen", str(tmp_path / "d"), manual)
  assert path in str(err.value) and "INSTRE-S2/01_bike/002.jpg" in str(err.value)
