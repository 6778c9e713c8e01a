"""The optimizer toolbox on the digits: accuracy and time of Adam, AdamW, a warmup-cosine
schedule, the params' moving average and gradient accumulation, side by side in one run.

Workload: scikit-learn digits (1,797 x 64, /16; 1,437 train rows, 360 test rows, split as
``examples/digits.py`` splits them), 64 -> 89 tanh -> dropout 0.2 -> 10, softmax CE, batch 32,
an ensemble of ``--seeds`` members (different init and shuffling keys) trained as one ``vmap``-ed
``fit`` per recipe. Accuracy: each member's test accuracy (of ``ema_params`` where the recipe
keeps an average), median and range over members. Time: the ensemble's steady-state fit,
recipes timed in alternation (round-robin), medians of ``--repeats``, ratio to Adam; compile time
reported apart.

    python benchmarks/bench_optimizers.py           # 40 epochs, 5 seeds
    python benchmarks/bench_optimizers.py --quick   # 2 epochs, 2 seeds: check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcnet as fn

BATCH = 32


def recipes(epochs: int, batches: int) -> dict[str, tuple[fn.Optimizer, dict[str, Any]]]:
    """name -> (optimizer, extra fit keywords)."""
    updates = epochs * batches
    warmup_cosine = fn.warmup_cosine_decay(0.0, 3e-3, max(updates // 10, 1), updates)
    return {
        "adam(1e-3)": (fn.adam(1e-3), {}),
        "adamw(1e-3, weight_decay=1e-2)": (fn.adamw(1e-3, weight_decay=1e-2), {}),
        "adamw(warmup_cosine_decay(0, 3e-3, 10%, all), weight_decay=1e-2)": (
            fn.adamw(warmup_cosine, weight_decay=1e-2),
            {},
        ),
        "adam(1e-3), ema_decay=0.99": (fn.adam(1e-3), {"ema_decay": 0.99}),
        "adamw(warmup_cosine), ema_decay=0.99": (fn.adamw(warmup_cosine, weight_decay=1e-2), {"ema_decay": 0.99}),
        "accumulate(adam(2e-3), 4) (batch 32 x 4)": (
            fn.accumulate(fn.adam(2e-3), 4),
            {},
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 seeds, 1 repeat")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    epochs, seeds, repeats = (2, 2, 1) if args.quick else (args.epochs, args.seeds, args.repeats)

    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=80718)
    batches = -(-len(x_train) // BATCH)
    glorot = dict(w_init=fn.glorot_normal, b_init=fn.zeros)
    net = fn.serial(fn.Dense(89, fn.tanh, **glorot), fn.Dropout(0.2), fn.Dense(10, fn.linear, **glorot))
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    params = jax.vmap(lambda k: net.init(k, (-1, 64))[1])(keys)
    test_x, test_y = jnp.asarray(x_test), jnp.asarray(y_test)

    def runner(optimizer: fn.Optimizer, extra: dict[str, Any]) -> Callable[[], Any]:
        def one(p: Any, key: jax.Array) -> jax.Array:
            result = fn.fit(
                net,
                fn.softmax_cross_entropy,
                optimizer,
                p,
                (x_train, y_train),
                epochs=epochs,
                batch_size=BATCH,
                key=key,
                **extra,
            )
            final = result.params if result.ema_params is None else result.ema_params
            return jnp.mean(jnp.argmax(net.apply(final, test_x), axis=1) == test_y)

        return lambda: jax.vmap(one)(params, keys)

    chosen = recipes(epochs, batches)
    runs = {name: runner(*spec) for name, spec in chosen.items()}
    accuracy, compile_s, times = {}, {}, {name: [] for name in runs}
    for name, run in runs.items():  # first call: compile and train once
        start = time.perf_counter()
        accuracy[name] = np.asarray(jax.block_until_ready(run()))
        compile_s[name] = time.perf_counter() - start
    for _ in range(repeats):  # then in alternation
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["adam(1e-3)"])
    rows = []
    for name in runs:
        acc = accuracy[name]
        steady = statistics.median(times[name])
        rows.append(
            [
                name,
                f"{np.median(acc):.1%} ({acc.min():.1%}-{acc.max():.1%})",
                f"{steady:.2f} s",
                f"{steady / base:.2f}x",
                f"{compile_s[name] - steady:.1f} s",
            ]
        )
    print(f"{machine()}; digits, {epochs} epochs, batch {BATCH}, {seeds} seeds in one vmap-ed fit\n")
    print(table(["recipe", "test accuracy: median (range)", "fit time", "vs adam", "compile"], rows))


if __name__ == "__main__":
    main()
