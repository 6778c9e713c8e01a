"""custom_vjp ops vs plain jnp under autodiff: a 2-layer MLP forward + backward.

Workload: batch 256, 512 -> 1024 tanh -> 10, softmax cross-entropy; both versions jitted,
median of repeated runs. Target: custom_vjp / autodiff <= 1.05.

    python benchmarks/bench_ops.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fn
from _timing import machine, median_seconds, table


def custom_net(params, x, y):
    (W1, B1), (W2, B2) = params
    h = fn.tanh(fn.bias_add(fn.weight_multiply(x, W1), B1))
    return fn.softmax_cross_entropy(fn.bias_add(fn.weight_multiply(h, W2), B2), y)


def plain_net(params, x, y):
    (W1, B1), (W2, B2) = params
    h = jnp.tanh(x @ W1 + B1)
    logits = h @ W2 + B2
    return -jnp.sum(jax.nn.one_hot(y, 10, dtype=logits.dtype) * jax.nn.log_softmax(logits)) / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians over all")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = [(rng.standard_normal((512, 1024), np.float32) * 0.04, np.zeros((1, 1024), np.float32)),
              (rng.standard_normal((1024, 10), np.float32) * 0.04, np.zeros((1, 10), np.float32))]
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
    print(table(["version", "median ms / step", "ratio to autodiff"],
                [[k, f"{v * 1e3:.3f}", f"{v / med['autodiff']:.3f}"] for k, v in med.items()]))


if __name__ == "__main__":
    main()
