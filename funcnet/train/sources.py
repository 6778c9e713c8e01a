"""Batches made inside ``fit``'s program: a user's sampler and a per-batch transform.

* A **sampler** ``sampler(key, step) -> (x, y)`` (or ``(x, y, inputs)``) passed as ``train_data``
  with ``fit(..., steps=N)``: micro-batch ``step`` (an int32 scalar, counted from the run's start)
  is whatever it returns for ``(sampler_key(key, step), step)``. It is traced into the program, so
  it must be a pure JAX function whose shapes do not depend on ``step``'s value.
* A **transform** ``transform(key, (x, y)) -> (x, y)`` (or the triple with ``inputs``) passed as
  ``fit(..., transform=...)``: every training batch goes through it before the network sees it
  (augmentation: random crops and flips), with a key of its own per micro-batch
  (``transform_key``); evaluation data never does. It must return the batch's structure, shapes
  and dtypes.

Both are determined by ``(key, step)`` alone, so a resumed run equals an uninterrupted one bit for
bit, and both are values (``funcnet._values``): equal ``functools.partial``s of the same function
select one compiled program, their array arguments traced, so a sweep over them compiles once.
In grain's terms, the sampler is a source and a sampler in one (``random_windows`` is one such,
for token streams), and the transform is a random map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HostTokens",
    "Sources",
    "check_sampler",
    "check_transform",
    "sample",
    "sampler_key",
    "transform_key",
    "transformed",
]

Batch = Any  # (x, y) or (x, y, inputs)


class Sources(NamedTuple):
    """The sampler and the transform of a fit (each ``None`` when not given): part of the
    program's hyperparameters, so their numbers are traced and their structure is static."""

    sampler: Callable[[jax.Array, jax.Array], Batch] | None = None
    transform: Callable[[jax.Array, Batch], Batch] | None = None


def sampler_key(key: jax.Array, step: Any) -> jax.Array:
    """The key ``sampler`` receives for micro-batch ``step``."""
    return jax.random.fold_in(jax.random.fold_in(key, 0x5A3B1E), step)


def transform_key(batch_key: jax.Array, b: Any) -> jax.Array:
    """The key ``transform`` receives for batch ``b`` of a step whose dropout key is ``batch_key``
    (that batch's dropout key is ``fold_in(batch_key, b)``: a different path)."""
    return jax.random.fold_in(jax.random.fold_in(batch_key, 0x7A5F0), b)


def _parts(fn: str, what: str, batch: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(x, y, inputs)`` of a batch a user's function returned, or a ``TypeError`` naming it."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        inputs = batch[2] if len(batch) == 3 else {}
        if isinstance(inputs, dict):
            return batch[0], batch[1], dict(inputs)
    raise TypeError(
        f"{fn}: {what} must return a pair (x, y) of arrays, or a triple (x, y, inputs) with inputs a "
        f"dict {{name: array}}, got {type(batch).__name__} {batch!r:.80}."
    )


def sample(
    sampler: Callable[[jax.Array, jax.Array], Batch], key: jax.Array, step: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Micro-batch ``step``'s ``(x, y, inputs)``, drawn from ``(key, step)``."""
    return _parts("fit", "train_data (a sampler)", sampler(sampler_key(key, step), step))


def transformed(
    transform: Callable[[jax.Array, Batch], Batch], key: jax.Array, x: Any, y: Any, inputs: dict[str, Any]
) -> Any:
    """``(x, y, inputs)`` after ``transform`` (the form the user's batches have: a pair without inputs)."""
    out = transform(key, (x, y, inputs) if inputs else (x, y))
    return _parts("fit", "transform", out)


def check_sampler(sampler: Any, key: jax.Array) -> tuple[Any, Any, dict[str, Any]]:
    """A concrete batch of ``sampler`` (its step 0), after checking that it traces with a traced
    ``step`` into the same shapes: a sampler whose shapes follow ``step``'s value cannot be one
    compiled program."""
    step = jnp.zeros((), jnp.int32)
    try:
        traced = jax.eval_shape(lambda k, s: sample(sampler, k, s), key, step)
    except jax.errors.ConcretizationTypeError as error:
        raise ValueError(
            "fit: train_data (a sampler) must trace with a traced step: it runs inside the compiled "
            "program, so its batch shapes cannot depend on step's value (use jax.numpy and "
            "jax.random on the key, and lax.dynamic_slice with a fixed size). "
            f"Tracing it failed with: {str(error).splitlines()[0]}"
        ) from error
    x, y, inputs = sample(sampler, key, step)
    concrete = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), (x, y, inputs))
    if not _same(concrete, traced):
        raise ValueError(
            f"fit: train_data (a sampler) must give every step a batch of the same shapes; step 0 gave "
            f"{_shapes(concrete)} but a traced step gives {_shapes(traced)}."
        )
    return x, y, inputs


def check_transform(transform: Any, key: jax.Array, x: Any, y: Any, inputs: dict[str, Any], rows: int) -> None:
    """``transform`` must be callable and return a batch (``rows`` rows of ``x``, ``y`` and
    ``inputs``) of the same structure, shapes and dtypes."""
    if not callable(transform):
        raise TypeError(
            f"fit: transform must be a callable transform(key, batch) -> batch, got {type(transform).__name__}."
        )
    batch = lambda a: jax.ShapeDtypeStruct((rows, *np.shape(a)[1:]), jnp.result_type(a))
    given = jax.tree_util.tree_map(batch, (x, y, inputs))
    out = jax.eval_shape(lambda k, b: transformed(transform, k, *b), key, given)
    if not _same(out, given):
        raise ValueError(
            f"fit: transform must return the batch's structure, shapes and dtypes: given {_shapes(given)}, it "
            f"returned {_shapes(out)}. (A random crop crops to a fixed size, then the network sees that size "
            "in training only: pad the evaluation data or crop inside the network instead.)"
        )


class HostTokens:
    """``random_windows`` of a host token array (NumPy, ``np.memmap``): each step's windows are
    read on the host by a callback inside the program (``jax.pure_callback``: the starts go to the
    host, ``batch_size * (length + 1)`` tokens come back as int32), so the tokens never reach the
    device and an ``np.memmap`` reads only the pages the windows touch. In a ``Config``: equal when
    the token arrays are the same object, so a sweep over the same tokens compiles once."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: Any):
        self.tokens = tokens

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HostTokens) and other.tokens is self.tokens

    def __hash__(self) -> int:
        return id(self.tokens)

    def _read(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.tokens[np.asarray(index)], dtype=np.int32)

    def windows(self, starts: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
        """``(x, y)`` of the windows at ``starts``, as ``steps.windows`` gathers them on the device."""
        index = starts[:, None] + jnp.arange(length + 1, dtype=jnp.int32)[None, :]
        shape = jax.ShapeDtypeStruct(index.shape, jnp.int32)
        block = jax.pure_callback(self._read, shape, index, vmap_method="sequential")
        return block[:, :-1], block[:, 1:]


def _same(a: Any, b: Any) -> bool:
    """Two trees of ``jax.ShapeDtypeStruct`` with the same structure, shapes and dtypes."""
    same = str(jax.tree_util.tree_structure(a)) == str(jax.tree_util.tree_structure(b))
    return same and jax.tree_util.tree_leaves(a) == jax.tree_util.tree_leaves(b)


def _shapes(batch: Any) -> str:
    x, y, inputs = batch
    text = f"x {x.dtype}{list(x.shape)}, y {y.dtype}{list(y.shape)}"
    return text + "".join(f", {k} {a.dtype}{list(a.shape)}" for k, a in inputs.items())
