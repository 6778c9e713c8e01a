"""funcnet's blockwise attention (hand-derived FlashAttention-2 backward) against autodiff of
``jax.nn.dot_product_attention``.

Workload: batch 2, 4 heads, head_dim 64, float32, causal self-attention, T = S in 256, 1024,
4096. For each T: the forward + backward of ``<attention(q, k, v), g>`` for a fixed random
``g`` (gradients with respect to q, k, v), jitted, timed in alternation (round-robin) with
``jax.grad`` of the same through ``jax.nn.dot_product_attention(..., is_causal=True)``; medians
and their ratio. Then the compiled gradient's temporary memory, from XLA's own accounting
without running it: ``jax.jit(grad).lower(q, k, v, g).compile().memory_analysis()
.temp_size_in_bytes``. The two are checked to compute the same gradients first.

Then funcnet's kernel against itself, at one length (``--extra-length``, 1024 by default), each
table's variants timed in alternation, forward + backward as above:

* grouped-query attention: 8 query heads with ``kv_heads`` = 1 (multi-query), 2 and 8 (plain),
  causal: time and the gradient's compiled temporary memory (fewer kv heads: smaller k, v and
  dK, dV; the scores, per query head, are the same work);
* dropout on the attention weights, ``dropout_rate=0.1`` against none, causal (the keep-mask is
  drawn twice, forward and backward, never stored; target <= 1.3x);
* the padding skip: every row's ``kv_lengths`` = 64 of the 1024 keys against all 1024
  (not causal): the tiles beyond every row's length are skipped by a ``lax.cond``;
* rotary's overhead: ``MultiHeadAttention(8, is_causal=True)`` against the same layer with
  ``rope=10000.0`` on ``x`` of 512 features (head_dim 64), the gradient of ``sum(apply(params,
  x) * g)`` with respect to the params and ``x``; also the first call (compile + one step).

Each is checked first: GQA against the plain kernel on repeated k, v; the padded run against the
kernel on the first 64 keys alone; dropout at rate 0 against no dropout; the rope layer against
the plain one on a one-step sequence (position 0, no rotation: the same gradients), with the same
params, and not equal to it on the whole sequence.

    python benchmarks/bench_attention.py                  # the tables
    python benchmarks/bench_attention.py --quick          # tiny sizes, to check it runs
    python benchmarks/bench_attention.py --block-size 64  # another tile size
    python benchmarks/bench_attention.py --lengths 256 1024 --extra-length 512  # other sizes
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, table

import funcnet as fn
from funcnet.attention.kernel import DEFAULT_BLOCK_SIZE

BATCH, HEADS, HEAD_DIM = 2, 4, 64


def programs(T: int, block_size: int) -> tuple[dict, tuple]:
    rng = np.random.default_rng(T)
    q, k, v, g = (jnp.asarray(rng.standard_normal((BATCH, T, HEADS, HEAD_DIM)), jnp.float32) for _ in range(4))
    # g is an argument, not a constant the compiler would fold into the program.
    ours = lambda q, k, v, g: jnp.vdot(fn.dot_product_attention(q, k, v, is_causal=True, block_size=block_size), g)
    plain = lambda q, k, v, g: jnp.vdot(jax.nn.dot_product_attention(q, k, v, is_causal=True), g)
    grads = {name: jax.jit(jax.grad(f, argnums=(0, 1, 2))) for name, f in (("funcnet", ours), ("jax.nn", plain))}
    return grads, (q, k, v, g)


def temp_bytes(f, args: tuple) -> float:
    analysis = f.lower(*args).compile().memory_analysis()
    return float("nan") if analysis is None else float(analysis.temp_size_in_bytes)


def measure(T: int, block_size: int, rounds: int) -> list:
    grads, args = programs(T, block_size)
    # The check in full float32 (a GPU multiplies float32 matrices in TF32 by default, to ~1e-3);
    # the timing below at the default precision.
    with jax.default_matmul_precision("highest"):
        results = {name: jax.block_until_ready(f(*args)) for name, f in grads.items()}
    for f in grads.values():
        jax.block_until_ready(f(*args))  # compile
    for ours, theirs in zip(results["funcnet"], results["jax.nn"], strict=True):
        scale = float(jnp.max(jnp.abs(theirs)))
        error = float(jnp.max(jnp.abs(ours - theirs)))
        if not error <= 1e-3 * scale:
            raise AssertionError(f"T={T}: funcnet's gradient differs from jax.nn's by {error:.3e} (scale {scale:.3e}).")
    times: dict[str, list[float]] = {name: [] for name in grads}
    for _ in range(rounds):
        for name, f in grads.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    ours, theirs = (float(np.median(times[name])) for name in ("funcnet", "jax.nn"))
    memory = {name: temp_bytes(f, args) for name, f in grads.items()}
    mib = lambda b: f"{b / 2**20:.1f}"
    return [
        T,
        f"{1e3 * ours:.1f}",
        f"{1e3 * theirs:.1f}",
        f"{ours / theirs:.2f}",
        mib(memory["funcnet"]),
        mib(memory["jax.nn"]),
        f"{memory['funcnet'] / memory['jax.nn']:.3f}",
    ]


def interleaved(fs: dict, args: tuple, rounds: int) -> dict[str, float]:
    """Median seconds of each of ``fs`` called on ``args``, timed in alternation (round-robin)
    after one compiling call each."""
    for f in fs.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fs}
    for _ in range(rounds):
        for name, f in fs.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _grad(**options) -> object:
    """The jitted forward + backward of ``<attention(q, k, v, **options), g>``."""
    f = lambda q, k, v, g: jnp.vdot(fn.dot_product_attention(q, k, v, **options), g)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))


def _same(name: str, ours: tuple, theirs: tuple) -> None:
    for a, b in zip(ours, theirs, strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        error = float(jnp.max(jnp.abs(a - b)))
        if not error <= 1e-3 * scale:
            raise AssertionError(f"{name}: the gradients differ by {error:.3e} (scale {scale:.3e}).")


def _normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def grouped_query(T: int, block: int, rounds: int) -> list:
    heads, rng = 8, np.random.default_rng(1)
    q, g = _normal(rng, BATCH, T, heads, HEAD_DIM), _normal(rng, BATCH, T, heads, HEAD_DIM)
    kv = {K: (_normal(rng, BATCH, T, K, HEAD_DIM), _normal(rng, BATCH, T, K, HEAD_DIM)) for K in (1, 2, heads)}
    grad = _grad(is_causal=True, block_size=block)
    with jax.default_matmul_precision("highest"):  # GQA == the plain kernel on repeated k, v
        for K, (k, v) in kv.items():
            repeat = lambda x, K=K: jnp.repeat(x, heads // K, axis=2)
            dq, dk, dv = grad(q, k, v, g)
            rq, rk, rv = grad(q, repeat(k), repeat(v), g)
            sum_group = lambda x, K=K: x.reshape(BATCH, T, K, heads // K, HEAD_DIM).sum(axis=3)
            _same(f"GQA kv_heads={K}", (dq, dk, dv), (rq, sum_group(rk), sum_group(rv)))
    fs = {K: (lambda q, g, K=K: grad(q, *kv[K], g)) for K in kv}
    medians = interleaved({str(K): f for K, f in fs.items()}, (q, g), rounds)
    base = medians[str(heads)]
    rows = []
    for K, (k, v) in kv.items():
        memory = temp_bytes(grad, (q, k, v, g))
        rows.append([K, f"{1e3 * medians[str(K)]:.1f}", f"{medians[str(K)] / base:.2f}", f"{memory / 2**20:.1f}"])
    return rows


def dropout_and_padding(T: int, block: int, rounds: int) -> tuple[list, list]:
    rng = np.random.default_rng(2)
    q, k, v, g = (_normal(rng, BATCH, T, HEADS, HEAD_DIM) for _ in range(4))
    key = jax.random.key(0)
    plain, dropped = (
        _grad(is_causal=True, block_size=block),
        _grad(is_causal=True, block_size=block, dropout_rate=0.1, dropout_key=key),
    )
    rate = jax.jit(
        jax.grad(
            lambda q, k, v, g, r: jnp.vdot(
                fn.dot_product_attention(q, k, v, is_causal=True, block_size=block, dropout_rate=r, dropout_key=key),
                g,
            ),
            argnums=(0, 1, 2),
        )
    )
    with jax.default_matmul_precision("highest"):
        _same("dropout at rate 0", rate(q, k, v, g, jnp.float32(0.0)), plain(q, k, v, g))
    medians = interleaved({"none": plain, "0.1": dropped}, (q, k, v, g), rounds)
    dropout_rows = [
        [rate_name, f"{1e3 * medians[rate_name]:.1f}", f"{medians[rate_name] / medians['none']:.2f}"]
        for rate_name in ("none", "0.1")
    ]
    visible = min(64, T)
    lengths = jnp.full((BATCH,), visible, jnp.int32)
    full, padded = _grad(block_size=block), _grad(block_size=block, kv_lengths=lengths)
    with jax.default_matmul_precision("highest"):  # the padded keys change nothing but their zero gradients
        dq, dk, dv = padded(q, k, v, g)
        rq, rk, rv = full(q, k[:, :visible], v[:, :visible], g)
        _same("kv_lengths", (dq, dk[:, :visible], dv[:, :visible]), (rq, rk, rv))
    medians = interleaved({"all": full, "padded": padded}, (q, k, v, g), rounds)
    padding_rows = [
        [f"all {T}", f"{1e3 * medians['all']:.1f}", "1.00"],
        [
            f"{visible} of {T} (kv_lengths)",
            f"{1e3 * medians['padded']:.1f}",
            f"{medians['padded'] / medians['all']:.2f}",
        ],
    ]
    return dropout_rows, padding_rows


def rotary(T: int, features: int, block: int, rounds: int) -> list:
    heads, rng = 8, np.random.default_rng(3)
    x, g = _normal(rng, BATCH, T, features), _normal(rng, BATCH, T, features)
    layers = {
        "none": fn.MultiHeadAttention(heads, is_causal=True, block_size=block),
        "rope=10000.0": fn.MultiHeadAttention(heads, is_causal=True, rope=10000.0, block_size=block),
    }
    params = layers["none"].init(jax.random.key(0), (-1, T, features))[1]
    rope_params = layers["rope=10000.0"].init(jax.random.key(0), (-1, T, features))[1]
    if jax.tree.structure(params) != jax.tree.structure(rope_params):
        raise AssertionError("rope changed the params' structure: the two layers cannot share params.")
    grads = {
        name: jax.jit(jax.grad(lambda p, x, g, layer=layer: jnp.sum(layer.apply(p, x) * g), argnums=(0, 1)))
        for name, layer in layers.items()
    }
    with jax.default_matmul_precision("highest"):  # position 0 is not rotated: one step, the same gradients
        first = {name: jax.tree.leaves(f(params, x[:, :1], g[:, :1])) for name, f in grads.items()}
        _same("rope on one step", first["rope=10000.0"], first["none"])
        plain, rotated = (layers[name].apply(params, x) for name in ("none", "rope=10000.0"))
        if not float(jnp.max(jnp.abs(plain - rotated))) > 1e-3 * float(jnp.max(jnp.abs(plain))):
            raise AssertionError("rope changed nothing on the whole sequence.")
    first_call = {}
    for name, f in grads.items():  # compile + one step, apart from the steady state below
        start = time.perf_counter()
        jax.block_until_ready(f(params, x, g))
        first_call[name] = time.perf_counter() - start
    medians = interleaved(grads, (params, x, g), rounds)
    base = medians["none"]
    return [
        [name, f"{1e3 * medians[name]:.1f}", f"{medians[name] / base:.2f}", f"{first_call[name]:.2f}"] for name in grads
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths T (= S)")
    parser.add_argument("--extra-length", type=int, default=None, help="T (= S) of the GQA, dropout, padding tables")
    args = parser.parse_args()
    lengths = args.lengths or ([64, 128] if args.quick else [256, 1024, 4096])
    block = min(args.block_size, 32) if args.quick else args.block_size
    print(f"Machine: {machine()}\n")
    rows = []
    for T in lengths:
        rounds = 2 if args.quick else max(3, min(15, 2**21 // (T * T) * 3))
        rows.append(measure(T, block, rounds))
    print(
        f"Causal self-attention, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32, block {block}: "
        "forward + backward (median ms) and the gradient's compiled temporary memory (MiB)"
    )
    print(
        table(
            ["T", "funcnet", "jax.nn autodiff", "time ratio", "funcnet temp MiB", "jax.nn temp MiB", "memory ratio"],
            rows,
        )
    )
    T = args.extra_length or (128 if args.quick else 1024)
    rounds = 2 if args.quick else max(5, min(15, 2**21 // (T * T) * 5))
    print(
        f"\nGrouped-query attention, causal, batch {BATCH}, 8 query heads, head_dim {HEAD_DIM}, T = S = {T}, "
        f"float32, block {block}: forward + backward (median ms) and the gradient's compiled temporary memory"
    )
    print(table(["kv_heads", "ms", "time vs kv_heads=8", "temp MiB"], grouped_query(T, block, rounds)))
    dropout_rows, padding_rows = dropout_and_padding(T, block, rounds)
    print(
        f"\nDropout on the attention weights, causal, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, "
        f"T = S = {T}, float32, block {block}: forward + backward (median ms)"
    )
    print(table(["dropout_rate", "ms", "time vs none"], dropout_rows))
    print(
        f"\nKey padding, not causal, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, T = S = {T}, float32, "
        f"block {block}: forward + backward (median ms) with every row's kv_lengths = 64 against all keys"
    )
    print(table(["keys visible", "ms", "time vs all"], padding_rows))
    features = 64 if args.quick else 512
    print(
        f"\nRotary position embedding: MultiHeadAttention(8, is_causal=True) with and without rope=10000.0, "
        f"batch {BATCH}, T = {T}, {features} features (head_dim {features // 8}), float32, block {block}: "
        "forward + backward with respect to params and x (median ms), and the first call (compile + one step, s)"
    )
    print(table(["rope", "ms", "time vs none", "first call s"], rotary(T, features, block, rounds)))


if __name__ == "__main__":
    main()
