"""Metrics for ``fit(..., metrics={...})``: ``(prediction, target) -> scalar``, a mean over rows.

Like the losses, a metric is a mean over every leading position (rows, and time steps of a
sequence), so ``fit`` can evaluate it in batches and weight the batch means by their rows.
Metrics are not differentiated, so they are plain functions, not ``custom_vjp``s.

Padded targets follow the losses' rule (``funcnet.losses``): with integer class labels,
``ignore_index=k`` (a static Python int) leaves every position labelled ``k`` out, and the mean
runs over the others; with none left the metric is 0, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet.losses import _class_ids, _ignore_index, _kept

__all__ = ["accuracy"]


def accuracy(prediction: jax.Array, target: jax.Array, *, ignore_index: int | None = None) -> jax.Array:
    """The fraction of positions whose arg-max class is the target's.

    Args:
      prediction: ``(..., classes)`` scores (logits or probabilities).
      target: ``(...)`` integer class indices in ``[0, classes)`` (checked when concrete), or
        ``(..., classes)`` one-hot (or probability) rows.
      ignore_index: integer labels only: positions whose label equals it (padding) are left
        out, and the fraction is over the others (0 if there are none). This label is exempt
        from the range check. A static Python int: use ``functools.partial(accuracy,
        ignore_index=k)`` as a metric in ``fit``.

    Returns:
      A scalar in ``[0, 1]`` in the prediction's dtype.
    """
    fn = "accuracy"
    _checks.floating(fn, "prediction", prediction)
    _checks.array(fn, "target", target)
    if prediction.ndim < 2:
        raise ValueError(
            f"{fn}: prediction must be at least 2-D (rows, ..., classes), got shape {tuple(prediction.shape)}."
        )
    integer = jnp.issubdtype(target.dtype, jnp.integer)
    expected = prediction.shape[:-1] if integer else prediction.shape
    if target.shape != expected:
        hint = (
            "; these look like class labels: pass them as integers, e.g. target.astype(jnp.int32)"
            if not integer and target.shape == prediction.shape[:-1]
            else ""
        )
        raise ValueError(
            f"{fn}: target must have shape {expected} (integer labels) or {prediction.shape} "
            f"(one-hot) for prediction.shape={tuple(prediction.shape)}, got {tuple(target.shape)}{hint}."
        )
    if prediction.size == 0:
        raise ValueError(f"{fn}: prediction must not be empty, got shape {tuple(prediction.shape)}.")
    ignore_index = _ignore_index(fn, target, ignore_index)
    if integer and _checks.is_concrete(target):
        _class_ids(fn, target, prediction.shape[-1], "prediction", ignore_index)
    labels = target if integer else jnp.argmax(target, axis=-1)
    predicted = jnp.argmax(prediction, axis=-1)
    hits = predicted == labels.astype(predicted.dtype)
    # The mean is taken in at least float32 (float16 counts stop at 2048) and cast back.
    wide = _checks.wide(prediction.dtype)
    if ignore_index is None:
        return jnp.mean(hits.astype(wide)).astype(prediction.dtype)
    keep = _kept(target, ignore_index)
    count = jnp.maximum(jnp.sum(keep, dtype=jnp.int32), 1).astype(wide)
    return (jnp.sum(hits & keep, dtype=wide) / count).astype(prediction.dtype)
