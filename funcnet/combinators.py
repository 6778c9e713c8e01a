"""Branching networks, with stax's semantics: ``residual``, ``FanOut``, ``parallel``,
``FanInSum``, ``FanInConcat``; and two wrappers for language models: ``remat`` (gradient
checkpointing) and ``tied`` (an embedding whose transpose is the output head).

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
* ``remat(layer)`` computes what ``layer`` computes, in every mode (inference, training with
  state, decoding), with the same params; only its gradient's memory differs: the backward
  recomputes ``layer``'s forward instead of keeping its activations (see ``remat``).
* ``tied(embedding, *layers)`` is ``serial(embedding, *layers)`` followed by the logits ``h @
  W.T``, ``W`` being the embedding's own table (nanoGPT's ``lm_head.weight = wte.weight``); its
  params are ``(embedding's, *layers')``, so ``W`` is stored, trained and counted once, and its
  gradient is the sum of both uses.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import operator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks, ops
from funcnet.embeddings import EmbeddingParams, _Embedding
from funcnet.layers import (
    Layer,
    LayerSpec,
    Params,
    _Runs,
    _Serial,
    blame,
    cache_of,
    check_entries,
    check_input_shape,
    check_layers,
    check_params,
    child_keys,
    decode_child,
    given_inputs,
    init_child,
    layer_name,
    layer_spec,
    run_child,
    spec_of,
    split_key,
)

__all__ = ["FanInConcat", "FanInSum", "FanOut", "parallel", "remat", "residual", "tied"]


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
    """``x + serial(*layers)(x)``: a residual (skip) connection around the layers.

    Args:
      *layers: layers that together keep the input's shape; ``apply``'s keyword inputs reach
        those that take them, as in ``serial``.

    Returns:
      A ``Layer`` with the input's shape; params a tuple, one entry per layer.
    """
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
    """One input to ``count`` copies, for ``parallel`` branches.

    Args:
      count: the number of copies, a positive int.

    Returns:
      A ``Layer`` without params whose output is a tuple of ``count`` inputs.
    """
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
    """Layer ``i`` applied to input ``i`` of a tuple of inputs; outputs a tuple.

    Args:
      *layers: one layer per input (per branch).

    Returns:
      A ``Layer`` from a tuple of inputs (shapes: a tuple of shapes) to a tuple of outputs;
      params a tuple, one entry per layer.
    """
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
    """The sum of several inputs of one shape.

    Returns:
      A ``Layer`` without params from a tuple of inputs to their sum.
    """
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
    """Several inputs concatenated along ``axis`` (the features, by default; never the batch).

    Args:
      axis: the axis of the concatenation, never the batch's (0); default ``-1``.

    Returns:
      A ``Layer`` without params from a tuple of inputs, equal in their other sizes, to one array.
    """
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"FanInConcat: axis must be an int, got {type(axis).__name__} {axis!r}.")
    return _FanInConcat(int(axis)).layer()


# --- remat: gradient checkpointing ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """A layer's computation as a hashable function of ``(params, x, key, row_mask, inputs)``:
    ``y`` in inference mode, ``(y, params)`` in training mode (the state updated)."""

    layer: Layer
    train: bool

    def __call__(self, params: Params, x: Any, key: Any, row_mask: Any, inputs: dict[str, Any]) -> Any:
        y, new = run_child(self.layer, params, x, key=key, row_mask=row_mask, train=self.train, inputs=inputs)
        return (y, new) if self.train else y


def _inexact(leaf: Any) -> bool:
    return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))


def _remat_fn(call: _Call, params: Params, x: Any, key: Any, row_mask: Any, inputs: dict[str, Any]) -> Any:
    return call(params, x, key, row_mask, inputs)


def _remat_fwd(
    call: _Call, params: Params, x: Any, key: Any, row_mask: Any, inputs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...]]:
    return call(params, x, key, row_mask, inputs), (params, x, key, row_mask, inputs)  # the inputs, no activation


def _remat_bwd(call: _Call, residuals: tuple[Any, ...], output_grad: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(residuals)
    where = [i for i, leaf in enumerate(leaves) if _inexact(leaf)]

    def recompute(operands: tuple[list[Any], Any]) -> list[Any]:
        differentiable, cotangent = operands

        def forward(*floats: Any) -> Any:
            full = list(leaves)
            for i, leaf in zip(where, floats, strict=True):
                full[i] = leaf
            return call(*jax.tree_util.tree_unflatten(treedef, full))

        _, vjp = jax.vjp(forward, *differentiable)
        return list(vjp(cotangent))

    def unreachable(operands: tuple[list[Any], Any]) -> list[Any]:
        return [jnp.full_like(leaf, jnp.nan) for leaf in operands[0]]

    differentiable = [leaves[i] for i in where]
    probe = next((g for g in jax.tree_util.tree_leaves(output_grad) if _inexact(g) and jnp.size(g)), None)
    if probe is None or not differentiable:  # nothing to differentiate, or nothing to hide behind
        grads = recompute((differentiable, output_grad))
    else:
        # Always true, for every float (finite, infinite or NaN), but XLA cannot know it: it reads
        # the cotangent, which exists only in the backward, so the recomputation inside the cond
        # can be neither merged into the forward nor hoisted into it (a plain jax.checkpoint was,
        # saving nothing on XLA's CPU backend: benchmarks/bench_remat.py).
        c = jnp.ravel(probe)[0]
        always = jnp.isfinite(c) | jnp.isnan(c) | jnp.isinf(c)
        grads = lax.cond(always, recompute, unreachable, (differentiable, output_grad))
    full = [np.zeros(np.shape(leaf), dtype=jax.dtypes.float0) for leaf in leaves]
    for i, grad in zip(where, grads, strict=True):
        full[i] = grad
    result: tuple[Any, ...] = jax.tree_util.tree_unflatten(treedef, full)
    return result


_remat_vjp = jax.custom_vjp(_remat_fn, nondiff_argnums=(0,))
_remat_vjp.defvjp(_remat_fwd, _remat_bwd)


@layer_spec
class _Remat(_Runs):
    inner: Layer

    @property
    def name(self) -> str:
        return f"remat({layer_name(self.inner)})"

    @property
    def children(self) -> tuple[Layer, ...]:
        return (self.inner,)

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        return init_child("remat", 0, self.inner, key, input_shape)

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
        with blame("remat", 0, self.inner):
            out = _remat_vjp(_Call(self.inner, train), params, x, key, row_mask, inputs)
        return out if train else (out, params)

    def init_cache(self, params: Params, batch: int, max_length: int) -> Any:
        return cache_of(self.inner, params, batch, max_length)

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        given = given_inputs(self.name, self.inputs, inputs)
        with blame("remat", 0, self.inner):
            return decode_child(self.inner, params, cache, x, offset=offset, inputs=given)


def remat(layer: Layer) -> Layer:
    """``layer`` whose backward recomputes its forward instead of keeping its activations
    (gradient checkpointing): the same outputs, params, state updates and gradients, for the
    memory of its inputs in place of everything computed inside it. Wrap each block of a deep
    network (``serial(*[remat(block) for block in blocks])``): a gradient then keeps one input
    per block, and recomputes one block's activations at a time, at the cost of about one more
    forward pass.

    The backward is a ``custom_vjp``: its forward saves the params, ``x``, the key, the row mask
    and the inputs beyond ``x``; its backward recomputes ``jax.vjp`` of ``layer`` from them (the
    same key, so the same dropout masks) behind a ``lax.cond`` on the incoming cotangent, which is
    always taken but which XLA cannot prove so, and so cannot merge back into the forward. A plain
    ``jax.checkpoint`` saved nothing on XLA's CPU backend (``benchmarks/bench_remat.py``: 1.00x of
    an 8-block GPT's gradient memory, with ``prevent_cse`` and with its policies; this: 0.15x).

    Training mode (``train_apply``) runs ``layer`` in training mode: its state (BatchNorm's running
    statistics) is updated by the forward, as without ``remat``. Decoding passes through.

    Args:
      layer: any ``Layer`` (a block).

    Returns:
      A ``Layer`` computing what ``layer`` computes, with its params.
    """
    (layer,) = check_layers("remat", (layer,))
    return _Remat(layer).layer()


# --- tied: an embedding that is also the output head -----------------------------------------


@layer_spec
class _Tied(_Serial):
    label: ClassVar[str] = "tied"

    @property
    def name(self) -> str:
        return f"tied({layer_name(self.layers[0])}, {len(self.layers) - 1} layers)"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        output_shape, params = super().init(key, input_shape)
        vocab, features = np.shape(params[0].W)  # the embedding's table (its spec may be summary's stand-in)
        if (
            not isinstance(output_shape, (tuple, list))
            or not output_shape
            or not isinstance(output_shape[-1], numbers.Integral)
            or output_shape[-1] != features
        ):
            raise ValueError(
                f"{self.name}: the layers' output must have {features} features, the features of "
                f"{layer_name(self.layers[0])} whose W.T is the output head, but {layer_name(self.layers[-1])} "
                f"gives shape {output_shape!r}."
            )
        return (*output_shape[:-1], vocab), params

    def _head(self, params: Any, h: Any) -> jax.Array:
        """The logits ``h @ W.T`` over ``h``'s last axis, by the hand-derived ``weight_multiply``."""
        check_params(self.name, params[0], EmbeddingParams, "EmbeddingParams(W) first")
        W = params[0].W
        _checks.array(self.name, "the layers' output", h)
        if jnp.ndim(h) < 2 or jnp.shape(h)[-1] != np.shape(W)[1]:
            raise ValueError(
                f"{self.name}: the layers' output must have {np.shape(W)[1]} features, the embedding's "
                f"(W.shape={np.shape(W)}), got shape {jnp.shape(h)}."
            )
        logits = ops.weight_multiply(h.reshape(-1, h.shape[-1]), W.T)
        return logits.reshape(*h.shape[:-1], logits.shape[-1])

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
        h, params = super().run(params, x, key=key, row_mask=row_mask, train=train, inputs=inputs)
        return self._head(params, h), params

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        h, cache = super().decode(params, cache, x, offset=offset, **inputs)
        return self._head(params, h), cache


def tied(embedding: Layer, *layers: Layer) -> Layer:
    """``serial(embedding, *layers)`` then the logits ``h @ W.T``, ``W: (vocab, features)`` being the
    embedding's table: weight tying (nanoGPT's ``lm_head.weight = wte.weight``, Press & Wolf 2017).

    ``embedding`` must be an ``Embedding(vocab, features)`` and ``layers`` must end with
    ``features`` features; the output is ``(batch, ..., vocab)``. Params are ``(EmbeddingParams(W),
    *layers' params)``: one ``W``, which ``summary`` counts once, whose gradient is the sum of the
    embedding's (a scatter-add) and the head's (``weight_multiply``'s, transposed). Inputs beyond
    ``x``, training mode and decoding reach ``layers`` as in ``serial``.

    Args:
      embedding: an ``Embedding(vocab, features)``, whose table is also the output head.
      *layers: the body, ending with ``features`` features.

    Returns:
      A ``Layer`` from ``(batch, ...)`` integer ids to ``(batch, ..., vocab)`` logits.
    """
    parts = check_layers("tied", (embedding, *layers))
    if not isinstance(spec_of(parts[0]), _Embedding):
        raise TypeError(
            f"tied: the first layer must be an Embedding(vocab, features), whose W is also the output "
            f"head, got {layer_name(parts[0])}."
        )
    return _Tied(parts).layer()
