"""The book's chapter 4 on scikit-learn's digits: each improvement, one row.

sigmoid + MSE; softmax cross-entropy; + momentum; + learning-rate decay (linear, then
exponential); + glorot init; + dropout. Prints test accuracy per model and saves a PNG of
the training-loss curves.

    python examples/digits.py            # 50 epochs per model, about a minute on 2 cores
    python examples/digits.py --quick    # 3 epochs of every third model, for a smoke test
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcnet as fn


def models(epochs: int, batches: int):
    """(name, net, loss, optimizer) in the book's order of improvements."""
    glorot = dict(w_init=fn.glorot_normal, b_init=fn.zeros)
    decay = dict(steps=epochs - 1, every=batches)
    tanh_net = fn.serial(fn.Dense(89, fn.tanh), fn.Dense(10, fn.linear))
    glorot_net = fn.serial(fn.Dense(89, fn.tanh, **glorot), fn.Dense(10, fn.linear, **glorot))
    return [
        (
            "sigmoid + MSE",
            fn.serial(fn.Dense(89, fn.sigmoid), fn.Dense(10, fn.sigmoid)),
            fn.mean_squared_error,
            fn.sgd(0.1),
        ),
        ("softmax cross-entropy", tanh_net, fn.softmax_cross_entropy, fn.sgd(0.1)),
        ("+ momentum", tanh_net, fn.softmax_cross_entropy, fn.momentum(0.1, 0.9)),
        ("+ linear decay", tanh_net, fn.softmax_cross_entropy, fn.momentum(fn.linear_decay(0.15, 0.05, **decay))),
        (
            "+ exponential decay",
            tanh_net,
            fn.softmax_cross_entropy,
            fn.momentum(fn.exponential_decay(0.15, 0.05, **decay)),
        ),
        ("+ glorot init", glorot_net, fn.softmax_cross_entropy, fn.momentum(fn.exponential_decay(0.15, 0.05, **decay))),
        (
            "+ dropout",
            fn.serial(fn.Dense(89, fn.tanh, **glorot), fn.Dropout(0.2), fn.Dense(10, fn.linear, **glorot)),
            fn.softmax_cross_entropy,
            fn.momentum(fn.exponential_decay(0.15, 0.05, **decay)),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs of every third model")
    parser.add_argument("--plot", default="digits_losses.png", help="where to save the loss curves")
    args = parser.parse_args()
    epochs, batch_size = (3, 60) if args.quick else (50, 60)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int32), test_size=0.3, random_state=0
    )
    one_hot = lambda y: np.eye(10, dtype=np.float32)[y]
    batches = -(-len(x_train) // batch_size)
    key = jax.random.PRNGKey(20190901)
    rows, curves, start = [], {}, time.perf_counter()
    chosen = models(epochs, batches)
    for name, net, loss, optimizer in chosen[::3] if args.quick else chosen:
        _, params = net.init(key, (-1, 64))
        # MSE compares against one-hot rows; cross-entropy takes the integer labels directly.
        target = (lambda y: one_hot(y)) if loss is fn.mean_squared_error else (lambda y: y)
        result = fn.fit(
            net,
            loss,
            optimizer,
            params,
            (x_train, target(y_train)),
            (x_test, target(y_test)),
            epochs=epochs,
            batch_size=batch_size,
            eval_every=10 if not args.quick else 1,
            key=key,
            progress=not args.quick,
        )
        accuracy = float(jnp.mean(jnp.argmax(net.apply(result.params, x_test), axis=1) == y_test))
        rows.append((name, accuracy, int(result.best_epoch)))
        curves[name] = np.asarray(result.history.train_loss)

    print(f"\n{'model':<24} {'test accuracy':>13} {'best epoch':>10}")
    for name, accuracy, best in rows:
        print(f"{name:<24} {accuracy:>13.2%} {best:>10}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="digits: the book's improvements")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    best = max(rows, key=lambda r: r[1])
    print(f"done in {time.perf_counter() - start:.1f} s: best {best[0]} at {best[1]:.2%}; curves in {args.plot}")


if __name__ == "__main__":
    main()
