"""Recurrent networks (book chapter 6): ``rnn``, ``lstm``, ``gru`` ops and their layers.

Contract, stated once:

* Sequences are ``(batch, time, features)``; row vectors times weights, ``x @ W``, as in the
  book. ``V`` is the input size, ``H`` the hidden size. Each op returns every hidden state,
  ``(batch, time, H)``; initial states default to zeros, and ``return_state=True`` also returns
  the final state(s), so a caller can carry state from one chunk of a sequence to the next.
* Each op is a ``jax.custom_vjp`` whose backward is the book's backpropagation through time: a
  reverse ``lax.scan`` applying the hand-derived per-step backward of its node (``RNNNode``,
  ``LSTMNode``, ``GRUNode``), carrying the hidden (and cell) state gradient back one step, and
  summing each weight's gradient over time. Not autodiff of the forward scan. Two
  rearrangements of the same sums make it fast: the input half of ``[x, h] @ W`` is one
  matmul over all steps before the scan, and the weight gradients, the book's per-step
  ``Z.T @ d_int``, are one contraction over all steps after it.
* The forward saves what the backward needs: the inputs, the hidden states, the gates (and the
  LSTM's cell states); the backward recomputes nothing but ``tanh(C)`` and ``r * h``.
* Checks (``ValueError``/``TypeError`` before anything compiles): ``x`` floating and 3-D, the
  params of the op's own type with shapes that agree with ``x`` and with each other, ``h0`` and
  ``c0`` of shape ``(batch, H)``, one dtype throughout.

The cells (``σ`` the logistic sigmoid):

* RNN: ``h = tanh([x, h] @ W + B)``, ``W: (V + H, H)``, ``B: (1, H)``.
* LSTM, no peepholes: ``f, i, o = σ([x, h] @ W_{f,i,o} + B_{f,i,o})``,
  ``c̄ = tanh([x, h] @ W_c + B_c)``, ``C = f * C + i * c̄``, ``h = o * tanh(C)``.
* GRU, the reset gate applied before the matmul (Keras ``GRU(reset_after=False)``, unlike
  ``torch.nn.GRU``): ``r = σ(x W_xr + h W_hr + B_r)``, ``u = σ(x W_xu + h W_hu + B_u)``,
  ``h̄ = tanh(x W_xh + (r * h) W_hh + B_h)``, ``h = u * h + (1 - u) * h̄``. The book's GRU as
  published gives the update gate the reset gate's pre-activation, uses the carried gradient
  where it computed ``dh_out`` and drops the direct path ``u * dh`` to the previous state;
  together these make every gradient of its gates exactly zero. This GRU is the corrected one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks, initializers
from funcnet.layers import (
    Layer,
    LayerSpec,
    check_input_shape,
    check_params,
    default_dtype,
    given_inputs,
    init_only,
    layer_name,
    layer_spec,
    spec_of,
    train_mode,
)

Array = jax.Array

__all__ = ["GRU", "LSTM", "RNN", "GRUParams", "LSTMParams", "RNNParams", "TimeDistributed", "gru", "lstm", "rnn"]


class RNNParams(NamedTuple):
    """``W: (V + H, H)`` acting on ``[x, h]``, ``B: (1, H)``. Book: RNNNode's ``W_f``, ``B_f``.

    From ``torch.nn.RNN(V, H, batch_first=True)`` (tanh, one layer):
    ``W = concatenate([weight_ih_l0.T, weight_hh_l0.T])``, ``B = (bias_ih_l0 + bias_hh_l0)[None]``.
    """

    W: jax.Array
    B: jax.Array


class LSTMParams(NamedTuple):
    """Forget, input, candidate and output gates: each ``W_*: (V + H, H)`` on ``[x, h]``, ``B_*: (1, H)``.

    From ``torch.nn.LSTM(V, H, batch_first=True)``: torch stacks its gates in the order
    (i, f, g, o), so with ``ih = weight_ih_l0.T``, ``hh = weight_hh_l0.T``, ``b = bias_ih_l0 +
    bias_hh_l0`` and ``k`` the gate's slice ``[k * H:(k + 1) * H]``:
    ``W_i = concatenate([ih[:, 0], hh[:, 0]])``, ``W_f`` with slice 1, ``W_c`` with slice 2 (torch's
    g), ``W_o`` with slice 3, and ``B_* = b[slice][None]``.
    """

    W_f: jax.Array
    B_f: jax.Array
    W_i: jax.Array
    B_i: jax.Array
    W_c: jax.Array
    B_c: jax.Array
    W_o: jax.Array
    B_o: jax.Array


class GRUParams(NamedTuple):
    """Reset, update and candidate: ``W_x*: (V, H)``, ``W_h*: (H, H)``, ``B_*: (1, H)``."""

    W_xr: jax.Array
    W_hr: jax.Array
    B_r: jax.Array
    W_xu: jax.Array
    W_hu: jax.Array
    B_u: jax.Array
    W_xh: jax.Array
    W_hh: jax.Array
    B_h: jax.Array


# --- Shared pieces ------------------------------------------------------------------------


def _check(fn: str, x: Any, params: Any, kind: Any, states: dict[str, Any]) -> tuple[int, int]:
    """Check x, params and the initial states; return ``(V, H)``."""
    _checks.floating(fn, "x", x)
    _checks.rank(fn, "x", x, 3, "(batch, time, features)")
    if not isinstance(params, kind):
        raise TypeError(f"{fn}: params must be {kind.__name__}, got {type(params).__name__}.")
    for name, value in params._asdict().items():
        _checks.floating(fn, f"params.{name}", value)
        _checks.same_dtype(fn, ("x", f"params.{name}"), x, value)
    batch, time, inputs = x.shape
    if batch == 0 or time == 0:
        raise ValueError(f"{fn}: x must have at least one row and one time step, got shape {tuple(x.shape)}.")
    bias = next(value for name, value in params._asdict().items() if name.startswith("B"))
    hidden = bias.shape[-1] if bias.ndim else 0  # a 0-D bias fails the shape check below
    for name, value in params._asdict().items():
        want = _param_shape(kind, name, inputs, hidden)
        if value.shape != want:
            raise ValueError(
                f"{fn}: params.{name} must have shape {want} for x with {inputs} features and "
                f"{hidden} hidden units, got {tuple(value.shape)}."
            )
    for name, state in states.items():
        if state is None:
            continue
        _checks.floating(fn, name, state)
        _checks.same_dtype(fn, ("x", name), x, state)
        if state.shape != (batch, hidden):
            raise ValueError(f"{fn}: {name} must have shape (batch, H) = {(batch, hidden)}, got {tuple(state.shape)}.")
    return inputs, hidden


def _param_shape(kind: Any, name: str, inputs: int, hidden: int) -> tuple[int, int]:
    if name.startswith("B"):
        return (1, hidden)
    if kind is GRUParams:
        return (inputs, hidden) if name.startswith("W_x") else (hidden, hidden)
    return (inputs + hidden, hidden)


def _zeros(x: jax.Array, hidden: int, state: Any) -> jax.Array:
    return jnp.zeros((x.shape[0], hidden), x.dtype) if state is None else state


def _previous(first: jax.Array, states: jax.Array) -> jax.Array:
    """The state before each step, time-major: ``first`` then all but the last of ``states``."""
    return jnp.concatenate([first[None], states[:-1]])


def _rows(a: jax.Array) -> jax.Array:
    """``(batch, time, F)`` as time-major rows ``(time * batch, F)``: one small transpose of the input."""
    return jnp.swapaxes(a, 0, 1).reshape(-1, a.shape[-1])


def _input_part(x_rows: jax.Array, W_x: jax.Array, B: jax.Array, time: int) -> jax.Array:
    """``x_t @ W_x + B`` for every step at once, one matmul, time-major ``(time, batch, ·)``.

    A scan over gated cells takes it gate by gate (one array per gate, split before the scan):
    XLA's CPU loop fusions ran 3-6x slower when a step read a sigmoid's or tanh's argument
    through a static slice of its dynamically sliced step (the LSTM's forward: 18 ms -> 10 ms).
    """
    return (x_rows @ W_x + B).reshape(time, -1, W_x.shape[1])


def _flat(a: jax.Array) -> jax.Array:
    """Time-major ``(time, batch, F)`` as rows ``(time * batch, F)`` (free: no data moves)."""
    return a.reshape(-1, a.shape[-1])


def _weight_grads(x_rows: jax.Array, h_prev: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The book's per-step ``Z.T @ d_int`` summed over time, for ``Z = [x, h_prev]``: one matmul
    over all steps, ``(V + H, G)``; and the bias's, ``(1, G)``."""
    rows = _flat(d)
    return jnp.concatenate([x_rows, _flat(h_prev)], axis=1).T @ rows, jnp.sum(rows, axis=0)[None]


def _input_grad(d: jax.Array, W_x: jax.Array, batch: int) -> jax.Array:
    """``d_int @ W_x.T`` for every step at once, back to ``(batch, time, V)``."""
    return jnp.swapaxes((_flat(d) @ W_x.T).reshape(-1, batch, W_x.shape[0]), 0, 1)


def _split(a: jax.Array, parts: int) -> list[jax.Array]:
    return jnp.split(a, parts, axis=-1)


def _sigmoid(z: jax.Array) -> jax.Array:
    return lax.logistic(z)


# --- RNN (book: RNNNode) ---------------------------------------------------------------------


def _rnn_forward(x: Array, params: RNNParams, h0: Array) -> Array:
    inputs = x.shape[-1]
    W_h = params.W[inputs:]

    def step(h: Array, xw: Array) -> tuple[Array, Array]:
        h = jnp.tanh(xw + h @ W_h)
        return h, h

    _, hs = lax.scan(step, h0, _input_part(_rows(x), params.W[:inputs], params.B, x.shape[1]))
    return hs  # time-major


def _rnn(x: Array, params: RNNParams, h0: Array) -> Array:
    return jnp.swapaxes(_rnn_forward(x, params, h0), 0, 1)


def _rnn_fwd(x: Array, params: RNNParams, h0: Array) -> tuple[Array, Any]:
    hs = _rnn_forward(x, params, h0)
    return jnp.swapaxes(hs, 0, 1), (x, params, h0, hs)


def _rnn_bwd(residuals: Any, output_grad: Array) -> tuple[Array, RNNParams, Array]:
    x, params, h0, hs = residuals
    inputs = x.shape[-1]
    W_x, W_h = params.W[:inputs], params.W[inputs:]

    # RNNNode.backward: dH_int = dh * dtanh(H_int)
    def step(dh_next: Array, t: tuple[Array, Array]) -> tuple[Array, Array]:
        g, h = t
        d = (g + dh_next) * (1 - h * h)
        return d @ W_h.T, d

    dh0, d = lax.scan(step, jnp.zeros_like(h0), (jnp.swapaxes(output_grad, 0, 1), hs), reverse=True)
    dW, dB = _weight_grads(_rows(x), _previous(h0, hs), d)
    return _input_grad(d, W_x, x.shape[0]), RNNParams(dW, dB), dh0


_rnn_vjp = jax.custom_vjp(_rnn)
_rnn_vjp.defvjp(_rnn_fwd, _rnn_bwd)


@overload
def rnn(x: Array, params: RNNParams, h0: Array | None = None, *, return_state: Literal[False] = False) -> Array: ...
@overload
def rnn(
    x: Array, params: RNNParams, h0: Array | None = None, *, return_state: Literal[True]
) -> tuple[Array, Array]: ...
def rnn(
    x: Array, params: RNNParams, h0: Array | None = None, *, return_state: bool = False
) -> Array | tuple[Array, Array]:
    """Every hidden state of ``h = tanh([x, h] @ W + B)``: ``(batch, time, H)``. Book: RNNLayer's cells.

    Args:
      x: ``(batch, time, V)``.
      params: ``RNNParams(W, B)``.
      h0: ``(batch, H)`` initial state; zeros if ``None``.
      return_state: also return the final state, ``(hs, h_last)``.

    Returns:
      ``hs: (batch, time, H)``, or ``(hs, h_last)`` with ``return_state=True``.
    """
    _, hidden = _check("rnn", x, params, RNNParams, {"h0": h0})
    hs = _rnn_vjp(x, params, _zeros(x, hidden, h0))
    return (hs, hs[:, -1]) if return_state else hs


# --- LSTM (book: LSTMNode) -------------------------------------------------------------------


def _lstm_weights(params: LSTMParams) -> tuple[jax.Array, jax.Array]:
    """The four gates side by side, (f, i, c, o): ``W: (V + H, 4H)``, ``B: (1, 4H)``."""
    return (
        jnp.concatenate([params.W_f, params.W_i, params.W_c, params.W_o], axis=1),
        jnp.concatenate([params.B_f, params.B_i, params.B_c, params.B_o], axis=1),
    )


def _lstm_forward(x: Array, params: LSTMParams, h0: Array, c0: Array) -> tuple[Array, ...]:
    inputs = x.shape[-1]
    W, B = _lstm_weights(params)
    W_h = W[inputs:]

    def step(state: tuple[Array, Array], xw: tuple[Array, ...]) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
        h, c = state
        z_f, z_i, z_c, z_o = (a + b for a, b in zip(xw, _split(h @ W_h, 4), strict=True))
        f, i, c_bar, o = _sigmoid(z_f), _sigmoid(z_i), jnp.tanh(z_c), _sigmoid(z_o)
        c = f * c + i * c_bar
        h = o * jnp.tanh(c)
        return (h, c), (h, c, f, i, c_bar, o)

    _, saved = lax.scan(step, (h0, c0), tuple(_split(_input_part(_rows(x), W[:inputs], B, x.shape[1]), 4)))
    return saved  # time-major: hs, cs and the gates


def _lstm(x: Array, params: LSTMParams, h0: Array, c0: Array) -> tuple[Array, Array]:
    hs, cs = _lstm_forward(x, params, h0, c0)[:2]
    return jnp.swapaxes(hs, 0, 1), cs[-1]


def _lstm_fwd(x: Array, params: LSTMParams, h0: Array, c0: Array) -> tuple[tuple[Array, Array], Any]:
    saved = _lstm_forward(x, params, h0, c0)
    hs, cs = saved[:2]
    return (jnp.swapaxes(hs, 0, 1), cs[-1]), (x, params, h0, c0, saved)


def _lstm_bwd(residuals: Any, output_grads: tuple[Array, Array]) -> tuple[Array, LSTMParams, Array, Array]:
    x, params, h0, c0, (hs, cs, f, i, c_bar, o) = residuals
    output_grad, c_last_grad = output_grads
    inputs = x.shape[-1]
    W, _ = _lstm_weights(params)
    W_x, W_h = W[:inputs], W[inputs:]

    # LSTMNode.backward, gate by gate
    def step(carry: tuple[Array, Array], t: tuple[Array, ...]) -> tuple[tuple[Array, Array], Array]:
        dh_next, dc_next = carry
        g, c, c_prev, f, i, c_bar, o = t
        tanh_c = jnp.tanh(c)
        dh = g + dh_next
        do_int = dh * tanh_c * o * (1 - o)
        dc = dh * o * (1 - tanh_c * tanh_c) + dc_next
        dc_bar_int = dc * i * (1 - c_bar * c_bar)
        di_int = dc * c_bar * i * (1 - i)
        df_int = dc * c_prev * f * (1 - f)
        d = jnp.concatenate([df_int, di_int, dc_bar_int, do_int], axis=-1)
        return (d @ W_h.T, f * dc), d

    steps = (jnp.swapaxes(output_grad, 0, 1), cs, _previous(c0, cs), f, i, c_bar, o)
    (dh0, dc0), d = lax.scan(step, (jnp.zeros_like(h0), c_last_grad), steps, reverse=True)
    dW_all, dB_all = _weight_grads(_rows(x), _previous(h0, hs), d)
    dW, dB = _split(dW_all, 4), _split(dB_all, 4)
    grads = LSTMParams(dW[0], dB[0], dW[1], dB[1], dW[2], dB[2], dW[3], dB[3])
    return _input_grad(d, W_x, x.shape[0]), grads, dh0, dc0


_lstm_vjp = jax.custom_vjp(_lstm)
_lstm_vjp.defvjp(_lstm_fwd, _lstm_bwd)


@overload
def lstm(
    x: Array,
    params: LSTMParams,
    h0: Array | None = None,
    c0: Array | None = None,
    *,
    return_state: Literal[False] = False,
) -> Array: ...
@overload
def lstm(
    x: Array, params: LSTMParams, h0: Array | None = None, c0: Array | None = None, *, return_state: Literal[True]
) -> tuple[Array, tuple[Array, Array]]: ...
def lstm(
    x: Array,
    params: LSTMParams,
    h0: Array | None = None,
    c0: Array | None = None,
    *,
    return_state: bool = False,
) -> Array | tuple[Array, tuple[Array, Array]]:
    """Every hidden state of the LSTM (module docstring): ``(batch, time, H)``. Book: LSTMLayer's cells.

    Args:
      x: ``(batch, time, V)``.
      params: ``LSTMParams(W_f, B_f, W_i, B_i, W_c, B_c, W_o, B_o)``.
      h0: ``(batch, H)`` initial hidden state; zeros if ``None``.
      c0: ``(batch, H)`` initial cell state; zeros if ``None``.
      return_state: also return the final states, ``(hs, (h_last, c_last))``.

    Returns:
      ``hs: (batch, time, H)``, or ``(hs, (h_last, c_last))`` with ``return_state=True``.
    """
    _, hidden = _check("lstm", x, params, LSTMParams, {"h0": h0, "c0": c0})
    h0 = _zeros(x, hidden, h0)
    hs, c_last = _lstm_vjp(x, params, h0, _zeros(x, hidden, c0))
    return (hs, (hs[:, -1], c_last)) if return_state else hs


# --- GRU (book: GRUNode, corrected) ----------------------------------------------------------


def _gru_weights(params: GRUParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input weights side by side (r, u, h̄) ``(V, 3H)``, biases ``(1, 3H)``, recurrent (r, u) ``(H, 2H)``."""
    return (
        jnp.concatenate([params.W_xr, params.W_xu, params.W_xh], axis=1),
        jnp.concatenate([params.B_r, params.B_u, params.B_h], axis=1),
        jnp.concatenate([params.W_hr, params.W_hu], axis=1),
    )


def _gru_forward(x: Array, params: GRUParams, h0: Array) -> tuple[Array, ...]:
    W_x, B, W_ru = _gru_weights(params)
    hidden = h0.shape[-1]

    def step(h: Array, xw: tuple[Array, Array]) -> tuple[Array, tuple[Array, ...]]:
        xw_ru, xw_h = xw
        r, u = _split(_sigmoid(xw_ru + h @ W_ru), 2)
        h_bar = jnp.tanh(xw_h + (r * h) @ params.W_hh)
        h = u * h + (1 - u) * h_bar
        return h, (h, r, u, h_bar)

    xw = _input_part(_rows(x), W_x, B, x.shape[1])
    _, saved = lax.scan(step, h0, (xw[..., : 2 * hidden], xw[..., 2 * hidden :]))
    return saved  # time-major: hs and the gates


def _gru(x: Array, params: GRUParams, h0: Array) -> Array:
    return jnp.swapaxes(_gru_forward(x, params, h0)[0], 0, 1)


def _gru_fwd(x: Array, params: GRUParams, h0: Array) -> tuple[Array, Any]:
    saved = _gru_forward(x, params, h0)
    return jnp.swapaxes(saved[0], 0, 1), (x, params, h0, saved)


def _gru_bwd(residuals: Any, output_grad: Array) -> tuple[Array, GRUParams, Array]:
    x, params, h0, (hs, r, u, h_bar) = residuals
    W_x, _, W_ru = _gru_weights(params)
    h_prev = _previous(h0, hs)

    # GRUNode.backward, corrected: dh is the output's and the next step's
    def step(dh_next: Array, t: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array]]:
        g, h, r, u, h_bar = t
        dh = g + dh_next
        du_int = dh * (h - h_bar) * u * (1 - u)
        dh_bar_int = dh * (1 - u) * (1 - h_bar * h_bar)
        d_reset = dh_bar_int @ params.W_hh.T  # the gradient of r * h
        dr_int = d_reset * h * r * (1 - r)
        d_ru = jnp.concatenate([dr_int, du_int], axis=-1)
        return dh * u + d_reset * r + d_ru @ W_ru.T, (d_ru, dh_bar_int)

    dh0, (d_ru, dh_bar_int) = lax.scan(
        step, jnp.zeros_like(h0), (jnp.swapaxes(output_grad, 0, 1), h_prev, r, u, h_bar), reverse=True
    )
    d = jnp.concatenate([d_ru, dh_bar_int], axis=-1)
    d_rows = _flat(d)
    dW_x = _split(_rows(x).T @ d_rows, 3)
    dW_ru = _split(_flat(h_prev).T @ _flat(d_ru), 2)
    dW_hh = _flat(r * h_prev).T @ _flat(dh_bar_int)
    dB = _split(jnp.sum(d_rows, axis=0)[None], 3)
    grads = GRUParams(dW_x[0], dW_ru[0], dB[0], dW_x[1], dW_ru[1], dB[1], dW_x[2], dW_hh, dB[2])
    return _input_grad(d, W_x, x.shape[0]), grads, dh0


_gru_vjp = jax.custom_vjp(_gru)
_gru_vjp.defvjp(_gru_fwd, _gru_bwd)


@overload
def gru(x: Array, params: GRUParams, h0: Array | None = None, *, return_state: Literal[False] = False) -> Array: ...
@overload
def gru(
    x: Array, params: GRUParams, h0: Array | None = None, *, return_state: Literal[True]
) -> tuple[Array, Array]: ...
def gru(
    x: Array, params: GRUParams, h0: Array | None = None, *, return_state: bool = False
) -> Array | tuple[Array, Array]:
    """Every hidden state of the (corrected) GRU (module docstring): ``(batch, time, H)``. Book: GRULayer's cells.

    Args:
      x: ``(batch, time, V)``.
      params: ``GRUParams(W_xr, W_hr, B_r, W_xu, W_hu, B_u, W_xh, W_hh, B_h)``.
      h0: ``(batch, H)`` initial state; zeros if ``None``.
      return_state: also return the final state, ``(hs, h_last)``.

    Returns:
      ``hs: (batch, time, H)``, or ``(hs, h_last)`` with ``return_state=True``.
    """
    _, hidden = _check("gru", x, params, GRUParams, {"h0": h0})
    hs = _gru_vjp(x, params, _zeros(x, hidden, h0))
    return (hs, hs[:, -1]) if return_state else hs


# --- Layers --------------------------------------------------------------------------------

_CELLS: dict[str, tuple[Callable[..., Any], Any]] = {
    "RNN": (rnn, RNNParams),
    "LSTM": (lstm, LSTMParams),
    "GRU": (gru, GRUParams),
}


@layer_spec
class _Recurrent(LayerSpec):
    cell: str
    hidden: int
    w_init: initializers.Initializer = init_only()
    b_init: initializers.Initializer = init_only()
    dtype: Any = init_only()

    @property
    def name(self) -> str:
        return f"{self.cell}({self.hidden})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        batch, time, inputs = check_input_shape(self.name, input_shape, 3, "(batch, time, features)")
        _, kind = _CELLS[self.cell]
        keys = iter(jax.random.split(key, len(kind._fields)))
        params = kind(
            *(
                self.w_init(next(keys), _param_shape(kind, name, inputs, self.hidden), self.dtype)
                if name.startswith("W")
                else self.b_init(next(keys), (1, self.hidden), self.dtype)
                for name in kind._fields
            )
        )
        return (batch, time, self.hidden), params

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        raise TypeError(
            f"{self.name}: decoding with a cache is written for attention networks; a recurrent layer "
            "would need its hidden state carried between steps (run the sequence through apply instead)."
        )

    def apply(
        self,
        params: Any,
        x: Any,
        *,
        key: jax.Array | None = None,
        initial_state: Any = None,
        return_state: bool = False,
    ) -> Any:
        """Every hidden state, ``(batch, time, hidden)``; with ``return_state``, ``(hs, state)``.

        ``initial_state`` (default zeros) and the returned ``state`` are ``h`` of shape
        ``(batch, hidden)`` for RNN and GRU and the pair ``(h, c)`` for LSTM, so a state returned
        by one call starts the next: feeding a sequence one step at a time gives the same hidden
        states as feeding it whole (the way to sample from a trained model).
        """
        del key  # deterministic
        op, kind = _CELLS[self.cell]
        check_params(self.name, params, kind, f"{kind.__name__}(...)")
        if _checks.is_array(x) and jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{self.name}: x holds integers {tuple(x.shape)}, but a recurrent layer takes feature "
                "vectors (batch, time, features). For token ids, one-hot them "
                "(jax.nn.one_hot(ids, vocab_size)) or put an Embedding(vocab_size, features) first."
            )
        if not isinstance(return_state, (bool, np.bool_)):
            raise TypeError(f"{self.name}: return_state must be a bool, got {type(return_state).__name__}.")
        states: tuple[Any, ...] = ()
        if initial_state is not None:
            if self.cell == "LSTM":
                if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                    raise TypeError(
                        f"{self.name}: initial_state must be the pair (h, c) an LSTM returns with "
                        f"return_state=True, got {type(initial_state).__name__}."
                    )
                states = tuple(initial_state)
            else:
                states = (initial_state,)
        if not return_state:
            return op(x, params, *states)
        return op(x, params, *states, return_state=True)


def _recurrent(
    cell: str, hidden: int, w_init: initializers.Initializer, b_init: initializers.Initializer, dtype: Any
) -> Layer:
    _checks.positive_int(f"{cell}({hidden})", "hidden", hidden)
    for name, init in (("w_init", w_init), ("b_init", b_init)):
        _checks.callable_(f"{cell}({hidden})", name, init)
    return _Recurrent(cell, int(hidden), w_init, b_init, default_dtype(dtype)).layer()


def RNN(
    hidden: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    dtype: Any = None,
) -> Layer:
    """``rnn`` over ``(batch, time, V)`` sequences: ``(batch, time, hidden)``. Book: RNNLayer.

    ``apply(params, x, initial_state=h, return_state=True)`` starts from ``h`` instead of zeros
    and also returns the final state, to carry it from one call to the next (sampling).

    Defaults: ``glorot_normal`` weights and zero biases (the book draws all of them from
    ``N(0, 2 / (V + output))``; pass ``w_init=b_init=normal(...)`` to follow it). The book's
    output projection is a separate layer: ``TimeDistributed(Dense(O, linear))``.

    Args:
      hidden: the hidden state's size H.
      w_init: the weights' initializer; default ``glorot_normal``.
      b_init: the biases' initializer; default ``zeros``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` from ``(batch, time, V)`` to ``(batch, time, hidden)``; params ``RNNParams``.
    """
    return _recurrent("RNN", hidden, w_init, b_init, dtype)


def LSTM(
    hidden: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    dtype: Any = None,
) -> Layer:
    """``lstm`` over ``(batch, time, V)`` sequences. Book: LSTMLayer.

    ``apply(params, x, initial_state=(h, c), return_state=True)`` starts from ``(h, c)`` instead
    of zeros and also returns the final ``(h, c)``, to carry it from one call to the next.

    Defaults: ``glorot_normal`` weights, zero biases (the book: ``N(0, 0.01)`` for all, i.e.
    ``w_init=b_init=normal(0.01)``).

    Args:
      hidden: the hidden and cell states' size H.
      w_init: the gates' weights' initializer; default ``glorot_normal``.
      b_init: the gates' biases' initializer; default ``zeros``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` from ``(batch, time, V)`` to ``(batch, time, hidden)``; params ``LSTMParams``.
    """
    return _recurrent("LSTM", hidden, w_init, b_init, dtype)


def GRU(
    hidden: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_normal,
    b_init: initializers.Initializer = initializers.zeros,
    dtype: Any = None,
) -> Layer:
    """``gru`` (corrected) over ``(batch, time, V)`` sequences. Book: GRULayer.

    ``apply(params, x, initial_state=h, return_state=True)`` starts from ``h`` instead of zeros
    and also returns the final state.

    Defaults: ``glorot_normal`` weights, zero biases (the book: ``N(0, 0.01)`` for all).

    Args:
      hidden: the hidden state's size H.
      w_init: the weights' initializer; default ``glorot_normal``.
      b_init: the biases' initializer; default ``zeros``.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` from ``(batch, time, V)`` to ``(batch, time, hidden)``; params ``GRUParams``.
    """
    return _recurrent("GRU", hidden, w_init, b_init, dtype)


@layer_spec
class _TimeDistributed(LayerSpec):
    inner: Layer

    @property
    def name(self) -> str:
        return f"TimeDistributed({layer_name(self.inner)})"

    @property
    def children(self) -> tuple[Layer, ...]:
        """The inner layer when it is a combinator (``summary`` lists its layers); a leaf inner
        layer makes this one row, ``TimeDistributed(Dense(62, linear))``."""
        spec = spec_of(self.inner)
        return (self.inner,) if spec is not None and spec.children else ()

    @property
    def inputs(self) -> frozenset[str]:
        """None: every step is a row of its own, where a sequence's padding means nothing."""
        return frozenset()

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, None, "(batch, time, features...)")
        if len(shape) < 3:
            raise ValueError(f"{self.name}: input_shape must be at least 3-D (batch, time, features...), got {shape}.")
        batch, time = shape[:2]
        rows = -1 if batch == -1 else batch * time
        output_shape, params = self.inner.init(key, (rows, *shape[2:]))
        return (batch, time, *output_shape[1:]), params

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        _checks.array(self.name, "x", x)
        if x.ndim < 3:
            raise ValueError(
                f"{self.name}: x must be at least 3-D (batch, time, features...), got shape {tuple(x.shape)}."
            )
        y = self.inner.apply(params, x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), key=key)
        return y.reshape(x.shape[0], x.shape[1], *y.shape[1:])

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """Training mode: the inner layer's, on every (row, step) as a row; a row mask covers its steps."""
        given_inputs(self.name, self.inputs, inputs)
        _checks.array(self.name, "x", x)
        if x.ndim < 3:
            raise ValueError(
                f"{self.name}: x must be at least 3-D (batch, time, features...), got shape {tuple(x.shape)}."
            )
        steps = None if row_mask is None else jnp.repeat(row_mask, x.shape[1])
        y, params = train_mode(self.inner.apply)(
            params, x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), key=key, row_mask=steps
        )
        return y.reshape(x.shape[0], x.shape[1], *y.shape[1:]), params


def TimeDistributed(layer: Layer) -> Layer:
    """Apply a layer of ``(rows, features...)`` at every time step of ``(batch, time, features...)``.

    The book's per-step output projection is ``TimeDistributed(Dense(O, linear))``; params are
    the inner layer's. The steps are one batch of ``batch * time`` rows to the inner layer.

    Args:
      layer: a layer of rows, ``(rows, features...) -> (rows, out...)``.

    Returns:
      A ``Layer`` from ``(batch, time, features...)`` to ``(batch, time, out...)``.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"TimeDistributed: layer must be a Layer(init, apply), got {type(layer).__name__}.")
    return _TimeDistributed(layer).layer()
