"""``fit``: the book's ``Trainer.fit`` as compiled programs, with checkpoints and metrics.

``fit`` runs in stages, each a function of this module that the next feature touches alone:

1. ``_checked_options``: every argument but the data (``ValueError``/``TypeError`` before anything
   compiles), and ``_checked_optimizer``: the moving average of ``ema_decay`` and a resumed
   ``opt_state``;
2. ``_checked_data``: the training and eval data, against each other and the network;
3. ``_plan``: the shards (``_shards``), the checkpoint directory and the static ``Config``;
4. ``_placed``: the first ``TrainState``, the data where the program reads them (device arrays,
   or a host stream), and ``run(state, stop)``;
5. ``_run``: one segment, or segments of ``checkpoint_every`` with a checkpoint after each
   (``_fingerprint`` names the run), then ``_finish``: the ``FitResult``.

The programs are ``program.py``'s: ``fresh_state``, ``segment`` and ``result``; the numbers of the
network, loss, optimizer and metrics are split from their static remainder (``funcnet._values``)
so sweeps compile once. The same compiled programs serve a run with checkpoints and one without,
so both give the same result bit for bit, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from funcnet import _checks, optimizers
from funcnet._values import partition
from funcnet.layers import Layer
from funcnet.optimizers import Optimizer
from funcnet.precision import DynamicLossScale
from funcnet.state import has_state, split_state
from funcnet.train import checkpointing, checks, distributed, fsdp, sources
from funcnet.train import stream as streaming
from funcnet.train.program import (
    Config,
    FitResult,
    TrainState,
    batch_sharding,
    check_divisible,
    check_opt_state,
    fresh_state,
    result,
    segment,
    split_inputs,
    traced_segment,
    with_inputs,
)
from funcnet.train.progress import bar, show_end
from funcnet.train.steps import RandomWindows

__all__ = ["fit"]

Params = Any
Loss = Callable[[jax.Array, jax.Array], jax.Array]
Metric = Callable[[jax.Array, jax.Array], jax.Array]


@checks.explains_missing_key
def fit(
    net: Layer,
    loss: Loss,
    optimizer: Optimizer,
    params: Params,
    train_data: tuple[jax.Array, jax.Array]
    | tuple[jax.Array, jax.Array, dict[str, jax.Array]]
    | RandomWindows
    | Callable[[jax.Array, jax.Array], Any],
    eval_data: tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, dict[str, jax.Array]] | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_every: int = 10,
    patience: int | None = 0,
    min_delta: float = 0.0,
    key: jax.Array,
    shuffle: bool = True,
    drop_last: bool = False,
    progress: bool = False,
    opt_state: Any = None,
    start_epoch: int = 0,
    metrics: dict[str, Metric] | None = None,
    monitor: str = "loss",
    mode: str = "min",
    eval_batch_size: int = 10_000,
    checkpoint_dir: Any = None,
    checkpoint_every: int = 1,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    param_axis: str | fsdp.FSDP | None = None,
    shards: int | None = None,
    run_name: str | None = None,
    loss_scale: DynamicLossScale | None = None,
    ema_decay: float | None = None,
    ema_debias: bool = True,
    eval_ema: bool = False,
    stream: bool | None = None,
    stream_threshold: int | None = None,
    restore_best: bool = True,
    log_every: int | None = None,
    on_log: Callable[[int, dict[str, float]], Any] | None = None,
    transform: Callable[[jax.Array, Any], Any] | None = None,
) -> FitResult:
    """Train ``net`` on ``train_data`` as one compiled program. Book: ``Trainer.fit``.

    Early stopping, the book's trainer's rule: with ``eval_data``, ``fit`` evaluates after every
    ``eval_every`` epochs (default 10) and, with the default ``patience=0``, stops at the first
    evaluation that does not improve on the best so far, returning the params of the best
    evaluation. So ``epochs`` is an upper bound: ``result.stopped_epoch`` says when training
    stopped and ``result.best_epoch`` where ``result.params`` come from. ``patience=k`` allows
    ``k`` evaluations in a row without improvement; ``patience=None`` never stops early and
    still returns the best evaluation's params. Without ``eval_data`` every epoch is trained and
    the final params are returned. With ``eval_data``, ``epochs`` must reach an evaluation.

    Keywords by purpose (described under Args in this order):

    * what to train: ``net``, ``loss``, ``optimizer``, ``params``, ``train_data``, ``eval_data``,
      ``key``;
    * how long, in what batches: ``epochs``, ``steps``, ``batch_size``, ``shuffle``, ``drop_last``,
      ``transform``;
    * evaluation and early stopping: ``eval_every``, ``patience``, ``min_delta``, ``metrics``,
      ``monitor``, ``mode``, ``eval_batch_size``, ``restore_best``;
    * averages and precision: ``ema_decay``, ``ema_debias``, ``eval_ema``, ``loss_scale``;
    * resuming: ``checkpoint_dir``, ``checkpoint_every``, ``run_name``, ``opt_state``,
      ``start_epoch``;
    * where the data and the work live: ``mesh``, ``data_axis``, ``param_axis``, ``shards``, ``stream``,
      ``stream_threshold``;
    * watching: ``progress``, ``log_every``, ``on_log``.

    Args:
      net, loss, optimizer: the network, the loss ``(prediction, target) -> scalar`` (a mean
        over rows) and the optimizer.
      params: initial params, e.g. ``net.init(key, input_shape)[1]``.
      train_data: pairs ``(x, y)`` with rows first; x floating (or integer token
        ids), y floating or integer labels. Or triples ``(x, y, inputs)``: ``inputs`` is a dict
        ``{name: array}`` of the inputs beyond x that the network's layers take as keywords
        (padding's ``kv_lengths`` ``(rows,)``, an attention ``mask`` ``(rows, heads or 1, T, S)``),
        each with the rows first like x. Their rows go wherever x's rows go (shuffled, batched,
        the last batch padded, sharded over a mesh, streamed, placed per process, digested into
        the checkpoint's fingerprint) and each batch's slice reaches the network, in training
        (``train_apply(net)(params, x, key=..., row_mask=..., **inputs)``) and in evaluation
        (``net.apply(params, x, **inputs)``). A name no layer takes is a ``TypeError``.
        Or, with ``steps``, ``train_data=funcnet.random_windows(tokens, length)``: each step
        trains on ``batch_size`` random windows of a 1-D token array, drawn inside the program
        from ``(key, step)`` (``help(funcnet.random_windows)``). Host tokens stay on the host
        under the ``stream`` rule (an ``np.memmap`` always): each step's windows are read there by
        a callback inside the program, the same windows bit for bit (one device). Under a mesh,
        device tokens are replicated and each step's windows sharded along ``data_axis``.
        Or, with ``steps``, a sampler ``train_data=sampler``, ``sampler(key, step) -> (x, y)``
        (or ``(x, y, inputs)``): a pure JAX function the program calls for every micro-batch, its
        key ``sampler_key(key, step)``; its batches' rows are the batch size, sharded along
        ``data_axis`` under a mesh. A ``jax.tree_util.Partial`` of it is split like a loss: its
        arrays are traced, so a sweep over them compiles once.
      eval_data: see ``train_data``.
      key: a ``jax.random`` key; epoch ``e``'s order and dropout keys come from ``(key, e)`` alone (``epoch_order``).
      epochs: train until this many epochs are done (counting from 0, also when resuming).
      steps: instead of ``epochs`` (pass exactly one): train this many optimizer updates. Without
        ``accumulate`` an update is one batch; with ``accumulate(optimizer, k)`` it is ``k``
        batches (micro-batches), so ``steps=N`` trains ``N * k`` batches and applies ``N``
        updates (a schedule of the wrapped optimizer counts the same ``N``: a warmup-cosine of
        length ``steps``). Batches are the epoch sequence's: micro-batch ``g`` (from 0) is batch
        ``g % B`` of epoch ``g // B`` (``B`` batches per epoch, each epoch in the order
        ``epoch_order`` gives for ``(key, epoch)``, the same dropout keys), so ``steps=E * B``
        trains exactly what ``epochs=E`` does, and a run may end inside an epoch. With
        ``train_data=random_windows(tokens, length)`` each batch is drawn from ``(key, g)`` instead.
        Under ``steps`` every count is in updates: ``eval_every``, ``checkpoint_every``,
        ``start_epoch`` (the update to start from), ``result.best_epoch`` and
        ``result.stopped_epoch``, and ``history.train_loss`` holds one entry per update (the mean
        loss of its micro-batches). Not yet with streamed data (``stream``).
      batch_size: rows per step (default 32); the last batch may be smaller (see ``drop_last``).
        A sampler's batches set it: leave it out.
      shuffle: a fresh order every epoch (else the data order).
      drop_last: drop the remainder rows each epoch instead of a smaller last batch.
      transform: ``transform(key, batch) -> batch`` applied to every training batch ``(x, y)``
        (or ``(x, y, inputs)``) before the network sees it, never to eval data: augmentation, such
        as random crops (of a fixed size: pad first) and flips. It must return the batch's
        structure, shapes and dtypes (checked before anything compiles). Its key is the batch's own
        (``funcnet.train.sources.transform_key``), so a resumed run equals an uninterrupted one;
        a ``jax.tree_util.Partial`` of it compiles once over a sweep of its arrays.
      eval_every: the early-stopping schedule above. An evaluation improves
        when the monitored value beats the best by more than ``min_delta``; a non-finite loss
        stops training too (``result.diverged``).
      patience: see ``eval_every``.
      min_delta: see ``eval_every``.
      metrics: ``{name: (prediction, target) -> scalar}``, each a mean over rows (e.g.
        ``funcnet.accuracy``), computed on ``eval_data`` at every evaluation into
        ``history.eval_metrics[name]``.
      monitor: what early stopping watches, ``"loss"`` (the eval loss) or a metric's name,
        and whether lower (``"min"``) or higher (``"max"``) is better.
      mode: see ``monitor``.
      eval_batch_size: evaluate in batches of this many rows (the result is the same up to
        rounding, for a loss and metrics that are means over rows).
      restore_best: with ``eval_data``, ``True`` (the default) returns the best evaluation's params
        (and optimizer state); ``False`` returns the last params instead (``best_epoch`` and
        ``best_eval`` still name the best evaluation, and early stopping still applies: pass
        ``patience=None`` to train every epoch or step).
      ema_decay: keep the params' exponential moving average, ``ema = ema_decay * ema +
        (1 - ema_decay) * params`` after every update of the optimizer (in at least float32), and
        return it as ``FitResult.ema_params`` (the average that goes with ``params``: at the best
        evaluation with ``eval_data``). Under ``accumulate(optimizer, k)`` the average moves once
        per update of the wrapped optimizer (every ``k``-th step), as its schedule does. A
        checkpoint holds it, and a run resumed from one or by hand (``opt_state``, above)
        continues it exactly. The number is traced: a sweep over it compiles once.
      ema_debias: ``True`` (the default) debiases the average as ``optax.ema(ema_decay,
        debias=True)`` does: it starts at zero and is read as ``ema / (1 - ema_decay**t)`` after
        ``t`` updates, a weighted average of the trained params alone. ``False`` starts it from
        the initial params, which keep the weight ``ema_decay**t``: with 0.999 they are still 64%
        of the average after 440 updates, and such an average of mostly random weights scored 18.6%
        where the debiased one scored 65.2%. Debiasing is the default because the undebiased
        average is mostly the random initial weights for the first ``~1 / (1 - ema_decay)``
        updates while the debiased one averages trained params from the first update on, the two
        agreeing once ``ema_decay**t`` is negligible; it is also optax's default. The average of
        earlier releases is ``ema_debias=False``.
      eval_ema: with ``ema_decay``, evaluate the moving average instead of the params: the eval
        loss, the metrics, early stopping and the best evaluation kept all watch it.
      loss_scale: ``funcnet.DynamicLossScale()`` for float16 training (``help(funcnet.DynamicLossScale)``):
        the loss is scaled before the backward, the gradients unscaled after, a step with a
        non-finite gradient skipped and the scale halved, and the scale doubled after
        ``period`` finite steps. Not needed for bfloat16 or float32.
      checkpoint_dir: save the whole training state to this directory every
        ``checkpoint_every`` epochs; calling ``fit`` again with the same arguments resumes from
        the newest checkpoint (``result.resumed_epoch`` says from which epoch; with ``progress``
        a line says so too), and a finished run returns its result without training. Asked for
        more ``epochs``, a finished run continues, and equals a run of that length from the start.
        A checkpoint of another run is refused, listing what differs; ``read_checkpoint`` reads a
        checkpoint's params without resuming.
        Not under ``jit``/``vmap``.
      checkpoint_every: see ``checkpoint_dir``.
      run_name: with ``checkpoint_dir``, a name that vouches for the building blocks funcnet
        cannot compare by value (a lambda, closure or partial as loss, metric, activation or
        initializer): without one such a run's checkpoints are never resumed. Two calls with
        the same ``run_name`` must pass building blocks that compute the same thing.
      opt_state: resume by hand from saved params: train epochs ``start_epoch`` to
        ``epochs - 1`` from this optimizer state (of the trainable params,
        ``funcnet.split_state(params)[0]``: the optimizer never sees layer state), e.g. a previous
        run's ``result.params`` and ``result.opt_state``. Early stopping starts afresh (a
        ``checkpoint_dir`` resumes it too). With ``ema_decay`` the state carries the moving
        average: the ``FitResult.opt_state`` of an ``ema_decay`` run is an ``EmaState`` (the
        optimizer's state, the average and its weight) and the resumed run continues the average
        as an uninterrupted one would; an ``opt_state`` without one is refused (begin a new average
        with ``funcnet.start_ema(opt_state, params)``), and so is an ``EmaState`` without
        ``ema_decay`` (pass ``opt_state.inner`` to drop the average).
      start_epoch: see ``opt_state``.
      mesh: data parallelism. Each batch is sharded along ``data_axis`` of the
        ``jax.sharding.Mesh``, params and optimizer state are replicated, and XLA's SPMD
        partitioner averages the gradients with collectives. ``batch_size`` must divide by
        that axis's device count, and so must the training and eval rows: each device holds
        its equal part of them (NumPy data is placed so, never replicated), shuffles it on its
        own and trains on its local batches, so steps move gradients, not data. Data may already
        be ``jax.Array``s sharded along ``data_axis`` (multi-host: global arrays from
        ``jax.make_array_from_process_local_data``); every process calls ``fit`` with the same
        arguments (compared first: processes that disagree get a ``ValueError`` naming what
        differs), and the result is replicated, readable by every process.
      data_axis: see ``mesh``.
      param_axis: with ``mesh``, fully sharded data parallelism (FSDP) for a model larger than
        one device: a mesh axis name (``"fsdp"``), or a ``funcnet.FSDP`` rule. Each leaf of the
        params, the optimizer state and the moving average is split over that axis' devices along
        its largest dimension that divides by their count; leaves under ``FSDP.min_size``
        elements (default ``2**14``: biases, norms, counts) stay replicated (``help(funcnet.FSDP)``).
        The program keeps them sharded (sharding constraints: XLA gathers each layer's params where
        they are used and reduce-scatters the gradients), and so are ``result.params``,
        ``opt_state`` and ``ema_params``; the rest of the result is replicated. The data are sharded
        along ``data_axis`` as above; a mesh without a ``"data"`` axis uses ``param_axis`` for the
        rows too (FSDP proper: ``Mesh(devices, ("fsdp",))``), and a 2-D mesh ``("data", "fsdp")``
        splits the rows over ``data`` and the state over ``fsdp``. The result equals
        ``param_axis=None``'s (and ``fit(..., shards=n)`` on one device) up to the rounding of the
        gradient's reduction. Checkpoints are written per process without gathering
        (``funcnet.save``), and resume under either setting. Not under ``vmap``.
      shards: how many equal parts of the rows are shuffled and batched on their own; under a
        mesh the devices of ``data_axis`` (the default), else 1. ``fit(..., shards=n)`` on one
        device reproduces a fit on a mesh of ``n`` devices.
      stream: data larger than memory. ``True`` keeps host
        data (NumPy arrays, ``np.memmap``, or any object with ``shape``, ``dtype`` and indexing
        by an array of row indices) on the host and feeds the device a segment of steps at a
        time, the next segment read and transferred while the device trains on the current
        one; the result equals the device-resident fit's bit for bit. ``False`` puts the data
        on the device first. ``None`` (the default) streams when the data is on the host and
        either is not a NumPy array or its bytes (train and eval data together) exceed
        ``stream_threshold``, by default half the device's memory (``bytes_limit``; on a CPU,
        half the machine's RAM); ``jax.Array`` data is never streamed. Under a mesh of several
        processes each passes the whole host data and reads only its own devices' rows.
      stream_threshold: see ``stream``.
      progress: show a progress bar (``tqdm.auto`` if installed: a terminal or Jupyter; else a line
        every few seconds) counting epochs or steps, updated a few times a second (the batch within
        an epoch; rows per second and rows read while streaming) with the latest losses and
        metrics, and end with a line saying why the run stopped (finished, early stop with the
        best evaluation, diverged).
      log_every: with ``steps``, every ``log_every`` updates record the mean training loss
        over those updates, the learning rate the last of them applied (NaN for an optimizer that
        does not expose its rate: ``chain``, ``multi_optimizer``, a user's own) and the global
        gradient norm of that last update, into ``history.step``, ``step_loss``, ``learning_rate`` and ``grad_norm``;
        ``on_log(step, values)`` (``values`` a dict ``{"loss", "learning_rate", "grad_norm"}`` of
        floats, e.g. ``funcnet.JsonLinesLogger(path)``) is called on the host with each entry, in
        order, from inside the compiled program (``jax.experimental.io_callback``, ordered: no
        host sync between entries). A hook that raises stops the run with its error; checkpoints
        already written stay. ``on_log`` is part of the compiled program's identity (a new hook
        object compiles anew) and does not run under ``vmap``.
      on_log: see ``log_every``.

    Returns:
      A ``FitResult``.
    """
    call = _Call(**locals())
    if jax.process_count() > 1:  # before anything else, so that no process waits in a collective alone
        distributed.agree("fit", _described(call._asdict()))
    call = _checked_options(call)
    call, data = _checked_data(call)
    call, config = _plan(call, data)
    return _run(call, data, config)


class _Call(NamedTuple):
    """``fit``'s arguments, as given, then as ``_checked_options`` and ``_plan`` normalise them
    (``epochs`` holds the run's length in its unit; ``shards`` the shard count; ``optimizer`` stays
    the user's, ``program_optimizer`` adds the moving average)."""

    net: Layer
    loss: Loss
    optimizer: Optimizer
    params: Params
    train_data: Any
    eval_data: Any
    epochs: Any
    steps: Any
    batch_size: Any
    eval_every: Any
    patience: Any
    min_delta: Any
    key: jax.Array
    shuffle: bool
    drop_last: bool
    progress: bool
    opt_state: Any
    start_epoch: Any
    metrics: Any
    monitor: str
    mode: str
    eval_batch_size: Any
    checkpoint_dir: Any
    checkpoint_every: Any
    mesh: Mesh | None
    data_axis: str
    param_axis: Any  # as given, then the ``fsdp.FSDP`` rule (or None)
    shards: Any
    run_name: str | None
    loss_scale: DynamicLossScale | None
    ema_decay: float | None
    ema_debias: bool
    eval_ema: bool
    stream: bool | None
    stream_threshold: int | None
    restore_best: bool
    log_every: int | None
    on_log: Callable[[int, dict[str, float]], Any] | None
    transform: Callable[[jax.Array, Any], Any] | None
    program_optimizer: Any = None
    directory: Any = None  # the prepared checkpoint directory

    @property
    def by_steps(self) -> bool:
        return self.steps is not None

    @property
    def unit(self) -> str:
        return "steps" if self.by_steps else "epochs"

    @property
    def sampler(self) -> Callable[[jax.Array, jax.Array], Any] | None:
        """``train_data`` when it is a sampler ``(key, step) -> batch``."""
        return self.train_data if callable(self.train_data) else None


class _Data(NamedTuple):
    """The checked training and eval data (``_checked_data``): arrays as the program takes them
    (device arrays, or host arrays when ``streamed``), their digests for the checkpoint's
    fingerprint, and the loss's value on a batch (its dtype sets the totals')."""

    x: Any
    y: Any
    inputs: dict[str, Any]
    digest: Any
    eval_x: Any
    eval_y: Any
    eval_inputs: dict[str, Any]
    eval_digest: Any
    window: int  # ``random_windows``' length; 0 for rows
    sampled: bool  # a sampler draws the batches: x, y, inputs are its first batch
    streamed: bool
    value: Any  # the loss on one batch, abstract (``jax.ShapeDtypeStruct``)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def drawn(self) -> bool:
        """Each step's batch is drawn from ``(key, step)`` (windows, a sampler): no epochs of rows."""
        return bool(self.window or self.sampled)

    @property
    def eval_rows(self) -> int:
        return 0 if self.eval_x is None else int(self.eval_x.shape[0])


def _checked_options(c: _Call) -> _Call:
    """Stage 1: every argument but the data, checked (``ValueError``/``TypeError`` naming it)."""
    checks.check_parts("fit", c.net, c.loss, c.optimizer)
    if (c.epochs is None) == (c.steps is None):
        raise ValueError(
            "fit: pass either epochs (passes over the rows) or steps (optimizer updates), "
            f"not {'both' if c.steps is not None else 'neither'}."
        )
    length = _checks.positive_int("fit", "steps" if c.by_steps else "epochs", c.steps if c.by_steps else c.epochs)
    if (isinstance(c.train_data, RandomWindows) or c.sampler is not None) and not c.by_steps:
        what = "random_windows" if c.sampler is None else "a sampler"
        raise ValueError(f"fit: {what} draws batches without end: give the run's length as steps=N, not epochs.")
    checks.check_flags(restore_best=c.restore_best)
    log_every = c.log_every
    if log_every is not None:
        log_every = _checks.positive_int("fit", "log_every", log_every)
        if not c.by_steps:
            raise ValueError(
                "fit: log_every counts optimizer updates: pass steps=N (epochs=E is steps=E * B for B batches "
                "per epoch, the same updates bit for bit; by epochs, history logs per epoch)."
            )
        if log_every > length:
            raise ValueError(f"fit: log_every ({log_every}) must be <= steps ({length}), or no entry is ever logged.")
    if c.on_log is not None:
        if not callable(c.on_log):
            raise TypeError(f"fit: on_log must be a callable on_log(step, values), got {type(c.on_log).__name__}.")
        if log_every is None:
            raise ValueError("fit: on_log is called every log_every updates: pass log_every=k too.")
    c = c._replace(
        epochs=length,
        log_every=log_every,
        batch_size=None if c.batch_size is None else _checks.positive_int("fit", "batch_size", c.batch_size),
        eval_every=_checks.positive_int("fit", "eval_every", c.eval_every),
        patience=None if c.patience is None else _checks.positive_int("fit", "patience", c.patience, minimum=0),
        start_epoch=_checks.positive_int("fit", "start_epoch", c.start_epoch, minimum=0),
        eval_batch_size=_checks.positive_int("fit", "eval_batch_size", c.eval_batch_size),
        checkpoint_every=_checks.positive_int("fit", "checkpoint_every", c.checkpoint_every),
    )
    if c.start_epoch >= length:
        raise ValueError(f"fit: start_epoch must be < {c.unit} ({length}), got {c.start_epoch}.")
    _checks.real_number("fit", "min_delta", c.min_delta, low=0.0)
    if c.loss_scale is not None and not isinstance(c.loss_scale, DynamicLossScale):
        raise TypeError(
            f"fit: loss_scale must be a funcnet.DynamicLossScale or None, got {type(c.loss_scale).__name__}."
        )
    if c.run_name is not None and not isinstance(c.run_name, str):
        raise TypeError(f"fit: run_name must be a str or None, got {type(c.run_name).__name__}.")
    checks.check_flags(
        shuffle=c.shuffle, drop_last=c.drop_last, progress=c.progress, eval_ema=c.eval_ema, ema_debias=c.ema_debias
    )
    if c.ema_decay is not None:
        _checks.real_number("fit", "ema_decay", c.ema_decay, low=0.0, high=1.0, high_open=True)
    elif c.eval_ema:
        raise ValueError("fit: eval_ema=True evaluates the params' moving average, which needs ema_decay (e.g. 0.999).")
    checks.check_key(c.key)
    checks.check_params(c.params)
    metrics = checks.check_metrics(c.metrics, c.monitor, c.mode, c.eval_data is not None)
    return _checked_fsdp(_checked_optimizer(c._replace(metrics=metrics)))


def _checked_fsdp(c: _Call) -> _Call:
    """``param_axis`` as an ``fsdp.FSDP`` rule, checked against the mesh, ``vmap`` and every leaf of
    the params and the optimizer state (an explicit rule's error before anything compiles); a mesh
    without the default ``"data"`` axis takes the rows along ``param_axis`` too."""
    rule = fsdp.resolve("fit", c.mesh, c.param_axis)
    if rule is None or c.mesh is None:
        return c._replace(param_axis=rule)
    fsdp.check_not_vmapped(
        "fit",
        rule,
        params=c.params,
        opt_state=c.opt_state,
        key=c.key,
        train_data=c.train_data,
        eval_data=c.eval_data,
        optimizer=partition(c.optimizer)[0],
        ema_decay=c.ema_decay,
        min_delta=c.min_delta,
    )
    fsdp.check("fit", c.params, c.mesh, rule)
    opt_state = c.opt_state
    if opt_state is None:
        opt_state = jax.eval_shape(c.program_optimizer.init, split_state(c.params)[0])
    fsdp.check("fit", opt_state, c.mesh, rule)
    return c._replace(param_axis=rule, data_axis=fsdp.rows_axis(c.mesh, c.data_axis, rule))


def _checked_optimizer(c: _Call) -> _Call:
    """The optimizer the program runs (with the moving average of ``ema_decay`` in its state:
    checkpointed, vmapped and kept best with it) and the ``opt_state`` a resume brings."""
    program_optimizer = c.optimizer
    if c.ema_decay is not None:
        program_optimizer = optimizers.with_ema(c.optimizer, c.ema_decay, debias=bool(c.ema_debias))
        if c.opt_state is not None and not isinstance(c.opt_state, optimizers.EmaState):
            raise ValueError(
                "fit: opt_state holds no moving average, so ema_decay would start a new one from these "
                "params instead of continuing the resumed run's. Pass the FitResult.opt_state of the "
                "ema_decay run you resume (an EmaState: the optimizer's state and the average), or, to "
                "start a new average here, opt_state=funcnet.start_ema(opt_state, params)."
            )
    elif isinstance(c.opt_state, optimizers.EmaState):
        raise ValueError(
            "fit: opt_state holds a moving average (an EmaState, the FitResult.opt_state of an ema_decay "
            "run), but ema_decay is None: pass that run's ema_decay to continue the average, or "
            "opt_state.inner (the optimizer's state alone) to train without one."
        )
    if c.opt_state is not None:
        check_opt_state("fit", program_optimizer, c.params, c.opt_state)
    return c._replace(program_optimizer=program_optimizer)


def _checked_data(c: _Call) -> tuple[_Call, _Data]:
    """Stage 2: the training and eval data, checked against each other and against the network
    (one abstract evaluation of a batch each, nothing compiled), and the batch size (a sampler's
    batches have their own)."""
    drawn = isinstance(c.train_data, RandomWindows) or c.sampler is not None
    what = "random_windows" if c.sampler is None else "a sampler"
    if drawn and c.mesh is None and (c.shards or 1) > 1:
        raise ValueError(
            f"fit: {what} draws each step's batch whole, so shards (equal parts of fixed rows) does not "
            "apply; to train on several devices pass a mesh and shards=None."
        )
    if c.sampler is not None and c.stream:
        raise ValueError("fit: a sampler makes its batches on the device: stream=True does not apply to it.")
    if c.sampler is not None:
        x, y, inputs = sources.check_sampler(c.sampler, c.key)
        x, y, digest, inputs = checks.check_data("train_data (a sampler's batch)", (x, y, inputs))
        inputs = checks.check_inputs("fit", "train_data inputs", c.net, inputs)
        if c.batch_size is not None and c.batch_size != x.shape[0]:
            raise ValueError(
                f"fit: batch_size ({c.batch_size}) differs from the {x.shape[0]} rows of the sampler's batches; "
                "the sampler decides the batch: leave batch_size out."
            )
        c = c._replace(batch_size=x.shape[0])
        value = checks.check_fits_network(
            "train_data", c.net, c.loss, {}, c.params, x, y, x.shape[0], train=True, inputs=inputs
        )
        data = _Data(x, y, inputs, digest, None, None, {}, None, 0, True, False, value)
        return c, _checked_transform(c, data)
    c = c._replace(batch_size=32 if c.batch_size is None else c.batch_size)
    if isinstance(c.train_data, RandomWindows):
        tokens, window, streamed = c.train_data.tokens, c.train_data.length, False
        if streaming.chooses_stream(c.stream, c.stream_threshold, (tokens, tokens[:0]), None):
            # the tokens stay on the host (np.memmap: on disk), each step's windows read there
            if c.mesh is not None:
                raise ValueError(
                    "fit: random_windows of host tokens (an np.memmap, or stream=True) reads each step's "
                    "windows on one host: not under a mesh yet; pass device tokens (jnp.asarray(tokens))."
                )
            x, y, digest, inputs = streaming.check_host_data("train_data", (tokens, tokens))
        else:
            tokens = _on_device(tokens)
            x, y, digest, inputs = checks.check_data("train_data", (tokens, tokens))
        example = np.broadcast_to(np.arange(window), (c.batch_size, window))
        value = checks.check_fits_network(
            "train_data", c.net, c.loss, {}, c.params, x[example], y[example + 1], c.batch_size, train=True, inputs={}
        )
    else:
        window = 0
        streamed = streaming.chooses_stream(c.stream, c.stream_threshold, c.train_data, c.eval_data)
        if streamed and c.by_steps:
            raise ValueError("fit: steps= with streamed data is not supported yet: pass stream=False, or epochs.")
        x, y, digest, inputs = (streaming.check_host_data if streamed else checks.check_data)(
            "train_data", c.train_data
        )
        inputs = checks.check_inputs("fit", "train_data inputs", c.net, inputs)
        if c.batch_size > x.shape[0]:
            raise ValueError(f"fit: batch_size must be <= the {x.shape[0]} training rows, got {c.batch_size}.")
        fits = lambda rows: checks.check_fits_network(
            "train_data", c.net, c.loss, {}, c.params, x, y, rows, train=True, inputs=inputs
        )
        value = fits(c.batch_size)
        if x.shape[0] % c.batch_size == 1 and not c.drop_last and has_state(c.params):
            try:  # the last batch's one real row: enough values for batch statistics only in images or sequences
                fits(1)
            except ValueError as error:
                raise ValueError(
                    f"fit: the last batch holds 1 row ({x.shape[0]} rows, batch_size {c.batch_size}), too few "
                    f"for the network's batch statistics; choose another batch_size or drop_last=True. ({error})"
                ) from error
    data = _Data(x, y, inputs, digest, None, None, {}, None, window, False, streamed, value)
    return c, _checked_transform(c, data)


def _checked_transform(c: _Call, data: _Data) -> _Data:
    """``data`` with the eval data checked; a ``transform`` checked on a training batch's shapes."""
    if c.transform is not None:
        x, y = data.x, data.y
        if data.window:
            x = y = jax.ShapeDtypeStruct((1, data.window), data.x.dtype)
        sources.check_transform(c.transform, c.key, x, y, data.inputs, c.batch_size)
    return data if c.eval_data is None else _checked_eval_data(c, data)


def _checked_eval_data(c: _Call, data: _Data) -> _Data:
    """``data`` with the checked eval data, which must meet an evaluation in the run."""
    check = streaming.check_host_data if data.streamed else checks.check_data
    eval_x, eval_y, eval_digest, eval_inputs = check("eval_data", c.eval_data)
    eval_inputs = checks.check_inputs("fit", "eval_data inputs", c.net, eval_inputs)
    rows = min(eval_x.shape[0], c.eval_batch_size)
    checks.check_fits_network("eval_data", c.net, c.loss, c.metrics, c.params, eval_x, eval_y, rows, inputs=eval_inputs)
    if not any((e + 1) % c.eval_every == 0 for e in range(c.start_epoch, c.epochs)):
        raise ValueError(
            f"fit: eval_every ({c.eval_every}) leaves no evaluation in {c.unit} {c.start_epoch + 1}..{c.epochs}: "
            f"with eval_data, fit evaluates every eval_every {c.unit} (default 10) and keeps the best "
            f"evaluation's params; pass eval_every={c.epochs - c.start_epoch} or less, more {c.unit}, or no "
            "eval_data."
        )
    return data._replace(eval_x=eval_x, eval_y=eval_y, eval_inputs=eval_inputs, eval_digest=eval_digest)


def _plan(c: _Call, data: _Data) -> tuple[_Call, Config]:
    """Stage 3: the shards (a mesh's data axis, or ``shards``), the checkpoint directory, and the
    static ``Config`` that selects the compiled program."""
    c = c._replace(shards=_shards(c, data))
    if c.checkpoint_dir is not None:
        arrays = (data.x, data.y, data.inputs, data.eval_x, data.eval_y, data.eval_inputs)
        parts = (c.params, c.opt_state, arrays, c.key, c.min_delta, partition(c.optimizer)[0], c.ema_decay)
        if not all(_checks.is_concrete(a) for a in jax.tree_util.tree_leaves(parts)):
            raise ValueError("fit: checkpoint_dir needs concrete values: call fit outside jit/vmap to checkpoint.")
        c = c._replace(directory=checkpointing.prepare(c.checkpoint_dir))
    local, local_batch = data.rows // c.shards, c.batch_size // c.shards
    host_tokens = None if not data.window or isinstance(data.x, jax.Array) else sources.HostTokens(data.x)
    masked = local % local_batch != 0 and not c.drop_last and not data.drawn
    config = Config(
        rows=data.rows,
        batch_size=c.batch_size,
        batches=1 if data.drawn else math.ceil(local / local_batch) if masked else local // local_batch,
        epochs=c.epochs,
        eval_every=c.eval_every,
        patience=c.epochs if c.patience is None else c.patience,  # None: more bad evaluations than can happen
        shuffle=bool(c.shuffle),
        masked=masked,
        eval_rows=data.eval_rows,
        eval_batch_size=c.eval_batch_size,
        metrics=tuple(c.metrics),
        monitor=c.monitor,
        maximize=c.mode == "max",
        dtype=_checks.wide(data.value.dtype).name,  # totals of float16 losses overflow float16
        progress=bool(c.progress),
        mesh=c.mesh,
        data_axis=c.data_axis,
        loss_scale=c.loss_scale,
        shards=c.shards,
        param_axis=c.param_axis,
        restore_best=bool(c.restore_best),
        host_tokens=host_tokens,
    )
    if c.ema_decay is not None:
        config = config._replace(eval_ema=bool(c.eval_ema))
    if c.by_steps:
        config = config._replace(
            steps_mode=True, window=data.window, sampled=data.sampled, log_every=c.log_every or 0, on_log=c.on_log
        )
    return c, config


def _shards(c: _Call, data: _Data) -> int:
    """How many equal parts of the rows are shuffled and batched on their own, checked: the
    devices of the mesh's data axis, else ``shards`` (default 1)."""
    if c.mesh is not None:
        batch_sharding("fit", c.mesh, c.data_axis)
        check_divisible("fit", "batch_size", c.batch_size, c.mesh, c.data_axis)
        shards = int(c.mesh.shape[c.data_axis])
        if c.shards is not None and c.shards != shards:
            raise ValueError(
                f"fit: shards ({c.shards!r}) must be the {shards} devices of mesh axis {c.data_axis!r} under "
                "that mesh (or None)."
            )
    else:
        shards = _checks.positive_int("fit", "shards", 1 if c.shards is None else c.shards)
        for name, array in (
            ("train_data", data.x),
            ("eval_data", data.eval_x),
            *((f"train_data inputs[{k!r}]", a) for k, a in data.inputs.items()),
            *((f"eval_data inputs[{k!r}]", a) for k, a in data.eval_inputs.items()),
        ):
            distributed.check_global_without_mesh("fit", name, array)
    if shards > 1:
        where = f"the {shards} devices of mesh axis {c.data_axis!r}" if c.mesh is not None else f"shards={shards}"
        for what, size in (
            ("batch_size", c.batch_size),
            ("train_data rows", data.rows),
            ("eval_data rows", data.eval_rows),
        ):
            if size % shards and not (what == "train_data rows" and data.drawn):
                raise ValueError(
                    f"fit: {what} ({size}) must divide by {where}: each shard holds an equal part of "
                    f"the rows; choose a multiple of {shards} (e.g. drop {size % shards} rows)."
                )
    return shards


Run = Callable[[TrainState, int], TrainState]


def _placed(c: _Call, data: _Data, config: Config) -> tuple[TrainState, Run, _Data]:
    """Stage 4: the first training state and the data where the program reads them, and ``run``,
    training from a state up to an epoch (or step). The ``_Data`` returned is what the
    checkpoint's fingerprint sees (a streamed fit's shapes and digests)."""
    batch_sources = sources.Sources(c.sampler, c.transform)
    hyper, static = partition((c.net.apply, c.loss, c.program_optimizer, c.metrics, batch_sources))  # not init
    params, opt_state = c.params, c.opt_state
    if c.mesh is not None and c.param_axis is not None:  # FSDP: every process places its own blocks
        params = fsdp.shard(params, c.mesh, c.param_axis)
        opt_state = None if opt_state is None else fsdp.shard(opt_state, c.mesh, c.param_axis)
    elif c.mesh is not None:  # every process places its own copy
        params, opt_state = distributed.put_replicated((params, opt_state), c.mesh)
    state = fresh_state(params, opt_state, c.start_epoch, hyper, static=static, config=config)
    # The inputs beyond x ride with x (``program.WithInputs``): every row operation maps over them.
    features = with_inputs(data.x, data.inputs)
    eval_features = None if data.eval_x is None else with_inputs(data.eval_x, data.eval_inputs)
    if data.streamed:  # the data stays on the host; the fingerprint sees its device shapes and dtypes
        eval_pair = None if eval_features is None else (eval_features, data.eval_y)
        run = streaming.runner(hyper, (features, data.y), eval_pair, c.key, c.min_delta, static=static, config=config)
        if c.directory is not None:  # one pass over the data, in bounded memory, for the fingerprint
            data = data._replace(
                digest=streaming.digest(data.x, data.y, data.inputs),
                eval_digest=None
                if data.eval_x is None
                else streaming.digest(data.eval_x, data.eval_y, data.eval_inputs),
            )
        shape = lambda a: None if a is None else streaming.shape_of(a)
        data = data._replace(
            x=shape(data.x),
            y=shape(data.y),
            eval_x=shape(data.eval_x),
            eval_y=shape(data.eval_y),
            inputs={k: shape(a) for k, a in data.inputs.items()},
            eval_inputs={k: shape(a) for k, a in data.eval_inputs.items()},
        )
        return state, run, data
    if data.window and c.mesh is not None and config.host_tokens is None:  # each device draws from all tokens
        features = y = distributed.put_replicated(data.x, c.mesh)  # x and y are the tokens: one copy
    elif data.sampled or config.host_tokens is not None:  # the sampler, or host tokens, are the data
        features, y = None, None
        if config.host_tokens is not None and c.directory is not None:  # in bounded memory
            data = data._replace(digest=streaming.digest(data.x, data.y))
    else:
        features, y = _on_devices("train_data", features, data.y, c.mesh, c.data_axis)
    eval_y = data.eval_y
    if eval_features is not None:
        eval_features, eval_y = _on_devices("eval_data", eval_features, eval_y, c.mesh, c.data_axis)
    program = traced_segment if _checks.tracing() else segment
    key, min_delta = c.key, c.min_delta
    run = lambda s, stop: program(
        s, hyper, features, y, eval_features, eval_y, key, min_delta, stop, static=static, config=config
    )
    return state, run, data


def _run(c: _Call, data: _Data, config: Config) -> FitResult:
    """Stage 5: train, in one segment, or in segments of ``checkpoint_every`` with a checkpoint
    after each (resuming from the newest one of the same run), and the result."""
    state, run, data = _placed(c, data, config)
    show = config.progress and distributed.is_writer()  # one bar, from process 0
    if c.directory is None:
        with bar(show, c.epochs, c.start_epoch, c.unit[:-1]):
            try:
                state = run(state, c.epochs)
            except Exception as error:  # JAX's own words do not name the option at fault
                if c.on_log is not None and "not supported in vmap" in str(error):
                    raise ValueError(
                        "fit: on_log calls the host in order, which cannot run under vmap; log without "
                        "on_log (history.step_loss, learning_rate, grad_norm hold every entry) or fit "
                        "each member on its own."
                    ) from error
                raise
            if config.progress:
                jax.block_until_ready(state)
                jax.effects_barrier()
        return _finish(state, c.start_epoch, config)
    run_id = _fingerprint(c, data)
    restored = checkpointing.restore(c.directory, state, run_id, c.epochs)
    resumed = c.start_epoch
    if restored is not None:
        state, resumed = restored
        if c.mesh is not None:  # placed as the fresh state is (restore reads each process's own parts)
            state = distributed.put_replicated(state, c.mesh) if c.param_axis is None else state
        if show:
            print(f"fit: resumed from {c.unit[:-1]} {resumed} of the checkpoint in {str(c.directory)!r}", flush=True)
    with bar(show, c.epochs, int(state.epoch), c.unit[:-1]):
        while not bool(state.stopped) and int(state.epoch) < c.epochs:
            state = run(state, min(int(state.epoch) + c.checkpoint_every, c.epochs))
            checkpointing.store(c.directory, state, int(state.epoch), run_id)
            if config.progress:
                jax.effects_barrier()
    return _finish(state, c.start_epoch, config, resumed)


def _fingerprint(c: _Call, data: _Data) -> dict[str, str]:
    """The run's identity in its checkpoints: what a resume must agree on (``checkpointing.fingerprint``)."""
    return checkpointing.fingerprint(
        net=c.net,
        loss=c.loss,
        optimizer=c.optimizer,
        metrics=c.metrics,
        params=c.params,
        opt_state=c.opt_state,
        train_data=(data.x, data.y, data.inputs),
        eval_data=None if data.eval_x is None else (data.eval_x, data.eval_y, data.eval_inputs),
        data_digests=(data.digest, data.eval_digest),
        key=c.key,
        run_name=c.run_name,
        sources=None if c.sampler is None and c.transform is None else sources.Sources(c.sampler, c.transform),
        start_epoch=c.start_epoch,
        batch_size=c.batch_size,
        eval_every=c.eval_every,
        patience=c.patience,
        min_delta=float(c.min_delta),
        shuffle=bool(c.shuffle),
        drop_last=bool(c.drop_last),
        **({} if c.shards == 1 else {"shards": c.shards}),  # checkpoints of one-shard runs keep their fingerprint
        **({"by_steps": True, "window": data.window, "log_every": c.log_every} if c.by_steps else {}),
        monitor=c.monitor,
        mode=c.mode,
        loss_scale=c.loss_scale,
        **(
            {}
            if c.ema_decay is None
            else {"ema_decay": float(c.ema_decay), "eval_ema": bool(c.eval_ema), "ema_debias": bool(c.ema_debias)}
        ),
    )


def _described(arguments: dict[str, Any]) -> dict[str, str]:
    """Every argument of ``fit`` as text the processes compare (``distributed.agree``): building
    blocks described, arrays by shape, dtype and (host-readable ones) a digest of their values."""
    described = {}
    for name, value in arguments.items():
        if name in ("net", "loss", "optimizer", "metrics", "param_axis"):
            described[name] = checkpointing.describe(value)
        elif name == "mesh":
            described[name] = "None" if value is None else f"{dict(value.shape)}"
        elif name == "on_log":  # each process has its own hook object (only process 0's writes matter)
            described[name] = "None" if value is None else "given"
        elif name == "checkpoint_dir":  # hosts may mount a shared directory at different paths
            described[name] = "None" if value is None else "given"
        elif name in ("train_data", "eval_data") or (
            jax.tree_util.tree_leaves(value) and any(_checks.is_array(v) for v in jax.tree_util.tree_leaves(value))
        ):
            described[name] = distributed.host_description(value)
        else:
            described[name] = repr(value)
    return described


def _finish(state: TrainState, start_epoch: int, config: Config, resumed: int | None = None) -> FitResult:
    """The ``FitResult`` of a state (the jitted ``result``, typed); ``resumed``: the epoch a
    checkpoint resumed from."""
    finished: FitResult = result(state, start_epoch, config=config)
    kept = state.best_opt_state if config.eval_rows > 0 and config.restore_best else state.opt_state
    if isinstance(kept, optimizers.EmaState):  # the average goes with the optimizer state, for a resume by hand
        finished = finished._replace(opt_state=kept._replace(inner=finished.opt_state))
    if resumed is not None:
        finished = finished._replace(resumed_epoch=jax.device_put(np.asarray(resumed, np.int32)))
    if config.progress and distributed.is_writer():  # after the bar: why the run stopped
        show_end(finished, config)
    return finished


def _on_devices(name: str, features: Any, y: Any, mesh: Mesh | None, data_axis: str) -> tuple[Any, Any]:
    """A data set's ``features`` (``x``, or ``WithInputs``) and ``y`` as device arrays, once, so
    segments move no data (the user's arrays are not touched): without a mesh on the default
    device; under one each array's rows along ``data_axis``, each device receiving its own rows
    only (multi-host: they are already there)."""
    x, inputs = split_inputs(features)
    parts = {f"{name} x": x, f"{name} y": y, **{f"{name} inputs[{k!r}]": a for k, a in inputs.items()}}
    if mesh is None:
        placed = [_on_device(a) for a in parts.values()]
    else:
        placed = [distributed.place("fit", part, a, mesh, data_axis) for part, a in parts.items()]
    return with_inputs(placed[0], dict(zip(inputs, placed[2:], strict=True))), placed[1]


def _on_device(a: Any) -> jax.Array:
    """``a`` as a device array: a JAX array as it is, anything else through ``jax.device_put``
    (same dtype as ``jnp.asarray``, whose host-to-device copy compiles a small program per shape
    and dtype: four of them were a tenth of a second of a small first fit)."""
    return a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a))
