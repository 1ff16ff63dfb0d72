"""Tiny fake benchmark trees in the official layouts, with real JPEG files written by Pillow.

Each ``make_*`` writes a manual directory under ``root`` the way the official archives (and
revisitop's / cirtorch's download scripts) lay it out, and returns what a test needs to check the
prepared dataset against: names in source order and the expected ground truth.
"""

from __future__ import annotations

import csv
import os
import pickle

import numpy as np
from PIL import Image

SIZE = (40, 30)  # width, height


def write_jpeg(path: str, seed: int, size: tuple[int, int] = SIZE, mode: str = "RGB") -> None:
  """Writes a small JPEG whose content depends on ``seed`` (smooth, so it compresses well)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  w, h = size
  y, x = np.mgrid[0:h, 0:w]
  rgb = np.stack([(x * 6 + seed * 37) % 256, (y * 8 + seed * 71) % 256,
                  np.full_like(x, (seed * 53) % 256)], axis=-1).astype(np.uint8)
  Image.fromarray(rgb).convert(mode).save(path, format="JPEG", quality=90)


def corrupt(path: str) -> None:
  """Truncates an image file so it no longer decodes."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 3])


def _pickle(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def make_revisited(root: str, name: str = "roxford5k") -> dict:
  """revisitop ``<name>/gnd_<name>.pkl`` + ``<name>/jpg``: 6 database images, 2 queries."""
  imlist = [f"all_souls_{i:06d}" for i in range(6)]
  qimlist = ["all_souls_q00001", "bodleian_q00002"]
  gnd = [{"bbx": [1.5, 2.0, 30.0, 25.5], "easy": [0, 2], "hard": [4], "junk": [5]},
         {"bbx": [0.0, 0.0, 39.0, 29.0], "easy": [1], "hard": [], "junk": [3, 0]}]
  for i, s in enumerate(imlist + qimlist):
    write_jpeg(os.path.join(root, name, "jpg", s + ".jpg"), seed=i)
  data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
  _pickle(os.path.join(root, name, f"gnd_{name}.pkl"), data)
  return data


def make_r1m(root: str, n: int = 3) -> list[str]:
  """``revisitop1m/revisitop1m.txt`` + ``revisitop1m/jpg/<line>`` (nested paths)."""
  names = [f"{i}/{i}a/r1m_{i:04d}.jpg" for i in range(n)]
  for i, s in enumerate(names):
    write_jpeg(os.path.join(root, "revisitop1m", "jpg", s), seed=100 + i)
  with open(os.path.join(root, "revisitop1m", "revisitop1m.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  return names


def make_original(root: str, name: str = "oxford5k") -> dict:
  """Original Oxford5k (``gt_files_170407``) or Paris6k (``paris_120310``, nested jpg folders)."""
  if name == "oxford5k":
    names = [f"all_souls_{i:06d}" for i in range(3)] + [f"ashmolean_{i:06d}" for i in range(3)]
    gt_dir, prefix, sub = "gt_files_170407", "oxc1_", lambda s: ""
  else:
    names = [f"paris_defense_{i:06d}" for i in range(3)] + [f"paris_louvre_{i:06d}"
                                                            for i in range(3)]
    gt_dir, prefix, sub = "paris_120310", "", lambda s: os.path.join("paris", s.split("_")[1])
  for i, s in enumerate(names):
    write_jpeg(os.path.join(root, name, "jpg", sub(s), s + ".jpg"), seed=200 + i)
  landmark = (lambda s: s.rsplit("_", 1)[0])
  lists = {  # query file stem -> (query image, box, good, ok, junk)
      f"{landmark(names[0])}_1": (names[0], (1.0, 2.0, 20.0, 22.0), [names[1]], [names[2]], []),
      f"{landmark(names[3])}_1": (names[4], (0.0, 0.5, 35.5, 28.0), [names[3], names[5]], [],
                                  [names[0]]),
  }
  gt = os.path.join(root, name, gt_dir)
  os.makedirs(gt, exist_ok=True)
  for stem, (query, box, good, ok, junk) in lists.items():
    with open(os.path.join(gt, f"{stem}_query.txt"), "w") as f:
      f.write(f"{prefix}{query} " + " ".join(str(v) for v in box) + "\n")
    for kind, members in (("good", good), ("ok", ok), ("junk", junk)):
      with open(os.path.join(gt, f"{stem}_{kind}.txt"), "w") as f:
        f.write("".join(m + "\n" for m in members))
  order = sorted(lists)
  return {"imlist": sorted(names),
          "queries": [(lists[s][0], lists[s][1]) for s in order],
          "gnd": [{k: sorted(sorted(names).index(m) for m in members)
                   for k, members in zip(("good", "ok", "junk"), lists[s][2:])} for s in order]}


def make_holidays(root: str, with_rotations: bool = True) -> list[str]:
  """``holidays/jpg/<6 digits>.jpg``: groups 1000 (3 images) and 1001 (2), plus rotations.txt."""
  names = ["100000", "100001", "100002", "100100", "100101"]
  for i, s in enumerate(names):
    write_jpeg(os.path.join(root, "holidays", "jpg", s + ".jpg"), seed=300 + i)
  if with_rotations:
    with open(os.path.join(root, "holidays", "rotations.txt"), "w") as f:
      f.write("# name clockwise-degrees\n100001.jpg 90\n100101 180\n")
  return names


def make_ukbench(root: str, n_groups: int = 2) -> list[str]:
  """``ukbench/full/ukbench%05d.jpg``, groups of 4 consecutive images."""
  names = [f"ukbench{i:05d}" for i in range(4 * n_groups)]
  for i, s in enumerate(names):
    write_jpeg(os.path.join(root, "ukbench", "full", s + ".jpg"), seed=400 + i)
  return names


def make_instre(root: str) -> dict:
  """``instre/gnd_instre.mat`` (Iscen et al.: 1-based ``ok``, ``bbx``) + ``INSTRE-*`` folders."""
  from scipy.io import savemat
  imlist = ["INSTRE-S1/01a_canada_book/001.jpg", "INSTRE-S1/01a_canada_book/002.jpg",
            "INSTRE-S2/01_bike/001.jpg", "INSTRE-M/01_book_bag/001.jpg"]
  qimlist = ["INSTRE-S1/01a_canada_book/003.jpg", "INSTRE-S2/01_bike/002.jpg"]
  ok = [[1, 2, 4], [3]]  # 1-based, as MATLAB writes them
  bbx = [[2.0, 3.0, 30.0, 25.0], [0.0, 1.0, 39.0, 28.0]]
  for i, s in enumerate(imlist + qimlist):
    write_jpeg(os.path.join(root, "instre", s), seed=500 + i)
  cells = lambda names: np.array([[np.array([s]) for s in names]], dtype=object).reshape(1, -1)
  gnd = np.zeros((1, len(qimlist)), dtype=[("ok", object), ("bbx", object)])
  for i in range(len(qimlist)):
    gnd[0, i] = (np.array([ok[i]], dtype=np.float64), np.array([bbx[i]]))
  savemat(os.path.join(root, "instre", "gnd_instre.mat"),
          {"imlist": cells(imlist), "qimlist": cells(qimlist), "gnd": gnd})
  return {"imlist": imlist, "qimlist": qimlist, "ok": [[i - 1 for i in o] for o in ok],
          "bbx": bbx}


def sfm_path(root: str, cid: str) -> str:
  """cirtorch ``cid2filename``: ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``."""
  return os.path.join(root, "train", "retrieval-SfM-120k", "ims", cid[-2:], cid[-4:-2],
                      cid[-6:-4], cid)


def make_sfm(root: str) -> dict:
  """``train/retrieval-SfM-120k/retrieval-SfM-120k.pkl`` + ``ims`` (cids without extension)."""
  db = {}
  for split, n in (("train", 5), ("val", 3)):
    cids = [f"{split}{i:02d}deadbeef{i:06x}" for i in range(n)]
    for i, cid in enumerate(cids):
      write_jpeg(sfm_path(root, cid), seed=600 + 10 * (split == "val") + i)
    cluster = [i // 2 for i in range(n)]
    pairs = [(0, 1), (2, 3), (1, 0)] if split == "train" else [(0, 1), (2, 0)]
    db[split] = {"cids": cids, "cluster": cluster, "qidxs": [q for q, _ in pairs],
                 "pidxs": [p for _, p in pairs]}
  _pickle(os.path.join(root, "train", "retrieval-SfM-120k", "retrieval-SfM-120k.pkl"), db)
  return db


def gldv2_path(root: str, image_id: str) -> str:
  """GLDv2 ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
  return os.path.join(root, "train", image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def make_gldv2(root: str) -> list[tuple[int, list[str]]]:
  """``train_clean.csv`` (``landmark_id,images``) + ``train/a/b/c/<id>.jpg``."""
  rows = [(7, ["abc0000000000001", "abd0000000000002"]), (42, ["f000000000000003"]),
          (3, ["0120000000000004", "0130000000000005", "0140000000000006"])]
  seed = 700
  for _, ids in rows:
    for image_id in ids:
      write_jpeg(gldv2_path(root, image_id), seed=seed)
      seed += 1
  with open(os.path.join(root, "train_clean.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["landmark_id", "images"])
    for landmark, ids in rows:
      writer.writerow([landmark, " ".join(ids)])
  return rows


def prepare(name: str, config: str, data_dir: str, manual_dir: str):
  """Builds ``name/config`` from ``manual_dir`` into ``data_dir`` and returns a fresh builder.

  The fresh builder re-reads everything from disk (info, metadata), as a user's later session
  would.
  """
  import tensorflow_datasets as tfds
  tfds.builder(name, data_dir=data_dir, config=config).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return tfds.builder(name, data_dir=data_dir, config=config)


def stored_ids(builder, split: str) -> list[str]:
  """The ``image_id`` of every example of a split, in stored order."""
  source = builder.as_data_source(split)
  return [source[i]["image_id"].decode() if isinstance(source[i]["image_id"], bytes)
          else source[i]["image_id"] for i in range(len(source))]
