"""The embedded synthetic instance-retrieval benchmark: generated locally, deterministically.

No dataset can be downloaded everywhere, and a first run must work offline, so a realistic
benchmark is generated from a seed with numpy alone (vectorised; no network, no files written):

* Instances are *landmarks*: planar facades built from one shared vocabulary of parts (roof
  shapes, window grids, bands, pillars, doors, emblems, sign panels) with their own layout,
  colours and textures (``landmarks.py``, ``textures.py``). They are alike at the category level
  and distinct at the instance level, so generic ImageNet features help without solving it.
* Each landmark is photographed many times (``camera.py``, ``scenes.py``): a pinhole camera's
  homography (yaw/pitch/roll), the object filling 0.3-1.0 of the frame, partial crops by the
  frame, occluders in front (poles and trees, blobs, boards), cluttered backgrounds (unrelated
  landmarks, shapes, procedural textures and, with scikit-image installed, crops of its bundled
  sample photos), the landmark's own site behind it in most photos, illumination and colour
  changes with cast shadows, blur, sensor noise and JPEG-like block artefacts. Photos have
  variable aspect ratios (4:3, 3:2, 16:9, 1:1, 3:4, 2:3) and a fixed long side (``image_size``,
  default 256).
* Splits (``benchmark.py``): ``train`` (its own instances, many views each, ``cluster_ids`` and
  object boxes: ready for tuple mining and m-per-class batches), ``val`` and ``test`` retrieval
  sets (a shuffled database of instance photos plus distractors, queries with boxes, revisited
  easy/hard/junk ground truth from the generated visibility following Radenovic et al.,
  "Revisiting Oxford and Paris", CVPR 2018; the exact rule is in ``benchmark.py``). Train, val
  and test instances are disjoint; distractors show no val/test instance.

Every photo is a pure function of ``(seed, split, role, index)`` (``np.random.default_rng`` keyed
by them), so the same seed gives bit-identical arrays in any order or chunking, and
:func:`iter_train` / :func:`iter_database` / :func:`iter_queries` stream the same photos as
:func:`generate` without holding a split in memory (the TFDS builder
``retrieval_jax.data.builders.synthetic_landmarks`` uses them). Whether scikit-image is
installed changes the photos (its sample photos are then part of the material); for a given
environment they are deterministic.

Presets (:data:`PRESETS`; counts per split, 256 px):

=======  =================  =================================================  ==========
preset   train              test (val)                                          photos
=======  =================  =================================================  ==========
tiny     8 x 6 views        6 x 6 db + 12 distractors, 2 queries each (3 inst)  136
small    60 x 10            30 x 10 + 300 distractors, 2 each (10 inst)         1440
medium   300 x 10           150 x 10 + 2000 distractors, 2 each (30 inst)       7460
large    3000 x 10          1500 x 10 + 15000 distractors, 2 each (100 inst)    65200
=======  =================  =================================================  ==========

Generation time (``generate``, seed 0, 256 px, one process on a 2-core CPU): tiny 3.4 s, small
33 s (50 s while other jobs shared the CPU); about 25 ms per photo, so medium takes a few minutes
and large about half an hour, and large does not fit in memory (stream it with the ``iter_*``
functions or prepare the TFDS builder).

Difficulty (test split of ``small``, seed 0, 256 px, 2-core CPU; EfficientNet-Lite0 at
``max_size=256``, queries cropped to their box, cosine ranking, revisited mAP):

=====================================  ======  ======  ======
model (EfficientNet-Lite0)             easy    medium  hard
=====================================  ======  ======  ======
untrained (random weights) + GeM       0.030   0.032   0.017
ImageNet + GeM                         0.418   0.296   0.159
ImageNet + R-MAC                       0.462   0.306   0.154
=====================================  ======  ======  ======

On the test split of ``medium`` (3500 database photos, 300 queries; same setting): untrained
GeM 0.010 / 0.009 / 0.006, ImageNet GeM 0.247 / 0.166 / 0.082, ImageNet R-MAC 0.279 / 0.175 /
0.078 (easy / medium / hard). Per query the ground truth holds on average about 3.4 easy, 6.4
hard and 0.3 junk photos on ``small`` (3.7 / 6.1 / 0.2 on ``medium``).

An untrained network scores near zero and ImageNet features clearly help without solving it;
R-MAC's regional pooling scores a little above global GeM on the easy and medium protocols
(objects are often small in cluttered photos). Fine-tuning on ``train`` is what the remaining
gap is for (not measured here).
"""

from retrieval_jax.data.synthetic.benchmark import (
    PRESETS,
    RetrievalMetadata,
    SyntheticBenchmark,
    SyntheticConfig,
    ViewMetadata,
    generate,
    ground_truth,
    iter_database,
    iter_queries,
    iter_train,
    resolve_config,
    retrieval_metadata,
    viewpoint_change,
    visibility_labels,
)

__all__ = [
    "PRESETS",
    "RetrievalMetadata",
    "SyntheticBenchmark",
    "SyntheticConfig",
    "ViewMetadata",
    "generate",
    "ground_truth",
    "iter_database",
    "iter_queries",
    "iter_train",
    "resolve_config",
    "retrieval_metadata",
    "viewpoint_change",
    "visibility_labels",
]
