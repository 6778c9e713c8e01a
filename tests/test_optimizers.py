"""Optimizers as pure tree updates: the book's rules, clipping, values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

PARAMS = {"W": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "B": jnp.array([[0.1, 0.2]])}
GRADS = {"W": jnp.array([[5.0, -0.5], [-7.0, 1.0]]), "B": jnp.array([[2.5, -3.0]])}


def test_clip_value_clips_each_entry_like_the_books_rnn_optimizer():
    new, _ = fn.sgd(0.1, clip_value=2.0).update(GRADS, fn.sgd(0.1).init(PARAMS), PARAMS)
    clipped = jax.tree_util.tree_map(lambda g: np.clip(g, -2, 2), GRADS)
    jax.tree_util.tree_map(lambda n, p, g: np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-12), new, PARAMS, clipped)


def test_clipping_order_value_then_norm_then_decay():
    optimizer = fn.sgd(1.0, clip_value=2.0, clip_norm=1.0, weight_decay=0.5)
    new, _ = optimizer.update(GRADS, optimizer.init(PARAMS), PARAMS)
    clipped = jax.tree_util.tree_map(lambda g: np.clip(g, -2, 2), GRADS)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(clipped)))
    expected = jax.tree_util.tree_map(lambda p, g: p - (g / norm + 0.5 * p), PARAMS, clipped)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), new, expected)


def test_the_books_adagrad():
    optimizer = fn.adagrad(0.01, eps=1e-7)
    state = optimizer.init(PARAMS)
    params, sums = PARAMS, jax.tree_util.tree_map(np.zeros_like, PARAMS)
    for _ in range(3):
        params_new, state = optimizer.update(GRADS, state, params)
        sums = jax.tree_util.tree_map(lambda s, g: s + 1e-7 + g**2, sums, GRADS)
        params = jax.tree_util.tree_map(lambda p, s, g: p - 0.01 / np.sqrt(s) * g, params, sums, GRADS)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), params_new, params)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_clip_value(value):
    with pytest.raises(ValueError, match="sgd: clip_value must be"):
        fn.sgd(0.1, clip_value=value)


def test_normal_initializer_is_a_value():
    key = jax.random.PRNGKey(0)
    w = fn.normal(0.01)(key, (300, 300), jnp.float64)
    np.testing.assert_allclose(np.std(w), 0.01, rtol=0.02)
    assert fn.normal(0.01) == fn.normal(0.01) and fn.normal(0.01) != fn.normal(0.02)
    with pytest.raises(ValueError, match=r"normal: stddev must be > 0\.0"):
        fn.normal(0.0)


# --- Every optimizer against its formula, many steps, float64 (a NumPy loop written apart) ---
#
# The gradient at each step depends on the params (a quadratic's pull towards a target) plus
# noise, so a rule that gets the state or the order of operations wrong drifts away.

STEPS = 60
rng = np.random.default_rng(3)
START = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
TARGET = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
NOISE = [{k: rng.standard_normal(v.shape) for k, v in START.items()} for _ in range(STEPS)]


def _grad(params, t):
    return {k: 3.0 * (params[k] - TARGET[k]) + NOISE[t][k] for k in params}


def _run_funcnet(optimizer, steps=STEPS):
    params = {k: jnp.asarray(v) for k, v in START.items()}
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    trajectory = []
    for t in range(steps):
        grads = {k: jnp.asarray(v) for k, v in _grad({k: np.asarray(v) for k, v in params.items()}, t).items()}
        params, state = update(grads, state, params)
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


def _run_reference(rule, steps=STEPS):
    """``rule(t, params, grads, state) -> (params, state)`` on NumPy dicts."""
    params, state, trajectory = {k: v.copy() for k, v in START.items()}, None, []
    for t in range(steps):
        params, state = rule(t, params, _grad(params, t), state)
        trajectory.append({k: v.copy() for k, v in params.items()})
    return trajectory


def _assert_same_trajectory(ours, theirs, rtol=1e-10):
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-12, err_msg=f"step {t + 1}, {k}")


def _zeros():
    return {k: np.zeros_like(v) for k, v in START.items()}


def _preprocess(grads, params, clip_value=None, clip_norm=None, weight_decay=0.0):
    if clip_value is not None:
        grads = {k: np.clip(g, -clip_value, clip_value) for k, g in grads.items()}
    if clip_norm is not None:
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        grads = {k: g * min(1.0, clip_norm / norm) for k, g in grads.items()}
    return {k: g + weight_decay * params[k] for k, g in grads.items()}


def _sgd_rule(lr, **pre):
    def rule(t, p, g, s):
        g = _preprocess(g, p, **pre)
        return {k: p[k] - lr(t) * g[k] for k in p}, s

    return rule


def _momentum_rule(lr, m, **pre):
    def rule(t, p, g, v):
        g, v = _preprocess(g, p, **pre), v or _zeros()
        v = {k: m * v[k] + lr(t) * g[k] for k in p}
        return {k: p[k] - v[k] for k in p}, v

    return rule


def _adagrad_rule(lr, eps, **pre):
    def rule(t, p, g, s):
        g, s = _preprocess(g, p, **pre), s or _zeros()
        s = {k: s[k] + eps + g[k] ** 2 for k in p}
        return {k: p[k] - lr(t) / np.sqrt(s[k]) * g[k] for k in p}, s

    return rule


def _adam_rule(lr, b1, b2, eps, decoupled=0.0, **pre):
    def rule(t, p, g, state):
        g = _preprocess(g, p, **pre)
        m, v = state or (_zeros(), _zeros())
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in p}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in p}
        step = {k: (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps) for k in p}
        return {k: p[k] - lr(t) * (step[k] + decoupled * p[k]) for k in p}, (m, v)

    return rule


def _linear(initial, final, steps):
    return lambda t: initial + (final - initial) * min(t, steps) / steps


def _cosine(initial, steps, final):
    return lambda t: final + (initial - final) * 0.5 * (1 + np.cos(np.pi * min(t, steps) / steps))


def _warmup_cosine(initial, peak, warmup, decay, final):
    def lr(t):
        if t < warmup:
            return initial + (peak - initial) * t / warmup
        done = min(t - warmup, decay - warmup) / (decay - warmup)
        return final + (peak - final) * 0.5 * (1 + np.cos(np.pi * done))

    return lr


const = lambda value: lambda t: value

FORMULAS = {
    "sgd": (fn.sgd(0.05), _sgd_rule(const(0.05))),
    "sgd+decay+clip_norm": (
        fn.sgd(0.05, weight_decay=0.1, clip_norm=2.0),
        _sgd_rule(const(0.05), clip_norm=2.0, weight_decay=0.1),
    ),
    "sgd+clip_value+linear": (
        fn.sgd(fn.linear_decay(0.1, 0.01, 40), clip_value=1.5),
        _sgd_rule(_linear(0.1, 0.01, 40), clip_value=1.5),
    ),
    "momentum": (fn.momentum(0.02, 0.9), _momentum_rule(const(0.02), 0.9)),
    "momentum+decay+cosine": (
        fn.momentum(fn.cosine_decay(0.03, 45, final=0.001), 0.8, weight_decay=0.05),
        _momentum_rule(_cosine(0.03, 45, 0.001), 0.8, weight_decay=0.05),
    ),
    "adagrad": (fn.adagrad(0.3, eps=1e-3), _adagrad_rule(const(0.3), 1e-3)),
    "adagrad+clip_norm": (fn.adagrad(0.3, eps=1e-7, clip_norm=1.0), _adagrad_rule(const(0.3), 1e-7, clip_norm=1.0)),
    "adam": (fn.adam(0.05, b1=0.8, b2=0.95, eps=1e-6), _adam_rule(const(0.05), 0.8, 0.95, 1e-6)),
    "adam+decay+warmup_cosine": (
        fn.adam(fn.warmup_cosine_decay(0.0, 0.1, 10, 50, final=0.01), weight_decay=0.01),
        _adam_rule(_warmup_cosine(0.0, 0.1, 10, 50, 0.01), 0.9, 0.999, 1e-8, weight_decay=0.01),
    ),
    "adamw": (fn.adamw(0.05, weight_decay=0.1), _adam_rule(const(0.05), 0.9, 0.999, 1e-8, decoupled=0.1)),
    "adamw+clip+cosine": (
        fn.adamw(fn.cosine_decay(0.1, 30), b1=0.7, b2=0.9, eps=1e-4, weight_decay=0.3, clip_norm=3.0),
        _adam_rule(_cosine(0.1, 30, 0.0), 0.7, 0.9, 1e-4, decoupled=0.3, clip_norm=3.0),
    ),
}


@pytest.mark.parametrize("name", FORMULAS)
def test_every_optimizer_follows_its_formula_over_many_steps(name):
    optimizer, rule = FORMULAS[name]
    _assert_same_trajectory(_run_funcnet(optimizer), _run_reference(rule))


def test_the_formula_check_catches_a_second_moment_bias_correction_with_b1(monkeypatch):
    """A check that cannot fail proves nothing: Adam with ``1 - b1**t`` as the second moment's
    correction (everything else right) must fail the formula check, at the defaults too."""
    right = fn.optimizers._bias_corrections
    monkeypatch.setattr(fn.optimizers, "_bias_corrections", lambda b1, b2, t: right(b1, b1, t))
    for args, rule in (
        ((0.05, 0.8, 0.95, 1e-6), _adam_rule(const(0.05), 0.8, 0.95, 1e-6)),
        ((0.05,), _adam_rule(const(0.05), 0.9, 0.999, 1e-8)),
    ):
        with jax.disable_jit(), pytest.raises(AssertionError, match="step"):
            _assert_same_trajectory(_run_funcnet(fn.adam(*args), steps=10), _run_reference(rule, steps=10))


# --- optax as an independent oracle (skipped where optax is absent; never a dependency) ---------


def _run_optax(transform, steps=STEPS):
    with jax.numpy_dtype_promotion("standard"):  # optax's own code is not written for strict promotion
        return _run_optax_strict(transform, steps)


def _run_optax_strict(transform, steps):
    import optax

    params = {k: jnp.asarray(v) for k, v in START.items()}
    state = transform.init(params)
    step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*transform.update(g, s, p)))
    trajectory = []
    for t in range(steps):
        grads = {k: jnp.asarray(v) for k, v in _grad({k: np.asarray(v) for k, v in params.items()}, t).items()}
        params, state = step(grads, state, params)
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


def _float64(schedule):
    """An optax schedule read at a float64 count (its int32 count computes in float32)."""
    return lambda count: schedule(jnp.asarray(count).astype(jnp.float64))


def _optax_twins():
    """(funcnet optimizer, its optax twin), float64, compared over STEPS steps."""
    optax = pytest.importorskip("optax")
    labels = {"W": "body", "b": "head"}
    return {
        "sgd": (fn.sgd(0.05), optax.sgd(0.05)),
        "sgd+decay+clip_norm+clip_value": (
            fn.sgd(0.05, weight_decay=0.1, clip_norm=2.0, clip_value=1.5),
            optax.chain(
                optax.clip(1.5), optax.clip_by_global_norm(2.0), optax.add_decayed_weights(0.1), optax.sgd(0.05)
            ),
        ),
        # the book's v = m v + lr g equals optax's trace t = g + m t times lr, for a constant lr
        "momentum": (fn.momentum(0.02, 0.9), optax.sgd(0.02, momentum=0.9)),
        # the book's AdaGrad adds eps to the sum every step; with a negligible eps it is optax's
        # with no initial accumulator and no eps
        "adagrad": (fn.adagrad(0.3, eps=1e-300), optax.adagrad(0.3, initial_accumulator_value=0.0, eps=0.0)),
        "adam": (fn.adam(0.05, b1=0.8, b2=0.95, eps=1e-6), optax.adam(0.05, b1=0.8, b2=0.95, eps=1e-6)),
        "adam+linear_decay": (
            fn.adam(fn.linear_decay(0.1, 0.01, 40)),
            optax.adam(_float64(optax.linear_schedule(0.1, 0.01, 40))),
        ),
        "adamw": (fn.adamw(0.05, weight_decay=0.1), optax.adamw(0.05, weight_decay=0.1)),
        "adamw+warmup_cosine": (
            fn.adamw(fn.warmup_cosine_decay(0.0, 0.1, 10, 50, final=0.01), b1=0.7, b2=0.9, weight_decay=0.3),
            optax.adamw(
                _float64(optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 50, 0.01)), b1=0.7, b2=0.9, weight_decay=0.3
            ),
        ),
        "sgd+cosine": (
            fn.sgd(fn.cosine_decay(0.1, 30, final=0.02)),
            optax.sgd(_float64(optax.cosine_decay_schedule(0.1, 30, 0.2))),
        ),
        "accumulate(adam, 3)": (
            fn.accumulate(fn.adam(0.05), 3),
            optax.MultiSteps(optax.adam(0.05), every_k_schedule=3, accumulator_dtype=jnp.float64),
        ),
        "accumulate(momentum, 4)": (
            fn.accumulate(fn.momentum(0.02, 0.9), 4),
            optax.MultiSteps(optax.sgd(0.02, momentum=0.9), every_k_schedule=4, accumulator_dtype=jnp.float64),
        ),
        "multi_optimizer(adamw, sgd)": (
            fn.multi_optimizer({"body": fn.adamw(0.05, weight_decay=0.1), "head": fn.sgd(0.01, clip_norm=1.0)}, labels),
            optax.multi_transform(
                {
                    "body": optax.adamw(0.05, weight_decay=0.1),
                    "head": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01)),
                },
                labels,
            ),
        ),
        "multi_optimizer(frozen, adam)": (
            fn.multi_optimizer(
                {"body": None, "head": fn.adam(0.05)}, lambda path: "body" if path[0].key == "W" else "head"
            ),
            optax.multi_transform({"body": optax.set_to_zero(), "head": optax.adam(0.05)}, labels),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "sgd",
        "sgd+decay+clip_norm+clip_value",
        "momentum",
        "adagrad",
        "adam",
        "adam+linear_decay",
        "adamw",
        "adamw+warmup_cosine",
        "sgd+cosine",
        "accumulate(adam, 3)",
        "accumulate(momentum, 4)",
        "multi_optimizer(adamw, sgd)",
        "multi_optimizer(frozen, adam)",
    ],
)
def test_every_optimizer_equals_its_optax_twin(name):
    ours, theirs = _optax_twins()[name]
    _assert_same_trajectory(_run_funcnet(ours), _run_optax(theirs))


def test_the_schedules_equal_optax_at_every_step():
    optax = pytest.importorskip("optax")
    steps = jnp.arange(80)
    pairs = [
        (fn.cosine_decay(0.3, 50), optax.cosine_decay_schedule(0.3, 50)),
        (fn.cosine_decay(0.3, 50, final=0.05), optax.cosine_decay_schedule(0.3, 50, alpha=0.05 / 0.3)),
        (fn.warmup_cosine_decay(0.0, 1.0, 10, 60), optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 60)),
        (fn.warmup_cosine_decay(0.1, 1.0, 1, 7, 0.2), optax.warmup_cosine_decay_schedule(0.1, 1.0, 1, 7, 0.2)),
        (fn.warmup_cosine_decay(0.5, 1.0, 0, 30, 0.1), optax.warmup_cosine_decay_schedule(0.5, 1.0, 0, 30, 0.1)),
        (fn.linear_decay(0.2, 0.05, 25), optax.linear_schedule(0.2, 0.05, 25)),
    ]
    for ours, theirs in pairs:
        with jax.numpy_dtype_promotion("standard"):
            expected = jax.jit(jax.vmap(_float64(theirs)))(steps)
        np.testing.assert_allclose(jax.jit(jax.vmap(ours))(steps), expected, rtol=1e-12, atol=1e-15, err_msg=repr(ours))


def test_the_optax_oracle_catches_a_second_moment_bias_correction_with_b1(monkeypatch):
    _, theirs = _optax_twins()["adam"]
    expected = _run_optax(theirs, steps=10)
    right = fn.optimizers._bias_corrections
    monkeypatch.setattr(fn.optimizers, "_bias_corrections", lambda b1, b2, t: right(b1, b1, t))
    with jax.disable_jit(), pytest.raises(AssertionError, match="step"):
        _assert_same_trajectory(_run_funcnet(fn.adam(0.05, b1=0.8, b2=0.95, eps=1e-6), steps=10), expected)
