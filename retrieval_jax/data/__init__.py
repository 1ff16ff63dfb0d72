"""Data: image decoding and transforms, shape buckets and the threaded loader, the dataset
containers, custom folder/CSV sets, the ORL faces, and tuple samplers.

The synthetic benchmark (``retrieval_jax.data.synthetic``) and the TFDS builders
(``retrieval_jax.data.builders``, which import tensorflow-datasets) are imported on demand.
"""

from retrieval_jax.data import samplers
from retrieval_jax.data.buckets import (Batch, BucketGrouper, bucket_shape, bucket_sizes,
                                        pad_batch, plan_batches)
from retrieval_jax.data.custom import (CustomSet, csv_instance_set, csv_retrieval_set,
                                       folder_instance_set, folder_retrieval_set)
from retrieval_jax.data.datasets import GND_KEYS, InstanceSet, RetrievalSet
from retrieval_jax.data.images import (ImageReadError, load_image, load_images, resize_to,
                                       to_rgb_uint8)
from retrieval_jax.data.loader import BatchLoader, LoadedBatch, ThreadedLoader
from retrieval_jax.data.orl import orl_faces, orl_retrieval_set
from retrieval_jax.data.transforms import (Compose, TrainAugment, colour_jitter, crop_box,
                                           random_flip, random_resized_crop,
                                           random_resized_crop_params, resize_max)

__all__ = [
    "Batch", "BatchLoader", "BucketGrouper", "Compose", "CustomSet", "GND_KEYS", "ImageReadError",
    "InstanceSet", "LoadedBatch", "RetrievalSet", "ThreadedLoader", "TrainAugment",
    "bucket_shape", "bucket_sizes", "colour_jitter", "crop_box", "csv_instance_set",
    "csv_retrieval_set", "folder_instance_set", "folder_retrieval_set", "load_image",
    "load_images", "orl_faces", "orl_retrieval_set", "pad_batch", "plan_batches", "random_flip",
    "random_resized_crop", "random_resized_crop_params", "resize_max", "resize_to", "samplers",
    "to_rgb_uint8",
]
