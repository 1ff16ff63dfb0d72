"""retrieval-SfM-120k / -30k (Radenovic et al.): the cirtorch training sets.

Manual layout (as cirtorch's ``download_train`` leaves ``<data_root>/train``)::

  <manual_dir>/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl
  <manual_dir>/train/retrieval-SfM-120k/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>
  <manual_dir>/train/retrieval-SfM-30k/retrieval-SfM-30k.pkl   (30k config; its images are the
                                                               120k ``ims`` folder, as cirtorch
                                                               links them, unless it has its own)

The pickle is ``{"train": db, "val": db}`` with ``db`` a dict of ``cids`` (image names, no
extension), ``cluster`` (3D-model id per image), and the equally long ``qidxs``/``pidxs`` (query
and positive image indices into ``cids``); an optional ``bbxs`` (None or x0, y0, x1, y1 per image)
is kept as ``box``.

Splits ``train`` and ``val`` hold the images (``cluster_id`` = ``cluster``). TFDS allows one
feature dict per dataset, so the pairs cannot be a split of their own: they are stored, in
``qidxs`` order, as ``info.metadata["positive_pairs"][split] = {"query_index": [...],
"positive_index": [...]}`` (indices into the split) and ``loading.tfds_instance_set`` returns them
as ``positive_pairs``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError

CIRTORCH_TRAIN = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train"
_DB_KEYS = ("cids", "cluster", "qidxs", "pidxs")

_CITATION = """@article{radenovic2018fine,
  title={Fine-tuning {CNN} image retrieval with no human annotation},
  author={Radenovi{\\'c}, Filip and Tolias, Giorgos and Chum, Ond{\\v{r}}ej},
  journal={TPAMI}, year={2018}}"""


def cid2filename(cid: str, ims_root: str) -> str:
  """cirtorch's image path of a cid: ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``."""
  return os.path.join(ims_root, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def parse_sfm_db(data: Any, path: str, split: str) -> dict[str, Any]:
  """Validates one split of the retrieval-SfM pickle.

  Returns:
    ``{"cids": list[str], "cluster": int64 [N], "pairs": int64 [P, 2], "bbxs": list | None}``.

  Raises:
    ManualDataError: a missing split or key, mismatched lengths, an index out of range.
  """
  if not isinstance(data, dict) or split not in data:
    found = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise ManualDataError(f"{path}: missing split {split!r} (found {found}).")
  db = data[split]
  if not isinstance(db, dict):
    raise ManualDataError(f"{path}: [{split!r}] must be a dict; got {type(db).__name__}.")
  for key in _DB_KEYS:
    if key not in db:
      raise ManualDataError(f"{path}: [{split!r}] has no {key!r} (needs {_DB_KEYS}).")
  cids = db["cids"]
  if not isinstance(cids, (list, tuple)) or not all(isinstance(c, str) and len(c) >= 6
                                                    for c in cids):
    raise ManualDataError(f"{path}: [{split!r}]['cids'] must be a list of image names (str of "
                          f">= 6 characters).")
  n = len(cids)
  cluster = _base.index_list(db["cluster"], f"{path}: [{split!r}]['cluster']", 2**62)
  if len(cluster) != n:
    raise ManualDataError(f"{path}: [{split!r}]['cluster'] has {len(cluster)} entries for {n} "
                          f"cids.")
  q = _base.index_list(db["qidxs"], f"{path}: [{split!r}]['qidxs']", n)
  p = _base.index_list(db["pidxs"], f"{path}: [{split!r}]['pidxs']", n)
  if len(q) != len(p):
    raise ManualDataError(f"{path}: [{split!r}] has {len(q)} qidxs but {len(p)} pidxs.")
  bbxs = db.get("bbxs")
  if bbxs is not None:
    if len(bbxs) != n:
      raise ManualDataError(f"{path}: [{split!r}]['bbxs'] has {len(bbxs)} entries for {n} cids.")
    bbxs = [None if b is None else _base.check_box(b, f"{path}: [{split!r}]['bbxs'][{i}]")
            for i, b in enumerate(bbxs)]
  return {"cids": list(cids), "cluster": cluster, "pairs": np.stack([q, p], axis=1),
          "bbxs": bbxs}


class RetrievalSfm(_base.ManualBenchmarkBuilder):
  """retrieval-SfM training sets: configs ``sfm120k`` and ``sfm30k``; splits train, val."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="sfm120k", variant="retrieval-SfM-120k",
                   description="retrieval-SfM-120k: 551 3D models (train), 162 (val)."),
      ManualConfig(name="sfm30k", variant="retrieval-SfM-30k",
                   description="retrieval-SfM-30k, the smaller cirtorch training set."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into the manual directory:
    train/retrieval-SfM-120k/retrieval-SfM-120k.pkl
        from {CIRTORCH_TRAIN}/dbs/retrieval-SfM-120k.pkl
    train/retrieval-SfM-120k/ims/
        {CIRTORCH_TRAIN}/ims/ims.tar.gz extracted there
    train/retrieval-SfM-30k/retrieval-SfM-30k.pkl   (sfm30k config; it uses the 120k ims/)
        from {CIRTORCH_TRAIN}/dbs/retrieval-SfM-30k.pkl
  (cirtorch's utils/download.py download_train produces exactly this under <data_root>/train.)
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._training_info(
        "retrieval-SfM training images grouped by 3D model (cluster_id), with the "
        "query/positive pairs in metadata['positive_pairs'].",
        "http://cmp.felk.cvut.cz/cnnimageretrieval/", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    name = self.builder_config.variant
    pkl_rel = os.path.join("train", name, f"{name}.pkl")
    ims_rel = os.path.join("train", name, "ims")
    if not os.path.isdir(os.path.join(root, ims_rel)):
      ims_rel = os.path.join("train", "retrieval-SfM-120k", "ims")  # cirtorch shares it
    self._require(root, [pkl_rel, ims_rel])
    path = os.path.join(root, pkl_rel)
    data = _base.load_pickle(path)
    splits = {}
    for split in ("train", "val"):
      db = parse_sfm_db(data, path, split)
      images = [ImageRef(cid2filename(c, os.path.join(root, ims_rel))) for c in db["cids"]]
      splits[split] = self._training_split(root, split, db["cids"], images, db["cluster"],
                                           db["bbxs"], db["pairs"])
    return splits
