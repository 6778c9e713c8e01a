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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from funcnet import _checks
from funcnet._values import number
from funcnet.layers import Layer, LayerSpec, check_input_shape, check_params, default_dtype, init_only, layer_spec

__all__ = ["LayerNorm", "LayerNormParams", "layer_norm"]


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
      eps: added to the variance, > 0.
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


@layer_spec
class _LayerNorm(LayerSpec):
    eps: float
    dtype: Any = init_only()

    @property
    def name(self) -> str:
        return f"LayerNorm(eps={self.eps})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = check_input_shape(self.name, input_shape, None, "(batch, ..., features)")
        if len(shape) < 2:
            raise ValueError(f"{self.name}: input_shape must be at least 2-D (batch, ..., features), got {shape}.")
        return shape, LayerNormParams(jnp.ones(shape[-1:], self.dtype), jnp.zeros(shape[-1:], self.dtype))

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        check_params(self.name, params, LayerNormParams, "LayerNormParams(gamma, beta)")
        return layer_norm(x, params.gamma, params.beta, eps=self.eps)


def LayerNorm(eps: float = 1e-5, *, dtype: Any = None) -> Layer:
    """``layer_norm`` over the last axis (features, or channels of NHWC images) with learned
    ``gamma`` (ones) and ``beta`` (zeros)."""
    _checks.real_number("LayerNorm", "eps", eps, low=0.0, low_open=True)
    return _LayerNorm(float(number(eps)), default_dtype(dtype)).layer()
