"""Optimizers as pure tree updates (book: ``Optimizer``, ``SGD``, ``SGDMomentum``, ...).

Contract, stated once:

* ``Optimizer(init, update)`` is a ``NamedTuple`` of two pure functions:
  ``init(params) -> state`` and ``update(grads, state, params) -> (new_params, new_state)``.
  Every state is a ``NamedTuple`` pytree whose ``step`` counts the updates made.
* A learning rate is a number, a scalar array (traced is fine, so it can be ``vmap``-ed),
  or a schedule ``step -> lr`` evaluated at the update count.
* Every optimizer takes ``weight_decay`` (L2: ``grad + weight_decay * param``, the book's
  regularized SGD), ``clip_value`` (clip each gradient entry to ``[-clip_value, clip_value]``,
  the book's chapter-6 clipping) and ``clip_norm`` (scale the gradient tree down to at most
  this global norm), applied in the order clip_value, clip_norm, weight decay.
* Optimizers and schedules are values: equal calls give equal, equally hashed objects, and
  their numbers are pytree data. ``fit`` hands the numbers to its compiled program as traced
  arguments, so a sweep over learning rates, momenta, Adam's ``b1``/``b2``/``eps``,
  ``weight_decay``, ``clip_norm``, ``clip_value`` or a schedule's ``initial``, ``final``,
  ``steps`` and ``every`` compiles once. Static (a change compiles a new program): the
  optimizer's kind, whether ``weight_decay`` is zero, whether ``clip_norm``/``clip_value`` are
  set, the schedule's kind (constant, linear, exponential, or a function of your own, which
  compiles once per function object).
* Nothing is mutated; unused arguments are ``del``-ed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from funcnet import _checks
from funcnet._values import Method, T, dataclass_transform, number

__all__ = [
    "AdagradState",
    "AdamState",
    "MomentumState",
    "Optimizer",
    "Schedule",
    "SgdState",
    "adagrad",
    "adam",
    "constant",
    "exponential_decay",
    "linear_decay",
    "momentum",
    "sgd",
]

Params = Any
Schedule = Callable[[jax.Array], jax.Array]
LearningRate = float | jax.Array | Schedule


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


# --- Values: every optimizer and schedule is a frozen dataclass whose fields are pytree data ---


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _hyperparameters(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, keyword-only dataclass whose fields are pytree data, except those
    marked ``metadata={"static": True}``."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True, repr=False)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # a dataclass since the line above
    jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")],
    )
    return cls


def _call(label: str, spec: Any) -> str:
    """``label(field=value, ...)``, leaving out the fields that are off (``None``)."""
    args = (
        f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec) if getattr(spec, f.name) is not None
    )
    return f"{label}({', '.join(args)})"


# --- Schedules (book: Optimizer(final_lr=..., decay_type=...)) ------------------------------


def _check_schedule(fn: str, initial: Any, final: Any, steps: int, every: int) -> None:
    _checks.real_number(fn, "initial", initial, low=0.0, low_open=True)
    _checks.real_number(fn, "final", final, low=0.0, low_open=True)
    _checks.positive_int(fn, "steps", steps)
    _checks.positive_int(fn, "every", every)


def _progress(step: jax.Array | int, steps: Any, every: Any) -> jax.Array:
    """Fraction of the transitions done, in the default float dtype (int32 / int is float32)."""
    float_ = jnp.result_type(float)
    done = jnp.minimum(jnp.asarray(step) // every, steps)
    return done.astype(float_) / jnp.asarray(steps).astype(float_)


@_hyperparameters
class _Constant:
    value: Any

    def __call__(self, step: jax.Array) -> jax.Array:
        del step
        return jnp.asarray(self.value, jnp.result_type(float))

    def __repr__(self) -> str:
        return _call("constant", self)


@_hyperparameters
class _Decay:
    initial: Any
    final: Any
    steps: Any
    every: Any
    exponential: bool = dataclasses.field(default=False, metadata={"static": True})

    def __call__(self, step: jax.Array) -> jax.Array:
        done = _progress(step, self.steps, self.every)
        if self.exponential:
            return jnp.asarray(self.initial * (self.final / self.initial) ** done)
        return jnp.asarray(self.initial + (self.final - self.initial) * done)

    def __repr__(self) -> str:
        return (
            f"{'exponential' if self.exponential else 'linear'}_decay({self.initial!r}, {self.final!r}, "
            f"{self.steps!r}, every={self.every!r})"
        )


def constant(value: float) -> Schedule:
    """``step -> value``."""
    _checks.real_number("constant", "value", value, low=0.0)
    return _Constant(value=number(value))


def _decay(fn: str, initial: Any, final: Any, steps: Any, every: Any, exponential: bool) -> Schedule:
    _check_schedule(fn, initial, final, steps, every)
    return _Decay(
        initial=number(initial), final=number(final), steps=int(steps), every=int(every), exponential=exponential
    )


def linear_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` in equal steps over ``steps`` transitions, then ``final``.

    The transition count is ``update_step // every``: with ``every=batches_per_epoch`` and
    ``steps=epochs - 1`` this is the book's per-epoch ``decay_type="linear"``.
    """
    return _decay("linear_decay", initial, final, steps, every, exponential=False)


def exponential_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` by a constant factor per transition (book: "exponential")."""
    return _decay("exponential_decay", initial, final, steps, every, exponential=True)


def _learning_rate(fn: str, learning_rate: LearningRate) -> LearningRate:
    if callable(learning_rate):
        return learning_rate
    _checks.real_number(fn, "learning_rate", learning_rate, low=0.0, low_open=True)
    rate: float | jax.Array = number(learning_rate)
    return rate


# --- The shared gradient preprocessing and update -------------------------------------------


def _check_trees(fn: str, grads: Params, params: Params) -> None:
    g_def: Any = jax.tree_util.tree_structure(grads)
    p_def: Any = jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise TypeError(f"{fn}: grads must have the structure of params, got {g_def} for {p_def}.")
    for path_g, g, p in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree_util.tree_leaves(grads),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(
                f"{fn}: grads{jax.tree_util.keystr(path_g[0])} must have shape "
                f"{jnp.shape(p)} like its param, got {jnp.shape(g)}."
            )


def _tree_map(f: Callable[..., Any], *trees: Any) -> Any:
    return jax.tree_util.tree_map(f, *trees)


def _as(value: Any, like: jax.Array) -> jax.Array:
    """A hyperparameter in ``like``'s dtype (a Python or traced number never promotes a param)."""
    return jnp.asarray(value).astype(like.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class _Base:
    """What every optimizer shares: its common arguments, gradient preprocessing, the learning
    rate and the update. Subclasses add their own numbers and ``state``/``rule``."""

    label: ClassVar[str] = ""
    state_type: ClassVar[type] = SgdState
    learning_rate: Any
    weight_decay: Any = None
    clip_norm: Any = None
    clip_value: Any = None

    def state(self, params: Params) -> tuple[Any, ...]:
        """The extra state trees after ``step`` (none by default)."""
        del params
        return ()

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        """``(updates, new extra state trees)``; the update is ``params - updates``."""
        raise NotImplementedError

    def init(self, params: Params) -> Any:
        return self.state_type(jnp.zeros((), jnp.int32), *self.state(params))

    def update(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        _check_trees(self.label, grads, params)
        if self.clip_value is not None:
            grads = _tree_map(lambda g: jnp.clip(g, -_as(self.clip_value, g), _as(self.clip_value, g)), grads)
        if self.clip_norm is not None:
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
            scale = jnp.minimum(1.0, self.clip_norm / jnp.maximum(norm, 1e-30))
            grads = _tree_map(lambda g: g * scale.astype(g.dtype), grads)
        if self.weight_decay is not None:
            grads = _tree_map(lambda g, p: g + _as(self.weight_decay, g) * p, grads, params)
        rate = self.learning_rate(state.step) if callable(self.learning_rate) else self.learning_rate
        updates, trees = self.rule(grads, state, jnp.asarray(rate))
        new_params = _tree_map(lambda p, u: p - u.astype(p.dtype), params, updates)
        return new_params, self.state_type(state.step + 1, *trees)

    def optimizer(self) -> Optimizer:
        return Optimizer(Method(self, "init"), Method(self, "update"))

    def __repr__(self) -> str:
        return _call(self.label, self)


def _common(fn: str, learning_rate: LearningRate, weight_decay: Any, clip_norm: Any, clip_value: Any) -> dict[str, Any]:
    """Check the arguments every optimizer takes; zero decay and absent clipping are ``None`` (static)."""
    _checks.real_number(fn, "weight_decay", weight_decay, low=0.0)
    for name, value in (("clip_norm", clip_norm), ("clip_value", clip_value)):
        if value is not None:
            _checks.real_number(fn, name, value, low=0.0, low_open=True)
    weight_decay = number(weight_decay)
    return dict(
        learning_rate=_learning_rate(fn, learning_rate),
        weight_decay=None if _checks.is_concrete(weight_decay) and weight_decay == 0 else weight_decay,
        clip_norm=number(clip_norm),
        clip_value=number(clip_value),
    )


def _zeros_like(params: Params) -> Params:
    return _tree_map(jnp.zeros_like, params)


@_hyperparameters
class _Sgd(_Base):
    label = "sgd"

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        del state
        return _tree_map(lambda g: _as(lr, g) * g, grads), ()


@_hyperparameters
class _Momentum(_Base):
    label = "momentum"
    state_type = MomentumState
    momentum: Any

    def state(self, params: Params) -> tuple[Any, ...]:
        return (_zeros_like(params),)

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        velocity = _tree_map(lambda v, g: _as(self.momentum, v) * v + _as(lr, g) * g, state.velocity, grads)
        return velocity, (velocity,)


@_hyperparameters
class _Adagrad(_Base):
    label = "adagrad"
    state_type = AdagradState
    eps: Any

    def state(self, params: Params) -> tuple[Any, ...]:
        return (_zeros_like(params),)

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        sum_square = _tree_map(lambda s, g: s + _as(self.eps, s) + g * g, state.sum_square, grads)
        return _tree_map(lambda s, g: _as(lr, g) / jnp.sqrt(s) * g, sum_square, grads), (sum_square,)


@_hyperparameters
class _Adam(_Base):
    label = "adam"
    state_type = AdamState
    b1: Any
    b2: Any
    eps: Any

    def state(self, params: Params) -> tuple[Any, ...]:
        return _zeros_like(params), _zeros_like(params)

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        b1, b2 = jnp.asarray(self.b1), jnp.asarray(self.b2)
        t = (state.step + 1).astype(jnp.result_type(float))
        mu = _tree_map(lambda m, g: _as(b1, m) * m + _as(1 - b1, g) * g, state.mu, grads)
        nu = _tree_map(lambda v, g: _as(b2, v) * v + _as(1 - b2, g) * g * g, state.nu, grads)
        c1, c2 = 1 - b1.astype(t.dtype) ** t, 1 - b2.astype(t.dtype) ** t
        updates = _tree_map(
            lambda m, v: _as(lr, m) * (m / _as(c1, m)) / (jnp.sqrt(v / _as(c2, v)) + _as(self.eps, v)), mu, nu
        )
        return updates, (mu, nu)


def sgd(
    learning_rate: LearningRate,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """``p = p - lr * g``. Book: SGD."""
    return _Sgd(**_common("sgd", learning_rate, weight_decay, clip_norm, clip_value)).optimizer()


def momentum(
    learning_rate: LearningRate,
    momentum: float = 0.9,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """``v = momentum * v + lr * g; p = p - v`` (the book's form). Book: SGDMomentum."""
    _checks.real_number("momentum", "momentum", momentum, low=0.0, high=1.0, high_open=True)
    return _Momentum(
        momentum=number(momentum), **_common("momentum", learning_rate, weight_decay, clip_norm, clip_value)
    ).optimizer()


def adagrad(
    learning_rate: LearningRate,
    eps: float = 1e-7,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """``s = s + eps + g**2; p = p - lr / sqrt(s) * g`` (the book's AdaGrad)."""
    _checks.real_number("adagrad", "eps", eps, low=0.0, low_open=True)
    return _Adagrad(
        eps=number(eps), **_common("adagrad", learning_rate, weight_decay, clip_norm, clip_value)
    ).optimizer()


def adam(
    learning_rate: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """Adam (Kingma & Ba, 2015) with bias correction."""
    _checks.real_number("adam", "b1", b1, low=0.0, high=1.0, high_open=True)
    _checks.real_number("adam", "b2", b2, low=0.0, high=1.0, high_open=True)
    _checks.real_number("adam", "eps", eps, low=0.0, low_open=True)
    return _Adam(
        b1=number(b1),
        b2=number(b2),
        eps=number(eps),
        **_common("adam", learning_rate, weight_decay, clip_norm, clip_value),
    ).optimizer()
