"""Optimizers from a config: Adam or SGD, per-epoch exponential decay, weight decay, clipping,
gradient accumulation, per-group learning rates and freezing.

>>> tx = make_optimizer({"optimizer": "adam", "learning_rate": 1e-6, "lr_decay": 0.1,
...                      "param_groups": [{"pattern": "^head/", "lr_multiplier": 10.0}]},
...                     steps_per_epoch=1000)

The chain, in order (each link only when its field asks for it):

1. frozen groups' gradients set to zero (so they count in neither clipping nor the norm);
2. ``clip_by_global_norm(grad_clip_norm)``;
3. per group (``optax.multi_transform``): coupled weight decay ``g + weight_decay * w`` (what
   PyTorch's ``Adam``/``SGD`` ``weight_decay`` does, as cirtorch trains), then Adam or SGD
   (momentum, optionally Nesterov) at ``lr_multiplier * schedule``; frozen groups
   ``optax.set_to_zero()`` (no optimizer state at all);
4. ``optax.MultiSteps(every_k_schedule=accumulate_steps)``: the mean gradient of
   ``accumulate_steps`` micro-batches is applied once (REMAP updates every 64 triplets).

The schedule is the papers' per-epoch exponential decay, ``lr * exp(-lr_decay * epoch)``,
constant within an epoch; ``steps_per_epoch`` counts training steps (micro-batches).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adam", "sgd")
_GROUP_KEYS = ("pattern", "lr_multiplier", "frozen")
DEFAULT_LABEL = "default"
FROZEN_LABEL = "frozen"


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The fields :func:`make_optimizer` reads, with their defaults."""
  return ml_collections.ConfigDict({
      "optimizer": "adam",  # adam | sgd
      "learning_rate": 1e-6,  # l0
      "lr_decay": 0.1,  # lr = l0 * exp(-lr_decay * epoch); 0: constant
      "momentum": 0.9,  # sgd only (0: plain SGD)
      "nesterov": False,  # sgd only
      "adam_b1": 0.9,
      "adam_b2": 0.999,
      "adam_eps": 1e-8,
      "weight_decay": 0.0,  # coupled L2 on trainable params (PyTorch's weight_decay)
      # None or 0: no clipping. A placeholder float keeps the ConfigDict field assignable.
      "grad_clip_norm": ml_collections.FieldReference(None, field_type=float),
      "accumulate_steps": 1,  # micro-batches per update (optax.MultiSteps)
      # [{"pattern": regex on "/"-joined param paths, "lr_multiplier": float} or
      #  {"pattern": ..., "frozen": True}]; first matching group wins, the rest is "default".
      "param_groups": [],
  })


def _fields(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> dict[str, Any]:
  """The config as a plain dict with defaults filled in; unknown fields are refused."""
  full = default_optimizer_config().to_dict()
  given = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else (cfg or {}))
  unknown = sorted(set(given) - set(full))
  if unknown:
    raise ValueError(f"optimizer config has unknown field(s) {unknown}; known: {sorted(full)}.")
  full.update(given)
  return full


def _real(name: str, value: Any, *, low: float, low_inclusive: bool,
          high: float | None = None) -> float:
  """``value`` as a float, raising unless finite and within the bounds."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number; got {value!r}.")
  too_low = value < low if low_inclusive else value <= low
  if too_low or (high is not None and value >= high):
    bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high else "")
    raise ValueError(f"{name} must be {bounds}; got {value!r}.")
  return float(value)


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer; got {value!r}.")
  return value


def _groups(raw: Any) -> list[tuple[re.Pattern, float | None]]:
  """Validated ``param_groups``: ``(compiled pattern, lr multiplier or None if frozen)``."""
  if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
    raise ValueError(f"param_groups must be a list of mappings; got {raw!r}.")
  groups = []
  for i, group in enumerate(raw):
    name = f"param_groups[{i}]"
    if isinstance(group, ml_collections.ConfigDict):
      group = group.to_dict()
    if not isinstance(group, Mapping):
      raise ValueError(f"{name} must be a mapping with a pattern; got {group!r}.")
    unknown = sorted(set(group) - set(_GROUP_KEYS))
    if unknown:
      raise ValueError(f"{name} has unknown key(s) {unknown}; known: {list(_GROUP_KEYS)}.")
    pattern = group.get("pattern")
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{name}.pattern must be a non-empty regex string; got {pattern!r}.")
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{name}.pattern {pattern!r} is not a valid regex: {e}.") from None
    frozen = group.get("frozen", False)
    if not isinstance(frozen, bool):
      raise ValueError(f"{name}.frozen must be True or False; got {frozen!r}.")
    has_multiplier = group.get("lr_multiplier") is not None
    if frozen == has_multiplier:
      raise ValueError(f"{name} must set exactly one of lr_multiplier or frozen=True; got "
                       f"{dict(group)!r}.")
    multiplier = None
    if has_multiplier:
      multiplier = _real(f"{name}.lr_multiplier", group["lr_multiplier"], low=0.0,
                         low_inclusive=True)
    groups.append((compiled, multiplier))
  return groups


def param_paths(params: Any) -> list[str]:
  """The ``/``-joined key path of every leaf of ``params``, in flattening order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return ["/".join(_key_name(k) for k in path) for path, _ in leaves]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _label_params(groups: list[tuple[re.Pattern, float | None]], params: Any) -> Any:
  """A tree like ``params`` of group labels: ``"group<i>"`` for the first group whose pattern
  matches the leaf's path (``re.search``), ``"frozen"`` for frozen groups, else ``"default"``.

  Raises:
    ValueError: a group that selects no parameter, naming its pattern.
  """
  paths = param_paths(params)
  labels, used = [], set()
  for path in paths:
    label = DEFAULT_LABEL
    for i, (pattern, multiplier) in enumerate(groups):
      if pattern.search(path):
        label = FROZEN_LABEL if multiplier is None else f"group{i}"
        used.add(i)
        break
    labels.append(label)
  for i, (pattern, _) in enumerate(groups):
    if i not in used:
      shadowed = any(pattern.search(p) for p in paths)
      why = ("all the parameters it matches belong to earlier groups" if shadowed else
             f"it matches no parameter path (e.g. {paths[:3]})")
      raise ValueError(f"param_groups[{i}].pattern {pattern.pattern!r} selects no parameter: "
                       f"{why}.")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def trainable_mask(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None,
                   params: Any) -> Any:
  """A tree like ``params`` of Python bools: False for leaves of frozen groups.

  Give it to the steps (``trainable=``) so they never compute the frozen gradients (XLA then
  drops the backward pass of a frozen trunk), not only discard them.
  """
  labels = _label_params(_groups(_fields(cfg)["param_groups"]), params)
  return jax.tree_util.tree_map(lambda label: label != FROZEN_LABEL, labels)


def _validated(cfg, steps_per_epoch: int) -> dict[str, Any]:
  f = _fields(cfg)
  _positive_int("steps_per_epoch", steps_per_epoch)
  if f["optimizer"] not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {f['optimizer']!r}.")
  f["learning_rate"] = _real("learning_rate", f["learning_rate"], low=0.0, low_inclusive=False)
  f["lr_decay"] = _real("lr_decay", f["lr_decay"], low=0.0, low_inclusive=True)
  f["momentum"] = _real("momentum", f["momentum"], low=0.0, low_inclusive=True, high=1.0)
  if not isinstance(f["nesterov"], bool):
    raise ValueError(f"nesterov must be True or False; got {f['nesterov']!r}.")
  for beta in ("adam_b1", "adam_b2"):
    f[beta] = _real(beta, f[beta], low=0.0, low_inclusive=True, high=1.0)
  f["adam_eps"] = _real("adam_eps", f["adam_eps"], low=0.0, low_inclusive=True)
  f["weight_decay"] = _real("weight_decay", f["weight_decay"], low=0.0, low_inclusive=True)
  if f["grad_clip_norm"] is not None:
    f["grad_clip_norm"] = _real("grad_clip_norm", f["grad_clip_norm"], low=0.0,
                                low_inclusive=True)
  f["accumulate_steps"] = _positive_int("accumulate_steps", f["accumulate_steps"])
  f["groups"] = _groups(f["param_groups"])
  return f


def _update_schedule(f: dict[str, Any], steps_per_epoch: int) -> optax.Schedule:
  """The base learning rate as a function of the number of applied updates ``u``.

  Update ``u`` averages micro-batches ``u * k .. u * k + k - 1`` (``k = accumulate_steps``); it
  belongs to the epoch of its first micro-batch, ``floor(u * k / steps_per_epoch)``, computed in
  integers so that epoch boundaries never drift by a rounding error.
  """
  lr, decay, k = f["learning_rate"], f["lr_decay"], f["accumulate_steps"]

  def schedule(count):
    epoch = (jnp.asarray(count, jnp.int32) * k) // steps_per_epoch
    return lr * jnp.exp(-decay * epoch.astype(jnp.float32))

  return schedule


def make_schedule(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None,
                  steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """The base learning rate (multiplier 1) used at training step ``step`` (micro-batches),
  ``learning_rate * exp(-lr_decay * epoch)``; with accumulation, the rate of the update that
  step's gradient goes into. This is what the steps log as ``learning_rate``."""
  f = _validated(cfg, steps_per_epoch)
  schedule, k = _update_schedule(f, steps_per_epoch), f["accumulate_steps"]
  return lambda step: schedule(jnp.asarray(step, jnp.int32) // k)


def make_optimizer(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax chain the config describes (see the module docstring for the order).

  Args:
    cfg: fields of :func:`default_optimizer_config` (missing ones take defaults).
    steps_per_epoch: training steps (micro-batches) per epoch, for the decay schedule.

  Returns:
    An ``optax.GradientTransformation``. Its ``init`` raises ``ValueError`` if a
    ``param_groups`` pattern selects no parameter.

  Raises:
    ValueError: an invalid or unknown field, naming it.
  """
  f = _validated(cfg, steps_per_epoch)
  schedule, groups = _update_schedule(f, steps_per_epoch), f["groups"]

  def optimizer(multiplier: float) -> optax.GradientTransformation:
    lr = schedule if multiplier == 1.0 else (lambda count: multiplier * schedule(count))
    if f["optimizer"] == "adam":
      base = optax.adam(lr, b1=f["adam_b1"], b2=f["adam_b2"], eps=f["adam_eps"])
    else:
      base = optax.sgd(lr, momentum=f["momentum"] or None, nesterov=f["nesterov"])
    if f["weight_decay"]:
      return optax.chain(optax.add_decayed_weights(f["weight_decay"]), base)
    return base

  links = []
  frozen = any(m is None for _, m in groups)
  if frozen:
    # Before clipping, so that gradients of frozen parameters do not shrink the others.
    links.append(optax.multi_transform(
        {DEFAULT_LABEL: optax.identity(), FROZEN_LABEL: optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map(
            lambda label: FROZEN_LABEL if label == FROZEN_LABEL else DEFAULT_LABEL,
            _label_params(groups, params))))
  if f["grad_clip_norm"]:
    links.append(optax.clip_by_global_norm(f["grad_clip_norm"]))
  if groups:
    transforms = {DEFAULT_LABEL: optimizer(1.0)}
    if frozen:
      transforms[FROZEN_LABEL] = optax.set_to_zero()
    for i, (_, multiplier) in enumerate(groups):
      if multiplier is not None:
        transforms[f"group{i}"] = optimizer(multiplier)
    links.append(optax.multi_transform(transforms,
                                       lambda params: _label_params(groups, params)))
  else:
    links.append(optimizer(1.0))
  tx = links[0] if len(links) == 1 else optax.chain(*links)
  if f["accumulate_steps"] > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=f["accumulate_steps"]).gradient_transformation()
  return tx
