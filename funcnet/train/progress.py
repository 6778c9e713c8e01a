"""The progress bar of ``fit(..., progress=True)``: tqdm if installed, else a line per epoch.

The compiled program reports each trained epoch through ``jax.debug.callback(tick, ...)``.
The bar lives in a module-level sink rather than in the program, so the program does not
change from one call to the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["bar", "status", "tick"]

_bar: Any = None
_status = ""  # a streamed fit's data status (``status``)
_unit = "epoch"  # what the bar counts: epochs, or steps (``fit(..., steps=N)``: one tick per update)


def tick(epoch: Any, train_loss: Any, values: dict[str, Any]) -> None:
    """One trained epoch: its training loss, and the eval loss and metrics if it evaluated."""
    if _bar is None:
        return
    parts = [f"train {float(train_loss):.4g}"]
    if not np.isnan(values["loss"]):
        parts += [f"eval {float(values['loss']):.4g}"] + [
            f"{name} {float(value):.4g}" for name, value in values.items() if name != "loss"
        ]
    text = " ".join(parts)
    if hasattr(_bar, "set_postfix_str"):
        _bar.set_postfix_str(text, refresh=False)
        _bar.update(1)
    else:
        print(f"{_unit} {int(epoch) + 1}: {text}{f' ({_status})' if _status else ''}", flush=True)


@contextlib.contextmanager
def bar(show: bool, total: int, initial: int, unit: str = "epoch") -> Iterator[None]:
    """Show a bar of ``total`` epochs (or ``unit``s), ``initial`` of them done, while the block runs."""
    global _bar, _status, _unit
    _unit = unit
    if not show:
        yield
        return
    try:
        from tqdm.auto import tqdm

        _bar = tqdm(total=total, initial=initial, unit=unit, desc="fit")
    except ImportError:  # tqdm is optional: fall back to one line per epoch
        _bar = object()
    try:
        yield
    finally:
        if hasattr(_bar, "close"):
            _bar.close()
        _bar, _status, _unit = None, "", "epoch"


def status(text: str, *, stalled: bool = False) -> None:
    """A streamed fit's data status beside the bar: the rows per second read, or a stall.

    tqdm shows it as the bar's description at once; the one-line-per-epoch fallback adds it to
    the next epoch's line, and prints a stall as it happens, so a slow disk never looks like a
    frozen run.
    """
    global _status
    if _bar is None:
        return
    _status = text
    if hasattr(_bar, "set_description_str"):
        _bar.set_description_str(f"fit [{text}]", refresh=True)
    elif stalled:
        print(f"fit: {text}", flush=True)
