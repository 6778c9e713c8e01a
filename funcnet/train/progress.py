"""The progress bar of ``fit(..., progress=True)``: tqdm's auto mode if installed (a bar in a
terminal, a widget in Jupyter), else a line now and then; and the line that says why a fit ended.

What the bar counts: epochs, or with ``fit(..., steps=N)`` optimizer updates ("steps"). Beside
the count: the latest training loss, eval loss and metrics, the batch reached inside an epoch, and
a streamed fit's rows per second and rows read of the epoch.

The compiled program talks to the host through callbacks, and on a CPU one costs about 0.1 ms
(``benchmarks/bench_fit.py --logging``): more than a small network's whole training step. So the
program does not report every batch. It reports each epoch's end (``tick``, as it always did), and
between reports the host decides when the next is due: each report inside an epoch or between
updates (``batch_report``, ``step_report``) returns the count of batches, or updates, at which the
program reports next, chosen from the rate the host measured so that reports arrive about
``REPORTS_PER_SECOND`` times a second however fast the steps are (a host-side throttle: the
device only compares two integers per step). The results do not depend on it: when a report comes
only changes where the program pauses to call the host. Under several processes the schedule
must be the same in each, so it is fixed: a report per update, none inside an epoch.

The bar and its state live in this module (``_shown``), not in the program, so the program does
not change from one call to the next.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Clock", "bar", "batch_report", "ended", "reported", "show_end", "status", "step_report", "tick"]

REPORTS_PER_SECOND = 4  # the host asks for about this many reports a second
LINE_SECONDS = 5.0  # without tqdm: at most one line per this many seconds inside an epoch, or of steps
NEVER = int(np.iinfo(np.int32).max)  # a due count no run reaches


class Clock:
    """When the program should next call the host: ``next(done)`` after a call at ``done`` batches
    (or updates) returns the count due next, about ``1 / REPORTS_PER_SECOND`` seconds ahead at the
    rate measured between the last two calls. Under several processes the schedule must be the
    same in each, so it is fixed: ``done + every``."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None  # (time, count) of the last call

    def next(self, done: int, *, every: int | None = 1) -> np.ndarray:
        """The count at which the next call is due (``every=None``: none under several processes)."""
        now = time.perf_counter()
        if jax.process_count() > 1:  # every process must pause at the same steps
            return np.asarray(NEVER if every is None else done + every, np.int32)
        ahead = 1
        if self.last is not None and done > self.last[1] and now > self.last[0]:
            rate = (done - self.last[1]) / (now - self.last[0])
            ahead = max(1, int(rate / REPORTS_PER_SECOND))
        self.last = (now, done)
        return np.asarray(min(done + ahead, NEVER), np.int32)


class _Shown:
    """What the bar shows, and the host's clock for the next report."""

    def __init__(self) -> None:
        self.bar: Any = None  # a tqdm bar, ``object()`` for the line fallback, None when not shown
        self.unit = "epoch"
        self.status = ""  # a streamed fit's data status (``status``)
        self.losses = ""  # "train 0.1 eval 0.2 ..."
        self.at = ""  # the batch reached inside an epoch
        self.clock = Clock()
        self.started = False  # whether a report has come yet
        self.printed = 0.0  # the time of the fallback's last line


_shown = _Shown()


def _reset() -> None:
    global _shown
    _shown = _Shown()


def _show() -> None:
    bar = _shown.bar
    if not _shown.started:  # the bar's clock starts at the first report, after compiling: a sane rate
        _shown.started = True
        bar.start_t = bar.last_print_t = getattr(bar, "_time", time.time)()
    text = ", ".join(part for part in (_shown.at, _shown.losses) if part)
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text, refresh=False)


def _line(text: str, *, force: bool = False) -> None:
    """The fallback's line, at most one per ``LINE_SECONDS`` unless ``force``."""
    now = time.perf_counter()
    if force or now - _shown.printed >= LINE_SECONDS:
        _shown.printed = now
        print(f"{text}{f' ({_shown.status})' if _shown.status else ''}", flush=True)


def _losses(train_loss: Any, values: dict[str, Any]) -> str:
    parts = [f"train {float(train_loss):.4g}"]
    if not np.isnan(values["loss"]):
        parts += [f"eval {float(values['loss']):.4g}"]
        parts += [f"{name} {float(value):.4g}" for name, value in values.items() if name != "loss"]
    return " ".join(parts)


def tick(epoch: Any, train_loss: Any, values: dict[str, Any]) -> None:
    """One trained epoch: its training loss, and the eval loss and metrics if it evaluated."""
    bar = _shown.bar
    if bar is None:
        return
    _shown.losses, _shown.at = _losses(train_loss, values), ""
    if hasattr(bar, "update"):
        _show()
        bar.update(1)
    else:
        _line(f"{_shown.unit} {int(epoch) + 1}: {_shown.losses}", force=True)


def batch_report(done: Any, batches: Any) -> np.ndarray:
    """Inside an epoch: ``done`` batches trained since the run began (``batches`` an epoch).
    Returns the count at which the next report is due."""
    bar = _shown.bar
    if bar is not None:
        epoch, batch = divmod(int(done) - 1, int(batches))
        _shown.at = f"batch {batch + 1}/{int(batches)}"
        if hasattr(bar, "update"):
            _show()
            bar.update(0)  # redrawn if tqdm's own interval has passed
        else:
            _line(f"{_shown.unit} {epoch + 1}: {_shown.at}")
    return _shown.clock.next(int(done), every=None)  # inside an epoch: none under several processes


def step_report(done: Any, last: Any, train_loss: Any, values: dict[str, Any]) -> np.ndarray:
    """Training by steps: ``done`` updates trained (``last``: the run stops there), the last
    one's training loss and the latest evaluation. Returns the count at which the next is due."""
    bar = _shown.bar
    if bar is not None:
        _shown.losses = _losses(train_loss, values)
        if hasattr(bar, "update"):
            _show()
            bar.update(int(done) - bar.n)
        else:
            _line(f"step {int(done)}: {_shown.losses}", force=bool(last))
    return _shown.clock.next(int(done))


def reported(due: jax.Array, done: jax.Array, report: Any, *args: Any) -> jax.Array:
    """Inside the program: ``report(done, *args)`` on the host once ``done`` reaches ``due``;
    the next due count (``due`` itself when not reached)."""
    shape = jax.ShapeDtypeStruct((), jnp.int32)
    call = lambda: jax.pure_callback(report, shape, done, *args, vmap_method="sequential")
    next_due: jax.Array = lax.cond(done >= due, call, lambda: due)
    return next_due


@contextlib.contextmanager
def bar(show: bool, total: int, initial: int, unit: str = "epoch") -> Iterator[None]:
    """Show a bar of ``total`` epochs (or ``unit``s), ``initial`` of them done, while the block runs."""
    _reset()  # a fresh state for each fit
    _shown.unit = unit
    if not show:
        yield
        return
    try:
        from tqdm.auto import tqdm

        _shown.bar = tqdm(total=total, initial=initial, unit=unit, desc="fit")
    except ImportError:  # tqdm is optional: fall back to lines
        _shown.bar = object()
    try:
        yield
    finally:
        if hasattr(_shown.bar, "close"):
            _shown.bar.close()
        _reset()


def status(text: str, *, stalled: bool = False) -> None:
    """A streamed fit's data status beside the bar: the rows per second and rows read, or a stall.

    tqdm shows it as the bar's description at once; the line fallback adds it to its next line,
    and prints a stall as it happens, so a slow disk never looks like a frozen run.
    """
    bar = _shown.bar
    if bar is None:
        return
    _shown.status = text
    if hasattr(bar, "set_description_str"):
        bar.set_description_str(f"fit [{text}]", refresh=True)
    elif stalled:
        print(f"fit: {text}", flush=True)
    else:
        _line(f"{_shown.unit}: reading")


def ended(result: Any, config: Any) -> str:
    """The line that says why a fit stopped: finished, stopped early (when, and where its best
    evaluation was) or diverged, from its ``FitResult`` and ``Config``; a summary of the members
    of a ``vmap``-ed fit."""
    unit = "step" if config.steps_mode else "epoch"
    stopped, best = np.asarray(result.stopped_epoch), np.asarray(result.best_epoch)
    diverged = np.asarray(result.diverged)
    if stopped.ndim:  # vmap-ed fits: one line for them all
        early = int(np.sum((stopped < config.epochs) & ~diverged))
        return (
            f"fit: {stopped.size} runs: {int(np.sum(stopped >= config.epochs))} finished, {early} stopped early, "
            f"{int(np.sum(diverged))} diverged."
        )
    has_eval = config.eval_rows > 0
    best_eval = float(np.asarray(result.best_eval[config.monitor])) if has_eval else float("nan")
    best_text = "" if np.isnan(best_eval) else f"; best at {unit} {int(best)} (eval {config.monitor} {best_eval:.4g})"
    if bool(diverged):
        if has_eval:
            return f"fit: diverged at {unit} {int(stopped)}: a loss was not finite{best_text}."
        return f"fit: diverged at {unit} {int(stopped)}: a loss was not finite; params of {unit} {int(best)} returned."
    if int(stopped) < config.epochs:
        waited = config.patience + 1
        return (
            f"fit: early stop at {unit} {int(stopped)}: eval {config.monitor} did not improve for {waited} "
            f"evaluation{'s' if waited > 1 else ''}{best_text}."
        )
    train = float(np.asarray(result.last_train_loss))
    plural = "s" if config.epochs != 1 else ""
    return f"fit: finished {config.epochs} {unit}{plural}, train loss {train:.4g}{best_text}."


def show_end(result: Any, config: Any) -> None:
    """Print ``ended``'s line, after the bar has closed (a fit inside ``jit`` has no values to show)."""
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(result)):
        print(ended(result, config), flush=True)
