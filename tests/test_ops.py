"""Every op against three oracles: a plain jnp forward, jax.vjp of it, finite differences."""

import functools
import math

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


def _gelu_reference(x):
    """The exact GELU in plain jnp, in its stable form (for jit/vmap/scan/second order)."""
    return x * 0.5 * jax.lax.erfc(-x * 0.5**0.5)


def _gelu_tanh_reference(x):
    """The tanh GELU in plain jnp: 0.5 x (1 + tanh(u)) = x sigmoid(2u)."""
    return x * jax.nn.sigmoid(2 * ((2 / math.pi) ** 0.5 * (x + 0.044715 * x * x * x)))


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
    "gelu": (ops.gelu, lambda x: _gelu_reference(x), lambda b, f, d: ((2 * _normal(0, (b, f), d)).astype(d),)),
    "gelu_tanh": (
        ops.gelu_tanh,
        lambda x: _gelu_tanh_reference(x),
        lambda b, f, d: ((2 * _normal(0, (b, f), d)).astype(d),),
    ),
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


@pytest.mark.parametrize("name", ["weight_multiply", "sigmoid", "bias_add", "gelu", "gelu_tanh"])
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


# --- GELU: accuracy in low precision, both forms against jax.nn and torch --------------------


def _every_value(dtype, limit=8.0):
    """Every finite value of a 16-bit float dtype in [-limit, limit]: the densest grid there is."""
    values = np.arange(2**16, dtype=np.uint16).view(jnp.dtype(dtype))
    wide = values.astype(np.float32)
    return values[np.isfinite(wide) & (np.abs(wide) <= limit)]


def _ulp(value, dtype):
    """The spacing of ``dtype`` at each float64 ``value`` (its subnormal spacing below the normals)."""
    info = jnp.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(value), float(info.smallest_normal))))
    return 2.0 ** (exponent - info.nmant)


_GELU64 = {  # float64 on the host, in forms with no cancellation (math.erfc, math.exp)
    False: np.vectorize(lambda x: x * 0.5 * math.erfc(-x / math.sqrt(2.0))),
    True: np.vectorize(
        lambda x: x / (1.0 + math.exp(min(-2.0 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3), 700.0)))
    ),
}
_GELU_TEXTBOOK = {  # the old forms: 1 + erf / 1 + tanh in the input's dtype
    False: lambda x: 0.5 * x * (1 + jax.lax.erf(x * (1 / 2**0.5))),
    True: lambda x: 0.5 * x * (1 + jnp.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x**3))),
}


def _max_ulp_error(gelu, dtype, approximate, x=None):
    """The largest error of ``gelu`` over ``x`` (default: every value in [-8, 8]) in ulps of
    ``dtype`` against float64. Results below the smallest normal number are left out: XLA's CPU
    flushes float32 subnormals to zero, which costs a bfloat16 result there every digit."""
    x = _every_value(dtype) if x is None else x
    expected = _GELU64[approximate](x.astype(np.float64))
    got = np.asarray(jax.jit(gelu)(jnp.asarray(x)), np.float64)
    error = np.abs(got - expected) / _ulp(expected, dtype)
    return float(np.max(np.where(np.abs(expected) >= float(jnp.finfo(dtype).smallest_normal), error, 0.0)))


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gelu_is_within_one_ulp_of_float64_on_every_low_precision_value_in_minus_8_to_8(dtype, approximate):
    """Measured: 0.5 ulp (correctly rounded) for both forms and both dtypes. The textbook forms,
    1 + erf(...) and 1 + tanh(...) in the input's dtype, cancel for x below about -3: 255 ulps
    (bfloat16: every digit) and over 2,000 ulps (float16)."""
    new = _max_ulp_error(functools.partial(ops.gelu, approximate=approximate), dtype, approximate)
    old = _max_ulp_error(_GELU_TEXTBOOK[approximate], dtype, approximate)
    assert new <= 1.0, new
    assert old >= 100.0, old  # the same test fails the old formula


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_in_float32_is_far_closer_to_float64_than_the_textbook_form(approximate):
    """float32 is computed in float32 (XLA's erfc tail costs ~70 ulps near -8); the textbook form
    misses by millions of ulps there."""
    x = np.linspace(-8, 8, 20_001).astype(np.float32)
    new = _max_ulp_error(functools.partial(ops.gelu, approximate=approximate), jnp.float32, approximate, x)
    old = _max_ulp_error(_GELU_TEXTBOOK[approximate], jnp.float32, approximate, x)
    assert new <= 256.0 and old >= 1e6, (new, old)


def _gelu_points(dtype):
    """The tails, the middle and random points."""
    grid = np.linspace(-8, 8, 33)
    return np.concatenate([grid, 3 * np.random.default_rng(5).standard_normal(15)]).reshape(6, 8).astype(dtype)


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_matches_jax_nn_gelu_and_finite_differences(dtype, approximate):
    """jax.nn.gelu is evaluated in float64 and cast back: in float32 its own 1 + tanh(u) loses the
    gradient's digits for x below about -3 (relative error up to 1 near -5), where ours keeps them."""
    x = _gelu_points(dtype)
    op = ops.gelu_tanh if approximate else ops.gelu
    fn.check_vjp(op, lambda x: jax.nn.gelu(x.astype(jnp.float64), approximate=approximate).astype(x.dtype), x)
    fn.check_vjp(functools.partial(ops.gelu, approximate=approximate), _gelu_tanh_reference if approximate else
                 _gelu_reference, x)  # fmt: skip


def test_check_vjp_catches_a_tanh_gelu_backward_without_the_cubic_terms_derivative():
    """The slip one makes deriving it: u' = sqrt(2/pi) instead of sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""

    def forgetful(x, output_grad):
        u = (2 / math.pi) ** 0.5 * (x + 0.044715 * x**3)
        t = jnp.tanh(u)
        return (output_grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (2 / math.pi) ** 0.5),)

    wrong = jax.custom_vjp(ops._gelu_tanh)
    wrong.defvjp(ops._gelu_tanh_fwd, forgetful)
    x = np.linspace(-3, 3, 12).reshape(3, 4)
    fn.check_vjp(ops.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True), x)  # the right one passes
    with pytest.raises(AssertionError, match="argument 0 disagree"):
        fn.check_vjp(wrong, lambda x: jax.nn.gelu(x, approximate=True), x)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch_in_float64(approximate):
    torch = pytest.importorskip("torch")
    x = _gelu_points(np.float64)
    g = np.random.default_rng(6).standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    out = torch.nn.functional.gelu(xt, approximate=approximate)
    (out * torch.tensor(g)).sum().backward()
    ours, vjp = jax.vjp(functools.partial(ops.gelu, approximate=approximate == "tanh"), jnp.asarray(x))
    np.testing.assert_allclose(ours, out.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], xt.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_gelu_approximate_must_be_a_static_bool():
    x = jnp.ones(3)
    for bad in (1, None, "tanh", jnp.asarray(True)):
        with pytest.raises(TypeError, match="gelu: approximate must be a Python bool"):
            ops.gelu(x, approximate=bad)
    with pytest.raises(TypeError, match="gelu: approximate must be a Python bool"):
        jax.jit(lambda x, a: ops.gelu(x, approximate=a))(x, True)
    with pytest.raises(TypeError, match="positional"):
        ops.gelu(x, True)  # keyword-only: gelu stays a function of x alone
    np.testing.assert_array_equal(ops.gelu(x, approximate=np.bool_(True)), ops.gelu_tanh(x))
    with pytest.raises(TypeError, match="gelu_tanh: x must have a floating dtype"):
        ops.gelu_tanh(jnp.arange(3))


def test_gelu_forms_as_dense_activations():
    key = jax.random.PRNGKey(0)
    assert fn.Dense(3, ops.gelu_tanh) == fn.Dense(3, ops.gelu_tanh) != fn.Dense(3, ops.gelu)
    assert "gelu_tanh" in fn.summary(fn.Dense(3, ops.gelu_tanh), (-1, 2))
    _, params = fn.Dense(3, ops.gelu).init(key, (-1, 2))
    x = jnp.asarray(_normal(3, (4, 2), np.float64), params.W.dtype)
    named = fn.Dense(3, ops.gelu_tanh).apply(params, x)
    partial = fn.Dense(3, functools.partial(ops.gelu, approximate=True)).apply(params, x)
    np.testing.assert_array_equal(named, partial)
    assert not np.allclose(named, fn.Dense(3, ops.gelu).apply(params, x), rtol=0, atol=1e-6)


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
    (lambda: ops.gelu(jnp.arange(3), approximate=True), TypeError, "gelu: x must have a floating dtype"),
    (lambda: ops.gelu(jnp.ones(3), approximate=1), TypeError, "gelu: approximate must be a Python bool"),
]


@pytest.mark.parametrize("call,error,message", BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_input_gets_a_clear_error(call, error, message, jit):
    with pytest.raises(error, match=message):
        jax.jit(call)() if jit else call()


# --- check_vjp in float32 without x64 (issue "Nothing silently wrong, round 4") ----------------

# (features, rows, seed): networks whose float32 finite differences with the step 1e-2 (1 + max|x|)
# disagreed with the correct backward by 4% to 100%.
_FLOAT32_NETS = [(4, 1, 3), (8, 1, 3), (16, 4, 0), (16, 32, 1), (16, 32, 2)]


def _float32_net(features, rows, seed):
    net = fn.serial(fn.Dense(8, fn.tanh), fn.Dense(3, fn.linear))  # the book's default init
    _, params = net.init(jax.random.PRNGKey(seed), (-1, features))
    return net, params, jax.random.normal(jax.random.PRNGKey(100 + seed), (rows, features))


@pytest.mark.parametrize("features, rows, seed", _FLOAT32_NETS)
def test_float32_finite_differences_pass_a_correct_network_backward(features, rows, seed):
    """Without x64 the finite differences run in float32: a correct backward must pass."""
    with jax.enable_x64(False):
        net, params, x = _float32_net(features, rows, seed)
        fn.check_vjp(net.apply, net.apply, params, x, seed=seed)


def _tanh_with(backward):
    @jax.custom_vjp
    def tanh(x):
        return jnp.tanh(x)

    tanh.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)), lambda y, g: (backward(y, g),))
    return tanh


@pytest.mark.parametrize("features, rows, seed", _FLOAT32_NETS)
def test_float32_check_vjp_still_catches_a_wrong_network_backward(features, rows, seed):
    """A 0.1% perturbation (the vjp oracle), and a missing term shared by fn and reference (only
    the finite differences can see it: tanh's derivative without its ``- y**2``)."""
    with jax.enable_x64(False):
        _, params, x = _float32_net(features, rows, seed)

        def network(tanh):
            return lambda p, x: tanh(x @ p[0].W + p[0].B) @ p[1].W + p[1].B

        right = network(_tanh_with(lambda y, g: g * (1 - y * y)))
        perturbed = network(_tanh_with(lambda y, g: g * (1 - y * y) * 1.001))
        missing = network(_tanh_with(lambda y, g: g))
        fn.check_vjp(right, right, params, x, seed=seed)
        with pytest.raises(AssertionError, match="vjp of fn and of reference"):
            fn.check_vjp(perturbed, right, params, x, seed=seed)
        with pytest.raises(AssertionError, match="finite differences and vjp"):
            fn.check_vjp(missing, missing, params, x, seed=seed)
