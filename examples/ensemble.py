"""16 learning rates trained at once: jax.vmap of fit is one compiled program.

python examples/ensemble.py [--quick] [--plot ensemble.png]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcnet as fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 learning rates, 2 epochs")
    parser.add_argument("--plot", default="ensemble.png")
    args = parser.parse_args()
    members, epochs = (4, 2) if args.quick else (16, 30)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int32), test_size=0.3, random_state=0
    )
    net = fn.serial(fn.Dense(64, fn.tanh, w_init=fn.glorot_normal), fn.Dense(10, fn.linear, w_init=fn.glorot_normal))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 64))

    def train(learning_rate, key):
        result = fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.momentum(learning_rate, 0.9),
            params,
            (x_train, y_train),
            (x_test, y_test),
            epochs=epochs,
            eval_every=1,
            patience=3,
            key=key,
        )
        accuracy = jnp.mean(jnp.argmax(net.apply(result.params, x_test), axis=1) == y_test)
        return result.history.eval_loss, accuracy

    rates = jnp.logspace(-3, 0, members)
    keys = jax.random.split(jax.random.PRNGKey(1), members)
    eval_loss, accuracy = jax.jit(jax.vmap(train))(rates, keys)  # one program, all members
    final = np.nanmin(np.asarray(eval_loss), axis=1)
    best = int(np.argmin(final))
    for lr, loss, acc in zip(np.asarray(rates), final, np.asarray(accuracy), strict=True):
        print(f"lr {lr:8.4f}: best eval loss {loss:.4f}, test accuracy {acc:.2%}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(np.asarray(rates), final, "o-")
    ax.set(xlabel="learning rate", ylabel="best eval loss", title=f"{members} fits in one vmap")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"best learning rate {float(rates[best]):.4f} (eval loss {final[best]:.4f}); plot in {args.plot}")


if __name__ == "__main__":
    main()
