"""Mixed precision: float32 master params, computation in bfloat16 or float16, and loss scaling.

Contract, stated once:

* ``mixed_precision(layer, compute_dtype)`` is a layer (a value, like every other): its ``init``
  gives ``layer``'s params in float32, the optimizer's master copy; its ``apply`` casts the
  params and the floating inputs to ``compute_dtype``, runs ``layer`` there, and returns its
  floating outputs in float32. Gradients flow back through the casts, so they reach the
  optimizer in float32; the loss is computed in float32 from float32 predictions.
* float16's range (6e-8 to 65,504) loses small gradients to underflow. ``DynamicLossScale``
  (``fit(..., loss_scale=DynamicLossScale())``) multiplies the loss by a scale before the
  backward and divides the gradients by it after, as jmp's ``DynamicLossScale`` does: a step
  whose gradients are not all finite is skipped (params, optimizer state and layer state stay as
  they were) and the scale halved, never below ``min_scale``; after ``period`` finite steps in a
  row it is doubled, never above ``max_scale`` (uncapped, it reached ``inf`` after a run of zero
  gradients and every later step was skipped). The gradients are unscaled in float32 and reach
  the optimizer in float32, so float16 params do not lose those below float16's smallest number
  (6e-8); the optimizer updates in float32 and rounds the params back. A step skipped at
  ``min_scale`` has gradients no scale can make finite: ``fit`` reports it as divergence
  (``diverged=True``, that epoch's loss NaN), so a run whose steps are all skipped never ends as
  a silently frozen one. Its state (``LossScaleState``) is part of fit's training state, so
  checkpoints and resume carry it.
* bfloat16 has float32's range: it needs no loss scaling.
* Layer state (BatchNorm's running statistics) is not cast: it stays float32, and training mode
  (``funcnet.train_apply``) passes through to the inner layer and returns its updated state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks
from funcnet.layers import (
    Layer,
    LayerSpec,
    cache_of,
    decode_child,
    layer_inputs,
    layer_name,
    layer_spec,
    spec_of,
    train_mode,
)
from funcnet.state import merge_state, split_state

__all__ = ["DynamicLossScale", "LossScaleState", "mixed_precision"]

_LOW = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _cast(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of ``tree`` in ``dtype``; other leaves (integer ids, keys) as they are."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if _checks.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


@layer_spec
class _MixedPrecision(LayerSpec):
    inner: Layer
    compute_dtype: np.dtype

    @property
    def name(self) -> str:
        return f"mixed_precision({layer_name(self.inner)}, {self.compute_dtype.name})"

    @property
    def children(self) -> tuple[Layer, ...]:
        """The inner layer when it is a combinator (``summary`` lists its layers), else none."""
        spec = spec_of(self.inner)
        return (self.inner,) if spec is not None and spec.children else ()

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        output_shape, params = self.inner.init(key, input_shape)
        return output_shape, _cast(params, jnp.float32)

    def _low(self, params: Any) -> Any:
        """The params in ``compute_dtype``; layer state (running statistics) stays float32."""
        trainable, state = split_state(params)
        return merge_state(_cast(trainable, self.compute_dtype), state)

    @property
    def inputs(self) -> frozenset[str] | None:
        return layer_inputs(self.inner)

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None, **inputs: Any) -> Any:
        y = self.inner.apply(self._low(params), _cast(x, self.compute_dtype), key=key, **inputs)
        return _cast(y, jnp.float32)

    def init_cache(self, params: Any, batch: int, max_length: int) -> Any:
        return cache_of(self.inner, self._low(params), batch, max_length)

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        low_x = _cast(x, self.compute_dtype)
        y, cache = decode_child(self.inner, self._low(params), cache, low_x, offset=offset, inputs=inputs)
        return _cast(y, jnp.float32), cache

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """Training mode of the inner layer; its updated state comes back, the master params stay."""
        low_x = _cast(x, self.compute_dtype)
        y, new = train_mode(self.inner.apply)(self._low(params), low_x, key=key, row_mask=row_mask, **inputs)
        return _cast(y, jnp.float32), merge_state(split_state(params)[0], split_state(new)[1])


def mixed_precision(layer: Layer, compute_dtype: Any) -> Layer:
    """``layer`` computing in ``compute_dtype`` (bfloat16 or float16) on float32 master params.

    Build ``layer`` as usual (float32 params); wrap the whole network (or any part of it). The
    output is float32, so the loss and its targets are float32. See the module docstring.

    Args:
      layer: any ``Layer`` with float32 params.
      compute_dtype: ``jnp.bfloat16`` or ``jnp.float16``.

    Returns:
      A ``Layer`` with ``layer``'s (float32) params that casts them and its input to
      ``compute_dtype``, runs ``layer``, and returns float32.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"mixed_precision: layer must be a Layer(init, apply), got {type(layer).__name__}.")
    try:
        dtype = np.dtype(compute_dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype not in _LOW:
        raise ValueError(f"mixed_precision: compute_dtype must be bfloat16 or float16, got {compute_dtype!r}.")
    return _MixedPrecision(layer, dtype).layer()


class LossScaleState(NamedTuple):
    """The current ``scale`` (float32) and the finite steps in a row since it last changed."""

    scale: jax.Array
    counter: jax.Array


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling for ``fit`` (jmp's ``DynamicLossScale``; the defaults are jmp's).

    Args:
      initial: the first scale (2**15), between ``min_scale`` and ``max_scale``.
      period: finite steps in a row after which the scale is multiplied by ``factor``.
      factor: the growth and shrink factor (2).
      min_scale: the scale never drops below this (1). A step whose gradients are not finite
        even at ``min_scale`` makes ``fit`` report divergence (see the module docstring).
      max_scale: the scale never grows above this (2**24; at it, scaled float16 gradients up to
        65,504 / 2**24 = 4e-3 stay finite). Finite in float32: uncapped, the scale reached ``inf``.
    """

    initial: float = 2.0**15
    period: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0
    max_scale: float = 2.0**24

    def __post_init__(self) -> None:
        fn = "DynamicLossScale"
        _checks.real_number(fn, "initial", self.initial, low=0.0, low_open=True)
        _checks.positive_int(fn, "period", self.period)
        _checks.real_number(fn, "factor", self.factor, low=1.0, low_open=True)
        _checks.real_number(fn, "min_scale", self.min_scale, low=0.0, low_open=True)
        largest = float(np.finfo(np.float32).max)
        _checks.real_number(fn, "max_scale", self.max_scale, low=0.0, low_open=True, high=largest)
        if not float(self.min_scale) <= float(self.initial) <= float(self.max_scale):
            raise ValueError(
                f"{fn}: initial must be between min_scale and max_scale, got initial={self.initial}, "
                f"min_scale={self.min_scale}, max_scale={self.max_scale}; raise max_scale to start higher."
            )

    def init(self) -> LossScaleState:
        return LossScaleState(jnp.asarray(self.initial, jnp.float32), jnp.asarray(0, jnp.int32))

    def unscale(self, state: LossScaleState, grads: Any) -> tuple[Any, jax.Array]:
        """The gradients divided by the scale, in at least float32 (a float16 gradient below 6e-8
        would round to 0), and whether all of them are finite."""
        grads = jax.tree_util.tree_map(
            lambda g: g.astype(_checks.wide(g.dtype)) / state.scale.astype(_checks.wide(g.dtype)), grads
        )
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        return grads, finite

    def adjust(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        """After a step: grow the scale after ``period`` finite steps (to at most ``max_scale``),
        halve it on a non-finite one (to at least ``min_scale``)."""
        grow = finite & (state.counter + 1 >= self.period)
        scale = jnp.where(
            finite,
            jnp.where(grow, jnp.minimum(state.scale * self.factor, self.max_scale), state.scale),
            jnp.maximum(state.scale / self.factor, self.min_scale),
        ).astype(jnp.float32)
        counter = jnp.where(finite & ~grow, state.counter + 1, 0).astype(jnp.int32)
        return LossScaleState(scale, counter)

    def exhausted(self, state: LossScaleState, finite: jax.Array) -> jax.Array:
        """Whether a step with gradients ``finite`` is skipped at ``min_scale``: no smaller scale
        is left to try, so the gradients themselves are not finite (``fit`` reports divergence)."""
        return ~finite & (state.scale <= jnp.asarray(self.min_scale, jnp.float32))
