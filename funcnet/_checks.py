"""Argument checks shared by the public functions (private).

Every check runs in Python on static information (types, shapes, dtypes), so it fires at
trace time, before anything compiles, and also under ``jit``/``vmap``. Messages follow one
form: ``"{function}: {argument} {expected}, got {actual}."``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core  # trace_state_clean: is any trace active?

from funcnet import _host


def is_array(value: Any) -> bool:
    """True for jax arrays, tracers and NumPy arrays (the leaves funcnet computes on)."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def array(fn: str, name: str, value: Any) -> Any:
    """Return ``value`` if it is an array; else a TypeError (lists are not silently converted)."""
    if not is_array(value):
        raise TypeError(
            f"{fn}: {name} must be an array (jax.Array or numpy.ndarray), got "
            f"{type(value).__name__}. Convert it first, e.g. jnp.asarray({name})."
        )
    return value


def wide(dtype: Any) -> np.dtype:
    """The dtype to accumulate ``dtype`` values in: float32 for float16 and bfloat16, else itself.

    (``jnp.promote_types(dtype, float32)`` says the same, but raises under strict dtype promotion.)
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32 else dtype


def rows(fn: str, name: str, value: Any) -> None:
    """``value`` must have at least one row (axis 0): means over rows of nothing are NaN."""
    if value.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must have at least one row, got shape {tuple(value.shape)}.")


def floating(fn: str, name: str, value: Any) -> Any:
    """``value`` must be a floating-point array."""
    array(fn, name, value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must have a floating dtype, got {value.dtype}. "
            f"Cast it first, e.g. {name}.astype(jnp.float32)."
        )
    return value


def same_dtype(fn: str, names: tuple[str, str], a: Any, b: Any) -> None:
    """Two floating arrays that meet in one op must share a dtype (no silent promotion)."""
    if a.dtype != b.dtype:
        raise TypeError(
            f"{fn}: {names[0]} and {names[1]} must share a dtype, got {a.dtype} and {b.dtype}. "
            f"Cast one of them, e.g. {names[0]}.astype({names[1]}.dtype)."
        )


def rank(fn: str, name: str, value: Any, ndim: int, layout: str) -> None:
    """``value`` must have exactly ``ndim`` dimensions, described by ``layout``."""
    if value.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D {layout}, got shape {tuple(value.shape)}.")


def positive_int(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    """A Python integer >= ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}.")
    return int(value)


def callable_(fn: str, name: str, value: Any) -> Any:
    """``value`` must be callable."""
    if not callable(value):
        raise TypeError(f"{fn}: {name} must be a callable, got {type(value).__name__}.")
    return value


def _min_max(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.min(a), jnp.max(a)


def value_range(value: Any) -> tuple[int, int]:
    """The smallest and largest entry of a concrete integer array, on the host (a concrete jax
    array closed over inside ``jit`` would be traced again by ``np.min``)."""
    if _host.is_global(value):  # spans processes: reduced where it lives, never fetched whole
        low, high = _host.reduce_to_host(_min_max, value)
        return int(low), int(high)
    host = np.asarray(value)
    return int(host.min()), int(host.max())


def class_ids(fn: str, target: Any, classes: int, of: str) -> None:
    """Concrete integer labels ``target`` must each name one of ``classes`` classes (of ``of``)."""
    low, high = value_range(target)
    if low < 0 or high >= classes:
        raise ValueError(
            f"{fn}: integer target must lie in [0, {classes}) for the {classes} classes of {of}, got values "
            f"from {low} to {high}."
        )


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds data we can inspect now (not a tracer under jit/vmap/grad)."""
    return not isinstance(value, jax.core.Tracer)


def tracing() -> bool:
    """True while a transformation (jit, vmap, grad) traces the current call into a larger
    program; False at the top level. JAX-internal: without it, False."""
    clean = getattr(jax_core, "trace_state_clean", lambda: True)
    return not clean()


def real_number(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A real hyperparameter inside [low, high] (ends open when asked); tracers pass unchecked."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_array(value)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}.")
    if is_array(value):
        if np.ndim(value) != 0:
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {np.shape(value)}.")
        if not is_concrete(value):
            return
        value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{fn}: {name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value}.")
