"""Gradient memory and step time of an 8-block GPT, with and without ``remat`` on each block.

The network is GPT-2's shape at a small size: ``serial(Embedding, PositionalEmbedding, 8 x
[residual(LayerNorm, MultiHeadAttention(is_causal=True)), residual(LayerNorm, Dense(4d, gelu),
Dense(d, linear))], LayerNorm, Dense(vocab))``, float32, the loss ``softmax_cross_entropy`` over
every position. Four variants of the same network, the same params:

* ``none``: the blocks as they are;
* ``remat``: ``funcnet.remat`` around each block (recomputation in a ``custom_vjp``'s backward,
  behind a ``lax.cond`` on the cotangent);
* ``jax.checkpoint``: each block's apply in ``jax.checkpoint(..., prevent_cse=True)``;
* ``jax.checkpoint (nothing_saveable)``: the same with ``policy=nothing_saveable``.

Memory is XLA's own figure for the compiled gradient,
``jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes`` (the
activations kept for the backward live there). Step time is the median of the compiled
gradient's runs, the variants timed in alternation. The variants' gradients are checked equal
(to float32 rounding) before anything is timed.

    python benchmarks/bench_remat.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, table

import funcnet as fn
from funcnet.combinators import remat

MiB = 2**20


def block(d: int, heads: int) -> fn.Layer:
    return fn.serial(
        fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(heads, is_causal=True)),
        fn.residual(fn.LayerNorm(), fn.Dense(4 * d, fn.gelu), fn.Dense(d, fn.linear)),
    )


def checkpointed(layer: fn.Layer, policy: object = None) -> fn.Layer:
    """``layer`` with its apply inside a plain ``jax.checkpoint`` (a Layer of closures)."""
    init, apply = layer
    wrapped = jax.checkpoint(lambda p, x: apply(p, x), prevent_cse=True, policy=policy)
    return fn.Layer(init, lambda params, x, *, key=None: wrapped(params, x))


def gpt(wrap, *, vocab: int, d: int, heads: int, blocks: int, length: int) -> fn.Layer:
    return fn.serial(
        fn.Embedding(vocab, d),
        fn.PositionalEmbedding(length),
        *[wrap(block(d, heads)) for _ in range(blocks)],
        fn.LayerNorm(),
        fn.Dense(vocab, fn.linear),
    )


VARIANTS = {
    "none": lambda b: b,
    "remat": remat,
    "jax.checkpoint": checkpointed,
    "jax.checkpoint (nothing_saveable)": lambda b: checkpointed(b, jax.checkpoint_policies.nothing_saveable),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to see the script run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        sizes = dict(vocab=64, d=32, heads=2, blocks=8, length=32)
        batch, repeats = 2, 2
    else:
        sizes = dict(vocab=512, d=128, heads=4, blocks=8, length=256)
        batch, repeats = 8, args.repeats
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, sizes["vocab"], (batch, sizes["length"])), jnp.int32)
    y = jnp.asarray(rng.integers(0, sizes["vocab"], (batch, sizes["length"])), jnp.int32)
    _, params = gpt(VARIANTS["none"], **sizes).init(jax.random.PRNGKey(0), (-1, sizes["length"]))

    compiled, memory, compile_s = {}, {}, {}
    for name, wrap in VARIANTS.items():
        net = gpt(wrap, **sizes)
        loss = lambda p, net=net: fn.softmax_cross_entropy(net.apply(p, x), y)
        start = time.perf_counter()
        compiled[name] = jax.jit(jax.grad(loss)).lower(params).compile()
        compile_s[name] = time.perf_counter() - start
        memory[name] = compiled[name].memory_analysis().temp_size_in_bytes

    reference = jax.tree_util.tree_leaves(compiled["none"](params))
    for name, program in compiled.items():  # the same gradient, before anything is timed
        for a, b in zip(reference, jax.tree_util.tree_leaves(program(params)), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=name)

    times: dict[str, list[float]] = {name: [] for name in compiled}
    for program in compiled.values():  # warm-up
        jax.block_until_ready(program(params))
    for _ in range(repeats):  # round-robin: every variant sees the same machine noise
        for name, program in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(program(params))
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        [
            f"`{name}`",
            f"{memory[name] / MiB:.1f}",
            f"{memory[name] / memory['none']:.2f}x",
            f"{median[name] * 1e3:.0f}",
            f"{median[name] / median['none']:.2f}x",
            f"{compile_s[name]:.1f}",
        ]
        for name in compiled
    ]
    print(f"Machine: {machine()}")
    print(
        f"Workload: gradient of an {sizes['blocks']}-block GPT (d={sizes['d']}, heads={sizes['heads']}, "
        f"T={sizes['length']}, batch={batch}, vocab={sizes['vocab']}, float32); medians of {repeats} "
        "alternated runs.\n"
    )
    print(
        table(
            ["checkpointing per block", "temp MiB", "vs none", "step ms", "vs none", "compile s"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
