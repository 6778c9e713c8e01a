"""One epoch of the book's chapter-5 CNN: custom_vjp conv ops vs the same network in plain lax.

Workload: digits 1,797 x 8 x 8 x 1, Conv2D(16, 5x5, tanh) -> Flatten -> Dense(10), softmax
CE, momentum 0.9, batch 60; seconds per epoch (median of interleaved rounds). Target <= 1.10.

    python benchmarks/bench_cnn.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_seconds, table
from jax import lax
from sklearn.datasets import load_digits

import funcnet as fn


def plain_conv(out_channels, kernel):
    layer = fn.Conv2D(out_channels, kernel, w_init=fn.glorot_normal, b_init=fn.zeros)

    def apply(params, x, *, key=None):
        del key
        y = lax.conv_general_dilated(x, params.W, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y + params.B.reshape(1, 1, 1, -1))

    return fn.Layer(layer.init, apply)


def plain_dense(neurons):
    layer = fn.Dense(neurons, w_init=fn.glorot_normal, b_init=fn.zeros)
    return fn.Layer(layer.init, lambda params, x, *, key=None: x @ params.W + params.B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    digits = load_digits()
    x = jnp.asarray((digits.images / 16.0).astype(np.float32)[..., None])
    y = jnp.asarray(digits.target.astype(np.int32))
    glorot = dict(w_init=fn.glorot_normal, b_init=fn.zeros)
    nets = {
        "custom_vjp ops": fn.serial(
            fn.Conv2D(16, 5, fn.tanh, **glorot), fn.Flatten(), fn.Dense(10, fn.linear, **glorot)
        ),
        "plain lax, autodiff": fn.serial(plain_conv(16, 5), fn.Flatten(), plain_dense(10)),
    }
    key = jax.random.PRNGKey(0)
    _, params = nets["custom_vjp ops"].init(key, (-1, 8, 8, 1))
    optimizer = fn.momentum(0.1, 0.9)
    runs = {
        name: (
            lambda net=net: (
                fn.fit(
                    net, fn.softmax_cross_entropy, optimizer, params, (x, y), epochs=args.epochs, batch_size=60, key=key
                ).params
            )
        )
        for name, net in nets.items()
    }
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(median_seconds(run, repeats=1) / args.epochs)
    med = {name: float(np.median(t)) for name, t in times.items()}
    base = med["plain lax, autodiff"]
    print(f"Machine: {machine()}")
    print("Workload: digits CNN, Conv2D(16, 5x5, tanh) -> Flatten -> Dense(10), batch 60\n")
    print(
        table(
            ["version", "s / epoch", "ratio to plain lax"], [[k, f"{v:.4f}", f"{v / base:.3f}"] for k, v in med.items()]
        )
    )


if __name__ == "__main__":
    main()
