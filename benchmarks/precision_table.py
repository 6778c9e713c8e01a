"""The low-precision failures of issue #23, each tried in float16 and bfloat16: prints a Markdown table.

Each row is one thing a new user tries; the cell says what funcnet does. Run it before and after
a change to see what the change fixed. Not a timing: it checks values.

    python benchmarks/precision_table.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, table

import funcnet as fn


def fit_total(dtype: jnp.dtype) -> str:
    """A 2-layer net fit on 4,096 rows for one epoch: does it report diverged?"""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4096, 8)), dtype)
    y = jnp.asarray(10 * rng.normal(size=(4096, 1)), dtype)  # a loss near 100: its total overflows float16
    net = fn.serial(fn.Dense(16, fn.tanh, dtype=dtype), fn.Dense(1, fn.linear, dtype=dtype))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8))
    out = fn.fit(
        net, fn.mean_squared_error, fn.sgd(0.01), params, (x, y), epochs=1, batch_size=32, key=jax.random.PRNGKey(1)
    )
    loss = float(out.history.train_loss[0])
    return f"diverged={bool(out.diverged)}, loss {loss:.3g}"


def layer_norm(dtype: jnp.dtype) -> str:
    """float16/bfloat16 layer_norm of [300, -300, 100, -100]."""
    x = jnp.asarray([[300.0, -300.0, 100.0, -100.0]], dtype)
    y = fn.layer_norm(x, jnp.ones((4,), dtype), jnp.zeros((4,), dtype))
    return str([round(float(v), 3) for v in np.asarray(y, np.float32)[0]])


def adam_embedding(dtype: jnp.dtype) -> str:
    """Adam on an Embedding whose row 3 no batch reads: does that row turn NaN?"""
    net = fn.serial(fn.Embedding(4, 2, dtype=dtype), fn.TimeDistributed(fn.Dense(1, fn.linear, dtype=dtype)))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=(64, 3)), jnp.int32)
    y = jnp.ones((64, 3, 1), dtype)
    out = fn.fit(
        net, fn.mean_squared_error, fn.adam(0.01), params, (ids, y), epochs=2, batch_size=16, key=jax.random.PRNGKey(1)
    )
    row = np.asarray(out.params[0].W[3], np.float32)
    return f"unread row NaN={bool(np.isnan(row).any())}, diverged={bool(out.diverged)}"


def clip_norm(dtype: jnp.dtype) -> str:
    """sgd(0.1, clip_norm=1.0) with gradient entries of 300: how far does the param move?"""
    params = {"w": jnp.zeros((4,), dtype)}
    grads = {"w": jnp.full((4,), 300.0, dtype)}
    opt = fn.sgd(0.1, clip_norm=1.0)
    new, _ = opt.update(grads, opt.init(params), params)
    return f"update norm {float(jnp.linalg.norm(new['w'].astype(jnp.float32))):.3g} (0.1 is right)"


def adam_second_moment(dtype: jnp.dtype, steps: int) -> str:
    """Adam's second moment after ``steps`` steps of gradient 1 (1 - 0.999**steps is right)."""
    params = {"w": jnp.zeros((1,), dtype)}
    opt = fn.adam(1e-3)
    grads = {"w": jnp.ones((1,), dtype)}

    def step(carry, _):
        p, s = carry
        return opt.update(grads, s, p), None

    (_, state), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    moment = [leaf for leaf in jax.tree_util.tree_leaves(state) if np.size(leaf) == 1 and leaf.dtype != jnp.int32]
    v = float(np.asarray(moment[-1], np.float32).reshape(-1)[0])
    return f"{v:.3f} (right: {1 - 0.999**steps:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer Adam steps")
    args = parser.parse_args()
    steps = 200 if args.quick else 2000
    rows = [
        ["fit, 2-layer net, 4,096 rows, 1 epoch", fit_total],
        ["layer_norm([300, -300, 100, -100])", layer_norm],
        ["adam on an Embedding, unread row", adam_embedding],
        ["sgd(0.1, clip_norm=1.0), gradient 300", clip_norm],
        [f"adam second moment after {steps} steps of gradient 1", lambda d: adam_second_moment(d, steps)],
    ]
    out = []
    for label, case in rows:
        cells = [label]
        for dtype in (jnp.float16, jnp.bfloat16):
            try:
                cells.append(case(jnp.dtype(dtype)))
            except Exception as error:  # a failure is a cell of the table
                cells.append(f"{type(error).__name__}: {str(error)[:80]}")
        out.append(cells)
    print(f"Machine: {machine()}\n")
    print(table(["case", "float16", "bfloat16"], out))


if __name__ == "__main__":
    main()
