"""Issue #23's optimizer precision checks as figures: float16 and bfloat16 params, one row each.

Each row runs an optimizer on params of the given dtype and prints what it computed next to
the exact value. Run it on a checkout before and after a change to compare (the closing note of
issue #23 has both).

    python benchmarks/optimizer_precision.py           # the table
    python benchmarks/optimizer_precision.py --quick   # the same rows (it takes seconds)
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
from _timing import machine, table

import funcnet as fn


def constant_gradient(optimizer: fn.Optimizer, dtype: Any, steps: int) -> Any:
    """The state after ``steps`` updates of a one-entry param with gradient 1."""
    params = {"w": jnp.zeros((1,), dtype)}

    def body(carry: Any, _: None) -> tuple[Any, None]:
        p, s = carry
        return optimizer.update({"w": jnp.ones((1,), dtype)}, s, p), None

    (_, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((params, optimizer.init(params)))
    return state


def rows_for(dtype: Any) -> list[list[Any]]:
    name = jnp.dtype(dtype).name
    rows = []
    params = {"W": jnp.ones((4, 4), dtype)}
    optimizer = fn.sgd(0.1, clip_norm=1.0)
    new, _ = optimizer.update({"W": jnp.full((4, 4), 300.0, dtype)}, optimizer.init(params), params)
    rows.append(
        [name, "sgd(0.1, clip_norm=1.0), 16 gradients of 300: W after one step", "0.975", float(new["W"][0, 0])]
    )

    net = fn.serial(fn.Embedding(10, 4, dtype=dtype), fn.Flatten(), fn.Dense(1, fn.linear, dtype=dtype))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 3))
    optimizer = fn.adam(1e-3)
    step = jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer))
    state, new = optimizer.init(params), params
    for _ in range(3):
        new, state, _ = step(new, state, jnp.array([[0, 1, 2], [2, 1, 0]], jnp.int32), jnp.ones((2, 1), dtype), None)
    nan = int(jnp.sum(jnp.isnan(new[0].W[3:].astype(jnp.float32))))
    rows.append([name, "adam(1e-3), 3 steps: NaN entries in the 7 Embedding rows no batch reads (of 28)", "0", nan])

    state = constant_gradient(fn.adam(1e-6), dtype, 2000)
    rows.append(
        [name, "adam: second moment after 2,000 steps of gradient 1", f"{1 - 0.999**2000:.4f}", float(state.nu["w"][0])]
    )
    state = constant_gradient(fn.adagrad(1e-6), dtype, 1000)
    rows.append(
        [name, "adagrad: sum of squares after 1,000 steps of gradient 1", "1000", float(state.sum_square["w"][0])]
    )
    state = constant_gradient(fn.momentum(1e-3, 0.99), dtype, 2000)
    rows.append(
        [
            name,
            "momentum(1e-3, 0.99): velocity after 2,000 steps of gradient 1",
            "0.1000",
            float(state.velocity["w"][0]),
        ]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same rows (they take seconds)")
    parser.parse_args()
    rows = [row for dtype in (jnp.float16, jnp.bfloat16) for row in rows_for(dtype)]
    rows = [[d, what, exact, f"{got:.6g}" if isinstance(got, float) else got] for d, what, exact, got in rows]
    print(f"{machine()}\n")
    print(table(["params", "check", "exact", "computed"], rows))


if __name__ == "__main__":
    main()
