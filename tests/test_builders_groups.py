"""INRIA Holidays and UKBench builders: queries are database images of labelled groups."""

from __future__ import annotations

import os

import numpy as np
import pytest

import builder_fixtures as bf
from retrieval_jax import metrics
from retrieval_jax.data.builders import holidays, loading, ukbench  # noqa: F401  (registers)
from retrieval_jax.data.builders._base import ManualDataError
from retrieval_jax.data.images import load_image


def test_holidays_groups_queries_and_rotation(tmp_path):
  manual, data_dir = str(tmp_path / "m"), str(tmp_path / "d")
  names = bf.make_holidays(manual)
  jpg = os.path.join(manual, "holidays", "jpg")
  for config in ("original", "rotated"):
    builder = bf.prepare("inria_holidays", config, data_dir, manual)
    s = loading.tfds_retrieval_set(builder)
    assert s.gnd_kind == "ok_junk" and len(s.database) == 5
    assert bf.stored_ids(builder, "query") == ["100000", "100100"]
    np.testing.assert_array_equal(s.query_db_indices, [0, 3])
    np.testing.assert_array_equal(s.database_ids, [1000, 1000, 1000, 1001, 1001])
    np.testing.assert_array_equal(s.gnd[0]["ok"], [1, 2])
    np.testing.assert_array_equal(s.gnd[0]["junk"], [0])
    np.testing.assert_array_equal(s.gnd[1]["ok"], [4])
    turns = {"100001": 1, "100101": 2} if config == "rotated" else {}
    for i, name in enumerate(names):
      source = load_image(os.path.join(jpg, name + ".jpg"))
      np.testing.assert_array_equal(s.database[i], np.rot90(source, k=-turns.get(name, 0)))
  assert s.database[1].shape == (40, 30, 3)  # 90 degrees clockwise: width and height swap
  # A perfect ranking (own image first, then its group) scores 1 under the Holidays protocol.
  ranks = np.array([[0, 1, 2, 3, 4], [3, 4, 0, 1, 2]])
  assert metrics.holidays_map(ranks, s.gnd, s.query_db_indices) == pytest.approx(1.0)


def test_holidays_rotated_needs_the_rotation_file(tmp_path):
  manual = str(tmp_path / "m")
  bf.make_holidays(manual, with_rotations=False)
  with pytest.raises(ManualDataError) as err:
    bf.prepare("inria_holidays", "rotated", str(tmp_path / "d"), manual)
  assert os.path.join(manual, "holidays", "rotations.txt") in str(err.value)
  with open(os.path.join(manual, "holidays", "rotations.txt"), "w") as f:
    f.write("100001 45\n")
  with pytest.raises(ManualDataError, match="rotations.txt:1"):
    bf.prepare("inria_holidays", "rotated", str(tmp_path / "d"), manual)


def test_ukbench_groups_of_four(tmp_path):
  manual = str(tmp_path / "m")
  names = bf.make_ukbench(manual)
  builder = bf.prepare("ukbench", "full", str(tmp_path / "d"), manual)
  s = loading.tfds_retrieval_set(builder)
  assert len(s.database) == len(s.queries) == 8
  assert bf.stored_ids(builder, "database") == names
  np.testing.assert_array_equal(s.database_ids, [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(s.query_db_indices, np.arange(8))
  np.testing.assert_array_equal(s.gnd[5]["ok"], [4, 6, 7])
  np.testing.assert_array_equal(s.gnd[5]["junk"], [5])
  full = os.path.join(manual, "ukbench", "full")
  for i, name in enumerate(names):
    np.testing.assert_array_equal(s.queries[i], load_image(os.path.join(full, name + ".jpg")))
  os.remove(os.path.join(full, "ukbench00006.jpg"))
  with pytest.raises(ManualDataError, match="groups of 4"):
    bf.prepare("ukbench", "full", str(tmp_path / "d2"), manual)


def test_stored_images_decode_like_load_image(tmp_path):
  """Plain JPEGs are stored byte for byte; EXIF-rotated and CMYK ones as upright RGB PNG."""
  import tensorflow_datasets as tfds
  from PIL import Image
  manual = str(tmp_path / "m")
  names = bf.make_ukbench(manual, n_groups=1)
  full = os.path.join(manual, "ukbench", "full")
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
  Image.open(os.path.join(full, names[1] + ".jpg")).save(
      os.path.join(full, names[1] + ".jpg"), exif=exif.tobytes())
  bf.write_jpeg(os.path.join(full, names[2] + ".jpg"), seed=9, mode="CMYK")
  builder = bf.prepare("ukbench", "full", str(tmp_path / "d"), manual)
  s = loading.tfds_retrieval_set(builder)
  for i, name in enumerate(names):
    np.testing.assert_array_equal(s.database[i], load_image(os.path.join(full, name + ".jpg")))
  assert s.database[1].shape == (40, 30, 3)  # EXIF orientation applied
  raw = builder.as_data_source("database", decoders={"image": tfds.decode.SkipDecoding()})
  with open(os.path.join(full, names[0] + ".jpg"), "rb") as f:
    assert raw[0]["image"] == f.read()
  assert raw[1]["image"][:8] == b"\x89PNG\r\n\x1a\n"
