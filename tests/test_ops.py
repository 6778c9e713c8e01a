"""Every op against three oracles: a plain jnp forward, jax.vjp of it, finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fn
from funcnet import ops


def _normal(seed, shape, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _away_from_zero(seed, shape, dtype):
    """Inputs at least 0.1 from ReLU's kink, so finite differences stay on one side."""
    x = _normal(seed, shape, dtype)
    return np.where(np.abs(x) < 0.1, x + np.where(x >= 0, 0.2, -0.2), x).astype(dtype)


# name -> (op, plain jnp reference, args(batch, features, dtype))
OPS = {
    "weight_multiply": (
        fn.weight_multiply,
        lambda x, W: x @ W,
        lambda b, f, d: (_normal(0, (b, f), d), _normal(1, (f, 3), d)),
    ),
    "bias_add": (fn.bias_add, lambda x, B: x + B, lambda b, f, d: (_normal(0, (b, f), d), _normal(1, (1, f), d))),
    "sigmoid": (fn.sigmoid, lambda x: 1 / (1 + jnp.exp(-x)), lambda b, f, d: (_normal(0, (b, f), d),)),
    "tanh": (fn.tanh, jnp.tanh, lambda b, f, d: (_normal(0, (b, f), d),)),
    "relu": (fn.relu, lambda x: jnp.maximum(x, 0), lambda b, f, d: (_away_from_zero(0, (b, f), d),)),
    "linear": (fn.linear, lambda x: x, lambda b, f, d: (_normal(0, (b, f), d),)),
    "dropout": (
        fn.dropout,
        lambda x, m: x * m,
        lambda b, f, d: (
            _normal(0, (b, f), d),
            np.where(np.random.default_rng(1).random((b, f)) < 0.7, 1 / 0.7, 0.0).astype(d),
        ),
    ),
}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@settings(max_examples=settings().max_examples // 5)  # each compiles: 3 in CI, 60 with HYPOTHESIS_PROFILE=long
@given(batch=st.integers(1, 64), features=st.integers(1, 32))
def test_op_matches_reference_and_finite_differences(name, dtype, batch, features):
    op, reference, make = OPS[name]
    args = make(batch, features, dtype)
    np.testing.assert_allclose(op(*args), reference(*args), rtol=1e-6)
    fn.check_vjp(op, reference, *args)


@pytest.mark.parametrize("name", OPS)
def test_op_under_jit_vmap_scan_and_second_order(name):
    op, reference, make = OPS[name]
    args = make(6, 4, jnp.float64)
    scalar = lambda *a: jnp.sum(jnp.sin(op(*a)))
    scalar_ref = lambda *a: jnp.sum(jnp.sin(reference(*a)))
    argnums = tuple(range(len(args)))
    g, g_ref = jax.jit(jax.grad(scalar, argnums))(*args), jax.grad(scalar_ref, argnums)(*args)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), g, g_ref)
    # vmap over a leading axis of every argument
    stacked = [jnp.stack([a, 2 * a]) for a in args]
    v, v_ref = jax.vmap(jax.grad(scalar, argnums))(*stacked), jax.vmap(jax.grad(scalar_ref, argnums))(*stacked)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), v, v_ref)

    # inside lax.scan: the gradient of a running sum over three steps
    def scanned(f):
        return lambda a0: jax.lax.scan(lambda c, _: (c + jnp.sum(f(a0, *args[1:]) ** 2), None), 0.0, None, length=3)[0]

    np.testing.assert_allclose(jax.grad(scanned(op))(args[0]), jax.grad(scanned(reference))(args[0]), rtol=1e-10)
    # second order: reverse-over-reverse through the hand-written backward
    h = jax.jit(jax.jacrev(jax.grad(lambda a0: scalar(a0, *args[1:]))))(args[0])
    h_ref = jax.jit(jax.jacrev(jax.grad(lambda a0: scalar_ref(a0, *args[1:]))))(args[0])
    np.testing.assert_allclose(h, h_ref, rtol=1e-9, atol=1e-12)


def test_sigmoid_is_stable_for_large_inputs():
    x = jnp.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with jax.debug_nans(True):
        y = fn.sigmoid(x)
        g = jax.grad(lambda x: fn.sigmoid(x).sum())(x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(np.asarray(y)[[0, 2, 4]], [0.0, 0.5, 1.0])


def test_relu_gradient_at_zero_is_zero():
    g = jax.grad(lambda x: fn.relu(x).sum())(jnp.array([-1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0])


def _book_relu():
    """The book's ReLU backward: the mask is taken on the clipped output (always >= 0)."""

    @jax.custom_vjp
    def book_relu(x):
        return jnp.maximum(x, 0)

    book_relu.defvjp(
        lambda x: (book_relu(x), book_relu(x)), lambda output, output_grad: (jnp.where(output >= 0, output_grad, 0.0),)
    )
    return book_relu


def test_check_vjp_catches_the_books_relu_backward():
    x = _away_from_zero(0, (8, 5), jnp.float64)
    with pytest.raises(AssertionError, match="argument 0 disagree: largest absolute error"):
        fn.check_vjp(_book_relu(), lambda x: jnp.maximum(x, 0), x)


@pytest.mark.parametrize("name", ["weight_multiply", "sigmoid", "bias_add"])
def test_check_vjp_catches_a_perturbed_backward(name):
    """Each op's check must fail when its backward is wrong by a little."""
    op, reference, make = OPS[name]
    args = make(4, 3, jnp.float64)
    fwd, bwd = getattr(ops, f"_{name}_fwd"), getattr(ops, f"_{name}_bwd")
    wrong = jax.custom_vjp(lambda *a: op(*a))
    wrong.defvjp(fwd, lambda r, g: tuple(c * 1.001 for c in bwd(r, g)))
    with pytest.raises(AssertionError, match="disagree"):
        fn.check_vjp(wrong, reference, *args)


def test_check_vjp_finite_differences_catch_a_wrong_reference_too():
    """If fn and reference share the same mistake, finite differences still disagree."""
    x = _normal(0, (4, 3), jnp.float64)

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.sin(x),))  # wrong: not cos

    @jax.custom_vjp
    def ref(x):
        return jnp.sin(x)

    ref.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.sin(x),))
    with pytest.raises(AssertionError, match="finite differences"):
        fn.check_vjp(f, ref, x)


BAD = [
    (
        lambda: fn.weight_multiply(jnp.ones((4, 3)), jnp.ones((5, 2))),
        ValueError,
        r"weight_multiply: x has 3 features but W expects 5 \(x.shape=\(4, 3\), W.shape=\(5, 2\)\).",
    ),
    (lambda: fn.weight_multiply(jnp.ones(3), jnp.ones((3, 2))), ValueError, "x must be 2-D"),
    (
        lambda: fn.weight_multiply(jnp.ones((4, 3), jnp.int32), jnp.ones((3, 2))),
        TypeError,
        "x must have a floating dtype, got int32",
    ),
    (
        lambda: fn.weight_multiply(jnp.ones((4, 3), jnp.float32), jnp.ones((3, 2))),
        TypeError,
        "x and W must share a dtype, got float32 and float64",
    ),
    (lambda: fn.weight_multiply([[1.0, 2.0]], jnp.ones((2, 2))), TypeError, "x must be an array"),
    (lambda: fn.bias_add(jnp.ones((4, 3)), jnp.ones((3,))), ValueError, r"bias_add: B must have shape \(1, 3\)"),
    (lambda: fn.bias_add(jnp.ones((4, 3)), jnp.ones((1, 2))), ValueError, r"got \(1, 2\)"),
    (lambda: fn.sigmoid(jnp.arange(3)), TypeError, "sigmoid: x must have a floating dtype"),
    (lambda: fn.dropout(jnp.ones((2, 3)), jnp.ones((3, 2))), ValueError, "dropout: mask must have the shape"),
]


@pytest.mark.parametrize("call,error,message", BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()
