"""Write your own custom_vjp op, prove its backward with check_vjp, and watch a wrong one fail.

python examples/custom_op.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fn


@jax.custom_vjp
def leaky_relu(x: jax.Array) -> jax.Array:
    """``x`` where positive, ``0.01 * x`` elsewhere."""
    return jnp.where(x > 0, x, 0.01 * x)


def _leaky_relu_fwd(x):
    return leaky_relu(x), x > 0  # save only the mask


def _leaky_relu_bwd(positive, output_grad):
    return (jnp.where(positive, output_grad, 0.01 * output_grad),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


@jax.custom_vjp
def book_relu(x: jax.Array) -> jax.Array:
    """The book's ReLU: its backward takes the mask on the clipped output, always >= 0."""
    return jnp.maximum(x, 0)


book_relu.defvjp(
    lambda x: (book_relu(x), book_relu(x)), lambda output, output_grad: (jnp.where(output >= 0, output_grad, 0.0),)
)


def main() -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    fn.check_vjp(leaky_relu, lambda x: jnp.maximum(x, 0.01 * x), x)
    print("leaky_relu: backward agrees with autodiff and finite differences")
    net = fn.serial(fn.Dense(4, leaky_relu), fn.Dense(1, fn.linear))  # any array -> array works
    print(fn.summary(net, (-1, 8)))
    try:
        fn.check_vjp(book_relu, lambda x: jnp.maximum(x, 0), x)
    except AssertionError as error:
        print(f"the book's ReLU backward is caught:\n  {error}")
    else:
        raise SystemExit("check_vjp missed the book's ReLU backward")


if __name__ == "__main__":
    main()
