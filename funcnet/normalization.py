"""Layer normalisation: the ``layer_norm`` op with a hand-derived backward, and ``LayerNorm``.

Contract, stated once: ``layer_norm(x, gamma, beta, *, eps)`` normalises ``x`` over its last
axis, for any leading axes (rows, time steps, pixels), and scales and shifts it:
``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with ``mean`` and ``var`` (the biased,
population variance) over the last axis, and ``gamma``, ``beta`` of shape ``(features,)``.

Its backward is written out, not autodiff. With ``x̂ = (x - mean) / sqrt(var + eps)``, ``g``
the output gradient and ``N`` the features: ``dbeta = sum(g)`` and ``dgamma = sum(g * x̂)`` over
the leading axes; ``dx̂ = g * gamma``; and, through the mean and the variance,
``dx = (dx̂ - mean(dx̂) - x̂ * mean(dx̂ * x̂)) / sqrt(var + eps)`` with the means over the last
axis. The forward saves ``x̂``, ``1 / sqrt(var + eps)`` and ``gamma``.

Precision: the mean, the variance and the backward's means are computed in at least float32
(float16's ``300**2`` overflows) and the results cast back to ``x``'s dtype.

``LayerNorm(use_bias=False)`` (nanoGPT's ``bias=False``) has no ``beta``: its params are
``LayerNormScaleParams(gamma)`` and it calls the same op with ``beta`` a constant zero.

RMS normalisation, ``rms_norm(x, gamma, *, eps)``, scales ``x`` over its last axis by its root
mean square, without centring: with ``r = 1 / sqrt(mean(x**2) + eps)`` and ``x̂ = x r``,
``y = gamma * x̂`` (torch's ``nn.RMSNorm``, LLaMA's and T5's norm). Its backward, written out:
``dgamma = sum(g x̂)`` over the leading axes; ``dx̂ = g gamma``; and, through ``r`` (whose
derivative is ``dr/dx = -r**3 x / N = -r x̂ / N``),
``dx = r (dx̂ - x̂ mean(dx̂ x̂))``, the mean over the last axis: layer_norm's ``dx`` without the
mean's term. The forward saves ``x̂``, ``r`` and ``gamma``; ``mean(x**2)`` and the backward's
mean accumulate in at least float32.

Batch normalisation, ``batch_norm(x, gamma, beta, *, eps, mask)``, normalises over every axis
but the last (rows ``(N, C)``, NHWC images over N, H, W, sequences over batch and time) with the
batch's statistics, and returns them: ``(y, mean, var)``, ``var`` biased. ``mask: (batch,)``
bool keeps rows out of the statistics (fit's padded last batch); with ``w`` the mask and ``n``
the number of values per channel it counts, ``mean = sum(w x) / n``,
``var = sum(w (x - mean)**2) / n``. Masked rows are selected out (``jnp.where``), never multiplied
by 0, in the forward and the backward: a masked row holding NaN leaves the other rows' outputs,
the statistics and every gradient as they are without it (its own output is NaN, and with a
zero cotangent, as fit's loss gives it, it adds nothing to ``dgamma`` and gets ``dx = 0``).
Its backward, written out: with ``s = 1 / sqrt(var + eps)``,
``x̂ = (x - mean) s`` and ``g`` the output gradient, sums over all but the last axis,
``dbeta = sum(g)``, ``dgamma = sum(g x̂)`` and
``dx = gamma s (g - w (sum(g) + x̂ sum(g x̂)) / n)``, which without a mask is the textbook
``dx = gamma s / n (n g - sum(g) - x̂ sum(g x̂))``; cotangents ``dm``, ``dv`` of the returned
statistics add ``w (dm + 2 dv x̂ / s) / n``. Statistics accumulate in at least float32.
``BatchNorm`` keeps running statistics in ``BatchNormParams.stats`` (layer state,
``funcnet.state``): ``apply`` is inference with them, ``train_apply`` normalises with the
batch's and updates them as ``torch.nn.BatchNorm1d/2d(momentum=1 - ours)`` does.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks
from funcnet._values import number
from funcnet.layers import (
    Layer,
    LayerSpec,
    check_input_shape,
    check_params,
    default_dtype,
    given_inputs,
    init_only,
    layer_spec,
)
from funcnet.state import register_state

__all__ = [
    "BatchNorm",
    "BatchNormParams",
    "BatchNormStats",
    "LayerNorm",
    "LayerNormParams",
    "LayerNormScaleParams",
    "RMSNorm",
    "RMSNormParams",
    "batch_norm",
    "layer_norm",
    "rms_norm",
]


def _features(x: jax.Array, v: jax.Array) -> jax.Array:
    """``v: (features,)`` shaped to broadcast against ``x: (..., features)`` without rank promotion."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


def _leading(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``x̂`` and ``1 / sqrt(var + eps)``, both in at least float32 (``_checks.wide``)."""
    wide = x.astype(_checks.wide(x.dtype))
    mean = jnp.mean(wide, axis=-1, keepdims=True)
    centred = wide - mean
    inverse = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + jnp.asarray(eps, wide.dtype))
    return centred * inverse, inverse


def _scale_shift(x_hat: jax.Array, gamma: jax.Array, beta: jax.Array, dtype: Any) -> jax.Array:
    wide = x_hat.dtype
    return (x_hat * _features(x_hat, gamma.astype(wide)) + _features(x_hat, beta.astype(wide))).astype(dtype)


def _layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float) -> jax.Array:
    x_hat, _ = _normalise(x, eps)
    return _scale_shift(x_hat, gamma, beta, x.dtype)


def _layer_norm_fwd(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    x_hat, inverse = _normalise(x, eps)
    return _scale_shift(x_hat, gamma, beta, x.dtype), (x_hat.astype(x.dtype), inverse, gamma)


def _layer_norm_bwd(
    eps: float, residuals: tuple[jax.Array, jax.Array, jax.Array], output_grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    del eps
    x_hat, inverse, gamma = residuals
    dtype, wide = x_hat.dtype, inverse.dtype
    x_hat, g = x_hat.astype(wide), output_grad.astype(wide)
    d_hat = g * _features(x_hat, gamma.astype(wide))
    mean = lambda a: jnp.mean(a, axis=-1, keepdims=True)
    input_grad = (d_hat - mean(d_hat) - x_hat * mean(d_hat * x_hat)) * inverse
    leading = _leading(x_hat)
    gamma_grad, beta_grad = jnp.sum(g * x_hat, axis=leading), jnp.sum(g, axis=leading)
    return input_grad.astype(dtype), gamma_grad.astype(dtype), beta_grad.astype(dtype)


_layer_norm_vjp = jax.custom_vjp(_layer_norm, nondiff_argnums=(3,))
_layer_norm_vjp.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` over the last axis of ``x: (..., features)``.

    Args:
      x: at least 1-D, floating; normalised over its last axis.
      gamma, beta: ``(features,)``, the scale and shift, of x's dtype.
      eps: added to the variance, > 0; default ``1e-5``.

    Returns:
      x's shape and dtype.
    """
    fn = "layer_norm"
    for name, value in (("x", x), ("gamma", gamma), ("beta", beta)):
        _checks.floating(fn, name, value)
        _checks.same_dtype(fn, ("x", name), x, value)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last axis of features, got shape {tuple(x.shape)}.")
    for name, value in (("gamma", gamma), ("beta", beta)):
        if value.shape != (x.shape[-1],):
            raise ValueError(
                f"{fn}: {name} must have shape (features,) = ({x.shape[-1]},) for x.shape="
                f"{tuple(x.shape)}, got {tuple(value.shape)}."
            )
    _checks.real_number(fn, "eps", eps, low=0.0, low_open=True)
    if not _checks.is_concrete(eps):
        raise TypeError(f"{fn}: eps must be a concrete number (it is static), got a traced value.")
    return _layer_norm_vjp(x, gamma, beta, float(eps))


class LayerNormParams(NamedTuple):
    """``gamma, beta: (features,)``, initialised to ones and zeros."""

    gamma: jax.Array
    beta: jax.Array


class LayerNormScaleParams(NamedTuple):
    """``LayerNorm(use_bias=False)``'s params: ``gamma: (features,)``, initialised to ones."""

    gamma: jax.Array


def _feature_shape(name: str, input_shape: Any) -> tuple[int, ...]:
    """A normalisation layer's input shape, at least 2-D ``(batch, ..., features)``."""
    shape = check_input_shape(name, input_shape, None, "(batch, ..., features)")
    if len(shape) < 2:
        raise ValueError(f"{name}: input_shape must be at least 2-D (batch, ..., features), got {shape}.")
    return shape


@layer_spec
class _LayerNorm(LayerSpec):
    eps: float
    dtype: Any = init_only()
    use_bias: bool = True

    @property
    def name(self) -> str:
        return f"LayerNorm(eps={self.eps})" if self.use_bias else f"LayerNorm(eps={self.eps}, use_bias=False)"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = _feature_shape(self.name, input_shape)
        gamma = jnp.ones(shape[-1:], self.dtype)
        if not self.use_bias:
            return shape, LayerNormScaleParams(gamma)
        return shape, LayerNormParams(gamma, jnp.zeros(shape[-1:], self.dtype))

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        if not self.use_bias:
            check_params(self.name, params, LayerNormScaleParams, "LayerNormScaleParams(gamma)")
            gamma = params.gamma
            _checks.array(self.name, "params.gamma", gamma)
            return layer_norm(x, gamma, jnp.zeros(np.shape(gamma), gamma.dtype), eps=self.eps)
        check_params(self.name, params, LayerNormParams, "LayerNormParams(gamma, beta)")
        return layer_norm(x, params.gamma, params.beta, eps=self.eps)


def LayerNorm(eps: float = 1e-5, *, use_bias: bool = True, dtype: Any = None) -> Layer:
    """``layer_norm`` over the last axis (features, or channels of NHWC images) with learned
    ``gamma`` (ones) and ``beta`` (zeros): ``LayerNormParams(gamma, beta)``. With
    ``use_bias=False`` (nanoGPT's ``bias=False``) there is no ``beta``:
    ``LayerNormScaleParams(gamma)``, and the shift is a constant zero.

    Args:
      eps: added to the variance, > 0; default ``1e-5`` (torch's).
      use_bias: learn a shift ``beta``; default ``True``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` keeping the input's shape.
    """
    _checks.real_number("LayerNorm", "eps", eps, low=0.0, low_open=True)
    if not isinstance(use_bias, bool):
        raise TypeError(f"LayerNorm: use_bias must be a bool, got {type(use_bias).__name__} {use_bias!r}.")
    return _LayerNorm(float(number(eps)), default_dtype(dtype), use_bias).layer()


# --- RMS normalisation --------------------------------------------------------------------------


def _rms_normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``x̂ = x r`` and ``r = 1 / sqrt(mean(x**2) + eps)``, both in at least float32."""
    wide = x.astype(_checks.wide(x.dtype))
    inverse = lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + jnp.asarray(eps, wide.dtype))
    return wide * inverse, inverse


def _rms_norm(x: jax.Array, gamma: jax.Array, eps: float) -> jax.Array:
    x_hat, _ = _rms_normalise(x, eps)
    return (x_hat * _features(x_hat, gamma.astype(x_hat.dtype))).astype(x.dtype)


def _rms_norm_fwd(
    x: jax.Array, gamma: jax.Array, eps: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    x_hat, inverse = _rms_normalise(x, eps)
    y = (x_hat * _features(x_hat, gamma.astype(x_hat.dtype))).astype(x.dtype)
    return y, (x_hat.astype(x.dtype), inverse, gamma)


def _rms_norm_bwd(
    eps: float, residuals: tuple[jax.Array, jax.Array, jax.Array], output_grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    del eps
    x_hat, inverse, gamma = residuals
    dtype, wide = x_hat.dtype, inverse.dtype
    x_hat, g = x_hat.astype(wide), output_grad.astype(wide)
    d_hat = g * _features(x_hat, gamma.astype(wide))
    input_grad = inverse * (d_hat - x_hat * jnp.mean(d_hat * x_hat, axis=-1, keepdims=True))
    gamma_grad = jnp.sum(g * x_hat, axis=_leading(x_hat))
    return input_grad.astype(dtype), gamma_grad.astype(dtype)


_rms_norm_vjp = jax.custom_vjp(_rms_norm, nondiff_argnums=(2,))
_rms_norm_vjp.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, gamma: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """``gamma * x / sqrt(mean(x**2) + eps)`` over the last axis of ``x: (..., features)``:
    torch's ``nn.RMSNorm(features, eps=eps)``. The backward is the module docstring's.

    Args:
      x: at least 1-D, floating; normalised over its last axis.
      gamma: ``(features,)``, the scale, of x's dtype.
      eps: added to the mean square, > 0 (static); default ``1e-6``.

    Returns:
      x's shape and dtype.
    """
    fn = "rms_norm"
    for name, value in (("x", x), ("gamma", gamma)):
        _checks.floating(fn, name, value)
        _checks.same_dtype(fn, ("x", name), x, value)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last axis of features, got shape {tuple(x.shape)}.")
    if gamma.shape != (x.shape[-1],):
        raise ValueError(
            f"{fn}: gamma must have shape (features,) = ({x.shape[-1]},) for x.shape={tuple(x.shape)}, "
            f"got {tuple(gamma.shape)}."
        )
    _checks.real_number(fn, "eps", eps, low=0.0, low_open=True)
    if not _checks.is_concrete(eps):
        raise TypeError(f"{fn}: eps must be a concrete number (it is static), got a traced value.")
    return _rms_norm_vjp(x, gamma, float(eps))


class RMSNormParams(NamedTuple):
    """``gamma: (features,)``, initialised to ones (torch's ``RMSNorm.weight``)."""

    gamma: jax.Array


@layer_spec
class _RMSNorm(LayerSpec):
    eps: float
    dtype: Any = init_only()

    @property
    def name(self) -> str:
        return f"RMSNorm(eps={self.eps})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = _feature_shape(self.name, input_shape)
        return shape, RMSNormParams(jnp.ones(shape[-1:], self.dtype))

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        check_params(self.name, params, RMSNormParams, "RMSNormParams(gamma)")
        return rms_norm(x, params.gamma, eps=self.eps)


def RMSNorm(eps: float = 1e-6, *, dtype: Any = None) -> Layer:
    """``rms_norm`` over the last axis with a learned ``gamma`` (ones): ``RMSNormParams(gamma)``,
    torch's ``nn.RMSNorm(features, eps=eps)``.

    Args:
      eps: added to the mean square, > 0; default ``1e-6``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` keeping the input's shape.
    """
    _checks.real_number("RMSNorm", "eps", eps, low=0.0, low_open=True)
    return _RMSNorm(float(number(eps)), default_dtype(dtype)).layer()


# --- Batch normalisation (with layer state) -----------------------------------------------------


def _counted(x: jax.Array, mask: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The mask as weights ``(batch, 1, ..., 1)`` and ``n``, the values per channel it counts."""
    weights = mask.astype(dtype).reshape(mask.shape + (1,) * (x.ndim - 1))
    return weights, jnp.sum(mask).astype(dtype) * math.prod(x.shape[1:-1])


def _rows(mask: jax.Array, a: jax.Array) -> jax.Array:
    """``mask: (batch,)`` shaped to select rows of ``a: (batch, ...)`` in ``jnp.where``."""
    return mask.reshape(mask.shape + (1,) * (a.ndim - 1))


def _counted_only(mask: jax.Array, a: jax.Array) -> jax.Array:
    """``a`` in the rows ``mask`` counts and exactly 0 elsewhere: a masked row holding NaN or inf
    stays out (``w * a`` would be ``0 * NaN = NaN``)."""
    return jnp.where(_rows(mask, a), a, jnp.zeros((), a.dtype))


def _batch_statistics(
    x: jax.Array, mask: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """``x̂``, the batch mean and biased variance, ``1 / sqrt(var + eps)``, the weights and ``n``."""
    dtype = _checks.wide(x.dtype)
    wide = x.astype(dtype)
    weights, n = _counted(x, mask, dtype)
    leading = _leading(x)
    mean = jnp.sum(_counted_only(mask, wide), axis=leading) / n
    centred = wide - _features(wide, mean)
    var = jnp.sum(_counted_only(mask, centred * centred), axis=leading) / n
    inverse = lax.rsqrt(var + jnp.asarray(eps, dtype))
    return centred * _features(wide, inverse), mean, var, inverse, weights, n


def _batch_norm(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, mask: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x_hat, mean, var, _, _, _ = _batch_statistics(x, mask, eps)
    dtype = x_hat.dtype
    y = x_hat * _features(x_hat, gamma.astype(dtype)) + _features(x_hat, beta.astype(dtype))
    return y.astype(x.dtype), mean, var


def _batch_norm_fwd(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, mask: jax.Array, eps: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    x_hat, mean, var, inverse, weights, n = _batch_statistics(x, mask, eps)
    dtype = x_hat.dtype
    y = x_hat * _features(x_hat, gamma.astype(dtype)) + _features(x_hat, beta.astype(dtype))
    return (y.astype(x.dtype), mean, var), (x_hat, inverse, gamma, weights, n, mask)


def _batch_norm_bwd(
    eps: float, residuals: tuple[jax.Array, ...], cotangents: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    del eps
    x_hat, inverse, gamma, weights, n, mask = residuals
    del weights  # the mask selects (jnp.where): a masked row's NaN must not reach a counted one
    output_grad, mean_grad, var_grad = cotangents
    dtype = x_hat.dtype
    g = output_grad.astype(dtype)
    f = lambda v: _features(x_hat, v)
    leading = _leading(x_hat)
    sum_g = jnp.sum(g, axis=leading)  # dbeta
    # dgamma: a row's g x̂, where a masked row with a zero cotangent adds exactly 0 (its x̂ may be NaN)
    counted_or_used = _rows(mask, g) | (g != 0)
    sum_g_hat = jnp.sum(jnp.where(counted_or_used, g * x_hat, jnp.zeros((), dtype)), axis=leading)
    # dx = gamma s (g - w (sum(g) + x̂ sum(g x̂)) / n), plus the returned statistics' share.
    through_statistics = (f(sum_g) + x_hat * f(sum_g_hat)) / n
    input_grad = f(gamma.astype(dtype) * inverse) * (g - _counted_only(mask, through_statistics))
    statistics_share = (f(mean_grad.astype(dtype)) + 2 * f(var_grad.astype(dtype) / inverse) * x_hat) / n
    input_grad = input_grad + _counted_only(mask, statistics_share)
    return (
        input_grad.astype(gamma.dtype),
        sum_g_hat.astype(gamma.dtype),
        sum_g.astype(gamma.dtype),
        np.zeros(mask.shape, dtype=jax.dtypes.float0),
    )


_batch_norm_vjp = jax.custom_vjp(_batch_norm, nondiff_argnums=(4,))
_batch_norm_vjp.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation with the batch's statistics: ``(y, mean, var)``, ``var`` biased.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with ``mean``, ``var`` over every axis
    but the last of ``x: (batch, ..., channels)``. The backward is the module docstring's.

    Args:
      x: at least 2-D, floating.
      gamma, beta: ``(channels,)``, the scale and shift, of x's dtype.
      eps: added to the variance, > 0.
      mask: ``(batch,)`` bool, the rows the statistics count (all, if None). Every row is
        normalised. A concrete mask is checked to count at least 2 values per channel; a traced
        one cannot be, and one counting fewer gives NaN statistics.

    Returns:
      ``y`` (x's shape and dtype), and the batch ``mean`` and biased ``var``, ``(channels,)``,
      in at least float32.
    """
    fn = "batch_norm"
    for name, value in (("x", x), ("gamma", gamma), ("beta", beta)):
        _checks.floating(fn, name, value)
        _checks.same_dtype(fn, ("x", name), x, value)
    if x.ndim < 2 or x.shape[-1] == 0:
        raise ValueError(
            f"{fn}: x must be at least 2-D (batch, ..., channels) with channels, got shape {tuple(x.shape)}."
        )
    for name, value in (("gamma", gamma), ("beta", beta)):
        if value.shape != (x.shape[-1],):
            raise ValueError(
                f"{fn}: {name} must have shape (channels,) = ({x.shape[-1]},) for x.shape="
                f"{tuple(x.shape)}, got {tuple(value.shape)}."
            )
    _checks.real_number(fn, "eps", eps, low=0.0, low_open=True)
    if not _checks.is_concrete(eps):
        raise TypeError(f"{fn}: eps must be a concrete number (it is static), got a traced value.")
    per_row = math.prod(x.shape[1:-1])
    if mask is None:
        mask = jnp.ones(x.shape[:1], bool)
        counted = x.shape[0] * per_row
    else:
        _checks.array(fn, "mask", mask)
        if mask.dtype != bool or mask.shape != x.shape[:1]:
            raise TypeError(
                f"{fn}: mask must be a bool array of shape (batch,) = ({x.shape[0]},), got "
                f"{mask.dtype} {tuple(mask.shape)}."
            )
        counted = int(np.sum(np.asarray(mask))) * per_row if _checks.is_concrete(mask) else 2
    if counted < 2:
        raise ValueError(
            f"{fn}: batch statistics need at least 2 values per channel, got {counted} (x.shape="
            f"{tuple(x.shape)}); a batch of one row has no variance (torch refuses it too). "
            f"Normalise a single row with the running statistics (the layer's apply)."
        )
    return _batch_norm_vjp(x, gamma, beta, mask, float(eps))


@register_state
class BatchNormStats(NamedTuple):
    """BatchNorm's running statistics, ``(channels,)`` each: layer state, never trained.

    ``var`` averages the *unbiased* batch variances, as torch's ``running_var`` does. They are
    kept in at least float32 (``BatchNorm(dtype=bfloat16)`` inits them in float32, as flax does):
    in bfloat16 the update ``(1 - momentum) * (batch - running)`` rounds away near the target and
    the running mean stalls short of it. Statistics passed in another dtype keep it.
    """

    mean: jax.Array
    var: jax.Array


class BatchNormParams(NamedTuple):
    """``gamma``, ``beta``: ``(channels,)``, ones and zeros; ``stats``: zeros and ones."""

    gamma: jax.Array
    beta: jax.Array
    stats: BatchNormStats


@layer_spec
class _BatchNorm(LayerSpec):
    momentum: float
    eps: float
    dtype: Any = init_only()

    @property
    def name(self) -> str:
        return f"BatchNorm(momentum={self.momentum}, eps={self.eps})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = check_input_shape(self.name, input_shape, None, "(batch, ..., channels)")
        if len(shape) < 2:
            raise ValueError(f"{self.name}: input_shape must be at least 2-D (batch, ..., channels), got {shape}.")
        ones, zeros = jnp.ones(shape[-1:], self.dtype), jnp.zeros(shape[-1:], self.dtype)
        wide = _checks.wide(self.dtype)  # a bfloat16 running mean stalls: 0.1 (batch - running) rounds away
        return shape, BatchNormParams(
            ones, zeros, BatchNormStats(jnp.zeros(shape[-1:], wide), jnp.ones(shape[-1:], wide))
        )

    def _check(self, params: Any, x: Any) -> None:
        check_params(self.name, params, BatchNormParams, "BatchNormParams(gamma, beta, stats)")
        check_params(self.name, params.stats, BatchNormStats, "BatchNormStats(mean, var) in params.stats")
        _checks.floating(self.name, "x", x)
        if x.ndim < 2 or np.shape(params.gamma) != x.shape[-1:]:
            raise ValueError(
                f"{self.name}: x must be (batch, ..., channels) with the {np.shape(params.gamma)[0]} "
                f"channels of params.gamma, got shape {tuple(x.shape)}."
            )

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        """Inference: normalise with the running statistics (an affine map; autodiff's gradient)."""
        del key
        self._check(params, x)
        _checks.same_dtype(self.name, ("x", "params.gamma"), x, params.gamma)
        dtype = _checks.wide(x.dtype)
        # The running statistics pass no gradient: they are not trained (an optimizer refuses them too).
        stats = lax.stop_gradient(params.stats)
        scale = params.gamma.astype(dtype) * lax.rsqrt(stats.var.astype(dtype) + jnp.asarray(self.eps, dtype))
        shift = params.beta.astype(dtype) - stats.mean.astype(dtype) * scale
        return (x.astype(dtype) * _features(x, scale) + _features(x, shift)).astype(x.dtype)

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """Training: normalise with the batch's statistics and update the running ones:
        ``running = momentum * running + (1 - momentum) * batch``, the unbiased variance for ``var``."""
        del key
        given_inputs(self.name, self.inputs, inputs)  # none: a misspelled keyword is an error
        self._check(params, x)
        y, mean, var = batch_norm(x, params.gamma, params.beta, eps=self.eps, mask=row_mask)
        n = jnp.asarray(x.shape[0] if row_mask is None else jnp.sum(row_mask), var.dtype) * math.prod(x.shape[1:-1])
        unbiased = var * n / (n - 1)
        old = params.stats

        def average(running: jax.Array, batch: jax.Array) -> jax.Array:
            new = self.momentum * running.astype(batch.dtype) + (1 - self.momentum) * batch
            return lax.stop_gradient(new).astype(running.dtype)

        return y, params._replace(stats=BatchNormStats(average(old.mean, mean), average(old.var, unbiased)))


def BatchNorm(momentum: float = 0.9, eps: float = 1e-5, *, dtype: Any = None) -> Layer:
    """Batch normalisation over every axis but the last, with running statistics (layer state).

    ``apply(params, x)`` is inference, with the running statistics; ``funcnet.train_apply``
    normalises with the batch's (``batch_norm``) and updates them,
    ``running = momentum * running + (1 - momentum) * batch``: torch's
    ``BatchNorm1d/2d(momentum=1 - momentum)``, so statistics port both ways. Params:
    ``BatchNormParams(gamma, beta, stats=BatchNormStats(mean, var))``.

    Args:
      momentum: the running statistics' decay, in ``[0, 1)``; default ``0.9`` (torch's 0.1).
      eps: added to the variance, > 0; default ``1e-5``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` keeping the input's shape, ``(batch, ..., channels)``.
    """
    _checks.real_number("BatchNorm", "momentum", momentum, low=0.0, high=1.0, high_open=True)
    _checks.real_number("BatchNorm", "eps", eps, low=0.0, low_open=True)
    return _BatchNorm(float(number(momentum)), float(number(eps)), default_dtype(dtype)).layer()
