"""Argument checks of ``fit`` and ``train_step``: every one runs before anything compiles.

Each raises a ``ValueError`` (values, shapes) or ``TypeError`` (kinds) that names the argument,
what was expected and what arrived. Data checks trace the network and loss on one batch's
shapes (``jax.eval_shape``: nothing is computed or compiled) and re-raise their errors with the
data set's name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks, _host
from funcnet._values import Static, combine, partition
from funcnet.layers import Layer, given_inputs, is_init_output, layer_inputs, params_text, train_mode
from funcnet.optimizers import Optimizer

__all__ = [
    "check_data",
    "check_fits_network",
    "check_flags",
    "check_inputs",
    "check_key",
    "check_labels",
    "check_metrics",
    "check_params",
    "check_parts",
    "split_data",
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


# Keywords ``fit`` passes to the network itself: an input of these names would collide with them.
_RESERVED = ("params", "x", "key", "row_mask")


def split_data(name: str, data: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(x, y, inputs)`` of ``fit``'s data: a pair ``(x, y)`` (no inputs) or a triple ``(x, y,
    inputs)`` whose ``inputs`` is a dict ``{name: array}`` of the inputs beyond ``x`` (``None``
    values count as not given). Checks the form only, not the arrays."""
    fn = "fit"
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        got = f"a {type(data).__name__} of {len(data)}" if isinstance(data, (tuple, list)) else type(data).__name__
        raise TypeError(
            f"{fn}: {name} must be a pair (x, y) of arrays, or a triple (x, y, inputs) with inputs a dict "
            f"{{name: array}} of the inputs beyond x (e.g. {{'kv_lengths': lengths}}), got {got}."
        )
    if len(data) == 2:
        return data[0], data[1], {}
    x, y, inputs = data
    if not isinstance(inputs, dict):
        raise TypeError(
            f"{fn}: {name}'s third element must be a dict {{name: array}} of the inputs beyond x, passed to "
            f"the network as keywords (e.g. {{'kv_lengths': lengths}}), got {type(inputs).__name__}."
        )
    for key in inputs:
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"{fn}: {name} inputs' names must be keywords of the network's apply, got {key!r}.")
        if key in _RESERVED:
            raise ValueError(
                f"{fn}: {name} inputs may not be named {key!r}: fit passes params, x, key= (dropout) and "
                "row_mask= (the rows of batch statistics) to the network itself."
            )
    return x, y, {key: value for key, value in sorted(inputs.items()) if value is not None}


def check_input_rows(fn: str, name: str, inputs: dict[str, Any], rows: int) -> None:
    """Each input has ``rows`` rows first, as ``x`` has (``name``: how the inputs are called)."""
    for key, value in inputs.items():
        shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
        if not shape:
            raise ValueError(
                f"{fn}: {name}[{key!r}] must have the rows first, like x ({rows} rows), got a scalar of shape ()."
            )
        if shape[0] != rows:
            raise ValueError(
                f"{fn}: {name}[{key!r}] has {shape[0]} rows but x has {rows}; each input holds one entry per "
                "row of x, rows first."
            )


def check_inputs(fn: str, name: str, net: Layer, inputs: dict[str, Any], rows: int | None = None) -> dict[str, Any]:
    """The inputs given (``None`` dropped), each one the network takes (``funcnet.layers.layer_inputs``;
    else the layers' ``TypeError``, prefixed with ``fn`` and ``name``) and, with ``rows``, each
    with that many rows."""
    given = given_inputs(f"{fn}: {name}", layer_inputs(net), inputs)
    if rows is not None:
        check_input_rows(fn, name, given, rows)
    return given


def check_data(name: str, data: Any) -> tuple[Any, Any, str | None, dict[str, Any]]:
    """``data`` must be a pair ``(x, y)`` of arrays with matching rows, at least one, finite; or a
    triple ``(x, y, inputs)`` (``split_data``) whose inputs are arrays with those rows too.

    Returns ``(x, y, digest, inputs)``: the digest of every array's values (None for traced
    data), which a checkpoint's fingerprint holds."""
    fn = "fit"
    x, y, inputs = split_data(name, data)
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
    for key, value in inputs.items():
        part = f"{name} inputs[{key!r}]"
        _checks.array(fn, part, value)
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == np.bool_):
            raise TypeError(f"{fn}: {part} must have a numeric or bool dtype, got {value.dtype}.")
    check_input_rows(fn, f"{name} inputs", inputs, x.shape[0])
    parts = ((f"{name} x", x), (f"{name} y", y), *((f"{name} inputs[{k!r}]", v) for k, v in inputs.items()))
    digests: list[str] = []
    inspected: dict[int, tuple[int | None, str]] = {}  # one array given twice (random_windows' x, y): read once
    for part, array in parts:
        if not _checks.is_concrete(array):
            continue  # traced data (fit under vmap of the data) cannot be inspected here
        if id(array) not in inspected:
            inspected[id(array)] = _inspect(array)
        bad, digest = inspected[id(array)]
        if bad is not None:
            raise ValueError(f"{fn}: {part} must be finite, got NaN or Inf values (first at row {bad}).")
        digests.append(digest)
    return x, y, data_digest(digests, inputs) if len(digests) == len(parts) else None, inputs


def data_digest(digests: list[str], inputs: dict[str, Any]) -> str:
    """One data set's digest: ``x``'s and ``y``'s, then each input's by name (none: as without inputs)."""
    return "/".join([*digests[:2], *(f"{key}={d}" for key, d in zip(inputs, digests[2:], strict=True))])


def _inspect(array: Any) -> tuple[int | None, str]:
    """One pass over the data: the first row holding a NaN or Inf (None if none, or if not
    floating), and a digest of the values (``_digest``). Host (NumPy) data is read on the host,
    which compiles nothing; device data by a small compiled reduction, where it lives."""
    floating = bool(jnp.issubdtype(array.dtype, jnp.floating))
    if isinstance(array, np.ndarray):
        rows = np.isfinite(array).reshape(array.shape[0], -1).all(axis=1) if floating else None
        digest = _digest(np, _words(np, np.ascontiguousarray(array)))
    elif _host.is_global(array):  # spans processes: only the (replicated) answers come to the host
        first, digest = _host.reduce_to_host(_inspect_everywhere, array)
        return (None if int(first) < 0 else int(first)), "".join(f"{int(d):08x}" for d in digest)
    else:
        with jax.ensure_compile_time_eval():  # concrete data inside an outer jit/vmap too
            rows, digest = jax.device_get(_inspect_on_device(array, floating))
    bad = None if rows is None or rows.all() else int(np.argmin(rows))
    return bad, "".join(f"{int(d):08x}" for d in digest)


_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def _words(xp: Any, a: Any) -> Any:
    """The bits of ``a``'s values as one flat row of uint32 words (NumPy and jax.numpy alike)."""
    if a.dtype == np.bool_:
        return a.reshape(-1).astype(xp.uint32)
    bits = (
        a.view(_UNSIGNED[a.dtype.itemsize])
        if xp is np
        else jax.lax.bitcast_convert_type(a, _UNSIGNED[a.dtype.itemsize])
    )
    bits = bits.reshape(-1)
    if a.dtype.itemsize < 8:
        return bits.astype(xp.uint32)
    low = (bits & xp.uint64(0xFFFFFFFF)).astype(xp.uint32)
    return xp.concatenate([low, (bits >> xp.uint64(32)).astype(xp.uint32)])


def _digest(xp: Any, words: Any, start: int = 0) -> Any:
    """Two 32-bit sums of the words, each mixed with its position (murmur3's finaliser): a change to
    any value or any order changes them but with chance 2**-64. Not cryptographic: it tells one
    data set from another, it does not resist an adversary. Sums of parts add up (mod 2**32), so
    ``start`` (the position of ``words[0]``) lets a streamed fit digest its data a part at a time."""
    index = xp.arange(words.shape[0], dtype=xp.uint32) + xp.uint32(start % 2**32)
    h = words * xp.uint32(0x9E3779B1) + index * xp.uint32(0x85EBCA77) + xp.uint32(1)
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    h = h ^ (h >> xp.uint32(16))
    return xp.stack([xp.sum(h, dtype=xp.uint32), xp.sum(h * (index | xp.uint32(1)), dtype=xp.uint32)])


def _inspect_everywhere(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``_inspect`` of a global array, as two small results: the first bad row (-1: none) and the
    digest, equal to ``_digest(jnp, _words(jnp, a))`` but without concatenating an 8-byte array's
    low and high words (over sharded words a concatenation would move them between devices)."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
        first = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    else:
        first = jnp.asarray(-1)
    if a.dtype == np.bool_ or a.dtype.itemsize < 8:
        return first, _digest(jnp, _words(jnp, a))
    bits = jax.lax.bitcast_convert_type(a, _UNSIGNED[8]).reshape(-1)
    low, high = (bits & jnp.uint64(0xFFFFFFFF)).astype(jnp.uint32), (bits >> jnp.uint64(32)).astype(jnp.uint32)
    return first, _digest(jnp, low) + _digest(jnp, high, low.shape[0])


@functools.partial(jax.jit, static_argnames="floating")
def _inspect_on_device(a: jax.Array, floating: bool) -> tuple[jax.Array | None, jax.Array]:
    rows = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1) if floating else None
    return rows, _digest(jnp, _words(jnp, a))


def check_fits_network(
    name: str,
    net: Layer,
    loss: Any,
    metrics: dict[str, Any],
    params: Any,
    x: Any,
    y: Any,
    batch: int,
    *,
    train: bool = False,
    inputs: dict[str, Any] | None = None,
) -> jax.ShapeDtypeStruct:
    """Trace (not compile) the network, loss and metrics on one batch's shapes; re-raise clearly.
    With ``train``, the network runs in training mode (``funcnet.train_apply``); ``inputs``
    (the batch's inputs beyond ``x``, rows first) reach it as keywords.

    Returns the loss's shape and dtype. The answer depends on shapes and on the building blocks
    alone, so it is remembered: a sweep that calls ``fit`` again with equal ones traces nothing.
    """
    spec = lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    numbers, static = partition((net.apply, loss, metrics))
    # The numbers inside the building blocks (a ``Partial``'s arguments) take part as abstract
    # values: the answer depends on their shapes and dtypes only.
    shaped = tuple(jax.ShapeDtypeStruct(np.shape(n), jnp.result_type(n), weak_type=_weak(n)) for n in numbers)
    extra = tuple((k, spec(a)) for k, a in sorted((inputs or {}).items()))
    try:
        hash(static)
    except TypeError:  # a building block holding an unhashable leaf: trace every time
        value, prediction = _trace_network(name, static, shaped, abstract, spec(x), spec(y), train, extra)
    else:
        value, prediction = _remembered(name, static, shaped, treedef, tuple(leaves), spec(x), spec(y), train, extra)
    check_labels(name, prediction, y, _ignored_label(loss))
    return value


def _ignored_label(loss: Any) -> int | None:
    """The label a loss leaves out (``functools.partial(fn.softmax_cross_entropy, ignore_index=k)``'s ``k``)."""
    keywords = getattr(loss, "keywords", None)
    ignore = keywords.get("ignore_index") if isinstance(keywords, dict) else None
    return ignore if isinstance(ignore, int) else None


def _weak(number: Any) -> bool:
    return not _checks.is_array(number) or bool(getattr(number, "weak_type", False))


@functools.lru_cache(maxsize=256)
def _remembered(
    name: str,
    static: Static,
    numbers: tuple[jax.ShapeDtypeStruct, ...],
    treedef: Any,
    leaves: tuple[Any, ...],
    x: jax.ShapeDtypeStruct,
    y: jax.ShapeDtypeStruct,
    train: bool,
    inputs: tuple[tuple[str, jax.ShapeDtypeStruct], ...],
) -> tuple[jax.ShapeDtypeStruct, Any]:
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return _trace_network(name, static, numbers, params, x, y, train, inputs)


def _trace_network(
    name: str,
    static: Static,
    numbers: tuple[Any, ...],
    params: Any,
    x: Any,
    y: Any,
    train: bool,
    inputs: tuple[tuple[str, Any], ...] = (),
) -> tuple[jax.ShapeDtypeStruct, Any]:
    """The loss's shape and dtype, and the prediction's (both abstract)."""

    def run(
        numbers: tuple[Any, ...], p: Any, xb: jax.Array, yb: jax.Array, ib: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        apply, loss, metrics = combine(list(numbers), static)
        prediction = train_mode(apply)(p, xb, key=jax.random.PRNGKey(0), **ib)[0] if train else apply(p, xb, **ib)
        return loss(prediction, yb), {name: metric(prediction, yb) for name, metric in metrics.items()}, prediction

    try:
        value, values, prediction = jax.eval_shape(run, numbers, params, x, y, dict(inputs))
    except (ValueError, TypeError) as error:
        raise type(error)(f"fit: {name} does not fit the network and loss: {error}") from error
    for what, out in (("loss", value), *((f"metric {n!r}", v) for n, v in values.items())):
        if getattr(out, "shape", None) != ():
            raise ValueError(
                f"fit: the {what} must return a scalar (a mean over rows), got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )
    shape_dtype: jax.ShapeDtypeStruct = value
    return shape_dtype, prediction


def check_labels(name: str, prediction: Any, y: Any, ignore: int | None = None) -> None:
    """Integer ``y`` shaped like the prediction without its last axis are class indices into that
    axis (the convention of ``softmax_cross_entropy`` and ``accuracy``), so they must lie in
    ``[0, classes)``, or equal the loss's ``ignore_index`` (``ignore``: padded targets). Checked on
    the data before anything compiles, whenever ``y`` is concrete: under
    ``jit`` a loss sees traced labels and ``one_hot`` would turn a stray label into a zero row,
    which trains silently on a wrong target and reports an eval loss of 0."""
    if not isinstance(prediction, jax.ShapeDtypeStruct) or not jnp.issubdtype(y.dtype, jnp.integer):
        return
    shape = tuple(y.shape)  # y may be a streamed object with a shape (``stream.py``), not an array
    if prediction.ndim != len(shape) + 1 or tuple(prediction.shape[1:-1]) != shape[1:] or not math.prod(shape):
        return  # not class indices of this prediction: the loss decides what they mean
    if not _checks.is_concrete(y):
        return  # traced labels (fit under vmap of the data) cannot be inspected here
    classes = int(prediction.shape[-1])
    low, high = _label_range(y, ignore)
    if low < 0 or high >= classes:
        hint = (
            f"shift them to start at 0 (y - {low})"
            if high - low < classes
            else f"give the network's last layer {high + 1} outputs"
        )
        raise ValueError(
            f"fit: {name} y holds integer class labels from {low} to {high}, but the network has {classes} "
            f"classes (its output's last axis), so they must lie in [0, {classes}); {hint}. Targets that "
            "are not class indices must be floating; padded targets are left out by the loss's ignore_index, "
            "e.g. functools.partial(fn.softmax_cross_entropy, ignore_index=-1)."
        )


def _label_range(y: Any, ignore: int | None = None) -> tuple[int, int]:
    """The smallest and largest label other than ``ignore`` (0 stands in for it), on the host when
    the data are there (compiling nothing)."""
    kept = lambda a: a if ignore is None else np.where(a == ignore, 0, a)
    if not _checks.is_array(y):  # a streamed object indexable by rows: read 65,536 rows at a time
        ranges = [
            _checks.value_range(kept(np.asarray(y[np.arange(start, min(start + 65_536, y.shape[0]))])))
            for start in range(0, y.shape[0], 65_536)
        ]
        return min(low for low, _ in ranges), max(high for _, high in ranges)
    if isinstance(y, (np.ndarray, np.generic)) or y.is_fully_addressable:
        return _checks.value_range(kept(np.asarray(y)))
    with jax.ensure_compile_time_eval():  # a global array over several processes
        low, high = _min_max(y if ignore is None else jnp.where(y == ignore, 0, y))
    return int(low), int(high)


@jax.jit
def _min_max(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.min(a), jnp.max(a)


Fit = TypeVar("Fit", bound=Callable[..., Any])

MISSING_KEY = (
    "fit() missing 1 required keyword-only argument: 'key'. It is the jax.random key every epoch's "
    "randomness derives from: the shuffle order of the rows and the dropout keys (epoch e's from (key, e) "
    "alone, so a run is reproducible and resumes exactly). It is required even when nothing is random "
    "(shuffle=False, no dropout): pass key=jax.random.PRNGKey(0)."
)


def explains_missing_key(fit: Fit) -> Fit:
    """``fit`` whose ``TypeError`` for a missing ``key`` says what the key is for and what to pass
    (Python's own names only the argument). Everything else passes through untouched."""

    @functools.wraps(fit)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if "key" not in kwargs:
            raise TypeError(MISSING_KEY)
        return fit(*args, **kwargs)

    return checked  # type: ignore[return-value]  # the same signature (functools.wraps)


def check_key(key: Any) -> None:
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        raise TypeError(f"fit: key must be a jax.random key, e.g. jax.random.PRNGKey(0), got {key!r}.")


def check_params(params: Any) -> None:
    if is_init_output(params):
        raise TypeError(
            f"fit: params must be the network's params, got {params_text(params)}: init returns "
            "(output_shape, params); unpack it: _, params = net.init(key, input_shape)."
        )
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
