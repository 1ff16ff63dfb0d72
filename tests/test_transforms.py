"""Transforms against Pillow and torchvision: crops, max-size resizing, training augmentation.

torchvision draws from torch's global generator; the transforms draw from an
``np.random.Generator``. ``TorchDraws`` answers the generator calls the transforms make with the
torch calls torchvision makes, so both sides see the same random numbers and must agree pixel
for pixel.
"""

import numpy as np
import pytest
from PIL import Image

from retrieval_jax.data.transforms import (Compose, TrainAugment, colour_jitter, crop_box,
                                           random_flip, random_resized_crop,
                                           random_resized_crop_params, resize_max)

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")


class TorchDraws:
  """The ``np.random.Generator`` methods the transforms call, answered by torch's generator
  with the calls torchvision's transforms make."""

  def uniform(self, low, high):
    return torch.empty(1).uniform_(low, high).item()

  def integers(self, low, high):
    return int(torch.randint(low, high, size=(1,)).item())

  def random(self):
    return torch.rand(1).item()

  def permutation(self, n):
    return torch.randperm(n).numpy()


def _photo(rng, height, width):
  """A smooth image with texture, so resampling and colour errors show."""
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                   (x + y) % 64 * 4], axis=-1)
  return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def test_crop_box_matches_pillow_crop(rng):
  image = _photo(rng, 37, 53)
  pil = Image.fromarray(image)
  boxes = [(0, 0, 53, 37), (2.5, 3.5, 10.5, 11.5),  # halves round to even: 2, 4, 10, 12
           (0.49, 0.51, 52.5, 36.5), (-4.2, -3.0, 20.0, 15.7),  # partly outside: black
           (40.0, 30.0, 60.6, 45.2), (10.3, 5.4, 11.6, 6.5)]
  for _ in range(40):
    x0, x1 = np.sort(rng.uniform(-5, 60, 2))
    y0, y1 = np.sort(rng.uniform(-5, 45, 2))
    boxes.append((float(x0), float(y0), float(x1) + 1, float(y1) + 1))
  boxes.append(tuple(np.float32([1.5, 2.5, 30.5, 20.5])))  # float32, as datasets store them
  for box in boxes:
    want = np.asarray(pil.crop(box))
    got = crop_box(image, box)
    assert got.shape == want.shape, box
    np.testing.assert_array_equal(got, want, err_msg=str(box))


def test_crop_box_refuses_empty_and_malformed_boxes(rng):
  image = _photo(rng, 10, 10)
  with pytest.raises(ValueError, match=r"x0 < x1 and y0 < y1 after rounding"):
    crop_box(image, (1.5, 0, 2.5, 4))  # both round to 2
  with pytest.raises(ValueError, match="four finite numbers"):
    crop_box(image, (0, 0, 5))
  with pytest.raises(ValueError, match="four finite numbers"):
    crop_box(image, (0, 0, np.nan, 5))
  with pytest.raises(ValueError, match="RGB uint8"):
    crop_box(image[..., 0], (0, 0, 5, 5))


def test_resize_max_takes_thumbnail_sizes_and_pillow_pixels(rng):
  for _ in range(30):
    height, width = (int(v) for v in rng.integers(20, 300, 2))
    max_size = int(rng.integers(16, 320))
    image = _photo(rng, height, width)
    got = resize_max(image, max_size)
    thumb = Image.fromarray(image)
    thumb.thumbnail((max_size, max_size))  # cirtorch's imresize size rule (never enlarges)
    assert got.shape == (thumb.height, thumb.width, 3), (height, width, max_size)
    if max(height, width) <= max_size:
      assert got is image  # not enlarged, not copied
    else:
      want = Image.fromarray(image).resize((thumb.width, thumb.height), Image.BILINEAR)
      np.testing.assert_array_equal(got, np.asarray(want))


def test_resize_max_upscale_enlarges_to_the_long_side(rng):
  for height, width in ((30, 40), (41, 17), (25, 25), (3, 2)):
    image = _photo(rng, height, width)
    for max_size in (3, 64, 101):
      got = resize_max(image, max_size, upscale=True)
      long_side, short_side = max(got.shape[:2]), min(got.shape[:2])
      assert long_side == max_size and (got.shape[0] >= got.shape[1]) == (height >= width)
      exact = max_size * min(height, width) / max(height, width)
      assert abs(short_side - exact) < 1 and short_side >= 1
  with pytest.raises(ValueError, match="max_size must be a positive integer"):
    resize_max(image, 0)


def _torchvision_crop_params(seed, height, width, scale, ratio):
  torch.manual_seed(seed)
  return T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), scale, ratio)


def test_random_resized_crop_params_equal_torchvision_with_the_same_draws():
  # Wide and narrow images exercise the fallback; (0.5, 4) areas make most tries miss.
  cases = [((100, 150), (0.08, 1.0), (3 / 4, 4 / 3)), ((40, 400), (0.08, 1.0), (3 / 4, 4 / 3)),
           ((300, 20), (0.5, 4.0), (0.2, 5.0)), ((64, 64), (0.9, 1.0), (1.0, 1.0))]
  fallbacks = 0
  for (height, width), scale, ratio in cases:
    for seed in range(60):
      torch.manual_seed(seed)
      got = random_resized_crop_params(height, width, TorchDraws(), scale, ratio)
      assert got == _torchvision_crop_params(seed, height, width, scale, ratio), (seed, got)
      top, left, h, w = got
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
      fallbacks += top == (height - h) // 2 and left == (width - w) // 2
  assert fallbacks > 0


def test_random_resized_crop_fallback_is_torchvisions_central_crop():
  # Areas above the image's make all ten tries fail, whatever the draws: the central crop,
  # clamped to the ratio range, is deterministic on both sides.
  for height, width in ((100, 30), (30, 100), (50, 60)):
    got = random_resized_crop_params(height, width, np.random.default_rng(0), (2.0, 3.0))
    assert got == _torchvision_crop_params(0, height, width, (2.0, 3.0), (3 / 4, 4 / 3))
  assert random_resized_crop_params(100, 30, np.random.default_rng(0), (2.0, 3.0)) == \
      ((100 - 40) // 2, 0, 40, 30)  # w / h clamped to 3/4: h = round(30 / 0.75)


def test_random_resized_crop_pixels_equal_torchvision(rng):
  image = _photo(rng, 90, 120)
  for seed in range(5):
    torch.manual_seed(seed)
    got = random_resized_crop(image, TorchDraws(), (48, 64))
    torch.manual_seed(seed)
    want = np.asarray(T.RandomResizedCrop((48, 64))(Image.fromarray(image)))
    np.testing.assert_array_equal(got, want)


def test_random_resized_crop_properties(rng):
  image = _photo(rng, 50, 70)
  for seed in range(20):
    out = random_resized_crop(image, np.random.default_rng(seed), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    again = random_resized_crop(image, np.random.default_rng(seed), 32)
    np.testing.assert_array_equal(out, again)  # a pure function of the generator
  # scale = ratio = full image: the crop is the whole image, resized.
  whole = random_resized_crop(image, rng, (25, 35), scale=(1.0, 1.0), ratio=(70 / 50, 70 / 50))
  np.testing.assert_array_equal(
      whole, np.asarray(Image.fromarray(image).resize((35, 25), Image.BILINEAR)))
  with pytest.raises(ValueError, match="scale must satisfy"):
    random_resized_crop(image, rng, 32, scale=(0.5, 0.1))
  with pytest.raises(ValueError, match="size must be a positive int"):
    random_resized_crop(image, rng, (32,))


def test_random_flip_equals_torchvision_and_is_an_involution(rng):
  image = _photo(rng, 8, 11)
  for seed in range(10):
    torch.manual_seed(seed)
    got = random_flip(image, TorchDraws())
    torch.manual_seed(seed)
    want = np.asarray(T.RandomHorizontalFlip()(Image.fromarray(image)))
    np.testing.assert_array_equal(got, want)
  flipped = random_flip(image, rng, p=1.0)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(random_flip(flipped, rng, p=1.0), image)
  assert random_flip(image, rng, p=0.0) is image
  with pytest.raises(ValueError, match=r"p must be a probability"):
    random_flip(image, rng, p=1.5)


@pytest.mark.parametrize("strengths", [
    dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
    dict(brightness=(0.5, 0.9), hue=(-0.5, -0.2)),  # negative hue shifts wrap around
    dict(saturation=2.0, hue=0.5),
])
def test_colour_jitter_equals_torchvision(rng, strengths):
  image = _photo(rng, 24, 31)
  for seed in range(6):
    torch.manual_seed(seed)
    got = colour_jitter(image, TorchDraws(), **strengths)
    torch.manual_seed(seed)
    want = np.asarray(T.ColorJitter(**strengths)(Image.fromarray(image)))
    np.testing.assert_array_equal(got, want)


def test_colour_jitter_identity_at_zero_strength_and_errors(rng):
  image = _photo(rng, 12, 9)
  assert colour_jitter(image, rng) is image
  assert colour_jitter(image, rng, brightness=(1.0, 1.0), hue=(0.0, 0.0)) is image
  # A factor of exactly 1 (brightness range (1, 1) is off; (1, 1 + 1e-12) is on) changes nothing.
  np.testing.assert_array_equal(colour_jitter(image, rng, contrast=(1.0, 1.0 + 1e-12)), image)
  with pytest.raises(ValueError, match="hue range must lie within"):
    colour_jitter(image, rng, hue=0.6)
  with pytest.raises(ValueError, match="brightness must be a non-negative number"):
    colour_jitter(image, rng, brightness=-0.1)


def test_train_augment_equals_torchvision_compose(rng):
  image = _photo(rng, 60, 80)
  augment = TrainAugment(size=(32, 40), flip_p=0.5, brightness=0.3, contrast=0.3,
                         saturation=0.3, hue=0.05)
  reference = T.Compose([T.RandomResizedCrop((32, 40)), T.RandomHorizontalFlip(0.5),
                         T.ColorJitter(0.3, 0.3, 0.3, 0.05)])
  for seed in range(8):
    torch.manual_seed(seed)
    got = augment(image, TorchDraws())
    torch.manual_seed(seed)
    np.testing.assert_array_equal(got, np.asarray(reference(Image.fromarray(image))))


def test_train_augment_from_config_is_deterministic_and_composes(rng):
  cfg = {"size": 24, "scale": [0.3, 1.0], "flip_p": 1.0, "brightness": 0.2}
  augment = TrainAugment(**cfg)
  image = _photo(rng, 40, 30)
  a = augment(image, np.random.default_rng(7))
  np.testing.assert_array_equal(a, augment(image, np.random.default_rng(7)))
  assert a.shape == (24, 24, 3)
  # No crop, no jitter, certain flip: exactly the mirror image.
  mirror = TrainAugment(size=None, flip_p=1.0)
  np.testing.assert_array_equal(mirror(image, rng), image[:, ::-1])
  twice = Compose((mirror, mirror))
  np.testing.assert_array_equal(twice(image, rng), image)
  with pytest.raises(ValueError, match="flip_p must be a probability"):
    TrainAugment(flip_p=2.0)
  with pytest.raises(ValueError, match="hue range must lie within"):
    TrainAugment(hue=0.7)
  with pytest.raises(ValueError, match="ratio must satisfy"):
    TrainAugment(ratio=(0.0, 1.0))
