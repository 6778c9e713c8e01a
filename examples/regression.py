"""The book's chapter 3 on scikit-learn's diabetes data: linear, one hidden layer, two.

Standardized features and target, a 70/30 split, MSE, SGD lr 0.01, 50 epochs, evaluation
every 10. Prints validation MSE, MAE and RMSE per model, like the book's table.

    python examples/regression.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import funcnet as fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per model")
    args = parser.parse_args()
    epochs, eval_every = (2, 1) if args.quick else (50, 10)

    data = load_diabetes()
    x = StandardScaler().fit_transform(data.data).astype(np.float32)
    y = StandardScaler().fit_transform(data.target[:, None]).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=80718)
    key = jax.random.PRNGKey(20190501)
    nets = {
        "linear regression": fn.serial(fn.Dense(1, fn.linear)),
        "neural network (13)": fn.serial(fn.Dense(13, fn.sigmoid), fn.Dense(1, fn.linear)),
        "deep network (13, 13)": fn.serial(fn.Dense(13, fn.sigmoid), fn.Dense(13, fn.sigmoid), fn.Dense(1, fn.linear)),
    }
    print(f"{'model':<24} {'MSE':>8} {'MAE':>8} {'RMSE':>8}  epochs")
    for name, net in nets.items():
        _, params = net.init(key, (-1, x.shape[1]))
        result = fn.fit(
            net,
            fn.mean_squared_error,
            fn.sgd(0.01),
            params,
            (x_train, y_train),
            (x_test, y_test),
            epochs=epochs,
            batch_size=23,
            eval_every=eval_every,
            key=key,
        )
        error = net.apply(result.params, x_test) - y_test
        mse = float(jnp.mean(error**2))
        print(
            f"{name:<24} {mse:8.4f} {float(jnp.mean(jnp.abs(error))):8.4f} {np.sqrt(mse):8.4f}  "
            f"{int(result.best_epoch)}"
        )


if __name__ == "__main__":
    main()
