"""Losses as ``jax.custom_vjp`` functions with the book's gradients (book: ``Loss`` subclasses).

Contract: ``loss(prediction, target) -> scalar`` is a *mean over rows* (axis 0) of a per-row
term, as both of the book's losses are. The trainer relies on that to keep the padded rows
of a last, smaller batch out of the loss (it evaluates the loss one row at a time under
``vmap`` and averages over the real rows). Gradients flow to ``prediction`` and ``target``;
integer class labels get the symbolic zero cotangent ``float0``.

Note on the book's ``SoftmaxCrossEntropy``: its forward sums
``-target * log(p) - (1 - target) * log(1 - p)`` (a binary-style sum over classes) while its
backward is ``(softmax - target) / rows``, which is the gradient of the *categorical*
cross-entropy ``-sum(target * log_softmax(logits)) / rows``. funcnet pairs the book's
gradient with the loss it belongs to; ``tests/test_losses.py`` shows the pairing is exact
and that the book's forward does not match its own backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks

__all__ = ["mean_squared_error", "softmax_cross_entropy"]


@_checks.op('prediction', 'target')
def mean_squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """``sum((prediction - target)**2) / rows``. Book: MeanSquaredError."""
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
    diff = prediction - target
    return jnp.sum(diff * diff) / prediction.shape[0]


def _mse_fwd(prediction, target):
    return mean_squared_error(prediction, target), prediction - target


def _mse_bwd(diff, output_grad):
    input_grad = output_grad * 2 * diff / diff.shape[0]
    return input_grad, -input_grad


mean_squared_error.defvjp(_mse_fwd, _mse_bwd)


def _one_hot_target(logits, target):
    """Check ``target`` against ``logits`` and return it as float one-hot rows."""
    fn = "softmax_cross_entropy"
    _checks.array(fn, "target", target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"{fn}: integer target must hold one class index per row of logits "
                f"(logits.shape={tuple(logits.shape)}), shape ({logits.shape[0]},), got {tuple(target.shape)}."
            )
        if _checks.is_concrete(target) and target.size:
            low, high = int(np.min(target)), int(np.max(target))
            if low < 0 or high >= logits.shape[1]:
                raise ValueError(
                    f"{fn}: integer target must lie in [0, {logits.shape[1]}) for "
                    f"{logits.shape[1]} classes, got values from {low} to {high}."
                )
        return jax.nn.one_hot(target, logits.shape[1], dtype=logits.dtype)
    _checks.floating(fn, "target", target)
    _checks.same_dtype(fn, ("logits", "target"), logits, target)
    if target.shape != logits.shape:
        raise ValueError(
            f"{fn}: one-hot target must have the shape of logits, {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}."
        )
    return target


@_checks.op('logits', 'target')
def softmax_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over rows of ``-sum(target * log_softmax(logits))``. Book: SoftmaxCrossEntropy.

    Args:
      logits: (batch, classes), unnormalised scores; stable for any finite magnitude.
      target: (batch, classes) float one-hot (or any probability rows), or (batch,) integer
        class indices in ``[0, classes)`` (checked when the labels are concrete).
    Returns:
      The scalar loss. Its hand gradient is ``(softmax(logits) - target) / rows``.
    """
    _checks.floating("softmax_cross_entropy", "logits", logits)
    _checks.rank("softmax_cross_entropy", "logits", logits, 2, "(batch, classes)")
    _checks.rows("softmax_cross_entropy", "logits", logits)
    one_hot = _one_hot_target(logits, target)
    log_probs = jax.nn.log_softmax(logits, axis=1)
    return -jnp.sum(one_hot * log_probs) / logits.shape[0]


def _ce_fwd(logits, target):
    one_hot = _one_hot_target(logits, target)
    log_probs = jax.nn.log_softmax(logits, axis=1)
    loss = -jnp.sum(one_hot * log_probs) / logits.shape[0]
    return loss, (log_probs, one_hot, target)


def _ce_bwd(residuals, output_grad):
    log_probs, one_hot, target = residuals
    scale = output_grad / log_probs.shape[0]
    input_grad = scale * (jnp.exp(log_probs) - one_hot)
    if jnp.issubdtype(target.dtype, jnp.integer):
        target_grad = np.zeros(target.shape, dtype=jax.dtypes.float0)
    else:
        target_grad = -scale * log_probs
    return input_grad, target_grad


softmax_cross_entropy.defvjp(_ce_fwd, _ce_bwd)
