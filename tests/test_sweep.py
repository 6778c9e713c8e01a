"""Compiled once per architecture: value-equal building blocks, hyperparameters as data.
(vmap over traced learning rates: tests/test_train.py.)

Compilations are counted as JAX reports them (``jax_log_compiles``: one "Compiling" record
per XLA compilation), so any program at all compiled during a sweep is caught, not just fit's.
"""

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)
ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)
X = rng.standard_normal((90, 6))
LABELS = (X[:, 0] + X[:, 1] > 0).astype(np.int32) + (X[:, 2] > 0.5).astype(np.int32)


@contextlib.contextmanager
def compilations():
    """The names of the programs XLA compiles inside the block."""
    names = []

    class Count(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                names.append(message.split(" ")[1])

    logger, handler = logging.getLogger("jax"), Count()
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield names
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)


def _net(width=16):
    return fn.serial(
        fn.Dense(width, fn.tanh, w_init=fn.glorot_normal, b_init=fn.zeros),
        fn.Dropout(0.1),
        fn.Dense(3, fn.linear, w_init=fn.glorot_normal, b_init=fn.zeros),
    )


def _group(path):
    """The first layer is the body; the last layer's W the head; its B frozen."""
    return "body" if path[0].idx == 0 else ("head" if path[-1].name == "W" else "frozen")


# Fresh optimizers of each kind, built from numbers: each kind is swept over other numbers.
OPTIMIZERS = {
    "sgd": lambda a: fn.sgd(0.1 * a, weight_decay=1e-3 * a, clip_norm=5.0 * a),
    "momentum": lambda a: fn.momentum(0.05 * a, 0.8 + 0.1 * a),
    "momentum+decay": lambda a: fn.momentum(fn.linear_decay(0.1 * a, 0.01 * a, int(3 + a), every=2), 0.9),
    "exponential": lambda a: fn.sgd(fn.exponential_decay(0.1 * a, 0.02, 4, every=int(1 + a))),
    "adagrad": lambda a: fn.adagrad(0.1 * a, 1e-7 * a, clip_value=2.0 * a),
    "adam": lambda a: fn.adam(1e-3 * a, b1=0.8 + 0.05 * a, b2=0.99 + 0.005 * a, eps=1e-8 * a),
    "adamw+warmup_cosine": lambda a: fn.adamw(
        fn.warmup_cosine_decay(1e-3 * a, 1e-2 * a, int(1 + a), int(8 + 2 * a), final=1e-4 * a),
        b1=0.8 + 0.05 * a,
        weight_decay=1e-2 * a,
    ),
    "momentum+cosine": lambda a: fn.momentum(fn.cosine_decay(0.1 * a, int(5 + 2 * a), final=0.01 * a), 0.9),
    "accumulate": lambda a: fn.accumulate(fn.sgd(0.1 * a), int(1 + 2 * a)),
    "multi_optimizer": lambda a: fn.multi_optimizer(
        {"body": fn.adam(1e-2 * a), "head": fn.sgd(0.1 * a, clip_norm=a), "frozen": None}, _group
    ),
}
POINTS = (1.0, 0.5, 1.5)


def _fit(optimizer, width=16, net=None, **kw):
    net = net or _net(width)
    _, params = net.init(KEY, (-1, 6))
    return fn.fit(
        net,
        fn.softmax_cross_entropy,
        optimizer,
        params,
        (X, LABELS),
        (X[:30], LABELS[:30]),
        epochs=4,
        batch_size=16,
        eval_every=2,
        patience=3,
        key=KEY,
        metrics={"accuracy": fn.accuracy},
        **kw,
    )


def test_equal_constructor_calls_give_equal_values():
    build = [
        lambda: _net(),
        lambda: fn.serial(fn.Conv2D(4, 3, fn.relu, stride=2), fn.MaxPool2D(2), fn.Flatten(), fn.serial(fn.Dense(3))),
        lambda: fn.Dense(16, fn.tanh),
        lambda: fn.adam(3e-3, b1=0.8, clip_norm=1.0),
        lambda: fn.momentum(fn.linear_decay(0.1, 0.01, 10, every=3), 0.9, weight_decay=1e-4),
        lambda: fn.exponential_decay(0.2, 0.1, 5),
    ]
    for make in build:
        a, b = make(), make()
        assert a is not b and a == b and hash(a) == hash(b)
    assert fn.Dense(16, fn.tanh) != fn.Dense(17, fn.tanh) != fn.Dense(17, fn.relu)
    assert fn.adam(1e-3) != fn.adam(3e-3) and fn.sgd(0.1) != fn.momentum(0.1)
    assert fn.linear_decay(0.1, 0.01, 10) != fn.exponential_decay(0.1, 0.01, 10)
    assert fn.sgd(0.1) == fn.sgd(np.float64(0.1)) == fn.sgd(0.1, weight_decay=0.0)
    init, apply = fn.Dense(4)  # still a stax-style pair
    assert fn.Layer(init, apply) == fn.Dense(4)


# Three kinds in CI (a plain one, a schedule inside a stateful one, the most numbers); every kind with -m slow.
KINDS = [
    pytest.param(kinds, marks=marks)
    for kinds, marks in (
        (("sgd", "momentum+decay", "adamw+warmup_cosine"), []),
        (tuple(OPTIMIZERS), [pytest.mark.slow]),
    )
]


@pytest.mark.parametrize("kinds", KINDS, ids=["three kinds", "every kind"])
def test_a_sweep_with_fresh_equal_nets_and_fresh_optimizers_compiles_nothing_new(kinds):
    for kind in kinds:  # the first fit of each kind compiles its programs
        _fit(OPTIMIZERS[kind](1.0))
    with compilations() as compiled:
        results = {(kind, a): _fit(OPTIMIZERS[kind](a)) for kind in kinds for a in POINTS}
    assert compiled == []
    # the numbers took effect: every point of a kind trained differently
    for kind in kinds:
        finals = [np.asarray(results[kind, a].params[0].W) for a in POINTS]
        assert not np.array_equal(finals[0], finals[1]) and not np.array_equal(finals[0], finals[2])


def test_another_architecture_or_kind_still_compiles():
    _fit(fn.sgd(0.1))
    with compilations() as compiled:
        _fit(fn.sgd(0.1), width=17)
    assert any("_segment" in name for name in compiled)
    with compilations() as compiled:
        _fit(fn.sgd(0.1, weight_decay=0.01))  # weight decay switched on: another program
    assert any("_segment" in name for name in compiled)


def test_a_users_closure_optimizer_works_and_compiles_per_object():
    base = fn.sgd(0.1)

    def closure():
        return fn.Optimizer(lambda p: base.init(p), lambda g, s, p: base.update(g, s, p))

    first = _fit(closure())
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, _fit(base).params)
    with compilations() as compiled:
        _fit(closure())
    assert any("_segment" in name for name in compiled)


SCRIPT = """
import sys, jax, numpy as np
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {tests!r})
import test_sweep as t
out = {{}}
for kind, a in {points!r}:  # each point is this process's first fit of its kind
    result = t._fit(t.OPTIMIZERS[kind](a))
    out[f"{{kind}}-{{a}}"] = np.asarray(result.params[0].W)
np.savez({path!r}, **out)
"""


def test_swept_results_equal_fits_run_in_a_fresh_process(tmp_path):
    points = [("momentum+decay", 1.5), ("adam", 0.5)]
    swept = {}
    for kind, a in points:  # here each point runs the program compiled for another point
        _fit(OPTIMIZERS[kind](1.0))
        swept[f"{kind}-{a}"] = np.asarray(_fit(OPTIMIZERS[kind](a)).params[0].W)
    path = tmp_path / "fresh.npz"
    code = SCRIPT.format(tests=str(ROOT / "tests"), points=points, path=str(path))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = np.load(path)
    for name, value in swept.items():
        np.testing.assert_array_equal(value, fresh[name])


def test_a_building_block_made_from_a_traced_number_compares_by_identity():
    def check(value):
        for make in (fn.Dropout, fn.sgd, lambda v: fn.momentum(fn.linear_decay(v, 0.01, 10))):
            block = make(value)
            assert block == block and isinstance(hash(block), int) and block != make(value)
        return value

    jax.jit(check)(0.2)


def test_networks_that_differ_only_in_their_initializers_share_programs():
    glorot = fn.serial(
        fn.Dense(16, fn.tanh, w_init=fn.glorot_normal),
        fn.Dropout(0.1),
        fn.Dense(3, fn.linear, w_init=fn.normal(0.1), b_init=fn.zeros),
    )
    assert glorot != _net() and glorot.apply == _net().apply  # init differs, apply does not
    _fit(fn.sgd(0.1))
    glorot.init(KEY, (-1, 6))  # its initializers run eagerly: compiled here, not counted below
    with compilations() as compiled:
        _fit(fn.sgd(0.1), net=glorot)
    assert compiled == []


def test_equal_partials_of_a_loss_and_a_metric_compile_once():
    """``functools.partial(fn.softmax_cross_entropy, ignore_index=...)``, rebuilt for every run (as a
    sweep does), selects the program by its function and arguments; another argument compiles."""
    import functools

    def run(ignore):
        loss = functools.partial(fn.softmax_cross_entropy, ignore_index=ignore)
        metric = functools.partial(fn.accuracy, ignore_index=ignore)
        net = _net()
        _, params = net.init(KEY, (-1, 6))
        return fn.fit(
            net, loss, fn.sgd(0.1), params, (X, LABELS), (X[:30], LABELS[:30]),
            epochs=2, batch_size=16, eval_every=2, key=KEY, metrics={"accuracy": metric},
        )  # fmt: skip

    run(-1)
    with compilations() as compiled:
        run(-1)
    assert compiled == []
    with compilations() as compiled:
        run(-100)
    assert any("_segment" in name for name in compiled)
