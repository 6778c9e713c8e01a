"""Mixed precision on the digits: accuracy and time of float32, bfloat16 and float16 networks.

Each network is the same 64-64-10 tanh net; the low-precision ones are
``mixed_precision(net, dtype)`` (float32 master params). Two workloads:

* the plain loss (``softmax_cross_entropy``, momentum 0.05): bfloat16 and float16 match float32;
* a loss a million times smaller (``1e-6 * softmax_cross_entropy`` with the learning rate scaled
  up by as much, which trains float32 identically): its gradients, ~1e-9, underflow float16
  (smallest number 6e-8), which then fails unless ``fit(..., loss_scale=DynamicLossScale())``.

Times are medians of fit's steady state (compiled), variants interleaved. On a CPU, bfloat16 and
float16 are emulated (converted to float32 around every op), so they are slower than float32
there; the speed-up they exist for is on GPUs and TPUs.

    python benchmarks/bench_mixed_precision.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, median_seconds, table

import funcnet as fn


def weighted_cross_entropy(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return 1e-6 * fn.softmax_cross_entropy(prediction, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 epochs, one timing")
    args = parser.parse_args()
    epochs, repeats = (2, 1) if args.quick else (10, 3)
    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)
    train, test = (x[:1400], y[:1400]), (x[1400:], y[1400:])
    init = dict(w_init=fn.glorot_normal, b_init=fn.zeros, dtype=jnp.float32)
    base = fn.serial(fn.Dense(64, fn.tanh, **init), fn.Dense(10, fn.linear, **init))
    _, params = base.init(jax.random.PRNGKey(0), (-1, 64))
    variants = {
        "float32": (base, {}),
        "bfloat16 (mixed_precision)": (fn.mixed_precision(base, jnp.bfloat16), {}),
        "float16 (mixed_precision)": (fn.mixed_precision(base, jnp.float16), {}),
        "float16 + DynamicLossScale": (
            fn.mixed_precision(base, jnp.float16),
            {"loss_scale": fn.DynamicLossScale()},
        ),
    }
    workloads = {
        "softmax_cross_entropy": (fn.softmax_cross_entropy, fn.momentum(0.05, 0.9)),
        "1e-6 * softmax_cross_entropy": (weighted_cross_entropy, fn.momentum(0.05e6, 0.9)),
    }

    def run(net, loss, optimizer, extra):
        return fn.fit(
            net,
            loss,
            optimizer,
            params,
            train,
            test,
            epochs=epochs,
            eval_every=epochs,
            batch_size=32,
            key=jax.random.PRNGKey(1),
            metrics={"accuracy": fn.accuracy},
            **extra,
        )

    accuracy = {}
    for w, (loss, optimizer) in workloads.items():
        for v, (net, extra) in variants.items():
            accuracy[w, v] = float(run(net, loss, optimizer, extra).history.eval_metrics["accuracy"][-1])
    loss, optimizer = workloads["softmax_cross_entropy"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):  # round-robin: every variant sees the same machine noise
        for v, (net, extra) in variants.items():
            times[v].append(median_seconds(functools.partial(run, net, loss, optimizer, extra), repeats=1, warmup=0))
    seconds = {v: statistics.median(t) for v, t in times.items()}
    rows = [
        [
            v,
            *(f"{100 * accuracy[w, v]:.2f}%" for w in workloads),
            f"{seconds[v]:.2f}",
            f"{seconds[v] / seconds['float32']:.2f}x",
        ]
        for v in variants
    ]
    print(f"Machine: {machine()}; digits, 1,400 training / 397 test rows, {epochs} epochs, batch 32\n")
    print(table(["network", *(f"test accuracy, {w}" for w in workloads), "fit seconds", "vs float32"], rows))


if __name__ == "__main__":
    main()
