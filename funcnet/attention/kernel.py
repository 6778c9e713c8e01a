"""Attention: ``dot_product_attention`` with a hand-derived, memory-efficient backward.

Contract, stated once:

* Layout as ``jax.nn.dot_product_attention``: ``q: (batch, T, heads, head_dim)``, ``k: (batch,
  S, kv_heads, head_dim)``, ``v: (batch, S, kv_heads, value_dim)``; the output is ``(batch, T,
  heads, value_dim)``. ``out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, s, c]) v[b, s,
  c]`` over the keys ``s`` that query ``t`` may see, with ``c = n // (heads // kv_heads)`` and
  ``scale`` defaulting to ``1 / sqrt(head_dim)``. torch's ``scaled_dot_product_attention`` takes
  ``(batch, heads, T, head_dim)``: transpose with ``x.transpose(0, 2, 1, 3)``.
* Grouped-query attention: ``kv_heads`` must divide ``heads``; each group of ``heads //
  kv_heads`` consecutive query heads shares one key/value head (``kv_heads = 1``: multi-query
  attention), the convention of torch's ``repeat_interleave`` and ``enable_gqa=True`` and of
  jax.nn. Keys and values are never repeated in memory: a tile of scores is formed per group.
* Which keys a query sees, all combined: ``mask`` (boolean, broadcastable to ``(batch, heads,
  T, S)``, True = attend, the polarity of jax.nn and of torch's ``scaled_dot_product_attention``
  with a boolean ``attn_mask``), ``kv_lengths: (batch,)`` integers (key ``s`` is visible to batch
  row ``b`` when ``s < kv_lengths[b]``: key padding), and ``is_causal`` (query ``t`` sees keys
  ``s <= t + q_offset``). ``q_offset`` (an int, or integers of shape ``(batch,)`` or ``()``, which
  may be traced) is the number of keys before query 0: 0 is upper-left alignment (torch's and
  jax.nn's ``is_causal``), ``S - T`` is torch's ``causal_lower_right``, and one new query against a
  cache of ``S`` keys sees them all with ``q_offset = S - 1``. It only matters with ``is_causal``.
* From torch: ``torch.nn.MultiheadAttention``'s boolean ``attn_mask`` means True = blocked, so
  pass ``mask=~attn_mask``; its ``key_padding_mask: (batch, S)`` (True = padding) becomes
  ``kv_lengths`` when the padding is at the end, or ``mask=~key_padding_mask[:, None, None, :]``.
  A float mask is refused: an additive one (0 = attend, -inf = blocked, torch's float
  ``attn_mask``) converts with ``mask == 0``, a multiplicative one (1 = attend, 0 = blocked) with
  ``mask != 0``.
* A query that may see no key at all gets an output of zeros and passes zero gradients, never
  NaN, as torch's SDPA (jax.nn returns the mean of ``v`` for such a row instead).
* Dropout on the attention weights (``dropout_rate`` in ``[0, 1)``, with a ``dropout_key``):
  ``out = (P * Z / (1 - rate)) v`` with ``P`` the softmax above, normalised *without* dropout,
  and ``Z`` a boolean keep-mask, True with probability ``1 - rate`` (inverted dropout on ``P``,
  as FlashAttention). ``Z`` is drawn tile by tile, ``(batch, heads, bq, bk)`` with ``bq =
  min(block_size, T)``, ``bk = min(block_size, S)``: the tile of query block ``i`` and key block
  ``j`` is seeded by ``fold_in(fold_in(dropout_key, i), j)``, each of its elements keeps when a
  32-bit hash of its index in the tile (keyed by that seed) is ``>= rate * 2**32``. So ``Z``
  depends on ``block_size`` (and on the batch and head counts), never on what is visible;
  ``attention_dropout_mask`` returns the whole ``Z`` for a shape. The backward regenerates each
  tile from the key; nothing of ``Z`` is stored. A rate of 0 (concrete) runs no dropout code at
  all; a traced rate is used as it is (unchecked) and gets no gradient.

The forward (FlashAttention's, in the scan form of Rabe and Staats) cuts the queries into
blocks of ``block_size`` rows and the keys into blocks of ``block_size`` columns. For each pair
of blocks it computes the scores ``scale * q k^T``, and keeps, per query row, only the running
maximum ``m``, the running sum ``l = sum exp(score - m)`` and the running ``acc = sum exp(score
- m) Z v``; a new block with maximum ``m'`` rescales the old sums by ``exp(m - m')`` (the online
softmax). At the end ``out = acc / (l (1 - rate))`` and the row's log-sum-exp ``L = m + log l``
are all that is kept. Hidden scores are set to a large finite negative number, never ``-inf``,
and ``m`` starts there, so no ``inf`` is ever computed (``jax.debug_infs`` passes); sums run in
at least float32. Work that is hidden is skipped: pairs of blocks that a causal mask with an
int ``q_offset`` hides entirely are never visited (which halves the work of causal attention),
and when ``kv_lengths``, ``mask`` or an array ``q_offset`` is given, a ``lax.cond`` per visited
pair skips a tile in which no score is visible (key blocks beyond every row's ``kv_lengths``,
tiles a mask hides; under ``vmap`` the cond becomes a select: the same result, no saving). ``S``
(and ``T``) need not be multiples of ``block_size``: the last block is padded and its padding
masked.

The backward is FlashAttention-2's, derived by hand. With ``P = softmax(scale * q k^T)`` (row
by row over the visible keys, zero elsewhere), ``W = P * Z / (1 - rate)`` (``W = P`` without
dropout) and ``O = W v``, for an output gradient ``dO``:

* ``dV = W^T dO``, since ``O`` is linear in ``v``.
* ``dW = dO V^T``, so ``dP = dW * Z / (1 - rate)``; through the softmax (its Jacobian is
  ``diag(p) - p p^T`` per row) ``dS = P * (dP - rowsum(dP * P))``; and ``rowsum(dP * P) =
  sum_s dO . v_s Z_s P_s / (1 - rate) = dO . sum_s W_s v_s = rowsum(dO * O)``, dropout or not,
  so ``D = rowsum(dO * O)`` is computed once, from the saved output, with no ``P``.
* The scores are ``scale * q k^T``, so ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.
* Grouped-query: a key/value head serves its group's query heads, so its ``dK`` and ``dV`` are
  the sums of the group's shares (the einsums of one tile sum over the group axis).

It walks the same pairs of blocks, recomputing ``P = exp(scale * q k^T - L)`` from the saved
``L`` (exact: no maximum is needed, ``L`` already is the row's normaliser) and ``Z`` from the
key, never stored, and adds each block's share into ``dQ``, ``dK``, ``dV``. Neither pass ever
holds more than one ``(block_size, block_size)`` tile of scores per batch row and head, so the
gradient's memory grows with ``T * block_size``, not ``T * S``. The backward is itself
differentiable ``jax.numpy`` (a scan), so second order works in reverse mode; as for every
``custom_vjp``, forward mode does not. ``kv_lengths``, ``mask``, ``q_offset``, ``dropout_key``
and ``dropout_rate`` get no gradient.

Values are checked when they are concrete (``0 <= kv_lengths <= S``, ``q_offset >= 0``, ``0 <=
dropout_rate < 1``); under ``jit`` a length beyond ``S`` means all ``S`` keys, and a negative
``q_offset`` hides that many more keys.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks

__all__ = ["DEFAULT_BLOCK_SIZE", "attention_dropout_mask", "dot_product_attention"]

DEFAULT_BLOCK_SIZE = 128


class _Config(NamedTuple):
    """The static arguments of the ``custom_vjp`` (hashable)."""

    is_causal: bool
    scale: float
    block_size: int
    offset: int | None  # q_offset when it is a Python int; None when it is the array in _Extras
    dropout: bool
    key_impl: str | None  # a typed dropout key's implementation; None for a raw uint32 key


class _Extras(NamedTuple):
    """The array arguments that get no gradient; ``None`` where not given."""

    kv_lengths: jax.Array | None  # (batch,) int32, <= S
    mask: jax.Array | None  # 4-D bool, broadcastable to (batch, heads, T, S)
    q_offset: jax.Array | None  # (batch,) int32, only with is_causal and an array q_offset
    dropout_key: jax.Array | None  # raw key data
    dropout_rate: jax.Array | None  # () in the accumulator's dtype


class _Plan(NamedTuple):
    """The static geometry: block sizes, block counts, head groups and the pairs to visit."""

    T: int
    S: int
    bq: int
    bk: int
    nq: int
    nk: int
    kv_heads: int
    group: int
    pairs: tuple[tuple[int, int], ...]
    skip: bool  # a lax.cond per pair skips tiles in which nothing is visible


def _plan(q: jax.Array, k: jax.Array, config: _Config, extras: _Extras) -> _Plan:
    T, S, heads, kv_heads = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    bq, bk = min(config.block_size, T), min(config.block_size, S)
    nq, nk = -(-T // bq), -(-S // bk)
    static_causal = config.is_causal and config.offset is not None
    offset = config.offset or 0
    # Causal: query block i reaches key block j only if j's first key is <= i's last real query
    # plus the offset.
    pairs = tuple(
        (i, j)
        for i in range(nq)
        for j in range(nk)
        if not static_causal or j * bk <= min(i * bq + bq - 1, T - 1) + offset
    )
    skip = extras.kv_lengths is not None or extras.mask is not None or extras.q_offset is not None
    return _Plan(T, S, bq, bk, nq, nk, kv_heads, heads // kv_heads, pairs, skip)


def _accumulator(dtype: Any) -> Any:
    """Sums run in at least float32."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _hidden(acc: Any) -> float:
    """The score of a hidden key: finite, and far enough from ``finfo.min`` that subtracting a
    real score from it cannot overflow to ``-inf``; ``exp`` of it is 0."""
    return float(jnp.finfo(acc).min) / 4


def _blocks(x: jax.Array, count: int, size: int) -> jax.Array:
    """``(batch, L, *heads, H) -> (count, batch, *heads, size, H)``, zero-padded along ``L``."""
    batch, length, *rest = x.shape
    x = jnp.pad(x, ((0, 0), (0, count * size - length)) + ((0, 0),) * len(rest))
    x = x.reshape(batch, count, size, *rest)
    return x.transpose(1, 0, *range(3, x.ndim - 1), 2, x.ndim - 1)


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """The inverse of ``_blocks``: ``(count, batch, *heads, size, H) -> (batch, length, *heads, H)``."""
    count, batch, *heads, size, h = x.shape
    x = x.transpose(1, 0, x.ndim - 2, *range(2, x.ndim - 2), x.ndim - 1)
    return x.reshape(batch, count * size, *heads, h)[:, :length]


def _grouped(x: jax.Array, plan: _Plan) -> jax.Array:
    """``(batch, L, heads, ...) -> (batch, L, kv_heads, group, ...)``: query head ``n`` is head
    ``n % group`` of group ``n // group``."""
    return x.reshape(*x.shape[:2], plan.kv_heads, plan.group, *x.shape[3:])


def _row_blocks(x: jax.Array, plan: _Plan) -> jax.Array:
    """``(batch, T, heads) -> (nq, batch, kv_heads, group, bq)``, zero-padded along ``T``."""
    return _blocks(_grouped(x, plan)[..., None], plan.nq, plan.bq)[..., 0]


def _padded_mask(mask: jax.Array, plan: _Plan) -> jax.Array:
    """The mask as ``(batch, kv_heads, group, T, S)`` (each possibly 1), its query and key axes
    (where not broadcast) padded with False."""
    pad_t = plan.nq * plan.bq - plan.T if mask.shape[2] != 1 else 0
    pad_s = plan.nk * plan.bk - plan.S if mask.shape[3] != 1 else 0
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=False)
    heads = (plan.kv_heads, plan.group) if mask.shape[1] != 1 else (1, 1)
    return mask.reshape(mask.shape[0], *heads, *mask.shape[2:])


def _visible(plan: _Plan, config: _Config, extras: _Extras, i: jax.Array, j: jax.Array) -> jax.Array | None:
    """Which keys of block ``j`` the queries of block ``i`` see, broadcastable to ``(batch,
    kv_heads, group, bq, bk)``; None when all of them are (no mask of any kind)."""
    parts = []
    s = (j * plan.bk + lax.iota(jnp.int32, plan.bk)).reshape(1, 1, 1, 1, plan.bk)
    if extras.kv_lengths is not None:  # kv_lengths <= S also hides the last key block's padding
        parts.append(s < extras.kv_lengths.reshape(-1, 1, 1, 1, 1))
    elif plan.S % plan.bk:
        parts.append(s < plan.S)
    if config.is_causal:
        t = (i * plan.bq + lax.iota(jnp.int32, plan.bq)).reshape(1, 1, 1, plan.bq, 1)
        offset = extras.q_offset.reshape(-1, 1, 1, 1, 1) if extras.q_offset is not None else (config.offset or 0)
        parts.append(s <= t + offset)
    if extras.mask is not None:
        mask = extras.mask
        if mask.shape[3] != 1:
            mask = lax.dynamic_slice_in_dim(mask, i * plan.bq, plan.bq, axis=3)
        if mask.shape[4] != 1:
            mask = lax.dynamic_slice_in_dim(mask, j * plan.bk, plan.bk, axis=4)
        parts.append(mask)
    if not parts:
        return None
    visible = parts[0]
    for part in parts[1:]:
        visible = visible & part
    return visible


def _scores(scale: float, qi: jax.Array, kj: jax.Array, visible: jax.Array | None, acc: Any) -> jax.Array:
    """``scale * qi kj^T`` on the visible keys, ``_hidden`` elsewhere: ``(batch, kv_heads,
    group, bq, bk)``."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=acc) * scale
    return s if visible is None else jnp.where(visible, s, _hidden(acc))


def _as_key(data: jax.Array, impl: str | None) -> jax.Array:
    return data if impl is None else jax.random.wrap_key_data(data, impl=impl)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (Wellons' "triple32"): every output bit
    depends on every input bit, each with probability near 1/2."""
    x = (x ^ (x >> 17)) * np.uint32(0xED5AD4BB)
    x = (x ^ (x >> 11)) * np.uint32(0xAC4C1B51)
    x = (x ^ (x >> 15)) * np.uint32(0x31848BAB)
    return x ^ (x >> 14)


def _threshold(rate: jax.Array) -> jax.Array:
    """``rate`` (float32) as a uint32 threshold: a uniform 32-bit word is below it with
    probability ``rate`` (to float32's precision)."""
    return jnp.minimum(rate.astype(jnp.float32) * 2.0**32, 4294967040.0).astype(jnp.uint32)  # < 2**32


def _keep_tile(key: jax.Array, i: Any, j: Any, shape: tuple[int, ...], threshold: jax.Array) -> jax.Array:
    """The dropout keep-mask of the tile of query block ``i`` and key block ``j``: ``shape`` =
    ``(batch, heads, bq, bk)``, True with probability ``1 - rate``.

    The tile's seed is the key ``fold_in(fold_in(key, i), j)``; each element's 32 bits are the
    hash of its index within the tile, keyed by two words of that seed. (``jax.random.bits``
    per element, a threefry per word, doubled the time of attention's forward + backward; the
    hash costs a few percent.)
    """
    seed = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, i), j)).reshape(-1)
    index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _mix(_mix(index ^ seed[0]) ^ seed[-1]) >= threshold


def _keep(plan: _Plan, config: _Config, extras: _Extras, i: jax.Array, j: jax.Array, batch: int) -> jax.Array:
    """The tile's keep-mask as ``(batch, kv_heads, group, bq, bk)``."""
    assert extras.dropout_key is not None and extras.dropout_rate is not None  # dropout is on: both are given
    heads = plan.kv_heads * plan.group
    threshold = _threshold(extras.dropout_rate)
    keep = _keep_tile(_as_key(extras.dropout_key, config.key_impl), i, j, (batch, heads, plan.bq, plan.bk), threshold)
    return keep.reshape(batch, plan.kv_heads, plan.group, plan.bq, plan.bk)


def _pairs(plan: _Plan) -> jax.Array:
    return jnp.asarray(np.array(plan.pairs, np.int32).reshape(-1, 2))


def _forward(
    plan: _Plan, config: _Config, q: jax.Array, k: jax.Array, v: jax.Array, extras: _Extras
) -> tuple[jax.Array, jax.Array]:
    """The output ``(batch, T, heads, value_dim)`` and each row's log-sum-exp ``L``, blocked as
    ``(nq, batch, kv_heads, group, bq)`` (0 for a row that sees nothing)."""
    dtype, acc = q.dtype, _accumulator(q.dtype)
    batch = q.shape[0]
    qb = _blocks(_grouped(q, plan), plan.nq, plan.bq)  # (nq, batch, kv_heads, group, bq, H)
    kb, vb = _blocks(k, plan.nk, plan.bk), _blocks(v, plan.nk, plan.bk)  # (nk, batch, kv_heads, bk, H)
    if extras.mask is not None:
        extras = extras._replace(mask=_padded_mask(extras.mask, plan))
    rows = qb.shape[:-1]  # (nq, batch, kv_heads, group, bq)

    def tile(
        i: jax.Array, j: jax.Array, visible: jax.Array | None, m_old: jax.Array, l_old: jax.Array, o_old: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        s = _scores(config.scale, qb[i], kb[j], visible, acc)
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])  # <= 1: no overflow
        if visible is not None:  # a row that has seen nothing yet has m_new = _hidden: exp(0) = 1
            p = jnp.where(visible, p, 0.0)
        correction = jnp.exp(m_old - m_new)  # exp(m - m'): the old sums in the new maximum's units
        l_new = correction * l_old + jnp.sum(p, axis=-1)  # the normaliser: without dropout
        if config.dropout:
            p = jnp.where(_keep(plan, config, extras, i, j, batch), p, 0.0)
        pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(dtype), vb[j], preferred_element_type=acc)
        return m_new, l_new, correction[..., None] * o_old + pv

    def step(carry: Any, pair: jax.Array) -> tuple[Any, None]:
        m_all, l_all, o_all = carry
        i, j = pair[0], pair[1]
        old = (m_all[i], l_all[i], o_all[i])
        visible = _visible(plan, config, extras, i, j)
        if plan.skip and visible is not None:
            new = lax.cond(jnp.any(visible), lambda: tile(i, j, visible, *old), lambda: old)
        else:
            new = tile(i, j, visible, *old)
        return (m_all.at[i].set(new[0]), l_all.at[i].set(new[1]), o_all.at[i].set(new[2])), None

    start = (
        jnp.full(rows, _hidden(acc), acc),
        jnp.zeros(rows, acc),
        jnp.zeros((*rows, v.shape[-1]), acc),
    )
    (m, total, o), _ = lax.scan(step, start, _pairs(plan))
    seen = total > 0
    l_safe = jnp.where(seen, total, 1.0)
    if config.dropout:
        assert extras.dropout_rate is not None  # dropout is on: both are given
        l_safe = l_safe * (1.0 - extras.dropout_rate)  # inverted dropout: / (1 - rate), once
    out = jnp.where(seen[..., None], o / l_safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
    out = _unblock(out, plan.T)  # (batch, T, kv_heads, group, value_dim)
    return out.reshape(*out.shape[:2], -1, out.shape[-1]).astype(dtype), lse


def _backward(
    plan: _Plan,
    config: _Config,
    residuals: tuple[Any, ...],
    output_grad: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FlashAttention-2's backward (module docstring): ``dQ, dK, dV`` block by block."""
    q, k, v, extras, out, lse = residuals
    # Behind a conditional on the output gradient, true for every float but unknowable to XLA: the
    # recomputation can be neither merged with the forward's scores (common-subexpression
    # elimination) nor hoisted into the forward, either of which kept every layer's probabilities
    # alive from the forward to the backward (a GPT's step at T = 64: 6 of its 55 MiB of
    # temporaries). An optimization barrier did not do it: XLA's CPU backend removes barriers
    # before it schedules.
    c = jnp.ravel(output_grad)[0]
    always = jnp.isfinite(c) | jnp.isnan(c) | jnp.isinf(c)
    grads = lambda operands: _backward_blocks(plan, config, operands)
    unreachable = lambda operands: tuple(jnp.full(a.shape, jnp.nan, a.dtype) for a in operands[:3])  # dq, dk, dv
    result: tuple[jax.Array, jax.Array, jax.Array] = lax.cond(
        always, grads, unreachable, (q, k, v, extras, out, lse, output_grad)
    )
    return result


def _backward_blocks(plan: _Plan, config: _Config, operands: tuple[Any, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, extras, out, lse, output_grad = operands
    dtype, acc = q.dtype, _accumulator(q.dtype)
    batch = q.shape[0]
    d = jnp.sum(output_grad.astype(acc) * out.astype(acc), axis=-1)  # D = rowsum(dO * O)
    db = _row_blocks(d, plan)
    qb, gb = _blocks(_grouped(q, plan), plan.nq, plan.bq), _blocks(_grouped(output_grad, plan), plan.nq, plan.bq)
    kb, vb = _blocks(k, plan.nk, plan.bk), _blocks(v, plan.nk, plan.bk)
    if extras.mask is not None:
        extras = extras._replace(mask=_padded_mask(extras.mask, plan))
    if config.dropout:
        assert extras.dropout_rate is not None  # dropout is on: both are given
        inverse_keep = 1.0 / (1.0 - extras.dropout_rate)

    def tile(i: jax.Array, j: jax.Array, visible: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        qi, gi, kj, vj = qb[i], gb[i], kb[j], vb[j]
        s = _scores(config.scale, qi, kj, visible, acc)
        p = jnp.exp(s - lse[i][..., None])  # P, recomputed from the saved log-sum-exp (0 if hidden)
        dp = jnp.einsum("bkgqh,bksh->bkgqs", gi, vj, preferred_element_type=acc)  # dW = dO V^T
        if config.dropout:  # W = P Z / (1 - rate), dP = dW Z / (1 - rate): Z regenerated from the key
            keep = _keep(plan, config, extras, i, j, batch)
            pz = jnp.where(keep, p, 0.0)
            dv_j = jnp.einsum("bkgqs,bkgqh->bksh", pz.astype(dtype), gi, preferred_element_type=acc) * inverse_keep
            dp = jnp.where(keep, dp, 0.0) * inverse_keep
        else:
            dv_j = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(dtype), gi, preferred_element_type=acc)  # W^T dO
        ds = (p * (dp - db[i][..., None])).astype(dtype)  # P * (dP - D)
        dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds, kj, preferred_element_type=acc) * config.scale  # scale dS K
        dk_j = jnp.einsum("bkgqs,bkgqh->bksh", ds, qi, preferred_element_type=acc) * config.scale  # scale dS^T Q
        return dq_i, dk_j, dv_j

    def step(carry: Any, pair: jax.Array) -> tuple[Any, None]:
        dq, dk, dv = carry
        i, j = pair[0], pair[1]
        visible = _visible(plan, config, extras, i, j)
        if plan.skip and visible is not None:
            zeros = (jnp.zeros(dq.shape[1:], acc), jnp.zeros(dk.shape[1:], acc), jnp.zeros(dv.shape[1:], acc))
            dq_i, dk_j, dv_j = lax.cond(jnp.any(visible), lambda: tile(i, j, visible), lambda: zeros)
        else:
            dq_i, dk_j, dv_j = tile(i, j, visible)
        return (dq.at[i].add(dq_i), dk.at[j].add(dk_j), dv.at[j].add(dv_j)), None

    start = (jnp.zeros(qb.shape, acc), jnp.zeros(kb.shape, acc), jnp.zeros(vb.shape, acc))
    (dq, dk, dv), _ = lax.scan(step, start, _pairs(plan))
    dq = _unblock(dq, plan.T)
    return (
        dq.reshape(*dq.shape[:2], -1, dq.shape[-1]).astype(dtype),
        _unblock(dk, plan.S).astype(dtype),
        _unblock(dv, plan.S).astype(dtype),
    )


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, extras: _Extras, config: _Config) -> jax.Array:
    return _attention_fwd(q, k, v, extras, config)[0]  # L unused: dropped


def _attention_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, extras: _Extras, config: _Config
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _forward(_plan(q, k, config, extras), config, q, k, v, extras)
    return out, (q, k, v, extras, out, lse)  # the output and L: no T x S array


def _no_grad(a: jax.Array) -> Any:
    """The cotangent of an argument that gets no gradient: float0 zeros for integers, booleans
    and keys, zeros for a float (the dropout rate)."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros(a.shape, a.dtype)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _attention_bwd(config: _Config, residuals: tuple[Any, ...], output_grad: jax.Array) -> tuple[Any, ...]:
    q, k, _, extras = residuals[:4]
    dq, dk, dv = _backward(_plan(q, k, config, extras), config, residuals, output_grad)
    return dq, dk, dv, jax.tree.map(_no_grad, extras)


_attention_vjp = jax.custom_vjp(_attention, nondiff_argnums=(4,))
_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


# --- the checks ----------------------------------------------------------------------------

_TORCH_LAYOUT = (
    " q/k/v look like (batch, heads, T, head_dim), torch's layout; funcnet takes jax.nn's "
    "(batch, T, heads, head_dim): transpose with x.transpose(0, 2, 1, 3)."
)


def _torch_layout(q: Any, k: Any, v: Any) -> str:
    """The hint to add to a shape error when q, k, v would fit if read as torch's (batch, heads,
    T, head_dim); empty otherwise."""
    shapes = [tuple(x.shape) for x in (q, k, v)]
    if any(len(shape) != 4 for shape in shapes):
        return ""
    (b, heads, _, h), (bk, kv_heads, s, hk), (bv, v_heads, sv, _) = shapes
    fits = b == bk == bv and h == hk and kv_heads == v_heads and s == sv and heads % kv_heads == 0
    return _TORCH_LAYOUT if fits else ""


def _check_mask(fn: str, mask: Any, target: tuple[int, int, int, int], torch_target: tuple[int, ...]) -> jax.Array:
    _checks.array(fn, "mask", mask)
    if mask.dtype != jnp.bool_:
        kind = ""
        if _checks.is_concrete(mask) and mask.size and jnp.issubdtype(mask.dtype, jnp.number):
            values = np.asarray(mask, np.float64)
            if np.any(values < 0):
                kind = " This one holds negative values: an additive mask, so mask == 0."
            elif np.all((values == 0) | (values == 1)):
                kind = " This one holds only 0 and 1: a multiplicative mask, so mask != 0."
        raise TypeError(
            f"{fn}: mask must be boolean (True = attend), got {mask.dtype}. An additive float mask (0 = attend, "
            "-inf = blocked, as torch's float attn_mask) converts with mask == 0; a multiplicative one (1 = attend, "
            f"0 = blocked) with mask != 0.{kind}"
        )
    shape = tuple(mask.shape)

    def fits(target: tuple[int, ...]) -> bool:
        return len(shape) <= 4 and all(m in (1, t) for m, t in zip(shape[::-1], target[::-1], strict=False))

    if not fits(target):
        hint = _TORCH_LAYOUT if torch_target and fits(torch_target) else ""
        raise ValueError(f"{fn}: mask must broadcast to (batch, heads, T, S) = {target}, got shape {shape}.{hint}")
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


def _check_q_offset(fn: str, q_offset: Any, batch: int) -> int | jax.Array:
    """An int (static) or an integer array of shape () or (batch,), as (batch,) int32."""
    if isinstance(q_offset, (bool, np.bool_)):
        raise TypeError(f"{fn}: q_offset must be an int or an integer array, got bool {q_offset!r}.")
    if isinstance(q_offset, numbers.Integral):
        if q_offset < 0:
            raise ValueError(f"{fn}: q_offset (the number of keys before query 0) must be >= 0, got {q_offset}.")
        return int(q_offset)
    if not _checks.is_array(q_offset):
        raise TypeError(
            f"{fn}: q_offset must be an int or an integer array of shape (batch,) = ({batch},), got "
            f"{type(q_offset).__name__} {q_offset!r}."
        )
    if not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise TypeError(f"{fn}: q_offset must have an integer dtype, got {q_offset.dtype}.")
    if tuple(q_offset.shape) not in ((), (batch,)):
        raise ValueError(
            f"{fn}: q_offset must be an int or have shape () or (batch,) = ({batch},), got shape "
            f"{tuple(q_offset.shape)}."
        )
    if _checks.is_concrete(q_offset) and q_offset.size:
        low, _ = _checks.value_range(q_offset)
        if low < 0:
            raise ValueError(f"{fn}: q_offset (the number of keys before query 0) must be >= 0, got {low}.")
    return jnp.broadcast_to(jnp.asarray(q_offset).astype(jnp.int32), (batch,))


def _check_key(fn: str, key: Any) -> tuple[jax.Array, str | None]:
    """A typed PRNG key of shape () or a raw uint32 key: its data and implementation (None: raw)."""
    if _checks.is_array(key) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{fn}: dropout_key must be a single key (shape ()), got shape {tuple(key.shape)}.")
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    if not _checks.is_array(key) or key.dtype != jnp.uint32 or key.ndim != 1:
        what = f"{key.dtype} array of shape {tuple(key.shape)}" if _checks.is_array(key) else type(key).__name__
        raise TypeError(
            f"{fn}: dropout_key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got {what}."
        )
    return jnp.asarray(key), None


def _check_rate(fn: str, rate: Any) -> None:
    _checks.real_number(fn, "dropout_rate", rate, low=0.0, high=1.0, high_open=True)


def _check_tile(fn: str, batch: int, heads: int, bq: int, bk: int) -> None:
    """A dropout tile's elements are numbered by uint32 (the hash's counter)."""
    if batch * heads * bq * bk >= 2**32:
        raise ValueError(
            f"{fn}: a dropout tile of batch * heads * block * block = {batch} * {heads} * {bq} * {bk} scores "
            "must have fewer than 2**32; use a smaller block_size."
        )


def attention_dropout_mask(
    dropout_key: jax.Array,
    shape: tuple[int, int, int, int],
    rate: float | jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """The keep-mask ``Z`` that ``dot_product_attention(..., dropout_rate=rate,
    dropout_key=dropout_key, block_size=block_size)`` draws, whole: boolean ``shape`` = ``(batch,
    heads, T, S)``, True = kept (probability ``1 - rate``).

    It depends on ``block_size`` (each tile has its own key, the module docstring's), and on the
    batch and head counts; the kernel never builds it, this is for tests and inspection.

    Args:
      dropout_key: the key passed to ``dot_product_attention``.
      shape: ``(batch, heads, T, S)``, positive ints.
      rate: the dropout rate, in ``[0, 1)``.
      block_size: the kernel's tile, as passed to it; default ``128``.

    Returns:
      The boolean ``(batch, heads, T, S)`` keep-mask.
    """
    fn = "attention_dropout_mask"
    data, impl = _check_key(fn, dropout_key)
    if not isinstance(shape, (tuple, list)) or len(shape) != 4:
        raise ValueError(f"{fn}: shape must be (batch, heads, T, S), got {shape!r}.")
    for name, size in zip(("batch", "heads", "T", "S"), shape, strict=True):
        _checks.positive_int(fn, f"shape's {name}", size)
    _check_rate(fn, rate)
    _checks.positive_int(fn, "block_size", block_size)
    batch, heads, T, S = (int(n) for n in shape)
    bq, bk = min(block_size, T), min(block_size, S)
    nq, nk = -(-T // bq), -(-S // bk)
    _check_tile(fn, batch, heads, bq, bk)
    key, threshold = _as_key(data, impl), _threshold(jnp.asarray(rate))
    tile = lambda i, j: _keep_tile(key, i, j, (batch, heads, bq, bk), threshold)
    rows, cols = jnp.arange(nq, dtype=jnp.int32), jnp.arange(nk, dtype=jnp.int32)
    tiles = jax.vmap(lambda i: jax.vmap(lambda j: tile(i, j))(cols))(rows)  # (nq, nk, batch, heads, bq, bk)
    full = tiles.transpose(2, 3, 0, 4, 1, 5).reshape(batch, heads, nq * bq, nk * bk)
    return full[:, :, :T, :S]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    kv_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    q_offset: int | jax.Array = 0,
    dropout_rate: float | jax.Array = 0.0,
    dropout_key: jax.Array | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """``softmax(scale * q k^T) v`` per batch row and head, over the keys each query may see.

    The layout, the masks, grouped-query heads, dropout and the backward are the module
    docstring's.

    Args:
      q: ``(batch, T, heads, head_dim)`` queries (jax.nn's layout; torch's is ``(batch, heads,
        T, head_dim)``: ``q.transpose(0, 2, 1, 3)``).
      k: ``(batch, S, kv_heads, head_dim)`` keys; ``kv_heads`` divides ``heads`` (grouped-query
        attention; 1 = multi-query).
      v: ``(batch, S, kv_heads, value_dim)`` values; q, k, v share one floating dtype.
      is_causal: query ``t`` sees keys ``s <= t + q_offset`` only.
      kv_lengths: ``(batch,)`` integers in ``[0, S]``: keys ``s >= kv_lengths[b]`` are padding.
      mask: boolean, broadcastable to ``(batch, heads, T, S)``; True = attend (torch's
        ``nn.MultiheadAttention`` ``attn_mask`` is the opposite: pass ``~attn_mask``).
      scale: multiplies the scores; ``1 / sqrt(head_dim)`` by default.
      q_offset: the number of keys before query 0, for ``is_causal``: an int >= 0, or integers
        of shape ``(batch,)`` or ``()`` (may be traced, as in decoding). ``S - T`` aligns the
        last query with the last key (torch's ``causal_lower_right``).
      dropout_rate: probability in ``[0, 1)`` of dropping each attention weight (inverted
        dropout, the softmax normalised without it); needs ``dropout_key`` when not 0.
      dropout_key: a PRNG key; the keep-mask is ``attention_dropout_mask(dropout_key, (batch,
        heads, T, S), dropout_rate, block_size=block_size)``.
      block_size: rows and columns of one tile of scores, >= 1; memory and speed, never the
        result, depend on it (up to rounding), except the dropout mask, which is drawn per tile.

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
    S, kv_heads = k.shape[1], k.shape[2]
    shapes = f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
    torch = _torch_layout(q, k, v)
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{fn}: q, k and v must share the batch size, got {shapes}.{torch}")
    if v.shape[2] != kv_heads:
        raise ValueError(f"{fn}: k and v must have the same number of heads (axis 2), got {shapes}.{torch}")
    if heads % kv_heads:
        raise ValueError(
            f"{fn}: k and v's kv_heads = {kv_heads} (axis 2) must divide q's heads = {heads} (grouped-query "
            f"attention: query head n uses kv head n // (heads // kv_heads)), got {shapes}.{torch}"
        )
    if k.shape[3] != head_dim:
        raise ValueError(
            f"{fn}: k must have q's head_dim {head_dim} (axis 3) to form q k^T, got k.shape={tuple(k.shape)} "
            f"for q.shape={tuple(q.shape)}.{torch}"
        )
    if v.shape[1] != S:
        raise ValueError(
            f"{fn}: v must have as many positions (axis 1) as k, {S}, got v.shape={tuple(v.shape)} "
            f"for k.shape={tuple(k.shape)}.{torch}"
        )
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}.")
    _checks.positive_int(fn, "block_size", block_size)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    _checks.real_number(fn, "scale", scale)
    if not _checks.is_concrete(scale):
        raise TypeError(f"{fn}: scale must be a concrete number (it is static), got a traced value.")
    offset = _check_q_offset(fn, q_offset, batch)
    _check_rate(fn, dropout_rate)
    dropout = not (_checks.is_concrete(dropout_rate) and float(dropout_rate) == 0.0)
    key_data, key_impl = None, None
    if dropout:
        if dropout_key is None:
            raise ValueError(
                f"{fn}: dropout_rate {dropout_rate} needs a dropout_key (e.g. jax.random.key(0)); "
                "pass dropout_rate=0.0 for no dropout."
            )
        key_data, key_impl = _check_key(fn, dropout_key)
        _check_tile(fn, batch, heads, min(block_size, T), min(block_size, S))
    torch_mask_target = (batch, T, heads, k.shape[2]) if torch else ()  # (batch, heads, T, S) read as torch's
    extras = _Extras(
        kv_lengths=None if kv_lengths is None else _check_kv_lengths(fn, kv_lengths, batch, S),
        mask=None if mask is None else _check_mask(fn, mask, (batch, heads, T, S), torch_mask_target),
        q_offset=offset if is_causal and not isinstance(offset, int) else None,
        dropout_key=key_data,
        dropout_rate=jnp.asarray(dropout_rate).astype(_accumulator(q.dtype)) if dropout else None,
    )
    config = _Config(
        is_causal=bool(is_causal),
        scale=float(scale),
        block_size=int(block_size),
        offset=offset if isinstance(offset, int) else None,
        dropout=dropout,
        key_impl=key_impl,
    )
    return _attention_vjp(q, k, v, extras, config)
