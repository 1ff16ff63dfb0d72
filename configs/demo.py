r"""Demo: fine-tune ImageNet EfficientNet-Lite0 + GeM on the synthetic benchmark, on a CPU.

    retrieval-jax train --config configs/demo.py --workdir runs/demo

Contrastive loss on cirtorch tuples (query, positive, 5 hard negatives mined every epoch with
the current model from a pool of 300 training photos), Adam, 5 epochs of 120 tuples at 128 px,
validation mAP (revisited medium protocol, queries cropped, 256 px) before training and after
every epoch on the ``small`` preset's val split (generated in about 40 s; nothing is
downloaded). The trained model is ``runs/demo/retriever`` (``Retriever.load``).

Measured once (seed 0, 2-core CPU shared with other jobs, load average ~5: 794 s in all, 45 s
of it the first step's compilation; expect a few minutes on an idle machine), validation
revisited mAP (val split of ``small``: 20 queries, so +-1 point is noise):

=================  ======  ======  ======
after step         easy    medium  hard
=================  ======  ======  ======
0 (ImageNet)       0.594   0.460   0.252
30 (epoch 1)       0.523   0.432   0.245
150 (epoch 5)      0.546   0.454   0.253
=================  ======  ======  ======

Evaluated at the training size instead (``--config.eval.max_size=128``, same run otherwise,
same machine and load, ~13 min), validation medium mAP went 0.352 (ImageNet) -> 0.338 (epoch 1)
-> 0.368 (epoch 5); easy 0.373 -> 0.403, hard 0.230 -> 0.223: within the noise of 20 queries.

So this short recipe does not yet improve on the ImageNet weights (it first loses, then
recovers most of it); the pipeline (mining, steps, validation, checkpoints, resume) is what it
demonstrates. Recipes that fine-tune for real (more tuples, training at the evaluation size,
cirtorch's lr 1e-6 over many epochs) are the paper configs' job; measure before trusting them.

A seconds-long smoke run of the same pipeline (untrained tiny ResNet, ``tiny`` preset, 64 px):

    retrieval-jax train --config configs/demo.py --workdir runs/smoke \
        --config.data.preset=tiny --config.model.backbone=tiny_resnet \
        --config.model.pretrained=False --config.data.image_size=64 --config.eval.max_size=64 \
        --config.mining.num_negatives=2 --config.mining.query_size=12 \
        --config.mining.pool_size=24 --config.train.epochs=2
"""

from retrieval_jax.training.config import default_train_config


def get_config():
  cfg = default_train_config()
  cfg.model.backbone = "efficientnet_lite0"
  cfg.model.pretrained = True
  cfg.model.pooling = "gem"

  cfg.data.source = "synthetic"
  cfg.data.preset = "small"
  cfg.data.seed = 0
  cfg.data.image_size = 128

  cfg.loss.name = "contrastive"
  cfg.loss.margin = 0.7  # cirtorch's margin for GeM

  cfg.mining.num_negatives = 5
  cfg.mining.query_size = 120
  cfg.mining.pool_size = 300
  cfg.mining.refresh_every_epochs = 1

  cfg.optimizer.optimizer = "adam"
  cfg.optimizer.learning_rate = 1e-5
  cfg.optimizer.lr_decay = 0.1  # lr * exp(-0.1 * epoch)

  cfg.train.epochs = 5
  cfg.train.batch_size = 4
  cfg.train.seed = 0
  cfg.train.eval_every_epochs = 1
  cfg.train.checkpoint_every_steps = 50
  cfg.train.keep_checkpoints = 2

  cfg.eval.max_size = 256
  return cfg
