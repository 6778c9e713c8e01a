"""The params' moving average of ``fit(..., ema_decay=d)``: once per optimizer update, debiased
(``optax.ema(d, debias=True)``) or started from the initial params, and carried by a resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn
from funcnet.optimizers import EmaState, ema_params, start_ema, with_ema

rng = np.random.default_rng(11)
X = rng.standard_normal((64, 5))
Y = np.stack([X[:, 0] - X[:, 1], np.tanh(X[:, 2])], axis=1)
NET = fn.serial(fn.Dense(8, fn.tanh), fn.Dense(2, fn.linear))
PARAMS = NET.init(jax.random.PRNGKey(0), (-1, 5))[1]
KEY = jax.random.PRNGKey(2)
BATCH = 8


def _fit(optimizer, params=PARAMS, **kw):
    return fn.fit(
        NET,
        fn.mean_squared_error,
        optimizer,
        params,
        (X, Y),
        epochs=kw.pop("epochs", 3),
        batch_size=BATCH,
        key=KEY,
        **kw,
    )


def _hand_average(optimizer, d, debias, *, epochs=3, every=1):
    """The same unshuffled steps by ``train_step``, the average in NumPy over the params after every
    ``every``-th call (the optimizer's own updates): debiased, or from the initial params."""
    step = jax.jit(fn.train_step(NET, fn.mean_squared_error, optimizer))
    params, state = PARAMS, optimizer.init(PARAMS)
    ema = jax.tree_util.tree_map(lambda p: np.zeros_like(p) if debias else np.asarray(p), PARAMS)
    weight, calls = (0.0 if debias else 1.0), 0
    for _ in range(epochs):
        for b in range(len(X) // BATCH):
            rows = slice(BATCH * b, BATCH * b + BATCH)
            params, state, _ = step(params, state, X[rows], Y[rows], None)
            calls += 1
            if calls % every == 0:
                ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema, params)
                weight = d * weight + (1 - d)
    return jax.tree_util.tree_map(lambda e: e / weight, ema)


def _close(got, want, rtol=1e-10):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol), got, want)


# --- 3. With accumulate(opt, k) the average moves once per optimizer update, not per call -------


@pytest.mark.parametrize("wrap", ["accumulate", "chain(clip, accumulate)"])
def test_with_accumulate_the_average_moves_once_per_optimizer_update(wrap):
    d, k = 0.8, 4
    inner = fn.accumulate(fn.momentum(0.05, 0.9), k)
    if wrap != "accumulate":
        inner = fn.chain(fn.optimizers.clip_by_global_norm(10.0), inner)
    for debias in (False, True):
        result = _fit(inner, shuffle=False, ema_decay=d, ema_debias=debias)
        _close(result.ema_params, _hand_average(inner, d, debias, every=k))


# --- 4. Resuming by hand carries the average ------------------------------------------------------


def test_resuming_by_hand_from_a_fit_result_continues_the_average():
    optimizer = fn.adamw(0.01)
    for debias in (False, True):
        whole = _fit(optimizer, epochs=4, ema_decay=0.9, ema_debias=debias)
        first = _fit(optimizer, epochs=2, ema_decay=0.9, ema_debias=debias)
        assert isinstance(first.opt_state, EmaState)  # the optimizer's state and the average
        resumed = _fit(
            optimizer,
            first.params,
            epochs=4,
            opt_state=first.opt_state,
            start_epoch=2,
            ema_decay=0.9,
            ema_debias=debias,
        )
        for got, want in ((resumed.params, whole.params), (resumed.ema_params, whole.ema_params)):
            _close(got, want, rtol=1e-12)
        _close(resumed.opt_state, whole.opt_state, rtol=1e-12)


def test_resuming_an_average_without_it_or_it_without_ema_decay_is_refused_with_the_fix():
    optimizer = fn.sgd(0.05)
    plain = _fit(optimizer, epochs=1)
    averaged = _fit(optimizer, epochs=1, ema_decay=0.9)
    with pytest.raises(ValueError, match=r"fit: opt_state holds no moving average.*FitResult\.opt_state.*start_ema"):
        _fit(optimizer, plain.params, epochs=2, opt_state=plain.opt_state, start_epoch=1, ema_decay=0.9)
    with pytest.raises(
        ValueError, match=r"fit: opt_state holds a moving average \(an EmaState.*ema_decay is None.*opt_state\.inner"
    ):
        _fit(optimizer, averaged.params, epochs=2, opt_state=averaged.opt_state, start_epoch=1)
    # the fixes the messages name: a new average from these params, or the optimizer's state alone
    restarted = _fit(
        optimizer,
        plain.params,
        epochs=2,
        opt_state=start_ema(plain.opt_state, plain.params),
        start_epoch=1,
        ema_decay=0.9,
    )
    fresh = _fit(optimizer, plain.params, epochs=2, opt_state=plain.opt_state, start_epoch=1)
    _close(restarted.params, fresh.params, rtol=1e-12)
    _fit(optimizer, averaged.params, epochs=2, opt_state=averaged.opt_state.inner, start_epoch=1)


def test_start_ema_equals_the_average_fit_starts_itself():
    optimizer = fn.adam(0.01)
    trainable = fn.split_state(PARAMS)[0]
    for debias in (False, True):
        fresh = _fit(optimizer, ema_decay=0.7, ema_debias=debias)
        given = _fit(
            optimizer,
            opt_state=start_ema(optimizer.init(trainable), PARAMS, debias=debias),
            ema_decay=0.7,
            ema_debias=debias,
        )
        jax.tree_util.tree_map(np.testing.assert_array_equal, given, fresh)


# --- 5. A debiased average (optax.ema(decay, debias=True)), the default ------------------------------


def test_the_debiased_average_equals_optax_ema_with_debias():
    optax = pytest.importorskip("optax")
    d = 0.9
    params = {"W": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.asarray(rng.standard_normal(4))}
    ours, theirs = with_ema(fn.sgd(0.1), d, debias=True), optax.ema(d, debias=True)
    state, their_state = ours.init(params), theirs.init(params)
    np.testing.assert_array_equal(ema_params(state, params)["W"], params["W"])  # before any update: the params
    update = jax.jit(ours.update)
    for _ in range(30):
        grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        params, state = update(grads, state, params)
        with jax.numpy_dtype_promotion("standard"):
            averaged, their_state = theirs.update(params, their_state)
        _close(ema_params(state, params), averaged, rtol=1e-12)


def test_fit_debiases_the_average_by_default():
    d = 0.999  # 24 updates: the undebiased average is 98% the initial params
    default = _fit(fn.adam(0.01), shuffle=False, ema_decay=d)
    _close(default.ema_params, _hand_average(fn.adam(0.01), d, debias=True))
    undebiased = _fit(fn.adam(0.01), shuffle=False, ema_decay=d, ema_debias=False)
    _close(undebiased.ema_params, _hand_average(fn.adam(0.01), d, debias=False))
    distance = lambda a, b: sum(
        float(np.sum((x - y) ** 2))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )
    # the debiased average is of the trained params; the other is still mostly the initial ones
    assert distance(default.ema_params, default.params) < 0.25 * distance(undebiased.ema_params, default.params)
    assert distance(undebiased.ema_params, PARAMS) < 0.01 * distance(default.params, PARAMS)
    with pytest.raises(TypeError, match="fit: ema_debias must be a bool"):
        _fit(fn.adam(0.01), ema_decay=d, ema_debias=1)
