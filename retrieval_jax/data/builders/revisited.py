"""Revisited Oxford5k / Paris6k (revisitop) and the R1M distractors, from a manual directory.

Manual layout (as revisitop's ``python/download.py`` leaves ``data/datasets``)::

  <manual_dir>/roxford5k/gnd_roxford5k.pkl
  <manual_dir>/roxford5k/jpg/<imlist[i]>.jpg        (and the queries, <qimlist[i]>.jpg)
  <manual_dir>/rparis6k/gnd_rparis6k.pkl
  <manual_dir>/rparis6k/jpg/<name>.jpg              (flat: the paris_*.tgz folders merged)
  <manual_dir>/revisitop1m/revisitop1m.txt          (one relative image path per line)
  <manual_dir>/revisitop1m/jpg/<line>               (the 100 revisitop1m.N.tar.gz extracted)

The ground-truth pickle is a dict with ``imlist`` (database names without extension),
``qimlist`` (query names) and ``gnd``: one dict per query with ``easy``, ``hard``, ``junk``
(0-based database indices) and ``bbx`` (x0, y0, x1, y1 in pixels). Queries are not database
images, so ``query_db_index`` is -1 unless a query name also appears in ``imlist``.

R1M is a separate builder, ``revisitop1m``, with only a ``database`` split; add it to either
benchmark with ``loading.tfds_retrieval_set(..., distractors=...)`` (one copy on disk serves
both, where a ``roxford5k+1m`` config would store the million images twice).
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError, QuerySpec

GND_KEYS = ("easy", "hard", "junk")
REVISITOP_DATA = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
R1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"

_CITATION = """@inproceedings{radenovic2018revisiting,
  title={Revisiting {O}xford and {P}aris: Large-Scale Image Retrieval Benchmarking},
  author={Radenovi{\\'c}, Filip and Iscen, Ahmet and Tolias, Giorgos and Avrithis, Yannis and
          Chum, Ond{\\v{r}}ej},
  booktitle={CVPR}, year={2018}}"""


def parse_revisitop_gnd(data: Any, path: str) -> tuple[list[str], list[str], list[dict]]:
  """Validates a revisitop ``gnd_*.pkl`` dict.

  Args:
    data: the unpickled object.
    path: the pickle's path, for messages.

  Returns:
    ``(imlist, qimlist, gnd)`` with gnd dicts of int64 ``easy``/``hard``/``junk`` and a float32
    ``bbx``.

  Raises:
    ManualDataError: a missing key, a query dict without a list or box, an index out of range.
  """
  if not isinstance(data, dict):
    raise ManualDataError(f"{path}: expected a dict with 'imlist', 'qimlist' and 'gnd'; got "
                          f"{type(data).__name__}.")
  for key in ("imlist", "qimlist", "gnd"):
    if key not in data:
      raise ManualDataError(f"{path}: missing key {key!r} (found {sorted(data)}).")
  imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
  for key, names in (("imlist", imlist), ("qimlist", qimlist)):
    if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names):
      raise ManualDataError(f"{path}: {key!r} must be a list of image names (str).")
  if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
    raise ManualDataError(f"{path}: 'gnd' must be a list with one dict per query "
                          f"({len(qimlist)}); got {type(gnd).__name__} of length "
                          f"{len(gnd) if hasattr(gnd, '__len__') else '?'}.")
  n, parsed = len(imlist), []
  for i, entry in enumerate(gnd):
    where = f"{path}: gnd[{i}] (query {qimlist[i]!r})"
    if not isinstance(entry, dict):
      raise ManualDataError(f"{where} must be a dict; got {type(entry).__name__}.")
    clean = {}
    for key in (*GND_KEYS, "bbx"):
      if key not in entry:
        raise ManualDataError(f"{where} has no {key!r} (a revisited ground truth needs "
                              f"{GND_KEYS} and 'bbx').")
    for key in GND_KEYS:
      clean[key] = _base.index_list(entry[key], f"{where}[{key!r}]", n)
    clean["bbx"] = _base.check_box(entry["bbx"], f"{where}['bbx']")
    parsed.append(clean)
  return list(imlist), list(qimlist), parsed


class RevisitedLandmarks(_base.ManualBenchmarkBuilder):
  """Revisited Oxford5k and Paris6k: configs ``roxford5k`` and ``rparis6k``."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="roxford5k", variant="roxford5k",
                   description="Revisited Oxford5k: 4993 database images, 70 queries."),
      ManualConfig(name="rparis6k", variant="rparis6k",
                   description="Revisited Paris6k: 6322 database images, 70 queries."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into the manual directory (one folder per config):
    roxford5k/gnd_roxford5k.pkl   from {REVISITOP_DATA}/roxford5k/gnd_roxford5k.pkl
    roxford5k/jpg/*.jpg           the images of oxbuild_images.tgz from
                                  https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/
    rparis6k/gnd_rparis6k.pkl     from {REVISITOP_DATA}/rparis6k/gnd_rparis6k.pkl
    rparis6k/jpg/*.jpg            the images of paris_1.tgz and paris_2.tgz from
                                  https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/
                                  moved into one flat folder
  (revisitop's python/download.py produces exactly this under data/datasets/.)
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._retrieval_info(
        GND_KEYS, "Revisited Oxford and Paris landmark retrieval benchmarks (easy/hard/junk "
        "ground truth, query boxes).", "http://cmp.felk.cvut.cz/revisitop/", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    name = self.builder_config.variant
    gnd_rel = os.path.join(name, f"gnd_{name}.pkl")
    self._require(root, [gnd_rel, os.path.join(name, "jpg")])
    gnd_path = os.path.join(root, gnd_rel)
    imlist, qimlist, gnd = parse_revisitop_gnd(_base.load_pickle(gnd_path), gnd_path)
    jpg = os.path.join(root, name, "jpg")
    position = {image_id: i for i, image_id in enumerate(imlist)}
    queries = [QuerySpec(image_id=q, image=ImageRef(os.path.join(jpg, q + ".jpg")), gnd=g,
                         box=g["bbx"], db_index=position.get(q, -1))
               for q, g in zip(qimlist, gnd)]
    return self._retrieval_splits(
        root, imlist, [ImageRef(os.path.join(jpg, s + ".jpg")) for s in imlist], None,
        queries, GND_KEYS)


class Revisitop1m(_base.ManualBenchmarkBuilder):
  """The revisitop 1M distractors (R1M): a ``database`` split only, instance_id -1."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="r1m", variant="revisitop1m",
                   description="1,001,001 distractor images of revisitop1m.txt."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into the manual directory:
    revisitop1m/revisitop1m.txt   from {R1M_URL}/revisitop1m.txt
    revisitop1m/jpg/...           revisitop1m.1.tar.gz ... revisitop1m.100.tar.gz from
                                  {R1M_URL}/jpg/ extracted there (paths as listed in the .txt)
  (revisitop's python/download.py download_distractors produces exactly this.)
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    # The revisited keys, so the distractor rows share the benchmarks' feature dict.
    return self._retrieval_info(
        GND_KEYS, "Revisitop 1M distractors for ROxford5k/RParis6k (database split only).",
        "http://cmp.felk.cvut.cz/revisitop/", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    list_rel = os.path.join("revisitop1m", "revisitop1m.txt")
    self._require(root, [list_rel, os.path.join("revisitop1m", "jpg")])
    names = _base.read_lines(os.path.join(root, list_rel))
    jpg = os.path.join(root, "revisitop1m", "jpg")
    return self._retrieval_splits(root, names, [ImageRef(os.path.join(jpg, s)) for s in names],
                                  None, None, GND_KEYS)
