"""Argument checks of ``fit`` and ``train_step``: every one runs before anything compiles.

Each raises a ``ValueError`` (values, shapes) or ``TypeError`` (kinds) that names the argument,
what was expected and what arrived. Data checks trace the network and loss on one batch's
shapes (``jax.eval_shape``: nothing is computed or compiled) and re-raise their errors with the
data set's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks, _host
from funcnet._values import Static, combine, partition
from funcnet.layers import Layer
from funcnet.optimizers import Optimizer

__all__ = [
    "check_data",
    "check_fits_network",
    "check_flags",
    "check_key",
    "check_metrics",
    "check_params",
    "check_parts",
]


def check_parts(fn: str, net: Any, loss: Any, optimizer: Any) -> None:
    if not isinstance(net, Layer):
        raise TypeError(f"{fn}: net must be a Layer(init, apply), got {type(net).__name__}.")
    if not callable(loss):
        raise TypeError(f"{fn}: loss must be a callable (prediction, target) -> scalar, got {type(loss).__name__}.")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{fn}: optimizer must be an Optimizer(init, update), e.g. funcnet.sgd(0.01), "
            f"got {type(optimizer).__name__}."
        )


def check_data(name: str, data: Any) -> tuple[Any, Any]:
    """``data`` must be a pair ``(x, y)`` of arrays with matching rows, at least one, finite."""
    fn = "fit"
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{fn}: {name} must be a pair (x, y) of arrays, got {type(data).__name__}.")
    x, y = data
    for part, array in ((f"{name} x", x), (f"{name} y", y)):
        _checks.array(fn, part, array)
        if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
            raise TypeError(
                f"{fn}: {part} must have a floating or integer dtype (integers: labels or token "
                f"ids), got {array.dtype}."
            )
    if x.ndim < 2 and not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{fn}: {name} x must be at least 2-D (rows, features...), got shape {tuple(x.shape)}.")
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(
            f"{fn}: {name} x and y must have a row axis, got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: {name} x has {x.shape[0]} rows but y has {y.shape[0]}; they must match.")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must have at least one row, got 0.")
    for part, array in ((f"{name} x", x), (f"{name} y", y)):
        if not (jnp.issubdtype(array.dtype, jnp.floating) and _checks.is_concrete(array)):
            continue  # traced data (fit under vmap of the data) cannot be inspected here
        bad = _first_bad_row(array)
        if bad is not None:
            raise ValueError(f"{fn}: {part} must be finite, got NaN or Inf values (first at row {bad}).")
    return x, y


def _first_bad_row(array: Any) -> int | None:
    """The first row holding a NaN or Inf, or None. Host (NumPy) data is checked on the host, which
    compiles nothing; device data by a small compiled reduction, where it lives."""
    if isinstance(array, np.ndarray):
        rows = np.isfinite(array).reshape(array.shape[0], -1).all(axis=1)
    elif _host.is_global(array):  # spans processes: only the answer comes to the host
        first = int(_host.reduce_to_host(_first_bad_index, array))
        return None if first < 0 else first
    else:
        with jax.ensure_compile_time_eval():  # concrete data inside an outer jit/vmap too
            rows = np.asarray(_finite_rows(array))
    return None if rows.all() else int(np.argmin(rows))


def _first_bad_index(a: jax.Array) -> jax.Array:
    finite = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
    return jnp.where(jnp.all(finite), -1, jnp.argmin(finite))


@jax.jit
def _finite_rows(a: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)


def check_fits_network(
    name: str, net: Layer, loss: Any, metrics: dict[str, Any], params: Any, x: Any, y: Any, batch: int
) -> jax.ShapeDtypeStruct:
    """Trace (not compile) the network, loss and metrics on one batch's shapes; re-raise clearly.

    Returns the loss's shape and dtype. The answer depends on shapes and on the building blocks
    alone, so it is remembered: a sweep that calls ``fit`` again with equal ones traces nothing.
    """
    spec = lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    try:
        hash(static := partition((net.apply, loss, metrics))[1])
    except TypeError:  # a building block holding a traced number: trace every time
        return _trace_network(name, net.apply, loss, metrics, abstract, spec(x), spec(y))
    return _remembered(name, static, treedef, tuple(leaves), spec(x), spec(y))


@functools.lru_cache(maxsize=256)
def _remembered(
    name: str, static: Static, treedef: Any, leaves: tuple[Any, ...], x: jax.ShapeDtypeStruct, y: jax.ShapeDtypeStruct
) -> jax.ShapeDtypeStruct:
    apply, loss, metrics = combine([], static)
    return _trace_network(name, apply, loss, metrics, jax.tree_util.tree_unflatten(treedef, leaves), x, y)


def _trace_network(
    name: str, apply: Callable[..., Any], loss: Any, metrics: dict[str, Any], params: Any, x: Any, y: Any
) -> jax.ShapeDtypeStruct:
    def run(p: Any, xb: jax.Array, yb: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        prediction = apply(p, xb)
        return loss(prediction, yb), {name: metric(prediction, yb) for name, metric in metrics.items()}

    try:
        value, values = jax.eval_shape(run, params, x, y)
    except (ValueError, TypeError) as error:
        raise type(error)(f"fit: {name} does not fit the network and loss: {error}") from error
    for what, out in (("loss", value), *((f"metric {n!r}", v) for n, v in values.items())):
        if getattr(out, "shape", None) != ():
            raise ValueError(
                f"fit: the {what} must return a scalar (a mean over rows), got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )
    shape_dtype: jax.ShapeDtypeStruct = value
    return shape_dtype


def check_key(key: Any) -> None:
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        raise TypeError(f"fit: key must be a jax.random key, e.g. jax.random.PRNGKey(0), got {key!r}.")


def check_params(params: Any) -> None:
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("fit: params has no arrays to train (did you pass the output shape of init?).")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        _checks.floating("fit", f"params{jax.tree_util.keystr(path)}", leaf)


def check_metrics(metrics: Any, monitor: Any, mode: Any, has_eval: bool) -> dict[str, Any]:
    """``metrics`` maps names to callables; ``monitor`` is ``"loss"`` or one of them; ``mode`` min or max."""
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, dict):
        raise TypeError(
            f"fit: metrics must be a dict from name to (prediction, target) -> scalar, got {type(metrics).__name__}."
        )
    for name, metric in metrics.items():
        if not isinstance(name, str) or name == "loss":
            raise ValueError(
                f"fit: metrics names must be strings other than 'loss' (the eval loss is always "
                f"recorded), got {name!r}."
            )
        if not callable(metric):
            raise TypeError(
                f"fit: metrics[{name!r}] must be a callable (prediction, target) -> scalar, got "
                f"{type(metric).__name__}."
            )
    if metrics and not has_eval:
        raise ValueError(f"fit: metrics {sorted(metrics)} are computed on eval_data, which was not given.")
    if not isinstance(monitor, str) or (monitor != "loss" and monitor not in metrics):
        raise ValueError(f"fit: monitor must be 'loss' or a name in metrics {sorted(metrics)}, got {monitor!r}.")
    if mode not in ("min", "max"):
        raise ValueError(f"fit: mode must be 'min' or 'max', got {mode!r}.")
    return dict(sorted(metrics.items()))


def check_flags(**flags: Any) -> None:
    for flag, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"fit: {flag} must be a bool, got {type(value).__name__}.")
