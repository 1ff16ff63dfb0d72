"""Argument checks shared by the functional core.

Every check raises ``ValueError`` naming the argument, what was expected and what was given.
Value checks (finiteness, ranges) run only on concrete arrays: under ``jax.jit`` the values are
tracers and only static properties (rank, shape) can be checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def is_concrete(x) -> bool:
  """True when ``x`` holds values on the host side of a trace (not a ``jax.core.Tracer``)."""
  return not isinstance(x, jax.core.Tracer)


def check_ndim(name: str, x, ndim: int | Sequence[int], layout: str = "") -> None:
  """Raises if ``x`` does not have ``ndim`` (or one of several) dimensions."""
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if np.ndim(x) not in allowed:
    want = " or ".join(f"{d}-D" for d in allowed)
    layout = f" {layout}" if layout else ""
    raise ValueError(
        f"{name} must be a {want} array{layout}; got shape {tuple(np.shape(x))}.")


def check_finite(name: str, x) -> None:
  """Raises if a concrete ``x`` holds NaN or infinite values (no-op under tracing)."""
  if not is_concrete(x):
    return
  # x.dtype, not np.result_type(x): numpy deprecates reading a dtype off a jax array.
  if not np.issubdtype(x.dtype if hasattr(x, "dtype") else np.result_type(x), np.inexact):
    return
  if isinstance(x, jax.Array) and bool(jax.numpy.isfinite(x).all()):
    return  # reduced on the device: no host copy of a large device-resident array
  bad = ~np.isfinite(np.asarray(x))
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name} must be finite; it has {int(bad.sum())} NaN/inf value(s), the first at index "
        f"{first}.")


def check_positive_int(name: str, value) -> int:
  """Returns ``value`` as an int, raising unless it is an integer >= 1 (``True`` is refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer; got {value!r}.")
  return int(value)
