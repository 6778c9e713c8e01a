"""Training as pure, compiled functions (book: ``Trainer``).

``fit`` is one XLA program: shuffling, batching, the steps, evaluation every ``eval_every``
epochs and early stopping, with no data moved between host and device while it runs. It
compiles once per network, loss, optimizer, configuration and data shape.

Semantics, stated once:

* Epoch ``e`` (counted from 0) draws its shuffle order and dropout keys from
  ``jax.random.fold_in(key, e)`` alone: 10 epochs are the first 10 of a 50-epoch run, and a
  run resumed at ``start_epoch`` equals an uninterrupted one.
* Every row is used every epoch, as in the book: when ``batch_size`` does not divide the
  row count the last batch is smaller. With static shapes it is padded (with real rows) and
  masked: the loss is evaluated row by row (``vmap`` over one-row batches, which is exact for
  losses that are means over rows, as both of the book's are) and averaged over real rows.
  ``drop_last=True`` drops the remainder instead.
* Evaluation happens after epochs ``e`` with ``(e + 1) % eval_every == 0`` (the book's rule),
  on the whole eval set in inference mode (no key). An evaluation improves when
  ``eval_loss < best - min_delta``; after ``patience + 1`` evaluations in a row without
  improvement training stops (``patience=0`` is the book: stop at the first). The result
  holds the params of the best evaluation, as the book's trainer restores them.
* A non-finite training or eval loss stops training too (``diverged``); the result keeps the
  last finite best: with eval data the best evaluation, without it the params after the last
  epoch whose loss was finite.
* Once stopped, epochs are skipped by ``lax.cond`` and cost nothing. Under ``vmap`` that
  ``cond`` becomes a select, so stopped members of an ensemble ride along, frozen.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcnet import _checks
from funcnet.layers import Layer
from funcnet.optimizers import Optimizer

__all__ = ["train_step", "fit", "FitResult", "History", "epoch_order"]

Params = Any
Loss = Callable[[jax.Array, jax.Array], jax.Array]


class History(NamedTuple):
    """``train_loss[i]``: mean loss of epoch ``start_epoch + i`` (NaN where not run);
    ``eval_loss[j]``: loss of the j-th scheduled evaluation, taken after ``eval_epoch[j]``
    epochs (NaN where not run)."""

    train_loss: jax.Array
    eval_loss: jax.Array
    eval_epoch: jax.Array


class FitResult(NamedTuple):
    """What ``fit`` returns (a pytree, so ``vmap``-ed fits return stacked results)."""

    params: Params        # with eval data: the best evaluation's; without: the final (last finite) ones
    opt_state: Any        # the optimizer state that goes with ``params``'s training run
    history: History
    best_epoch: jax.Array     # epochs trained when ``params`` was taken
    stopped_epoch: jax.Array  # epochs trained when training stopped (``epochs`` if it never did)
    diverged: jax.Array       # a training or eval loss was not finite


def _loss_fn(net: Layer, loss: Loss, masked: bool):
    """``(params, x, y, mask, key) -> loss``; with ``masked``, a mean over the real rows only."""

    def batch_loss(params, x, y, mask, key):
        prediction = net.apply(params, x, key=key)
        if not masked:
            return loss(prediction, y)
        per_row = jax.vmap(lambda p, t: loss(p[None], t[None]))(prediction, y)
        return jnp.sum(jnp.where(mask, per_row, 0)) / jnp.sum(mask).astype(per_row.dtype)

    return batch_loss


def train_step(net: Layer, loss: Loss, optimizer: Optimizer, *, mesh: Mesh | None = None,
               data_axis: str = "data"):
    """A pure ``step(params, opt_state, x, y, key) -> (params, opt_state, loss)``. Book: one
    ``Trainer`` batch (``train_batch`` + ``optim.step``).

    ``key`` drives dropout; ``None`` trains without it. Wrap it in ``jax.jit`` (or call it
    inside ``lax.scan``) yourself. With ``mesh``, the batch is sharded along ``data_axis``
    (see ``fit``).
    """
    _check_parts("train_step", net, loss, optimizer)
    batch_loss = _loss_fn(net, loss, masked=False)
    shard = _batch_sharding("train_step", mesh, data_axis)

    def step(params, opt_state, x, y, key):
        if shard is not None:
            _check_divisible("train_step", "x rows", x.shape[0], mesh, data_axis)
            x, y = shard(x), shard(y)
        value, grads = jax.value_and_grad(batch_loss)(params, x, y, None, key)
        params, opt_state = optimizer.update(grads, opt_state, params)
        return params, opt_state, value

    return step


def epoch_order(key: jax.Array, epoch, rows: int, shuffle: bool = True) -> tuple[jax.Array, jax.Array]:
    """Epoch ``epoch``'s row order and dropout key: a function of ``(key, epoch)`` alone.

    Public so that an outside loop (or the book's NumPy trainer in the tests) can replay
    exactly the batches ``fit`` sees.
    """
    order_key, dropout_key = jax.random.split(jax.random.fold_in(key, epoch))
    order = jax.random.permutation(order_key, rows) if shuffle else jnp.arange(rows)
    return order, dropout_key


def _batch_sharding(fn: str, mesh, data_axis: str):
    """A function constraining a batch's rows to ``data_axis`` of ``mesh`` (None: no mesh)."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if data_axis not in mesh.axis_names:
        raise ValueError(f"{fn}: data_axis {data_axis!r} is not an axis of the mesh, whose axes are "
                         f"{mesh.axis_names}.")
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    return lambda a: lax.with_sharding_constraint(a, sharding)


def _check_divisible(fn: str, what: str, size: int, mesh, data_axis: str) -> None:
    devices = mesh.shape[data_axis]
    if size % devices:
        raise ValueError(f"{fn}: {what} ({size}) must divide by the {devices} devices of mesh axis "
                         f"{data_axis!r}; choose a multiple of {devices}.")


class _Config(NamedTuple):
    """Everything static about a fit: it selects the compiled program."""

    rows: int
    batch_size: int
    batches: int
    epochs: int
    start_epoch: int
    eval_every: int
    patience: int
    shuffle: bool
    masked: bool
    has_eval: bool
    progress: bool
    mesh: Mesh | None
    data_axis: str


class _Carry(NamedTuple):
    params: Params
    opt_state: Any
    best_params: Params
    best_opt_state: Any
    best_loss: jax.Array
    best_epoch: jax.Array
    bad_evals: jax.Array
    stopped: jax.Array
    stopped_epoch: jax.Array
    diverged: jax.Array


def _select(flag, a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.where(flag, u, v), a, b)


def _program(params, opt_state, x, y, eval_x, eval_y, key, min_delta, *, net, loss, optimizer, config):
    c = config
    batch_loss = _loss_fn(net, loss, c.masked)
    shard = _batch_sharding("fit", c.mesh, c.data_axis) or (lambda a: a)
    value_and_grad = jax.value_and_grad(batch_loss)
    padded = c.batches * c.batch_size
    used_rows = c.rows if c.masked else padded  # unmasked: full batches only (all rows, or drop_last)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype if jax.tree_util.tree_leaves(params) else x.dtype

    def train_epoch(carry: _Carry, epoch):
        order, dropout_key = epoch_order(key, epoch, c.rows, c.shuffle)
        if padded > c.rows:  # pad with real rows, masked out of the loss
            order = jnp.concatenate([order, order[: padded - c.rows]])
        batches = order[:padded].reshape(c.batches, c.batch_size)
        masks = (jnp.arange(padded) < c.rows).reshape(c.batches, c.batch_size)

        def step(state, batch):
            params, opt_state = state
            index, mask, b = batch
            value, grads = value_and_grad(params, shard(x[index]), shard(y[index]), shard(mask),
                                          jax.random.fold_in(dropout_key, b))
            params, opt_state = optimizer.update(grads, opt_state, params)
            rows = jnp.sum(mask).astype(value.dtype) if c.masked else c.batch_size
            return (params, opt_state), value * rows

        (params, opt_state), sums = lax.scan(step, (carry.params, carry.opt_state),
                                             (batches, masks, jnp.arange(c.batches)))
        train_loss = jnp.sum(sums) / used_rows
        is_eval = (epoch + 1) % c.eval_every == 0
        if c.has_eval:
            eval_loss = lax.cond(is_eval, lambda p: loss(net.apply(p, eval_x), eval_y).astype(train_loss.dtype),
                                 lambda p: jnp.full((), jnp.nan, train_loss.dtype), params)
            diverged = ~jnp.isfinite(train_loss) | (is_eval & ~jnp.isfinite(eval_loss))
            improved = is_eval & ~diverged & (eval_loss < carry.best_loss - min_delta)
            bad_evals = jnp.where(improved, 0, carry.bad_evals + (is_eval & ~improved).astype(jnp.int32))
            stop = diverged | (bad_evals > c.patience)
            best_loss = jnp.where(improved, eval_loss, carry.best_loss)
        else:
            eval_loss = jnp.full((), jnp.nan, train_loss.dtype)
            diverged = ~jnp.isfinite(train_loss)
            improved, stop, bad_evals, best_loss = ~diverged, diverged, carry.bad_evals, carry.best_loss
        new = _Carry(params, opt_state,
                     _select(improved, params, carry.best_params),
                     _select(improved, opt_state, carry.best_opt_state),
                     best_loss, jnp.where(improved, epoch + 1, carry.best_epoch), bad_evals,
                     stop, jnp.where(stop, epoch + 1, carry.stopped_epoch), diverged)
        return new, (train_loss, eval_loss)

    def skip_epoch(carry: _Carry, epoch):
        del epoch
        nan = jnp.full((), jnp.nan, dtype)
        return carry, (nan, nan)

    def epoch_body(carry, epoch):
        carry, losses = lax.cond(carry.stopped, skip_epoch, train_epoch, carry, epoch)
        if c.progress:
            jax.debug.callback(_progress_tick, epoch, *losses)
        return carry, losses

    int_ = lambda v: jnp.asarray(v, jnp.int32)
    init = _Carry(params, opt_state, params, opt_state, jnp.asarray(jnp.inf, dtype), int_(c.start_epoch),
                  int_(0), jnp.asarray(False), int_(c.epochs), jnp.asarray(False))
    carry, (train_loss, eval_loss) = lax.scan(
        epoch_body, init, jnp.arange(c.start_epoch, c.epochs, dtype=jnp.int32))
    eval_epochs = np.array([e + 1 for e in range(c.start_epoch, c.epochs) if (e + 1) % c.eval_every == 0], np.int32)
    history = History(train_loss, eval_loss[eval_epochs - 1 - c.start_epoch], jnp.asarray(eval_epochs))
    return FitResult(carry.best_params, carry.best_opt_state, history, carry.best_epoch,
                     carry.stopped_epoch, carry.diverged)


_compiled = jax.jit(_program, static_argnames=("net", "loss", "optimizer", "config"))


# --- Progress (a module-level sink, so the compiled program does not change per call) -------

_bar: Any = None


def _progress_tick(epoch, train_loss, eval_loss):
    if _bar is None or np.isnan(train_loss):  # not running, or a skipped (stopped) epoch
        if _bar is not None and hasattr(_bar, "update"):
            _bar.update(1)
        return
    text = f"train {float(train_loss):.4g}" + ("" if np.isnan(eval_loss) else f" eval {float(eval_loss):.4g}")
    if hasattr(_bar, "set_postfix_str"):
        _bar.set_postfix_str(text, refresh=False)
        _bar.update(1)
    else:
        print(f"epoch {int(epoch) + 1}: {text}", flush=True)


def _open_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to one line per epoch
        return object()
    return tqdm(total=total, initial=initial, unit="epoch", desc="fit")


# --- Validation: every check runs before anything compiles ---------------------------------


def _check_parts(fn: str, net, loss, optimizer) -> None:
    if not isinstance(net, Layer):
        raise TypeError(f"{fn}: net must be a Layer(init, apply), got {type(net).__name__}.")
    if not callable(loss):
        raise TypeError(f"{fn}: loss must be a callable (prediction, target) -> scalar, got {type(loss).__name__}.")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{fn}: optimizer must be an Optimizer(init, update), e.g. funcnet.sgd(0.01), "
                        f"got {type(optimizer).__name__}.")


def _check_data(name: str, data) -> tuple[jax.Array, jax.Array]:
    fn = "fit"
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{fn}: {name} must be a pair (x, y) of arrays, got {type(data).__name__}.")
    x, y = data
    _checks.floating(fn, f"{name} x", x)
    _checks.array(fn, f"{name} y", y)
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise TypeError(f"{fn}: {name} y must have a floating or integer dtype, got {y.dtype}.")
    if x.ndim < 2:
        raise ValueError(f"{fn}: {name} x must be at least 2-D (rows, features...), got shape {tuple(x.shape)}.")
    if y.ndim < 1:
        raise ValueError(f"{fn}: {name} y must have a row axis, got shape {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: {name} x has {x.shape[0]} rows but y has {y.shape[0]}; they must match.")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must have at least one row, got 0.")
    for part, array in ((f"{name} x", x), (f"{name} y", y)):
        if not (jnp.issubdtype(array.dtype, jnp.floating) and _checks.is_concrete(array)):
            continue  # traced data (fit under vmap of the data) cannot be inspected here
        with jax.ensure_compile_time_eval():  # concrete data inside an outer jit/vmap too
            if not bool(_all_finite(array)):
                raise ValueError(f"{fn}: {part} must be finite, got NaN or Inf values "
                                 f"(first at row {int(_first_bad_row(array))}).")
    return x, y


@jax.jit
def _all_finite(a):
    return jnp.all(jnp.isfinite(a))


@jax.jit
def _first_bad_row(a):
    return jnp.argmax(~jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1))


def _check_fits_network(name, net, loss, params, x, y, batch) -> None:
    """Trace (not compile) the network and loss on one batch's shapes; re-raise clearly."""
    spec = lambda a, rows: jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype)
    try:
        jax.eval_shape(lambda p, xb, yb: loss(net.apply(p, xb), yb), params, spec(x, batch), spec(y, batch))
    except (ValueError, TypeError) as error:
        raise type(error)(f"fit: {name} does not fit the network and loss: {error}") from error


def fit(net: Layer, loss: Loss, optimizer: Optimizer, params: Params,
        train_data: tuple[jax.Array, jax.Array], eval_data: tuple[jax.Array, jax.Array] | None = None, *,
        epochs: int, batch_size: int = 32, eval_every: int = 10, patience: int = 0,
        min_delta: float = 0.0, key: jax.Array, shuffle: bool = True, drop_last: bool = False,
        progress: bool = False, opt_state: Any = None, start_epoch: int = 0,
        mesh: Mesh | None = None, data_axis: str = "data") -> FitResult:
    """Train ``net`` on ``train_data`` as one compiled program. Book: ``Trainer.fit``.

    Args:
      net, loss, optimizer: the network, the loss ``(prediction, target) -> scalar`` (a mean
        over rows) and the optimizer.
      params: initial params, e.g. ``net.init(key, input_shape)[1]``.
      train_data, eval_data: pairs ``(x, y)``; x floating with rows first, y floating or
        integer labels.
      epochs: train until this many epochs are done (counting from 0, also when resuming).
      batch_size: rows per step; the last batch may be smaller (see ``drop_last``).
      eval_every, patience, min_delta: the early-stopping schedule (module docstring).
      key: a ``jax.random`` key; epoch ``e`` uses ``fold_in(key, e)``.
      shuffle: a fresh order every epoch (else the data order).
      drop_last: drop the remainder rows each epoch instead of a smaller last batch.
      progress: show a progress bar (tqdm if installed, else a line per epoch).
      opt_state, start_epoch: resume from a checkpoint: train epochs ``start_epoch`` to
        ``epochs - 1`` from this optimizer state. Early stopping starts afresh.
      mesh, data_axis: data parallelism. Each batch is sharded along ``data_axis`` of the
        ``jax.sharding.Mesh``, params and optimizer state are replicated, and XLA's SPMD
        partitioner averages the gradients with collectives. ``batch_size`` must divide by
        that axis's device count. Data may already be sharded ``jax.Array``s (multi-host).
    Returns:
      A ``FitResult``.
    """
    global _bar
    _check_parts("fit", net, loss, optimizer)
    epochs = _checks.positive_int("fit", "epochs", epochs)
    batch_size = _checks.positive_int("fit", "batch_size", batch_size)
    eval_every = _checks.positive_int("fit", "eval_every", eval_every)
    patience = _checks.positive_int("fit", "patience", patience, minimum=0)
    start_epoch = _checks.positive_int("fit", "start_epoch", start_epoch, minimum=0)
    if start_epoch >= epochs:
        raise ValueError(f"fit: start_epoch must be < epochs ({epochs}), got {start_epoch}.")
    _checks.real_number("fit", "min_delta", min_delta, low=0.0)
    for flag, value in (("shuffle", shuffle), ("drop_last", drop_last), ("progress", progress)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"fit: {flag} must be a bool, got {type(value).__name__}.")
    if not isinstance(key, jax.Array) or not (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                               or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))):
        raise TypeError(f"fit: key must be a jax.random key, e.g. jax.random.PRNGKey(0), got {key!r}.")
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("fit: params has no arrays to train (did you pass the output shape of init?).")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        _checks.floating("fit", f"params{jax.tree_util.keystr(path)}", leaf)
    x, y = _check_data("train_data", train_data)
    rows = x.shape[0]
    if batch_size > rows:
        raise ValueError(f"fit: batch_size must be <= the {rows} training rows, got {batch_size}.")
    _check_fits_network("train_data", net, loss, params, x, y, batch_size)
    if eval_data is not None:
        eval_x, eval_y = _check_data("eval_data", eval_data)
        _check_fits_network("eval_data", net, loss, params, eval_x, eval_y, eval_x.shape[0])
        if not any((e + 1) % eval_every == 0 for e in range(start_epoch, epochs)):
            raise ValueError(f"fit: eval_every ({eval_every}) leaves no evaluation in epochs "
                             f"{start_epoch + 1}..{epochs}; lower it or drop eval_data.")
    else:
        eval_x = eval_y = None
    if opt_state is None:
        opt_state = optimizer.init(params)
    else:
        expected = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, params))
        if jax.tree_util.tree_structure(opt_state) != expected:
            raise TypeError(f"fit: opt_state does not belong to this optimizer and params: expected "
                            f"{expected}, got {jax.tree_util.tree_structure(opt_state)}.")
    if mesh is not None:
        _batch_sharding("fit", mesh, data_axis)
        _check_divisible("fit", "batch_size", batch_size, mesh, data_axis)
        replicated = NamedSharding(mesh, PartitionSpec())
        params, opt_state = jax.device_put((params, opt_state), replicated)
    masked = rows % batch_size != 0 and not drop_last
    config = _Config(rows, batch_size, math.ceil(rows / batch_size) if masked else rows // batch_size,
                     epochs, start_epoch, eval_every, patience, bool(shuffle), masked,
                     eval_data is not None, bool(progress), mesh, data_axis)
    if progress:
        _bar = _open_bar(epochs, start_epoch)
    try:
        result = _compiled(params, opt_state, x, y, eval_x, eval_y, key, min_delta,
                           net=net, loss=loss, optimizer=optimizer, config=config)
        if progress:
            jax.block_until_ready(result)
            jax.effects_barrier()
    finally:
        if progress and hasattr(_bar, "close"):
            _bar.close()
        _bar = None
    return result
