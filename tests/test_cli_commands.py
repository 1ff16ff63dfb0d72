"""The ``retrieval-jax`` subcommands (``retrieval_jax.commands``), each run on tiny data.

Commands run in-process through their ``main(argv)``; one test runs them as ``python -m``
subprocesses to check the entry points. The model is an untrained tiny ResNet + GeM at 64 px
(random weights, saved once per module); photos are small generated JPEGs; the convert test
writes a torchvision-layout ``.pth`` without torch.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from retrieval_jax import visualize
from retrieval_jax.commands import convert, datasets, evaluate, extract, index, search
from retrieval_jax.retriever import Retriever

TINY = {"backbone": "tiny_resnet", "pretrained": False, "pooling": "gem", "max_size": 64,
        "bucket_step": 32, "batch_size": 4}


def _random_variables(module, *inputs, seed: int = 0):
  """He-initialised variables of ``module`` from their shapes (``jax.eval_shape``): no jitted
  ``init`` to compile, which takes seconds on a busy 2-core CPU."""
  rng = np.random.default_rng(seed)
  shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                                     *inputs))
  fixed = {"scale": 1.0, "var": 1.0, "bias": 0.0, "mean": 0.0, "p": 3.0}
  flat = {}
  for path, leaf in shapes.items():
    if path[-1] in fixed:
      flat[path] = np.full(leaf.shape, fixed[path[-1]], np.float32)
    else:
      fan_in = int(np.prod(leaf.shape[:-1])) or 1
      flat[path] = (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def retriever_dir(tmp_path_factory):
  """A saved untrained tiny ResNet + GeM Retriever (64 px, 32 px buckets)."""
  from retrieval_jax.models import GlobalPoolHead, build_backbone
  from retrieval_jax.retriever import default_config

  cfg = default_config()
  cfg.update(TINY)
  backbone = _random_variables(build_backbone("tiny_resnet"), jnp.zeros((1, 64, 64, 3)))
  head = _random_variables(GlobalPoolHead("gem"), jnp.zeros((1, 2, 2, 8)))
  path = tmp_path_factory.mktemp("model") / "retriever"
  Retriever(cfg, {"backbone": backbone, "head": head}).save(path)
  return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """``root/<instance>/<n>.jpg``: 3 instances x 2 photos of different sizes, plus a note."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for i in range(3):
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for j, size in enumerate([(64, 48), (48, 64)]):
      folder = root / f"instance{i}"
      folder.mkdir(exist_ok=True)
      noisy = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255)
      Image.fromarray(noisy.astype(np.uint8)).resize(size, Image.BILINEAR).save(
          folder / f"{j}.jpg")
  (root / "notes.txt").write_text("not an image\n")
  return root


@pytest.fixture(scope="module")
def extracted(retriever_dir, photos, tmp_path_factory):
  out = tmp_path_factory.mktemp("extract") / "descs"
  assert extract.main([str(photos), "--retriever", str(retriever_dir), "--out", str(out)]) == 0
  return out


def _one_error_line(capsys, *needles: str) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  for needle in needles:
    assert needle in err[0], err[0]
  return err[0]


# --------------------------------------------------------------------------- extract / index


def test_extract_writes_descriptors_paths_and_info(extracted, photos):
  descriptors = np.load(extracted / "descriptors.npy")
  paths = json.loads((extracted / "paths.json").read_text())
  info = json.loads((extracted / "extract.json").read_text())
  assert paths == sorted(str(p) for p in photos.rglob("*.jpg"))
  assert descriptors.dtype == np.float32 and descriptors.shape == (6, info["dim"])
  np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-4)
  assert info["count"] == 6 and info["max_size"] == 64 and info["skipped"] == []
  assert json.loads(info["model_id"])["retriever"]


def test_extract_list_file_float16_and_unreadable(retriever_dir, photos, tmp_path, capsys):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  listing = tmp_path / "list.txt"
  listing.write_text(f"# a comment\n{photos / 'instance0' / '0.jpg'}\n\nbroken.jpg\n")
  out = tmp_path / "descs"
  args = [str(listing), "--retriever", str(retriever_dir), "--out", str(out), "--dtype",
          "float16", "--skip-unreadable", "--workers", "0"]
  assert extract.main(args) == 0
  assert np.load(out / "descriptors.npy").dtype == np.float16
  assert json.loads((out / "paths.json").read_text()) == [str(photos / "instance0" / "0.jpg")]
  info = json.loads((out / "extract.json").read_text())
  assert [s["path"] for s in info["skipped"]] == [str(bad)]
  assert "skipped 1 unreadable" in capsys.readouterr().err
  # Without --overwrite the existing output is kept.
  assert extract.main(args) == 2
  _one_error_line(capsys, "--overwrite")


def test_index_and_search_print_json_and_grid(extracted, retriever_dir, photos, tmp_path,
                                              capsys):
  out = tmp_path / "index"
  assert index.main(["--descriptors", str(extracted), "--out", str(out)]) == 0
  assert "exact search" in capsys.readouterr().out
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["kind"] == "exact" and manifest["count"] == 6

  query = photos / "instance1" / "1.jpg"
  results, grid = tmp_path / "results.json", tmp_path / "grid.png"
  assert search.main([str(query), "--index", str(out), "--retriever", str(retriever_dir),
                      "-k", "3", "--json", str(results), "--grid", str(grid)]) == 0
  printed = capsys.readouterr().out
  assert f"query 1/1: {query}" in printed
  report = json.loads(results.read_text())
  top = report["queries"][0]["results"]
  assert len(top) == 3 and top[0]["path"] == str(query) and top[0]["score"] > 0.99
  assert [r["rank"] for r in top] == [1, 2, 3]
  with Image.open(grid) as image:
    assert image.format == "PNG" and image.width > image.height > 0


def test_search_refuses_an_index_of_another_model(extracted, retriever_dir, tmp_path, capsys):
  out = tmp_path / "index"
  assert index.main(["--descriptors", str(extracted), "--out", str(out), "--mode",
                     "exact"]) == 0
  # The same model with another GeM p: other descriptors.
  base = Retriever.load(retriever_dir)
  variables = jax.tree_util.tree_map(np.asarray, base.variables)
  variables["head"]["params"]["p"] = variables["head"]["params"]["p"] + 1.0
  other = tmp_path / "other"
  Retriever(base.config, variables).save(other)
  capsys.readouterr()
  query = json.loads((extracted / "paths.json").read_text())[0]
  status = search.main([query, "--index", str(out), "--retriever", str(other)])
  assert status == 2
  _one_error_line(capsys, "another model")


# --------------------------------------------------------------------------- dataset mode


def test_search_dataset_mode_marks_ground_truth(retriever_dir, tmp_path, capsys):
  results, grid = tmp_path / "r.json", tmp_path / "g.png"
  assert search.main(["--dataset", "synthetic:tiny", "--image-size", "64", "--retriever",
                      str(retriever_dir), "--num-queries", "2", "-k", "6", "--json",
                      str(results), "--grid", str(grid), "--thumb-size", "32"]) == 0
  assert "correct:" in capsys.readouterr().out
  report = json.loads(results.read_text())
  assert report["dataset"] == "synthetic_landmarks/tiny:test" and report["query_crop"]
  rows = [r for q in report["queries"] for r in q["results"]]
  assert len(report["queries"]) == 2 and len(rows) == 12
  assert {type(r["correct"]) for r in rows} <= {bool, type(None)}
  with Image.open(grid) as image:
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
  colours = {tuple(c) for c in pixels}
  expected = {visualize.CORRECT if r["correct"] else visualize.WRONG
              for r in rows if r["correct"] is not None}
  assert expected and expected <= colours
  assert visualize.QUERY in colours


# --------------------------------------------------------------------------- evaluate


def test_evaluate_with_flags_prints_table_and_writes_report(retriever_dir, tmp_path, capsys):
  out = tmp_path / "eval"
  status = evaluate.main([
      "--retriever", str(retriever_dir), "--dataset", "synthetic:tiny", "--max-size", "64",
      "--config.dataset.image_size=64", "--whitening", "pca", "--whitening-set",
      "synthetic:train", "--rerank", "alpha_qe", "--out", str(out)])
  assert status == 0
  printed = capsys.readouterr().out
  for word in ("Easy", "Medium", "Hard", "PCA-w", "alpha_qe"):
    assert word in printed
  report = json.loads((out / "report.json").read_text())
  assert report["whitening"]["learned_on"] == "synthetic_landmarks/tiny:train"
  assert 0.0 <= report["metrics"]["medium"]["mAP"] <= 1.0


def test_evaluate_config_file_with_overrides(retriever_dir, tmp_path, capsys):
  config = tmp_path / "eval_config.py"
  config.write_text(
      "import ml_collections\n\n\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict({\n"
      f"      'retriever': {{'checkpoint': {str(retriever_dir)!r}}},\n"
      "      'dataset': {'name': 'synthetic:tiny', 'image_size': 64},\n"
      "      'eval': {'max_size': 64, 'rerank': 'aqe', 'qe_k': 2},\n"
      "  })\n")
  out = tmp_path / "eval"
  assert evaluate.main(["--config", str(config), "--config.eval.rerank=dba",
                        "--config.eval.dba_k", "3", "--no-crop", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["rerank"]["method"] == "dba" and report["rerank"]["dba_k"] == 3
  assert report["extraction"]["crop_queries"] is False
  assert "Medium" in capsys.readouterr().out
  # A bad override names the field.
  assert evaluate.main(["--config", str(config), "--config.eval.nope=1", "--out",
                        str(out)]) == 2
  _one_error_line(capsys, "eval.nope")


# --------------------------------------------------------------------------- datasets


def test_datasets_lists_builders_and_explains_one(capsys):
  assert datasets.main([]) == 0
  listing = capsys.readouterr().out
  for name in ("synthetic:tiny", "revisited_landmarks/roxford5k", "retrieval_sfm/sfm120k",
               "folder:PATH"):
    assert name in listing
  assert datasets.main(["roxford5k"]) == 0
  details = capsys.readouterr().out
  assert "gnd_roxford5k.pkl" in details and "--manual-dir" in details


# --------------------------------------------------------------------------- convert


class _Global:
  """A ``module.name`` reference, pickled as a GLOBAL opcode (no import needed)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable
    raise NotImplementedError


class _Storage:
  def __init__(self, key: str, numel: int):
    self.key, self.numel = key, numel


class _Tensor:
  def __init__(self, storage: _Storage, shape: tuple[int, ...]):
    self.storage, self.shape = storage, shape

  def __reduce_ex__(self, protocol):
    stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
  dispatch = dict(pickle._Pickler.dispatch)

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.numel)
    return None

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch[_Global] = _save_global


def _write_torch_zip(path, state: dict[str, np.ndarray]) -> None:
  """A ``torch.save`` zip checkpoint of float32 ``state``, written without torch."""
  records, tensors = {}, collections.OrderedDict()
  for i, (name, value) in enumerate(state.items()):
    records[f"archive/data/{i}"] = np.ascontiguousarray(value, "<f4").tobytes()
    tensors[name] = _Tensor(_Storage(str(i), value.size), tuple(value.shape))
  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(tensors)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", "little")
    for name, data in records.items():
      archive.writestr(name, data)


def _tiny_resnet_state_dict(rng) -> dict[str, np.ndarray]:
  from retrieval_jax.models import build_backbone, resnet

  shapes = jax.eval_shape(build_backbone("tiny_resnet").init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))
  state = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    name, _ = resnet._torchvision_name(path)
    shape = leaf.shape
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    value = rng.normal(size=shape).astype(np.float32)
    state[name] = np.abs(value) + 0.5 if name.endswith("running_var") else value
  return state


def test_convert_torchvision_file_to_retriever_and_variables(tmp_path, rng, capsys):
  state = _tiny_resnet_state_dict(rng)
  weights = tmp_path / "tiny.pth"
  _write_torch_zip(weights, state)
  out = tmp_path / "converted"
  assert convert.main([str(weights), "--format", "torchvision", "--backbone", "tiny_resnet",
                       "--pooling", "mac", "--max-size", "64", "--out", str(out)]) == 0
  assert "Retriever" in capsys.readouterr().out
  loaded = Retriever.load(out)
  assert loaded.config.backbone == "tiny_resnet" and loaded.config.pooling == "mac"
  assert loaded.config.max_size == 64 and loaded.preprocessing == "torchvision"
  kernel = loaded.variables["backbone"]["params"]["conv1"]["kernel"]
  np.testing.assert_array_equal(kernel, state["conv1.weight"].transpose(2, 3, 1, 0))
  assert loaded.extract([np.zeros((40, 56, 3), np.uint8)]).shape == (1, 64)

  only = tmp_path / "variables"
  assert convert.main([str(weights), "--format", "torchvision", "--backbone", "tiny-resnet",
                       "--variables-only", "--out", str(only)]) == 0
  from retrieval_jax.models import load_variables

  np.testing.assert_array_equal(load_variables(only)["params"]["conv1"]["kernel"], kernel)
  # Another architecture's file names the mismatch in one line.
  assert convert.main([str(weights), "--format", "torchvision", "--backbone", "resnet18",
                       "--out", str(tmp_path / "x")]) == 2
  _one_error_line(capsys, "resnet18")


# --------------------------------------------------------------------------- errors


def test_usage_and_input_errors_are_one_line(retriever_dir, extracted, tmp_path, capsys):
  missing = str(tmp_path / "missing")
  cases = [
      (extract.main, [str(extracted), "--retriever", str(retriever_dir), "--out", missing,
                      "--bogus"], ("unrecognized arguments: --bogus",)),
      (extract.main, [missing + ".jpg", "--retriever", str(retriever_dir), "--out", missing],
       ("missing.jpg", "no such file")),
      (extract.main, [str(extracted), "--out", missing], ("--retriever", "--pretrained")),
      (index.main, ["--descriptors", missing, "--out", missing + "_index"],
       ("no such directory",)),
      (index.main, ["--descriptors", str(extracted), "--out", missing, "--mode", "fast"],
       ("invalid choice: 'fast'",)),
      (search.main, ["q.jpg", "--index", missing, "--retriever", str(retriever_dir)],
       ("--index", "no such directory")),
      (evaluate.main, ["--retriever", str(retriever_dir), "--dataset", "nope", "--out",
                       missing], ("unknown dataset 'nope'",)),
      (evaluate.main, ["--retriever", str(retriever_dir), "--dataset", "roxford", "--out",
                       missing], ("did you mean 'roxford5k'",)),
      (evaluate.main, ["--retriever", str(retriever_dir), "--dataset", "roxford5k",
                       "--data-dir", str(tmp_path / "tfds"), "--manual-dir", missing, "--out",
                       missing],
       ("roxford5k", "datasets revisited_landmarks/roxford5k")),
      (evaluate.main, ["--config", missing + ".py", "--out", missing], ("is not a file",)),
      (evaluate.main, ["--dataset", "synthetic:tiny", "--whitening", "lw", "--out", missing],
       ("--whitening-set",)),
      (datasets.main, ["imagenet"], ("unknown dataset 'imagenet'",)),
      (convert.main, [missing + ".pth", "--format", "torchvision", "--backbone", "resnet50",
                      "--out", missing], ("no such file",)),
      (convert.main, [str(extracted / "paths.json"), "--format", "onnx", "--backbone", "x",
                      "--out", missing], ("invalid choice: 'onnx'",)),
  ]
  for main, argv, needles in cases:
    assert main(argv) == 2, argv
    _one_error_line(capsys, *needles)
  assert not (tmp_path / "missing").exists()


def test_help_exits_zero(capsys):
  for main in (extract.main, index.main, search.main, evaluate.main, datasets.main,
               convert.main):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: retrieval-jax ")


def test_modules_run_as_scripts(tmp_path):
  """``python -m retrieval_jax.commands.<name>``: help, a usage error, and the dispatcher."""
  def run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)

  done = run("retrieval_jax.commands.datasets", "--bogus")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "retrieval-jax datasets: error: unrecognized arguments: --bogus (see 'retrieval-jax "
      "datasets --help')"]
  done = run("retrieval_jax.cli", "datasets", "roxford5k")
  assert done.returncode == 0 and "gnd_roxford5k.pkl" in done.stdout
  done = run("retrieval_jax.cli", "index", "--descriptors", str(tmp_path / "no"), "--out",
             str(tmp_path / "idx"))
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
