"""Custom folders and CSVs as training and test sets, with real image files written by PIL."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from retrieval_jax import metrics
from retrieval_jax.data.custom import (csv_instance_set, csv_retrieval_set, folder_instance_set,
                                       folder_retrieval_set)
from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.images import ImageReadError, load_image


def _write(path, size=(40, 30), seed=0, orientation=None) -> str:
  """A real photo file (format from the extension), ``size = (width, height)``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  if orientation is not None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
  else:
    image.save(path)
  return os.fspath(path)


def _truncated_jpeg(path) -> str:
  _write(path, seed=9)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) * 2 // 3])  # header intact: only a full decode notices
  return os.fspath(path)


def _write_csv(path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text.strip() + "\n")
  return path


@pytest.fixture
def folder(tmp_path):
  """root/<instance>/...: b (2 photos), a (3, one nested), c (1), plus files to ignore."""
  root = tmp_path / "photos"
  expected = {
      "a": [_write(root / "a" / "2.png", seed=1), _write(root / "a" / "10.jpg", seed=2),
            _write(root / "a" / "z" / "0.jpg", seed=3)],
      "b": [_write(root / "b" / "x.JPG", seed=4), _write(root / "b" / "y.jpeg", seed=5)],
      "c": [_write(root / "c" / "only.png", seed=6)],
  }
  (root / "a" / "notes.txt").write_text("not an image")
  _write(root / "a" / ".hidden.jpg", seed=7)
  (root / "empty").mkdir()
  (root / "README.md").write_text("my photos")
  return root, expected


# --------------------------------------------------------------------------- folders


def test_folder_instance_set(folder):
  root, expected = folder
  dataset, names, skipped = folder_instance_set(root)
  assert isinstance(dataset, InstanceSet) and skipped == []
  assert names == ["a", "b", "c"]  # sorted folder names; empty folders get no id
  # Within an instance: sorted by the path inside its folder ("10.jpg" < "2.png" < "z/0.jpg").
  want_paths = sorted(expected["a"], key=lambda p: os.path.relpath(p, root / "a"))
  want_paths += expected["b"] + expected["c"]
  assert list(dataset.images) == want_paths
  assert dataset.cluster_ids.tolist() == [0, 0, 0, 1, 1, 2]
  for path, c in zip(dataset.images, dataset.cluster_ids):
    assert os.path.basename(os.path.dirname(path)) in (names[c], "z")
    assert load_image(path).shape == (30, 40, 3)


def test_corrupt_image_in_a_folder(folder, caplog):
  root, _ = folder
  bad = root / "b" / "broken.jpg"
  bad.write_bytes(b"\xff\xd8 this is not a jpeg")
  with pytest.raises(ImageReadError, match=f"cannot read image {bad}"):
    folder_instance_set(root)
  with caplog.at_level(logging.WARNING):
    dataset, names, skipped = folder_instance_set(root, skip_unreadable=True)
  assert [path for path, _ in skipped] == [os.fspath(bad)]
  assert os.fspath(bad) not in dataset.images and len(dataset) == 6
  assert "skipped 1 of 7 images" in caplog.text and os.fspath(bad) in caplog.text
  # Unchecked, the broken file is listed (it fails later, when read).
  assert os.fspath(bad) in folder_instance_set(root, check_images=False).dataset.images


def test_truncated_jpeg_needs_a_full_decode(folder):
  root, _ = folder
  truncated = _truncated_jpeg(root / "c" / "cut.jpg")
  assert truncated in folder_instance_set(root).dataset.images  # verify reads headers only
  with pytest.raises(ImageReadError, match="cut.jpg"):
    folder_instance_set(root, check_images="decode")
  _, _, skipped = folder_instance_set(root, check_images="decode", skip_unreadable=True)
  assert [p for p, _ in skipped] == [truncated]
  with pytest.raises(ValueError, match="check_images must be"):
    folder_instance_set(root, check_images="fast")


def test_folder_layout_errors(tmp_path):
  with pytest.raises(ValueError, match="is not a folder"):
    folder_instance_set(tmp_path / "missing")
  _write(tmp_path / "loose.jpg")
  with pytest.raises(ValueError, match=r"holds image files directly \(\['loose.jpg'\]\)"):
    folder_instance_set(tmp_path)
  (tmp_path / "loose.jpg").unlink()
  (tmp_path / "a").mkdir()
  with pytest.raises(ValueError, match="has no instance subfolder with images"):
    folder_instance_set(tmp_path)


# --------------------------------------------------------------------------- CSV


def test_csv_instance_set(tmp_path):
  photos = tmp_path / "photos"
  a = _write(photos / "a.jpg")
  b = _write(photos / "b.png", size=(50, 60))
  c = _write(tmp_path / "elsewhere" / "c.png")
  csv_path = _write_csv(tmp_path / "train.csv", f"""
path,x0,instance_id,y0,x1,y1
photos/a.jpg,1,10,2,30.5,25
photos/b.png,,2,,,

{c},0,10,0,40,30
""")
  dataset, names, skipped = csv_instance_set(csv_path)
  assert names == ["2", "10"]  # integer ids sort numerically
  assert list(dataset.images) == [a, b, c] and dataset.cluster_ids.tolist() == [1, 0, 1]
  np.testing.assert_array_equal(dataset.boxes[[0, 2]], [[1, 2, 30.5, 25], [0, 0, 40, 30]])
  assert np.isnan(dataset.boxes[1]).all() and skipped == []
  # image_root replaces the CSV's folder for relative paths.
  moved = _write_csv(tmp_path / "sub" / "train.csv", "path,instance_id\na.jpg,x\nb.png,y\n")
  dataset, names, _ = csv_instance_set(moved, image_root=photos)
  assert list(dataset.images) == [a, b] and names == ["x", "y"] and dataset.boxes is None


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
  a = _write(tmp_path / "photos" / "a.jpg")
  _write_csv(tmp_path / "train.csv", "path,instance_id\nphotos/a.jpg,x")
  monkeypatch.chdir(tmp_path)
  for dataset in (csv_instance_set("train.csv").dataset, folder_instance_set(".").dataset):
    assert list(dataset.images) == [a]  # still valid after the working directory changes


@pytest.mark.parametrize("text, message", [
    ("path,label\na.jpg,1", r"line 1 \(header\): missing column\(s\) \['instance_id'\]; "
                            r"unknown column\(s\) \['label'\]"),
    ("path,instance_id,x0,y0\na.jpg,1,0,0", r"missing column\(s\) \['x1', 'y1'\]"),
    ("path,instance_id,path\na.jpg,1,a.jpg", r"repeated column\(s\) \['path'\]"),
    ("path,instance_id\na.jpg,1\na.jpg", r"line 3: 1 fields, but the header has 2"),
    ("path,instance_id\na.jpg,1\n\na.jpg, ", r"line 4, column 'instance_id': empty"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,0,abc,5", r"line 2, column 'x1': expected a number"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,0,,5", r"line 2, column 'x1': empty while other"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,0,10,inf", r"line 2, column 'y1': expected a finite"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,0,10,20\na.jpg,1,8,0,5,20",
     r"line 3, columns 'x0'/'x1': not a box; need 0 <= x0 < x1, got x0=8, x1=5"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,-1,10,20", r"line 2, columns 'y0'/'y1': not a box"),
    ("path,instance_id,x0,y0,x1,y1\na.jpg,1,0,0,41,20",
     r"line 2, column 'x1': 41 lies outside the 40x30 \(width x height\) image"),
    ("", r"is empty; it needs a header row"),
    ("path,instance_id", r"has a header but no rows"),
])
def test_csv_errors_name_the_file_line_and_column(tmp_path, text, message):
  _write(tmp_path / "a.jpg")
  csv_path = tmp_path / "bad.csv"
  csv_path.write_text(text)
  with pytest.raises(ValueError, match=message) as info:
    csv_instance_set(csv_path)
  assert str(csv_path) in str(info.value)


def test_csv_box_bounds_use_the_upright_size(tmp_path):
  # Stored 40x30 with EXIF orientation 6 (rotate 90): load_image returns 30 wide, 40 high.
  _write(tmp_path / "r.jpg", orientation=6)
  assert load_image(tmp_path / "r.jpg").shape == (40, 30, 3)
  ok = _write_csv(tmp_path / "ok.csv", "path,instance_id,x0,y0,x1,y1\nr.jpg,1,0,0,30,40")
  assert csv_instance_set(ok).dataset.boxes.tolist() == [[0, 0, 30, 40]]
  bad = _write_csv(tmp_path / "bad.csv", "path,instance_id,x0,y0,x1,y1\nr.jpg,1,0,0,35,20")
  with pytest.raises(ValueError, match=r"column 'x1': 35 lies outside the 30x40"):
    csv_instance_set(bad)


def test_csv_unreadable_images(tmp_path, caplog):
  _write(tmp_path / "a.jpg")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  csv_path = _write_csv(tmp_path / "t.csv", "path,instance_id\na.jpg,1\nbad.png,1\nmissing.jpg,2")
  with pytest.raises(ImageReadError, match=rf"{csv_path}, line 3: cannot read image .*bad.png"):
    csv_instance_set(csv_path)
  with caplog.at_level(logging.WARNING):
    dataset, names, skipped = csv_instance_set(csv_path, skip_unreadable=True)
  assert [os.path.basename(p) for p, _ in skipped] == ["bad.png", "missing.jpg"]
  assert len(dataset) == 1 and names == ["1"]  # instance 2 lost its only photo
  assert "skipped 2 of 3 images" in caplog.text


# --------------------------------------------------------------------------- test sets


def _brute_gnd(db_ids, q_ids, q_own):
  out = []
  for q_id, own in zip(q_ids, q_own):
    ok = [j for j in range(len(db_ids)) if db_ids[j] == q_id and j != own]
    out.append((ok, [own] if own >= 0 else []))
  return out


def _assert_gnd(test: RetrievalSet, want) -> None:
  assert test.gnd_kind == "ok_junk"
  assert [(g["ok"].tolist(), g["junk"].tolist()) for g in test.gnd] == want


def test_folder_retrieval_set_queries_per_instance(folder):
  root, _ = folder
  test, names, _ = folder_retrieval_set(root, queries_per_instance=2)
  db = list(folder_instance_set(root).dataset.images)
  assert list(test.database) == db and names == ["a", "b", "c"]
  ids = test.database_ids.tolist()
  assert ids == [0, 0, 0, 1, 1, 2]
  # The first 2 of every instance with >= 2 photos; "c" (one photo) has no query.
  assert test.query_db_indices.tolist() == [0, 1, 3, 4]
  assert list(test.queries) == [db[i] for i in (0, 1, 3, 4)]
  _assert_gnd(test, _brute_gnd(ids, [ids[i] for i in (0, 1, 3, 4)], [0, 1, 3, 4]))
  # Scored with descriptors that know the instance, every query is perfect.
  x = np.eye(3)[ids]
  q = x[test.query_db_indices]
  ranks = np.argsort(-(q @ x.T), axis=1, kind="stable")
  assert metrics.compute_map(ranks, test.gnd)[0] == pytest.approx(1.0)


def test_folder_retrieval_set_split_layout(tmp_path, caplog):
  root = tmp_path / "set"
  q = [_write(root / "queries" / "b" / "q1.jpg"), _write(root / "queries" / "d" / "q2.jpg")]
  db = [_write(root / "database" / "a" / "1.jpg"), _write(root / "database" / "b" / "1.jpg"),
        _write(root / "database" / "b" / "2.jpg")]
  with caplog.at_level(logging.WARNING):
    test, names, _ = folder_retrieval_set(root)
  assert names == ["a", "b", "d"] and list(test.queries) == q and list(test.database) == db
  assert test.database_ids.tolist() == [0, 1, 1] and test.query_db_indices is None
  _assert_gnd(test, [([1, 2], []), ([], [])])
  assert "1 of 2 queries have no other database image" in caplog.text
  with pytest.raises(ValueError, match="leave queries_per_instance None"):
    folder_retrieval_set(root, queries_per_instance=1)
  with pytest.raises(ValueError, match="pass queries_per_instance=n"):
    folder_retrieval_set(root / "database")


def test_csv_retrieval_set(tmp_path):
  for name in ("q.jpg", "d1.jpg", "d2.jpg", "d3.jpg", "both.jpg"):
    _write(tmp_path / name)
  csv_path = _write_csv(tmp_path / "test.csv", """
path,instance_id,role,x0,y0,x1,y1
q.jpg,bridge,query,1,2,20,25
d1.jpg,bridge,database,,,,
d2.jpg,tower,Database,,,,
both.jpg,bridge,both,,,,
d3.jpg,tower,database,,,,
d3.jpg,tower,query,0,0,10,10
""")
  test, names, _ = csv_retrieval_set(csv_path)
  assert names == ["bridge", "tower"]
  assert [os.path.basename(p) for p in test.database] == ["d1.jpg", "d2.jpg", "both.jpg",
                                                           "d3.jpg"]
  assert [os.path.basename(p) for p in test.queries] == ["q.jpg", "both.jpg", "d3.jpg"]
  db_ids = [0, 1, 0, 1]
  assert test.database_ids.tolist() == db_ids and test.query_db_indices is None
  _assert_gnd(test, _brute_gnd(db_ids, [0, 0, 1], [-1, 2, 3]))
  np.testing.assert_array_equal(test.query_boxes[[0, 2]], [[1, 2, 20, 25], [0, 0, 10, 10]])
  assert np.isnan(test.query_boxes[1]).all()


@pytest.mark.parametrize("rows, message", [
    ("a.jpg,1,query,,,,\na.jpg,1,datbase,,,,", r"line 3, column 'role': expected one of"),
    ("a.jpg,1,query,,,,\nb.jpg,1,database,0,0,5,5", r"line 3, columns .*role is 'database'"),
    ("a.jpg,1,query,,,,\nb.jpg,1,database,,,,\nb.jpg,1,both,,,,",
     r"line 4: database image .*b.jpg is already listed on line 3"),
    ("a.jpg,1,query,,,,\na.jpg,2,database,,,,", r"line 2: query image .* has instance_id '1' "
                                                r"but its database row \(line 3\) says '2'"),
    ("a.jpg,1,query,,,,", r"needs at least one query and one database row"),
])
def test_csv_retrieval_errors(tmp_path, rows, message):
  _write(tmp_path / "a.jpg")
  _write(tmp_path / "b.jpg")
  csv_path = _write_csv(tmp_path / "t.csv", "path,instance_id,role,x0,y0,x1,y1\n" + rows)
  with pytest.raises(ValueError, match=message):
    csv_retrieval_set(csv_path)
  no_role = _write_csv(tmp_path / "n.csv", "path,instance_id\na.jpg,1")
  with pytest.raises(ValueError, match=r"missing column\(s\) \['role'\]"):
    csv_retrieval_set(no_role)
