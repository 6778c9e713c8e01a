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

Padded targets: with integer class labels, ``ignore_index=k`` (a static Python int) drops every
position whose label is ``k``: it adds nothing to the loss or the gradient, and the mean runs
over the kept positions only (torch's ``ignore_index`` with ``reduction='mean'``). ``k`` is
exempt from the label range check, so ``-1``, ``-100`` or a padding class all work. Where
nothing is kept the loss and its gradient are 0, never NaN (torch returns NaN), so an all-padding
row evaluated alone (the trainer's last batch) is harmless. ``funcnet.accuracy`` takes the same
``ignore_index``.

Precision: the sum over positions is taken in at least float32 and the mean cast back to the
prediction's dtype, so a float16 loss of a large batch is its mean, not an overflowed total.
Each loss follows the ops' idiom (``ops.py``): a private ``custom_vjp`` of the plain forward and a
public function that checks its arguments and calls it.

Binary cross-entropy on logits, ``sigmoid_binary_cross_entropy(logits, target)``, is the one
loss whose per-position term is a *mean* over the last axis: it averages
``max(z, 0) - z t + log1p(exp(-|z|))`` over every element, as torch's
``binary_cross_entropy_with_logits(reduction='mean')`` does, so each of several independent
binary outputs weighs the same for any number of them. Averaged over rows one at a time, as the
trainer does, it is still the mean over every element. Its hand gradient is
``(sigmoid(z) - t) / n`` for the logits and ``-z / n`` for the targets, ``n`` the number of
elements; the form above never exponentiates a positive number, so it is finite for any finite
logits (``±1000`` included).

Note on the book's ``SoftmaxCrossEntropy``: its forward sums
``-target * log(p) - (1 - target) * log(1 - p)`` (a binary-style sum over classes) while its
backward is ``(softmax - target) / rows``, which is the gradient of the *categorical*
cross-entropy ``-sum(target * log_softmax(logits)) / rows``. funcnet pairs the book's
gradient with the loss it belongs to; ``tests/test_losses.py`` shows the pairing is exact
and that the book's forward does not match its own backward.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks, _host

Array = jax.Array

__all__ = ["mean_squared_error", "sigmoid_binary_cross_entropy", "softmax_cross_entropy"]


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
    MeanSquaredError; ``/ (batch * time)`` for sequences.

    Args:
      prediction: ``(rows, ...)`` floating, not empty.
      target: prediction's shape and dtype.

    Returns:
      The scalar loss; its hand gradient is ``2 (prediction - target) / positions``.
    """
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


def _ignore_index(fn: str, target: Any, ignore_index: Any) -> int | None:
    """``ignore_index`` as a Python int (or None). It names a label value, so it is static: a
    traced one (a ``jit`` argument, a number inside ``jax.tree_util.Partial``) is refused."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        hint = (
            " It must be static: bind it with functools.partial(..., ignore_index=k), or mark it "
            "static_argnames='ignore_index' under jax.jit."
            if isinstance(ignore_index, jax.core.Tracer)
            else ""
        )
        raise TypeError(f"{fn}: ignore_index must be an int or None, got {type(ignore_index).__name__}.{hint}")
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: ignore_index applies to integer class labels only, got a {target.dtype} target "
            "(one-hot rows). Pass integer labels, or drop ignore_index."
        )
    return int(ignore_index)


def _kept(target: Array, ignore_index: int) -> Array:
    """The positions whose label is not ``ignore_index`` (all of them if the dtype cannot hold it)."""
    info = jnp.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return jnp.ones(target.shape, bool)
    kept: Array = target != jnp.asarray(ignore_index, target.dtype)
    return kept


@functools.lru_cache(maxsize=16)
def _kept_min_max(ignore_index: int) -> Callable[[Array], tuple[Array, Array, Array]]:
    """A reduction for ``_host.reduce_to_host``: (any kept, smallest kept, largest kept)."""

    def reduce(target: Array) -> tuple[Array, Array, Array]:
        info, keep = jnp.iinfo(target.dtype), _kept(target, ignore_index)
        low = jnp.min(jnp.where(keep, target, jnp.asarray(info.max, target.dtype)))
        high = jnp.max(jnp.where(keep, target, jnp.asarray(info.min, target.dtype)))
        return jnp.any(keep), low, high

    return reduce


def _class_ids(fn: str, target: Any, classes: int, of: str, ignore_index: int | None) -> None:
    """Concrete integer labels must each name one of ``classes`` classes or equal ``ignore_index``."""
    if ignore_index is None:
        _checks.class_ids(fn, target, classes, of)
        return
    if _host.is_global(target):  # spans processes: reduced where it lives, never fetched whole
        found, low, high = (x.item() for x in _host.reduce_to_host(_kept_min_max(ignore_index), target))
        if not found:
            return
    else:
        host = np.asarray(target)
        kept = host[host != ignore_index]
        if not kept.size:
            return
        low, high = kept.min(), kept.max()
    if low < 0 or high >= classes:
        raise ValueError(
            f"{fn}: integer target must lie in [0, {classes}) for the {classes} classes of {of}, or equal "
            f"ignore_index={ignore_index}, got other values from {int(low)} to {int(high)}."
        )


def _labels_in_range(logits: Any, target: Any, ignore_index: int | None) -> None:
    """Integer labels must name a class (or be ``ignore_index``): checked whenever they are
    concrete. Malformed logits are left to the shape checks inside, which name them."""
    fn = "softmax_cross_entropy"
    if not (_checks.is_array(logits) and _checks.is_array(target)) or logits.ndim < 2 or logits.size == 0:
        return
    if not jnp.issubdtype(target.dtype, jnp.integer) or not _checks.is_concrete(target) or not target.size:
        return
    _class_ids(fn, target, logits.shape[-1], "logits", ignore_index)


def softmax_cross_entropy(logits: jax.Array, target: jax.Array, *, ignore_index: int | None = None) -> jax.Array:
    """Mean over positions of ``-sum(target * log_softmax(logits))``. Book: SoftmaxCrossEntropy.

    Args:
      logits: (batch, classes), or (batch, time, ..., classes) for sequences: unnormalised
        scores, stable for any finite magnitude.
      target: float one-hot (or any probability) rows of the logits' shape, or integer class
        indices of the logits' shape without the class axis, in ``[0, classes)`` (checked when
        the labels are concrete; unchecked traced labels outside it get a zero one-hot row).
      ignore_index: integer labels only: positions whose label equals it (padding) add nothing,
        and the mean runs over the others, as torch's ``cross_entropy(..., ignore_index=k)``;
        this label is exempt from the range check. A static Python int: bind it with
        ``functools.partial(softmax_cross_entropy, ignore_index=k)`` to use it in ``fit``.

    Returns:
      The scalar loss. Its hand gradient is ``(softmax(logits) - target) / positions``; with
      ``ignore_index``, that at the kept positions divided by their count instead, and 0 at the
      ignored ones. If every position is ignored the loss and its gradient are 0 (torch: NaN).
    """
    fn = "softmax_cross_entropy"
    _check_logits(logits)
    _one_hot_target(logits, target)
    ignore_index = _ignore_index(fn, target, ignore_index)
    _labels_in_range(logits, target, ignore_index)
    return _softmax_cross_entropy_vjp(logits, target, ignore_index)


def _check_logits(logits: Any) -> None:
    fn = "softmax_cross_entropy"
    _checks.floating(fn, "logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"{fn}: logits must be at least 2-D (batch, ..., classes), got shape {tuple(logits.shape)}.")
    if logits.size == 0:
        raise ValueError(f"{fn}: logits must have at least one row and one class, got shape {tuple(logits.shape)}.")


def _targets(logits: Array, target: Array, ignore_index: int | None) -> tuple[Array, Array | None, Array | int]:
    """The one-hot rows (zero at ignored positions), the kept positions (None: all) and their
    count, at least 1 (in the accumulation dtype), so that nothing kept gives 0, not NaN."""
    one_hot = _one_hot_target(logits, target)
    if ignore_index is None:
        return one_hot, None, _positions(logits.shape)
    keep = _kept(target, ignore_index)
    count = jnp.maximum(jnp.sum(keep, dtype=jnp.int32), 1).astype(_checks.wide(logits.dtype))
    return jnp.where(keep[..., None], one_hot, jnp.zeros((), one_hot.dtype)), keep, count


def _cross_entropy(log_probs: Array, one_hot: Array, count: Array | int) -> Array:
    """The mean over (kept) positions, summed in at least float32 and cast back to the logits' dtype."""
    wide = _checks.wide(log_probs.dtype)
    total = jnp.sum(one_hot.astype(wide) * -log_probs.astype(wide))  # +0.0 when nothing is kept
    return (total / count).astype(log_probs.dtype)


def _softmax_cross_entropy(logits: Array, target: Array, ignore_index: int | None) -> Array:
    one_hot, _, count = _targets(logits, target, ignore_index)
    return _cross_entropy(jax.nn.log_softmax(logits, axis=-1), one_hot, count)


def _ce_fwd(logits: Array, target: Array, ignore_index: int | None) -> tuple[Array, tuple[Array, Array]]:
    one_hot, _, count = _targets(logits, target, ignore_index)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return _cross_entropy(log_probs, one_hot, count), (log_probs, target)


def _ce_bwd(ignore_index: int | None, residuals: tuple[Array, Array], output_grad: Array) -> tuple[Array, Any]:
    log_probs, target = residuals
    one_hot, keep, count = _targets(log_probs, target, ignore_index)  # recomputed: one-hot rows are cheap
    if keep is None:
        scale: Array = output_grad / count
    else:  # (softmax - one_hot) * kept / count; ignored positions get 0
        weight = keep.astype(_checks.wide(log_probs.dtype)) / count
        scale = output_grad * weight.astype(log_probs.dtype)[..., None]
    input_grad = scale * (jnp.exp(log_probs) - one_hot)
    if jnp.issubdtype(target.dtype, jnp.integer):
        target_grad: Any = np.zeros(target.shape, dtype=jax.dtypes.float0)
    else:
        target_grad = -scale * log_probs
    return input_grad, target_grad


_softmax_cross_entropy_vjp = jax.custom_vjp(_softmax_cross_entropy, nondiff_argnums=(2,))
_softmax_cross_entropy_vjp.defvjp(_ce_fwd, _ce_bwd)


# --- Binary cross-entropy on logits -------------------------------------------------------------


def _binary_terms(logits: Array, target: Array) -> Array:
    """``max(z, 0) - z t + log1p(exp(-|z|))`` per element, in at least float32: never an
    exponential of a positive number, so finite for any finite logits."""
    wide = _checks.wide(logits.dtype)
    z, t = logits.astype(wide), target.astype(wide)
    return jnp.maximum(z, jnp.zeros((), wide)) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _sigmoid_binary_cross_entropy(logits: Array, target: Array) -> Array:
    return (jnp.sum(_binary_terms(logits, target)) / logits.size).astype(logits.dtype)


def _bce_fwd(logits: Array, target: Array) -> tuple[Array, tuple[Array, Array]]:
    return _sigmoid_binary_cross_entropy(logits, target), (logits, target)


def _bce_bwd(residuals: tuple[Array, Array], output_grad: Array) -> tuple[Array, Array]:
    logits, target = residuals
    wide = _checks.wide(logits.dtype)
    z, t = logits.astype(wide), target.astype(wide)
    scale = output_grad.astype(wide) / logits.size
    input_grad = scale * (jax.nn.sigmoid(z) - t)  # the book's sigmoid, minus the target, over n
    target_grad = -scale * z
    return input_grad.astype(logits.dtype), target_grad.astype(target.dtype)


_sigmoid_binary_cross_entropy_vjp = jax.custom_vjp(_sigmoid_binary_cross_entropy)
_sigmoid_binary_cross_entropy_vjp.defvjp(_bce_fwd, _bce_bwd)


def sigmoid_binary_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over every element of ``-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))``.

    torch's ``binary_cross_entropy_with_logits(logits, target)`` (``reduction='mean'``): the
    mean runs over every element, the last axis included (see the module docstring), computed
    as ``max(z, 0) - z t + log1p(exp(-|z|))``, finite for any finite logits.

    Args:
      logits: at least 1-D ``(batch, ...)``, floating, not empty: one score per binary output.
      target: floats of the logits' shape and dtype, probabilities in ``[0, 1]`` (0/1 labels or
        soft ones). Their values are not checked: outside ``[0, 1]`` the formula's value comes
        back, as torch's does.

    Returns:
      The scalar loss, of the logits' dtype (summed in at least float32). Its hand gradient is
      ``(sigmoid(logits) - target) / n`` for the logits and ``-logits / n`` for the target, with
      ``n = logits.size``.
    """
    fn = "sigmoid_binary_cross_entropy"
    _checks.floating(fn, "logits", logits)
    _checks.array(fn, "target", target)
    if not jnp.issubdtype(target.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: target must have a floating dtype (probabilities in [0, 1]), got {target.dtype}. "
            f"Cast the labels first, e.g. target.astype(logits.dtype)."
        )
    _checks.same_dtype(fn, ("logits", "target"), logits, target)
    if logits.ndim == 0 or logits.shape != target.shape:
        raise ValueError(
            f"{fn}: logits and target must have the same shape with a row axis first, got "
            f"logits.shape={tuple(logits.shape)}, target.shape={tuple(target.shape)}."
        )
    if logits.size == 0:
        raise ValueError(f"{fn}: logits must not be empty, got shape {tuple(logits.shape)}.")
    return _sigmoid_binary_cross_entropy_vjp(logits, target)
