"""custom_vjp ops vs plain jnp under autodiff, forward + backward, jitted.

Workloads (each version timed in alternation with its twin; medians):
  MLP: batch 256, 512 -> 1024 tanh -> 10, softmax cross-entropy. Target <= 1.05.
  layer_norm: x (256, 1024) float32, gamma and beta (1024,). Target <= 1.10.
  embedding: ids (256, 64) into W (10,000, 128), the gradient for W. Target <= 1.10.
  avg_pool2d: x (64, 32, 32, 16), 2x2 windows, stride 2. Target <= 1.10.
Each op's gradient is <op(...), g> for a fixed random g, against the same in plain jnp/lax.

    python benchmarks/bench_ops.py
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_seconds, table

import funcnet as fn


def custom_net(params, x, y):
    (W1, B1), (W2, B2) = params
    h = fn.tanh(fn.bias_add(fn.weight_multiply(x, W1), B1))
    return fn.softmax_cross_entropy(fn.bias_add(fn.weight_multiply(h, W2), B2), y)


def plain_net(params, x, y):
    (W1, B1), (W2, B2) = params
    h = jnp.tanh(x @ W1 + B1)
    logits = h @ W2 + B2
    return -jnp.sum(jax.nn.one_hot(y, 10, dtype=logits.dtype) * jax.nn.log_softmax(logits)) / x.shape[0]


def op_pairs(rng):
    """(name, hand-derived op as f(args), plain form, args) for the newer ops."""
    from jax import lax

    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    def plain_layer_norm(x, gamma, beta):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * gamma[None] + beta[None]

    ids = jnp.asarray(rng.integers(0, 10_000, (256, 64)).astype(np.int32))
    plain_pool = lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return [
        (
            "layer_norm (256, 1024)",
            lambda x, g, b: fn.layer_norm(x, g, b),
            plain_layer_norm,
            (normal(256, 1024), normal(1024), normal(1024)),
        ),
        (
            "embedding (256, 64) ids, W (10000, 128)",
            lambda W: fn.embedding(ids, W),
            lambda W: W[ids],
            (normal(10_000, 128),),
        ),
        ("avg_pool2d (64, 32, 32, 16), 2x2", lambda x: fn.avg_pool2d(x, 2), plain_pool, (normal(64, 32, 32, 16),)),
    ]


def forward_backward(f, args, g):
    return jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), g), argnums=tuple(range(len(args)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians over all")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = [
        (rng.standard_normal((512, 1024), np.float32) * 0.04, np.zeros((1, 1024), np.float32)),
        (rng.standard_normal((1024, 10), np.float32) * 0.04, np.zeros((1, 10), np.float32)),
    ]
    params = jax.device_put(params)
    x = jnp.asarray(rng.standard_normal((256, 512), np.float32))
    y = jnp.asarray(rng.integers(0, 10, 256).astype(np.int32))
    custom = jax.jit(jax.value_and_grad(custom_net))
    plain = jax.jit(jax.value_and_grad(plain_net))
    gc, gp = custom(params, x, y)[1], plain(params, x, y)[1]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5), gc, gp)
    times = {"custom_vjp": [], "autodiff": []}
    for _ in range(args.rounds):  # alternate so both see the same machine noise
        times["custom_vjp"].append(median_seconds(lambda: custom(params, x, y), repeats=args.repeats))
        times["autodiff"].append(median_seconds(lambda: plain(params, x, y), repeats=args.repeats))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"Machine: {machine()}")
    print("Workload: MLP 512-1024(tanh)-10, batch 256, softmax CE, forward+backward, jitted\n")
    print(
        table(
            ["version", "median ms / step", "ratio to autodiff"],
            [[k, f"{v * 1e3:.3f}", f"{v / med['autodiff']:.3f}"] for k, v in med.items()],
        )
    )
    rows = []
    for name, op, plain_op, op_args in op_pairs(rng):
        g = jnp.asarray(rng.standard_normal(jax.eval_shape(op, *op_args).shape).astype(np.float32))
        hand, auto = forward_backward(op, op_args, g), forward_backward(plain_op, op_args, g)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4), hand(*op_args), auto(*op_args)
        )
        pair = {"hand": [], "auto": []}
        for _ in range(args.rounds):
            for version, f in (("hand", hand), ("auto", auto)):
                pair[version].append(median_seconds(functools.partial(f, *op_args), repeats=args.repeats // 3))
        hand_s, auto_s = (float(np.median(v)) for v in pair.values())
        rows.append([name, f"{hand_s * 1e3:.3f}", f"{auto_s * 1e3:.3f}", f"{hand_s / auto_s:.3f}"])
    print("\nEach op forward + backward, hand-derived custom_vjp against autodiff of its plain form\n")
    print(table(["op", "custom_vjp ms", "autodiff ms", "ratio"], rows))


if __name__ == "__main__":
    main()
