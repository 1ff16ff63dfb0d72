"""``TrainState``: what one training step reads and writes, as a single pytree.

Flax variables of a retrieval model are nested by sub-model, then by collection::

    {"backbone": {"params": ..., "batch_stats": ...}, "head": {"params": ...}}

A step differentiates only the ``"params"`` collections, so the state keeps them apart from the
other collections (running batch statistics, ...), each tree with the sub-model nesting intact:

    params      = {"backbone": {"params": ...}, "head": {"params": ...}}
    model_state = {"backbone": {"batch_stats": ...}, "head": {}}

Keeping the collection key inside each tree makes the split exactly invertible
(:func:`merge_variables` is a plain recursive union) for any nesting, including a single
module's ``{"params": ..., "batch_stats": ...}``. Parameter paths used by
:mod:`retrieval_jax.training.optimizers` are the ``/``-joined keys of ``params``, e.g.
``"backbone/params/conv5_3/kernel"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PARAMS = "params"  # the flax collection a step differentiates

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """One model's training state; every field is a pytree of arrays (donated by the steps).

  Attributes:
    step: int32 scalar, the number of steps taken (micro-batches when gradients accumulate).
    params: the trainable ``"params"`` collections (see the module docstring for the layout).
    model_state: every other collection (``batch_stats``, ...), same sub-model nesting.
    opt_state: the optax state of ``tx`` over ``params``.
    rng: a PRNG key; steps that ask for randomness derive per-step, per-device keys from it
      (``fold_in(fold_in(rng, step), device index)``) and leave it unchanged.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  rng: jax.Array

  @property
  def variables(self) -> dict[str, Any]:
    """The flax variables (``params`` and ``model_state`` merged), as models take them."""
    return merge_variables(self.params, self.model_state)


def split_variables(variables: Mapping[str, Any], *, _path: str = "variables"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits flax variables into ``(params, model_state)``.

  A mapping with a ``"params"`` key is a module's collections: ``"params"`` goes to the first
  tree, every other collection to the second. Any other mapping is a level of sub-models
  (``{"backbone": ..., "head": ...}``) and is split entry by entry, keeping its keys in both.

  Args:
    variables: nested mappings ending in flax collections.

  Returns:
    ``(params, model_state)``; ``merge_variables(params, model_state) == variables``.

  Raises:
    ValueError: a sub-model entry that is not a mapping (no ``"params"`` collection below it),
      naming its path.
  """
  if not isinstance(variables, Mapping):
    raise ValueError(f"{_path} must be a mapping of flax collections or of sub-models; got "
                     f"{type(variables).__name__}.")
  if PARAMS in variables:
    params = {PARAMS: variables[PARAMS]}
    rest = {k: v for k, v in variables.items() if k != PARAMS}
    return params, rest
  params, rest = {}, {}
  for name, sub in variables.items():
    params[name], rest[name] = split_variables(sub, _path=f"{_path}[{name!r}]")
  return params, rest


def merge_variables(params: Mapping[str, Any], model_state: Mapping[str, Any], *,
                    _path: str = "") -> dict[str, Any]:
  """Inverse of :func:`split_variables`: the recursive union of the two trees.

  Raises:
    ValueError: a key holding arrays in both trees (they would shadow each other), naming it.
  """
  merged = dict(params)
  for key, value in model_state.items():
    path = f"{_path}/{key}" if _path else str(key)
    if key not in merged:
      merged[key] = value
    elif isinstance(merged[key], Mapping) and isinstance(value, Mapping):
      merged[key] = merge_variables(merged[key], value, _path=path)
    else:
      raise ValueError(f"params and model_state both define {path!r}; they must be disjoint "
                       "(use split_variables).")
  return merged


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       rng: jax.Array | int = 0) -> TrainState:
  """A step-0 state: ``variables`` split, ``tx`` initialised on the params.

  Args:
    variables: flax variables (see :func:`split_variables`).
    tx: the optimizer (e.g. from :func:`retrieval_jax.training.make_optimizer`); its ``init``
      validates parameter groups against these params.
    rng: a PRNG key, or an int seed.

  Returns:
    The :class:`TrainState`, on the default device; the steps place it on their mesh.
  """
  params, model_state = split_variables(variables)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  model_state = jax.tree_util.tree_map(jnp.asarray, model_state)
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  elif jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)  # raw uint32 keys place on meshes as plain arrays
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), rng=jnp.asarray(rng))
