"""funcnet's blockwise attention (hand-derived FlashAttention-2 backward) against autodiff of
``jax.nn.dot_product_attention``.

Workload: batch 2, 4 heads, head_dim 64, float32, causal self-attention, T = S in 256, 1024,
4096. For each T: the forward + backward of ``<attention(q, k, v), g>`` for a fixed random
``g`` (gradients with respect to q, k, v), jitted, timed in alternation (round-robin) with
``jax.grad`` of the same through ``jax.nn.dot_product_attention(..., is_causal=True)``; medians
and their ratio. Then the compiled gradient's temporary memory, from XLA's own accounting
without running it: ``jax.jit(grad).lower(q, k, v, g).compile().memory_analysis()
.temp_size_in_bytes``. The two are checked to compute the same gradients first.

    python benchmarks/bench_attention.py                  # the table
    python benchmarks/bench_attention.py --quick          # tiny sizes, to check it runs
    python benchmarks/bench_attention.py --block-size 64  # another tile size
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths T (= S)")
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


if __name__ == "__main__":
    main()
