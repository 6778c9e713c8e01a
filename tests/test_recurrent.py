"""rnn, lstm and gru: the book's backpropagation through time against a plain lax.scan
reference (forward, jax.vjp of it, finite differences), the book's GRU caught, layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import funcnet as fn
from funcnet import recurrent

KEY = jax.random.PRNGKey(0)


def _time_major(f):
    """Run ``f(state, x_t) -> (state, h_t)`` over (batch, time, V) and return (batch, time, H), state."""

    def run(x, state):
        state, hs = lax.scan(f, state, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1), state

    return run


def rnn_reference(x, W, B, h0):
    def step(h, x_t):
        h = jnp.tanh(jnp.concatenate([x_t, h], axis=-1) @ W + B)
        return h, h

    return _time_major(step)(x, h0)[0]


def lstm_reference(x, W_f, B_f, W_i, B_i, W_c, B_c, W_o, B_o, h0, c0):
    def step(state, x_t):
        h, c = state
        z = jnp.concatenate([x_t, h], axis=-1)
        f, i, o = jax.nn.sigmoid(z @ W_f + B_f), jax.nn.sigmoid(z @ W_i + B_i), jax.nn.sigmoid(z @ W_o + B_o)
        c = f * c + i * jnp.tanh(z @ W_c + B_c)
        h = o * jnp.tanh(c)
        return (h, c), h

    hs, (_, c) = _time_major(step)(x, (h0, c0))
    return hs, c


def gru_reference(x, W_xr, W_hr, B_r, W_xu, W_hu, B_u, W_xh, W_hh, B_h, h0, *, book_update_gate=False):
    def step(h, x_t):
        r_int = x_t @ W_xr + h @ W_hr + B_r
        r = jax.nn.sigmoid(r_int)
        # the book's forward: u_int = X_r + H_r + B_u, the reset gate's pre-activation
        u = jax.nn.sigmoid(x_t @ W_xr + h @ W_hr + B_u if book_update_gate else x_t @ W_xu + h @ W_hu + B_u)
        h_bar = jnp.tanh(x_t @ W_xh + (r * h) @ W_hh + B_h)
        h = u * h + (1 - u) * h_bar
        return h, h

    return _time_major(step)(x, h0)[0]


# op name -> (op under test on flat arrays, reference, param shapes given (V, H))
def _lstm(x, *args):
    hs, (_, c_last) = fn.lstm(x, fn.LSTMParams(*args[:8]), *args[8:], return_state=True)
    return hs, c_last  # the final cell state's gradient path is checked too


OPS = {
    "rnn": (
        lambda x, W, B, *h0: fn.rnn(x, fn.RNNParams(W, B), *h0),
        rnn_reference,
        1,
        lambda v, h: [(v + h, h), (1, h)],
    ),
    "lstm": (_lstm, lstm_reference, 2, lambda v, h: [(v + h, h), (1, h)] * 4),
    "gru": (
        lambda x, *a: fn.gru(x, fn.GRUParams(*a[:9]), *a[9:]),
        gru_reference,
        1,
        lambda v, h: [(v, h), (h, h), (1, h)] * 3,
    ),
}
# (dtype, (batch, time, V, H, initial states given)): in CI each op is checked in float32 at batch 1,
# time 1 with states given and in float64 from zero states; `pytest -m slow` checks every pairing.
_SHAPES = [(1, 1, 3, 4, True), (3, 5, 2, 3, False), (2, 1, 4, 2, False), (1, 6, 2, 3, True)]
CASES = [
    pytest.param(dtype, shape, marks=() if (dtype, index) in {(np.float32, 0), (np.float64, 1)} else pytest.mark.slow)
    for index, shape in enumerate(_SHAPES)
    for dtype in (np.float32, np.float64)
]


def _args(name, batch, time, inputs, hidden, dtype, seed=0):
    rng = np.random.default_rng(seed)
    _, _, states, shapes = OPS[name]
    x = rng.standard_normal((batch, time, inputs)).astype(dtype)
    params = [(0.6 * rng.standard_normal(s)).astype(dtype) for s in shapes(inputs, hidden)]
    return x, params, [rng.standard_normal((batch, hidden)).astype(dtype) for _ in range(states)]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype,shape", CASES)
def test_bptt_matches_the_scan_reference_and_finite_differences(name, dtype, shape):
    batch, time, inputs, hidden, given = shape
    op, reference, _, _ = OPS[name]
    x, params, states = _args(name, batch, time, inputs, hidden, dtype)
    if given:
        fn.check_vjp(op, reference, x, *params, *states)
    else:  # zero initial states by default
        zeros = [np.zeros_like(s) for s in states]
        fn.check_vjp(op, lambda x, *p: reference(x, *p, *zeros), x, *params)


def _book_gru():
    """The book's GRUNode as published, in funcnet's terms (no output projection: the op's
    output gradient is the book's ``X_out_grad @ W_v.T``, the carried one its ``H_out_grad``)."""

    def forward(x, W_xr, W_hr, B_r, W_xu, W_hu, B_u, W_xh, W_hh, B_h, h0):
        return gru_reference(x, W_xr, W_hr, B_r, W_xu, W_hu, B_u, W_xh, W_hh, B_h, h0, book_update_gate=True)

    def fwd(*args):
        return forward(*args), args

    def bwd(args, output_grad):
        x, W_xr, W_hr, B_r, W_xu, W_hu, B_u, W_xh, W_hh, B_h, h0 = args
        grads = [jnp.zeros_like(a) for a in args]

        def step(carry, t):
            H_out_grad, acc = carry
            x_t, h_in, g = t
            r_int = x_t @ W_xr + h_in @ W_hr + B_r
            r, u = jax.nn.sigmoid(r_int), jax.nn.sigmoid(x_t @ W_xr + h_in @ W_hr + B_u)
            h_bar_int = x_t @ W_xh + (r * h_in) @ W_hh + B_h
            h_bar = jnp.tanh(h_bar_int)
            dh_out = g + H_out_grad  # computed ...
            del dh_out  # ... and not used: the book's backward uses H_out_grad below
            du = h_in * H_out_grad - h_bar * H_out_grad
            dh_bar_int = (1 - u) * H_out_grad * (1 - h_bar**2)
            dh_reset = dh_bar_int @ W_hh.T
            dr_int = dh_reset * h_in * r * (1 - r)
            du_int = du * u * (1 - u)
            dx = dh_bar_int @ W_xh.T + du_int @ W_xu.T + dr_int @ W_xr.T
            dh_in = dh_reset * r + du_int @ W_hu.T + dr_int @ W_hr.T  # no u * dh_out
            acc = [
                a + d
                for a, d in zip(
                    acc,
                    [
                        x_t.T @ dr_int,
                        h_in.T @ dr_int,
                        dr_int.sum(0, keepdims=True),
                        x_t.T @ du_int,
                        h_in.T @ du_int,
                        du_int.sum(0, keepdims=True),
                        x_t.T @ dh_bar_int,
                        (r * h_in).T @ dh_bar_int,
                        dh_bar_int.sum(0, keepdims=True),
                    ],
                    strict=True,
                )
            ]
            return (dh_in, acc), dx

        hs = forward(*args)
        h_prev = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
        steps = tuple(jnp.swapaxes(a, 0, 1) for a in (x, h_prev, output_grad))
        (dh0, acc), dx = lax.scan(step, (jnp.zeros_like(h0), grads[1:10]), steps, reverse=True)
        return (jnp.swapaxes(dx, 0, 1), *acc, dh0)

    book = jax.custom_vjp(forward)
    book.defvjp(fwd, bwd)
    return book


def test_check_vjp_catches_the_books_gru_and_its_gates_learn_nothing():
    x, params, states = _args("gru", 2, 4, 3, 3, np.float64)
    book = _book_gru()
    book_forward = lambda *a: gru_reference(*a, book_update_gate=True)
    with pytest.raises(AssertionError, match="vjp of fn and of reference for argument 0 disagree"):
        fn.check_vjp(book, book_forward, x, *params, *states)  # its backward is not its forward's
    with pytest.raises(AssertionError, match="forward outputs"):
        fn.check_vjp(book, gru_reference, x, *params, *states)  # its forward is not the GRU's
    loss = lambda *a: jnp.sum(jnp.sin(book(*a)))
    assert all(not np.any(g) for g in jax.grad(loss, argnums=tuple(range(11)))(x, *params, *states))
    fixed = jax.grad(lambda *a: jnp.sum(jnp.sin(OPS["gru"][0](*a))), argnums=tuple(range(11)))(x, *params, *states)
    assert all(np.any(g) for g in fixed)


@pytest.mark.parametrize("name", OPS)
def test_jit_vmap_and_reverse_over_reverse(name):
    op, reference, _, _ = OPS[name]
    x, params, states = _args(name, 2, 3, 2, 3, np.float64, seed=1)
    scalar = lambda f: lambda x, *a: sum(jnp.sum(jnp.sin(o)) for o in jax.tree_util.tree_leaves(f(x, *a)))
    args = (x, *params, *states)
    argnums = tuple(range(len(args)))
    grads = jax.jit(jax.grad(scalar(op), argnums))(*args)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
        grads,
        jax.jit(jax.grad(scalar(reference), argnums))(*args),
    )
    stacked = [jnp.stack([a, 0.5 * a]) for a in args]
    batched = jax.jit(jax.vmap(jax.grad(scalar(op), argnums)))(*stacked)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-10, atol=1e-13),
        batched,
        jax.jit(jax.grad(scalar(reference), argnums))(*(0.5 * a for a in args)),
    )
    hessian = jax.jit(jax.jacrev(jax.grad(lambda x: scalar(op)(x, *args[1:]))))(x)
    expected = jax.jit(jax.hessian(lambda x: scalar(reference)(x, *args[1:])))(x)
    np.testing.assert_allclose(hessian, expected, rtol=1e-9, atol=1e-12)


def _bad(name, **override):
    x, params, states = _args(name, 2, 3, 4, 5, np.float64)
    kind = {"rnn": fn.RNNParams, "lstm": fn.LSTMParams, "gru": fn.GRUParams}[name]
    call = dict(x=x, params=kind(*params), **dict(zip(("h0", "c0"), states, strict=False)))
    call.update(override)
    x, params = call.pop("x"), call.pop("params")
    return getattr(fn, name)(x, params, **call)


BAD = [
    (dict(x=np.ones((2, 4))), ValueError, r"x must be 3-D \(batch, time, features\), got shape \(2, 4\)"),
    (dict(x=np.ones((2, 3, 5))), ValueError, r"params\.\w+ must have shape .* for x with 5 features and 5 hidden"),
    (dict(x=np.ones((2, 3, 4), np.int32)), TypeError, "x must have a floating dtype, got int32"),
    (
        dict(x=np.ones((2, 3, 4), np.float32)),
        TypeError,
        r"x and params\.\w+ must share a dtype, got float32 and float64",
    ),
    (dict(x=np.ones((2, 0, 4))), ValueError, "x must have at least one row and one time step"),
    (dict(h0=np.ones((3, 5))), ValueError, r"h0 must have shape \(batch, H\) = \(2, 5\), got \(3, 5\)"),
    (dict(h0=[[0.0] * 5] * 2), TypeError, "h0 must be an array"),
    (dict(params=(1, 2)), TypeError, "params must be"),
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("override,error,message", BAD)
@pytest.mark.parametrize("jit", [False, True])
def test_bad_input_gets_a_clear_error(name, override, error, message, jit):
    with pytest.raises(error, match=rf"{name}: {message}" if "params must" not in message else message):
        jax.jit(lambda: _bad(name, **override))() if jit else _bad(name, **override)


def test_params_of_another_cell_and_a_wrong_c0_are_named():
    with pytest.raises(TypeError, match="rnn: params must be RNNParams, got LSTMParams"):
        _bad("rnn", params=fn.LSTMParams(*_args("lstm", 2, 3, 4, 5, np.float64)[1]))
    with pytest.raises(ValueError, match=r"lstm: c0 must have shape \(batch, H\)"):
        _bad("lstm", c0=np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"gru: params.W_hh must have shape \(5, 5\)"):
        params = _args("gru", 2, 3, 4, 5, np.float64)[1]
        _bad("gru", params=fn.GRUParams(*params[:7], np.ones((4, 5)), params[8]))


def test_return_state_carries_a_sequence_across_chunks():
    x, params, _ = _args("lstm", 2, 6, 3, 4, np.float64)
    p = fn.LSTMParams(*params)
    whole = fn.lstm(x, p)
    first, (h, c) = fn.lstm(x[:, :4], p, return_state=True)
    second = fn.lstm(x[:, 4:], p, h, c)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, rtol=1e-12)
    hs, last = fn.gru(x, fn.GRUParams(*_args("gru", 2, 6, 3, 4, np.float64)[1]), return_state=True)
    np.testing.assert_array_equal(last, hs[:, -1])


LAYERS = {
    "rnn": lambda: fn.RNN(6),
    "lstm": lambda: fn.LSTM(5),
    "gru": lambda: fn.GRU(4),
    "time-distributed": lambda: fn.TimeDistributed(fn.Dense(3, fn.tanh)),
    "book-stack": lambda: fn.serial(fn.LSTM(6), fn.LSTM(5), fn.TimeDistributed(fn.Dense(7, fn.linear))),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("input_shape", [(-1, 4, 3), (2, 1, 5)])
def test_layer_shape_agreement(name, input_shape):
    layer = LAYERS[name]()
    output_shape, params = layer.init(KEY, input_shape)
    x = jnp.ones(tuple(3 if d == -1 else d for d in input_shape))
    y = layer.apply(params, x)
    assert y.shape == jax.eval_shape(layer.apply, params, x).shape == tuple(3 if d == -1 else d for d in output_shape)
    assert LAYERS[name]() == layer and hash(LAYERS[name]()) == hash(layer)


def test_layers_in_summary_with_the_books_shapes_and_initializers():
    net = fn.serial(fn.LSTM(256), fn.TimeDistributed(fn.Dense(62, fn.linear)))
    text = fn.summary(net, (-1, 25, 62))
    # LSTM: 4 gates of (62 + 256) x 256 + 256; projection 256 x 62 + 62
    assert "LSTM(256)" in text and "(-1, 25, 256)" in text and "325,632" not in text
    assert f"Total params: {4 * (318 * 256 + 256) + 256 * 62 + 62:,}" in text
    assert "TimeDistributed(Dense(62, linear))" in text and "(-1, 25, 62)" in text
    _, params = fn.LSTM(3).init(KEY, (-1, 2, 4))
    assert not np.any(params.B_f) and params.W_f.shape == (7, 3)  # glorot weights, zero biases
    _, book = fn.GRU(3, w_init=fn.normal(0.01), b_init=fn.normal(0.01)).init(KEY, (-1, 2, 4))
    assert np.std(book.W_xr) < 0.05 and np.any(book.B_r)
    assert fn.LSTM(3, w_init=fn.normal(0.01)) == fn.LSTM(3, w_init=fn.normal(0.01)) != fn.LSTM(3)


def test_time_distributed_errors_and_layer_errors():
    with pytest.raises(ValueError, match=r"TimeDistributed\(Dense\(3, tanh\)\): input_shape must be at least 3-D"):
        fn.TimeDistributed(fn.Dense(3, fn.tanh)).init(KEY, (-1, 4))
    with pytest.raises(TypeError, match="TimeDistributed: layer must be a Layer"):
        fn.TimeDistributed("dense")
    with pytest.raises(ValueError, match=r"LSTM\(0\): hidden must be >= 1"):
        fn.LSTM(0)
    _, params = fn.RNN(4).init(KEY, (-1, 3, 2))
    with pytest.raises(TypeError, match=r"GRU\(4\): params must be GRUParams"):
        fn.GRU(4).apply(params, jnp.ones((1, 3, 2)))


def test_fit_trains_on_sequences_with_a_masked_last_batch_like_a_loop_over_train_step():
    from funcnet.train import epoch_order

    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 5, 3))
    y = rng.integers(0, 4, (23, 5)).astype(np.int32)
    net = fn.serial(fn.GRU(6), fn.TimeDistributed(fn.Dense(4, fn.linear)))
    _, params = net.init(KEY, (-1, 5, 3))
    optimizer = fn.sgd(0.5, clip_value=0.05)
    result = fn.fit(net, fn.softmax_cross_entropy, optimizer, params, (x, y), epochs=2, batch_size=8, key=KEY)
    step = jax.jit(fn.train_step(net, fn.softmax_cross_entropy, optimizer))
    p, state = params, optimizer.init(params)
    for e in range(2):
        order = epoch_order(KEY, e, 23)[0]
        for b in range(3):  # 8, 8 and a last batch of 7
            index = order[b * 8 : (b + 1) * 8]
            p, state, _ = step(p, state, x[index], y[index], None)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), result.params, p)


@pytest.mark.parametrize("name", OPS)
def test_check_vjp_catches_a_perturbed_backward(name):
    """Each op's check must fail when its backward is wrong by a little."""
    _, reference, _, _ = OPS[name]
    core, fwd, bwd = (getattr(recurrent, f"_{name}{part}") for part in ("", "_fwd", "_bwd"))
    wrong = jax.custom_vjp(core)
    wrong.defvjp(fwd, lambda r, g: jax.tree_util.tree_map(lambda c: 1.001 * c, bwd(r, g)))
    x, params, states = _args(name, 2, 3, 2, 3, np.float64)
    kind = {"rnn": fn.RNNParams, "lstm": fn.LSTMParams, "gru": fn.GRUParams}[name]
    with pytest.raises(AssertionError, match="disagree"):
        fn.check_vjp(lambda x, *a: wrong(x, kind(*a[: len(params)]), *a[len(params) :]), reference, x, *params, *states)
