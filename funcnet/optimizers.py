"""Optimizers as pure tree updates (book: ``Optimizer``, ``SGD``, ``SGDMomentum``, ...).

Contract, stated once:

* ``Optimizer(init, update)`` is a ``NamedTuple`` of two pure functions:
  ``init(params) -> state`` and ``update(grads, state, params) -> (new_params, new_state)``.
  Every state is a ``NamedTuple`` pytree whose ``step`` counts the calls to ``update``.
* A learning rate is a number, a scalar array (traced is fine, so it can be ``vmap``-ed),
  or a schedule ``step -> lr`` evaluated at the update count.
* Every optimizer takes ``weight_decay`` (L2: ``grad + weight_decay * param``, the book's
  regularized SGD; ``adamw``'s is decoupled: ``lr * weight_decay * param`` joins the update),
  ``clip_value`` (clip each gradient entry to ``[-clip_value, clip_value]``, the book's
  chapter-6 clipping) and ``clip_norm`` (scale the gradient tree down to at most this global
  norm), applied in the order clip_value, clip_norm, weight decay.
* Precision: an optimizer computes in ``promote_types(param dtype, float32)``: the gradient
  is cast up first, the clip norm, the state (momentum, Adam's moments, AdaGrad's sum, the
  accumulated gradients) and its constants (``eps``, ``b1``, ...) live there, and only the new
  params are cast back (one rounding). float16 and bfloat16 params therefore get float32 state.
* Complex params: the gradients are ``jax.grad``'s (what ``fit`` and ``train_step`` hand over),
  whose conjugate is the descent direction for a real loss, so every optimizer conjugates a
  complex gradient first; second moments and norms use ``|g|**2`` and live in the real dtype
  (``optax`` fed ``conj(jax.grad(...))``). ``clip_value`` refuses complex params.
* Wrappers take optimizers: ``accumulate`` (the mean gradient of ``steps`` calls, applied every
  ``steps``-th call) and ``multi_optimizer`` (parameter groups, ``None`` freezing one), whose
  groups can be chosen by what a parameter is, its field name (``labels_by_field``; the
  weight-decay recipe ``decay_labels``: weights ``W``/``W_*``, not biases, norms).
* A ``GradientTransform(init, update)`` changes gradients, not params:
  ``update(grads, state, params) -> (new_grads, new_state)``. ``chain(*transforms, optimizer)``
  is the ``Optimizer`` that feeds ``optimizer`` the transformed gradients (state
  ``ChainState(step, transforms, inner)``); ``clip_by_global_norm(max_norm)`` is the one
  transform, so ``chain(clip_by_global_norm(1.0), multi_optimizer(...))`` clips by the norm
  over every group together (``optax.chain(optax.clip_by_global_norm(1.0), ...)``).
* Optimizers and schedules are values: equal calls give equal, equally hashed objects, and
  their numbers are pytree data. ``fit`` hands the numbers to its compiled program as traced
  arguments, so a sweep over learning rates, momenta, Adam's ``b1``/``b2``/``eps``,
  ``weight_decay``, ``clip_norm``, ``clip_value``, a schedule's ``initial``, ``peak``,
  ``final``, ``steps``, ``warmup_steps``, ``decay_steps`` and ``every``, ``accumulate``'s
  ``steps`` or ``clip_by_global_norm``'s ``max_norm`` compiles once. A schedule's step counts are
  float data, so a count beyond int32 (``cosine_decay(0.1, 10**10)``) is a number like any other.
  Static (a change compiles a new program): the optimizer's kind, whether ``weight_decay`` is zero, whether
  ``clip_norm``/``clip_value`` are set, which transforms ``chain`` holds, the schedule's kind
  (constant, linear, exponential, cosine, warmup-cosine, or a function of your own, which
  compiles once per function object), ``multi_optimizer``'s groups and labels.
* ``with_ema`` adds the params' moving average to an optimizer (``fit``'s ``ema_decay``): an
  ``EmaState(inner, ema, weight)``, updated once per update of the wrapped optimizer (not at
  ``accumulate``'s calls in between), debiased as ``optax.ema(decay, debias=True)`` by default;
  ``start_ema`` begins one around an existing optimizer state.
* Nothing is mutated; unused arguments are ``del``-ed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from funcnet import _checks
from funcnet._values import Method, T, dataclass_transform, number
from funcnet.state import has_state

__all__ = [
    "AccumulateState",
    "AdagradState",
    "AdamState",
    "ChainState",
    "EmaState",
    "GradientTransform",
    "MomentumState",
    "MultiState",
    "Optimizer",
    "Schedule",
    "SgdState",
    "accumulate",
    "adagrad",
    "adam",
    "adamw",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "decay_labels",
    "exponential_decay",
    "labels_by_field",
    "linear_decay",
    "momentum",
    "multi_optimizer",
    "sgd",
    "start_ema",
    "warmup_cosine_decay",
]

Params = Any
Schedule = Callable[[jax.Array], jax.Array]
_INT32_MAX = 2**31 - 1
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


def _count(value: int) -> float:
    """A schedule's step count as pytree data: a float, so a count beyond int32 (``10**10``
    updates) reaches a program as a number (an int leaf would overflow int32 when traced)."""
    return float(value)


def _show(value: Any) -> str:
    """A step count as it was given: ``10``, not ``10.0`` (a traced count as it is)."""
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _transitions(step: jax.Array | int, every: Any) -> jax.Array:
    """``step // every`` in the default float dtype. An integer step is divided in its own dtype,
    exactly, while ``every`` fits that dtype; a larger ``every`` is never reached (0)."""
    float_ = jnp.result_type(float)
    step, every = jnp.asarray(step), jnp.asarray(every).astype(float_)
    if not jnp.issubdtype(step.dtype, jnp.integer):
        return jnp.floor(step.astype(float_) / every)
    fits = every < float(2 ** (jnp.iinfo(step.dtype).bits - 1))  # a power of two: exact in any float
    whole = step // jnp.where(fits, every, 1).astype(step.dtype)
    return jnp.where(fits, whole, 0).astype(float_)


def _progress(step: jax.Array | int, steps: Any, every: Any) -> jax.Array:
    """Fraction of the transitions done, in the default float dtype."""
    float_ = jnp.result_type(float)
    count = jnp.asarray(steps).astype(float_)
    done: jax.Array = jnp.minimum(_transitions(step, every), count) / count
    return done


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
            f"{_show(self.steps)}, every={_show(self.every)})"
        )


def constant(value: float) -> Schedule:
    """``step -> value``.

    Args:
      value: the learning rate, >= 0.

    Returns:
      The schedule, a value: ``constant(0.1) == constant(0.1)``.
    """
    _checks.real_number("constant", "value", value, low=0.0)
    return _Constant(value=number(value))


def _decay(fn: str, initial: Any, final: Any, steps: Any, every: Any, exponential: bool) -> Schedule:
    _check_schedule(fn, initial, final, steps, every)
    return _Decay(
        initial=number(initial),
        final=number(final),
        steps=_count(steps),
        every=_count(every),
        exponential=exponential,
    )


def linear_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` in equal steps over ``steps`` transitions, then ``final``.

    The transition count is ``update_step // every``: with ``every=batches_per_epoch`` and
    ``steps=epochs - 1`` this is the book's per-epoch ``decay_type="linear"``.

    Args:
      initial: the rate at step 0, > 0.
      final: the rate after ``steps`` transitions, > 0.
      steps: the number of transitions, a positive int.
      every: updates per transition; default ``1``.

    Returns:
      The schedule ``step -> lr``.
    """
    return _decay("linear_decay", initial, final, steps, every, exponential=False)


def exponential_decay(initial: float, final: float, steps: int, *, every: int = 1) -> Schedule:
    """From ``initial`` to ``final`` by a constant factor per transition (book: "exponential").

    Args:
      initial: the rate at step 0, > 0.
      final: the rate after ``steps`` transitions, > 0.
      steps: the number of transitions: the factor is ``(final / initial) ** (1 / steps)``.
      every: updates per transition; default ``1``.

    Returns:
      The schedule ``step -> lr``, ``final`` after ``steps`` transitions.
    """
    return _decay("exponential_decay", initial, final, steps, every, exponential=True)


@_hyperparameters
class _Cosine:
    initial: Any
    final: Any
    steps: Any

    def __call__(self, step: jax.Array) -> jax.Array:
        done = _progress(step, self.steps, 1)
        return jnp.asarray(self.final + (self.initial - self.final) * 0.5 * (1 + jnp.cos(jnp.pi * done)))

    def __repr__(self) -> str:
        return f"cosine_decay({self.initial!r}, {_show(self.steps)}, final={self.final!r})"


@_hyperparameters
class _WarmupCosine:
    initial: Any
    peak: Any
    warmup_steps: Any
    decay_steps: Any
    final: Any

    def __call__(self, step: jax.Array) -> jax.Array:
        float_ = jnp.result_type(float)
        at = jnp.asarray(step).astype(float_)
        warmup, decay = (jnp.asarray(n).astype(float_) for n in (self.warmup_steps, self.decay_steps))
        warm = self.initial + (self.peak - self.initial) * (jnp.minimum(at, warmup) / jnp.maximum(warmup, 1))
        done = _progress(jnp.maximum(at - warmup, 0), decay - warmup, 1)
        cosine = self.final + (self.peak - self.final) * 0.5 * (1 + jnp.cos(jnp.pi * done))
        return jnp.where(at < warmup, warm, cosine)

    def __repr__(self) -> str:
        return (
            f"warmup_cosine_decay({self.initial!r}, {self.peak!r}, {_show(self.warmup_steps)}, "
            f"{_show(self.decay_steps)}, final={self.final!r})"
        )


def cosine_decay(initial: float, steps: int, final: float = 0.0) -> Schedule:
    """From ``initial`` to ``final`` along half a cosine over ``steps`` updates, then ``final``:
    ``final + (initial - final) * (1 + cos(pi * min(step, steps) / steps)) / 2`` (SGDR, Loshchilov
    & Hutter 2017; ``optax.cosine_decay_schedule(initial, steps, alpha=final / initial)``).

    Args:
      initial: the rate at step 0, > 0.
      steps: the updates of the decay, a positive int.
      final: the rate from update ``steps`` on, >= 0; default ``0.0``.

    Returns:
      The schedule ``step -> lr``.
    """
    _checks.real_number("cosine_decay", "initial", initial, low=0.0, low_open=True)
    _checks.real_number("cosine_decay", "final", final, low=0.0)
    steps = _checks.positive_int("cosine_decay", "steps", steps)
    return _Cosine(initial=number(initial), final=number(final), steps=_count(steps))


def warmup_cosine_decay(
    initial: float, peak: float, warmup_steps: int, decay_steps: int, final: float = 0.0
) -> Schedule:
    """A linear warmup from ``initial`` to ``peak`` over ``warmup_steps`` updates, then a cosine
    decay from ``peak`` to ``final`` until update ``decay_steps`` (which counts the warmup, as
    ``optax.warmup_cosine_decay_schedule``'s does), then ``final``.

    Args:
      initial: the rate at step 0, >= 0.
      peak: the rate at the end of the warmup, > 0.
      warmup_steps: the warmup's updates, >= 0.
      decay_steps: the whole schedule's updates, warmup included, > ``warmup_steps``.
      final: the rate from update ``decay_steps`` on, >= 0; default ``0.0``.

    Returns:
      The schedule ``step -> lr``.
    """
    fn = "warmup_cosine_decay"
    _checks.real_number(fn, "initial", initial, low=0.0)
    _checks.real_number(fn, "peak", peak, low=0.0, low_open=True)
    _checks.real_number(fn, "final", final, low=0.0)
    warmup_steps = _checks.positive_int(fn, "warmup_steps", warmup_steps, minimum=0)
    decay_steps = _checks.positive_int(fn, "decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{fn}: decay_steps (the whole schedule, warmup included) must be > warmup_steps "
            f"({warmup_steps}), got {decay_steps}."
        )
    return _WarmupCosine(
        initial=number(initial),
        peak=number(peak),
        warmup_steps=_count(warmup_steps),
        decay_steps=_count(decay_steps),
        final=number(final),
    )


def _learning_rate(fn: str, learning_rate: LearningRate) -> LearningRate:
    if callable(learning_rate):
        return learning_rate
    _checks.real_number(fn, "learning_rate", learning_rate, low=0.0, low_open=True)
    rate: float | jax.Array = number(learning_rate)
    return rate


# --- The shared gradient preprocessing and update -------------------------------------------


def _refuse_state(fn: str, params: Params) -> None:
    """Layer state (BatchNorm's running statistics) is never trained: an optimizer refuses it."""
    if has_state(params):
        raise TypeError(
            f"{fn}: params hold layer state (BatchNorm's running statistics), which no optimizer may "
            "update: optimize the trainable part, trainable, state = funcnet.split_state(params), and put "
            "them back with funcnet.merge_state(new_trainable, new_state) (train_apply returns the new state)."
        )


def _check_trees(fn: str, grads: Params, params: Params) -> None:
    _refuse_state(fn, params)
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


def _wide(param: Any) -> Any:
    """The dtype an optimizer computes and keeps state in for ``param``: its own, at least float32
    (``promote_types(dtype, float32)``, spelled out because strict promotion forbids the call)."""
    dtype = jnp.dtype(jnp.result_type(param))
    return dtype if jnp.issubdtype(dtype, jnp.inexact) and dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _real(dtype: Any) -> Any:
    """The real dtype of ``dtype``'s numbers: float32 for complex64, ``dtype`` itself when real."""
    return jnp.dtype(jnp.finfo(dtype).dtype) if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)


def _abs2(g: jax.Array) -> jax.Array:
    """``|g|**2``, real: ``g * g`` for real ``g``, ``real(conj(g) * g)`` for complex (optax's ``abs_sq``)."""
    return (jnp.conj(g) * g).real if jnp.iscomplexobj(g) else g * g


def _descent(g: jax.Array) -> jax.Array:
    """The direction a gradient step goes against. For a real loss of complex params, ``jax.grad``
    returns the conjugate of the steepest-ascent direction (JAX's convention; PyTorch's autograd and
    optax's optimizers expect the unconjugated one, ``conj(jax.grad(...))``), so it is conjugated."""
    return jnp.conj(g) if jnp.iscomplexobj(g) else g


def _clip_norm(grads: Params, clip_norm: Any) -> Params:
    """Scale ``grads`` down to a global norm of at most ``clip_norm``; the norm in at least float32
    (of ``|g|`` for complex gradients)."""
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        return grads
    dtype = max((_real(_wide(g)) for g in leaves), key=lambda d: d.itemsize)
    # a complex leaf's |g|**2 in its own precision (at least float32), then the norm's
    norm = jnp.sqrt(
        sum(jnp.sum(_abs2(g).astype(dtype) if jnp.iscomplexobj(g) else jnp.square(g.astype(dtype))) for g in leaves)
    )
    limit = jnp.asarray(clip_norm).astype(dtype)
    scale = limit / jnp.maximum(norm, limit)  # min(1, limit / norm), and 1 for a zero gradient
    return _tree_map(lambda g: g * scale.astype(g.dtype), grads)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class _Base:
    """What every optimizer shares: its common arguments, gradient preprocessing, the learning
    rate and the update. Subclasses add their own numbers and ``state``/``rule``."""

    label: ClassVar[str] = ""
    state_type: ClassVar[type] = SgdState
    decoupled: ClassVar[bool] = False  # weight decay added to the update (AdamW), not to the gradient
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
        _refuse_state(self.label, params)
        return self.state_type(jnp.zeros((), jnp.int32), *self.state(params))

    def update(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        _check_trees(self.label, grads, params)
        if self.clip_value is not None:
            for path, p in jax.tree_util.tree_leaves_with_path(params):
                if jnp.iscomplexobj(p):
                    raise TypeError(
                        f"{self.label}: clip_value clips real numbers; params{jax.tree_util.keystr(path)} is "
                        f"{jnp.result_type(p)} (clip_norm, which scales by the norm of |g|, takes complex params)."
                    )
        grads = _tree_map(lambda g, p: _descent(jnp.asarray(g).astype(_wide(p))), grads, params)
        if self.clip_value is not None:
            grads = _tree_map(lambda g: jnp.clip(g, -_as(self.clip_value, g), _as(self.clip_value, g)), grads)
        if self.clip_norm is not None:
            grads = _clip_norm(grads, self.clip_norm)
        if self.weight_decay is not None and not self.decoupled:
            grads = _tree_map(lambda g, p: g + _as(self.weight_decay, g) * p.astype(g.dtype), grads, params)
        rate = jnp.asarray(self.learning_rate(state.step) if callable(self.learning_rate) else self.learning_rate)
        updates, trees = self.rule(grads, state, rate)
        if self.weight_decay is not None and self.decoupled:  # AdamW: lr * (step + weight_decay * p)
            updates = _tree_map(
                lambda u, p: u + _as(rate, u) * _as(self.weight_decay, u) * p.astype(u.dtype), updates, params
            )
        new_params = _tree_map(lambda p, u: (p.astype(u.dtype) - u).astype(p.dtype), params, updates)
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


def _zeros_like(params: Params, real: bool = False) -> Params:
    """Zeros for optimizer state: each param's shape, in at least float32 (``real``: the real dtype
    of a complex param's, for sums of ``|g|**2``)."""
    return _tree_map(lambda p: jnp.zeros(jnp.shape(p), _real(_wide(p)) if real else _wide(p)), params)


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
        return (_zeros_like(params, real=True),)

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        sum_square = _tree_map(lambda s, g: s + _as(self.eps, s) + _abs2(g), state.sum_square, grads)
        return _tree_map(lambda s, g: (_as(lr, s) / jnp.sqrt(s)).astype(g.dtype) * g, sum_square, grads), (sum_square,)


def _bias_corrections(b1: jax.Array, b2: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adam's ``1 - b1**t`` (first moment) and ``1 - b2**t`` (second), in ``t``'s dtype."""
    return 1 - b1.astype(t.dtype) ** t, 1 - b2.astype(t.dtype) ** t


@_hyperparameters
class _Adam(_Base):
    label = "adam"
    state_type = AdamState
    b1: Any
    b2: Any
    eps: Any

    def state(self, params: Params) -> tuple[Any, ...]:
        return _zeros_like(params), _zeros_like(params, real=True)  # nu: a mean of |g|**2, real

    def rule(self, grads: Params, state: Any, lr: jax.Array) -> tuple[Params, tuple[Any, ...]]:
        b1, b2 = jnp.asarray(self.b1), jnp.asarray(self.b2)
        t = (state.step + 1).astype(jnp.result_type(float))
        mu = _tree_map(lambda m, g: _as(b1, m) * m + _as(1 - b1, g) * g, state.mu, grads)
        nu = _tree_map(
            lambda v, g: (
                _as(b2, v) * v + (_as(1 - b2, v) * _abs2(g) if jnp.iscomplexobj(g) else _as(1 - b2, g) * g * g)
            ),
            state.nu,
            grads,
        )
        c1, c2 = _bias_corrections(b1, b2, t)
        updates = _tree_map(
            lambda m, v: _as(lr, m) * (m / _as(c1, m)) / (jnp.sqrt(v / _as(c2, v)) + _as(self.eps, v)).astype(m.dtype),
            mu,
            nu,
        )
        return updates, (mu, nu)


def sgd(
    learning_rate: LearningRate,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """``p = p - lr * g``. Book: SGD.

    Args:
      learning_rate: a number, a scalar array (traced is fine) or a schedule ``step -> lr``.
      weight_decay: L2 decay, ``g + weight_decay * p``; default ``0.0``.
      clip_norm: scale the gradient tree down to at most this global norm, or None.
      clip_value: clip each gradient entry to ``[-clip_value, clip_value]``, or None.

    Returns:
      The ``Optimizer``; its state is the update count.
    """
    return _Sgd(**_common("sgd", learning_rate, weight_decay, clip_norm, clip_value)).optimizer()


def momentum(
    learning_rate: LearningRate,
    momentum: float = 0.9,
    *,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """``v = momentum * v + lr * g; p = p - v`` (the book's form). Book: SGDMomentum.

    Args:
      learning_rate: a number, a scalar array or a schedule ``step -> lr``.
      momentum: the velocity's decay, in ``[0, 1)``; default ``0.9``.
      weight_decay: L2 decay, ``g + weight_decay * p``; default ``0.0``.
      clip_norm: scale the gradient tree down to at most this global norm, or None.
      clip_value: clip each gradient entry to ``[-clip_value, clip_value]``, or None.

    Returns:
      The ``Optimizer``; its state holds the velocity ``v``.
    """
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
    """``s = s + eps + g**2; p = p - lr / sqrt(s) * g`` (the book's AdaGrad).

    Args:
      learning_rate: a number, a scalar array or a schedule ``step -> lr``.
      eps: added to the sum each step, > 0; default ``1e-7``.
      weight_decay: L2 decay, ``g + weight_decay * p``; default ``0.0``.
      clip_norm: scale the gradient tree down to at most this global norm, or None.
      clip_value: clip each gradient entry to ``[-clip_value, clip_value]``, or None.

    Returns:
      The ``Optimizer``; its state holds the sums ``s``.
    """
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
    """Adam (Kingma & Ba, 2015) with bias correction.

    Args:
      learning_rate: a number, a scalar array or a schedule ``step -> lr``; default ``1e-3``.
      b1: the first moment's decay, in ``[0, 1)``; default ``0.9``.
      b2: the second moment's decay, in ``[0, 1)``; default ``0.999``.
      eps: added to the second moment's root, > 0; default ``1e-8``.
      weight_decay: L2 decay added to the gradient, ``g + weight_decay * p`` (``adamw``
        decouples it); default ``0.0``.
      clip_norm: scale the gradient tree down to at most this global norm, or None.
      clip_value: clip each gradient entry to ``[-clip_value, clip_value]``, or None.

    Returns:
      The ``Optimizer``; its state holds both moments.
    """
    return _adam_like(_Adam, learning_rate, b1, b2, eps, weight_decay, clip_norm, clip_value)


def _adam_like(
    kind: type[_Adam],
    learning_rate: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip_norm: float | None,
    clip_value: float | None,
) -> Optimizer:
    """``adam``'s and ``adamw``'s checks and spec (``kind.label`` names the function in errors)."""
    name = kind.label
    _checks.real_number(name, "b1", b1, low=0.0, high=1.0, high_open=True)
    _checks.real_number(name, "b2", b2, low=0.0, high=1.0, high_open=True)
    _checks.real_number(name, "eps", eps, low=0.0, low_open=True)
    return kind(
        b1=number(b1),
        b2=number(b2),
        eps=number(eps),
        **_common(name, learning_rate, weight_decay, clip_norm, clip_value),
    ).optimizer()


@_hyperparameters
class _AdamW(_Adam):
    label = "adamw"
    decoupled = True


def adamw(
    learning_rate: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay,
    ``p = p - lr * (adam_step + weight_decay * p)``; ``optax.adamw``'s rule.

    Args:
      learning_rate: a number, a scalar array or a schedule ``step -> lr``; default ``1e-3``.
      b1: the first moment's decay, in ``[0, 1)``; default ``0.9``.
      b2: the second moment's decay, in ``[0, 1)``; default ``0.999``.
      eps: added to the second moment's root, > 0; default ``1e-8``.
      weight_decay: the decoupled decay, scaled by the learning rate; default ``1e-4``.
      clip_norm: scale the gradient tree down to at most this global norm, or None.
      clip_value: clip each gradient entry to ``[-clip_value, clip_value]``, or None.

    Returns:
      The ``Optimizer``; its state holds both moments.
    """
    return _adam_like(_AdamW, learning_rate, b1, b2, eps, weight_decay, clip_norm, clip_value)


def _name(optimizer: Optimizer | GradientTransform | None) -> str:
    """``adam(...)`` for a funcnet optimizer (its spec's repr), else the pair's repr."""
    init = getattr(optimizer, "init", None)
    return repr(init.owner) if isinstance(init, Method) else repr(optimizer)


# --- Wrappers: gradient accumulation, parameter groups, parameter averaging --------------------


class AccumulateState(NamedTuple):
    step: jax.Array  # calls to update
    mini_step: jax.Array  # calls since the last update of the wrapped optimizer
    grads: Params  # the mean gradient of those calls, in at least float32
    inner: Any  # the wrapped optimizer's state


def _check_optimizer(fn: str, name: str, optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{fn}: {name} must be an Optimizer(init, update), e.g. funcnet.adam(1e-3), got {type(optimizer).__name__}."
        )


@_hyperparameters
class _Accumulate:
    optimizer: Optimizer
    steps: Any

    def init(self, params: Params) -> AccumulateState:
        zero = jnp.zeros((), jnp.int32)
        return AccumulateState(zero, zero, _zeros_like(params), self.optimizer.init(params))

    def update(self, grads: Params, state: AccumulateState, params: Params) -> tuple[Params, AccumulateState]:
        _check_trees("accumulate", grads, params)
        seen = state.mini_step + 1
        # the running mean in Welford's form, as optax.MultiSteps keeps it
        mean = _tree_map(
            lambda a, g: a + (jnp.asarray(g).astype(a.dtype) - a) / seen.astype(a.dtype), state.grads, grads
        )
        apply = seen >= self.steps

        def step(_: None) -> tuple[Params, Any]:
            new_params, inner = self.optimizer.update(
                _tree_map(lambda m, g: m.astype(jnp.result_type(g)), mean, grads), state.inner, params
            )
            return _tree_map(lambda n, p: n.astype(jnp.result_type(p)), new_params, params), inner

        new_params, inner = lax.cond(apply, step, lambda _: (params, state.inner), None)
        return new_params, AccumulateState(
            state.step + 1,
            jnp.where(apply, 0, seen).astype(jnp.int32),
            _tree_map(lambda m: jnp.where(apply, jnp.zeros_like(m), m), mean),
            inner,
        )

    def __repr__(self) -> str:
        return f"accumulate({_name(self.optimizer)}, {self.steps!r})"


def accumulate(optimizer: Optimizer, steps: int) -> Optimizer:
    """Gradient accumulation: average the gradients of ``steps`` consecutive calls and apply
    ``optimizer`` to their mean on every ``steps``-th call; the params stay as they are in
    between (``optax.MultiSteps``). The wrapped optimizer counts its own updates, so its
    schedule's ``step`` advances once per ``steps`` calls. ``steps`` is traced (a sweep over it
    compiles once).

    Args:
      optimizer: the ``Optimizer`` to apply to the mean gradient.
      steps: the calls per update, a positive int.

    Returns:
      An ``Optimizer`` whose ``update`` returns the params unchanged but on every
      ``steps``-th call.
    """
    _check_optimizer("accumulate", "optimizer", optimizer)
    steps = _checks.positive_int("accumulate", "steps", steps)
    if steps > _INT32_MAX:
        raise ValueError(f"accumulate: steps must be <= {_INT32_MAX} (the calls are counted in int32), got {steps}.")
    spec = _Accumulate(optimizer=optimizer, steps=steps)
    return Optimizer(Method(spec, "init"), Method(spec, "update"))


class MultiState(NamedTuple):
    step: jax.Array
    states: dict[str, Any]  # each trained group's optimizer state over its own params


Labels = Any  # a pytree of group names with the params' structure, or ``path -> name``


@_hyperparameters
class _Multi:
    groups: tuple[tuple[str, Optimizer | None], ...]
    # ((param path, group), ...) for a tree of labels, or a function of a param's key path
    labels: Any = dataclasses.field(metadata={"static": True})

    def names(self, params: Params) -> list[str]:
        """Each param leaf's group name, in ``tree_leaves`` order."""
        paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        groups = [name for name, _ in self.groups]
        if callable(self.labels):
            names = [self.labels(path) for path in paths]
            for path, name in zip(paths, names, strict=True):
                if name not in groups:
                    raise ValueError(
                        f"multi_optimizer: labels(path) must return one of the groups {groups}, got {name!r} "
                        f"for params{jax.tree_util.keystr(path)}."
                    )
            return names
        expected = [path for path, _ in self.labels]
        got = [jax.tree_util.keystr(path) for path in paths]
        if got != expected:
            raise TypeError(
                f"multi_optimizer: labels must have the params' structure: labels name the params "
                f"{expected}, got params {got}. The optimizer is given the trainable params, "
                f"funcnet.split_state(params)[0], as fit and train_step hand them (layer state such as "
                f"BatchNorm's statistics is not trained: labels given for it are left out)."
            )
        return [name for _, name in self.labels]

    def masked(self, tree: Params, names: list[str], group: str) -> Params:
        """``tree`` with the leaves of other groups replaced by ``None`` (an empty subtree)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return jax.tree_util.tree_unflatten(
            treedef, [leaf if name == group else None for leaf, name in zip(leaves, names, strict=True)]
        )

    def init(self, params: Params) -> MultiState:
        names = self.names(params)
        states = {
            group: optimizer.init(self.masked(params, names, group))
            for group, optimizer in self.groups
            if optimizer is not None
        }
        return MultiState(jnp.zeros((), jnp.int32), states)

    def update(self, grads: Params, state: MultiState, params: Params) -> tuple[Params, MultiState]:
        _check_trees("multi_optimizer", grads, params)
        names = self.names(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        states = {}
        for group, optimizer in self.groups:
            if optimizer is None:
                continue  # frozen: unchanged, no state
            new, states[group] = optimizer.update(
                self.masked(grads, names, group), state.states[group], self.masked(params, names, group)
            )
            places = iter(i for i, name in enumerate(names) if name == group)
            for leaf in jax.tree_util.tree_leaves(new):
                leaves[next(places)] = leaf
        return jax.tree_util.tree_unflatten(treedef, leaves), MultiState(state.step + 1, states)

    def __repr__(self) -> str:
        groups = ", ".join(f"{group!r}: {_name(optimizer)}" for group, optimizer in self.groups)
        labels = self.labels if callable(self.labels) else dict(self.labels)
        return f"multi_optimizer({{{groups}}}, {labels!r})"


def multi_optimizer(optimizers: dict[str, Optimizer | None], labels: Labels) -> Optimizer:
    """Parameter groups: each param is trained by the optimizer of its group, or not at all.

    Args:
      optimizers: ``{group name: optimizer or None}``; ``None`` freezes the group (its params
        never change and hold no state; ``optax.set_to_zero()``).
      labels: each param's group name, as a pytree of strings with the params' structure (e.g.
        ``jax.tree_util.tree_map(lambda _: "head", params)``, edited; the labels of layer state,
        such as BatchNorm's statistics, are left out, since the optimizer is given
        ``funcnet.split_state(params)[0]``, so a tree over the whole params or over the
        trainable ones both fit), or a function called
        with each param's key path (as ``jax.tree_util.tree_map_with_path`` passes it) that
        returns its group name. A function is compared by identity. ``labels_by_field``
        builds the tree from the params' field names, ``decay_labels`` the weight-decay groups
        (``"decay"``: the weights; ``"no_decay"``: biases, norms).

    Each group's optimizer sees only its own params (the others are ``None``): its clipping
    norm and state cover that group alone, as in ``optax.multi_transform``. For one global norm
    over every group, ``chain(clip_by_global_norm(max_norm), multi_optimizer(...))``.

    Returns:
      An ``Optimizer`` over the whole params, its state each trained group's state.
    """
    fn = "multi_optimizer"
    if not isinstance(optimizers, dict) or not optimizers:
        raise TypeError(
            f"{fn}: optimizers must be a non-empty dict from group name to Optimizer or None, got "
            f"{type(optimizers).__name__} {optimizers!r}."
        )
    for name, optimizer in optimizers.items():
        if not isinstance(name, str):
            raise TypeError(f"{fn}: optimizers' group names must be strings, got {name!r}.")
        if optimizer is not None:
            _check_optimizer(fn, f"optimizers[{name!r}]", optimizer)
    if not callable(labels):
        # labels of layer state (a tree_map over the whole params labels BatchNorm's statistics
        # too) are left out, as split_state leaves the state out of what the optimizer sees
        pairs = [
            (path, name)
            for path, name in jax.tree_util.tree_leaves_with_path(labels, is_leaf=_is_state)
            if not _is_state(name)
        ]
        for path, name in pairs:
            if not isinstance(name, str) or name not in optimizers:
                raise ValueError(
                    f"{fn}: labels{jax.tree_util.keystr(path)} must name a group of optimizers "
                    f"{sorted(optimizers)}, got {name!r}."
                )
        labels = tuple((jax.tree_util.keystr(path), name) for path, name in pairs)
    spec = _Multi(groups=tuple(sorted(optimizers.items())), labels=labels)
    return Optimizer(Method(spec, "init"), Method(spec, "update"))


# --- Parameter groups by what a parameter is: its field name, not its rank ---------------------


def _field(key: Any) -> str | None:
    """The name a key path's last key gives its leaf: a ``NamedTuple``'s field, a dict's key."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    return None  # a tuple's or list's position, a custom node's flattened index: no name


def _parent_type(params: Params, path: tuple[Any, ...]) -> str | None:
    """The class name of the node holding the leaf at ``path`` (``DenseParams``), if it can be found."""
    node = params
    for key in path[:-1]:
        if isinstance(key, jax.tree_util.GetAttrKey):
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
        else:  # a custom node's flattened index: no way back to the child
            return None
    return type(node).__name__


def _is_state(node: Any) -> bool:
    from funcnet.state import is_state  # deferred: the optimizers need nothing else from the layers

    return is_state(node)


def labels_by_field(params: Params, fields: dict[str, str], *, default: str | None = None) -> Params:
    """``multi_optimizer``'s labels chosen by what each parameter is: its field name.

    Args:
      params: the network's params (e.g. ``net.init(key, shape)[1]``); only their structure is read.
      fields: ``{pattern: group}``. A pattern is a field name (``"W"``, ``"gamma"``), or a class
        name and a field (``"EmbeddingParams.W"``), either with ``fnmatch`` wildcards (``"W_*"``,
        ``"*Embedding*.W"``). A leaf's field is its ``NamedTuple`` field (``DenseParams.W``) or
        its dict key; a leaf in a plain tuple or list has none. The patterns with a class name
        are tried first, then the others, each kind in the dict's order; the first match names
        the leaf's group.
      default: the group of a leaf no pattern matches; without it such a leaf is a ``ValueError``
        naming its path, so a parameter never lands in a group by accident.

    Returns:
      A tree of group names with the params' structure, ``None`` in place of layer state
      (BatchNorm's statistics, which no optimizer sees), ready for ``multi_optimizer``. Equal
      structures give equal labels, so equal ``multi_optimizer`` calls stay equal values.

    funcnet's params name their fields: weights ``W`` (``Dense``, ``Conv2D``, ``RNN``, and the
    embeddings' tables ``EmbeddingParams.W``, ``PositionalEmbeddingParams.W``) and ``W_*``
    (attention's ``W_q``, ``W_k``, ``W_v``, ``W_o``; LSTM's and GRU's gates), biases ``B`` and
    ``B_*`` (shape ``(1, n)``: a rule by rank would take them for matrices), norms ``gamma`` and
    ``beta``. ``decay_labels`` is the weight-decay recipe built on this.
    """
    fn = "labels_by_field"
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise TypeError(f"{fn}: fields must be a dict from field pattern to group name (str to str), got {fields!r}.")
    if default is not None and not isinstance(default, str):
        raise TypeError(f"{fn}: default must be a group name (str) or None, got {type(default).__name__}.")
    qualified = [(pattern, group) for pattern, group in fields.items() if "." in pattern]
    plain = [(pattern, group) for pattern, group in fields.items() if "." not in pattern]

    def label(path: tuple[Any, ...], leaf: Any) -> str | None:
        if _is_state(leaf):
            return None
        field = _field(path[-1]) if path else None
        owner = _parent_type(params, path) if field is not None else None
        for patterns, name in ((qualified, f"{owner}.{field}" if owner else None), (plain, field)):
            for pattern, group in patterns:
                if name is not None and fnmatch.fnmatchcase(name, pattern):
                    return group
        if default is None:
            where = f" ({owner}.{field})" if owner else ""
            raise ValueError(
                f"{fn}: params{jax.tree_util.keystr(path)}{where} matches none of the fields "
                f"{list(fields)}; add its field or pass default=."
            )
        return default

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_state)


_EMBEDDINGS = ("EmbeddingParams.W", "PositionalEmbeddingParams.W")


def decay_labels(params: Params, *, embeddings: bool = True) -> Params:
    """Weight-decay groups by what a parameter is: ``"decay"`` for the weights, ``"no_decay"``
    for the rest, as labels for ``multi_optimizer``.

    Weights are the fields named ``W`` or ``W_*`` (``Dense``, attention's ``W_q``/``W_k``/``W_v``/
    ``W_o``, convolution and recurrent kernels, and the embedding tables); biases (``B``,
    ``B_*``), norms (``gamma``, ``beta``) and any other field are not decayed. This is nanoGPT's
    rule (decay the matrices, embeddings included; not the biases or LayerNorm's weights), written
    by name because funcnet's biases are ``(1, n)`` matrices. ``embeddings=False`` keeps the
    embedding tables (``EmbeddingParams.W``, ``PositionalEmbeddingParams.W``) out of the decay.

    The nanoGPT optimizer::

        labels = decay_labels(params)
        optimizer = chain(
            clip_by_global_norm(1.0),
            multi_optimizer(
                {"decay": adamw(schedule, 0.9, 0.95, weight_decay=0.1),
                 "no_decay": adamw(schedule, 0.9, 0.95, weight_decay=0.0)},
                labels,
            ),
        )

    (``labels_by_field(params, {...}, default=...)`` spells other rules.)

    Args:
      params: the network's params; only their structure is read.
      embeddings: decay the embedding tables too (nanoGPT does); default ``True``.

    Returns:
      A tree of ``"decay"``/``"no_decay"`` with the params' structure, for ``multi_optimizer``.
    """
    if not isinstance(embeddings, bool):
        raise TypeError(f"decay_labels: embeddings must be a bool, got {type(embeddings).__name__}.")
    excluded = {} if embeddings else dict.fromkeys(_EMBEDDINGS, "no_decay")
    return labels_by_field(params, {**excluded, "W": "decay", "W_*": "decay"}, default="no_decay")


# --- Gradient transforms before an optimizer: global-norm clipping, chain ----------------------


class GradientTransform(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params) -> (new_grads, new_state)``:
    a step that changes the gradients before an optimizer uses them (see ``chain``)."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


class ChainState(NamedTuple):
    """``chain``'s optimizer state: the update count, each gradient transform's state, and the
    optimizer's."""

    step: jax.Array
    transforms: tuple[Any, ...]  # each gradient transform's state, in order
    inner: Any  # the optimizer's state


@_hyperparameters
class _ClipByGlobalNorm:
    max_norm: Any

    def init(self, params: Params) -> tuple[()]:
        del params
        return ()

    def update(self, grads: Params, state: tuple[()], params: Params) -> tuple[Params, tuple[()]]:
        _check_trees("clip_by_global_norm", grads, params)
        grads = _tree_map(lambda g, p: jnp.asarray(g).astype(_wide(p)), grads, params)
        return _clip_norm(grads, self.max_norm), state

    def __repr__(self) -> str:
        return f"clip_by_global_norm({self.max_norm!r})"


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Scale the whole gradient tree down to a global norm of at most ``max_norm``:
    ``g * max_norm / max(norm, max_norm)`` with ``norm = sqrt(sum of every leaf's squares)``
    (``optax.clip_by_global_norm``; ``torch.nn.utils.clip_grad_norm_`` without its eps).

    The norm is computed in at least float32 and the gradients come back in their optimizer's
    precision (the params' dtype, at least float32), so a low-precision update is still rounded
    once. Before ``multi_optimizer``, ``chain(clip_by_global_norm(1.0), multi_optimizer(...))``
    clips by the norm over all groups together, as nanoGPT does; an optimizer's own
    ``clip_norm=`` inside a group covers that group alone. ``max_norm`` is traced (a sweep over
    it compiles once); a traced value is not checked.

    Args:
      max_norm: the largest global norm, > 0.

    Returns:
      A ``GradientTransform`` (no state of its own), for ``chain``.
    """
    _checks.real_number("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True)
    spec = _ClipByGlobalNorm(max_norm=number(max_norm))
    return GradientTransform(Method(spec, "init"), Method(spec, "update"))


@_hyperparameters
class _Chain:
    transforms: tuple[GradientTransform, ...]
    optimizer: Optimizer

    def init(self, params: Params) -> ChainState:
        states = tuple(transform.init(params) for transform in self.transforms)
        return ChainState(jnp.zeros((), jnp.int32), states, self.optimizer.init(params))

    def update(self, grads: Params, state: ChainState, params: Params) -> tuple[Params, ChainState]:
        _check_trees("chain", grads, params)
        states = []
        for transform, transform_state in zip(self.transforms, state.transforms, strict=True):
            grads, transform_state = transform.update(grads, transform_state, params)
            states.append(transform_state)
        new_params, inner = self.optimizer.update(grads, state.inner, params)
        return new_params, ChainState(state.step + 1, tuple(states), inner)

    def __repr__(self) -> str:
        return f"chain({', '.join([*map(_name, self.transforms), _name(self.optimizer)])})"


def chain(*parts: GradientTransform | Optimizer) -> Optimizer:
    """``chain(*transforms, optimizer)``: the optimizer, fed the gradients as the transforms
    leave them, in order (``optax.chain(*transforms, optimizer)``).

    The result is an ``Optimizer`` whose state is ``ChainState(step, transforms, inner)``, so it
    goes wherever an optimizer does: ``fit``, ``accumulate``, a group of ``multi_optimizer``.
    Mind the order with ``accumulate``: ``accumulate(chain(clip_by_global_norm(1.0), adam(...)),
    k)`` clips the mean gradient of ``k`` calls (nanoGPT's order, and ``optax.MultiSteps``'s),
    ``chain(clip_by_global_norm(1.0), accumulate(adam(...), k))`` each call's gradient.

    Args:
      *parts: zero or more ``GradientTransform``s, then one ``Optimizer``.

    Returns:
      An ``Optimizer`` with state ``ChainState(step, transforms, inner)``.
    """
    fn = "chain"
    if not parts:
        raise TypeError(f"{fn}: give the gradient transforms and then an Optimizer, got nothing.")
    *transforms, optimizer = parts
    for i, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransform):
            raise TypeError(
                f"{fn}: every argument before the last must be a GradientTransform, e.g. "
                f"clip_by_global_norm(1.0), got {type(transform).__name__} at position {i}."
            )
    _check_optimizer(fn, "the last argument", optimizer)
    spec = _Chain(transforms=tuple(transforms), optimizer=optimizer)  # type: ignore[arg-type]  # checked above
    return Optimizer(Method(spec, "init"), Method(spec, "update"))


class EmaState(NamedTuple):
    """What ``fit(..., ema_decay=d)`` keeps as its optimizer state (and returns as
    ``FitResult.opt_state``, so ``fit(..., opt_state=result.opt_state, start_epoch=...)`` continues
    the average): the optimizer's own state, the params' exponential moving average (in at least
    float32) and the average's total weight. A debiased average starts at zeros with weight 0, and
    after ``t`` optimizer updates its weight is ``1 - d**t``; one started from the params has
    weight 1 throughout. The averaged params are ``ema / weight`` (``ema_params``)."""

    inner: Any
    ema: Params
    weight: jax.Array


def _applied(state: Any) -> jax.Array | None:
    """Whether the update that returned ``state`` was one of the optimizer's own updates (a
    traced bool), where a wrapper says so: ``accumulate`` only averages the gradients of the calls
    in between. ``None``: every call updates."""
    if isinstance(state, AccumulateState):
        return state.mini_step == 0
    if isinstance(state, ChainState | EmaState):
        return _applied(state.inner)
    if isinstance(state, MultiState):  # an update when any group updated; a group of every call: always
        flags = [_applied(group) for group in state.states.values()]
        known = [flag for flag in flags if flag is not None]
        if known and len(known) == len(flags):
            return functools.reduce(lambda a, b: jnp.logical_or(a, b), known)
    return None


@_hyperparameters
class _Ema:
    optimizer: Optimizer
    decay: Any
    debias: bool = dataclasses.field(default=True, metadata={"static": True})

    def init(self, params: Params) -> EmaState:
        return start_ema(self.optimizer.init(params), params, debias=self.debias)

    def update(self, grads: Params, state: EmaState, params: Params) -> tuple[Params, EmaState]:
        new_params, inner = self.optimizer.update(grads, state.inner, params)
        ema = _tree_map(
            lambda e, p: _as(self.decay, e) * e + _as(1 - jnp.asarray(self.decay), e) * p.astype(e.dtype),
            state.ema,
            new_params,
        )
        # the same update of the weight, as w + (1 - d) (1 - w): a weight of 1 stays exactly 1
        weight = state.weight + _as(1 - jnp.asarray(self.decay), state.weight) * (1 - state.weight)
        applied = _applied(inner)
        if applied is not None:  # accumulate's calls in between leave the average as it is
            ema = _tree_map(lambda new, old: jnp.where(applied, new, old), ema, state.ema)
            weight = jnp.where(applied, weight, state.weight)
        return new_params, EmaState(inner, ema, weight)

    def __repr__(self) -> str:
        return f"with_ema({_name(self.optimizer)}, {self.decay!r}, debias={self.debias!r})"


def with_ema(optimizer: Optimizer, decay: Any, *, debias: bool = True) -> Optimizer:
    """``optimizer``, also keeping the params' moving average ``ema = decay * ema + (1 - decay) *
    params`` after each of its updates (``fit(..., ema_decay=..., ema_debias=...)``'s). Under
    ``accumulate`` (also inside ``chain`` or every group of ``multi_optimizer``) the average moves
    once per update of the wrapped optimizer, as its schedule does, not at every call.

    ``debias=True`` is ``optax.ema(decay, debias=True)``: the average starts at zero and is read
    as ``ema / (1 - decay**t)`` after ``t`` updates, an average of the trained params alone;
    ``debias=False`` starts it from the initial params (which then keep weight ``decay**t``)."""
    if not isinstance(debias, bool):
        raise TypeError(f"with_ema: debias must be a bool, got {type(debias).__name__}.")
    spec = _Ema(optimizer=optimizer, decay=number(decay), debias=debias)
    return Optimizer(Method(spec, "init"), Method(spec, "update"))


def start_ema(opt_state: Any, params: Params, *, debias: bool = True) -> EmaState:
    """A new moving average of ``params`` around an optimizer's state: the ``opt_state`` that
    ``fit(..., ema_decay=..., opt_state=...)`` takes to begin an average at a hand resume, as a
    fresh ``fit`` begins one (to continue an average, pass the ``FitResult.opt_state`` of the run
    that kept it). ``params`` are the network's (layer state is left out, as the optimizer's
    ``opt_state`` leaves it out); ``debias`` as ``fit``'s ``ema_debias``.

    Args:
      opt_state: the optimizer's own state.
      params: the network's params, the average's start.
      debias: start a debiased average (zeros, weight 0) rather than the params themselves
        (weight 1); default ``True``.

    Returns:
      ``EmaState(opt_state, ema, weight)``.
    """
    if not isinstance(debias, bool):
        raise TypeError(f"start_ema: debias must be a bool, got {type(debias).__name__}.")
    from funcnet.state import split_state  # deferred: the optimizers need nothing else from the layers

    trainable = split_state(params)[0]
    wide = _tree_map(lambda p: jnp.asarray(p).astype(_wide(p)), trainable)
    dtypes = [_real(e.dtype) for e in jax.tree_util.tree_leaves(wide)]
    weight_dtype = max(dtypes, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))
    if debias:
        return EmaState(opt_state, _tree_map(jnp.zeros_like, wide), jnp.zeros((), weight_dtype))
    return EmaState(opt_state, wide, jnp.ones((), weight_dtype))


def ema_params(state: EmaState, like: Params) -> Params:
    """The averaged params of a ``with_ema`` state, ``ema / weight``, in ``like``'s dtypes (``like``
    itself before the first update of a debiased average, whose weight is still 0)."""
    started = state.weight > 0
    divisor = jnp.where(started, state.weight, 1)
    return _tree_map(
        lambda e, p: jnp.where(started, e / divisor.astype(e.dtype), jnp.asarray(p).astype(e.dtype)).astype(
            jnp.result_type(p)
        ),
        state.ema,
        like,
    )
