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
    optax = pytest.importorskip("optax")

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


# --- Low precision (issue #23): state and its constants in float32, the update cast back -------

LOW = [jnp.float16, jnp.bfloat16]
ALL_KINDS = {
    "chain": lambda: fn.optimizers.chain(fn.optimizers.clip_by_global_norm(0.1), fn.adam(1e-3)),
    "sgd": lambda: fn.sgd(0.01, weight_decay=1e-3, clip_norm=1.0, clip_value=5.0),
    "momentum": lambda: fn.momentum(0.01, 0.9),
    "adagrad": lambda: fn.adagrad(0.01),
    "adam": lambda: fn.adam(1e-3),
    "adamw": lambda: fn.adamw(1e-3),
    "accumulate": lambda: fn.accumulate(fn.adam(1e-3), 2),
    "multi_optimizer": lambda: fn.multi_optimizer({"a": fn.adam(1e-3), "b": fn.sgd(0.1)}, {"W": "a", "b": "b"}),
}


@pytest.mark.parametrize("dtype", [*LOW, jnp.float32, jnp.float64])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_state_lives_in_at_least_float32_and_params_keep_their_dtype(kind, dtype):
    optimizer = ALL_KINDS[kind]()
    params = {"W": jnp.ones((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    state = optimizer.init(params)
    new, state = jax.jit(optimizer.update)(grads, state, params)
    wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
    for leaf in jax.tree_util.tree_leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == wide, (kind, leaf.dtype)
    for leaf in jax.tree_util.tree_leaves(new):
        assert leaf.dtype == dtype and bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("clip", ["clip_norm", "clip_by_global_norm"])
@pytest.mark.parametrize("dtype", LOW)
def test_the_clip_norm_is_computed_in_float32(dtype, clip):
    """float16's largest value is 65504: the squared norm of 16 gradients of 300 overflowed it,
    the scale became 0 and nothing was updated."""
    params = {"W": jnp.ones((4, 4), dtype)}
    if clip == "clip_norm":
        optimizer = fn.sgd(0.1, clip_norm=1.0)
    else:
        optimizer = fn.optimizers.chain(fn.optimizers.clip_by_global_norm(1.0), fn.sgd(0.1))
    new, _ = optimizer.update({"W": jnp.full((4, 4), 300.0, dtype)}, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(new["W"], np.float32), 1 - 0.1 / 4, rtol=2e-3)


@pytest.mark.parametrize("dtype", LOW)
def test_adam_leaves_the_embedding_rows_no_batch_reads_untouched(dtype):
    """float16 rounds eps=1e-8 to 0, so a zero gradient computed 0/0 = NaN in every unread row."""
    net = fn.serial(fn.Embedding(10, 4, dtype=dtype), fn.Flatten(), fn.Dense(1, fn.linear, dtype=dtype))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    ids = jnp.array([[0, 1, 2], [2, 1, 0]], jnp.int32)  # rows 3..9 are never read
    target = jnp.ones((2, 1), dtype)
    optimizer = fn.adam(1e-3)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer))
    new, state = params, optimizer.init(params)
    for _ in range(3):
        new, state, _ = step(new, state, ids, target, None)
    table, before = new[0].W, params[0].W
    assert table.dtype == dtype
    np.testing.assert_array_equal(np.asarray(table[3:], np.float32), np.asarray(before[3:], np.float32))
    assert bool(jnp.all(jnp.isfinite(table))) and not np.array_equal(np.asarray(table[:3]), np.asarray(before[:3]))


def _constant_gradient_run(optimizer, dtype, steps):
    params = {"w": jnp.zeros((1,), dtype)}

    def body(carry, _):
        p, s = carry
        return optimizer.update({"w": jnp.ones((1,), dtype)}, s, p), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((params, optimizer.init(params)))
    return params, state


@pytest.mark.parametrize("dtype", LOW)
def test_adams_second_moment_reaches_its_value_after_2000_steps(dtype):
    """In bfloat16, 0.999 * nu + 0.001 rounds back to nu once nu is near 0.5: it stalled there."""
    _, state = _constant_gradient_run(fn.adam(1e-6), dtype, 2000)
    np.testing.assert_allclose(float(state.nu["w"][0]), 1 - 0.999**2000, rtol=1e-4)
    np.testing.assert_allclose(float(state.mu["w"][0]), 1 - 0.9**2000, rtol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_adagrads_sum_and_momentums_velocity_accumulate_in_float32(dtype):
    _, state = _constant_gradient_run(fn.adagrad(1e-6), dtype, 1000)
    np.testing.assert_allclose(float(state.sum_square["w"][0]), 1000 * (1 + 1e-7), rtol=1e-5)  # bfloat16: 256
    _, state = _constant_gradient_run(fn.momentum(1e-3, 0.99), dtype, 2000)
    np.testing.assert_allclose(float(state.velocity["w"][0]), 0.1 * (1 - 0.99**2000), rtol=1e-4)  # bfloat16: 0.063


@pytest.mark.parametrize("dtype", LOW)
def test_a_low_precision_update_is_the_float32_update_rounded_once(dtype):
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], dtype)}
    grads = {"w": jnp.asarray([0.3, -0.2, 0.1], dtype)}
    wide = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    for make in ALL_KINDS.values():
        optimizer = make() if make is not ALL_KINDS["multi_optimizer"] else fn.adam(1e-3)
        low, _ = optimizer.update(grads, optimizer.init(params), params)
        high, _ = optimizer.update(
            jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), grads), optimizer.init(wide), wide
        )
        np.testing.assert_array_equal(np.asarray(low["w"]), np.asarray(high["w"].astype(dtype)))


# --- The wrappers: accumulation, parameter groups; values ---------------------------------------


def test_accumulate_keeps_the_params_until_every_kth_call_and_counts_the_inner_steps():
    params = {"w": jnp.asarray([1.0, 2.0])}
    optimizer = fn.accumulate(fn.sgd(fn.linear_decay(0.1, 0.05, 1)), 3)
    state = optimizer.init(params)
    grads = [{"w": jnp.asarray([g, -g])} for g in (1.0, 2.0, 6.0, 3.0, 3.0, 3.0)]
    seen = []
    for g in grads:
        params, state = optimizer.update(g, state, params)
        seen.append(np.asarray(params["w"]))
    np.testing.assert_array_equal(seen[0], [1.0, 2.0])
    np.testing.assert_array_equal(seen[1], [1.0, 2.0])
    np.testing.assert_allclose(seen[2], [1.0 - 0.1 * 3.0, 2.0 + 0.1 * 3.0], rtol=1e-12)  # the mean, at lr(0)
    np.testing.assert_array_equal(seen[3], seen[2])
    np.testing.assert_allclose(seen[5], seen[2] - np.array([1, -1]) * 0.05 * 3.0, rtol=1e-12)  # lr(1)
    assert int(state.step) == 6 and int(state.inner.step) == 2 and int(state.mini_step) == 0


def test_a_frozen_group_never_changes_and_holds_no_state():
    net = fn.serial(fn.Dense(4, fn.tanh), fn.Dense(2, fn.linear))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    labels = (fn.DenseParams(W="backbone", B="backbone"), fn.DenseParams(W="head", B="head"))
    optimizer = fn.multi_optimizer({"backbone": None, "head": fn.adam(0.1)}, labels)
    state = optimizer.init(params)
    assert list(state.states) == ["head"]
    assert len(jax.tree_util.tree_leaves(state.states["head"].mu)) == 2  # the head's W and B only
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    new, state = optimizer.update(grads, state, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new[0], params[0])
    assert not np.array_equal(new[1].W, params[1].W)
    by_path = fn.multi_optimizer(
        {"backbone": None, "head": fn.adam(0.1)}, lambda path: ("backbone", "head")[path[0].idx]
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, by_path.update(grads, by_path.init(params), params)[0], new)


def test_labels_that_do_not_match_the_params_are_named():
    params = {"W": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"labels\['b'\] must name a group of optimizers \['a'\], got 'c'"):
        fn.multi_optimizer({"a": fn.sgd(0.1)}, {"W": "a", "b": "c"})
    with pytest.raises(TypeError, match="labels must have the params' structure"):
        fn.multi_optimizer({"a": fn.sgd(0.1)}, {"W": "a"}).init(params)
    with pytest.raises(ValueError, match=r"labels\(path\) must return one of the groups \['a'\], got 'x'"):
        fn.multi_optimizer({"a": fn.sgd(0.1)}, lambda path: "x").init(params)
    with pytest.raises(TypeError, match=r"optimizers\['a'\] must be an Optimizer"):
        fn.multi_optimizer({"a": 0.1}, {"W": "a", "b": "a"})
    with pytest.raises(TypeError, match="accumulate: optimizer must be an Optimizer"):
        fn.accumulate(0.1, 2)
    with pytest.raises(ValueError, match="accumulate: steps must be >= 1, got 0"):
        fn.accumulate(fn.sgd(0.1), 0)
    with pytest.raises(ValueError, match=r"warmup_cosine_decay: decay_steps .* must be > warmup_steps \(10\), got 10"):
        fn.warmup_cosine_decay(0.0, 1.0, 10, 10)
    with pytest.raises(ValueError, match=r"adamw: b2 must be >= 0\.0 and < 1\.0, got 1\.0"):
        fn.adamw(1e-3, b2=1.0)


def test_the_new_building_blocks_are_values():
    build = [
        lambda: fn.adamw(3e-3, weight_decay=0.1, clip_norm=1.0),
        lambda: fn.cosine_decay(0.1, 100, final=0.01),
        lambda: fn.warmup_cosine_decay(0.0, 0.1, 10, 100),
        lambda: fn.adamw(fn.warmup_cosine_decay(0.0, 0.1, 10, 100)),
        lambda: fn.accumulate(fn.adam(1e-3), 4),
        lambda: fn.multi_optimizer({"a": fn.adam(1e-3), "b": None}, {"W": "a", "b": "b"}),
    ]
    for make in build:
        a, b = make(), make()
        assert a is not b and a == b and hash(a) == hash(b)
    assert fn.adamw(1e-3) != fn.adam(1e-3) and fn.adamw(1e-3) != fn.adamw(1e-3, weight_decay=0.0)
    assert fn.accumulate(fn.adam(1e-3), 4) != fn.accumulate(fn.adam(1e-3), 2) != fn.accumulate(fn.sgd(1e-3), 2)
    assert fn.multi_optimizer({"a": fn.adam(1e-3), "b": None}, {"W": "a", "b": "b"}) != fn.multi_optimizer(
        {"a": fn.adam(1e-3), "b": None}, {"W": "b", "b": "a"}
    )
    assert fn.cosine_decay(0.1, 100) != fn.warmup_cosine_decay(0.1, 0.1, 0, 100)
    assert "init=accumulate(adamw(learning_rate=0.001," in repr(fn.accumulate(fn.adamw(1e-3), 4))


# --- In fit: accumulation trains like a bigger batch; the moving average of the params ----------

FIT_KEY = jax.random.PRNGKey(2)
FIT_X = rng.standard_normal((64, 5))
FIT_Y = np.stack([FIT_X[:, 0] - FIT_X[:, 1], np.tanh(FIT_X[:, 2])], axis=1)
FIT_NET = fn.serial(fn.Dense(8, fn.tanh), fn.Dense(2, fn.linear))
FIT_PARAMS = FIT_NET.init(jax.random.PRNGKey(0), (-1, 5))[1]


def _fit(optimizer, batch_size=8, eval_data=None, **kw):
    return fn.fit(
        FIT_NET,
        fn.mean_squared_error,
        optimizer,
        FIT_PARAMS,
        (FIT_X, FIT_Y),
        eval_data,
        epochs=kw.pop("epochs", 3),
        batch_size=batch_size,
        key=FIT_KEY,
        **kw,
    )


def test_fit_with_accumulate_4_and_batch_8_trains_like_batch_32():
    """Four consecutive shuffled batches of 8 are the shuffled batch of 32: the mean of their mean
    gradients is its mean gradient, so the runs agree up to rounding."""
    small = _fit(fn.accumulate(fn.momentum(0.05, 0.9), 4), batch_size=8)
    big = _fit(fn.momentum(0.05, 0.9), batch_size=32)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), small.params, big.params)
    assert int(small.opt_state.inner.step) == int(big.opt_state.step) == 3 * 2


def test_fit_keeps_the_moving_average_of_the_params_after_every_step():
    """The average started from the initial params (``ema_debias=False``, the earlier releases'
    average); ``tests/test_ema.py`` checks the debiased default."""
    d = 0.8
    averaged = _fit(fn.adam(0.01), shuffle=False, ema_decay=d, ema_debias=False)
    plain = _fit(fn.adam(0.01), shuffle=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, averaged.params, plain.params)  # training is untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, averaged.opt_state.inner, plain.opt_state)
    # the same steps by hand, the average in NumPy
    optimizer = fn.adam(0.01)
    step = jax.jit(fn.train_step(FIT_NET, fn.mean_squared_error, optimizer))
    params, state = FIT_PARAMS, optimizer.init(FIT_PARAMS)
    ema = jax.tree_util.tree_map(np.asarray, FIT_PARAMS)
    for _ in range(3):
        for b in range(8):
            rows = slice(8 * b, 8 * b + 8)
            params, state, _ = step(params, state, FIT_X[rows], FIT_Y[rows], None)
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema, params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), averaged.ema_params, ema)
    assert plain.ema_params is None


def test_early_stopping_can_watch_the_moving_average():
    eval_data = (FIT_X[:16], FIT_Y[:16])
    for eval_ema in (False, True):
        result = _fit(
            fn.sgd(0.05), eval_data=eval_data, epochs=6, eval_every=1, patience=9, ema_decay=0.9, eval_ema=eval_ema
        )
        watched = result.ema_params if eval_ema else result.params
        best = float(fn.mean_squared_error(FIT_NET.apply(watched, eval_data[0]), eval_data[1]))
        np.testing.assert_allclose(float(result.history.eval_loss[int(result.best_epoch) - 1]), best, rtol=1e-12)
        np.testing.assert_allclose(float(np.nanmin(result.history.eval_loss)), best, rtol=1e-12)
    with pytest.raises(
        ValueError, match="fit: eval_ema=True evaluates the params' moving average, which needs ema_decay"
    ):
        _fit(fn.sgd(0.05), eval_data=eval_data, eval_ema=True)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fit: ema_decay must be"):
            _fit(fn.sgd(0.05), ema_decay=bad)


def test_the_moving_average_is_checkpointed_and_resumed_bit_for_bit(tmp_path, monkeypatch):
    from test_long_runs import _interrupt_after

    eval_data = (FIT_X[:16], FIT_Y[:16])
    run = lambda directory=None, **kw: _fit(
        fn.adamw(0.01),
        eval_data=eval_data,
        epochs=6,
        eval_every=2,
        patience=9,
        ema_decay=0.95,
        checkpoint_dir=directory,
        **kw,
    )
    whole = run()
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.undo()
    resumed = run(tmp_path)
    assert int(resumed.resumed_epoch) == 3
    resumed = resumed._replace(resumed_epoch=whole.resumed_epoch)  # where the call began aside
    assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(whole)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, whole)
    with pytest.raises(ValueError, match=r"ema_decay: 0\.95 there, 0\.9 here"):
        _fit(
            fn.adamw(0.01),
            eval_data=eval_data,
            epochs=6,
            eval_every=2,
            patience=9,
            ema_decay=0.9,
            checkpoint_dir=tmp_path,
        )


def test_a_sweep_over_the_moving_averages_decay_compiles_nothing_new():
    from test_sweep import compilations

    _fit(fn.adam(0.01), ema_decay=0.9)
    with compilations() as compiled:
        results = [_fit(fn.adam(0.01), ema_decay=d) for d in (0.5, 0.99)]
    assert compiled == []
    assert not np.array_equal(results[0].ema_params[0].W, results[1].ema_params[0].W)


@pytest.mark.filterwarnings("error::UserWarning")  # a bare vmap of fit: no "donated buffers" warning
def test_a_vmapped_ensemble_over_the_new_numbers_equals_separate_fits():
    def member(peak, decay, steps):
        optimizer = fn.accumulate(fn.adamw(fn.warmup_cosine_decay(0.0, peak, 2, 20), weight_decay=0.1), steps)
        return _fit(optimizer, epochs=2, ema_decay=decay)

    peaks, decays = jnp.asarray([0.01, 0.03]), jnp.asarray([0.5, 0.9])
    ensemble = jax.vmap(lambda p, d: member(p, d, 2))(peaks, decays)
    for i in range(2):
        alone = member(float(peaks[i]), float(decays[i]), 2)
        for got, want in ((ensemble.params, alone.params), (ensemble.ema_params, alone.ema_params)):
            jax.tree_util.tree_map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-9), got, want)


# --- A global-norm clip chained before an optimizer; weight-decay groups by field name ----------

from funcnet.optimizers import (  # noqa: E402  # the names this section adds, from their module
    ChainState,
    GradientTransform,
    chain,
    clip_by_global_norm,
    decay_labels,
    labels_by_field,
)

DECAY_BY_KEY = {"W": 0.1, "b": 0.0}  # START's groups: the matrix decays, the bias does not
GROUPS = {"W": "decay", "b": "no_decay"}
RIGHT_CLIP = fn.optimizers._clip_norm


def _grouped_adamw(max_norm, lr=0.05, b1=0.9, b2=0.95):
    """nanoGPT's optimizer on START: one global clip, then AdamW decaying only ``W``."""
    groups = {"decay": fn.adamw(lr, b1, b2, weight_decay=0.1), "no_decay": fn.adamw(lr, b1, b2, weight_decay=0.0)}
    return chain(clip_by_global_norm(max_norm), fn.multi_optimizer(groups, GROUPS))


def _grouped_adamw_rule(max_norm, lr=0.05, b1=0.9, b2=0.95, eps=1e-8):
    """The same, written apart in NumPy: the norm over every group's gradients together."""

    def rule(t, p, g, state):
        norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        g = {k: v * max_norm / max(norm, max_norm) for k, v in g.items()}
        m, v = state or (_zeros(), _zeros())
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in p}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in p}
        step = {k: (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps) for k in p}
        return {k: p[k] - lr * (step[k] + DECAY_BY_KEY[k] * p[k]) for k in p}, (m, v)

    return rule


def _grouped_adamw_optax(max_norm, lr=0.05, b1=0.9, b2=0.95):
    optax = pytest.importorskip("optax")
    groups = {
        "decay": optax.adamw(lr, b1, b2, weight_decay=0.1),
        "no_decay": optax.adamw(lr, b1, b2, weight_decay=0.0),
    }
    return optax.chain(optax.clip_by_global_norm(max_norm), optax.multi_transform(groups, GROUPS))


def _run_in(dtype, update_step, init_state, steps=20):
    """START trained ``steps`` steps in ``dtype`` by ``update_step(grads, state, params)``."""
    params = {k: jnp.asarray(v, dtype) for k, v in START.items()}
    state, trajectory = init_state(params), []
    for t in range(steps):
        grads = {k: jnp.asarray(v, dtype) for k, v in _grad({k: np.asarray(v) for k, v in params.items()}, t).items()}
        params, state = update_step(grads, state, params)
        trajectory.append({k: np.asarray(v) for k, v in params.items()})
    return trajectory


@pytest.mark.parametrize("max_norm", [1.0, 6.0, 1e3])  # clipping every step, some steps, never
def test_a_global_clip_before_parameter_groups_follows_its_formula(max_norm):
    ours, theirs = _run_funcnet(_grouped_adamw(max_norm)), _run_reference(_grouped_adamw_rule(max_norm))
    _assert_same_trajectory(ours, theirs)
    if max_norm == 6.0:  # the parametrisation covers both branches of the clip
        norms = [np.sqrt(sum(np.sum(v**2) for v in _grad(p, t).values())) for t, p in enumerate([START, *theirs[:-1]])]
        assert min(norms) < 6.0 < max(norms)


@pytest.mark.parametrize("max_norm", [1.0, 6.0, 1e3])
def test_a_global_clip_before_parameter_groups_equals_optax_chain(max_norm):
    _assert_same_trajectory(_run_funcnet(_grouped_adamw(max_norm)), _run_optax(_grouped_adamw_optax(max_norm)))


def test_a_global_clip_equals_optax_in_float32():
    """In float32 (params, gradients, state) both libraries round alike up to a few ulps per step."""
    optax = pytest.importorskip("optax")
    ours = _grouped_adamw(1.0)
    theirs = _grouped_adamw_optax(1.0)
    step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*theirs.update(g, s, p)))
    with jax.numpy_dtype_promotion("standard"):
        expected = _run_in(jnp.float32, step, theirs.init)
    got = _run_in(jnp.float32, jax.jit(ours.update), ours.init)
    for t, (a, b) in enumerate(zip(got, expected, strict=True)):
        for k in a:
            assert a[k].dtype == np.float32
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=f"step {t + 1}, {k}")


def test_the_oracles_catch_a_clip_per_group_instead_of_over_all_groups():
    """A check that cannot fail proves nothing: the same AdamW groups, each clipping its own
    gradients (``clip_norm=`` inside the group, which is what funcnet offered before), differ."""
    groups = {
        "decay": fn.adamw(0.05, 0.9, 0.95, weight_decay=0.1, clip_norm=1.0),
        "no_decay": fn.adamw(0.05, 0.9, 0.95, weight_decay=0.0, clip_norm=1.0),
    }
    per_group = _run_funcnet(fn.multi_optimizer(groups, GROUPS), steps=10)
    with pytest.raises(AssertionError, match="step"):
        _assert_same_trajectory(per_group, _run_reference(_grouped_adamw_rule(1.0), steps=10))
    try:
        theirs = _run_optax(_grouped_adamw_optax(1.0), steps=10)
    except pytest.skip.Exception:
        return
    with pytest.raises(AssertionError, match="step"):
        _assert_same_trajectory(per_group, theirs)


@pytest.mark.parametrize(
    "wrong",
    [
        # each leaf scaled by its own norm
        lambda grads, limit: jax.tree_util.tree_map(lambda g: RIGHT_CLIP(g, limit), grads),
        # the squared norm taken for the norm
        lambda grads, limit: jax.tree_util.tree_map(
            lambda g: g * jnp.minimum(1.0, limit / sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(grads))),
            grads,
        ),
        # clipped to 1 whatever max_norm says
        lambda grads, limit: RIGHT_CLIP(grads, 1.0),
    ],
    ids=["per-leaf norm", "squared norm", "max_norm ignored"],
)
def test_the_formula_check_catches_a_wrong_global_norm(monkeypatch, wrong):
    monkeypatch.setattr(fn.optimizers, "_clip_norm", wrong)
    with jax.disable_jit(), pytest.raises(AssertionError, match="step"):
        _assert_same_trajectory(_run_funcnet(_grouped_adamw(3.0), steps=5), _run_reference(_grouped_adamw_rule(3.0), 5))


def test_the_clip_state_and_repr():
    params = {k: jnp.asarray(v) for k, v in START.items()}
    optimizer = _grouped_adamw(1.0)
    state = optimizer.init(params)
    assert isinstance(state, ChainState) and state.transforms == ((),) and int(state.step) == 0
    _, state = optimizer.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert int(state.step) == 1 and int(state.inner.states["decay"].step) == 1
    assert repr(clip_by_global_norm(0.5).update) == "clip_by_global_norm(0.5).update"
    assert repr(chain(clip_by_global_norm(0.5), fn.sgd(0.1)).init) == (
        "chain(clip_by_global_norm(0.5), sgd(learning_rate=0.1)).init"
    )
    assert isinstance(clip_by_global_norm(1.0), GradientTransform)


def test_the_clip_alone_is_optax_clip_by_global_norm_and_leaves_a_zero_gradient_alone():
    clip = clip_by_global_norm(2.0)
    grads = {k: jnp.asarray(v) for k, v in GRADS.items()}
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    clipped, state = clip.update(grads, clip.init(params), params)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in GRADS.values()))
    for k in GRADS:
        np.testing.assert_allclose(clipped[k], np.asarray(GRADS[k]) * 2.0 / norm, rtol=1e-6)
    assert state == ()
    zero = jax.tree_util.tree_map(jnp.zeros_like, grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, clip.update(zero, (), params)[0], zero)  # no 0/0


@pytest.mark.parametrize("dtype", LOW)
def test_the_clip_hands_low_precision_gradients_on_in_float32_scaled_once(dtype):
    """The optimizer after it computes in float32 anyway: a clip that rounded the scaled gradient
    back to float16 would round the update twice."""
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], dtype)}
    grads = {"w": jnp.asarray([0.3, -0.2, 0.1], dtype)}
    wide = {"w": grads["w"].astype(jnp.float32)}
    clip = clip_by_global_norm(0.1)
    low, _ = clip.update(grads, clip.init(params), params)
    high, _ = clip.update(wide, clip.init(wide), {"w": params["w"].astype(jnp.float32)})
    assert low["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(low["w"]), np.asarray(high["w"]))
    assert not np.array_equal(np.asarray(low["w"]), np.asarray(high["w"].astype(dtype)).astype(np.float32))


def test_chain_and_clip_are_values_with_max_norm_as_data():
    from funcnet._values import partition

    make = lambda m: chain(clip_by_global_norm(m), fn.multi_optimizer({"a": fn.adamw(1e-3), "b": None}, GROUPS_AB))
    assert make(1.0) == make(1.0) and hash(make(1.0)) == hash(make(1.0)) and make(1.0) is not make(1.0)
    assert make(1.0) != make(2.0)
    assert clip_by_global_norm(1.0) == clip_by_global_norm(1.0) != clip_by_global_norm(0.5)
    assert chain(clip_by_global_norm(1.0), fn.sgd(0.1)) != chain(fn.sgd(0.1))
    (data_1, static_1), (data_2, static_2) = partition(make(1.0)), partition(make(2.0))
    assert static_1 == static_2 and 1.0 in data_1 and 2.0 in data_2  # max_norm is traced, the rest selects


GROUPS_AB = {"W": "a", "b": "b"}


def test_a_vmap_over_max_norm_equals_separate_updates():
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    grads = {k: jnp.asarray(v) for k, v in GRADS.items()}

    def step(max_norm):
        optimizer = chain(clip_by_global_norm(max_norm), fn.sgd(0.1))
        return optimizer.update(grads, optimizer.init(params), params)[0]

    norms = jnp.asarray([0.5, 3.0, 100.0])
    together = jax.vmap(step)(norms)
    for i, m in enumerate([0.5, 3.0, 100.0]):
        jax.tree_util.tree_map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-12), together, step(m))


def test_a_sweep_over_max_norm_compiles_nothing_new():
    from test_sweep import compilations

    labels = decay_labels(FIT_PARAMS)
    make = lambda m: chain(
        clip_by_global_norm(m), fn.multi_optimizer({"decay": fn.adamw(0.05), "no_decay": fn.adam(0.05)}, labels)
    )
    _fit(make(0.5), epochs=1)
    with compilations() as compiled:
        results = [_fit(make(m), epochs=1) for m in (0.05, 50.0)]
    assert compiled == []
    assert not np.array_equal(results[0].params[0].W, results[1].params[0].W)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_max_norm(value):
    with pytest.raises(ValueError, match=r"clip_by_global_norm: max_norm must be (> 0|finite)"):
        clip_by_global_norm(value)
    with pytest.raises(TypeError, match="clip_by_global_norm: max_norm must be a real number"):
        clip_by_global_norm("1.0")


def test_chain_runs_its_transforms_in_the_order_given_each_with_its_own_state():
    """A clip and a scaling do not commute: the order given is the order run (optax.chain's)."""

    def scaled(factor):  # a gradient transform whose state names it
        return GradientTransform(
            lambda params: jnp.asarray(factor),
            lambda grads, state, params: (jax.tree_util.tree_map(lambda g: g * factor, grads), state),
        )

    params = {"W": jnp.zeros((2, 2))}
    grads = {"W": jnp.full((2, 2), 3.0)}  # global norm 6
    scale_then_clip = chain(scaled(10.0), clip_by_global_norm(1.0), fn.sgd(1.0))
    new, state = scale_then_clip.update(grads, scale_then_clip.init(params), params)
    np.testing.assert_allclose(new["W"], -0.5)  # 30 each, norm 60, clipped to norm 1: 0.5 each
    assert float(state.transforms[0]) == 10.0 and state.transforms[1] == ()
    clip_then_scale = chain(clip_by_global_norm(1.0), scaled(10.0), fn.sgd(1.0))
    new, state = clip_then_scale.update(grads, clip_then_scale.init(params), params)
    np.testing.assert_allclose(new["W"], -5.0)  # clipped to 0.5 each, then times 10
    assert state.transforms[0] == () and float(state.transforms[1]) == 10.0


def test_bad_chains():
    with pytest.raises(TypeError, match="chain: give the gradient transforms and then an Optimizer"):
        chain()
    with pytest.raises(
        TypeError,
        match=r"chain: every argument before the last must be a GradientTransform.*got Optimizer at position 0",
    ):
        chain(fn.adam(1e-3), fn.sgd(0.1))
    with pytest.raises(TypeError, match="chain: the last argument must be an Optimizer"):
        chain(clip_by_global_norm(1.0))
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    optimizer = chain(clip_by_global_norm(1.0), fn.sgd(0.1))
    with pytest.raises(ValueError, match=r"chain: grads\['B'\] must have shape \(1, 2\)"):
        optimizer.update({"W": params["W"], "B": jnp.ones(2)}, optimizer.init(params), params)


# The network of a GPT block's parts, each parameter kind once
GPT_PARTS = fn.serial(
    fn.Embedding(11, 8),
    fn.PositionalEmbedding(4),
    fn.MultiHeadAttention(2),
    fn.LayerNorm(),
    fn.TimeDistributed(fn.Dense(5, fn.linear)),
)
GPT_PARAMS = GPT_PARTS.init(jax.random.PRNGKey(0), (-1, 4))[1]
WEIGHTS = {"[2].W_q", "[2].W_k", "[2].W_v", "[2].W_o", "[4].W"}
EMBEDDINGS = {"[0].W", "[1].W"}
OTHERS = {"[2].B_q", "[2].B_k", "[2].B_v", "[2].B_o", "[3].gamma", "[3].beta", "[4].B"}


def _by_label(labels):
    found = {}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        found.setdefault(label, set()).add(jax.tree_util.keystr(path))
    return found


def test_decay_labels_select_exactly_the_weights_not_the_biases_norms_or_chosen_embeddings():
    assert _by_label(decay_labels(GPT_PARAMS)) == {"decay": WEIGHTS | EMBEDDINGS, "no_decay": OTHERS}  # nanoGPT
    assert _by_label(decay_labels(GPT_PARAMS, embeddings=False)) == {"decay": WEIGHTS, "no_decay": OTHERS | EMBEDDINGS}
    # what a rule by rank picks: funcnet's (1, n) biases too
    by_rank = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(GPT_PARAMS) if x.ndim >= 2}
    assert by_rank - WEIGHTS - EMBEDDINGS == {"[2].B_q", "[2].B_k", "[2].B_v", "[2].B_o", "[4].B"}
    assert decay_labels(GPT_PARAMS) == decay_labels(GPT_PARTS.init(jax.random.PRNGKey(1), (-1, 4))[1])


@pytest.mark.parametrize("embeddings", [True, False])
def test_adamw_on_the_decay_group_alone_leaves_everything_else_undecayed(embeddings):
    """With zero gradients Adam's step is 0, so only the decay moves a param: the decayed ones
    shrink by exactly ``1 - lr * weight_decay``, the others stay bit for bit (the zero gradient's
    global norm is 0: no 0/0 either)."""
    lr, wd = 0.1, 0.5
    optimizer = chain(
        clip_by_global_norm(1.0),
        fn.multi_optimizer(
            {"decay": fn.adamw(lr, weight_decay=wd), "no_decay": fn.adamw(lr, weight_decay=0.0)},
            decay_labels(GPT_PARAMS, embeddings=embeddings),
        ),
    )
    zero = jax.tree_util.tree_map(jnp.zeros_like, GPT_PARAMS)
    new, _ = jax.jit(optimizer.update)(zero, optimizer.init(GPT_PARAMS), GPT_PARAMS)
    decayed = WEIGHTS | (EMBEDDINGS if embeddings else set())
    for (path, after), before in zip(
        jax.tree_util.tree_leaves_with_path(new), jax.tree_util.tree_leaves(GPT_PARAMS), strict=True
    ):
        if jax.tree_util.keystr(path) in decayed:
            np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))


def test_the_decay_groups_train_like_optax_adamw_with_its_mask():
    """nanoGPT's optimizer on the network, against optax's own spelling of it (one adamw with a
    decay mask, after a global clip), float64, a few steps of random gradients."""
    optax = pytest.importorskip("optax")
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), GPT_PARAMS)
    labels = decay_labels(params, embeddings=False)
    ours = chain(
        clip_by_global_norm(1.0),
        fn.multi_optimizer(
            {
                "decay": fn.adamw(0.01, 0.9, 0.95, weight_decay=0.1),
                "no_decay": fn.adamw(0.01, 0.9, 0.95, weight_decay=0.0),
            },
            labels,
        ),
    )
    mask = jax.tree_util.tree_map(lambda label: label == "decay", labels)
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.01, 0.9, 0.95, weight_decay=0.1, mask=mask))
    ours_p, ours_s, their_p, their_s = params, ours.init(params), params, theirs.init(params)
    keys = jax.random.split(jax.random.PRNGKey(5), 5)
    for key in keys:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        grads = jax.tree_util.tree_unflatten(
            treedef,
            [
                jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(jax.random.split(key, len(leaves)), leaves, strict=True)
            ],
        )
        ours_p, ours_s = ours.update(grads, ours_s, ours_p)
        with jax.numpy_dtype_promotion("standard"):
            updates, their_s = theirs.update(grads, their_s, their_p)
            their_p = optax.apply_updates(their_p, updates)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), ours_p, their_p)


def test_labels_by_field_matches_class_qualified_patterns_first_then_fields():
    labels = labels_by_field(GPT_PARAMS, {"W*": "weights", "*Embedding*.W": "tables", "gamma": "norm"}, default="rest")
    assert _by_label(labels) == {
        "tables": EMBEDDINGS,  # the qualified pattern wins though "W*" comes first
        "weights": WEIGHTS,
        "norm": {"[3].gamma"},
        "rest": OTHERS - {"[3].gamma"},
    }
    # dict keys are fields too; the labels work as multi_optimizer's
    params = {k: jnp.asarray(v) for k, v in START.items()}
    assert labels_by_field(params, {"W": "decay"}, default="no_decay") == GROUPS
    optimizer = fn.multi_optimizer({"decay": fn.sgd(0.1), "no_decay": None}, labels_by_field(params, GROUPS))
    new, _ = optimizer.update(params, optimizer.init(params), params)
    np.testing.assert_array_equal(new["b"], params["b"])
    np.testing.assert_allclose(new["W"], 0.9 * params["W"], rtol=1e-12)


def test_labels_by_field_leaves_layer_state_out_like_split_state():
    net = fn.serial(fn.Dense(4, fn.tanh), fn.BatchNorm(), fn.Dense(2, fn.linear))
    params = net.init(jax.random.PRNGKey(0), (-1, 3))[1]
    labels = decay_labels(params)
    assert labels[1] == fn.BatchNormParams(gamma="no_decay", beta="no_decay", stats=None)
    trainable = fn.split_state(params)[0]
    optimizer = fn.multi_optimizer({"decay": fn.adamw(0.1, weight_decay=0.5), "no_decay": fn.adam(0.1)}, labels)
    new, _ = optimizer.update(jax.tree_util.tree_map(jnp.zeros_like, trainable), optimizer.init(trainable), trainable)
    np.testing.assert_allclose(new[0].W, trainable[0].W * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new[1].gamma, trainable[1].gamma)


def test_labels_by_field_names_a_param_no_pattern_matches():
    with pytest.raises(
        ValueError, match=r"labels_by_field: params\[3\]\.gamma \(LayerNormParams\.gamma\) matches none"
    ):
        labels_by_field(GPT_PARAMS, {"W*": "decay", "B*": "no_decay"})
    with pytest.raises(ValueError, match=r"labels_by_field: params\[0\] matches none of the fields \['W'\]"):
        labels_by_field((jnp.ones(2),), {"W": "a"})
    with pytest.raises(TypeError, match="labels_by_field: fields must be a dict from field pattern to group name"):
        labels_by_field(GPT_PARAMS, {"W": 1})
    with pytest.raises(TypeError, match="decay_labels: embeddings must be a bool"):
        decay_labels(GPT_PARAMS, embeddings="no")


# --- Nothing silently wrong, round 4: large step counts, complex params, groups with layer state ---

LARGE = 10**10  # beyond int32


def _large_schedules():
    """(schedule, its formula at a step t, in float64), each with a count beyond int32."""
    cos = lambda t, n: 0.5 * (1 + np.cos(np.pi * min(t, n) / n))
    return [
        (fn.cosine_decay(1000.0, LARGE), lambda t: 1000.0 * cos(t, LARGE)),
        (fn.cosine_decay(1.0, LARGE, final=0.5), lambda t: 0.5 + 0.5 * cos(t, LARGE)),
        (fn.linear_decay(1.0, 0.5, LARGE), lambda t: 1.0 - 0.5 * min(t, LARGE) / LARGE),
        (fn.exponential_decay(1.0, 0.5, LARGE), lambda t: 0.5 ** (min(t, LARGE) / LARGE)),
        (fn.linear_decay(1.0, 0.5, 4, every=LARGE), lambda t: 1.0 - 0.5 * min(t // LARGE, 4) / 4),
        (fn.linear_decay(1.0, 0.5, LARGE, every=3), lambda t: 1.0 - 0.5 * min(t // 3, LARGE) / LARGE),
        (
            fn.warmup_cosine_decay(0.0, 1.0, LARGE, 2 * LARGE),
            lambda t: min(t, LARGE) / LARGE if t < LARGE else cos(t - LARGE, LARGE),
        ),
        (fn.warmup_cosine_decay(0.0, 1.0, 10, LARGE), lambda t: t / 10 if t < 10 else cos(t - 10, LARGE - 10)),
    ]


def test_schedules_with_step_counts_beyond_int32_evaluate_at_any_step():
    """A count beyond int32 (10**10 updates) was accepted and every evaluation then raised
    OverflowError; the counts are float data now, and the updates' own count stays exact."""
    steps = [0, 1, 7, 10, 2**31 - 1, 5 * 10**9, 3 * LARGE]
    for schedule, formula in _large_schedules():
        for t in steps:
            at = jnp.asarray(t, jnp.int32 if t < 2**31 else jnp.int64)
            np.testing.assert_allclose(schedule(at), formula(t), rtol=1e-12, atol=1e-15, err_msg=f"{schedule!r} at {t}")
        traced = jax.jit(schedule)(jnp.asarray(2**31 - 1, jnp.int32))  # the step count an optimizer state holds
        np.testing.assert_allclose(traced, formula(2**31 - 1), rtol=1e-12, atol=1e-15, err_msg=repr(schedule))
    assert repr(fn.cosine_decay(0.1, LARGE)) == f"cosine_decay(0.1, {LARGE}, final=0.0)"
    assert repr(fn.linear_decay(0.1, 0.01, 10, every=3)) == "linear_decay(0.1, 0.01, 10, every=3)"
    assert fn.cosine_decay(0.1, 100) == fn.cosine_decay(0.1, 100) != fn.cosine_decay(0.1, 101)


def test_an_optimizer_with_a_large_schedule_trains_and_a_sweep_over_the_counts_compiles_once():
    from test_sweep import compilations

    _fit(fn.momentum(fn.cosine_decay(0.05, 100), 0.9), epochs=1)
    _fit(fn.sgd(fn.linear_decay(0.05, 0.01, 100, every=2)), epochs=1)
    with compilations() as compiled:
        cosine = [_fit(fn.momentum(fn.cosine_decay(0.05, n), 0.9), epochs=1) for n in (LARGE, 1000, 2**40)]
        linear = [_fit(fn.sgd(fn.linear_decay(0.05, 0.01, n, every=e)), epochs=1) for n, e in ((LARGE, LARGE), (3, 2))]
    assert compiled == []
    for result in (*cosine, *linear):
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(result.params))
    # 8 updates of 10**10 barely move the cosine: the run equals a constant learning rate's
    constant = _fit(fn.momentum(0.05, 0.9), epochs=1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), cosine[0].params, constant.params)
    with pytest.raises(ValueError, match="accumulate: steps must be <= 2147483647"):
        fn.accumulate(fn.sgd(0.1), LARGE)


# Complex params: a real loss's jax.grad is the conjugate of the steepest-descent direction (jax's
# convention; optax asks for conj(jax.grad)), and the second moments use |g|**2.

C_TARGET = {"z": jnp.asarray([1.0 + 2.0j, -0.5 + 0.3j, 3.0 - 1.0j]), "w": jnp.asarray([[0.5 - 2.0j, 0.1j]])}
C_SCALE = {"z": jnp.asarray([1.0, 4.0, 0.25]), "w": jnp.asarray([[2.0, 0.5]])}


def _complex_loss(params):
    return sum(jnp.sum(C_SCALE[k] * jnp.abs(params[k] - C_TARGET[k]) ** 2) for k in params)


def _complex_run(update, state, steps, conjugate=False):
    params = jax.tree_util.tree_map(jnp.zeros_like, C_TARGET)
    update = jax.jit(update)
    for _ in range(steps):
        grads = jax.grad(_complex_loss)(params)
        params, state = update(jax.tree_util.tree_map(jnp.conj, grads) if conjugate else grads, state, params)
    return params


def _complex_twins():
    optax = pytest.importorskip("optax")
    return {
        "sgd": (fn.sgd(0.05), optax.sgd(0.05)),
        "momentum": (fn.momentum(0.02, 0.9), optax.sgd(0.02, momentum=0.9)),
        "adam": (fn.adam(0.05, b1=0.8, b2=0.95, eps=1e-6), optax.adam(0.05, b1=0.8, b2=0.95, eps=1e-6)),
        "adamw": (fn.adamw(0.05, weight_decay=0.1), optax.adamw(0.05, weight_decay=0.1)),
        "adam+clip_norm": (
            fn.adam(0.05, clip_norm=0.5),
            optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.05)),
        ),
        "sgd+weight_decay": (
            fn.sgd(0.05, weight_decay=0.1),
            optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05)),
        ),
    }


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "adam+clip_norm", "sgd+weight_decay"])
def test_complex_params_train_like_optax_fed_the_conjugate_gradient(name):
    optax = pytest.importorskip("optax")

    ours, theirs = _complex_twins()[name]
    params = jax.tree_util.tree_map(jnp.zeros_like, C_TARGET)

    def optax_update(g, s, p):
        u, s = theirs.update(g, s, p)
        return optax.apply_updates(p, u), s

    got = _complex_run(ours.update, ours.init(params), 40)
    with jax.numpy_dtype_promotion("standard"):
        want = _complex_run(optax_update, theirs.init(params), 40, conjugate=True)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)


@pytest.mark.parametrize(
    "optimizer",
    [
        fn.adam(fn.cosine_decay(0.1, 1500)),
        # 20 s each on 2 cores: Adam's |g|^2 is the complex case's point; the rest run with -m slow
        pytest.param(fn.sgd(0.05), marks=pytest.mark.slow),
        pytest.param(fn.momentum(0.02, 0.9), marks=pytest.mark.slow),
        pytest.param(fn.adagrad(0.5), marks=pytest.mark.slow),
        pytest.param(fn.adamw(fn.cosine_decay(0.1, 1500), weight_decay=0.0), marks=pytest.mark.slow),
    ],
    ids=repr,
)
def test_a_complex_quadratic_converges_to_its_minimum(optimizer):
    params = jax.tree_util.tree_map(jnp.zeros_like, C_TARGET)
    got = _complex_run(optimizer.update, optimizer.init(params), 1500)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3), got, C_TARGET)
    state = fn.adam(0.1).init(params)
    assert state.nu["z"].dtype == jnp.float64 and state.mu["z"].dtype == jnp.complex128  # |g|**2 is real
    with pytest.raises(TypeError, match="sgd: clip_value clips real numbers; params\\['w'\\] is complex128"):
        fn.sgd(0.1, clip_value=1.0).update(C_TARGET, fn.sgd(0.1).init(params), params)


# multi_optimizer's labels may have the whole params' shape: layer state's labels are not used.


def test_multi_optimizer_takes_labels_of_the_whole_params_with_batchnorm():
    net = fn.serial(fn.Dense(8, fn.tanh), fn.BatchNorm(), fn.Dense(2, fn.linear))
    params = net.init(jax.random.PRNGKey(0), (-1, 5))[1]
    labels = jax.tree_util.tree_map(lambda _: "body", params)  # the recipe of multi_optimizer's docstring
    labels = (labels[0], labels[1], jax.tree_util.tree_map(lambda _: "head", params[2]))
    groups = {"body": fn.sgd(0.05), "head": fn.adam(0.01)}
    run = lambda labels: fn.fit(
        net,
        fn.mean_squared_error,
        fn.multi_optimizer(groups, labels),
        params,
        (FIT_X, FIT_Y),
        epochs=2,
        batch_size=16,
        key=FIT_KEY,
    )
    whole = run(labels)
    trainable = run((labels[0], labels[1]._replace(stats=None), labels[2]))  # labels of split_state(params)[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, whole.params, trainable.params)
    assert not np.array_equal(whole.params[1].stats.mean, params[1].stats.mean)  # the statistics moved, untrained
    with pytest.raises(TypeError, match=r"labels must have the params' structure.*split_state"):
        fn.multi_optimizer(groups, labels).init(params)  # the optimizer is handed the trainable params only
