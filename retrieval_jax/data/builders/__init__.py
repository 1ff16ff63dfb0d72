"""TFDS builders: the papers' benchmarks from a manual directory, and the synthetic benchmark.

Importing this package registers every builder with TFDS, so ``tfds.builder(name, data_dir=...,
config=...)`` finds them; ``loading`` turns a prepared builder into the library's
``RetrievalSet`` / ``InstanceSet`` with lazily decoded images.
"""

from retrieval_jax.data.builders import (gldv2, holidays, instre, oxford_paris,  # noqa: F401
                                         revisited, sfm120k, synthetic_landmarks, ukbench)
from retrieval_jax.data.builders.loading import (load_retrieval_set, tfds_instance_set,
                                                 tfds_retrieval_set)

#: Builder name -> its configs (without the ``_skip_unreadable`` twins), for listings.
BUILDERS = {
    "revisited_landmarks": ("roxford5k", "rparis6k"),
    "revisitop1m": ("r1m",),
    "original_landmarks": ("oxford5k", "paris6k"),
    "inria_holidays": ("original", "rotated"),
    "ukbench": ("full",),
    "instre": ("iscen",),
    "retrieval_sfm": ("sfm120k", "sfm30k"),
    "google_landmarks_v2": ("clean",),
    "synthetic_landmarks": ("tiny", "small", "medium", "large"),
}

__all__ = ["BUILDERS", "load_retrieval_set", "tfds_instance_set", "tfds_retrieval_set"]
