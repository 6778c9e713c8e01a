"""Optimizers as pure tree updates (book: ``Optimizer``, ``SGD``, ``SGDMomentum``, ...).

Contract, stated once:

* ``Optimizer(init, update)`` is a ``NamedTuple`` of two pure functions:
  ``init(params) -> state`` and ``update(grads, state, params) -> (new_params, new_state)``.
  Every state is a ``NamedTuple`` pytree whose ``step`` counts the updates made.
* A learning rate is a number, a scalar array (traced is fine, so it can be ``vmap``-ed),
  or a schedule ``step -> lr`` evaluated at the update count.
* Every optimizer takes ``weight_decay`` (L2: ``grad + weight_decay * param``, the book's
  regularized SGD) and ``clip_norm`` (scale the gradient tree down to at most this global
  norm), applied in that order: clip first, then decay.
* Nothing is mutated; unused arguments are ``del``-ed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from funcnet import _checks

__all__ = [
    "Optimizer", "Schedule", "sgd", "momentum", "adagrad", "adam", "constant", "linear_decay",
    "exponential_decay", "SgdState", "MomentumState", "AdagradState", "AdamState",
]

Params = Any
Schedule = Callable[[jax.Array], jax.Array]
LearningRate = Union[float, jax.Array, Schedule]


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params) -> (new_params, new_state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


class SgdState(NamedTuple):
    step: jax.Array


class MomentumState(NamedTuple):
    step: jax.Array
    velocity: Params


class AdagradState(NamedTuple):
    step: jax.Array
    sum_square: Params


class AdamState(NamedTuple):
    step: jax.Array
    mu: Params
    nu: Params


# --- Schedules (book: Optimizer(final_lr=..., decay_type=...)) ------------------------------


def _check_schedule(fn: str, initial, final, steps: int, every: int) -> None:
    _checks.real_number(fn, "initial", initial, low=0.0, low_open=True)
    _checks.real_number(fn, "final", final, low=0.0, low_open=True)
    _checks.positive_int(fn, "steps", steps)
    _checks.positive_int(fn, "every", every)


def _progress(step, steps: int, every: int) -> jax.Array:
    """Fraction of the transitions done, in the default float dtype (int32 / int is float32)."""
    done = jnp.minimum(jnp.asarray(step) // every, steps)
    return done.astype(jnp.result_type(float)) / steps


def constant(value: float) -> Schedule:
    """``step -> value``."""
    _checks.real_number("constant", "value", value, low=0.0)
    return lambda step: jnp.asarray(value, jnp.result_type(float))


def linear_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` in equal steps over ``steps`` transitions, then ``final``.

    The transition count is ``update_step // every``: with ``every=batches_per_epoch`` and
    ``steps=epochs - 1`` this is the book's per-epoch ``decay_type="linear"``.
    """
    _check_schedule("linear_decay", initial, final, steps, every)

    def schedule(step):
        return initial + (final - initial) * _progress(step, steps, every)

    return schedule


def exponential_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` by a constant factor per transition (book: "exponential")."""
    _check_schedule("exponential_decay", initial, final, steps, every)

    def schedule(step):
        return initial * (final / initial) ** _progress(step, steps, every)

    return schedule


def _learning_rate(fn: str, learning_rate: LearningRate) -> Schedule:
    if callable(learning_rate):
        return learning_rate
    _checks.real_number(fn, "learning_rate", learning_rate, low=0.0, low_open=True)
    return lambda step: learning_rate


# --- The shared gradient preprocessing ----------------------------------------------------


def _check_common(fn: str, weight_decay, clip_norm) -> None:
    _checks.real_number(fn, "weight_decay", weight_decay, low=0.0)
    if clip_norm is not None:
        _checks.real_number(fn, "clip_norm", clip_norm, low=0.0, low_open=True)


def _check_trees(fn: str, grads, params) -> None:
    g_def, p_def = jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise TypeError(f"{fn}: grads must have the structure of params, got {g_def} for {p_def}.")
    for path_g, g, p in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads),
                            jax.tree_util.tree_leaves(params)):
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(f"{fn}: grads{jax.tree_util.keystr(path_g[0])} must have shape "
                             f"{jnp.shape(p)} like its param, got {jnp.shape(g)}.")


def _preprocess(grads, params, weight_decay, clip_norm):
    if clip_norm is not None:
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
        grads = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
    if weight_decay:
        grads = jax.tree_util.tree_map(lambda g, p: g + weight_decay * p, grads, params)
    return grads


def _optimizer(fn: str, learning_rate, weight_decay, clip_norm, make_state, rule) -> Optimizer:
    """Build an Optimizer from ``rule(grads, state_trees, params, lr) -> (updates, new_trees)``.

    ``make_state(params)`` returns the extra state trees; ``new_params = params - updates``.
    """
    schedule = _learning_rate(fn, learning_rate)
    _check_common(fn, weight_decay, clip_norm)

    def init(params):
        return make_state(params)

    def update(grads, state, params):
        _check_trees(fn, grads, params)
        grads = _preprocess(grads, params, weight_decay, clip_norm)
        lr = jnp.asarray(schedule(state.step))
        updates, trees = rule(grads, state, params, lr)
        new_params = jax.tree_util.tree_map(lambda p, u: p - u.astype(p.dtype), params, updates)
        return new_params, type(state)(state.step + 1, *trees)

    return Optimizer(init, update)


def _zeros_like(params):
    return jax.tree_util.tree_map(jnp.zeros_like, params)


def _step() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def sgd(learning_rate: LearningRate, *, weight_decay: float = 0.0, clip_norm: float | None = None) -> Optimizer:
    """``p = p - lr * g``. Book: SGD."""

    def rule(grads, state, params, lr):
        del state, params
        return jax.tree_util.tree_map(lambda g: lr.astype(g.dtype) * g, grads), ()

    return _optimizer("sgd", learning_rate, weight_decay, clip_norm, lambda p: SgdState(_step()), rule)


def momentum(learning_rate: LearningRate, momentum: float = 0.9, *, weight_decay: float = 0.0,
             clip_norm: float | None = None) -> Optimizer:
    """``v = momentum * v + lr * g; p = p - v`` (the book's form). Book: SGDMomentum."""
    _checks.real_number("momentum", "momentum", momentum, low=0.0, high=1.0, high_open=True)

    def rule(grads, state, params, lr):
        del params
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + lr.astype(g.dtype) * g, state.velocity, grads)
        return velocity, (velocity,)

    return _optimizer("momentum", learning_rate, weight_decay, clip_norm,
                      lambda p: MomentumState(_step(), _zeros_like(p)), rule)


def adagrad(learning_rate: LearningRate, eps: float = 1e-7, *, weight_decay: float = 0.0,
            clip_norm: float | None = None) -> Optimizer:
    """``s = s + eps + g**2; p = p - lr / sqrt(s) * g`` (the book's AdaGrad)."""
    _checks.real_number("adagrad", "eps", eps, low=0.0, low_open=True)

    def rule(grads, state, params, lr):
        del params
        sum_square = jax.tree_util.tree_map(lambda s, g: s + eps + g * g, state.sum_square, grads)
        return jax.tree_util.tree_map(lambda s, g: lr.astype(g.dtype) / jnp.sqrt(s) * g, sum_square, grads), (sum_square,)

    return _optimizer("adagrad", learning_rate, weight_decay, clip_norm,
                      lambda p: AdagradState(_step(), _zeros_like(p)), rule)


def adam(learning_rate: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
         weight_decay: float = 0.0, clip_norm: float | None = None) -> Optimizer:
    """Adam (Kingma & Ba, 2015) with bias correction."""
    _checks.real_number("adam", "b1", b1, low=0.0, high=1.0, high_open=True)
    _checks.real_number("adam", "b2", b2, low=0.0, high=1.0, high_open=True)
    _checks.real_number("adam", "eps", eps, low=0.0, low_open=True)

    def rule(grads, state, params, lr):
        del params
        t = (state.step + 1).astype(jnp.result_type(float))
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        updates = jax.tree_util.tree_map(
            lambda m, v: lr.astype(m.dtype) * (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps), mu, nu)
        return updates, (mu, nu)

    return _optimizer("adam", learning_rate, weight_decay, clip_norm,
                      lambda p: AdamState(_step(), _zeros_like(p), _zeros_like(p)), rule)
