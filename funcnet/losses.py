"""Losses as ``jax.custom_vjp`` functions with the book's gradients (book: ``Loss`` subclasses).

Contract: ``loss(prediction, target) -> scalar`` is a *mean over positions* of a per-position
term summed over the last axis (features or classes). A position is a row, or, for sequences
``(batch, time, ...)``, every leading index: the mean runs over ``batch * time``. Both of the
book's losses are such means over rows; its chapter-6 loss *sums* over batch and time instead,
which only scales the gradient, and funcnet keeps the mean so that a learning rate means the
same for any batch size or sequence length. The trainer relies on the mean to keep the padded
rows of a last, smaller batch out of the loss (it evaluates the loss one row at a time under
``vmap`` and averages over the real rows). Gradients flow to ``prediction`` and ``target``;
integer class labels get the symbolic zero cotangent ``float0``.

Precision: the sum over positions is taken in at least float32 and the mean cast back to the
prediction's dtype, so a float16 loss of a large batch is its mean, not an overflowed total.
Each loss follows the ops' idiom (``ops.py``): a private ``custom_vjp`` of the plain forward and a
public function that checks its arguments and calls it.

Note on the book's ``SoftmaxCrossEntropy``: its forward sums
``-target * log(p) - (1 - target) * log(1 - p)`` (a binary-style sum over classes) while its
backward is ``(softmax - target) / rows``, which is the gradient of the *categorical*
cross-entropy ``-sum(target * log_softmax(logits)) / rows``. funcnet pairs the book's
gradient with the loss it belongs to; ``tests/test_losses.py`` shows the pairing is exact
and that the book's forward does not match its own backward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks

Array = jax.Array

__all__ = ["mean_squared_error", "softmax_cross_entropy"]


def _positions(shape: tuple[int, ...]) -> int:
    """How many positions a loss averages over: every index but the last axis's (rows, for 1-D)."""
    return int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]


def _mean_squared_error(prediction: Array, target: Array) -> Array:
    diff = (prediction - target).astype(_checks.wide(prediction.dtype))
    return (jnp.sum(diff * diff) / _positions(prediction.shape)).astype(prediction.dtype)


def _mse_fwd(prediction: Array, target: Array) -> tuple[Array, Array]:
    return _mean_squared_error(prediction, target), prediction - target


def _mse_bwd(diff: Array, output_grad: Array) -> tuple[Array, Array]:
    input_grad = output_grad * 2 * diff / _positions(diff.shape)
    return input_grad, -input_grad


_mean_squared_error_vjp = jax.custom_vjp(_mean_squared_error)
_mean_squared_error_vjp.defvjp(_mse_fwd, _mse_bwd)


def mean_squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """``sum((prediction - target)**2) / positions``: ``/ rows`` for ``(rows, features)``, the book's
    MeanSquaredError; ``/ (batch * time)`` for sequences."""
    _checks.floating("mean_squared_error", "prediction", prediction)
    _checks.floating("mean_squared_error", "target", target)
    _checks.same_dtype("mean_squared_error", ("prediction", "target"), prediction, target)
    if prediction.ndim == 0 or prediction.shape != target.shape:
        raise ValueError(
            "mean_squared_error: prediction and target must have the same shape with a row "
            f"axis first, got prediction.shape={tuple(prediction.shape)}, "
            f"target.shape={tuple(target.shape)}."
        )
    _checks.rows("mean_squared_error", "prediction", prediction)
    if prediction.size == 0:
        raise ValueError(f"mean_squared_error: prediction must not be empty, got shape {tuple(prediction.shape)}.")
    return _mean_squared_error_vjp(prediction, target)


def _one_hot_target(logits: Array, target: Array) -> Array:
    """Check ``target`` against ``logits`` and return it as float one-hot rows."""
    fn = "softmax_cross_entropy"
    _checks.array(fn, "target", target)
    classes = logits.shape[-1]
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"{fn}: integer target must hold one class index per row of logits "
                f"(logits.shape={tuple(logits.shape)}), shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}."
            )
        one_hot: Array = jax.nn.one_hot(target, classes, dtype=logits.dtype)
        return one_hot
    _checks.floating(fn, "target", target)
    _checks.same_dtype(fn, ("logits", "target"), logits, target)
    if target.shape != logits.shape:
        hint = (
            "; these look like class labels: pass them as integers, e.g. target.astype(jnp.int32)"
            if target.shape == logits.shape[:-1]
            else ""
        )
        raise ValueError(
            f"{fn}: one-hot target must have the shape of logits, {tuple(logits.shape)}, got "
            f"{tuple(target.shape)}{hint}."
        )
    return target


def _labels_in_range(logits: Any, target: Any) -> None:
    """Integer labels must name a class: checked whenever they are concrete. Malformed logits are
    left to the shape checks inside, which name them."""
    fn = "softmax_cross_entropy"
    if not (_checks.is_array(logits) and _checks.is_array(target)) or logits.ndim < 2 or logits.size == 0:
        return
    if not jnp.issubdtype(target.dtype, jnp.integer) or not _checks.is_concrete(target) or not target.size:
        return
    _checks.class_ids(fn, target, logits.shape[-1], "logits")


def softmax_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over positions of ``-sum(target * log_softmax(logits))``. Book: SoftmaxCrossEntropy.

    Args:
      logits: (batch, classes), or (batch, time, ..., classes) for sequences: unnormalised
        scores, stable for any finite magnitude.
      target: float one-hot (or any probability) rows of the logits' shape, or integer class
        indices of the logits' shape without the class axis, in ``[0, classes)`` (checked when
        the labels are concrete).
    Returns:
      The scalar loss. Its hand gradient is ``(softmax(logits) - target) / positions``.
    """
    _check_logits(logits)
    _one_hot_target(logits, target)
    _labels_in_range(logits, target)
    return _softmax_cross_entropy_vjp(logits, target)


def _check_logits(logits: Any) -> None:
    fn = "softmax_cross_entropy"
    _checks.floating(fn, "logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"{fn}: logits must be at least 2-D (batch, ..., classes), got shape {tuple(logits.shape)}.")
    if logits.size == 0:
        raise ValueError(f"{fn}: logits must have at least one row and one class, got shape {tuple(logits.shape)}.")


def _cross_entropy(log_probs: Array, one_hot: Array) -> Array:
    """The mean over positions, summed in at least float32 and cast back to the logits' dtype."""
    wide = _checks.wide(log_probs.dtype)
    total = -jnp.sum(one_hot.astype(wide) * log_probs.astype(wide))
    return (total / _positions(log_probs.shape)).astype(log_probs.dtype)


def _softmax_cross_entropy(logits: Array, target: Array) -> Array:
    return _cross_entropy(jax.nn.log_softmax(logits, axis=-1), _one_hot_target(logits, target))


def _ce_fwd(logits: Array, target: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    one_hot = _one_hot_target(logits, target)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return _cross_entropy(log_probs, one_hot), (log_probs, one_hot, target)


def _ce_bwd(residuals: tuple[Array, Array, Array], output_grad: Array) -> tuple[Array, Any]:
    log_probs, one_hot, target = residuals
    scale = output_grad / _positions(log_probs.shape)
    input_grad = scale * (jnp.exp(log_probs) - one_hot)
    if jnp.issubdtype(target.dtype, jnp.integer):
        target_grad: Any = np.zeros(target.shape, dtype=jax.dtypes.float0)
    else:
        target_grad = -scale * log_probs
    return input_grad, target_grad


_softmax_cross_entropy_vjp = jax.custom_vjp(_softmax_cross_entropy)
_softmax_cross_entropy_vjp.defvjp(_ce_fwd, _ce_bwd)
