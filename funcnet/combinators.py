"""Branching networks, with stax's semantics: ``residual``, ``FanOut``, ``parallel``,
``FanInSum``, ``FanInConcat``.

Contract, stated once:

* Several inputs travel as a tuple (a list is accepted too): ``FanOut(n)`` turns one input into
  ``n``, ``parallel(*layers)`` applies layer ``i`` to input ``i``, and ``FanInSum()`` /
  ``FanInConcat(axis)`` turn several into one. Their shapes are likewise a tuple of shapes, so
  ``init`` chains through branches as it does through ``serial``.
* ``residual(*layers)`` is ``x + serial(*layers)(x)``: its layers must give back the input's
  shape, which ``init`` checks.
* Params: a tuple with one entry per layer (``residual``, ``parallel``), ``()`` for the fan-outs
  and fan-ins. Keys are split per layer or branch, so every branch's dropout draws its own mask.
  In training mode (``funcnet.train_apply``) each child runs in training mode and its updated
  state comes back in its entry; a row mask reaches every branch (they share the batch axis),
  and so do the inputs beyond ``x`` (``kv_lengths``, ``mask``), each to the layers that take it.
* ``summary`` lists the layers inside by path (``2.0``, ``2.1``: the branches of the combinator
  at position 2), and an error inside names that path, as ``serial`` does.
* The plumbing (copies, sums, concatenation) is linear, and its gradient is JAX's own; every
  op with a derivative of its own is a ``custom_vjp`` elsewhere in funcnet.
"""

from __future__ import annotations

import functools
import numbers
import operator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet.layers import (
    Layer,
    LayerSpec,
    Params,
    _Runs,
    _Serial,
    blame,
    check_entries,
    check_input_shape,
    check_layers,
    child_keys,
    decode_child,
    given_inputs,
    init_child,
    layer_spec,
    run_child,
    split_key,
)

__all__ = ["FanInConcat", "FanInSum", "FanOut", "parallel", "residual"]


def _several(fn: str, input_shape: Any, count: int | None = None) -> tuple[tuple[int, ...], ...]:
    """``input_shape`` must be a tuple of shapes (``count`` of them if given, else at least 2)."""
    if not isinstance(input_shape, (tuple, list)) or not all(isinstance(s, (tuple, list)) for s in input_shape):
        raise TypeError(
            f"{fn}: input_shape must be a tuple of shapes, one per input (after FanOut or "
            f"parallel), got {input_shape!r}."
        )
    if count is not None and len(input_shape) != count:
        raise ValueError(f"{fn}: input_shape must hold one shape per layer ({count}), got {len(input_shape)}.")
    if count is None and len(input_shape) < 2:
        raise ValueError(f"{fn}: a fan-in needs at least 2 inputs, got {len(input_shape)}.")
    return tuple(check_input_shape(fn, s, None, "(batch, ...)") for s in input_shape)


def _inputs(fn: str, xs: Any, count: int | None = None) -> tuple[jax.Array, ...]:
    """``xs`` must be a tuple of arrays (``count`` of them if given, else at least 2)."""
    if not isinstance(xs, (tuple, list)):
        raise TypeError(f"{fn}: x must be a tuple of inputs, one per branch, got {type(xs).__name__}.")
    if count is not None and len(xs) != count:
        raise ValueError(f"{fn}: x must hold one input per layer ({count}), got {len(xs)}.")
    if count is None and len(xs) < 2:
        raise ValueError(f"{fn}: a fan-in needs at least 2 inputs, got {len(xs)}.")
    for i, x in enumerate(xs):
        _checks.array(fn, f"x[{i}]", x)
    return tuple(xs)


@layer_spec
class _Residual(_Serial):
    label: ClassVar[str] = "residual"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        output_shape, params = super().init(key, input_shape)
        if tuple(output_shape) != tuple(input_shape):
            raise ValueError(
                f"residual: its layers must keep the input's shape for x + f(x), but they turn "
                f"{tuple(input_shape)} into {tuple(output_shape)}."
            )
        return output_shape, params

    def run(
        self,
        params: Any,
        x: Any,
        *,
        key: jax.Array | None,
        row_mask: jax.Array | None,
        train: bool,
        inputs: dict[str, Any],
    ) -> tuple[Any, Params]:
        y, params = super().run(params, x, key=key, row_mask=row_mask, train=train, inputs=inputs)
        if jnp.shape(y) != jnp.shape(x):
            raise ValueError(
                f"residual: its layers must keep the input's shape for x + f(x), but they turn "
                f"{jnp.shape(x)} into {jnp.shape(y)}."
            )
        return x + y, params

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        y, cache = super().decode(params, cache, x, offset=offset, **inputs)
        return x + y, cache


def residual(*layers: Layer) -> Layer:
    """``x + serial(*layers)(x)``: a residual (skip) connection around the layers."""
    return _Residual(check_layers("residual", layers)).layer()


@layer_spec
class _FanOut(LayerSpec):
    count: int

    @property
    def name(self) -> str:
        return f"FanOut({self.count})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = check_input_shape(self.name, input_shape, None, "(batch, ...)")
        return (shape,) * self.count, ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        _checks.array(self.name, "x", x)
        return (x,) * self.count


def FanOut(count: int) -> Layer:
    """One input to ``count`` copies, for ``parallel`` branches."""
    _checks.positive_int("FanOut", "count", count)
    return _FanOut(int(count)).layer()


@layer_spec
class _Parallel(_Runs):
    layers: tuple[Layer, ...]

    @property
    def name(self) -> str:
        return f"parallel({len(self.layers)} branches)"

    @property
    def children(self) -> tuple[Layer, ...]:
        return self.layers

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shapes = _several("parallel", input_shape, len(self.layers))
        outputs = [
            init_child("parallel", i, layer, k, shape)
            for i, (layer, k, shape) in enumerate(
                zip(self.layers, child_keys(key, len(self.layers)), shapes, strict=True)
            )
        ]
        return tuple(shape for shape, _ in outputs), tuple(params for _, params in outputs)

    def run(
        self,
        params: Any,
        x: Any,
        *,
        key: jax.Array | None,
        row_mask: jax.Array | None,
        train: bool,
        inputs: dict[str, Any],
    ) -> tuple[Any, Params]:
        check_entries("parallel", params, len(self.layers))
        xs = _inputs("parallel", x, len(self.layers))
        outputs, new = [], []
        for i, (layer, p, x_i, k) in enumerate(
            zip(self.layers, params, xs, split_key(key, len(self.layers)), strict=True)
        ):
            with blame("parallel", i, layer):
                y, p = run_child(layer, p, x_i, key=k, row_mask=row_mask, train=train, inputs=inputs)
            outputs.append(y)
            new.append(p)
        return tuple(outputs), tuple(new)

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        check_entries("parallel", params, len(self.layers))
        xs = _inputs("parallel", x, len(self.layers))
        given = given_inputs(self.name, self.inputs, inputs)
        outputs, caches = [], []
        for i, (layer, p, c, x_i) in enumerate(zip(self.layers, params, cache, xs, strict=True)):
            with blame("parallel", i, layer):
                y, c = decode_child(layer, p, c, x_i, offset=offset, inputs=given)
            outputs.append(y)
            caches.append(c)
        return tuple(outputs), tuple(caches)


def parallel(*layers: Layer) -> Layer:
    """Layer ``i`` applied to input ``i`` of a tuple of inputs; outputs a tuple."""
    return _Parallel(check_layers("parallel", layers)).layer()


@layer_spec
class _FanInSum(LayerSpec):
    @property
    def name(self) -> str:
        return "FanInSum()"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shapes = _several(self.name, input_shape)
        if len(set(shapes)) != 1:
            raise ValueError(f"{self.name}: every input must have the same shape, got {shapes}.")
        return shapes[0], ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        xs = _inputs(self.name, x)
        if len({jnp.shape(a) for a in xs}) != 1:
            raise ValueError(f"{self.name}: every input must have the same shape, got {[jnp.shape(a) for a in xs]}.")
        return functools.reduce(operator.add, xs)


def FanInSum() -> Layer:
    """The sum of several inputs of one shape."""
    return _FanInSum().layer()


@layer_spec
class _FanInConcat(LayerSpec):
    axis: int

    @property
    def name(self) -> str:
        return f"FanInConcat({self.axis})"

    def _axis(self, rank: int) -> int:
        axis = self.axis + rank if self.axis < 0 else self.axis
        if not 1 <= axis < rank:
            raise ValueError(
                f"{self.name}: axis must name a non-batch axis of {rank}-D inputs, i.e. in "
                f"[1, {rank}) or [-{rank - 1}, -1], got {self.axis}."
            )
        return axis

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shapes = _several(self.name, input_shape)
        rank = len(shapes[0])
        axis = self._axis(rank)
        others = {s[:axis] + s[axis + 1 :] for s in shapes}
        if any(len(s) != rank for s in shapes) or len(others) != 1:
            raise ValueError(f"{self.name}: inputs must agree on every axis but {self.axis}, got {shapes}.")
        return (*shapes[0][:axis], sum(s[axis] for s in shapes), *shapes[0][axis + 1 :]), ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        xs = _inputs(self.name, x)
        return jnp.concatenate(xs, axis=self._axis(jnp.ndim(xs[0])))


def FanInConcat(axis: int = -1) -> Layer:
    """Several inputs concatenated along ``axis`` (the features, by default; never the batch)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"FanInConcat: axis must be an int, got {type(axis).__name__} {axis!r}.")
    return _FanInConcat(int(axis)).layer()
