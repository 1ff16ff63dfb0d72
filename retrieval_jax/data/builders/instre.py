"""INSTRE with the Iscen et al. protocol (``gnd_instre.mat``: 1250 queries, 27293 database images).

Manual layout::

  <manual_dir>/instre/gnd_instre.mat
  <manual_dir>/instre/INSTRE-S1/<class>/<image>.jpg   instre.tar.gz extracted
  <manual_dir>/instre/INSTRE-S2/<class>/<image>.jpg
  <manual_dir>/instre/INSTRE-M/<class>/<image>.jpg

``gnd_instre.mat`` (MATLAB) holds ``imlist`` and ``qimlist`` (cell arrays of paths relative to
``instre/``) and ``gnd``, a struct array with, per query, the positives (1-based indices into
``imlist``; the first field) and the query box ``bbx`` (the second field; x0, y0, x1, y1 in
pixels). Queries are not database images. There is no junk list, so ``junk`` is empty, and
database ``instance_id`` is -1: INSTRE-M images show two objects, so the folder is no label.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError, QuerySpec

GND_KEYS = ("ok", "junk")
IRISA = "ftp://ftp.irisa.fr/local/texmex/corpus/instre"

_CITATION = """@article{wang2015instre,
  title={{INSTRE}: a new benchmark for instance-level object retrieval and recognition},
  author={Wang, Shuang and Jiang, Shuqiang}, journal={ACM TOMM}, year={2015}}
@inproceedings{iscen2017efficient,
  title={Efficient diffusion on region manifolds: Recovering small objects with compact {CNN}
         representations},
  author={Iscen, Ahmet and Tolias, Giorgos and Avrithis, Yannis and Furon, Teddy and
          Chum, Ond{\\v{r}}ej}, booktitle={CVPR}, year={2017}}"""


def _names(mat: dict, key: str, path: str) -> list[str]:
  if key not in mat:
    raise ManualDataError(f"{path}: missing variable {key!r}.")
  try:
    return [str(np.asarray(cell).reshape(-1)[0]) for cell in np.asarray(mat[key]).reshape(-1)]
  except (IndexError, TypeError, ValueError) as err:
    raise ManualDataError(f"{path}: {key!r} must be a cell array of image paths.") from err


def parse_instre_gnd(mat: dict[str, Any], path: str) -> tuple[list[str], list[str], list[dict]]:
  """Validates a loaded ``gnd_instre.mat``.

  Returns:
    ``(imlist, qimlist, gnd)`` with 0-based int64 ``ok`` and float32 ``bbx`` per query.

  Raises:
    ManualDataError: a missing variable, a wrong count, a bad index list or box, naming the query.
  """
  imlist, qimlist = _names(mat, "imlist", path), _names(mat, "qimlist", path)
  if "gnd" not in mat:
    raise ManualDataError(f"{path}: missing variable 'gnd'.")
  entries = np.asarray(mat["gnd"]).reshape(-1)
  if len(entries) != len(qimlist):
    raise ManualDataError(f"{path}: 'gnd' has {len(entries)} entries for {len(qimlist)} "
                          f"queries.")
  gnd = []
  for i, entry in enumerate(entries):
    where = f"{path}: gnd[{i}] (query {qimlist[i]!r})"
    if entry.dtype.names is None or len(entry.dtype.names) < 2:
      raise ManualDataError(f"{where} must be a struct with the positives and 'bbx'.")
    gnd.append({"ok": _base.index_list(entry[0], f"{where} positives", len(imlist),
                                       one_based=True),
                "junk": np.zeros(0, np.int64),
                "bbx": _base.check_box(entry[1], f"{where} bbx")})
  return imlist, qimlist, gnd


class Instre(_base.ManualBenchmarkBuilder):
  """INSTRE: config ``iscen`` (the ``gnd_instre.mat`` split of Iscen et al., CVPR 2017)."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="iscen", variant="iscen",
                   description="1250 queries with boxes, 27293 database images."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into the manual directory:
    instre/gnd_instre.mat      from {IRISA}/gnd_instre.mat
    instre/INSTRE-S1/, INSTRE-S2/, INSTRE-M/
                               {IRISA}/instre.tar.gz extracted into instre/
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._retrieval_info(
        GND_KEYS, "INSTRE instance retrieval benchmark, Iscen et al. query/database split.",
        "http://123.57.42.89/dataset-instre.html", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    from scipy.io import loadmat  # only this builder reads MATLAB files

    root = self._manual_root(dl_manager)
    gnd_rel = os.path.join("instre", "gnd_instre.mat")
    self._require(root, [gnd_rel])
    path = os.path.join(root, gnd_rel)
    try:
      mat = loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
      raise ManualDataError(f"cannot read MATLAB file {path}: {err}") from err
    imlist, qimlist, gnd = parse_instre_gnd(mat, path)
    base = os.path.join(root, "instre")
    position = {s: i for i, s in enumerate(imlist)}
    queries = [QuerySpec(image_id=q, image=ImageRef(os.path.join(base, q)), gnd=g, box=g["bbx"],
                         db_index=position.get(q, -1)) for q, g in zip(qimlist, gnd)]
    return self._retrieval_splits(root, imlist, [ImageRef(os.path.join(base, s)) for s in imlist],
                                  None, queries, GND_KEYS)
