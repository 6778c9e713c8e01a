"""Attention: ``dot_product_attention`` with a hand-derived, memory-efficient backward, and
``MultiHeadAttention``.

Contract, stated once:

* Layout as ``jax.nn.dot_product_attention``: ``q: (batch, T, heads, head_dim)``, ``k: (batch,
  S, heads, head_dim)``, ``v: (batch, S, heads, value_dim)``; the output is ``(batch, T, heads,
  value_dim)``. ``out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, s, n]) v[b, s, n]``
  over the keys ``s`` that query ``t`` may see, ``scale`` defaulting to ``1 / sqrt(head_dim)``.
* Which keys a query sees, all combined: ``mask`` (boolean, broadcastable to ``(batch, heads,
  T, S)``, True = attend, the polarity of jax.nn and of ``torch.nn.functional.
  scaled_dot_product_attention``; ``torch.nn.MultiheadAttention``'s ``attn_mask`` is the
  opposite, True = blocked), ``kv_lengths: (batch,)`` integers (key ``s`` is visible to batch row
  ``b`` when ``s < kv_lengths[b]``: key padding), and ``is_causal`` (query ``t`` sees keys
  ``s <= t``, upper-left aligned as in torch and jax.nn).
* A query that may see no key at all gets an output of zeros and passes zero gradients, never
  NaN, as torch's SDPA (jax.nn returns the mean of ``v`` for such a row instead).

The forward (FlashAttention's, in the scan form of Rabe and Staats) cuts the queries into
blocks of ``block_size`` rows and the keys into blocks of ``block_size`` columns. For each pair
of blocks it computes the scores ``scale * q k^T``, and keeps, per query row, only the running
maximum ``m``, the running sum ``l = sum exp(score - m)`` and the running ``acc = sum exp(score
- m) v``; a new block with maximum ``m'`` rescales the old sums by ``exp(m - m')`` (the online
softmax). At the end ``out = acc / l`` and the row's log-sum-exp ``L = m + log l`` are all that
is kept. Pairs of blocks that a causal mask hides entirely are never visited, which halves the
work of causal attention. ``S`` (and ``T``) need not be multiples of ``block_size``: the last
block is padded and its padding masked.

The backward is FlashAttention-2's, derived by hand. With ``P = softmax(scale * q k^T)`` (row
by row over the visible keys, zero elsewhere) and ``O = P v``, for an output gradient ``dO``:

* ``dV = P^T dO``, since ``O`` is linear in ``v``.
* ``dP = dO V^T``, and through the softmax (its Jacobian is ``diag(p) - p p^T`` per row)
  ``dS = P * (dP - rowsum(dP * P))``; and ``rowsum(dP * P) = rowsum(dO * (P V)) = rowsum(dO *
  O)``, so ``D = rowsum(dO * O)`` is computed once, from the saved output, with no ``P``.
* The scores are ``scale * q k^T``, so ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.

It walks the same pairs of blocks, recomputing ``P = exp(scale * q k^T - L)`` from the saved
``L`` (exact: no maximum is needed, ``L`` already is the row's normaliser), and adds each
block's share into ``dQ``, ``dK``, ``dV``. Neither pass ever holds more than one
``(block_size, block_size)`` tile of scores per batch row and head, so the gradient's memory
grows with ``T * block_size``, not ``T * S``. The backward is itself differentiable
``jax.numpy`` (a scan), so second order works in reverse mode; as for every ``custom_vjp``,
forward mode does not. ``kv_lengths`` and ``mask`` get no gradient.

Values of ``kv_lengths`` are checked (``0 <= kv_lengths <= S``) when they are concrete; under
``jit`` a length beyond ``S`` means all ``S`` keys.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks

__all__ = ["DEFAULT_BLOCK_SIZE", "dot_product_attention"]

DEFAULT_BLOCK_SIZE = 128


class _Plan(NamedTuple):
    """The static geometry: block sizes, block counts and the pairs of blocks to visit."""

    T: int
    S: int
    bq: int
    bk: int
    nq: int
    nk: int
    is_causal: bool
    pairs: tuple[tuple[int, int], ...]


def _plan(T: int, S: int, block_size: int, is_causal: bool) -> _Plan:
    bq, bk = min(block_size, T), min(block_size, S)
    nq, nk = -(-T // bq), -(-S // bk)
    # Causal: query block i reaches key block j only if j's first key is <= i's last real query.
    pairs = tuple(
        (i, j) for i in range(nq) for j in range(nk) if not is_causal or j * bk <= min(i * bq + bq - 1, T - 1)
    )
    return _Plan(T, S, bq, bk, nq, nk, is_causal, pairs)


def _accumulator(dtype: Any) -> Any:
    """Sums run in at least float32."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _blocks(x: jax.Array, count: int, size: int) -> jax.Array:
    """``(batch, L, heads, H) -> (count, batch, heads, size, H)``, zero-padded along ``L``."""
    batch, length, heads, h = x.shape
    x = jnp.pad(x, ((0, 0), (0, count * size - length), (0, 0), (0, 0)))
    return x.reshape(batch, count, size, heads, h).transpose(1, 0, 3, 2, 4)


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """The inverse of ``_blocks``: ``(count, batch, heads, size, H) -> (batch, length, heads, H)``."""
    count, batch, heads, size, h = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(batch, count * size, heads, h)[:, :length]


def _row_blocks(x: jax.Array, count: int, size: int) -> jax.Array:
    """``(batch, L, heads) -> (count, batch, heads, size)``, zero-padded along ``L``."""
    return _blocks(x[..., None], count, size)[..., 0]


def _padded_mask(mask: jax.Array, plan: _Plan) -> jax.Array:
    """The 4-D mask with its query and key axes (where not broadcast) padded with False."""
    pad_t = plan.nq * plan.bq - plan.T if mask.shape[2] != 1 else 0
    pad_s = plan.nk * plan.bk - plan.S if mask.shape[3] != 1 else 0
    return jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=False)


def _visible(plan: _Plan, i: jax.Array, j: jax.Array, kv_lengths: jax.Array, mask: jax.Array) -> jax.Array:
    """Which keys of block ``j`` the queries of block ``i`` see, broadcastable to ``(batch,
    heads, bq, bk)``. ``kv_lengths <= S`` also hides the padding of the last key block."""
    s = (j * plan.bk + lax.iota(jnp.int32, plan.bk)).reshape(1, 1, 1, plan.bk)
    visible = s < kv_lengths.reshape(-1, 1, 1, 1)
    if plan.is_causal:
        t = (i * plan.bq + lax.iota(jnp.int32, plan.bq)).reshape(1, 1, plan.bq, 1)
        visible = visible & (s <= t)
    if mask.shape[2] != 1:
        mask = lax.dynamic_slice_in_dim(mask, i * plan.bq, plan.bq, axis=2)
    if mask.shape[3] != 1:
        mask = lax.dynamic_slice_in_dim(mask, j * plan.bk, plan.bk, axis=3)
    return visible & mask


def _scores(plan: _Plan, scale: float, qi: jax.Array, kj: jax.Array, visible: jax.Array, acc: Any) -> jax.Array:
    """``scale * qi kj^T`` on the visible keys, ``-inf`` elsewhere: ``(batch, heads, bq, bk)``."""
    s = jnp.einsum("bnqh,bnkh->bnqk", qi, kj, preferred_element_type=acc) * scale
    return jnp.where(visible, s, -jnp.inf)


def _forward(
    plan: _Plan, scale: float, q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The output ``(batch, T, heads, value_dim)`` and each row's log-sum-exp ``L``, blocked as
    ``(nq, batch, heads, bq)`` (0 for a row that sees nothing)."""
    dtype, acc = q.dtype, _accumulator(q.dtype)
    qb, kb, vb = _blocks(q, plan.nq, plan.bq), _blocks(k, plan.nk, plan.bk), _blocks(v, plan.nk, plan.bk)
    mask = _padded_mask(mask, plan)
    rows = qb.shape[:-1]  # (nq, batch, heads, bq)

    def step(carry: Any, pair: jax.Array) -> tuple[Any, None]:
        m_all, l_all, o_all = carry
        i, j = pair[0], pair[1]
        s = _scores(plan, scale, qb[i], kb[j], _visible(plan, i, j, kv_lengths, mask), acc)
        m_old = m_all[i]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # a row that has seen nothing yet
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m_old - m_safe)  # exp(m - m'): the old sums in the new maximum's units
        l_new = correction * l_all[i] + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bnqk,bnkh->bnqh", p.astype(dtype), vb[j], preferred_element_type=acc)
        o_new = correction[..., None] * o_all[i] + pv
        return (m_all.at[i].set(m_new), l_all.at[i].set(l_new), o_all.at[i].set(o_new)), None

    start = (
        jnp.full(rows, -jnp.inf, acc),
        jnp.zeros(rows, acc),
        jnp.zeros((*rows, v.shape[-1]), acc),
    )
    (m, total, o), _ = lax.scan(step, start, jnp.asarray(np.array(plan.pairs, np.int32)))
    seen = total > 0
    l_safe = jnp.where(seen, total, 1.0)
    out = jnp.where(seen[..., None], o / l_safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), 0.0)
    return _unblock(out, plan.T).astype(dtype), lse


def _backward(
    plan: _Plan,
    scale: float,
    residuals: tuple[jax.Array, ...],
    output_grad: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FlashAttention-2's backward (module docstring): ``dQ, dK, dV`` block by block."""
    q, k, v, kv_lengths, mask, out, lse = residuals
    dtype, acc = q.dtype, _accumulator(q.dtype)
    d = jnp.sum(output_grad.astype(acc) * out.astype(acc), axis=-1)  # D = rowsum(dO * O)
    db = _row_blocks(d, plan.nq, plan.bq)
    qb, gb = _blocks(q, plan.nq, plan.bq), _blocks(output_grad, plan.nq, plan.bq)
    kb, vb = _blocks(k, plan.nk, plan.bk), _blocks(v, plan.nk, plan.bk)
    mask = _padded_mask(mask, plan)

    def step(carry: Any, pair: jax.Array) -> tuple[Any, None]:
        dq, dk, dv = carry
        i, j = pair[0], pair[1]
        qi, gi, kj, vj = qb[i], gb[i], kb[j], vb[j]
        s = _scores(plan, scale, qi, kj, _visible(plan, i, j, kv_lengths, mask), acc)
        p = jnp.exp(s - lse[i][..., None])  # P, recomputed from the saved log-sum-exp
        dv_j = jnp.einsum("bnqk,bnqh->bnkh", p.astype(dtype), gi, preferred_element_type=acc)  # P^T dO
        dp = jnp.einsum("bnqh,bnkh->bnqk", gi, vj, preferred_element_type=acc)  # dO V^T
        ds = (p * (dp - db[i][..., None])).astype(dtype)  # P * (dP - D)
        dq_i = jnp.einsum("bnqk,bnkh->bnqh", ds, kj, preferred_element_type=acc) * scale  # scale dS K
        dk_j = jnp.einsum("bnqk,bnqh->bnkh", ds, qi, preferred_element_type=acc) * scale  # scale dS^T Q
        return (dq.at[i].add(dq_i), dk.at[j].add(dk_j), dv.at[j].add(dv_j)), None

    start = (jnp.zeros(qb.shape, acc), jnp.zeros(kb.shape, acc), jnp.zeros(vb.shape, acc))
    (dq, dk, dv), _ = lax.scan(step, start, jnp.asarray(np.array(plan.pairs, np.int32)))
    return (
        _unblock(dq, plan.T).astype(dtype),
        _unblock(dk, plan.S).astype(dtype),
        _unblock(dv, plan.S).astype(dtype),
    )


def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    mask: jax.Array,
    is_causal: bool,
    scale: float,
    block_size: int,
) -> jax.Array:
    return _attention_fwd(q, k, v, kv_lengths, mask, is_causal, scale, block_size)[0]  # L unused: dropped


def _attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    mask: jax.Array,
    is_causal: bool,
    scale: float,
    block_size: int,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    plan = _plan(q.shape[1], k.shape[1], block_size, is_causal)
    out, lse = _forward(plan, scale, q, k, v, kv_lengths, mask)
    return out, (q, k, v, kv_lengths, mask, out, lse)  # the output and L: no T x S array


def _attention_bwd(
    is_causal: bool, scale: float, block_size: int, residuals: tuple[jax.Array, ...], output_grad: jax.Array
) -> tuple[Any, ...]:
    q, k = residuals[0], residuals[1]
    kv_lengths, mask = residuals[3], residuals[4]
    plan = _plan(q.shape[1], k.shape[1], block_size, is_causal)
    dq, dk, dv = _backward(plan, scale, residuals, output_grad)
    no_grad = lambda a: np.zeros(a.shape, dtype=jax.dtypes.float0)
    return dq, dk, dv, no_grad(kv_lengths), no_grad(mask)


_attention_vjp = jax.custom_vjp(_attention, nondiff_argnums=(5, 6, 7))
_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def _check_mask(fn: str, mask: Any, target: tuple[int, int, int, int]) -> jax.Array:
    _checks.array(fn, "mask", mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: mask must be boolean (True = attend), got {mask.dtype}. Compare it first, e.g. mask != 0."
        )
    shape = tuple(mask.shape)
    if len(shape) > 4 or any(m not in (1, t) for m, t in zip(shape[::-1], target[::-1], strict=False)):
        raise ValueError(f"{fn}: mask must broadcast to (batch, heads, T, S) = {target}, got shape {shape}.")
    return jnp.asarray(mask).reshape((1,) * (4 - len(shape)) + shape)


def _check_kv_lengths(fn: str, kv_lengths: Any, batch: int, S: int) -> jax.Array:
    _checks.array(fn, "kv_lengths", kv_lengths)
    if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise TypeError(f"{fn}: kv_lengths must have an integer dtype, got {kv_lengths.dtype}.")
    if tuple(kv_lengths.shape) != (batch,):
        raise ValueError(f"{fn}: kv_lengths must have shape (batch,) = ({batch},), got {tuple(kv_lengths.shape)}.")
    if _checks.is_concrete(kv_lengths):
        low, high = _checks.value_range(kv_lengths)
        if low < 0 or high > S:
            raise ValueError(
                f"{fn}: kv_lengths must lie in [0, S] = [0, {S}] (S = k.shape[1]), got values from {low} to {high}."
            )
    return jnp.minimum(jnp.asarray(kv_lengths), S).astype(jnp.int32)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    kv_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """``softmax(scale * q k^T) v`` per batch row and head, over the keys each query may see.

    The layout, the mask and the backward are the module docstring's.

    Args:
      q: ``(batch, T, heads, head_dim)`` queries.
      k: ``(batch, S, heads, head_dim)`` keys.
      v: ``(batch, S, heads, value_dim)`` values; q, k, v share one floating dtype.
      is_causal: query ``t`` sees keys ``s <= t`` only.
      kv_lengths: ``(batch,)`` integers in ``[0, S]``: keys ``s >= kv_lengths[b]`` are padding.
      mask: boolean, broadcastable to ``(batch, heads, T, S)``; True = attend (the opposite of
        ``torch.nn.MultiheadAttention``'s ``attn_mask``).
      scale: multiplies the scores; ``1 / sqrt(head_dim)`` by default.
      block_size: rows and columns of one tile of scores, >= 1; memory and speed, never the
        result, depend on it (up to rounding).
    Returns:
      ``(batch, T, heads, value_dim)``; zeros for a query that sees no key.
    """
    fn = "dot_product_attention"
    for name, value in (("q", q), ("k", k), ("v", v)):
        _checks.floating(fn, name, value)
        _checks.rank(fn, name, value, 4, "(batch, length, heads, head_dim)")
        if 0 in value.shape:
            raise ValueError(f"{fn}: {name} must have no empty axis, got shape {tuple(value.shape)}.")
    _checks.same_dtype(fn, ("q", "k"), q, k)
    _checks.same_dtype(fn, ("q", "v"), q, v)
    batch, T, heads, head_dim = q.shape
    S = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"{fn}: q, k and v must share the batch size, got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
        )
    if k.shape[2] != heads or v.shape[2] != heads:
        raise ValueError(
            f"{fn}: q, k and v must have the same number of heads (axis 2), got q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}."
        )
    if k.shape[3] != head_dim:
        raise ValueError(
            f"{fn}: k must have q's head_dim {head_dim} (axis 3) to form q k^T, got k.shape={tuple(k.shape)} "
            f"for q.shape={tuple(q.shape)}."
        )
    if v.shape[1] != S:
        raise ValueError(
            f"{fn}: v must have as many positions (axis 1) as k, {S}, got v.shape={tuple(v.shape)} "
            f"for k.shape={tuple(k.shape)}."
        )
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}.")
    _checks.positive_int(fn, "block_size", block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    _checks.real_number(fn, "scale", scale)
    if not _checks.is_concrete(scale):
        raise TypeError(f"{fn}: scale must be a concrete number (it is static), got a traced value.")
    kv = jnp.full((batch,), S, jnp.int32) if kv_lengths is None else _check_kv_lengths(fn, kv_lengths, batch, S)
    full_mask = jnp.ones((1, 1, 1, 1), jnp.bool_) if mask is None else _check_mask(fn, mask, (batch, heads, T, S))
    return _attention_vjp(q, k, v, kv, full_mask, bool(is_causal), float(scale), int(block_size))
