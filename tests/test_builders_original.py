"""Original Oxford5k / Paris6k builder on fake trees in the official archive layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest

import builder_fixtures as bf
from retrieval_jax.data.builders import loading, oxford_paris  # noqa: F401  (registers)
from retrieval_jax.data.builders._base import ManualDataError
from retrieval_jax.data.builders.oxford_paris import find_images
from retrieval_jax.data.images import load_image


@pytest.mark.parametrize("config", ["oxford5k", "paris6k"])
def test_original_matches_the_sources(tmp_path, config):
  manual = str(tmp_path / "m")
  want = bf.make_original(manual, config)
  builder = bf.prepare("original_landmarks", config, str(tmp_path / "d"), manual)
  assert builder.info.disable_shuffling
  s = loading.tfds_retrieval_set(builder)
  assert s.gnd_kind == "original" and len(s.database) == 6 and len(s.queries) == 2
  paths = find_images(os.path.join(manual, config, "jpg"))
  assert bf.stored_ids(builder, "database") == want["imlist"]
  for i, name in enumerate(want["imlist"]):
    np.testing.assert_array_equal(s.database[i], load_image(paths[name]))
  for q, (name, box) in enumerate(want["queries"]):
    np.testing.assert_array_equal(s.queries[q], load_image(paths[name]))
    np.testing.assert_allclose(s.query_boxes[q], box)
    assert s.query_db_indices[q] == want["imlist"].index(name)  # oxc1_ prefix stripped
    for key in ("good", "ok", "junk"):
      np.testing.assert_array_equal(s.gnd[q][key], want["gnd"][q][key])


def test_list_naming_an_unknown_image_is_reported(tmp_path):
  manual = str(tmp_path / "m")
  bf.make_original(manual, "oxford5k")
  path = os.path.join(manual, "oxford5k", "gt_files_170407", "all_souls_1_ok.txt")
  with open(path, "w") as f:
    f.write("all_souls_999999\n")
  with pytest.raises(ManualDataError, match="all_souls_999999") as err:
    bf.prepare("original_landmarks", "oxford5k", str(tmp_path / "d"), manual)
  assert path in str(err.value)
