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

__all__ = ["bar", "tick"]

_bar: Any = None


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
        print(f"epoch {int(epoch) + 1}: {text}", flush=True)


@contextlib.contextmanager
def bar(show: bool, total: int, initial: int) -> Iterator[None]:
    """Show a bar of ``total`` epochs, ``initial`` of them done, while the block runs."""
    global _bar
    if not show:
        yield
        return
    try:
        from tqdm.auto import tqdm

        _bar = tqdm(total=total, initial=initial, unit="epoch", desc="fit")
    except ImportError:  # tqdm is optional: fall back to one line per epoch
        _bar = object()
    try:
        yield
    finally:
        if hasattr(_bar, "close"):
            _bar.close()
        _bar = None
