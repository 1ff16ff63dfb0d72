"""Data: image decoding and resizing (more to come: the synthetic benchmark, TFDS builders)."""

from retrieval_jax.data.images import (ImageReadError, load_image, load_images, resize_to,
                                       to_rgb_uint8)

__all__ = ["ImageReadError", "load_image", "load_images", "resize_to", "to_rgb_uint8"]
