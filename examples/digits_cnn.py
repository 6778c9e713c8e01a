"""The book's chapter-5 network on scikit-learn's 8x8 digits.

Conv2D(16 channels, 5x5, tanh, glorot) -> Dropout(0.2) -> Flatten -> Dense(10), softmax
cross-entropy, momentum 0.9. Images are NHWC: (batch, 8, 8, 1).

    python examples/digits_cnn.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcnet as fn

GLOROT = dict(w_init=fn.glorot_normal, b_init=fn.zeros)


def images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits as NHWC images (batch, 8, 8, 1) in [0, 1]: train and test images and labels."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(x, digits.target.astype(np.int32), test_size=0.3, random_state=0)


def book_cnn() -> fn.Layer:
    return fn.serial(
        fn.Conv2D(16, 5, fn.tanh, **GLOROT), fn.Dropout(0.2), fn.Flatten(), fn.Dense(10, fn.linear, **GLOROT)
    )


def train(net: fn.Layer, epochs: int, progress: bool, learning_rate: float = 0.1) -> float:
    """Train on the digits (softmax CE, momentum 0.9, batch 60, best evaluation kept); the test accuracy."""
    x_train, x_test, y_train, y_test = images()
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 1))
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.momentum(learning_rate, 0.9),
        params,
        (x_train, y_train),
        (x_test, y_test),
        epochs=epochs,
        batch_size=60,
        eval_every=1,
        patience=2,
        key=jax.random.PRNGKey(1),
        progress=progress,
    )
    return float(jnp.mean(jnp.argmax(net.apply(result.params, x_test), axis=1) == y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    args = parser.parse_args()
    net = book_cnn()
    print(fn.summary(net, (-1, 8, 8, 1)))
    print(f"test accuracy {train(net, 1 if args.quick else 10, not args.quick):.2%}")


if __name__ == "__main__":
    main()
