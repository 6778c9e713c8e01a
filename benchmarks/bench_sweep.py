"""A learning-rate sweep written as a research script writes it: fresh objects every time.

Workload: scikit-learn digits (1,797 x 64, /16), 64 -> 64 tanh -> 10, softmax CE, SGD, batch 32,
5 epochs, 8 learning rates; each fit rebuilds its network and optimizer:

    for lr in rates:
        net = fn.serial(fn.Dense(64, fn.tanh), fn.Dense(10, fn.linear))
        result = fn.fit(net, fn.softmax_cross_entropy, fn.sgd(lr), params, data, epochs=5, key=key)

Variants, each in a fresh process (so each starts with nothing compiled):
  values:             funcnet as it is (equal building blocks, numbers traced): compiles once.
  static by identity: the same sweep with the network and optimizer wrapped in closures made
                      anew each time, which is how fit behaved before building blocks were
                      values: every fit compiles.
  persistent cache:   a fresh process's first fit with JAX's persistent compilation cache,
                      cold (empty directory) and warm (filled by the cold process).

    python benchmarks/bench_sweep.py           # the table
    python benchmarks/bench_sweep.py --quick   # 2 rates, 1 epoch: check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def by_identity(net, optimizer):
    """The same network and optimizer as closures made anew: equal to nothing but themselves."""
    import funcnet as fn

    layer = fn.Layer(lambda k, s: net.init(k, s), lambda p, x, *, key=None: net.apply(p, x, key=key))
    return layer, fn.Optimizer(lambda p: optimizer.init(p), lambda g, s, p: optimizer.update(g, s, p))


def sweep(variant: str, rates: list[float], epochs: int) -> list[float]:
    """Seconds per fit (each waited for), in the order of ``rates``."""
    import jax
    import numpy as np
    from sklearn.datasets import load_digits

    import funcnet as fn

    digits = load_digits()
    data = ((digits.data / 16).astype(np.float32), digits.target.astype(np.int32))
    key = jax.random.PRNGKey(0)
    _, params = fn.serial(fn.Dense(64, fn.tanh), fn.Dense(10, fn.linear)).init(key, (-1, 64))
    times = []
    for lr in rates:
        start = time.perf_counter()
        net = fn.serial(fn.Dense(64, fn.tanh), fn.Dense(10, fn.linear))
        optimizer = fn.sgd(lr)
        if variant == "static by identity":  # new closures: a new static argument every time
            net, optimizer = by_identity(net, optimizer)
        result = fn.fit(net, fn.softmax_cross_entropy, optimizer, params, data, epochs=epochs, key=key)
        jax.block_until_ready(result)
        times.append(time.perf_counter() - start)
    return times


def child(args: argparse.Namespace) -> None:
    if args.cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(json.dumps(sweep(args.variant, args.rates, args.epochs)))


def run(variant: str, rates: list[float], epochs: int, cache: str | None = None) -> list[float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--variant",
        variant,
        "--epochs",
        str(epochs),
        "--rates",
        *map(str, rates),
    ] + (["--cache", cache] if cache else [])
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rates, 1 epoch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="values", help=argparse.SUPPRESS)
    parser.add_argument("--rates", type=float, nargs="+", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    from _timing import machine, table

    rates = [0.2, 0.1] if args.quick else [0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01]
    epochs = 1 if args.quick else 5
    print(f"Machine: {machine()}\n")
    rows = []
    for variant in ("values", "static by identity"):
        times = run(variant, rates, epochs)
        rows.append([variant, f"{sum(times):.2f}", f"{times[0]:.2f}", f"{statistics.median(times[1:]):.3f}"])
    print(f"Sweep: {len(rates)} learning rates, {epochs} epochs each, fresh net and optimizer per fit")
    print(table(["variant", "total s", "first fit s", "median s per later fit"], rows))
    with tempfile.TemporaryDirectory() as cache:
        cold = run("values", rates[:1], epochs, cache)[0]
        warm = run("values", rates[:1], epochs, cache)[0]
    print(f"\nPersistent compilation cache, a fresh process's first fit: cold {cold:.2f} s, warm {warm:.2f} s")


if __name__ == "__main__":
    main()
