"""Google Landmarks Dataset v2, the cleaned training set (``train_clean.csv``).

Manual layout (the official metadata and image tars extracted side by side)::

  <manual_dir>/train_clean.csv                      columns ``landmark_id,images``
  <manual_dir>/train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg   images_000.tar ... images_499.tar

Each CSV row lists a landmark's images as space-separated ids. The ``train`` split keeps the CSV
order (rows, then ids within a row), with ``cluster_id`` = ``landmark_id`` and no boxes. Images
missing from a partial download are unreadable: use the ``clean_skip_unreadable`` config to
leave them out (they are counted in ``info.metadata``).
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError

S3 = "https://s3.amazonaws.com/google-landmark"

_CITATION = """@inproceedings{weyand2020google,
  title={Google Landmarks Dataset v2 -- A Large-Scale Benchmark for Instance-Level Recognition
         and Retrieval},
  author={Weyand, Tobias and Araujo, Andre and Cao, Bingyi and Sim, Jack},
  booktitle={CVPR}, year={2020}}"""


def gldv2_filename(image_id: str, train_root: str) -> str:
  """The image path of an id: ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
  return os.path.join(train_root, image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def read_clean_csv(path: str) -> tuple[list[str], list[int]]:
  """Reads ``train_clean.csv`` into image ids and their landmark ids, in file order.

  Raises:
    ManualDataError: a wrong header, a non-integer landmark id, a row without images.
  """
  ids, landmarks = [], []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != ["landmark_id", "images"]:
      raise ManualDataError(f"{path}: expected the header 'landmark_id,images'; got {header}.")
    for number, row in enumerate(reader, 2):
      if not row:
        continue
      if len(row) != 2 or not row[0].strip().isdigit() or not row[1].split():
        raise ManualDataError(f"{path}:{number}: expected '<landmark_id>,<id> <id> ...'; got "
                              f"{row!r}.")
      for image_id in row[1].split():
        if len(image_id) < 3:
          raise ManualDataError(f"{path}:{number}: image id {image_id!r} is too short.")
        ids.append(image_id)
        landmarks.append(int(row[0]))
  return ids, landmarks


class GoogleLandmarksV2(_base.ManualBenchmarkBuilder):
  """GLDv2: config ``clean`` (train_clean.csv, 1,580,470 images of 81,313 landmarks)."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="clean", variant="clean", description="The cleaned training set."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into the manual directory:
    train_clean.csv   from {S3}/metadata/train_clean.csv
    train/            {S3}/train/images_000.tar ... images_499.tar extracted into train/
                      (md5 sums: {S3}/md5sum/train/md5.images_000.txt ... _499.txt)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._training_info(
        "Google Landmarks v2 cleaned training images, cluster_id = landmark_id.",
        "https://github.com/cvdfoundation/google-landmark", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    self._require(root, ["train_clean.csv", "train"])
    ids, landmarks = read_clean_csv(os.path.join(root, "train_clean.csv"))
    train_root = os.path.join(root, "train")
    images = [ImageRef(gldv2_filename(i, train_root)) for i in ids]
    return {"train": self._training_split(root, "train", ids, images, landmarks)}
