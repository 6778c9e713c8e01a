"""The book's chapter 6: a character-level language model, RNN vs LSTM vs GRU.

Text that ships with Python itself (the standard library's ``pydoc_data/topics.py``: about
465,000 characters of English prose about Python), no download. One-hot characters,
sequences of 25 predicting the next character at every step, batch 32, hidden 256: the
book's ``LSTMLayer`` as ``serial(LSTM(256), TimeDistributed(Dense(vocab, linear)))``.
Trained with ``fit`` (eval data, accuracy, the progress bar), clipping each gradient entry to
[-2, 2] as the book does. It prints the eval loss per character against the uniform baseline
ln(vocab), samples 200 characters from the LSTM at two temperatures, and saves a PNG of the
loss curves of RNN vs LSTM vs GRU.

    python examples/char_lm.py            # 4 epochs per model, about 90 s on 2 cores
    python examples/char_lm.py --quick    # a small slice, for a smoke test
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pydoc_data.topics import topics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import funcnet as fn

SEQUENCE, HIDDEN, BATCH = 25, 256, 32


def corpus() -> str:
    return "\n".join(topics[name] for name in sorted(topics))


def sequences(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs ``ids[i:i + length]``, targets one character later."""
    count = (len(ids) - 1) // length
    return ids[: count * length].reshape(count, length), ids[1 : count * length + 1].reshape(count, length)


def model(cell, vocab: int) -> fn.Layer:
    return fn.serial(cell(HIDDEN), fn.TimeDistributed(fn.Dense(vocab, fn.linear)))


@functools.partial(jax.jit, static_argnames=("length", "vocab"))
def sample(params, seed: jax.Array, length: int, temperature: float, vocab: int, key: jax.Array) -> jax.Array:
    """``length`` characters from the trained LSTM model, carrying its state one step at a time
    (one compiled program: the temperature is traced, so both samples share it)."""
    lstm_params, dense_params = params
    dense = fn.Dense(vocab, fn.linear)
    one_hot = lambda i: jax.nn.one_hot(jnp.asarray(i).reshape(1, -1), vocab, dtype=jnp.float32)
    _, (h, c) = fn.lstm(one_hot(seed[:-1]), lstm_params, return_state=True)

    def step(carry, key):
        h, c, char = carry
        hs, (h, c) = fn.lstm(one_hot(char), lstm_params, h, c, return_state=True)
        logits = dense.apply(dense_params, hs[:, -1])
        char = jax.random.categorical(key, logits[0] / temperature)
        return (h, c, char), char

    _, chars = lax.scan(step, (h, c, seed[-1]), jax.random.split(key, length))
    return chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of the text, 1 epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--plot", default="char_lm_losses.png", help="where to save the loss curves")
    args = parser.parse_args()
    text = corpus()
    chars = sorted(set(text))
    vocab = len(chars)
    ids = np.searchsorted(chars, list(text[:20_000] if args.quick else text)).astype(np.int32)
    inputs, targets = sequences(ids, SEQUENCE)
    split = int(0.9 * len(inputs))
    x = np.eye(vocab, dtype=np.float32)[inputs]  # one-hot, as the book feeds its layers
    train, held_out = (x[:split], targets[:split]), (x[split:], targets[split:])
    epochs = 1 if args.quick else args.epochs
    print(
        f"{len(text):,} characters, vocabulary {vocab}; {len(train[0]):,} training and {len(held_out[0]):,} "
        f"eval sequences of {SEQUENCE}"
    )

    key = jax.random.PRNGKey(6)
    curves, results, start = {}, {}, time.perf_counter()
    for cell in (fn.RNN, fn.LSTM, fn.GRU):
        net = model(cell, vocab)
        _, params = net.init(key, (-1, SEQUENCE, vocab))
        # The book: SGD or AdaGrad at 0.01 on a loss summed over batch and time. funcnet's loss
        # is the mean (the same gradient divided by 800), so Adam, scale-free, stands in.
        result = fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.adam(3e-3, clip_value=2.0),
            params,
            train,
            held_out,
            epochs=epochs,
            batch_size=BATCH,
            eval_every=1,
            patience=2,
            key=key,
            metrics={"accuracy": fn.accuracy},
            progress=not args.quick,
        )
        results[cell.__name__] = result
        curves[cell.__name__] = np.asarray(result.history.eval_loss)

    baseline = math.log(vocab)
    print(f"\n{'model':<6} {'eval loss / char':>16} {'accuracy':>9}   (uniform baseline ln({vocab}) = {baseline:.3f})")
    for name, result in results.items():
        best = int(np.nanargmin(np.asarray(result.history.eval_loss)))
        print(
            f"{name:<6} {float(result.history.eval_loss[best]):>16.3f} "
            f"{float(result.history.eval_metrics['accuracy'][best]):>9.1%}"
        )
    seed = np.searchsorted(chars, list("The "))
    for temperature in (0.5, 1.0):
        drawn = np.asarray(
            sample(results["LSTM"].params, jnp.asarray(seed), 200, temperature, vocab, jax.random.PRNGKey(7))
        )
        print(f"\nLSTM sample at temperature {temperature}:\nThe " + "".join(chars[i] for i in drawn))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=name)
    ax.axhline(baseline, color="gray", linestyle=":", label=f"uniform, ln({vocab})")
    ax.set(xlabel="epoch", ylabel="eval loss per character", title="character model: the book's chapter 6")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"\ndone in {time.perf_counter() - start:.1f} s; curves in {args.plot}")


if __name__ == "__main__":
    main()
