"""Data-parallel training steps: per-device programs with named-axis collectives.

Each factory returns ``step(state, batch) -> (state, metrics)``: a ``jax.jit`` of a
``jax.shard_map`` over a 1-D mesh (axis ``"data"``), the state replicated (``P()``) and donated,
the batch's leading axis split over the devices (``P("data")``). The same program runs on one
CPU, N forced CPU devices, a GPU, a TPU slice, and several processes after
``jax.distributed.initialize()`` (each process then passes its own part of the global batch, see
:func:`shard_batch`).

How a global-batch mean comes out exactly (up to float reassociation) as on one device:

- Losses that decompose over items (tuples, pairs, triplets): each device computes the SUM of its
  valid items' losses and their COUNT. ``psum`` gives the global sum and count; the loss is their
  ratio. The gradient needs no explicit ``psum``: inside ``shard_map`` (with ``check_vma``, the
  default) the params are device-invariant, so JAX differentiates the sum over devices of each
  device's objective (the transpose of broadcasting invariant params to the devices is a
  ``psum``); ``grad(local sum)`` therefore already is the gradient of the global sum, and is
  divided by the global count.
- Losses over every pair of the global batch (batch-hard, NRA, ...): each device embeds its
  shard, ``all_gather``s the embeddings (with labels and validity) and computes the loss of the
  whole batch; all devices hold the same loss ``L(G)``. Differentiating that value directly would
  count it once per device (N times). Instead the chain rule is split at the gather:
  ``dL/dtheta = sum_d (dL/dG[rows of d])^T  d(emb_d)/dtheta``; device ``d`` takes its own rows of
  ``dL/dG`` and pulls them back through its embedding network (``jax.vjp``), and the same
  invariant-params rule sums the devices' pull-backs. No cotangent crosses devices.

Padding (``valid`` false) items contribute nothing to sums and counts, so a short last batch
padded to the global batch size gives the loss and update of its real items; their images are
replaced by a fixed texture first, since an empty image would put ``0 * inf = NaN`` into every
gradient (``_fill_padding``). They do enter the batch statistics of a model in training mode.

Non-trainable collections (``batch_stats`` when an ``embed_fn`` updates them) are averaged over
devices (``pmean``): per-device batch statistics, as in ``pmap`` data parallelism, not
synchronised batch norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retrieval_jax.training.state import TrainState, merge_variables

PyTree = Any
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# embed_fn(variables, pixels uint8 [B, H, W, 3], mask bool [B, H, W]) -> descriptors [B, D] (or
# any pytree of [B, ...] arrays); with mutable_model_state=True it returns
# (outputs, new model_state); with with_rng=True it also takes rng=key.
EmbedFn = Callable[..., Any]
DATA_AXIS = "data"
_IMAGE_KEYS = ("pixels", "mask", "valid")


# ------------------------------------------------------------------------------ mesh and data


def data_mesh(devices: list[jax.Device] | None = None, axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process).

  Its axis is of type ``Auto``: the steps place their inputs themselves (replicated state,
  batch split over ``axis``), as ``pmap`` did, so no sharding-in-types context is needed.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices must name at least one device.")
  return jax.make_mesh((len(devices),), (axis,), axis_types=(AxisType.Auto,), devices=devices)


def _axis_size(mesh: Mesh, axis: str) -> int:
  if axis not in mesh.shape:
    raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
  if len(mesh.shape) != 1:
    raise ValueError(f"mesh must be 1-D (data parallelism over {axis!r}); got axes "
                     f"{dict(mesh.shape)}.")
  return mesh.shape[axis]


def check_batch_size(batch_size: int, mesh: Mesh, axis: str = DATA_AXIS) -> None:
  """Raises unless the global ``batch_size`` splits evenly over the mesh's devices.

  Call it when validating a config, before anything compiles; the steps call it on every batch.
  """
  devices = _axis_size(mesh, axis)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
      batch_size < 1 or batch_size % devices:
    raise ValueError(f"batch_size (the global batch, {batch_size!r}) must be a positive multiple "
                     f"of the device count {devices} of mesh axis {axis!r}; pad the batch with "
                     "valid=False items or change batch_size.")


def _local_devices(mesh: Mesh) -> int:
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: Batch, mesh: Mesh, axis: str = DATA_AXIS) -> dict[str, jax.Array]:
  """Global arrays split over ``axis`` from each process's part of the batch.

  Host arrays (numpy, lists) are this process's rows (with one process: the whole batch); they
  become global arrays whose leading axis is the concatenation over processes
  (``jax.make_array_from_process_local_data``). ``jax.Array`` values already split over the mesh
  pass unchanged.

  Raises:
    ValueError: a local batch that does not split over this process's devices, naming
      ``batch_size``.
  """
  sharding = NamedSharding(mesh, P(axis))
  local_devices = _local_devices(mesh)
  out = {}
  for key, value in batch.items():
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
      out[key] = value
      continue
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      raise ValueError(f"batch[{key!r}] is a global array with another sharding "
                       f"({value.sharding}); split it over the mesh axis {axis!r}.")
    local = np.asarray(value)
    if local.ndim == 0:
      raise ValueError(f"batch[{key!r}] must have a leading batch axis; got a scalar.")
    if local.shape[0] % local_devices:
      processes = jax.process_count()
      raise ValueError(
          f"batch_size must split evenly over the devices: batch[{key!r}] has "
          f"{local.shape[0]} rows on this process, not a multiple of its {local_devices} "
          f"device(s) (global batch = rows per process x {processes} process(es), over "
          f"{mesh.shape[axis]} devices).")
    out[key] = jax.make_array_from_process_local_data(sharding, local)
  return out


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree`` as arrays replicated on every device of ``mesh`` (each process passes the same
  values); leaves already replicated there pass unchanged."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    # Equality, not is_equivalent_to: on a 1-device mesh a single-device array is "equivalent"
    # but its type carries no mesh, so the step (whose outputs do) would compile a second time.
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map(put, tree)


def sum_and_count(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum of the valid rows' values, number of values summed)`` for per-item losses.

  Args:
    values: float ``[T, ...]``, e.g. per-tuple ``[T]`` or per-pair ``[T, 1 + k]`` losses.
    valid: bool ``[T]``.

  Returns:
    float scalar and int32 scalar; their ratio is the mean over the valid rows' values.
  """
  rows = valid.astype(bool).reshape(valid.shape + (1,) * (values.ndim - 1))
  per_row = int(np.prod(values.shape[1:], dtype=np.int64))
  total = jnp.sum(jnp.where(rows, values, 0.0))
  return total, jnp.sum(valid.astype(jnp.int32)) * per_row


# ------------------------------------------------------------------------------ the step core


def _embed(embed_fn: EmbedFn, variables: PyTree, pixels: jax.Array, mask: jax.Array,
           key: jax.Array | None, mutable: bool) -> tuple[PyTree, PyTree | None]:
  out = embed_fn(variables, pixels, mask, rng=key) if key is not None else \
      embed_fn(variables, pixels, mask)
  if mutable:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError("embed_fn must return (outputs, new model_state) when "
                       "mutable_model_state=True.")
    return out
  return out, None


def _fill_padding(pixels: jax.Array, mask: jax.Array, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Padding rows (``valid`` False) become a fixed, fully valid texture.

  Their losses are masked out, so their cotangents are exactly 0, but a backward pass still
  multiplies that 0 by the network's local derivatives, and an empty image (mask all False)
  has infinite ones: GeM's ``x^(1/p)`` and ``l2n`` at a zero vector give ``0 * inf = NaN`` in
  every gradient. An ordinary image has finite derivatives, so ``0 * finite`` keeps the padding
  out of the update exactly.

  Args:
    pixels: uint8 ``[R, ..., H, W, 3]``; mask: bool ``[R, ..., H, W]``; valid: bool ``[R]``.
  """
  h, w, c = pixels.shape[-3:]
  texture = (jnp.arange(h)[:, None, None] * 37 + jnp.arange(w)[None, :, None] * 11
             + jnp.arange(c) * 101) % 251
  rows = valid.reshape(valid.shape + (1,) * (pixels.ndim - 1))
  pixels = jnp.where(rows, pixels, texture.astype(pixels.dtype))
  return pixels, jnp.where(rows[..., 0], mask, True)


def _stop_frozen(params: PyTree, trainable: PyTree | None) -> PyTree:
  """``params`` with ``stop_gradient`` on the leaves ``trainable`` marks False.

  Their gradients are then symbolic zeros: neither computed nor summed over devices (a frozen
  trunk costs only its forward pass), where zeroing computed gradients would leave the work to
  XLA's dead-code elimination.
  """
  if trainable is None:
    return params
  return jax.tree_util.tree_map(lambda x, t: x if t else jax.lax.stop_gradient(x), params,
                                trainable)


def _denominator(loss_sum: jax.Array, loss_count: jax.Array) -> jax.Array:
  """What a global sum is divided by: the global count, at least 1 (a batch with no valid
  item gives loss 0 and no update from the loss)."""
  return jnp.maximum(loss_count, 1).astype(jnp.result_type(loss_sum))


def _replicated(x: jax.Array, axis: str) -> jax.Array:
  """``x``, equal on every device, typed as replicated: values computed from an ``all_gather``
  are typed device-varying; ``pmax`` of equal values is exact and states that they are not."""
  aval = jax.typeof(x)
  # The set of axes a value varies over: ``aval.vma`` in earlier jax, ``aval.mat.varying`` now.
  varying = aval.vma if hasattr(aval, "vma") else aval.mat.varying
  return jax.lax.pmax(x, axis) if axis in varying else x


def _build_step(local_grads: Callable, tx: optax.GradientTransformation, mesh: Mesh, axis: str,
                learning_rate_fn: Callable | None, trainable: PyTree | None,
                with_rng: bool, check: Callable[[Batch], None]) -> StepFn:
  """Wraps a per-device ``local_grads(params, model_state, batch, key) -> (loss, grads,
  new_model_state or None, n_valid)`` (all device-invariant) into the jitted step.

  The returned function also carries ``step.mesh`` (the mesh it runs on) and ``step.program``
  (the ``jax.jit`` of the ``shard_map``, for ``.lower(...)`` / cost analysis).
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"tx must be an optax.GradientTransformation; got {type(tx).__name__}.")
  _axis_size(mesh, axis)
  if any(t != AxisType.Auto for t in mesh.axis_types):
    # ``jax.make_mesh`` defaults to Explicit axes (sharding in types), under which ``jit``
    # would not place the inputs for ``shard_map``; the step places them itself, as pmap did.
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,))

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    key = None
    if with_rng:
      key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                               jax.lax.axis_index(axis))
    loss, grads, model_state, n_valid = local_grads(state.params, state.model_state, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=state.model_state if model_state is None
                              else model_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates),
               "param_norm": optax.tree.norm(params), "valid": n_valid}
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    return new_state, metrics

  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
  program = jax.jit(
      jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P())),
      in_shardings=(replicated, split), out_shardings=(replicated, replicated),
      donate_argnums=0)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimisation step on a global batch (see the factory's docstring for its keys)."""
    if not isinstance(batch, Mapping):
      raise ValueError(f"batch must be a mapping of arrays; got {type(batch).__name__}.")
    batch = dict(batch)
    check(batch)
    if "valid" not in batch:
      rows = np.shape(batch["pixels"])[0]
      batch["valid"] = np.ones(rows, bool)
    batch = shard_batch(batch, mesh, axis)
    check_batch_size(int(batch["pixels"].shape[0]), mesh, axis)
    return program(replicate(state, mesh), batch)

  step.mesh = mesh
  step.program = program
  return step


def _check_images(batch: Batch, leading: int, layout: str) -> None:
  """Static checks of pixels / mask / per-row arrays (host side, before compiling)."""
  for key in ("pixels", "mask"):
    if key not in batch:
      raise ValueError(f"batch must have a {key!r} entry ({layout}).")
  pixels, mask = np.shape(batch["pixels"]), np.shape(batch["mask"])
  if len(pixels) != leading + 3 or pixels[-1] != 3:
    raise ValueError(f"batch['pixels'] must be {layout}; got shape {pixels}.")
  if mask != pixels[:-1]:
    raise ValueError(f"batch['mask'] must have shape {pixels[:-1]} (pixels without the channel "
                     f"axis); got {mask}.")
  for key, value in batch.items():
    if key not in ("pixels", "mask") and np.shape(value)[:1] != pixels[:1]:
      raise ValueError(f"batch[{key!r}] must have the batch's {pixels[0]} rows on its leading "
                       f"axis; got shape {np.shape(value)}.")
  if "valid" in batch and np.ndim(batch["valid"]) != 1:
    raise ValueError(f"batch['valid'] must be bool [{pixels[0]}]; got shape "
                     f"{np.shape(batch['valid'])}.")


def _extras(batch: Batch, exclude: tuple[str, ...]) -> dict[str, jax.Array]:
  return {k: v for k, v in batch.items() if k not in exclude}


# ------------------------------------------------------------------------------ factories


def make_tuple_step(embed_fn: EmbedFn, loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh, *, axis: str = DATA_AXIS, learning_rate_fn: Callable | None = None,
                    trainable: PyTree | None = None, mutable_model_state: bool = False,
                    with_rng: bool = False) -> StepFn:
  """A step for losses over image tuples (query, positive, k negatives; pairs; triplets).

  Batch (global, leading axis split over the devices):
    ``pixels`` uint8 ``[T, n, H, W, 3]``, ``mask`` bool ``[T, n, H, W]``, optional ``valid``
    bool ``[T]`` (False: padding, contributes nothing), and any extra per-tuple arrays
    ``[T, ...]`` (passed to ``loss_fn`` by keyword).

  Args:
    embed_fn: ``(variables, pixels [B, H, W, 3], mask [B, H, W]) -> [B, D]`` (e.g. a
      Retriever's ``describe``), or any pytree of ``[B, ...]`` outputs; see ``mutable_model_state``
      and ``with_rng``.
    loss_fn: ``(tuples [t, n, D], valid [t], **extras) -> (loss_sum, count)`` on one device's
      ``t`` tuples: the sum of the valid items' losses and how many items the mean divides by
      (:func:`sum_and_count` builds both from per-item losses).
    tx: the optimizer (its state lives in ``TrainState.opt_state``).
    mesh: a 1-D mesh over ``axis`` (:func:`data_mesh`).
    axis: the mesh axis the batch is split over.
    learning_rate_fn: ``step -> learning rate``, logged as ``metrics["learning_rate"]``
      (:func:`retrieval_jax.training.make_schedule`).
    trainable: a tree like ``params`` of Python bools (``optimizers.trainable_mask``); gradients
      of False leaves are never computed (zeros; the optimizer's frozen groups ignore them).
    mutable_model_state: ``embed_fn`` returns ``(outputs, new model_state)`` (batch-norm in
      training mode); the new state is averaged over devices.
    with_rng: ``embed_fn`` takes ``rng=`` a key distinct per step and device (dropout).

  Returns:
    ``step(state, batch) -> (state, metrics)``; ``state`` is donated. Metrics (replicated
    scalars): ``loss`` (global mean), ``grad_norm``, ``update_norm``, ``param_norm`` (after the
    update), ``valid`` (valid tuples), ``learning_rate`` if ``learning_rate_fn`` is given.
  """

  def local_grads(params, model_state, batch, key):
    valid = batch["valid"].astype(bool)
    pixels, mask = _fill_padding(batch["pixels"], batch["mask"], valid)
    t, n = pixels.shape[:2]
    extras = _extras(batch, _IMAGE_KEYS)

    def objective(p):
      out, new_state = _embed(embed_fn, merge_variables(_stop_frozen(p, trainable), model_state),
                              pixels.reshape((t * n,) + pixels.shape[2:]),
                              mask.reshape((t * n,) + mask.shape[2:]), key, mutable_model_state)
      tuples = jax.tree_util.tree_map(lambda x: x.reshape((t, n) + x.shape[1:]), out)
      total, count = loss_fn(tuples, valid, **extras)
      return total, (count, new_state)

    # Gradient of this device's sum; JAX sums it over devices (invariant params, see module doc).
    (total, (count, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    total, count = jax.lax.psum((total, count), axis)
    denom = _denominator(total, count)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    if new_state is not None:
      new_state = jax.lax.pmean(new_state, axis)
    return total / denom, grads, new_state, jax.lax.psum(jnp.sum(valid.astype(jnp.int32)), axis)

  def check(batch):
    _check_images(batch, 2, "uint8 [T, n, H, W, 3]")

  return _build_step(local_grads, tx, mesh, axis, learning_rate_fn, trainable, with_rng, check)


def make_pair_step(embed_fn: EmbedFn, loss_fn: Callable, tx: optax.GradientTransformation,
                   mesh: Mesh, **options: Any) -> StepFn:
  """:func:`make_tuple_step` for image pairs: ``pixels [P, 2, H, W, 3]`` and
  ``loss_fn(x1 [p, D], x2 [p, D], valid [p], **extras) -> (loss_sum, count)`` with extras such
  as ``is_positive [P]`` (Siamese contrastive losses)."""

  def pair_loss(tuples, valid, **extras):
    width = jax.tree_util.tree_leaves(tuples)[0].shape[1]
    if width != 2:
      raise ValueError(f"batch['pixels'] must hold pairs [P, 2, H, W, 3] for a pair step; got "
                       f"{width} images per row.")
    first = jax.tree_util.tree_map(lambda x: x[:, 0], tuples)
    second = jax.tree_util.tree_map(lambda x: x[:, 1], tuples)
    return loss_fn(first, second, valid, **extras)

  return make_tuple_step(embed_fn, pair_loss, tx, mesh, **options)


def make_triplet_step(embed_fn: EmbedFn, loss_fn: Callable, tx: optax.GradientTransformation,
                      mesh: Mesh, **options: Any) -> StepFn:
  """:func:`make_tuple_step` for triplet losses: ``pixels [T, 2 + k, H, W, 3]`` (anchor,
  positive, k >= 1 negatives) and ``loss_fn(anchors [t, D], positives [t, D], negatives
  [t, k, D], valid [t], **extras) -> (loss_sum, count)`` (extras such as class ``labels`` for
  DLRTN's joint loss)."""

  def triplet_loss(tuples, valid, **extras):
    width = jax.tree_util.tree_leaves(tuples)[0].shape[1]
    if width < 3:
      raise ValueError(f"batch['pixels'] must hold [T, 2 + k, H, W, 3] (anchor, positive, k >= 1 "
                       f"negatives) for a triplet step; got {width} images per row.")
    anchors = jax.tree_util.tree_map(lambda x: x[:, 0], tuples)
    positives = jax.tree_util.tree_map(lambda x: x[:, 1], tuples)
    negatives = jax.tree_util.tree_map(lambda x: x[:, 2:], tuples)
    return loss_fn(anchors, positives, negatives, valid, **extras)

  return make_tuple_step(embed_fn, triplet_loss, tx, mesh, **options)


def make_batch_step(embed_fn: EmbedFn, loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh, *, gather: bool = True, axis: str = DATA_AXIS,
                    learning_rate_fn: Callable | None = None, trainable: PyTree | None = None,
                    mutable_model_state: bool = False, with_rng: bool = False) -> StepFn:
  """A step for losses over a labelled batch of single images (batch-hard, NRA, ...).

  Batch (global, leading axis split over the devices): ``pixels`` uint8 ``[B, H, W, 3]``,
  ``mask`` bool ``[B, H, W]``, ``labels`` int ``[B]``, optional ``valid`` bool ``[B]`` and any
  extra per-image arrays ``[B, ...]`` (passed to ``loss_fn`` by keyword).

  Args:
    embed_fn: as in :func:`make_tuple_step`.
    loss_fn: ``(embeddings [b, D], labels [b], valid [b], **extras) -> (loss_sum, count)``.
      With ``gather`` (default) it sees the whole global batch (``b = B``) on every device, so
      it may compare every pair; the gradient is pulled back to each device's own rows (module
      docstring). Without ``gather`` it sees one device's rows and must decompose over them.
    gather: all-gather embeddings, labels, valid and extras before the loss.
    tx, mesh, axis, learning_rate_fn, trainable, mutable_model_state, with_rng: as in
      :func:`make_tuple_step`.

  Returns:
    ``step(state, batch) -> (state, metrics)`` as :func:`make_tuple_step`; ``valid`` counts
    valid images.
  """

  def local_grads(params, model_state, batch, key):
    labels, valid = batch["labels"], batch["valid"].astype(bool)
    pixels, mask = _fill_padding(batch["pixels"], batch["mask"], valid)
    extras = _extras(batch, _IMAGE_KEYS + ("labels",))
    n_valid = jax.lax.psum(jnp.sum(valid.astype(jnp.int32)), axis)

    def embed(p):
      return _embed(embed_fn, merge_variables(_stop_frozen(p, trainable), model_state), pixels,
                    mask, key, mutable_model_state)

    if not gather:
      def objective(p):
        out, new_state = embed(p)
        total, count = loss_fn(out, labels, valid, **extras)
        return total, (count, new_state)

      (total, (count, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
      total, count = jax.lax.psum((total, count), axis)
    else:
      out, pull_back, new_state = jax.vjp(embed, params, has_aux=True)
      gathered = jax.lax.all_gather((out, labels, valid, extras), axis, tiled=True)

      def global_loss(all_out):
        total, count = loss_fn(all_out, gathered[1], gathered[2], **gathered[3])
        return total, count

      # Every device computes the same global loss and its cotangent wrt all rows; each pulls
      # back only its own rows (the gather's offset for this device), and the invariant-params
      # rule sums the devices' parameter cotangents: the full chain rule, each row once.
      (total, count), d_all = jax.value_and_grad(global_loss, has_aux=True)(gathered[0])
      rows = jax.tree_util.tree_leaves(out)[0].shape[0]
      offset = jax.lax.axis_index(axis) * rows
      d_local = jax.tree_util.tree_map(
          lambda d: jax.lax.dynamic_slice_in_dim(d, offset, rows), d_all)
      (grads,) = pull_back(d_local)
      total, count = _replicated(total, axis), _replicated(count, axis)
    denom = _denominator(total, count)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    if new_state is not None:
      new_state = jax.lax.pmean(new_state, axis)
    return total / denom, grads, new_state, n_valid

  def check(batch):
    _check_images(batch, 1, "uint8 [B, H, W, 3]")
    if "labels" not in batch:
      raise ValueError("batch must have a 'labels' entry (int [B]) for a batch step.")
    if np.ndim(batch["labels"]) != 1:
      raise ValueError(f"batch['labels'] must be int [B]; got shape "
                       f"{np.shape(batch['labels'])}.")

  return _build_step(local_grads, tx, mesh, axis, learning_rate_fn, trainable, with_rng, check)
