r"""R-MAC + triplet loss, end to end: Gordo et al.'s L-R-MAC ("Deep Image Retrieval", DIR).

Paper recipe as far as our paper texts give it: ResNet-101 (ImageNet), R-MAC over the 3-level
grid (20 regions + the full map), triplet ranking loss ``0.5 max(0, m + ||q-p||^2 - ||q-n||^2)``
with margin 0.1 (the triplet loss REMAP Eq. 2 takes from [6] = Gordo et al.), one hardest
non-matching image per (query, matching) pair re-mined with the current model, multi-resolution
test descriptors at 550, 800 and 1050 px summed and L2-normalised (DARAC §II), about one week of
training. Gordo et al.'s optimiser settings are not in our texts; this config uses REMAP's
triplet training, which follows [6]: SGD momentum 0.9, lr 1e-3, weight decay 5e-5, and 800 px
training images (DIR's middle scale). Their Landmarks-clean set is not available as a builder:
we train on Google Landmarks v2 clean.

    retrieval-jax convert resnet101-63fe2227.pth --format torchvision --backbone resnet101 \
        --pooling rmac --out weights/resnet101_imagenet
    retrieval-jax train --config configs/rmac_triplet.py --workdir runs/rmac_triplet \
        --config.data.data_dir=PATH/TO/tensorflow_datasets
    retrieval-jax train --config configs/rmac_triplet.py:quick --workdir runs/rmac_quick

Reported (mAP %): ResNet-101 R-MAC fine-tuned: Oxford5k 86.1, Oxford105k 82.8, Paris6k 94.5,
Holidays 90.3 (94.8 rotated) (REMAP Table VI, DARAC Table II); with QE Oxford5k 90.6,
Oxford105k 89.4, Paris6k 96.0, Paris106k 93.2 (LRML Table 5). VGG16 L-R-MAC: Oxford5k 83.1,
Oxford105k 78.6, Paris6k 87.1, Paris106k 79.7 (DLRTN Table II).

Our measurement: the paper recipe has not been run. ``quick`` (seed 0, 2-core CPU shared with
other jobs), validation revisited mAP easy / medium / hard on the ``small`` val split (20
queries, so +-0.02 is noise), at 128 px, first with the paper's hardest negatives:

- lr 3e-4: 0.379 / 0.352 / 0.227 -> after epochs 1-3 medium 0.355, 0.340, 0.338; final
  0.351 / 0.338 / 0.220: no gain.
- lr 1e-3 (the paper's): medium 0.375, 0.345, 0.279: a gain after one epoch, then worse.

Hardest negatives, LR sweep, 8 epochs, medium (8 parallel runs on one H100 (jax 0.11.2 CUDA,
TF32 convolutions), 2026-11-23): from 0.353,

- lr 3e-5: 0.353, 0.359, 0.361, 0.370, 0.370, 0.375, 0.382, 0.382: +0.029,
  rising steadily but only just above the noise;
- lr 1e-4: peaks at 0.384 after epoch 3, 0.374 after epoch 8;
- lr 5e-4 (4 epochs): 0.315, 0.275, 0.285, 0.265.

Hardest negatives are nearer the query than its positive here (initial loss 0.16-0.21, that
is ``||q-n||^2`` 0.2-0.3 below ``||q-p||^2``), so a constant descriptor (loss m / 2 = 0.05)
is a lower-loss state; the larger rates head for it. Semi-hard negatives
(``mining.negatives="semi_hard"``: the nearest negative farther than the positive; FaceNet)
remove that pull. On the H100, medium from 0.353 after each epoch:

- semi-hard, lr 3e-4 (this config, 4 epochs): 0.357, 0.385, 0.388, 0.413: +0.060;
- semi-hard, lr 1e-3: 0.367, 0.317, 0.397, 0.388.

This config on the 2-core CPU (quiet, 2 min 30 s): 0.379 / 0.352 / 0.227 -> after epochs 1-4
medium 0.364, 0.388, 0.402, 0.390; final 0.451 / 0.390 / 0.236: +0.038 medium, +0.072 easy.
On the ``small`` test split (60 queries; ImageNet R-MAC 0.245 / 0.174 / 0.089):
0.306 / 0.195 / 0.093.
"""

from retrieval_jax.training.config import default_train_config, quick_synthetic, select_variant


def get_config(variant: str = ""):
  """The paper recipe, or ``"quick"``: the same method on the synthetic benchmark."""
  cfg = default_train_config()
  cfg.model.backbone = "resnet101"
  cfg.model.pooling = "rmac"
  cfg.model.levels = 3
  cfg.model.scales = (550, 800, 1050)  # absolute long sides at test time
  cfg.eval.scales = (550, 800, 1050)
  cfg.model.multiscale = "sum"
  cfg.train.init_backbone = "weights/resnet101_imagenet"

  cfg.data.source = "tfds"
  cfg.data.train = "google_landmarks_v2/clean"
  cfg.data.val = "original_landmarks/oxford5k"
  cfg.data.data_dir = "tensorflow_datasets"
  cfg.data.image_size = 800

  cfg.loss.name = "triplet"
  cfg.loss.margin = 0.1
  cfg.loss.squared = True

  cfg.mining.negatives = "hard"
  cfg.mining.num_negatives = 1  # the closest non-matching image
  cfg.mining.refresh_every_epochs = 1

  cfg.optimizer.optimizer = "sgd"
  cfg.optimizer.momentum = 0.9
  cfg.optimizer.learning_rate = 1e-3
  cfg.optimizer.weight_decay = 5e-5
  cfg.optimizer.lr_decay = 0.0

  cfg.train.epochs = 10
  cfg.train.batch_size = 4
  cfg.train.checkpoint_every_steps = 500
  cfg.eval.max_size = 1024
  return select_variant(cfg, variant, {"quick": _quick})


def _quick(cfg) -> None:
  quick_synthetic(cfg)
  # With the hardest negatives the network drifts towards one descriptor for every image (lr
  # 1e-3: 0.352 -> 0.375 -> 0.345 -> 0.279 medium); semi-hard ones train it (see the
  # docstring). The departure from the paper's mining rule is this variant's.
  cfg.mining.negatives = "semi_hard"
  cfg.optimizer.learning_rate = 3e-4
  cfg.train.epochs = 4
