"""UKBench (Nister & Stewenius): 10200 images of 2550 objects, four views each.

Manual layout (``ukbench.zip`` extracted)::

  <manual_dir>/ukbench/full/ukbench00000.jpg ... ukbench10199.jpg

Images ``4k .. 4k+3`` show object ``k`` (``instance_id``). Every image is a query against the whole
database: ``query_db_index`` is the image itself, ``ok`` the other three views and ``junk`` the
query. The N-S score (``metrics.ukbench_ns_score``) uses ``database_ids`` instead and counts the
query itself, as the protocol does.
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError

GND_KEYS = ("ok", "junk")
_NAME = re.compile(r"^ukbench(\d{5})\.jpg$")

_CITATION = """@inproceedings{nister2006scalable,
  title={Scalable recognition with a vocabulary tree},
  author={Nist{\\'e}r, David and Stew{\\'e}nius, Henrik}, booktitle={CVPR}, year={2006}}"""


class Ukbench(_base.ManualBenchmarkBuilder):
  """UKBench: config ``full`` (all 10200 images)."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="full", variant="full", description="All images; groups of 4."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into the manual directory:
    ukbench/full/ukbench%05d.jpg   ukbench.zip extracted; originally from
                                   https://archive.org/details/ukbench (mirror of the former
                                   http://vis.uky.edu/~stewe/ukbench/ukbench.zip)
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._retrieval_info(
        GND_KEYS, "UKBench object recognition benchmark: 2550 objects x 4 views.",
        "https://archive.org/details/ukbench", _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    self._require(root, [os.path.join("ukbench", "full")])
    full = os.path.join(root, "ukbench", "full")
    numbers = sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(full)) if m)
    if not numbers or len(numbers) % 4:
      raise ManualDataError(f"{full}: expected ukbench%05d.jpg files in groups of 4; found "
                            f"{len(numbers)}.")
    if numbers != list(range(len(numbers))):
      missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
      raise ManualDataError(f"{full}: image numbers must run 0..{len(numbers) - 1} without gaps; "
                            f"missing ukbench{missing[0]:05d}.jpg.")
    names = [f"ukbench{i:05d}" for i in numbers]
    images = [ImageRef(os.path.join(full, s + ".jpg")) for s in names]
    groups = [i // 4 for i in numbers]
    queries = _base.group_queries(names, images, groups, range(len(names)))
    return self._retrieval_splits(root, names, images, groups, queries, GND_KEYS)
