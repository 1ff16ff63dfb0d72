"""Every image mode decodes to upright RGB uint8; bad files name their path."""

import numpy as np
import pytest
from PIL import Image

from retrieval_jax.data import ImageReadError, load_image, load_images, to_rgb_uint8


def test_modes_convert_to_rgb_uint8(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  expect = np.repeat(gray[..., None], 3, axis=-1)
  np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(gray)), expect)
  # 16-bit: full range scaled to 8 bits (x / 257, rounded).
  deep = gray.astype(np.uint16) * 257
  Image.fromarray(deep).save(tmp_path / "deep.png")
  np.testing.assert_array_equal(load_image(tmp_path / "deep.png"), expect)
  # Float images in [0, 1].
  np.testing.assert_array_equal(
      to_rgb_uint8(Image.fromarray(gray.astype(np.float32) / 255.0, mode="F")), expect)
  # Alpha composited over white: a fully transparent pixel becomes white.
  rgba = np.zeros((1, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)
  np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(rgba, "RGBA")),
                                [[[10, 20, 30], [255, 255, 255]]])
  cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink: white
  np.testing.assert_array_equal(to_rgb_uint8(cmyk), np.full((2, 2, 3), 255, np.uint8))


def test_exif_orientation_is_applied(tmp_path):
  image = Image.fromarray(np.zeros((2, 4, 3), np.uint8))
  exif = image.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to view
  image.save(tmp_path / "rotated.jpg", exif=exif)
  assert load_image(tmp_path / "rotated.jpg").shape == (4, 2, 3)


def test_unreadable_files_are_reported_with_paths(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good.read_bytes()[:30])
  missing = tmp_path / "missing.jpg"
  for bad in (truncated, missing):
    with pytest.raises(ImageReadError, match=bad.name):
      load_image(bad)
  images, kept, failures = load_images([truncated, good, missing], skip_unreadable=True)
  assert kept == [1] and len(images) == 1
  assert [p for p, _ in failures] == [str(truncated), str(missing)]
  with pytest.raises(ImageReadError, match="truncated.png"):
    load_images([good, truncated])
