"""A small residual CNN on the 8x8 digits, with BatchNorm, LayerNorm or no normalisation,
against the book's chapter-5 CNN, same epochs.

Residual network: Conv2D(16, 3x3, relu) stem, two pre-norm residual blocks
``residual(Norm(), Conv2D(16, 3x3, relu), Conv2D(16, 3x3))`` where ``Norm`` is ``BatchNorm()``
(statistics over batch, height and width, running statistics at test time), ``LayerNorm()``
(over each pixel's channels) or nothing, then AvgPool2D(2), Flatten, Dense(10). The chapter-5
CNN is examples/digits_cnn.py's: Conv2D(16, 5x5, tanh), Dropout(0.2), Flatten, Dense(10). All
train the same way: softmax CE, momentum 0.9 at learning rate 0.03 (at digits_cnn.py's 0.1 the
normalised residual networks diverge), batch 60, the best evaluation kept; every test accuracy
is printed.

    python examples/digits_resnet.py [--quick] [--norm batch|layer|none|all] [--epochs 10]
"""

from __future__ import annotations

import argparse

from digits_cnn import GLOROT, book_cnn, train

import funcnet as fn

NORMS = {"batch": fn.BatchNorm, "layer": fn.LayerNorm, "none": None}


def resnet(norm: str = "layer") -> fn.Layer:
    """The residual CNN with ``norm`` ("batch", "layer" or "none") at the head of each block."""

    def block() -> fn.Layer:
        norms = [NORMS[norm]()] if NORMS[norm] is not None else []
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
    parser.add_argument("--quick", action="store_true", help="1 epoch, the BatchNorm network alone")
    parser.add_argument("--norm", choices=[*NORMS, "all"], default=None, help="residual networks to train (all)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs
    norm = args.norm or ("batch" if args.quick else "all")
    norms = list(NORMS) if norm == "all" else [norm]
    print(fn.summary(resnet(norms[0]), (-1, 8, 8, 1)))
    labels = {"batch": "BatchNorm", "layer": "LayerNorm", "none": "no norm"}
    nets = {f"residual, {labels[n]}": resnet(n) for n in norms}
    if not args.quick:
        nets = {"chapter-5 CNN": book_cnn(), **nets}
    results = {name: train(net, epochs, progress=not args.quick, learning_rate=0.03) for name, net in nets.items()}
    print(f"\ntest accuracy after up to {epochs} epochs each")
    for name, accuracy in results.items():
        print(f"  {name:<22} {accuracy:.2%}")


if __name__ == "__main__":
    main()
