"""Your own photos as training or test sets: a folder of per-instance subfolders, or a CSV.

Training sets (:class:`~retrieval_jax.data.datasets.InstanceSet`, one cluster per instance):

- :func:`folder_instance_set`: ``root/<instance>/<image files>`` (subfolders of an instance
  folder are read too; hidden files and non-image files are ignored).
- :func:`csv_instance_set`: a CSV with a header row and the columns ``path,instance_id`` and,
  optionally, the box columns ``x0,y0,x1,y1`` (pixels of the upright image, empty cells: no box).

Test sets (:class:`~retrieval_jax.data.datasets.RetrievalSet`, ``gnd_kind="ok_junk"``):

- :func:`folder_retrieval_set`, either ``root/queries/<instance>/...`` + ``root/database/
  <instance>/...`` (queries are their own photos), or ``root/<instance>/...`` with
  ``queries_per_instance=n``: the first ``n`` files (sorted by name) of every instance with two
  or more photos are queries and stay in the database (Holidays / UKBench style).
- :func:`csv_retrieval_set`: the CSV columns above plus ``role`` = ``query``, ``database`` or
  ``both`` (a photo that is a query and a database image); boxes on query rows are query crops.

Ground truth: a query's ``ok`` list is every database image of its instance except the query's
own photo; when the query photo is in the database (same resolved path, or role ``both``) that
database entry is its ``junk``, so :func:`retrieval_jax.metrics.compute_map` scores the set
directly; ``query_db_indices`` is set when every query is in the database.

Every builder returns a :class:`CustomSet` ``(dataset, instance_names, skipped)``; images are
absolute path strings (decoded lazily, e.g. by ``Retriever.extract``); cluster and
database ids index ``instance_names`` (folder names sorted as strings; CSV ``instance_id``
values sorted numerically when all are integers, else as strings). ``check_images`` (default
True) opens every image when the set is built (Pillow ``verify``: header and, for PNG, checksums;
``"decode"`` decodes fully, slower, and also catches truncated JPEGs). An unreadable image raises
:class:`~retrieval_jax.data.images.ImageReadError` naming it (and the CSV line), or, with
``skip_unreadable=True``, is dropped, listed in ``skipped`` as ``(path, reason)`` and counted in a
logged warning.
"""

from __future__ import annotations

import concurrent.futures
import csv
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
from PIL import Image

from retrieval_jax.data.datasets import InstanceSet, RetrievalSet
from retrieval_jax.data.images import ImageReadError, load_image

logger = logging.getLogger(__name__)

#: File name endings read as images (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".pgm", ".ppm", ".pbm", ".pnm"})
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
ROLES = ("query", "database", "both")
CheckMode = Union[bool, str]
# EXIF orientations that swap width and height (load_image turns photos upright).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class CustomSet(NamedTuple):
  """What the builders return.

  Attributes:
    dataset: the ``InstanceSet`` or ``RetrievalSet``; images are path strings.
    instance_names: ``instance_names[c]`` is the folder name / CSV ``instance_id`` of cluster
      (or database / query instance) id ``c``.
    skipped: ``(path, reason)`` of each unreadable image that was dropped (only with
      ``skip_unreadable=True``; empty otherwise).
  """

  dataset: InstanceSet | RetrievalSet
  instance_names: list[str]
  skipped: list[tuple[str, str]]


class _Row(NamedTuple):
  """One CSV row: its 1-based line number, resolved image path, instance, box and role."""

  line: int
  path: str
  instance: str
  box: np.ndarray  # float32 [4]; all NaN: no box
  role: str | None


# --------------------------------------------------------------------------- image checks


def _check_mode(check_images: CheckMode) -> str | None:
  if check_images is True or check_images == "verify":
    return "verify"
  if check_images == "decode":
    return "decode"
  if check_images is False:
    return None
  raise ValueError(f"check_images must be True (or 'verify'), 'decode' or False; got "
                   f"{check_images!r}.")


def _image_size(path: str, mode: str) -> tuple[int, int]:
  """``(width, height)`` of the image as ``load_image`` returns it (upright)."""
  if mode == "decode":
    height, width = load_image(path).shape[:2]
    return width, height
  try:
    with Image.open(path) as image:
      image.verify()  # must come first: a verified image cannot be used any more
    with Image.open(path) as image:
      width, height = image.size
      orientation = _orientation(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    raise ImageReadError(f"cannot read image {path}: {err}") from err
  return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _orientation(image: Image.Image) -> int:
  """The EXIF orientation read from the header, without decoding the pixels."""
  if image.format == "PNG":
    # Pillow's PNG getexif() decodes the whole image to reach an eXIf chunk after the pixel
    # data; one before it (the usual place) is already in info.
    raw = image.info.get("exif")
    if not raw:
      return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(0x0112, 1))
  return int(image.getexif().get(0x0112, 1))


def _check_all(paths: Sequence[str], check_images: CheckMode, skip_unreadable: bool,
               where: Sequence[str] | None = None
               ) -> tuple[list[int], list[tuple[int, int] | None], list[tuple[str, str]]]:
  """Opens every image (in threads: the work is mostly file reads).

  Args:
    paths: image files.
    check_images: see the module docstring.
    skip_unreadable: drop unreadable files instead of raising.
    where: optional prefix per path for error messages (``"file.csv, line 3: "``).

  Returns:
    ``(kept, sizes, skipped)``: indices of the readable paths (all when not checking), their
    upright ``(width, height)`` (None when not checking) and ``(path, reason)`` per dropped file.
  """
  mode = _check_mode(check_images)
  if mode is None:
    return list(range(len(paths))), [None] * len(paths), []

  def attempt(path: str) -> tuple[int, int] | ImageReadError:
    try:
      return _image_size(path, mode)
    except ImageReadError as err:
      return err

  workers = min(8, (os.cpu_count() or 1) + 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(attempt, paths))
  kept, sizes, skipped = [], [], []
  for i, result in enumerate(results):
    if isinstance(result, ImageReadError):
      if not skip_unreadable:
        prefix = where[i] if where is not None else ""
        raise ImageReadError(f"{prefix}{result}") from result
      skipped.append((paths[i], str(result)))
    else:
      kept.append(i)
      sizes.append(result)
  return kept, sizes, skipped


def _report_skipped(name: str, skipped: list[tuple[str, str]], total: int) -> None:
  if skipped:
    shown = "; ".join(reason for _, reason in skipped[:3])  # each reason names its path
    logger.warning("%s: skipped %d of %d images that cannot be read: %s%s", name, len(skipped),
                   total, shown, "; ..." if len(skipped) > 3 else "")


# --------------------------------------------------------------------------- folders


def _is_image(path: pathlib.Path) -> bool:
  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _scan_instances(root: pathlib.Path) -> list[tuple[str, list[str]]]:
  """``[(instance name, image paths)]`` for each non-hidden subfolder of ``root`` holding images,
  sorted by name; images found recursively, sorted by their path inside the instance folder."""
  if not root.is_dir():
    raise ValueError(f"{root} is not a folder (expected <root>/<instance name>/<image files>).")
  loose = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image(p))
  if loose:
    raise ValueError(f"{root} holds image files directly ({loose[:3]}); put each instance's "
                     f"images in its own subfolder <root>/<instance name>/.")
  instances = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
    files = []
    for directory, subdirs, names in os.walk(folder):
      subdirs[:] = [d for d in subdirs if not d.startswith(".")]
      files.extend(pathlib.Path(directory) / n for n in names if _is_image(pathlib.Path(n)))
    if files:
      files.sort(key=lambda p: p.relative_to(folder).as_posix())
      instances.append((folder.name, [os.fspath(p) for p in files]))
  return instances


def _flatten(instances: list[tuple[str, list[str]]], names: list[str]
             ) -> tuple[list[str], np.ndarray]:
  code = {name: i for i, name in enumerate(names)}
  paths = [p for _, files in instances for p in files]
  ids = np.array([code[name] for name, files in instances for _ in files], np.int64)
  return paths, ids


def folder_instance_set(root: str | os.PathLike, *, skip_unreadable: bool = False,
                        check_images: CheckMode = True) -> CustomSet:
  """A training set from ``root/<instance name>/<image files>``.

  Args:
    root: the folder; each non-hidden subfolder is an instance, its images (any depth, with an
      extension in ``IMAGE_EXTENSIONS``) the instance's photos. Subfolders without images are
      ignored.
    skip_unreadable: drop unreadable images (listed in ``skipped``, logged) instead of raising.
    check_images: True / ``"verify"`` (fast header check), ``"decode"`` or False (no check).

  Returns:
    ``CustomSet(InstanceSet, instance_names, skipped)``: images are path strings ordered by
    instance then path, ``cluster_ids`` index the sorted folder names.

  Raises:
    ValueError: ``root`` is not a folder, holds loose images or no images at all.
    ImageReadError: an unreadable image (unless skipped), naming its path.
  """
  root = pathlib.Path(root).absolute()  # image paths stay valid if the cwd changes
  instances = _scan_instances(root)
  if not instances:
    raise ValueError(f"{root} has no instance subfolder with images (extensions "
                     f"{sorted(IMAGE_EXTENSIONS)}).")
  names = [name for name, _ in instances]
  paths, ids = _flatten(instances, names)
  kept, _, skipped = _check_all(paths, check_images, skip_unreadable)
  name = f"folder:{root}"
  _report_skipped(name, skipped, len(paths))
  dataset = InstanceSet(name=name, images=[paths[i] for i in kept], cluster_ids=ids[kept])
  return CustomSet(dataset, names, skipped)


# --------------------------------------------------------------------------- CSV files


def _sorted_names(values: set[str]) -> list[str]:
  """Numeric order when every value is an integer (``"2" < "10"``), else string order."""
  try:
    return sorted(values, key=int)
  except ValueError:
    return sorted(values)


def _read_csv(csv_path: pathlib.Path, image_root: pathlib.Path, with_role: bool) -> list[_Row]:
  """Parses and validates the rows (see :func:`csv_instance_set` for the format)."""
  allowed = ("path", "instance_id", *BOX_COLUMNS) + (("role",) if with_role else ())
  required = ("path", "instance_id") + (("role",) if with_role else ())
  try:
    handle = open(csv_path, newline="", encoding="utf-8-sig")  # -sig: Excel's BOM
  except OSError as err:
    raise ValueError(f"cannot open the CSV file {csv_path}: {err}") from err
  with handle:
    reader = csv.reader(handle)
    try:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{csv_path} is empty; it needs a header row with the columns "
                         f"{', '.join(required)} (optional: {', '.join(BOX_COLUMNS)}).")
      header = [column.strip() for column in header]
      unknown = [c for c in header if c not in allowed]
      duplicated = sorted({c for c in header if header.count(c) > 1})
      missing = [c for c in required if c not in header]
      boxes_given = [c for c in BOX_COLUMNS if c in header]
      if boxes_given and len(boxes_given) < 4:
        missing += [c for c in BOX_COLUMNS if c not in header]
      if unknown or duplicated or missing:
        problems = ([f"missing column(s) {missing}"] * bool(missing)
                    + [f"unknown column(s) {unknown}"] * bool(unknown)
                    + [f"repeated column(s) {duplicated}"] * bool(duplicated))
        raise ValueError(
            f"{csv_path}, line 1 (header): {'; '.join(problems)}; got {header}, expected "
            f"{', '.join(required)} and optionally {', '.join(BOX_COLUMNS)} (all four).")
      col = {c: header.index(c) for c in header}
      rows = []
      for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
          continue  # blank line
        where = f"{csv_path}, line {line}"
        if len(fields) != len(header):
          raise ValueError(f"{where}: {len(fields)} fields, but the header has {len(header)} "
                           f"columns {header}.")
        values = {c: fields[i].strip() for c, i in col.items()}
        for c in required:
          if not values[c]:
            raise ValueError(f"{where}, column {c!r}: empty; every row needs a value.")
        path = pathlib.Path(values["path"]).expanduser()
        path = path if path.is_absolute() else image_root / path
        rows.append(_Row(line, os.fspath(path), values["instance_id"],
                         _parse_box(values, boxes_given, where),
                         values["role"].lower() if with_role else None))
    except csv.Error as err:
      raise ValueError(f"{csv_path}, line {reader.line_num}: not valid CSV: {err}") from err
  if not rows:
    raise ValueError(f"{csv_path} has a header but no rows.")
  if with_role:
    for row in rows:
      if row.role not in ROLES:
        raise ValueError(f"{csv_path}, line {row.line}, column 'role': expected one of {ROLES}; "
                         f"got {row.role!r}.")
  return rows


def _parse_box(values: dict[str, str], boxes_given: list[str], where: str) -> np.ndarray:
  """The row's box as float32 [4] (NaN when the four cells are empty), validated."""
  box = np.full(4, np.nan, np.float32)
  if not boxes_given or not any(values[c] for c in BOX_COLUMNS):
    return box
  for j, c in enumerate(BOX_COLUMNS):
    text = values[c]
    if not text:
      raise ValueError(f"{where}, column {c!r}: empty while other box columns are set; give all "
                       f"four of {BOX_COLUMNS} or none.")
    try:
      number = float(text)
    except ValueError:
      raise ValueError(f"{where}, column {c!r}: expected a number (pixels); got "
                       f"{text!r}.") from None
    if not math.isfinite(number):
      raise ValueError(f"{where}, column {c!r}: expected a finite number; got {text!r}.")
    box[j] = number
  x0, y0, x1, y1 = box.tolist()
  for lo, hi, a, b in (("x0", "x1", x0, x1), ("y0", "y1", y0, y1)):
    if a < 0 or b <= a:
      raise ValueError(f"{where}, columns {lo!r}/{hi!r}: not a box; need 0 <= {lo} < {hi}, got "
                       f"{lo}={a:g}, {hi}={b:g}.")
  return box


def _check_box_bounds(csv_path: pathlib.Path, row: _Row, size: tuple[int, int] | None) -> None:
  """A box must lie inside its (upright) image; checked when the image was opened."""
  if size is None or np.isnan(row.box).all():
    return
  width, height = size
  for c, value, limit in (("x1", row.box[2], width), ("y1", row.box[3], height)):
    if value > limit:
      raise ValueError(f"{csv_path}, line {row.line}, column {c!r}: {value:g} lies outside the "
                       f"{width}x{height} (width x height) image {row.path}.")


def _load_rows(csv_path: str | os.PathLike, image_root: str | os.PathLike | None,
               with_role: bool, skip_unreadable: bool, check_images: CheckMode
               ) -> tuple[pathlib.Path, list[_Row], list[tuple[str, str]]]:
  """Reads the CSV, checks its images and boxes; returns the readable rows and the skipped."""
  csv_path = pathlib.Path(csv_path)
  # Absolute paths, so the set still works after the working directory changes.
  root = (pathlib.Path(image_root) if image_root is not None else csv_path.parent).absolute()
  rows = _read_csv(csv_path, root, with_role)
  kept, sizes, skipped = _check_all([r.path for r in rows], check_images, skip_unreadable,
                                    [f"{csv_path}, line {r.line}: " for r in rows])
  for i, size in zip(kept, sizes):
    _check_box_bounds(csv_path, rows[i], size)
  _report_skipped(f"csv:{csv_path}", skipped, len(rows))
  return csv_path, [rows[i] for i in kept], skipped


def csv_instance_set(csv_path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                     skip_unreadable: bool = False, check_images: CheckMode = True) -> CustomSet:
  """A training set from a CSV file.

  Format: a header row, then one row per image, columns (any order, no others)
  ``path,instance_id`` and optionally ``x0,y0,x1,y1``, e.g.::

    path,instance_id,x0,y0,x1,y1
    bridge/1.jpg,bridge,10,20,300,200
    bridge/2.jpg,bridge,,,,
    tower/a.png,tower,0,0,50,80

  Args:
    csv_path: the CSV file (UTF-8; a byte-order mark is allowed).
    image_root: folder that relative paths are resolved against; default the CSV's folder.
    skip_unreadable: drop unreadable images (listed in ``skipped``, logged) instead of raising.
    check_images: True / ``"verify"``, ``"decode"`` or False; when images are checked, boxes
      are also checked against the image sizes.

  Returns:
    ``CustomSet(InstanceSet, instance_names, skipped)``: images (path strings) in CSV order,
    ``boxes`` float32 ``[N, 4]`` when the box columns exist (NaN rows: no box).

  Raises:
    ValueError: a missing/unknown column, a row with the wrong number of fields, an empty cell,
      a bad box, naming the CSV file, the 1-based line and the column.
    ImageReadError: an unreadable image (unless skipped), naming the CSV line and the path.
  """
  csv_path, rows, skipped = _load_rows(csv_path, image_root, False, skip_unreadable,
                                       check_images)
  names = _sorted_names({r.instance for r in rows})
  code = {name: i for i, name in enumerate(names)}
  boxes = np.stack([r.box for r in rows]) if rows else np.zeros((0, 4), np.float32)
  has_boxes = bool(rows) and not np.isnan(boxes).all()
  dataset = InstanceSet(name=f"csv:{csv_path}", images=[r.path for r in rows],
                        cluster_ids=np.array([code[r.instance] for r in rows], np.int64),
                        boxes=boxes if has_boxes else None)
  return CustomSet(dataset, names, skipped)


# --------------------------------------------------------------------------- test sets


def _retrieval_set(name: str, db_paths: list[str], db_ids: np.ndarray, q_paths: list[str],
                   q_ids: np.ndarray, q_own: np.ndarray, q_boxes: np.ndarray | None
                   ) -> RetrievalSet:
  """Builds the ground truth from instance ids (see the module docstring).

  Args:
    q_own: int ``[Q]``, the database index of each query photo, -1 when it is not in the database.
  """
  everything = np.arange(len(db_paths))
  gnd = []
  for q_id, own in zip(q_ids.tolist(), q_own.tolist()):
    ok = everything[(db_ids == q_id) & (everything != own)]
    gnd.append({"ok": ok, "junk": np.array([own] if own >= 0 else [], np.int64)})
  empty = sum(len(g["ok"]) == 0 for g in gnd)
  if empty:
    logger.warning("%s: %d of %d queries have no other database image of their instance; "
                   "metrics will leave them out.", name, empty, len(gnd))
  return RetrievalSet(name=name, database=db_paths, queries=q_paths, gnd=gnd, gnd_kind="ok_junk",
                      query_boxes=q_boxes,
                      query_db_indices=q_own if len(q_own) and (q_own >= 0).all() else None,
                      database_ids=db_ids)


def folder_retrieval_set(root: str | os.PathLike, *, queries_per_instance: int | None = None,
                         skip_unreadable: bool = False,
                         check_images: CheckMode = True) -> CustomSet:
  """A test set from a folder, in one of two layouts.

  - ``root/queries/<instance>/...`` and ``root/database/<instance>/...`` (leave
    ``queries_per_instance`` None): the query photos are separate from the database; instances
    are the union of both folders' subfolder names; a database instance without queries is fine
    (its photos are distractors for the other queries).
  - ``root/<instance>/...`` with ``queries_per_instance=n``: the first ``n`` photos (sorted by
    path) of every instance with at least two photos are queries; every photo stays in the
    database, and a query's own database entry is its junk (``query_db_indices`` is set).

  Args:
    root: the folder.
    queries_per_instance: see above.
    skip_unreadable: drop unreadable images (listed in ``skipped``, logged) instead of raising;
      a dropped photo is never a query.
    check_images: True / ``"verify"``, ``"decode"`` or False.

  Returns:
    ``CustomSet(RetrievalSet, instance_names, skipped)``; ``database_ids`` index
    ``instance_names``.

  Raises:
    ValueError: neither layout, both given, no images.
    ImageReadError: an unreadable image (unless skipped), naming its path.
  """
  root = pathlib.Path(root).absolute()  # image paths stay valid if the cwd changes
  split = (root / "queries").is_dir() and (root / "database").is_dir()
  name = f"folder:{root}"
  if split:
    if queries_per_instance is not None:
      raise ValueError(f"{root} has queries/ and database/ folders, which fix the queries; "
                       f"leave queries_per_instance None (got {queries_per_instance!r}).")
    q_inst, db_inst = _scan_instances(root / "queries"), _scan_instances(root / "database")
    for part, found in (("queries", q_inst), ("database", db_inst)):
      if not found:
        raise ValueError(f"{root / part} has no instance subfolder with images.")
    names = sorted({n for n, _ in q_inst} | {n for n, _ in db_inst})
    q_paths, q_ids = _flatten(q_inst, names)
    db_paths, db_ids = _flatten(db_inst, names)
    q_keep, _, q_skipped = _check_all(q_paths, check_images, skip_unreadable)
    db_keep, _, db_skipped = _check_all(db_paths, check_images, skip_unreadable)
    skipped = q_skipped + db_skipped
    _report_skipped(name, skipped, len(q_paths) + len(db_paths))
    q_paths, q_ids = [q_paths[i] for i in q_keep], q_ids[q_keep]
    db_paths, db_ids = [db_paths[i] for i in db_keep], db_ids[db_keep]
    q_own = np.full(len(q_paths), -1, np.int64)
  else:
    if queries_per_instance is None:
      raise ValueError(f"{root} has no queries/ and database/ subfolders; either use that "
                       f"layout or pass queries_per_instance=n to take the first n photos of "
                       f"each instance as queries.")
    if (isinstance(queries_per_instance, bool) or not isinstance(queries_per_instance, int)
        or queries_per_instance < 1):
      raise ValueError(f"queries_per_instance must be an integer >= 1; got "
                       f"{queries_per_instance!r}.")
    instances = _scan_instances(root)
    if not instances:
      raise ValueError(f"{root} has no instance subfolder with images.")
    names = [n for n, _ in instances]
    paths, ids = _flatten(instances, names)
    keep, _, skipped = _check_all(paths, check_images, skip_unreadable)
    _report_skipped(name, skipped, len(paths))
    db_paths, db_ids = [paths[i] for i in keep], ids[keep]
    q_own = []
    for c in range(len(names)):
      members = np.flatnonzero(db_ids == c)  # in path order: the first n are the queries
      if members.size >= 2:
        q_own.extend(members[:queries_per_instance].tolist())
    q_own = np.array(q_own, np.int64)
    q_paths, q_ids = [db_paths[i] for i in q_own], db_ids[q_own]
  if not q_paths:
    raise ValueError(f"{root}: no query images remain (no instance has two readable photos).")
  dataset = _retrieval_set(name, db_paths, db_ids, q_paths, q_ids, q_own, None)
  return CustomSet(dataset, names, skipped)


def csv_retrieval_set(csv_path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                      skip_unreadable: bool = False, check_images: CheckMode = True) -> CustomSet:
  """A test set from a CSV: the columns of :func:`csv_instance_set` plus ``role``.

  ``role`` is ``query`` (a query only), ``database`` (a database image) or ``both`` (a query
  that is also a database image). A query row whose resolved path is also a database row is the
  same photo (its database entry becomes its junk). Boxes are only allowed on query/both rows
  (query crops, ``query_boxes``). e.g.::

    path,instance_id,role,x0,y0,x1,y1
    q/bridge.jpg,bridge,query,10,20,300,200
    db/bridge1.jpg,bridge,database,,,,
    db/tower1.jpg,tower,both,,,,

  Args:
    csv_path: the CSV file.
    image_root: folder that relative paths are resolved against; default the CSV's folder.
    skip_unreadable: drop unreadable images (listed in ``skipped``, logged) instead of raising.
    check_images: True / ``"verify"``, ``"decode"`` or False.

  Returns:
    ``CustomSet(RetrievalSet, instance_names, skipped)``: queries and database in CSV order,
    ``database_ids`` index ``instance_names``.

  Raises:
    ValueError: the errors of :func:`csv_instance_set`, a bad ``role``, a box on a database
      row, a database photo listed twice, or no query / no database rows.
    ImageReadError: an unreadable image (unless skipped), naming the CSV line and the path.
  """
  csv_path, rows, skipped = _load_rows(csv_path, image_root, True, skip_unreadable,
                                       check_images)
  for row in rows:
    if row.role == "database" and not np.isnan(row.box).all():
      raise ValueError(f"{csv_path}, line {row.line}, columns {BOX_COLUMNS}: a box is a query "
                       f"crop, but this row's role is 'database'; leave its box cells empty.")
  names = _sorted_names({r.instance for r in rows})
  code = {name: i for i, name in enumerate(names)}
  db_rows = [r for r in rows if r.role in ("database", "both")]
  q_rows = [r for r in rows if r.role in ("query", "both")]
  if not db_rows or not q_rows:
    raise ValueError(f"{csv_path}: needs at least one query and one database row (roles "
                     f"'query', 'database' or 'both'); got {len(q_rows)} queries and "
                     f"{len(db_rows)} database images after reading.")
  db_index: dict[str, int] = {}
  for i, row in enumerate(db_rows):
    key = os.path.normcase(os.path.abspath(row.path))
    if key in db_index:
      raise ValueError(f"{csv_path}, line {row.line}: database image {row.path} is already "
                       f"listed on line {db_rows[db_index[key]].line}.")
    db_index[key] = i
  q_own = np.array([db_index.get(os.path.normcase(os.path.abspath(r.path)), -1) for r in q_rows],
                   np.int64)
  for row, own in zip(q_rows, q_own.tolist()):
    if own >= 0 and db_rows[own].instance != row.instance:
      raise ValueError(f"{csv_path}, line {row.line}: query image {row.path} has instance_id "
                       f"{row.instance!r} but its database row (line {db_rows[own].line}) says "
                       f"{db_rows[own].instance!r}.")
  q_boxes = np.stack([r.box for r in q_rows])
  dataset = _retrieval_set(
      f"csv:{csv_path}", [r.path for r in db_rows],
      np.array([code[r.instance] for r in db_rows], np.int64), [r.path for r in q_rows],
      np.array([code[r.instance] for r in q_rows], np.int64), q_own,
      None if np.isnan(q_boxes).all() else q_boxes)
  return CustomSet(dataset, names, skipped)
