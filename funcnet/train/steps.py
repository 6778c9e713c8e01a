"""Training by steps (``fit(..., steps=N)``): batch sources drawn inside the program, and the
step-level log.

* ``random_windows(tokens, length)``: a ``train_data`` value whose batches are ``batch_size``
  random windows of a 1-D token array, drawn inside the compiled program from ``(key, step)``
  alone (``window_starts``), so a resumed run equals an uninterrupted one bit for bit.
* ``calls_per_update``: how many micro-batches one optimizer update takes (``accumulate``'s ``k``).
* ``applied_rate``: the learning rate the last update applied, read from the optimizer state.
* ``JsonLinesLogger``: an ``on_log`` hook writing one JSON object per logged step.
* ``TensorBoardLogger``: an ``on_log`` hook writing TensorBoard event files (``tensorboardX``, the
  optional extra ``pip install "funcnet[tensorboard]"``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks
from funcnet.optimizers import _Accumulate, _Base, _Ema

__all__ = [
    "JsonLinesLogger",
    "RandomWindows",
    "TensorBoardLogger",
    "applied_rate",
    "calls_per_update",
    "random_windows",
    "window_starts",
]


class RandomWindows(NamedTuple):
    """``fit``'s ``train_data`` for training on random windows of a 1-D token array
    (``random_windows``): each step's batch is ``batch_size`` windows ``x = tokens[i : i + length]``,
    ``y = tokens[i + 1 : i + length + 1]`` at random starts ``i`` (nanoGPT's ``get_batch``)."""

    tokens: Any
    length: int


def random_windows(tokens: Any, length: int) -> RandomWindows:
    """Random windows of a 1-D token array as ``fit``'s ``train_data`` (needs ``fit(..., steps=N)``).

    Step ``t`` (counting micro-batches under ``accumulate``) draws ``batch_size`` starts ``i``
    uniformly in ``0 .. len(tokens) - length - 1`` from ``jax.random.fold_in(key, t)``
    (``window_starts``) and trains on ``x = tokens[i : i + length]`` (shape ``(batch_size,
    length)``), ``y = tokens[i + 1 : i + length + 1]``. Device tokens (and host tokens that
    ``fit``'s ``stream`` rule keeps on the device) are placed there once and the windows gathered
    inside the compiled program; host tokens that it streams (an ``np.memmap`` always, or
    ``stream=True``) stay on the host, and each step's windows are read there by a callback inside
    the program (``funcnet.train.sources.HostTokens``), the same windows bit for bit.

    Args:
      tokens: a 1-D array of integer token ids, at least ``length + 1`` long.
      length: the window's length T: ``x`` and ``y`` are ``(batch_size, length)``.

    Returns:
      A ``RandomWindows(tokens, length)`` to pass as ``fit``'s ``train_data``.
    """
    _checks.array("random_windows", "tokens", tokens)
    if np.ndim(tokens) != 1:
        raise ValueError(f"random_windows: tokens must be a 1-D array of token ids, got shape {np.shape(tokens)}.")
    length = _checks.positive_int("random_windows", "length", length)
    if length + 1 > np.shape(tokens)[0]:
        raise ValueError(
            f"random_windows: a window of {length} tokens needs length + 1 = {length + 1} tokens (x and y "
            f"shifted by one), but tokens holds {np.shape(tokens)[0]}; choose a shorter length."
        )
    return RandomWindows(tokens, length)


def window_starts(key: jax.Array, step: Any, batch_size: int, tokens: int, length: int) -> jax.Array:
    """The ``batch_size`` window starts of step ``step`` (int32, in ``[0, tokens - length)``)."""
    step_key = jax.random.fold_in(jax.random.fold_in(key, 0x57E9), step)
    return jax.random.randint(step_key, (batch_size,), 0, tokens - length, dtype=jnp.int32)


def window_dropout_key(key: jax.Array, step: Any) -> jax.Array:
    """Step ``step``'s dropout key for windowed training."""
    return jax.random.fold_in(jax.random.fold_in(key, 0xD0), step)


def windows(tokens: jax.Array, starts: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """``(x, y)``: the windows at ``starts`` and the same shifted by one token."""
    index = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return tokens[index], tokens[index + 1]


def calls_per_update(optimizer: Any) -> Any:
    """Micro-batches per optimizer update: ``accumulate(opt, k)``'s ``k`` (possibly traced), found
    at the top or under ``fit``'s moving average; 1 otherwise (an ``accumulate`` inside ``chain``
    or ``multi_optimizer`` is not seen: ``steps`` then counts its calls)."""
    owner = getattr(optimizer.update, "owner", None)
    if isinstance(owner, _Ema):
        return calls_per_update(owner.optimizer)
    if isinstance(owner, _Accumulate):
        return owner.steps
    return 1


def applied_rate(optimizer: Any, state: Any) -> jax.Array:
    """The learning rate the optimizer's last update applied (its schedule at that update), read
    from its state after the update; NaN for an optimizer that does not expose one (``chain``,
    ``multi_optimizer``, a user's ``Optimizer``)."""
    owner = getattr(optimizer.update, "owner", None)
    if isinstance(owner, (_Ema, _Accumulate)):
        return applied_rate(owner.optimizer, state.inner)
    if isinstance(owner, _Base):
        rate = owner.learning_rate
        value = rate(jnp.maximum(state.step - 1, 0)) if callable(rate) else rate
        return jnp.asarray(value, jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


class JsonLinesLogger:
    """An ``on_log`` hook for ``fit(..., log_every=k, on_log=JsonLinesLogger(path))``: appends one
    JSON object per logged step to ``path``, ``{"step": ..., "loss": ..., "learning_rate": ...,
    "grad_norm": ...}`` (NaN written as ``null``), flushed at once so a killed run keeps its log.

    Args:
      path: the JSON Lines file, appended to (created if absent).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        row = {"step": int(step)}
        for name, value in values.items():
            number = float(value)
            row[name] = None if math.isnan(number) else number  # type: ignore[assignment]
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def __repr__(self) -> str:
        return f"JsonLinesLogger({self.path!r})"


class TensorBoardLogger:
    """An ``on_log`` hook writing TensorBoard event files: ``fit(..., log_every=k,
    on_log=TensorBoardLogger(logdir))``, then ``tensorboard --logdir logdir``.

    Each logged step adds one scalar per value under the tag ``prefix + name`` (``train/loss``,
    ``train/learning_rate``, ``train/grad_norm``) at that step, and flushes, so a killed run keeps
    what it logged (a NaN is written as NaN: TensorBoard shows the gap). The writer is
    ``tensorboardX``'s ``SummaryWriter`` (an optional dependency: ``pip install
    "funcnet[tensorboard]"``), opened at the first logged step, so constructing the logger writes
    nothing; ``close()`` (or a ``with`` block) closes it, and a later step opens a new event file
    in the same directory, as a resumed run does. Logging continues across a resume from a
    checkpoint: the steps go on from the checkpoint's.

    Args:
      logdir: the directory of the event files (created if missing). One directory per run: a
        second run writing to the same directory shows in TensorBoard as the same curves.
      prefix: put before each value's name to make its tag; ``"train/"`` groups the three curves
        in one TensorBoard section.

    Returns:
      A callable ``logger(step, values)`` for ``fit``'s ``on_log``.

    Raises:
      ImportError: ``tensorboardX`` is not installed (the message says how to install it).
    """

    def __init__(self, logdir: str | os.PathLike[str], *, prefix: str = "train/"):
        if not isinstance(prefix, str):
            raise TypeError(f"TensorBoardLogger: prefix must be a str, got {type(prefix).__name__}.")
        try:
            import tensorboardX  # noqa: F401  (imported here so a missing package fails now, not mid-run)
        except ImportError as error:
            raise ImportError(
                "TensorBoardLogger writes through tensorboardX, which is not installed: "
                'pip install "funcnet[tensorboard]" (or pip install tensorboardX).'
            ) from error
        self.logdir, self.prefix = os.fspath(logdir), prefix
        self._writer: Any = None

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.logdir)
        for name, value in values.items():
            self._writer.add_scalar(self.prefix + name, float(value), int(step))
        self._writer.flush()

    def close(self) -> None:
        """Close the event file (a later logged step opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.logdir!r}, prefix={self.prefix!r})"
