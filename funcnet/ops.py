"""The book's operations as ``jax.custom_vjp`` primitives (book: ``Operation`` subclasses).

Contract, stated once for every op here:

* The forward is the book's ``_output``; ``_<op>_fwd`` saves the residuals the backward
  needs and no more; ``_<op>_bwd(residuals, output_grad)`` is the book's hand-derived
  ``_input_grad`` (and ``_param_grad`` for ``ParamOperation``s) and returns one cotangent
  per primal argument.
* One idiom for every op (as in ``conv.py``, ``recurrent.py``, ``normalization.py``): a plain
  forward ``_<op>``, a private ``_<op>_vjp = jax.custom_vjp(_<op>)`` with ``_<op>_fwd`` and
  ``_<op>_bwd``, and the public ``<op>`` that checks its arguments and calls ``_<op>_vjp``. The
  checks run once, in Python, and the forward never calls the public op again.
* Inputs are arrays of a floating dtype; two arrays meeting in one op share a dtype (no
  silent promotion). Shapes are checked in Python when the op is traced, so a mistake is a
  ``ValueError``/``TypeError`` before anything compiles, under ``jit`` and ``vmap`` too.
* ``custom_vjp`` rules out forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``): use
  reverse mode, including for second order (``jax.jacrev(jax.grad(f))``), since each
  backward is itself written in differentiable ``jax.numpy``.
* Every backward is verified against ``jax.vjp`` of a plain ``jax.numpy`` reference and
  against finite differences (``funcnet.check_vjp``, ``tests/test_ops.py``).

GELU. ``gelu(x)`` is the exact ``x Phi(x)``, computed as ``x * erfc(-x / sqrt 2) / 2``, and
``gelu(x, approximate=True)`` (also the value ``gelu_tanh``) the tanh form ``0.5 x (1 + tanh(u))``,
``u = sqrt(2/pi) (x + 0.044715 x^3)``, computed as ``x * sigmoid(2u)``; each has its own hand
backward. The textbook forms ``1 + erf(...)`` and ``1 + tanh(...)`` cancel to nothing for x below
about -3 (bfloat16 lost every digit there); these forms do not. float16 and bfloat16 inputs are
computed in float32 and cast back: on every float16 and bfloat16 value in [-8, 8] the result is
within 1 ulp of the float64 value (measured: 0.5 ulp, correctly rounded), except that results
below the dtype's smallest normal number may be flushed to zero (XLA's CPU flushes float32
subnormals). ``approximate`` is a Python bool fixed at trace time. Activations are values compared
by equality (a rebuilt ``Dense`` finds its compiled program, a checkpoint names them), so pass
``gelu_tanh`` rather than ``functools.partial(gelu, approximate=True)``: the partial works, but, as
any partial, compiles once per object and is never matched to a checkpoint by name.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks

Array = jax.Array

__all__ = ["bias_add", "dropout", "gelu", "gelu_tanh", "linear", "relu", "sigmoid", "tanh", "weight_multiply"]


def _check_pair(fn: str, x: Any, other: Any, other_name: str) -> None:
    _checks.floating(fn, "x", x)
    _checks.floating(fn, other_name, other)
    _checks.rank(fn, "x", x, 2, "(batch, features)")
    _checks.same_dtype(fn, ("x", other_name), x, other)


# --- ParamOperations ---------------------------------------------------------------------


def _weight_multiply(x: Array, W: Array) -> Array:
    return x @ W


def _weight_multiply_fwd(x: Array, W: Array) -> tuple[Array, tuple[Array, Array]]:
    return _weight_multiply(x, W), (x, W)


def _weight_multiply_bwd(residuals: tuple[Array, Array], output_grad: Array) -> tuple[Array, Array]:
    x, W = residuals
    return output_grad @ W.T, x.T @ output_grad  # input_grad, param_grad


_weight_multiply_vjp = jax.custom_vjp(_weight_multiply)
_weight_multiply_vjp.defvjp(_weight_multiply_fwd, _weight_multiply_bwd)


def weight_multiply(x: jax.Array, W: jax.Array) -> jax.Array:
    """``x @ W`` for x: (batch, num_in), W: (num_in, num_out). Book: WeightMultiply.

    Args:
      x: ``(batch, num_in)`` floating inputs.
      W: ``(num_in, num_out)`` weights, of x's dtype.

    Returns:
      ``(batch, num_out)``; the backward gives ``output_grad @ W.T`` and ``x.T @ output_grad``.
    """
    _check_pair("weight_multiply", x, W, "W")
    _checks.rank("weight_multiply", "W", W, 2, "(num_in, num_out)")
    if x.shape[1] != W.shape[0]:
        raise ValueError(
            f"weight_multiply: x has {x.shape[1]} features but W expects {W.shape[0]} "
            f"(x.shape={tuple(x.shape)}, W.shape={tuple(W.shape)})."
        )
    return _weight_multiply_vjp(x, W)


def _bias_add(x: Array, B: Array) -> Array:
    return x + B


def _bias_add_fwd(x: Array, B: Array) -> tuple[Array, None]:
    return _bias_add(x, B), None


def _bias_add_bwd(_: None, output_grad: Array) -> tuple[Array, Array]:
    return output_grad, jnp.sum(output_grad, axis=0, keepdims=True)  # input_grad, param_grad


_bias_add_vjp = jax.custom_vjp(_bias_add)
_bias_add_vjp.defvjp(_bias_add_fwd, _bias_add_bwd)


def bias_add(x: jax.Array, B: jax.Array) -> jax.Array:
    """``x + B`` for x: (batch, n), B: (1, n), as in the book. Book: BiasAdd.

    Args:
      x: ``(batch, n)`` floating inputs.
      B: ``(1, n)`` bias, of x's dtype.

    Returns:
      ``(batch, n)``; B's gradient is ``output_grad`` summed over the batch.
    """
    _check_pair("bias_add", x, B, "B")
    if B.shape != (1, x.shape[1]):
        raise ValueError(
            f"bias_add: B must have shape (1, {x.shape[1]}) to match x.shape={tuple(x.shape)}, got {tuple(B.shape)}."
        )
    return _bias_add_vjp(x, B)


# --- Activations (any shape) ---------------------------------------------------------------


def _sigmoid(x: Array) -> Array:
    return lax.logistic(x)


def _sigmoid_fwd(x: Array) -> tuple[Array, Array]:
    y = _sigmoid(x)
    return y, y  # the book's backward needs only the output


def _sigmoid_bwd(y: Array, output_grad: Array) -> tuple[Array]:
    return (output_grad * y * (1 - y),)


_sigmoid_vjp = jax.custom_vjp(_sigmoid)
_sigmoid_vjp.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(x: jax.Array) -> jax.Array:
    """``1 / (1 + exp(-x))``, overflow-free for any |x| (``lax.logistic``). Book: Sigmoid.

    Args:
      x: floating array of any shape.

    Returns:
      ``sigmoid(x)``, x's shape and dtype; the backward is ``output_grad * y * (1 - y)``.
    """
    _checks.floating("sigmoid", "x", x)
    return _sigmoid_vjp(x)


def _tanh(x: Array) -> Array:
    return jnp.tanh(x)


def _tanh_fwd(x: Array) -> tuple[Array, Array]:
    y = _tanh(x)
    return y, y


def _tanh_bwd(y: Array, output_grad: Array) -> tuple[Array]:
    return (output_grad * (1 - y * y),)


_tanh_vjp = jax.custom_vjp(_tanh)
_tanh_vjp.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent. Book: Tanh.

    Args:
      x: floating array of any shape.

    Returns:
      ``tanh(x)``, x's shape and dtype; the backward is ``output_grad * (1 - y**2)``.
    """
    _checks.floating("tanh", "x", x)
    return _tanh_vjp(x)


def _relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def _relu_fwd(x: Array) -> tuple[Array, Array]:
    # The mask is taken on the *input*. The book takes it on the clipped output
    # (output >= 0), which is always true: that backward passes every gradient through.
    return _relu(x), x > 0


def _relu_bwd(positive: Array, output_grad: Array) -> tuple[Array]:
    return (jnp.where(positive, output_grad, 0),)


_relu_vjp = jax.custom_vjp(_relu)
_relu_vjp.defvjp(_relu_fwd, _relu_bwd)


def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``; its gradient at exactly 0 is 0 (as ``jax.nn.relu``'s). Book: ReLU.

    Args:
      x: floating array of any shape.

    Returns:
      ``max(x, 0)``, x's shape and dtype.
    """
    _checks.floating("relu", "x", x)
    return _relu_vjp(x)


def _linear(x: Array) -> Array:
    return x


def _linear_fwd(x: Array) -> tuple[Array, None]:
    return _linear(x), None


def _linear_bwd(_: None, output_grad: Array) -> tuple[Array]:
    return (output_grad,)


_linear_vjp = jax.custom_vjp(_linear)
_linear_vjp.defvjp(_linear_fwd, _linear_bwd)


def linear(x: jax.Array) -> jax.Array:
    """The identity, for output layers. Book: Linear.

    Args:
      x: floating array of any shape.

    Returns:
      ``x`` itself; the backward passes ``output_grad`` through.
    """
    _checks.floating("linear", "x", x)
    return _linear_vjp(x)


# --- Dropout -------------------------------------------------------------------------------


def _dropout(x: Array, mask: Array) -> Array:
    return x * mask


def _dropout_fwd(x: Array, mask: Array) -> tuple[Array, tuple[Array, Array]]:
    return _dropout(x, mask), (x, mask)


def _dropout_bwd(residuals: tuple[Array, Array], output_grad: Array) -> tuple[Array, Array]:
    x, mask = residuals
    return output_grad * mask, output_grad * x


_dropout_vjp = jax.custom_vjp(_dropout)
_dropout_vjp.defvjp(_dropout_fwd, _dropout_bwd)


def dropout(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x * mask`` where ``mask`` is 0 for dropped units and ``1 / (1 - rate)`` for kept ones.

    Inverted dropout: the scaling happens in training, so inference is the identity (the
    book instead scales by the keep probability at inference; the expectations agree).
    The backward routes the output gradient through the same mask. Book: Dropout.

    Args:
      x: floating array of any shape.
      mask: x's shape and dtype: 0 where a unit is dropped, ``1 / (1 - rate)`` where kept.

    Returns:
      ``x * mask``; x's gradient is ``output_grad * mask``.
    """
    _checks.floating("dropout", "x", x)
    _checks.floating("dropout", "mask", mask)
    _checks.same_dtype("dropout", ("x", "mask"), x, mask)
    if mask.shape != x.shape:
        raise ValueError(f"dropout: mask must have the shape of x, {tuple(x.shape)}, got {tuple(mask.shape)}.")
    return _dropout_vjp(x, mask)


# --- GELU ----------------------------------------------------------------------------------

_SQRT_HALF = 0.5**0.5  # 1 / sqrt(2)
_INV_SQRT_2PI = (2 * math.pi) ** -0.5  # the standard normal density's constant
_SQRT_2_OVER_PI = (2 / math.pi) ** 0.5
_TANH_CUBIC = 0.044715
# |x| beyond which the tanh form's sigmoid(2u) is exactly 0 or 1 even in float64 (|2u| > 1900 at
# 30): u is taken at x clipped there, so x**3 cannot overflow (a bfloat16 x reaches 3e38).
_TANH_CLIP = 30.0


def _gelu(x: Array) -> Array:
    # x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2: no 1 + erf(...) cancelling to 0 for x < 0.
    wide = x.astype(_checks.wide(x.dtype))
    return (wide * 0.5 * lax.erfc(-wide * _SQRT_HALF)).astype(x.dtype)


def _gelu_fwd(x: Array) -> tuple[Array, Array]:
    return _gelu(x), x


def _gelu_bwd(x: Array, output_grad: Array) -> tuple[Array]:
    # d/dx [x Phi(x)] = Phi(x) + x phi(x), phi the standard normal density. The barrier keeps XLA
    # from sharing erfc's intermediates with the forward's, which kept three activation-sized
    # buffers per layer alive from the forward to the backward (18 MiB of nanoGPT's CPU step).
    x = lax.optimization_barrier(x)
    wide = x.astype(_checks.wide(x.dtype))
    cdf = 0.5 * lax.erfc(-wide * _SQRT_HALF)
    density = jnp.exp(-0.5 * wide * wide) * _INV_SQRT_2PI
    return ((output_grad.astype(wide.dtype) * (cdf + wide * density)).astype(x.dtype),)


_gelu_vjp = jax.custom_vjp(_gelu)
_gelu_vjp.defvjp(_gelu_fwd, _gelu_bwd)


def _gelu_tanh_u(wide: Array) -> Array:
    clipped: Array = jnp.clip(wide, -_TANH_CLIP, _TANH_CLIP)
    u: Array = (clipped + _TANH_CUBIC * clipped * clipped * clipped) * _SQRT_2_OVER_PI
    return u


def _gelu_tanh(x: Array) -> Array:
    # 0.5 x (1 + tanh(u)) = x sigmoid(2u): no 1 + tanh(u) cancelling to 0 for x < 0.
    wide = x.astype(_checks.wide(x.dtype))
    return (wide * lax.logistic(2 * _gelu_tanh_u(wide))).astype(x.dtype)


def _gelu_tanh_fwd(x: Array) -> tuple[Array, Array]:
    return _gelu_tanh(x), x


def _gelu_tanh_bwd(x: Array, output_grad: Array) -> tuple[Array]:
    # With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u):
    #   d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    # Computed stably: 0.5 (1 + t) = sigmoid(2u) = s, 0.5 (1 - t) = sigmoid(-2u) = r, so
    # 0.5 (1 - t^2) = 2 s r, and neither s nor r is a difference of nearly equal numbers.
    x = lax.optimization_barrier(x)  # as in _gelu_bwd: no intermediates shared with the forward
    wide = x.astype(_checks.wide(x.dtype))
    u = _gelu_tanh_u(wide)
    s, r = lax.logistic(2 * u), lax.logistic(-2 * u)
    clipped = jnp.clip(wide, -_TANH_CLIP, _TANH_CLIP)  # s r is exactly 0 beyond the clip
    du = _SQRT_2_OVER_PI * (1 + 3 * _TANH_CUBIC * clipped * clipped)
    return ((output_grad.astype(wide.dtype) * (s + wide * 2 * s * r * du)).astype(x.dtype),)


_gelu_tanh_vjp = jax.custom_vjp(_gelu_tanh)
_gelu_tanh_vjp.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def gelu(x: jax.Array, *, approximate: bool = False) -> jax.Array:
    """GELU, ``x * Phi(x)``: exact (erf) by default, the tanh approximation with ``approximate=True``.

    Usable as ``Dense(n, gelu)``; for the tanh form as an activation value use ``gelu_tanh``.

    Args:
      x: floating array of any shape.
      approximate: a Python bool, fixed when the op is traced. False: ``x Phi(x) = 0.5 x (1 +
        erf(x / sqrt 2))``, as ``jax.nn.gelu(x, approximate=False)`` and torch's default;
        True: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, as ``jax.nn.gelu(x)`` and
        torch's ``approximate='tanh'`` (GPT-2's).

    Returns:
      ``gelu(x)`` in ``x``'s dtype; see the module docstring for how it is computed.
    """
    _checks.floating("gelu", "x", x)
    if not isinstance(approximate, (bool, np.bool_)):
        raise TypeError(
            f"gelu: approximate must be a Python bool (fixed when traced: False for the exact erf form, "
            f"True for the tanh form), got {type(approximate).__name__} {approximate!r}."
        )
    return _gelu_tanh_vjp(x) if approximate else _gelu_vjp(x)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """``gelu(x, approximate=True)`` as a named function value: ``Dense(n, gelu_tanh)``.

    Args:
      x: floating array of any shape.

    Returns:
      The tanh-form GELU of x, x's shape and dtype.
    """
    _checks.floating("gelu_tanh", "x", x)
    return _gelu_tanh_vjp(x)
