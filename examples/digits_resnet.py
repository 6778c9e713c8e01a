"""A small residual CNN on the 8x8 digits, against the book's chapter-5 CNN, same epochs.

Residual network: Conv2D(16, 3x3, relu) stem, two pre-norm residual blocks
``residual(LayerNorm(), Conv2D(16, 3x3, relu), Conv2D(16, 3x3))`` (``--no-norm`` drops the
LayerNorm), AvgPool2D(2), Flatten, Dense(10). The chapter-5 CNN is examples/digits_cnn.py's:
Conv2D(16, 5x5, tanh), Dropout(0.2), Flatten, Dense(10). Both train the same way: softmax CE,
momentum 0.9 at learning rate 0.03 (at digits_cnn.py's 0.1 the normalised residual network
diverges), batch 60, the best evaluation kept; both test accuracies are printed.

    python examples/digits_resnet.py [--quick] [--no-norm]
"""

from __future__ import annotations

import argparse

from digits_cnn import GLOROT, book_cnn, train

import funcnet as fn


def resnet(norm: bool) -> fn.Layer:
    def block():
        norms = [fn.LayerNorm()] if norm else []
        return fn.residual(*norms, fn.Conv2D(16, 3, fn.relu, **GLOROT), fn.Conv2D(16, 3, fn.linear, **GLOROT))

    return fn.serial(
        fn.Conv2D(16, 3, fn.relu, **GLOROT),
        block(),
        block(),
        fn.AvgPool2D(2),
        fn.Flatten(),
        fn.Dense(10, fn.linear, **GLOROT),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch each")
    parser.add_argument("--no-norm", action="store_true", help="residual blocks without LayerNorm")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs
    net = resnet(norm=not args.no_norm)
    print(fn.summary(net, (-1, 8, 8, 1)))
    results = {
        name: train(layer, epochs, progress=not args.quick, learning_rate=0.03)
        for name, layer in (("chapter-5 CNN", book_cnn()), ("residual CNN", net))
    }
    print(f"\ntest accuracy after up to {epochs} epochs each")
    for name, accuracy in results.items():
        print(f"  {name:<14} {accuracy:.2%}")


if __name__ == "__main__":
    main()
