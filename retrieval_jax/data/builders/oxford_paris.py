"""The original Oxford5k and Paris6k benchmarks (good/ok/junk lists), from a manual directory.

Manual layout (the official archives extracted into one folder per config)::

  <manual_dir>/oxford5k/jpg/*.jpg                          oxbuild_images.tgz
  <manual_dir>/oxford5k/gt_files_170407/<landmark>_<k>_{good,ok,junk,query}.txt
  <manual_dir>/paris6k/jpg/**/*.jpg                        paris_1.tgz + paris_2.tgz (nested
                                                           paris/<landmark>/ folders are fine)
  <manual_dir>/paris6k/paris_120310/<landmark>_<k>_{good,ok,junk,query}.txt

The database is every ``.jpg`` under ``jpg/`` sorted by name (without extension); queries are the
``*_query.txt`` files sorted by name, each line ``<name> x0 y0 x1 y1`` (Oxford prefixes the name
with ``oxc1_``). Queries are database images (``query_db_index`` set). Database images have no
instance id (-1): the lists are per query, not per image.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from retrieval_jax.data.builders import _base
from retrieval_jax.data.builders._base import ImageRef, ManualConfig, ManualDataError, QuerySpec

GND_KEYS = ("good", "ok", "junk")
#: config -> (ground-truth folder, image archives, ground-truth archive, homepage)
_SOURCES = {
    "oxford5k": ("gt_files_170407", "oxbuild_images.tgz", "gt_files_170407.tgz",
                 "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/"),
    "paris6k": ("paris_120310", "paris_1.tgz, paris_2.tgz", "paris_120310.tgz",
                "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/"),
}

_CITATION = """@inproceedings{philbin2007object,
  title={Object retrieval with large vocabularies and fast spatial matching},
  author={Philbin, James and Chum, Ondrej and Isard, Michael and Sivic, Josef and
          Zisserman, Andrew}, booktitle={CVPR}, year={2007}}
@inproceedings{philbin2008lost,
  title={Lost in quantization: Improving particular object retrieval in large scale image
         databases},
  author={Philbin, James and Chum, Ondrej and Isard, Michael and Sivic, Josef and
          Zisserman, Andrew}, booktitle={CVPR}, year={2008}}"""


def find_images(folder: str) -> dict[str, str]:
  """Maps image name (file name without ``.jpg``) to path, for every ``.jpg`` under ``folder``.

  Raises:
    ManualDataError: two files with the same name in different sub-folders.
  """
  found: dict[str, str] = {}
  for dirpath, _, files in os.walk(folder):
    for file in files:
      if file.lower().endswith(".jpg"):
        name, path = file[:-4], os.path.join(dirpath, file)
        if name in found:
          raise ManualDataError(f"image name {name!r} appears twice: {found[name]} and {path}.")
        found[name] = path
  return found


def parse_query_file(path: str) -> tuple[str, tuple[float, ...]]:
  """Reads ``<landmark>_<k>_query.txt``: one line ``[oxc1_]<name> x0 y0 x1 y1``.

  Raises:
    ManualDataError: not exactly one line of a name and four numbers, or a bad box.
  """
  lines = _base.read_lines(path)
  parts = lines[0].split() if len(lines) == 1 else []
  if len(parts) != 5:
    raise ManualDataError(f"{path}: expected one line '<name> x0 y0 x1 y1'; got {lines!r}.")
  name = parts[0][len("oxc1_"):] if parts[0].startswith("oxc1_") else parts[0]
  try:
    box = [float(v) for v in parts[1:]]
  except ValueError as err:
    raise ManualDataError(f"{path}: box values must be numbers; got {parts[1:]}.") from err
  return name, tuple(_base.check_box(box, f"{path}: box").tolist())


class OriginalLandmarks(_base.ManualBenchmarkBuilder):
  """Oxford5k and Paris6k with the original good/ok/junk ground truth."""

  BUILDER_CONFIGS = _base.with_skip_variants([
      ManualConfig(name="oxford5k", variant="oxford5k",
                   description="Oxford Buildings: 5062 images, 55 queries."),
      ManualConfig(name="paris6k", variant="paris6k",
                   description="Paris: 6412 images (20 of them corrupt), 55 queries."),
  ])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into the manual directory:
    oxford5k/jpg/*.jpg                 oxbuild_images.tgz extracted, from
                                       https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/
    oxford5k/gt_files_170407/*.txt     gt_files_170407.tgz extracted (same page)
    paris6k/jpg/                       paris_1.tgz and paris_2.tgz extracted (any sub-folders),
                                       from https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/
    paris6k/paris_120310/*.txt         paris_120310.tgz extracted (same page)
  Paris6k holds 20 corrupt JPEGs: use the config paris6k_skip_unreadable.
  No checksums are published for these files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._retrieval_info(
        GND_KEYS, "Oxford5k / Paris6k landmark retrieval with the original good/ok/junk "
        "ground truth and query boxes.", _SOURCES[self.builder_config.variant][3], _CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    name = self.builder_config.variant
    gt_folder = _SOURCES[name][0]
    self._require(root, [os.path.join(name, "jpg"), os.path.join(name, gt_folder)])
    images = find_images(os.path.join(root, name, "jpg"))
    imlist = sorted(images)
    position = {s: i for i, s in enumerate(imlist)}
    gt = os.path.join(root, name, gt_folder)
    query_files = sorted(f for f in os.listdir(gt) if f.endswith("_query.txt"))
    if not query_files:
      raise ManualDataError(f"{self._what}: no *_query.txt in {gt}.\n"
                            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    queries = []
    for file in query_files:
      query, box = parse_query_file(os.path.join(gt, file))
      if query not in position:
        raise ManualDataError(f"{os.path.join(gt, file)}: query image {query!r} is not in "
                              f"{os.path.join(root, name, 'jpg')}.")
      stem = file[:-len("_query.txt")]
      gnd = {}
      for key in GND_KEYS:
        list_path = os.path.join(gt, f"{stem}_{key}.txt")
        if not os.path.exists(list_path):
          raise ManualDataError(f"{self._what}: missing {list_path} (query {stem!r}).")
        members = _base.read_lines(list_path)
        unknown = [m for m in members if m not in position]
        if unknown:
          raise ManualDataError(f"{list_path}: image(s) {unknown[:3]} not in "
                                f"{os.path.join(root, name, 'jpg')}.")
        gnd[key] = sorted(position[m] for m in members)
      queries.append(QuerySpec(image_id=query, image=ImageRef(images[query]), gnd=gnd, box=box,
                               db_index=position[query]))
    return self._retrieval_splits(root, imlist, [ImageRef(images[s]) for s in imlist], None,
                                  queries, GND_KEYS)
