"""Training: state, optimizers and data-parallel steps.

- :class:`TrainState`, :func:`create_train_state`, :func:`split_variables`,
  :func:`merge_variables` (``state``): params apart from batch statistics, optax state, step.
- :func:`make_optimizer`, :func:`make_schedule`, :func:`trainable_mask`,
  :func:`default_optimizer_config` (``optimizers``): Adam/SGD, per-epoch exponential decay,
  weight decay, clipping, accumulation, per-group learning rates and freezing.
- :func:`make_tuple_step` / :func:`make_pair_step` / :func:`make_triplet_step` (tuple, pair and
  triplet losses) and :func:`make_batch_step` (batch losses, optionally over the all-gathered
  global batch), with :func:`data_mesh`, :func:`shard_batch`, :func:`replicate`,
  :func:`check_batch_size` and :func:`sum_and_count` (``steps``).
- :func:`train` (``loop``): the train loop (mining refresh, validation, checkpoints, resume,
  NaN stop, JSONL + TensorBoard logs) driven by :func:`default_train_config` /
  :func:`validate_config` (``config``).
"""

from retrieval_jax.training.config import LOSSES, default_train_config, validate_config
from retrieval_jax.training.loop import TrainingDivergedError, train
from retrieval_jax.training.optimizers import (default_optimizer_config, make_optimizer,
                                               make_schedule, param_paths, trainable_mask)
from retrieval_jax.training.state import (TrainState, create_train_state, merge_variables,
                                          split_variables)
from retrieval_jax.training.steps import (check_batch_size, data_mesh, make_batch_step,
                                          make_pair_step, make_triplet_step, make_tuple_step,
                                          replicate, shard_batch, sum_and_count)

__all__ = [
    "LOSSES", "TrainState", "TrainingDivergedError", "default_train_config", "train",
    "validate_config", "check_batch_size", "create_train_state", "data_mesh",
    "default_optimizer_config", "make_batch_step", "make_optimizer", "make_pair_step",
    "make_schedule", "make_triplet_step", "make_tuple_step", "merge_variables", "param_paths",
    "replicate", "shard_batch", "split_variables", "sum_and_count", "trainable_mask",
]
