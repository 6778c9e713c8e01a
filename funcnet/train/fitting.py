"""``fit``: the book's ``Trainer.fit`` as compiled programs, with checkpoints and metrics.

``fit`` checks its arguments (``checks.py``), splits the network, loss, optimizer and metrics
into traced numbers and a static remainder (``funcnet._values``), and runs the programs of
``program.py``: ``fresh_state``, then ``segment`` (once, or once per ``checkpoint_every``
epochs with a checkpoint after each, ``checkpointing.py``), then ``result``. The same compiled
programs serve a run with checkpoints and one without, so both give the same result bit for
bit, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from funcnet import _checks, optimizers
from funcnet._values import partition
from funcnet.layers import Layer
from funcnet.optimizers import Optimizer
from funcnet.precision import DynamicLossScale
from funcnet.state import has_state
from funcnet.train import checkpointing, checks, distributed
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
from funcnet.train.progress import bar
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
    train_data: tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, dict[str, jax.Array]] | RandomWindows,
    eval_data: tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, dict[str, jax.Array]] | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 32,
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

    Args:
      net, loss, optimizer: the network, the loss ``(prediction, target) -> scalar`` (a mean
        over rows) and the optimizer.
      params: initial params, e.g. ``net.init(key, input_shape)[1]``.
      train_data, eval_data: pairs ``(x, y)`` with rows first; x floating (or integer token
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
        from ``(key, step)`` (``help(funcnet.random_windows)``; one device, no ``stream``/``mesh``
        yet).
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
      restore_best: with ``eval_data``, ``True`` (the default) returns the best evaluation's params
        (and optimizer state); ``False`` returns the last params instead (``best_epoch`` and
        ``best_eval`` still name the best evaluation, and early stopping still applies: pass
        ``patience=None`` to train every epoch or step).
      log_every, on_log: with ``steps``, every ``log_every`` updates record the mean training loss
        over those updates, the learning rate the last of them applied (NaN for an optimizer that
        does not expose its rate: ``chain``, ``multi_optimizer``, a user's own) and the mean global
        gradient norm, into ``history.step``, ``step_loss``, ``learning_rate`` and ``grad_norm``;
        ``on_log(step, values)`` (``values`` a dict ``{"loss", "learning_rate", "grad_norm"}`` of
        floats, e.g. ``funcnet.JsonLinesLogger(path)``) is called on the host with each entry, in
        order, from inside the compiled program (``jax.experimental.io_callback``, ordered: no
        host sync between entries). A hook that raises stops the run with its error; checkpoints
        already written stay. ``on_log`` is part of the compiled program's identity (a new hook
        object compiles anew) and does not run under ``vmap``.
      batch_size: rows per step; the last batch may be smaller (see ``drop_last``).
      eval_every, patience, min_delta: the early-stopping schedule above. An evaluation improves
        when the monitored value beats the best by more than ``min_delta``; a non-finite loss
        stops training too (``result.diverged``).
      key: a ``jax.random`` key; epoch ``e``'s order and dropout keys come from ``(key, e)`` alone (``epoch_order``).
      shuffle: a fresh order every epoch (else the data order).
      drop_last: drop the remainder rows each epoch instead of a smaller last batch.
      progress: show a progress bar (tqdm if installed, else a line per epoch) with the losses
        and metrics.
      opt_state, start_epoch: resume by hand from saved params: train epochs ``start_epoch`` to
        ``epochs - 1`` from this optimizer state (of the trainable params,
        ``funcnet.split_state(params)[0]``: the optimizer never sees layer state), e.g. a previous
        run's ``result.params`` and ``result.opt_state``. Early stopping starts afresh (a
        ``checkpoint_dir`` resumes it too). With ``ema_decay`` the state carries the moving
        average: the ``FitResult.opt_state`` of an ``ema_decay`` run is an ``EmaState`` (the
        optimizer's state, the average and its weight) and the resumed run continues the average
        as an uninterrupted one would; an ``opt_state`` without one is refused (begin a new average
        with ``funcnet.start_ema(opt_state, params)``), and so is an ``EmaState`` without
        ``ema_decay`` (pass ``opt_state.inner`` to drop the average).
      metrics: ``{name: (prediction, target) -> scalar}``, each a mean over rows (e.g.
        ``funcnet.accuracy``), computed on ``eval_data`` at every evaluation into
        ``history.eval_metrics[name]``.
      monitor, mode: what early stopping watches, ``"loss"`` (the eval loss) or a metric's name,
        and whether lower (``"min"``) or higher (``"max"``) is better.
      eval_batch_size: evaluate in batches of this many rows (the result is the same up to
        rounding, for a loss and metrics that are means over rows).
      checkpoint_dir, checkpoint_every: save the whole training state to this directory every
        ``checkpoint_every`` epochs; calling ``fit`` again with the same arguments resumes from
        the newest checkpoint (``result.resumed_epoch`` says from which epoch; with ``progress``
        a line says so too), and a finished run returns its result without training. Asked for
        more ``epochs``, a finished run continues, and equals a run of that length from the start.
        A checkpoint of another run is refused, listing what differs; ``read_checkpoint`` reads a
        checkpoint's params without resuming.
        Not under ``jit``/``vmap``.
      mesh, data_axis: data parallelism. Each batch is sharded along ``data_axis`` of the
        ``jax.sharding.Mesh``, params and optimizer state are replicated, and XLA's SPMD
        partitioner averages the gradients with collectives. ``batch_size`` must divide by
        that axis's device count, and so must the training and eval rows: each device holds
        its equal part of them (NumPy data is placed so, never replicated), shuffles it on its
        own and trains on its local batches, so steps move gradients, not data. Data may already
        be ``jax.Array``s sharded along ``data_axis`` (multi-host: global arrays from
        ``jax.make_array_from_process_local_data``); every process calls ``fit`` with the same
        arguments (compared first: processes that disagree get a ``ValueError`` naming what
        differs), and the result is replicated, readable by every process.
      shards: how many equal parts of the rows are shuffled and batched on their own; under a
        mesh the devices of ``data_axis`` (the default), else 1. ``fit(..., shards=n)`` on one
        device reproduces a fit on a mesh of ``n`` devices.
      loss_scale: ``funcnet.DynamicLossScale()`` for float16 training (``help(funcnet.DynamicLossScale)``):
        the loss is scaled before the backward, the gradients unscaled after, a step with a
        non-finite gradient skipped and the scale halved, and the scale doubled after
        ``period`` finite steps. Not needed for bfloat16 or float32.
      run_name: with ``checkpoint_dir``, a name that vouches for the building blocks funcnet
        cannot compare by value (a lambda, closure or partial as loss, metric, activation or
        initializer): without one such a run's checkpoints are never resumed. Two calls with
        the same ``run_name`` must pass building blocks that compute the same thing.
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
      stream, stream_threshold: data larger than memory. ``True`` keeps host
        data (NumPy arrays, ``np.memmap``, or any object with ``shape``, ``dtype`` and indexing
        by an array of row indices) on the host and feeds the device a segment of steps at a
        time, the next segment read and transferred while the device trains on the current
        one; the result equals the device-resident fit's bit for bit. ``False`` puts the data
        on the device first. ``None`` (the default) streams when the data is on the host and
        either is not a NumPy array or its bytes (train and eval data together) exceed
        ``stream_threshold``, by default half the device's memory (``bytes_limit``; on a CPU,
        half the machine's RAM); ``jax.Array`` data is never streamed. Under a mesh of several
        processes each passes the whole host data and reads only its own devices' rows.
    Returns:
      A ``FitResult``.
    """
    if jax.process_count() > 1:  # before anything else, so that no process waits in a collective alone
        distributed.agree("fit", _described(locals()))
    checks.check_parts("fit", net, loss, optimizer)
    if (epochs is None) == (steps is None):
        raise ValueError(
            "fit: pass either epochs (passes over the rows) or steps (optimizer updates), "
            f"not {'both' if steps is not None else 'neither'}."
        )
    by_steps = steps is not None
    epochs = _checks.positive_int("fit", "steps" if by_steps else "epochs", steps if by_steps else epochs)
    unit = "steps" if by_steps else "epochs"
    windowed = isinstance(train_data, RandomWindows)
    windows: Any = train_data
    if windowed and not by_steps:
        raise ValueError("fit: random_windows draws batches without end: give the run's length as steps=N, not epochs.")
    checks.check_flags(restore_best=restore_best)
    if log_every is not None:
        log_every = _checks.positive_int("fit", "log_every", log_every)
        if not by_steps:
            raise ValueError("fit: log_every counts optimizer updates: pass steps=N (epochs log per epoch).")
        if log_every > epochs:
            raise ValueError(f"fit: log_every ({log_every}) must be <= steps ({epochs}), or no entry is ever logged.")
    if on_log is not None:
        if not callable(on_log):
            raise TypeError(f"fit: on_log must be a callable on_log(step, values), got {type(on_log).__name__}.")
        if log_every is None:
            raise ValueError("fit: on_log is called every log_every updates: pass log_every=k too.")
    batch_size = _checks.positive_int("fit", "batch_size", batch_size)
    eval_every = _checks.positive_int("fit", "eval_every", eval_every)
    if patience is not None:
        patience = _checks.positive_int("fit", "patience", patience, minimum=0)
    start_epoch = _checks.positive_int("fit", "start_epoch", start_epoch, minimum=0)
    eval_batch_size = _checks.positive_int("fit", "eval_batch_size", eval_batch_size)
    checkpoint_every = _checks.positive_int("fit", "checkpoint_every", checkpoint_every)
    if start_epoch >= epochs:
        raise ValueError(f"fit: start_epoch must be < {unit} ({epochs}), got {start_epoch}.")
    _checks.real_number("fit", "min_delta", min_delta, low=0.0)
    if loss_scale is not None and not isinstance(loss_scale, DynamicLossScale):
        raise TypeError(f"fit: loss_scale must be a funcnet.DynamicLossScale or None, got {type(loss_scale).__name__}.")
    if run_name is not None and not isinstance(run_name, str):
        raise TypeError(f"fit: run_name must be a str or None, got {type(run_name).__name__}.")
    checks.check_flags(
        shuffle=shuffle, drop_last=drop_last, progress=progress, eval_ema=eval_ema, ema_debias=ema_debias
    )
    if ema_decay is not None:
        _checks.real_number("fit", "ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
    elif eval_ema:
        raise ValueError("fit: eval_ema=True evaluates the params' moving average, which needs ema_decay (e.g. 0.999).")
    checks.check_key(key)
    checks.check_params(params)
    metrics = checks.check_metrics(metrics, monitor, mode, eval_data is not None)
    window = 0
    if windowed:
        if stream or mesh is not None or (shards or 1) > 1:
            raise ValueError(
                "fit: random_windows trains from device data on one device: stream, mesh and shards are not "
                "supported with it yet."
            )
        tokens = _on_device(windows.tokens)
        window, streamed = windows.length, False
        x, y, train_digest, inputs = checks.check_data("train_data", (tokens, tokens))
        rows = x.shape[0]
        example = np.broadcast_to(np.arange(window), (batch_size, window))
        value = checks.check_fits_network(
            "train_data", net, loss, {}, params, x[example], y[example + 1], batch_size, train=True, inputs={}
        )
    else:
        streamed = streaming.chooses_stream(stream, stream_threshold, train_data, eval_data)
        if streamed and by_steps:
            raise ValueError("fit: steps= with streamed data is not supported yet: pass stream=False, or epochs.")
        check_data = streaming.check_host_data if streamed else checks.check_data
        x, y, train_digest, inputs = check_data("train_data", train_data)
        inputs = checks.check_inputs("fit", "train_data inputs", net, inputs)
        rows = x.shape[0]
        if batch_size > rows:
            raise ValueError(f"fit: batch_size must be <= the {rows} training rows, got {batch_size}.")
        value = checks.check_fits_network(
            "train_data", net, loss, {}, params, x, y, batch_size, train=True, inputs=inputs
        )
    if not windowed and rows % batch_size == 1 and not drop_last and has_state(params):
        try:  # the last batch's one real row: enough values for batch statistics only in images or sequences
            checks.check_fits_network("train_data", net, loss, {}, params, x, y, 1, train=True, inputs=inputs)
        except ValueError as error:
            raise ValueError(
                f"fit: the last batch holds 1 row ({rows} rows, batch_size {batch_size}), too few for "
                f"the network's batch statistics; choose another batch_size or drop_last=True. ({error})"
            ) from error
    eval_inputs: dict[str, Any] = {}
    if eval_data is not None:
        eval_x, eval_y, eval_digest, eval_inputs = (streaming.check_host_data if streamed else checks.check_data)(
            "eval_data", eval_data
        )
        eval_inputs = checks.check_inputs("fit", "eval_data inputs", net, eval_inputs)
        checks.check_fits_network(
            "eval_data",
            net,
            loss,
            metrics,
            params,
            eval_x,
            eval_y,
            min(eval_x.shape[0], eval_batch_size),
            inputs=eval_inputs,
        )
        if not any((e + 1) % eval_every == 0 for e in range(start_epoch, epochs)):
            raise ValueError(
                f"fit: eval_every ({eval_every}) leaves no evaluation in {unit} {start_epoch + 1}..{epochs}: "
                f"with eval_data, fit evaluates every eval_every {unit} (default 10) and keeps the best "
                f"evaluation's params; pass eval_every={epochs - start_epoch} or less, more {unit}, or no "
                "eval_data."
            )
    else:
        eval_x = eval_y = eval_digest = None
    eval_rows = 0 if eval_x is None else eval_x.shape[0]
    program_optimizer = optimizer
    if ema_decay is not None:  # the moving average rides in the optimizer state: checkpointed, vmapped, kept best
        program_optimizer = optimizers.with_ema(optimizer, ema_decay, debias=bool(ema_debias))
        if opt_state is not None and not isinstance(opt_state, optimizers.EmaState):
            raise ValueError(
                "fit: opt_state holds no moving average, so ema_decay would start a new one from these "
                "params instead of continuing the resumed run's. Pass the FitResult.opt_state of the "
                "ema_decay run you resume (an EmaState: the optimizer's state and the average), or, to "
                "start a new average here, opt_state=funcnet.start_ema(opt_state, params)."
            )
    elif isinstance(opt_state, optimizers.EmaState):
        raise ValueError(
            "fit: opt_state holds a moving average (an EmaState, the FitResult.opt_state of an ema_decay "
            "run), but ema_decay is None: pass that run's ema_decay to continue the average, or "
            "opt_state.inner (the optimizer's state alone) to train without one."
        )
    if opt_state is not None:
        check_opt_state("fit", program_optimizer, params, opt_state)
    if mesh is not None:
        batch_sharding("fit", mesh, data_axis)
        check_divisible("fit", "batch_size", batch_size, mesh, data_axis)
        devices = mesh.shape[data_axis]
        if shards is not None and shards != devices:
            raise ValueError(
                f"fit: shards ({shards!r}) must be the {devices} devices of mesh axis {data_axis!r} under "
                "that mesh (or None)."
            )
        shards = devices
    else:
        shards = _checks.positive_int("fit", "shards", 1 if shards is None else shards)
        for name, array in (
            ("train_data", x),
            ("eval_data", eval_x),
            *((f"train_data inputs[{k!r}]", a) for k, a in inputs.items()),
            *((f"eval_data inputs[{k!r}]", a) for k, a in eval_inputs.items()),
        ):
            distributed.check_global_without_mesh("fit", name, array)
    if shards > 1:
        where = f"the {shards} devices of mesh axis {data_axis!r}" if mesh is not None else f"shards={shards}"
        for what, size in (("batch_size", batch_size), ("train_data rows", rows), ("eval_data rows", eval_rows)):
            if size % shards:
                raise ValueError(
                    f"fit: {what} ({size}) must divide by {where}: each shard holds an equal part of "
                    f"the rows; choose a multiple of {shards} (e.g. drop {size % shards} rows)."
                )
    directory = None
    if checkpoint_dir is not None:
        traced = [
            a
            for a in jax.tree_util.tree_leaves(
                (
                    params,
                    opt_state,
                    (x, y, inputs),
                    (eval_x, eval_y, eval_inputs),
                    key,
                    min_delta,
                    partition(optimizer)[0],
                    ema_decay,
                )
            )
            if not _checks.is_concrete(a)
        ]
        if traced:
            raise ValueError("fit: checkpoint_dir needs concrete values: call fit outside jit/vmap to checkpoint.")
        directory = checkpointing.prepare(checkpoint_dir)

    local, local_batch = rows // shards, batch_size // shards
    masked = local % local_batch != 0 and not drop_last and not windowed
    config = Config(
        rows=rows,
        batch_size=batch_size,
        batches=1 if windowed else math.ceil(local / local_batch) if masked else local // local_batch,
        epochs=epochs,
        eval_every=eval_every,
        patience=epochs if patience is None else patience,  # None: more bad evaluations than can happen
        shuffle=bool(shuffle),
        masked=masked,
        eval_rows=0 if eval_x is None else eval_x.shape[0],
        eval_batch_size=eval_batch_size,
        metrics=tuple(metrics),
        monitor=monitor,
        maximize=mode == "max",
        dtype=_checks.wide(value.dtype).name,  # totals of float16 losses overflow float16
        progress=bool(progress),
        mesh=mesh,
        data_axis=data_axis,
        loss_scale=loss_scale,
        shards=shards,
    )
    if ema_decay is not None:
        config = config._replace(eval_ema=bool(eval_ema))
    if by_steps:
        config = config._replace(
            steps_mode=True, window=window, log_every=log_every or 0, on_log=on_log, restore_best=bool(restore_best)
        )
    elif not restore_best:
        config = config._replace(restore_best=False)
    hyper, static = partition((net.apply, loss, program_optimizer, metrics))  # init is not in the program
    if mesh is not None:  # every process places its own copy
        params, opt_state = distributed.put_replicated((params, opt_state), mesh)
    state = fresh_state(params, opt_state, start_epoch, hyper, static=static, config=config)
    # The inputs beyond x ride with x (``program.WithInputs``): every row operation maps over them.
    features, eval_features = with_inputs(x, inputs), None if eval_x is None else with_inputs(eval_x, eval_inputs)
    if streamed:  # the data stays on the host; the fingerprint sees its device shapes and dtypes
        eval_pair = None if eval_x is None else (eval_features, eval_y)
        run = streaming.runner(hyper, (features, y), eval_pair, key, min_delta, static=static, config=config)
        if directory is not None:  # one pass over the data, in bounded memory, for the fingerprint
            train_digest = streaming.digest(x, y, inputs)
            eval_digest = None if eval_x is None else streaming.digest(eval_x, eval_y, eval_inputs)
        x, y, eval_x, eval_y = (None if a is None else streaming.shape_of(a) for a in (x, y, eval_x, eval_y))
        inputs, eval_inputs = ({k: streaming.shape_of(a) for k, a in i.items()} for i in (inputs, eval_inputs))
    else:
        features, y = _on_devices("train_data", features, y, mesh, data_axis)
        if eval_features is not None:
            eval_features, eval_y = _on_devices("eval_data", eval_features, eval_y, mesh, data_axis)
        program = traced_segment if _checks.tracing() else segment
        run = lambda state, stop: program(
            state, hyper, features, y, eval_features, eval_y, key, min_delta, stop, static=static, config=config
        )
    show = config.progress and distributed.is_writer()  # one bar, from process 0
    if directory is None:
        with bar(show, epochs, start_epoch, unit[:-1]):
            try:
                state = run(state, epochs)
            except Exception as error:  # JAX's own words do not name the option at fault
                if on_log is not None and "not supported in vmap" in str(error):
                    raise ValueError(
                        "fit: on_log calls the host in order, which cannot run under vmap; log without "
                        "on_log (history.step_loss, learning_rate, grad_norm hold every entry) or fit "
                        "each member on its own."
                    ) from error
                raise
            if config.progress:
                jax.block_until_ready(state)
                jax.effects_barrier()
        return _finish(state, start_epoch, config)
    run_id = checkpointing.fingerprint(
        net=net,
        loss=loss,
        optimizer=optimizer,
        metrics=metrics,
        params=params,
        opt_state=opt_state,
        train_data=(x, y, inputs),
        eval_data=None if eval_x is None else (eval_x, eval_y, eval_inputs),
        data_digests=(train_digest, eval_digest),
        key=key,
        run_name=run_name,
        start_epoch=start_epoch,
        batch_size=batch_size,
        eval_every=eval_every,
        patience=patience,
        min_delta=float(min_delta),
        shuffle=bool(shuffle),
        drop_last=bool(drop_last),
        **({} if shards == 1 else {"shards": shards}),  # checkpoints of one-shard runs keep their fingerprint
        **({"by_steps": True, "window": window, "log_every": log_every} if by_steps else {}),
        monitor=monitor,
        mode=mode,
        loss_scale=loss_scale,
        **(
            {}
            if ema_decay is None
            else {"ema_decay": float(ema_decay), "eval_ema": bool(eval_ema), "ema_debias": bool(ema_debias)}
        ),
    )
    restored = checkpointing.restore(directory, state, run_id, epochs)
    resumed = start_epoch
    if restored is not None:
        state, resumed = restored
        if mesh is not None:  # host values: every process places its copy (NaN history entries included)
            state = distributed.put_replicated(state, mesh)
        if show:
            print(f"fit: resumed from {unit[:-1]} {resumed} of the checkpoint in {str(directory)!r}", flush=True)
    with bar(show, epochs, int(state.epoch), unit[:-1]):
        while not bool(state.stopped) and int(state.epoch) < epochs:
            state = run(state, min(int(state.epoch) + checkpoint_every, epochs))
            checkpointing.store(directory, state, int(state.epoch), run_id)
            if config.progress:
                jax.effects_barrier()
    return _finish(state, start_epoch, config, resumed)


def _described(arguments: dict[str, Any]) -> dict[str, str]:
    """Every argument of ``fit`` as text the processes compare (``distributed.agree``): building
    blocks described, arrays by shape, dtype and (host-readable ones) a digest of their values."""
    described = {}
    for name, value in arguments.items():
        if name in ("net", "loss", "optimizer", "metrics"):
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
