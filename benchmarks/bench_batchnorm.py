"""The cost of BatchNorm: its hand-derived op against autodiff, and a training step with it
against the same network without it (and with LayerNorm).

Workloads (variants timed in alternation, medians):
  batch_norm op, forward + backward of <y, g>: x (256, 1024) rows and (64, 16, 16, 32) NHWC
    images, float32; hand-derived custom_vjp against autodiff of the plain jnp form.
  fit: the digits (1,797 x 8 x 8 x 1), examples/digits_resnet.py's residual CNN (Conv2D(16,
    3x3) stem, two residual blocks of two Conv2D(16, 3x3), AvgPool2D, Dense(10)) with BatchNorm,
    LayerNorm or no normalisation at the head of each block; softmax CE, momentum 0.9, batch 60;
    milliseconds per training step (an epoch is 30 steps) and the ratio to no normalisation.

    python benchmarks/bench_batchnorm.py [--quick]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_seconds, table
from sklearn.datasets import load_digits

import funcnet as fn

GLOROT = dict(w_init=fn.glorot_normal, b_init=fn.zeros)


def plain_batch_norm(x, gamma, beta):
    lead = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=lead, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=lead, keepdims=True)
    shape = (1,) * (x.ndim - 1) + gamma.shape
    return (x - mean) / jnp.sqrt(var + 1e-5) * gamma.reshape(shape) + beta.reshape(shape)


def resnet(norm):
    def block():
        head = [norm()] if norm is not None else []
        return fn.residual(*head, fn.Conv2D(16, 3, fn.relu, **GLOROT), fn.Conv2D(16, 3, fn.linear, **GLOROT))

    return fn.serial(
        fn.Conv2D(16, 3, fn.relu, **GLOROT),
        block(),
        block(),
        fn.AvgPool2D(2),
        fn.Flatten(),
        fn.Dense(10, fn.linear, **GLOROT),
    )


def op_rows(rng, shapes, repeats, rounds):
    rows = []
    for shape in shapes:
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        gamma, beta = (jnp.asarray(rng.standard_normal(shape[-1:]).astype(np.float32)) for _ in range(2))
        g = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        hand_op = lambda x, gamma, beta: fn.batch_norm(x, gamma, beta)[0]
        grad = lambda f, g=g: jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), g), argnums=(0, 1, 2)))
        hand, auto = grad(hand_op), grad(plain_batch_norm)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3),
            hand(x, gamma, beta),
            auto(x, gamma, beta),
        )
        times = {"hand": [], "auto": []}
        for _ in range(rounds):
            for version, f in (("hand", hand), ("auto", auto)):
                times[version].append(median_seconds(functools.partial(f, x, gamma, beta), repeats=repeats))
        hand_s, auto_s = (float(np.median(v)) for v in times.values())
        rows.append([f"batch_norm {shape}", f"{hand_s * 1e3:.3f}", f"{auto_s * 1e3:.3f}", f"{hand_s / auto_s:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks the script runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rounds, epochs = (1, 1) if args.quick else (args.rounds, args.epochs)
    rng = np.random.default_rng(0)
    shapes = [(16, 32), (4, 4, 4, 8)] if args.quick else [(256, 1024), (64, 16, 16, 32)]
    print(f"Machine: {machine()}\n")
    print("batch_norm forward + backward, hand-derived custom_vjp against autodiff of its plain form\n")
    print(table(["op", "custom_vjp ms", "autodiff ms", "ratio"], op_rows(rng, shapes, 3 if args.quick else 21, rounds)))

    digits = load_digits()
    rows_used = 240 if args.quick else digits.images.shape[0]
    x = jnp.asarray((digits.images[:rows_used] / 16.0).astype(np.float32)[..., None])
    y = jnp.asarray(digits.target[:rows_used].astype(np.int32))
    steps = -(-rows_used // 60) * epochs
    key = jax.random.PRNGKey(0)
    nets = {"no normalisation": resnet(None), "BatchNorm": resnet(fn.BatchNorm), "LayerNorm": resnet(fn.LayerNorm)}
    params = {name: net.init(key, (-1, 8, 8, 1))[1] for name, net in nets.items()}
    optimizer = fn.momentum(0.03, 0.9)

    def train(net, p):
        return fn.fit(net, fn.softmax_cross_entropy, optimizer, p, (x, y), epochs=epochs, batch_size=60, key=key).params

    runs = {name: functools.partial(train, net, params[name]) for name, net in nets.items()}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(median_seconds(run, repeats=1) / steps)
    med = {name: float(np.median(t)) for name, t in times.items()}
    base = med["no normalisation"]
    print(f"\nfit, digits residual CNN ({rows_used} rows, batch 60, {epochs} epochs), per training step\n")
    print(
        table(
            ["network", "ms / step", "ratio to none"],
            [[k, f"{v * 1e3:.3f}", f"{v / base:.3f}"] for k, v in med.items()],
        )
    )


if __name__ == "__main__":
    main()
