"""The compiled training program (book: the loops of ``Trainer.fit``) and ``train_step``.

Contract, stated once (``fit`` in ``funcnet/train/fitting.py`` is its only caller besides tests):

* The whole training state is one pytree, ``TrainState``: params and optimizer state, the
  best evaluation's params and optimizer state, the early-stopping bookkeeping, the next
  epoch, and the history so far. ``fresh_state`` makes it, ``segment`` advances it, ``result``
  turns it into a ``FitResult``; each is one jitted program selected by the ``Static`` part of
  the network's ``apply``, the loss, the optimizer and the metrics (``funcnet._values``) and by
  ``Config``. Only ``apply`` enters: networks that differ in their initializers share programs.
* ``segment(state, ..., stop)`` trains epochs ``state.epoch`` to ``stop - 1`` in a
  ``lax.while_loop`` that also ends when training has stopped; ``stop`` is traced, so one
  compiled program serves a whole run, every checkpointed segment, and the shorter last one.
  Under ``vmap`` the loop runs until every member is done and stopped members ride along
  frozen.
* Epoch ``e`` draws its order and dropout keys from ``(key, e)`` alone (``shuffle.py``),
  each of ``config.shards`` parts of the rows in its own order (``distributed.py``). Under a mesh
  every state and result the programs return is replicated, so every process can read it; under
  FSDP (``Config.param_axis``, ``fsdp.py``) but for the params and optimizer states (and the
  result's moving average), which stay sharded by the rule: ``placed_state`` and the steps'
  constraints (``_sharded``) keep them so in every program.
* Every row is used every epoch: when ``batch_size`` does not divide the row count the last
  batch is padded (with real rows) and masked, the loss being evaluated row by row (``vmap``
  over one-row batches, exact for losses that are means over rows) and averaged over real rows.
* Inputs beyond ``x`` (``fit``'s data ``(x, y, inputs)``: padding's ``kv_lengths``, an attention
  ``mask``) ride with ``x`` as one pytree, ``WithInputs(x, inputs)``: every row operation
  (gather, pad, shard, slice into eval batches) maps over it, and each batch's slice reaches the
  network as keywords, ``apply(params, x, **inputs)`` and in training mode. Without inputs the
  data is ``x`` itself, so those programs are unchanged.
* Training runs the network in training mode (``funcnet.train_apply``): params carry their
  layer state (BatchNorm's running statistics), the optimizer sees only the trainable part
  (``split_state``; its state is ``optimizer.init`` of that part) and the state the training
  mode returns replaces the old (a step that loss scaling skips keeps the old params, optimizer
  state and layer state; one it skips at ``min_scale`` counts as a NaN loss, so the run stops as
  diverged: ``precision.DynamicLossScale``). A padded last
  batch's mask keeps padded rows out of batch statistics too. Under a mesh, batch statistics
  are means over the global batch. The moving average (``ema_decay``) averages the trainable
  part; averaged params carry the current state.
* Evaluation after epoch ``e`` with ``(e + 1) % eval_every == 0``, in inference mode, in
  batches of ``eval_batch_size`` rows: the loss and each metric are means over rows, so the
  batch means weighted by their row counts give the mean over the whole set.
* An evaluation improves when the monitored value beats the best by more than ``min_delta``
  (lower for ``mode="min"``, higher for ``"max"``); after ``patience + 1`` evaluations in a row
  without improvement training stops. A non-finite training or eval loss stops it too
  (``diverged``), keeping the last finite best.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcnet import _checks
from funcnet._values import Static, combine
from funcnet.layers import train_mode
from funcnet.optimizers import EmaState, ema_params
from funcnet.precision import DynamicLossScale, LossScaleState
from funcnet.state import merge_state, split_state
from funcnet.train import distributed, fsdp, progress
from funcnet.train.checks import check_inputs, check_parts
from funcnet.train.sources import sample, transform_key, transformed
from funcnet.train.steps import applied_rate, calls_per_update, window_dropout_key, window_starts, windows

__all__ = [
    "Config",
    "FitResult",
    "History",
    "TrainState",
    "WithInputs",
    "batch_sharding",
    "check_divisible",
    "check_opt_state",
    "end_epoch",
    "epoch_batches",
    "eval_batch_rows",
    "eval_layout",
    "fresh_state",
    "no_evaluation",
    "result",
    "rows_map",
    "segment",
    "split_inputs",
    "train_step",
    "train_steps",
    "with_inputs",
]

Params = Any
Loss = Callable[[jax.Array, jax.Array], jax.Array]


class History(NamedTuple):
    """The per-epoch and per-evaluation record of a fit; NaN wherever nothing ran (after a stop).

    Fields:
      train_loss: ``(epochs - start_epoch,)``, the mean training loss of each epoch this call
        covers (``train_loss[i]`` is epoch ``start_epoch + i``).
      eval_loss: ``(evaluations,)``, the eval loss of each scheduled evaluation.
      eval_epoch: ``(evaluations,)``, the epochs trained when each evaluation was taken
        (``eval_every``, ``2 * eval_every``, ...).
      eval_metrics: ``{name: (evaluations,)}``, each metric at each evaluation.
      step: with ``fit(..., log_every=k)``: ``(steps // k,)``, the updates done at each log entry
        (``k``, ``2 * k``, ...); ``None`` without ``log_every``.
      step_loss: ``(steps // k,)``, the mean training loss over the ``k`` updates of each entry.
      learning_rate: ``(steps // k,)``, the learning rate the entry's last update applied (NaN for
        an optimizer that does not expose it: ``chain``, ``multi_optimizer``, a user's own).
      grad_norm: ``(steps // k,)``, the global gradient norm of the entry's last update (under
        ``accumulate``, of each of its micro-batches' gradients, averaged); computed at that update
        only.
    """

    train_loss: jax.Array
    eval_loss: jax.Array
    eval_epoch: jax.Array
    eval_metrics: dict[str, jax.Array]
    step: jax.Array | None = None
    step_loss: jax.Array | None = None
    learning_rate: jax.Array | None = None
    grad_norm: jax.Array | None = None


class FitResult(NamedTuple):
    """What ``fit`` returns: a pytree, so ``vmap``-ed fits return stacked results.

    Fields:
      params: with ``eval_data``, the params of the best evaluation (restored as the book's
        trainer does); without, the final params (the last finite ones if training diverged).
      opt_state: the optimizer state that goes with ``params``.
      history: a ``History``: training loss per epoch, eval loss and metrics per evaluation.
      best_epoch: epochs trained when ``params`` was taken, so ``fit(..., epochs=best_epoch)``
        without ``eval_data`` and with the same key reproduces ``params``.
      stopped_epoch: epochs trained when training stopped (``epochs`` if it never stopped).
      diverged: True when a training or eval loss was not finite (``params`` stay finite), or,
        with ``loss_scale``, when a step's gradients were not finite even at ``min_scale``.
      best_eval: ``{"loss": ..., metric: ...}`` at the evaluation ``params`` come from (NaN
        without ``eval_data``, or when no evaluation improved on the start).
      last_train_loss: the training loss of the last epoch whose loss was finite (NaN if
        none); ``history.train_loss[-1]`` is NaN once training stopped early.
      resumed_epoch: epochs already trained when this call began: ``start_epoch`` (0 for a fresh
        run), or the epoch of the checkpoint ``checkpoint_dir`` resumed from.
      ema_params: with ``fit(..., ema_decay=d)``, the params' moving average that goes with
        ``params``; ``None`` otherwise.
    """

    params: Params
    opt_state: Any
    history: History
    best_epoch: jax.Array
    stopped_epoch: jax.Array
    diverged: jax.Array
    best_eval: dict[str, jax.Array]
    last_train_loss: jax.Array
    resumed_epoch: jax.Array
    ema_params: Params = None


def _document_fields(kind: type) -> None:
    """Give each field of a documented NamedTuple its line of the docstring, for ``help()``
    (NamedTuple's own says only "Alias for field number 0")."""
    doc = kind.__doc__ or ""
    entries = doc[doc.index("Fields:") + len("Fields:") :].strip().split("\n")
    text: dict[str, str] = {}
    name = ""
    for line in entries:
        head, _, rest = line.strip().partition(": ")
        if head in kind._fields:  # type: ignore[attr-defined]  # a NamedTuple
            name, text[head] = head, rest
        elif name:
            text[name] += " " + line.strip()
    for field, description in text.items():
        getattr(kind, field).__doc__ = description


_document_fields(History)
_document_fields(FitResult)


class Config(NamedTuple):
    """Everything static about a fit's program (hashable: it selects the compiled program)."""

    rows: int
    batch_size: int
    batches: int
    epochs: int
    eval_every: int
    patience: int
    shuffle: bool
    masked: bool
    eval_rows: int  # 0 without eval data
    eval_batch_size: int
    metrics: tuple[str, ...]
    monitor: str
    maximize: bool
    dtype: str  # of the loss and metric totals and the history: the loss's, at least float32
    progress: bool
    mesh: Mesh | None
    data_axis: str
    loss_scale: DynamicLossScale | None = None  # float16 training's dynamic loss scaling
    eval_ema: bool = False  # evaluate (and early-stop on) the params' moving average
    shards: int = 1  # equal parts of the rows, each shuffled on its own (``distributed.py``)
    # ``fit(..., steps=N)``: ``epochs`` (and the state's ``epoch``, ``eval_every``, the history)
    # count optimizer updates; each update trains ``calls_per_update`` batches of the epoch sequence
    steps_mode: bool = False
    window: int = 0  # ``random_windows``: the window length (the data is the token array); 0: rows
    sampled: bool = False  # a user's sampler ``(key, step) -> batch`` draws the batches (``sources.py``)
    host_tokens: Any = None  # ``random_windows`` of host tokens: ``sources.HostTokens``, read each step
    restore_best: bool = True  # with eval data, return the best evaluation's params (else the last)
    log_every: int = 0  # record loss, learning rate and gradient norm per update, log every k
    on_log: Any = None  # the host hook ``on_log(step, values)``, every ``log_every`` updates
    param_axis: fsdp.FSDP | None = None  # FSDP: params and optimizer state sharded by this rule (``fsdp.py``)

    @property
    def evaluations(self) -> int:
        return self.epochs // self.eval_every


class TrainState(NamedTuple):
    """The whole state of a run between epochs: what a checkpoint holds."""

    params: Params
    opt_state: Any
    best_params: Params  # with eval data: the best evaluation's (else None: ``params`` is it)
    best_opt_state: Any
    best: jax.Array  # the best monitored value so far
    best_epoch: jax.Array
    bad_evals: jax.Array  # evaluations in a row without improvement
    stopped: jax.Array
    stopped_epoch: jax.Array
    diverged: jax.Array
    epoch: jax.Array  # the next epoch to train
    train_loss: jax.Array  # (epochs,)
    eval_loss: jax.Array  # (evaluations,)
    eval_metrics: dict[str, jax.Array]
    loss_scale: LossScaleState | None = None  # with ``Config.loss_scale``
    grad_norm: jax.Array | None = None  # (updates,) with ``log_every``: the gradient norm of each entry's last update
    learning_rate: jax.Array | None = None  # (updates,) with ``log_every``: each update's applied rate


class WithInputs(NamedTuple):
    """``x`` with the inputs beyond it that travel with its rows (``{name: array}``, rows first):
    a pytree, so shuffling, batching, padding, sharding and streaming map over both alike."""

    x: Any
    inputs: dict[str, Any]


def with_inputs(x: Any, inputs: dict[str, Any] | None) -> Any:
    """The data a program carries for ``x`` and ``inputs``: ``x`` itself when there are none."""
    return WithInputs(x, dict(inputs)) if inputs else x


def split_inputs(features: Any) -> tuple[Any, dict[str, Any]]:
    """``(x, inputs)`` of ``with_inputs``'s value."""
    if isinstance(features, WithInputs):
        return features.x, features.inputs
    return features, {}


def rows_map(fn: Callable[[Any], Any], features: Any) -> Any:
    """``fn`` applied to ``x`` and to every input alike (each has the rows first)."""
    return jax.tree_util.tree_map(fn, features)


def batch_sharding(fn: str, mesh: Any, data_axis: str) -> Callable[[jax.Array], jax.Array] | None:
    """A function constraining a batch's rows to ``data_axis`` of ``mesh`` (None: no mesh)."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if data_axis not in mesh.axis_names:
        raise ValueError(f"{fn}: data_axis {data_axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}.")
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    return lambda a: lax.with_sharding_constraint(a, sharding)


def check_divisible(fn: str, what: str, size: int, mesh: Mesh, data_axis: str) -> None:
    devices = mesh.shape[data_axis]
    if size % devices:
        raise ValueError(
            f"{fn}: {what} ({size}) must divide by the {devices} devices of mesh axis "
            f"{data_axis!r}; choose a multiple of {devices}."
        )


def _sharded(tree: Any, config: Config) -> Any:
    """Under FSDP (``Config.param_axis``) ``tree`` (params, an optimizer state, gradients)
    constrained to the rule's shardings (``fsdp.constrain``); otherwise ``tree`` as it is."""
    if config.param_axis is None or config.mesh is None:
        return tree
    return fsdp.constrain(tree, config.mesh, config.param_axis)


def placed_state(state: TrainState, config: Config) -> TrainState:
    """Inside a program: ``state`` as the programs return it: replicated over the mesh (every
    process reads it), but for FSDP's params and optimizer states (the current and the best),
    which stay sharded by the rule."""
    if config.param_axis is None:
        replicated: TrainState = distributed.replicate(state, config.mesh)
        return replicated
    empty = state._replace(params=None, opt_state=None, best_params=None, best_opt_state=None)
    rest: TrainState = distributed.replicate(empty, config.mesh)
    return rest._replace(
        params=_sharded(state.params, config),
        opt_state=_sharded(state.opt_state, config),
        best_params=_sharded(state.best_params, config),
        best_opt_state=_sharded(state.best_opt_state, config),
    )


def _batch_loss(apply: Callable[..., Any], loss: Loss, masked: bool) -> Callable[..., tuple[jax.Array, Params]]:
    """``(trainable, state, features, y, mask, key) -> (loss, params)``, in training mode (``features``:
    ``x`` or ``WithInputs``): ``params`` with their state updated; with ``masked``, a mean over the
    real rows only."""
    train = train_mode(apply)

    def batch_loss(
        trainable: Params, state: Params, features: Any, y: jax.Array, mask: Any, key: jax.Array | None
    ) -> tuple[jax.Array, Params]:
        x, inputs = split_inputs(features)
        prediction, params = train(merge_state(trainable, state), x, key=key, row_mask=mask, **inputs)
        if not masked:
            return loss(prediction, y), params
        per_row = jax.vmap(lambda p, t: loss(p[None], t[None]))(prediction, y)
        wide = per_row.astype(_checks.wide(per_row.dtype))  # a float16 sum of row losses overflows
        value = (jnp.sum(jnp.where(mask, wide, 0)) / jnp.sum(mask).astype(wide.dtype)).astype(per_row.dtype)
        return value, params

    return batch_loss


def check_opt_state(fn: str, optimizer: Any, params: Params, opt_state: Any) -> None:
    """``opt_state`` must be ``optimizer.init`` of the trainable params (layer state is not trained)."""
    expected: Any = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, split_state(params)[0]))
    if jax.tree_util.tree_structure(opt_state) != expected:
        raise TypeError(
            f"{fn}: opt_state does not belong to this optimizer and params: expected {expected}, got "
            f"{jax.tree_util.tree_structure(opt_state)}. Make it with "
            f"optimizer.init(funcnet.split_state(params)[0]) (the optimizer never sees layer state)."
        )


def _averaged(opt_state: Any, params: Params) -> Params:
    """The moving average of the trainable params, with ``params``'s current layer state."""
    trainable, state = split_state(params)
    return merge_state(ema_params(opt_state, trainable), state)


def train_step(
    net: Any,
    loss: Loss,
    optimizer: Any,
    *,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    param_axis: str | fsdp.FSDP | None = None,
) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """A pure ``step(params, opt_state, x, y, key, **inputs) -> (params, opt_state, loss)``. Book: one
    ``Trainer`` batch (``train_batch`` + ``optim.step``).

    ``inputs`` are the batch's inputs beyond ``x`` (``kv_lengths=``, ``mask=``: arrays with the
    batch's rows first), passed to the network's training mode; a name no layer takes is a
    ``TypeError``.

    ``key`` drives dropout (a network with dropout needs one). The network runs in training mode
    (``funcnet.train_apply``), so the returned params hold updated layer state (BatchNorm's
    running statistics); ``opt_state`` is ``optimizer.init(funcnet.split_state(params)[0])``,
    which for a network without state is ``optimizer.init(params)``. Wrap it in ``jax.jit``
    (or call it inside ``lax.scan``) yourself. With ``mesh``, the batch is sharded along
    ``data_axis`` (see ``fit``) and the returned params and optimizer state are replicated.

    With ``param_axis`` as well (FSDP, ``help(funcnet.FSDP)``: a mesh axis name or an ``FSDP``
    rule), the params, the gradients and the optimizer state are constrained inside the step to
    be sharded over that axis by the rule, and so are the returned ones (the loss is replicated):
    place the initial ones with ``funcnet.shard_params(tree, mesh, param_axis)`` so that no
    device ever holds them whole. A ``param_axis`` not in the mesh is a ``ValueError`` here; a
    leaf an explicit ``FSDP.dims`` rule cannot shard is one at the step's first trace.

    Args:
      net: the network, a ``Layer``.
      loss: ``(prediction, target) -> scalar``, e.g. ``softmax_cross_entropy``.
      optimizer: an ``Optimizer``.
      mesh: a ``jax.sharding.Mesh`` to shard the batch over, or None (one device).
      data_axis: the mesh axis the batch's rows are split along; default ``"data"`` (with
        ``param_axis`` and a mesh without a ``"data"`` axis: ``param_axis``'s axis, FSDP proper).
      param_axis: a mesh axis name or an ``FSDP`` rule to shard the params over, or None
        (replicated).

    Returns:
      The pure ``step(params, opt_state, x, y, key, **inputs) -> (params, opt_state, loss)``.
    """
    check_parts("train_step", net, loss, optimizer)
    value_and_grad = jax.value_and_grad(_batch_loss(net.apply, loss, masked=False), has_aux=True)
    rule = fsdp.resolve("train_step", mesh, param_axis)
    data_axis = fsdp.rows_axis(mesh, data_axis, rule)  # as ``fit``'s
    shard = batch_sharding("train_step", mesh, data_axis)
    sharded = (
        (lambda tree: tree)
        if rule is None or mesh is None
        else lambda tree: fsdp.constrain(tree, mesh, rule, "train_step")
    )

    def step(
        params: Params, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array | None, **inputs: Any
    ) -> tuple[Params, Any, jax.Array]:
        if not _checks.is_array(x) or np.ndim(x) < 1:
            raise TypeError(f"train_step: x must be an array with rows first, got {type(x).__name__} {x!r:.60}.")
        inputs = check_inputs("train_step", "inputs", net, inputs, np.shape(x)[0])
        features = with_inputs(x, inputs)
        if shard is not None and mesh is not None:
            check_divisible("train_step", "x rows", x.shape[0], mesh, data_axis)
            features, y = rows_map(shard, features), shard(y)
        check_opt_state("train_step", optimizer, params, opt_state)
        params, opt_state = sharded(params), sharded(opt_state)
        trainable, state = split_state(params)
        (value, new), grads = value_and_grad(trainable, state, features, y, None, key)
        trainable, opt_state = optimizer.update(sharded(grads), opt_state, trainable)
        if rule is not None:  # FSDP: the state stays sharded, the loss is replicated
            return (
                sharded(merge_state(trainable, split_state(new)[1])),
                sharded(opt_state),
                distributed.replicate(value, mesh),
            )
        replicated: tuple[Params, Any, jax.Array] = distributed.replicate(
            (merge_state(trainable, split_state(new)[1]), opt_state, value), mesh
        )
        return replicated

    return step


def _nan(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jnp.full(shape, jnp.nan, dtype)


def _select(flag: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(lambda u, v: jnp.where(flag, u, v), a, b)


def _choose(flag: jax.Array, a: Any, b: Any) -> Any:
    """``a`` if the scalar ``flag`` else ``b``, whole trees at once: one conditional whose
    branches only copy, where ``_select``'s elementwise selects are one compiled kernel per
    leaf (the early-stopping bookkeeping's were a sixth of a small network's segment: 17 kernels).
    Under ``vmap`` with a batched flag JAX turns it back into selects. Once per epoch, not per
    step: a conditional reads its flag on the host on some devices."""
    return lax.cond(flag, lambda a, b: a, lambda a, b: b, a, b)


def _fresh_state(
    params: Params, opt_state: Any, start_epoch: Any, hyper: list[Any], *, static: Static, config: Config
) -> TrainState:
    """The state before ``start_epoch``; ``opt_state=None`` is the optimizer's initial state."""
    c, dtype = config, jnp.dtype(config.dtype)
    if opt_state is None:
        _, _, optimizer, _, _ = combine(hyper, static)
        opt_state = optimizer.init(split_state(params)[0])
    int_ = lambda v: jnp.asarray(v, jnp.int32)
    has_eval = c.eval_rows > 0
    # Copies: ``segment`` donates the state it replaces, which must never be the caller's arrays.
    # JAX 0.10 returns fresh buffers from a jitted function anyway; a version that forwarded an
    # input returned unchanged would otherwise let the donation delete the caller's params.
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    state = TrainState(
        params=copy(params),
        opt_state=copy(opt_state),
        best_params=copy(params) if has_eval else None,
        best_opt_state=copy(opt_state) if has_eval else None,
        best=jnp.asarray(-jnp.inf if c.maximize else jnp.inf, dtype),
        best_epoch=int_(start_epoch),
        bad_evals=int_(0),
        stopped=jnp.asarray(False),
        stopped_epoch=int_(c.epochs),
        diverged=jnp.asarray(False),
        epoch=int_(start_epoch),
        train_loss=_nan((c.epochs,), dtype),
        eval_loss=_nan((c.evaluations,), dtype),
        eval_metrics={name: _nan((c.evaluations,), dtype) for name in c.metrics},
        loss_scale=None if c.loss_scale is None else c.loss_scale.init(),
        grad_norm=_nan((c.epochs,), dtype) if c.log_every else None,
        learning_rate=_nan((c.epochs,), dtype) if c.log_every else None,
    )
    return placed_state(state, c)


fresh_state = jax.jit(_fresh_state, static_argnames=("static", "config"))


def _means(
    apply: Callable[..., Any],
    loss: Loss,
    metrics: dict[str, Loss],
    params: Params,
    features: Any,
    y: jax.Array,
    dtype: Any,
) -> dict[str, jax.Array]:
    """The loss and each metric on one eval batch (means over its rows); ``features``: its ``x``
    or ``WithInputs``, whose inputs reach the network."""
    x, inputs = split_inputs(features)
    prediction = apply(params, x, **inputs)
    values = {"loss": loss(prediction, y), **{name: metric(prediction, y) for name, metric in metrics.items()}}
    return {name: jnp.asarray(value).astype(dtype) for name, value in values.items()}


def _eval_totals(
    apply: Callable[..., Any],
    loss: Loss,
    metrics: dict[str, Loss],
    params: Params,
    total: dict[str, jax.Array],
    xs: Any,
    ys: jax.Array,
    config: Config,
) -> dict[str, jax.Array]:
    """``total`` plus each full eval batch's means times its rows, batch by batch (``xs``, ``ys``:
    batches first, each of ``eval_layout(config)[0]`` rows; ``xs`` may carry inputs)."""
    size, dtype = ys.shape[1], jnp.dtype(config.dtype)

    def add(total: dict[str, jax.Array], batch: tuple[Any, jax.Array]) -> tuple[dict[str, jax.Array], None]:
        means = _means(apply, loss, metrics, params, *batch, dtype)
        return jax.tree_util.tree_map(lambda t, v: t + v * size, total, means), None

    added, _ = lax.scan(add, total, (xs, ys))
    return added


def _eval_average(
    total: dict[str, jax.Array], last: dict[str, jax.Array] | None, config: Config
) -> dict[str, jax.Array]:
    """The means over every eval row: the full batches' ``total`` plus the ``last`` partial batch's means."""
    rest = eval_layout(config)[2]
    if last is not None:
        total = jax.tree_util.tree_map(lambda t, v: t + v * rest, total, last)
    averages: dict[str, jax.Array] = jax.tree_util.tree_map(lambda t: t / config.eval_rows, total)
    return averages


def eval_layout(config: Config) -> tuple[int, int, int]:
    """How more than ``eval_batch_size`` eval rows are batched: ``(size, full, rest)``, ``full``
    batches of ``size`` rows, then one of ``rest`` rows (0: none).

    With one shard, batch ``j`` is rows ``j * size ..`` (``size = eval_batch_size``). With
    ``config.shards`` parts, batch ``j`` is local rows ``j * k .. (j + 1) * k - 1`` of every shard
    side by side (``k = max(1, eval_batch_size // shards)``, ``size = shards * k``), so each device
    reads only its own rows; the last batch holds the remaining local rows of every shard.
    """
    rows, size, shards = config.eval_rows, config.eval_batch_size, config.shards
    if shards == 1:
        full, rest = divmod(rows, size)
        return size, full, rest
    k = max(1, size // shards)
    full, rest = divmod(rows // shards, k)
    return shards * k, full, shards * rest


def _evaluate(
    apply: Callable[..., Any],
    loss: Loss,
    metrics: dict[str, Loss],
    params: Params,
    eval_x: Any,
    eval_y: Any,
    config: Config,
) -> dict[str, jax.Array]:
    """The eval loss and metrics (means over rows), in the batches ``eval_layout`` says."""
    dtype = jnp.dtype(config.dtype)
    rows, shards = config.eval_rows, config.shards
    if rows <= config.eval_batch_size:
        return _means(apply, loss, metrics, params, eval_x, eval_y, dtype)
    size, full, rest = eval_layout(config)
    zero = {name: jnp.zeros((), dtype) for name in ("loss", *config.metrics)}
    if shards == 1:
        batched = lambda t: rows_map(lambda a: a[: full * size].reshape(full, size, *a.shape[1:]), t)
        rest_of = lambda t: rows_map(lambda a: a[full * size :], t)
        total = _eval_totals(apply, loss, metrics, params, zero, batched(eval_x), batched(eval_y), config)
        last = _means(apply, loss, metrics, params, rest_of(eval_x), rest_of(eval_y), dtype) if rest else None
        return _eval_average(total, last, config)
    # several shards: each batch gathered where its rows live (``distributed.local_rows``)
    k = size // shards
    rows_of = lambda start, n: jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (shards, n))
    gather = lambda t, index: rows_map(lambda a: distributed.local_rows(a, index, config.mesh, config.data_axis), t)

    def add_local(total: dict[str, jax.Array], j: jax.Array) -> tuple[dict[str, jax.Array], None]:
        index = rows_of(j * jnp.int32(k), k)
        means = _means(apply, loss, metrics, params, gather(eval_x, index), gather(eval_y, index), dtype)
        return jax.tree_util.tree_map(lambda t, v: t + v * size, total, means), None

    total, _ = lax.scan(add_local, zero, jnp.arange(full, dtype=jnp.int32))
    last = None
    if rest:
        index = rows_of(jnp.int32(full * k), rest // shards)
        last = _means(apply, loss, metrics, params, gather(eval_x, index), gather(eval_y, index), dtype)
    return _eval_average(total, last, config)


def eval_batch_rows(first: int, count: int, config: Config, per_shard: int | None = None) -> np.ndarray:
    """On the host: the eval rows of batches ``first .. first + count - 1`` of ``eval_layout``
    (each of ``per_shard`` rows of every shard; default: a full batch's), in the order the
    batches hold them. The streamed fit reads them there."""
    shards = config.shards
    full_k = eval_layout(config)[0] // shards  # a full batch's rows of each shard
    k = full_k if per_shard is None else per_shard
    starts = (first + np.arange(count)) * full_k
    index = np.broadcast_to(starts[:, None, None] + np.arange(k)[None, None, :], (count, shards, k))
    return distributed.global_rows(index, config.eval_rows)


def epoch_batches(key: jax.Array, epoch: Any, config: Config) -> tuple[jax.Array, jax.Array]:
    """Epoch ``epoch``'s batches, ``(batches, shards, batch_size // shards)`` local row numbers
    (batch ``b`` holds rows ``index[b, s]`` of shard ``s``, every shard's side by side:
    ``distributed.local_rows``), and its dropout key.

    Each shard's order is ``distributed.shard_orders``. When the local batch does not divide a
    shard's rows, each shard's last local batch is padded with real rows (the mask in
    ``train_steps`` keeps them out of the loss); with ``drop_last`` the remainder is dropped. The
    streamed fit (``stream.py``) computes the same batches on the host (with ``mesh=None``: the
    same numbers) and turns them into global rows (``distributed.global_rows``).
    """
    c = config
    local, local_batch = c.rows // c.shards, c.batch_size // c.shards
    orders, dropout_key = distributed.shard_orders(key, epoch, c.rows, c.shards, c.shuffle, c.mesh, c.data_axis)
    padded = c.batches * local_batch
    if padded > local:  # pad with real rows, masked out of the loss
        orders = jnp.concatenate([orders, orders[:, : padded - local]], axis=1)
    return orders[:, :padded].reshape(c.shards, c.batches, local_batch).transpose(1, 0, 2), dropout_key


def train_steps(
    hyper: list[Any],
    carry: tuple[Params, Any, Any],
    batches: tuple[Any, jax.Array],
    dropout_key: jax.Array | None,
    fetch: Callable[[Any], tuple[Any, jax.Array]],
    *,
    static: Static,
    config: Config,
    norms: bool | jax.Array = False,
    report: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, Any]:
    """Training steps over ``batches = (data, b)``, batch ``b[i]`` being ``fetch(data[i])``: its
    ``(x, y)``, ``x`` carrying the batch's inputs beyond it (``WithInputs``) if the fit has any.

    ``carry`` is ``(params, opt_state, loss_scale)``. Returns the carry after the steps and each
    batch's loss times its real rows. The device-resident fit fetches rows of the device data
    by index (each shard's local batch, where it lives); the streamed fit (``stream.py``) passes
    the rows themselves. One step function, so both compute the same thing.

    ``dropout_key=None``: each batch brings its own, ``data[i] = (fetched, key)`` (training by
    steps, whose batches may come from several epochs). ``norms``: each batch's output is
    ``(loss times rows, global gradient norm)``; a traced flag computes the norm only where it is
    true (0 elsewhere: a false conditional costs nothing, the norm 1.5-2 us a step of workload A).
    ``report=(due, done)``: progress, ``done`` batches
    trained before these; the host hears of the batch it asked for (``progress.reported``), and
    the returned carry is ``(carry, the next due count)``.
    """
    c = config
    apply, loss, optimizer, _, sources = combine(hyper, static)
    dtype = jnp.dtype(c.dtype)
    batch_loss = _batch_loss(apply, loss, c.masked)
    value_and_grad = jax.value_and_grad(batch_loss, has_aux=True)

    def scaled_loss(*args: Any) -> tuple[jax.Array, tuple[jax.Array, Params]]:
        value, params = batch_loss(*args[:-1])
        scale = args[-1]
        return value * scale.astype(value.dtype), (value, params)

    def scaled_value_and_grad(*args: Any) -> tuple[tuple[jax.Array, Params], Any]:
        (_, aux), grads = jax.value_and_grad(scaled_loss, has_aux=True)(*args)
        return aux, grads

    shard = batch_sharding("fit", c.mesh, c.data_axis) or (lambda a: a)
    local, local_batch = c.rows // c.shards, c.batch_size // c.shards

    def step(carry: tuple[Params, Any, Any], batch: tuple[Any, jax.Array]) -> tuple[Any, Any]:
        params, opt_state, scaling = carry
        data, b = batch
        if dropout_key is None:
            data, batch_key = data
        else:
            batch_key = dropout_key
        xb, yb = fetch(data)
        if sources.transform is not None:  # augmentation: a key of its own per batch
            (x_, inputs_), key_ = split_inputs(xb), transform_key(batch_key, b)
            x_, yb, inputs_ = transformed(sources.transform, key_, x_, yb, inputs_)
            xb = with_inputs(x_, inputs_)
        real = b * local_batch + jnp.arange(local_batch, dtype=b.dtype) < local  # each shard's padded rows are its last
        mask: Any = shard(jnp.tile(real, c.shards)) if c.masked else None
        # The optimizer updates the trainable part, training mode the layer state.
        trainable, state = split_state(params)
        args = (trainable, state, rows_map(shard, xb), shard(yb), mask, jax.random.fold_in(batch_key, b))
        if c.loss_scale is None:
            (value, new), grads = value_and_grad(*args)
            trainable, opt_state = optimizer.update(_sharded(grads, c), opt_state, trainable)  # FSDP: reduce-scattered
            state = split_state(new)[1]
        else:  # scaled loss, unscaled gradients; a step with a non-finite gradient is skipped
            (value, new), grads = scaled_value_and_grad(*args, scaling.scale)
            grads, finite = c.loss_scale.unscale(scaling, _sharded(grads, c))  # in float32, to the optimizer
            stepped = (*optimizer.update(grads, opt_state, trainable), split_state(new)[1])
            trainable, opt_state, state = _select(finite, stepped, (trainable, opt_state, state))
            # non-finite even at min_scale: a diverged step (its NaN loss stops the run), never
            # a silently frozen one
            value = jnp.where(c.loss_scale.exhausted(scaling, finite), jnp.nan, value).astype(value.dtype)
            scaling = c.loss_scale.adjust(scaling, finite)
        params, opt_state = _sharded(merge_state(trainable, state), c), _sharded(opt_state, c)
        total = value.astype(dtype) * (jnp.sum(mask).astype(dtype) if c.masked else c.batch_size)
        if norms is not False:
            zero = lambda t: jnp.zeros((), jnp.float32)
            norm = _global_norm(grads) if norms is True else lax.cond(norms, _global_norm, zero, grads)
            return (params, opt_state, scaling), (total, norm.astype(dtype))
        return (params, opt_state, scaling), total

    if report is None:
        after, sums = lax.scan(step, carry, batches)
        return after, sums
    due, done = report

    def reporting(carry_due: tuple[Any, jax.Array], batch: tuple[Any, jax.Array]) -> tuple[Any, Any]:
        (carry, due), b = carry_due, batch[1]
        carry, out = step(carry, batch)
        due = progress.reported(due, done + b.astype(jnp.int32) + 1, progress.batch_report, np.int32(c.batches))
        return (carry, due), out

    return lax.scan(reporting, (carry, due), batches)


def _global_norm(tree: Any) -> jax.Array:
    """The global 2-norm of a gradient tree, in float32 (complex leaves by their magnitude)."""
    leaves = [jnp.abs(leaf).astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum((jnp.sum(leaf * leaf) for leaf in leaves), jnp.zeros((), jnp.float32)))


def end_epoch(
    s: TrainState,
    carry: tuple[Params, Any, Any],
    sums: jax.Array,
    evaluate: Callable[[jax.Array, Params], dict[str, jax.Array]],
    min_delta: Any,
    *,
    config: Config,
    rows: Any = None,
    logged: tuple[jax.Array, jax.Array] | None = None,
) -> TrainState:
    """The state after epoch ``s.epoch``, whose steps gave ``carry`` (``train_steps``) and
    ``sums``: its training loss, the evaluation (``evaluate(is_eval, params)``, NaN when not
    scheduled), early stopping and the progress tick. Training by steps (``Config.steps_mode``),
    the "epoch" is one update: ``rows`` the real rows its ``sums`` cover, ``logged`` its gradient
    norm and applied learning rate (with ``log_every``), recorded and handed to ``on_log``."""
    c = config
    params, opt_state, scaling = carry
    dtype = jnp.dtype(c.dtype)
    used_rows = c.rows if c.masked else c.batches * c.batch_size  # unmasked: full batches only (all rows, or drop_last)
    has_eval = c.eval_rows > 0
    e = s.epoch
    train_loss = jnp.sum(sums) / (used_rows if rows is None else rows)
    finite = jnp.isfinite(train_loss)
    history = s.train_loss.at[e].set(train_loss)
    is_eval = (e + 1) % c.eval_every == 0
    if not has_eval:
        values = {"loss": _nan((), dtype)}
        # a diverged epoch's params are dropped: the result is the last finite
        kept, kept_opt_state, best_epoch = _choose(
            finite, (params, opt_state, e + 1), (s.params, s.opt_state, s.best_epoch)
        )
        new = s._replace(
            params=kept,
            opt_state=kept_opt_state,
            best_epoch=best_epoch,
            stopped=~finite,
            stopped_epoch=jnp.where(finite, s.stopped_epoch, e + 1),
            diverged=~finite,
            epoch=e + 1,
            train_loss=history,
            loss_scale=scaling,
        )
    else:
        watched_params = _averaged(opt_state, params) if c.eval_ema else params
        values = evaluate(is_eval, watched_params)
        diverged = ~finite | (is_eval & ~jnp.isfinite(values["loss"]))
        watched = values[c.monitor]
        better = watched > s.best + min_delta if c.maximize else watched < s.best - min_delta
        improved = is_eval & ~diverged & better
        bad_evals = jnp.where(improved, 0, s.bad_evals + (is_eval & ~improved).astype(jnp.int32))
        stop_now = diverged | (bad_evals > c.patience)
        j = jnp.maximum((e + 1) // c.eval_every - 1, 0)
        record = lambda h, v: h.at[j].set(jnp.where(is_eval, v, h[j]))
        best_params, best_opt_state, best, best_epoch = _choose(
            improved, (params, opt_state, watched, e + 1), (s.best_params, s.best_opt_state, s.best, s.best_epoch)
        )
        new = TrainState(
            params=params,
            opt_state=opt_state,
            best_params=best_params,
            best_opt_state=best_opt_state,
            best=best,
            best_epoch=best_epoch,
            bad_evals=bad_evals,
            stopped=stop_now,
            stopped_epoch=jnp.where(stop_now, e + 1, s.stopped_epoch),
            diverged=diverged,
            epoch=e + 1,
            train_loss=history,
            eval_loss=record(s.eval_loss, values["loss"]),
            eval_metrics={name: record(s.eval_metrics[name], values[name]) for name in c.metrics},
            loss_scale=scaling,
            grad_norm=s.grad_norm,
            learning_rate=s.learning_rate,
        )
    if c.param_axis is not None:  # FSDP: the new state keeps its placement (the streamed fit's epoch ends too)
        new = placed_state(new, c)
    if logged is not None and new.grad_norm is not None and new.learning_rate is not None:
        norm, rate = logged
        new = new._replace(
            grad_norm=new.grad_norm.at[e].set(norm.astype(dtype)),
            learning_rate=new.learning_rate.at[e].set(rate.astype(dtype)),
        )
    if c.progress and not c.steps_mode:  # training by steps reports from its loop (``_update_program``)
        jax.debug.callback(progress.tick, e, train_loss, values)
    return new


LOG_WINDOW = 64  # the most log entries one ``on_log`` delivery carries
_LOGGED = ("loss", "learning_rate", "grad_norm")  # on_log's values, in this order (a pytree's dict is sorted)


def _entries(s: TrainState, blocks: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]:
    """Log entries from the per-update histories, ``blocks(h)`` cutting one into ``(entries, k)``:
    each entry's mean loss over its ``k`` updates, and its last update's learning rate and gradient
    norm (``on_log``'s values and ``History``'s step fields alike)."""
    assert s.grad_norm is not None and s.learning_rate is not None
    return {
        "loss": jnp.mean(blocks(s.train_loss), axis=1),
        "learning_rate": blocks(s.learning_rate)[:, -1],
        "grad_norm": blocks(s.grad_norm)[:, -1],
    }


def _log_start(s: TrainState, c: Config) -> tuple[jax.Array, jax.Array]:
    """``_log``'s carry at a segment's start: the first entry due at once, the earlier ones sent."""
    sent = s.epoch // c.log_every
    return (sent + 1) * c.log_every, sent


def _log(s: TrainState, log: tuple[jax.Array, jax.Array], final: jax.Array, c: Config) -> tuple[jax.Array, jax.Array]:
    """Hand ``on_log`` the log entries completed since the last delivery, ``log = (due, sent)``:
    once ``due`` updates are done (or at ``final``, a segment's end), one ordered host callback
    calls the hook for each entry in order and says when the next delivery is due, about
    ``progress.REPORTS_PER_SECOND`` times a second (``progress.Clock``). A callback costs about
    0.2 ms on a CPU: one per entry was 1.2x workload A's time at ``log_every=100``. At most
    ``LOG_WINDOW`` entries wait. Returns the new ``(due, sent)``."""
    k, entries = c.log_every, c.epochs // c.log_every
    m = min(LOG_WINDOW, entries)
    due, sent = log
    done = s.epoch // k  # entries complete
    first = jnp.minimum(sent, entries - m)  # the window of entries handed over: first .. first + m - 1
    values = _entries(s, lambda h: lax.dynamic_slice(h, (first * k,), (m * k,)).reshape(m, k))
    hook, clock = c.on_log, progress.Clock()

    def call(first: Any, sent: Any, done: Any, updates: Any, values: dict[str, Any]) -> np.ndarray:
        at = {name: np.asarray(values[name]) for name in _LOGGED}  # jax.Arrays: one copy each, not one per entry
        for j in range(int(sent), int(done)):
            hook((j + 1) * k, {name: float(at[name][j - int(first)]) for name in _LOGGED})
        return clock.next(int(updates), every=k)

    send = (done > sent) & ((s.epoch >= due) | final)
    shape = jax.ShapeDtypeStruct((), jnp.int32)
    emit = lambda: io_callback(call, shape, first, sent, done, s.epoch, values, ordered=True)
    due = lax.cond(send, emit, lambda: due)
    sent = jnp.where(send, done, sent)
    return jnp.minimum(due, (sent + m) * k), sent  # never more entries waiting than a delivery holds


def _latest_eval(s: TrainState, c: Config) -> dict[str, jax.Array]:
    """The eval loss and metrics of the last evaluation taken (NaN before the first), for progress."""
    if c.eval_rows == 0 or c.evaluations == 0:
        return no_evaluation(c)
    j = s.epoch // c.eval_every - 1
    at = lambda h: jnp.where(j >= 0, h[jnp.maximum(j, 0)], jnp.nan)
    return {"loss": at(s.eval_loss), **{name: at(h) for name, h in s.eval_metrics.items()}}


def no_evaluation(config: Config) -> dict[str, jax.Array]:
    """NaN for the eval loss and each metric: an epoch without evaluation."""
    return {name: _nan((), jnp.dtype(config.dtype)) for name in ("loss", *config.metrics)}


def _segment(
    state: TrainState,
    hyper: list[Any],
    x: Any,
    y: jax.Array,
    eval_x: Any,
    eval_y: jax.Array | None,
    key: jax.Array,
    min_delta: Any,
    stop: Any,
    *,
    static: Static,
    config: Config,
) -> TrainState:
    """Epochs ``state.epoch`` to ``stop - 1`` (the module's contract); ``x`` and ``eval_x`` are
    arrays, or ``WithInputs`` with the inputs beyond them."""
    c = config
    apply, loss, _, metrics, _ = combine(hyper, static)

    def evaluate(is_eval: jax.Array, params: Params) -> dict[str, jax.Array]:
        scheduled = lambda p: _evaluate(apply, loss, metrics, p, eval_x, eval_y, c)
        values: dict[str, jax.Array] = lax.cond(is_eval, scheduled, lambda p: no_evaluation(c), params)
        return values

    gather = lambda t, index: rows_map(lambda a: distributed.local_rows(a, index, c.mesh, c.data_axis), t)

    def train_epoch(sd: tuple[TrainState, jax.Array]) -> tuple[TrainState, jax.Array]:
        s, due = sd  # due: the batch count at which progress reports next
        batches, dropout_key = epoch_batches(key, s.epoch, c)
        fetch = lambda index: (gather(x, index), gather(y, index))  # each shard's rows, where they live
        carry, sums = train_steps(
            hyper,
            (s.params, s.opt_state, s.loss_scale),
            (batches, jnp.arange(c.batches)),
            dropout_key,
            fetch,
            static=static,
            config=c,
            report=(due, s.epoch * c.batches) if c.progress else None,
        )
        if c.progress:
            carry, due = carry
        return end_epoch(s, carry, sums, evaluate, min_delta, config=c), due

    going = lambda s: (s.epoch < stop) & ~s.stopped
    if c.steps_mode:  # the loop also carries the current epoch's batches, made once per epoch
        update, batches_of = _update_program(hyper, (x, y), key, evaluate, min_delta, stop, static=static, config=c)
        # progress reports after the first update; on_log's first entry is delivered at once
        loop = (state, batches_of(state), state.epoch + 1, _log_start(state, c) if c.on_log is not None else ())
        trained = lax.while_loop(lambda sc: going(sc[0]), update, loop)[0]
    else:
        trained = lax.while_loop(lambda sd: going(sd[0]), train_epoch, (state, state.epoch * c.batches + 1))[0]
    return placed_state(trained, c)


_Loop = tuple[TrainState, Any, jax.Array, Any]  # training by steps: (state, batches, progress due, log carry)


def _update_program(
    hyper: list[Any],
    x: Any,
    key: jax.Array,
    evaluate: Callable[[jax.Array, Params], dict[str, jax.Array]],
    min_delta: Any,
    stop: Any,
    *,
    static: Static,
    config: Config,
) -> tuple[Callable[[_Loop], _Loop], Callable[[TrainState], Any]]:
    """Training by steps: ``(update, batches_of)``, ``update`` advancing ``(state, batches)`` by one
    optimizer update (the state's ``epoch`` counts updates), of ``calls_per_update``
    micro-batches; ``batches`` is ``(e, epoch_batches(key, e))`` of the epoch last drawn from (made
    anew only when a micro-batch starts another epoch), ``batches_of(state)`` its first value.
    Micro-batch ``g`` (counted from the run's start) is batch ``g % batches`` of epoch ``g // batches`` of the epoch
    sequence (``epoch_batches``), or with ``random_windows`` the windows ``window_starts`` draws
    for ``(key, g)``: the state's step alone decides it, so resumed runs equal uninterrupted ones."""
    c = config
    _, _, optimizer, _, sources = combine(hyper, static)
    k = calls_per_update(optimizer)
    dtype = jnp.dtype(c.dtype)
    local, local_batch = c.rows // c.shards, c.batch_size // c.shards
    gather = lambda t, index: rows_map(lambda a: distributed.local_rows(a, index, c.mesh, c.data_axis), t)

    def batches_of(s: TrainState) -> Any:
        if c.window or c.sampled:
            return ()
        e = s.epoch * jnp.asarray(k, jnp.int32) // c.batches
        return (e, *epoch_batches(key, e, c))

    def draw(g: jax.Array, cache: Any) -> tuple[Any, Any, jax.Array, jax.Array]:
        """Micro-batch ``g``: ``(cache, (what fetch takes, its dropout key), its number in the epoch, real rows)``."""
        if c.window or c.sampled:  # drawn from (key, g) alone: a window's starts, or the sampler's step
            what = window_starts(key, g, c.batch_size, c.rows, c.window) if c.window else g
            b = jnp.zeros((), jnp.int32)
            return cache, (what, window_dropout_key(key, g)), b, jnp.asarray(c.batch_size, dtype)
        e, b = g // c.batches, g % c.batches
        cache = lax.cond(e == cache[0], lambda: cache, lambda: (e, *epoch_batches(key, e, c)))
        _, batches, dropout_key = cache
        real = jnp.minimum(local_batch, local - b * local_batch) * c.shards if c.masked else c.batch_size
        return cache, (batches[b], dropout_key), b, jnp.asarray(real, dtype)

    if c.window:
        fetch: Callable[[Any], tuple[Any, jax.Array]] = lambda starts: windows(x[0], starts, c.window)
        if c.host_tokens is not None:
            fetch = lambda starts: c.host_tokens.windows(starts, c.window)
    elif c.sampled:

        def fetch(g: jax.Array) -> tuple[Any, jax.Array]:
            xs, ys, inputs = sample(sources.sampler, key, g)
            return with_inputs(xs, inputs), ys

    else:
        fetch = lambda index: (gather(x[0], index), gather(x[1], index))

    def one_update(i: jax.Array, carry: Any, cache: Any) -> tuple[Any, ...]:
        """Update ``i``: ``(carry, loss times rows, real rows, mean gradient norm, cache)``."""
        first = i * jnp.asarray(k, jnp.int32)

        def micro(j: jax.Array, acc: tuple[Any, ...]) -> tuple[Any, ...]:
            carry, total, rows, norm, cache = acc
            cache, data, b, real = draw(first + j, cache)
            one = jax.tree_util.tree_map(lambda a: a[None], (data, b))
            # the gradient norm of an entry's last update only: the one its history reports
            wanted = (i + 1) % c.log_every == 0 if c.log_every else False
            carry, out = train_steps(hyper, carry, one, None, fetch, static=static, config=c, norms=wanted)
            value, size = (out[0][0], out[1][0]) if c.log_every else (out[0], jnp.zeros((), dtype))
            return carry, total + value, rows + real, norm + size, cache

        zero = jnp.zeros((), dtype)
        carry, total, rows, norm, cache = lax.fori_loop(0, k, micro, (carry, zero, zero, zero, cache))
        return carry, total, rows, norm / jnp.asarray(k, dtype), cache

    def update(sc: _Loop) -> _Loop:
        """A block of updates from ``s.epoch`` up to the next evaluation, progress report, log
        delivery or ``stop``, or through the first non-finite loss; the bookkeeping of
        ``end_epoch`` for its last update (the others do not evaluate, each one's loss, gradient
        norm and rate are recorded as it runs, and their losses were finite, so it is the same as
        running ``end_epoch`` after each). ``due``: the update at which progress reports next;
        ``log``: ``_log``'s ``(due, sent)`` with ``on_log``."""
        s, cache, due, log = sc
        i0 = s.epoch
        end = jnp.asarray(stop, jnp.int32)
        if c.eval_rows > 0:
            end = jnp.minimum(end, (i0 // c.eval_every + 1) * c.eval_every)
        if c.progress:  # a block ends where the host asked for a report
            end = jnp.minimum(end, due)
        if c.on_log is not None:  # or at the first log entry completed at or after the delivery due
            end = jnp.minimum(end, jnp.maximum(log[0], (i0 // c.log_every + 1) * c.log_every))
        keep_last = c.eval_rows == 0  # without eval data a diverged update's params are dropped
        nan = _nan((), dtype)
        histories = (s.train_loss, s.grad_norm, s.learning_rate)

        def body(loop: tuple[Any, ...]) -> tuple[Any, ...]:
            i, carry, _, _, _, _, cache, (losses, norms, rates) = loop
            carry, total, rows, norm, cache = one_update(i, carry, cache)
            loss = total / rows
            losses = losses.at[i].set(loss.astype(losses.dtype))
            rate = applied_rate(optimizer, carry[1]) if c.log_every else jnp.full((), jnp.nan, jnp.float32)
            if c.log_every:
                norms, rates = norms.at[i].set(norm.astype(dtype)), rates.at[i].set(rate.astype(dtype))
            return i + 1, carry, total, rows, norm, rate, cache, (losses, norms, rates)

        def going(loop: tuple[Any, ...]) -> jax.Array:
            i, total, rows = loop[0], loop[2], loop[3]
            more: jax.Array = (i < end) & ((i == i0) | jnp.isfinite(total / rows))
            return more

        first = (s.params, s.opt_state, s.loss_scale)
        start = (i0, first, nan, nan, nan, jnp.full((), jnp.nan, jnp.float32), cache, histories)
        looped: tuple[Any, ...] = lax.while_loop(going, body, start)
        i, carry, total, rows, norm, rate, last_cache, (losses, norms, rates) = looped
        last = i - 1
        s = s._replace(epoch=last, train_loss=losses, grad_norm=norms, learning_rate=rates)
        if keep_last:  # the state before the block's last update, as end_epoch expects it
            # Only a diverged update needs it (its params are dropped): recomputed then, from the
            # block's start (the same updates, the same numbers), instead of kept at every update.
            target = jnp.where(jnp.isfinite(total / rows), i0, last)

            def again(r: tuple[Any, ...]) -> tuple[Any, ...]:
                j, state, batches = r
                state, _, _, _, batches = one_update(j, state, batches)
                return j + 1, state, batches

            redone: tuple[Any, ...] = lax.while_loop(lambda r: r[0] < target, again, (i0, first, cache))
            params, opt_state, scaling = redone[1]
            s = s._replace(
                params=params,
                opt_state=opt_state,
                loss_scale=scaling,
                best_epoch=jnp.where(last > i0, last, s.best_epoch),
            )
        logged = (norm, rate) if c.log_every else None
        new = end_epoch(s, carry, total, evaluate, min_delta, config=c, rows=rows, logged=logged)
        if c.progress:  # and the run's last update is always reported
            last = new.stopped | (new.epoch >= stop)
            report = (last, new.train_loss[new.epoch - 1], _latest_eval(new, c))
            due = progress.reported(jnp.where(last, new.epoch, due), new.epoch, progress.step_report, *report)
        if c.on_log is not None:
            log = _log(new, log, new.stopped | (new.epoch >= stop), c)
        return new, last_cache, due, log

    return update, batches_of


# The state a segment replaces is donated: its buffers hold the new state, so the program's peak
# memory holds one training state, not two (``benchmarks/bench_memory.py``). A fit inside a
# transformation runs ``traced_segment``: under ``jit`` donation means nothing, and under a bare
# ``vmap`` the batched program could not reuse the buffers of its unbatched inputs, and JAX
# warned the user so ("Some donated buffers were not usable").
segment = jax.jit(_segment, static_argnames=("static", "config"), donate_argnames=("state",))
traced_segment = jax.jit(_segment, static_argnames=("static", "config"))


def _result(state: TrainState, start_epoch: int, *, config: Config) -> FitResult:
    c = config
    first = start_epoch // c.eval_every  # the evaluations scheduled before start_epoch are not this run's
    history = History(
        state.train_loss[start_epoch:],
        state.eval_loss[first:],
        jnp.arange(first + 1, c.evaluations + 1, dtype=jnp.int32) * c.eval_every,
        {name: values[first:] for name, values in state.eval_metrics.items()},
    )
    if c.log_every:
        history = history._replace(**_step_history(state, start_epoch, c))
    if c.eval_rows > 0 and c.restore_best:
        params, opt_state = state.best_params, state.best_opt_state
    else:
        params, opt_state = state.params, state.opt_state
    averaged = None
    if isinstance(opt_state, EmaState):  # fit(..., ema_decay=d): the optimizer's state and the average
        opt_state, averaged = opt_state.inner, _averaged(opt_state, params)
    finished: FitResult = distributed.replicate(
        FitResult(
            None if c.param_axis else params,
            None if c.param_axis else opt_state,
            history,
            state.best_epoch,
            state.stopped_epoch,
            state.diverged,
            _best_eval(state, c),
            _last_finite(history.train_loss),
            jnp.asarray(start_epoch, jnp.int32),
            None if c.param_axis else averaged,
        ),
        c.mesh,
    )
    if c.param_axis:  # FSDP: the params, optimizer state and average stay sharded
        finished = finished._replace(
            params=_sharded(params, c), opt_state=_sharded(opt_state, c), ema_params=_sharded(averaged, c)
        )
    return finished


def _step_history(state: TrainState, start: int, c: Config) -> dict[str, Any]:
    """``History``'s log entries (``log_every``): every ``k`` updates from ``start``'s entry on."""
    k = c.log_every
    entries = c.epochs // k
    first = start // k
    values = _entries(state, lambda h: h[: entries * k].reshape(entries, k)[first:])
    return {
        "step": jnp.arange(first + 1, entries + 1, dtype=jnp.int32) * k,
        "step_loss": values["loss"],
        "learning_rate": values["learning_rate"],
        "grad_norm": values["grad_norm"],
    }


def _best_eval(state: TrainState, c: Config) -> dict[str, jax.Array]:
    """The eval loss and metrics of the evaluation ``best_epoch`` names (NaN if none improved)."""
    values = {"loss": state.eval_loss, **state.eval_metrics}
    if c.eval_rows == 0 or c.evaluations == 0:
        return {"loss": _nan((), jnp.dtype(c.dtype))}
    j = state.best_epoch // c.eval_every - 1
    taken = (state.best_epoch % c.eval_every == 0) & (j >= 0) & jnp.isfinite(state.best)
    index = jnp.clip(j, 0, c.evaluations - 1)
    return {name: jnp.where(taken, v[index], jnp.nan) for name, v in values.items()}


def _last_finite(losses: jax.Array) -> jax.Array:
    finite = jnp.isfinite(losses)
    last = losses.shape[0] - 1 - jnp.argmax(finite[::-1])
    return jnp.where(jnp.any(finite), losses[last], jnp.nan)


result = jax.jit(_result, static_argnames=("start_epoch", "config"))
