"""INRIA Holidays, as distributed or with the sideways photos turned upright.

Manual layout::

  <manual_dir>/holidays/jpg/<6 digits>.jpg     jpg1.tar.gz + jpg2.tar.gz extracted (1491 images)
  <manual_dir>/holidays/rotations.txt          only for the ``rotated`` config (see below)

Images whose names share the first four digits show one scene; ``xxxx00.jpg`` is the scene's
query (500 queries). Every image, queries included, is in the database (sorted by name), so each
query has ``query_db_index`` and its ground truth is ``ok`` = the rest of its scene, ``junk`` = the
query itself (the standard protocol: the query is removed from its own ranking).

The ``rotated`` config applies the usual manual fix for the photos stored sideways (Holidays
predates EXIF-aware viewers). The exact list used in the literature is not published with the
dataset, so the builder reads it from ``rotations.txt``: one ``<image name> <degrees>`` per line,
with the name with or without ``.jpg`` and ``degrees`` in {0, 90, 180, 270}, the clockwise turn
that makes the photo upright; ``#`` starts a comment. Rotated images are stored as lossless PNG.
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError

GND_KEYS = ("ok", "junk")
_NAME = re.compile(r"^\d{6}$")

_CITATION = """@inproceedings{jegou2008hamming,
  title={Hamming embedding and weak geometric consistency for large scale image search},
  author={J{\\'e}gou, Herv{\\'e} and Douze, Matthijs and Schmid, Cordelia},
  booktitle={ECCV}, year={2008}}"""


def read_rotations(path: str, names: set[str]) -> dict[str, int]:
  """Parses ``rotations.txt`` (module docstring) into ``{image name: clockwise degrees}``.

  Raises:
    ManualDataError: a malformed line, an angle not in {0, 90, 180, 270}, an unknown image.
  """
  rotations = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      parts = line.split()
      name = parts[0][:-4] if parts[0].lower().endswith(".jpg") else parts[0]
      if len(parts) != 2 or parts[1] not in ("0", "90", "180", "270"):
        raise ManualDataError(f"{path}:{number}: expected '<image name> <0|90|180|270>'; got "
                              f"{line!r}.")
      if name not in names:
        raise ManualDataError(f"{path}:{number}: image {name!r} is not in the jpg folder.")
      rotations[name] = int(parts[1])
  return rotations


class InriaHolidays(_base.ManualBenchmarkBuilder):
  """INRIA Holidays: configs ``original`` and ``rotated`` (manual rotation fix applied)."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="original", variant="original",
                   description="The images as distributed."),
      ManualConfig(name="rotated", variant="rotated",
                   description="Sideways images turned upright per holidays/rotations.txt."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into the manual directory:
    holidays/jpg/*.jpg         ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz and
                               ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz extracted
                               (see https://lear.inrialpes.fr/people/jegou/data.php)
    holidays/rotations.txt     for the `rotated` config only: lines '<image name> <degrees>',
                               the clockwise turn (90, 180 or 270) making each photo upright
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._retrieval_info(
        GND_KEYS, "INRIA Holidays: 1491 personal holiday photos in 500 scenes, one query per "
        "scene.", "https://lear.inrialpes.fr/people/jegou/data.php", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    rotated = self.builder_config.variant == "rotated"
    required = [os.path.join("holidays", "jpg")]
    if rotated:
      required.append(os.path.join("holidays", "rotations.txt"))
    self._require(root, required)
    jpg = os.path.join(root, "holidays", "jpg")
    files = sorted(f for f in os.listdir(jpg) if f.lower().endswith(".jpg"))
    names = [f[:-4] for f in files]
    bad = [f for f, s in zip(files, names) if not _NAME.match(s)]
    if bad:
      raise ManualDataError(f"{jpg}: Holidays images are named <6 digits>.jpg; got {bad[:3]}.")
    if not names:
      raise ManualDataError(f"{self._what}: no .jpg in {jpg}.\n"
                            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    rotations = (read_rotations(os.path.join(root, "holidays", "rotations.txt"), set(names))
                 if rotated else {})
    images = [ImageRef(os.path.join(jpg, f), rotations.get(s, 0)) for f, s in zip(files, names)]
    groups = [int(s[:4]) for s in names]
    queries = _base.group_queries(names, images, groups,
                                  [i for i, s in enumerate(names) if s.endswith("00")])
    return self._retrieval_splits(root, names, images, groups, queries, GND_KEYS)
