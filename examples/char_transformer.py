"""A character-level Transformer language model against the book's LSTM, on the same text.

The text of ``examples/char_lm.py`` (the standard library's ``pydoc_data/topics.py``, about
465,000 characters, no download), the same split (the first 90% of the text trains, the last
10% evaluates). The Transformer is pre-LayerNorm and causal:

    Embedding -> PositionalEmbedding -> blocks of
        residual(LayerNorm, MultiHeadAttention(heads, is_causal=True))
        residual(LayerNorm, TimeDistributed(Dense(4 d, gelu)), TimeDistributed(Dense(d, linear)))
    -> LayerNorm -> TimeDistributed(Dense(vocab, linear))

trained by steps, as language models are: ``fit(..., steps=N)`` on ``random_windows`` of the
training text (each update ``--batch`` windows of ``--length`` characters at random starts, drawn
inside the compiled program, nanoGPT's ``get_batch``), predicting the next character at every
position, by AdamW with a linear warmup (the first 5% of the updates, from 0) to a peak of 6e-3
and a cosine decay to a tenth of it (``--optimizer adam``: Adam, decaying linearly from the peak
to a tenth). ``N`` is what ``--epochs`` passes over the training windows would take, so the
budget matches the LSTM's. Every ``N // 200`` updates ``log_every`` records the training loss,
the learning rate and the gradient norm into ``result.history`` and ``on_log`` appends them to a
JSON-lines log (``--log``); the held-out text is evaluated 16 times. For comparison it also
trains char_lm.py's LSTM by epochs (one-hot, LSTM(256), Adam with clip_value=2, windows of 25,
4 epochs). It prints both eval losses per character with their training times (wall clock and
this process's CPU time), samples text from the Transformer, and plots the Transformer's
per-step curves (training loss and learning rate from ``history``) beside both eval curves
against training time.

By steps on random windows (820 updates, 4 epochs' worth; 217,447 params), the Transformer
reached 1.389 nats per character with AdamW and warmup-cosine in 174 s on a shared 2-core
machine. Trained by epochs over fixed windows, as this example did before, it reached 1.386
(1.435 with Adam; at 3e-3: 1.471 and 1.449); the LSTM reaches 1.358 after its 4 epochs. The
README's Transformer section has the table.

    python examples/char_transformer.py            # 4 epochs each, about 10 minutes on 2 cores
    python examples/char_transformer.py --quick    # a small slice, for a smoke test
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import char_lm
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import funcnet as fn


def transformer(vocab: int, features: int, heads: int, layers: int, length: int) -> fn.Layer:
    dense = lambda n, activation: fn.TimeDistributed(fn.Dense(n, activation, w_init=fn.glorot_normal, b_init=fn.zeros))
    blocks = []
    for _ in range(layers):
        blocks.append(fn.residual(fn.LayerNorm(), fn.MultiHeadAttention(heads, is_causal=True)))
        blocks.append(fn.residual(fn.LayerNorm(), dense(4 * features, fn.gelu), dense(features, fn.linear)))
    return fn.serial(
        fn.Embedding(vocab, features, w_init=fn.normal(0.02)),
        fn.PositionalEmbedding(length),
        *blocks,
        fn.LayerNorm(),
        dense(vocab, fn.linear),
    )


@functools.partial(jax.jit, static_argnames=("net", "count", "length"))
def sample(net: fn.Layer, params, seed: jax.Array, count: int, temperature: float, length: int, key: jax.Array):
    """``count`` characters after ``seed``, one at a time, each from the last ``length`` characters
    (the model is causal, so what lies after the current position in the window is ignored)."""
    size = max(length, seed.shape[0] + count)
    buffer = jnp.zeros(size, jnp.int32).at[: seed.shape[0]].set(seed)

    def step(buffer, inputs):
        n, key = inputs  # n characters so far
        start = jnp.maximum(n - length, 0)
        window = lax.dynamic_slice(buffer, (start,), (length,))
        logits = net.apply(params, window[None])[0, n - 1 - start]
        char = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
        return buffer.at[n].set(char), char

    counts = seed.shape[0] + jnp.arange(count, dtype=jnp.int32)
    _, chars = lax.scan(step, buffer, (counts, jax.random.split(key, count)))
    return chars


def train(net, params, optimizer, train, held_out, *, batch, progress, **length):
    """fit's result, its wall-clock seconds and this process's CPU seconds (the machine may be
    shared). ``length``: ``epochs=E`` (evaluating every epoch), or ``steps=N`` with its
    ``eval_every`` and logging options."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        optimizer,
        params,
        train,
        held_out,
        batch_size=batch,
        patience=None,  # no early stop: the whole budget, the best evaluation's params
        key=jax.random.PRNGKey(1),
        metrics={"accuracy": fn.accuracy},
        progress=progress,
        **({"eval_every": 1} if "epochs" in length else {}),
        **length,
    )
    return result, time.perf_counter() - start, time.process_time() - cpu


def best(result) -> tuple[float, float]:
    i = int(np.nanargmin(np.asarray(result.history.eval_loss)))
    return float(result.history.eval_loss[i]), float(result.history.eval_metrics["accuracy"][i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of the text and a tiny model")
    parser.add_argument("--epochs", type=int, default=4, help="the LSTM trains 4: a similar budget")
    parser.add_argument("--length", type=int, default=64, help="context: characters per window")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=6e-3, help="the peak learning rate")
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adam"),
        default="adamw",
        help="adamw: AdamW, a linear warmup over the first --warmup of the updates from 0, then a cosine decay "
        "to a tenth of the peak; adam: Adam, decaying linearly from the peak to a tenth",
    )
    parser.add_argument("--warmup", type=float, default=0.05, help="adamw's warmup: a fraction of all updates")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="adamw's decoupled weight decay")
    parser.add_argument("--no-lstm", action="store_true", help="skip the LSTM baseline")
    parser.add_argument("--plot", default=os.path.join("examples", "out", "char_transformer.png"))
    parser.add_argument("--log", default=os.path.join("examples", "out", "char_transformer.jsonl"), help="JSON lines")
    args = parser.parse_args()
    if args.quick:  # a tiny Transformer; the LSTM baseline is char_lm.py's own smoke test
        args.epochs, args.length, args.features, args.heads, args.layers, args.no_lstm = 1, 32, 32, 2, 1, True

    text = char_lm.corpus()
    chars = sorted(set(text))
    vocab = len(chars)
    ids = np.searchsorted(chars, list(text[:20_000] if args.quick else text)).astype(np.int32)
    cut = int(0.9 * len(ids))  # the LSTM's split: its first 90% of windows are this text
    windows = fn.random_windows(ids[: cut + 1], args.length)  # drawn at random, inside the program
    ex, ey = char_lm.sequences(ids[cut:], args.length)
    per_epoch = -(-(cut // args.length) // args.batch)  # updates of one pass over the text's windows
    print(
        f"{len(ids):,} characters, vocabulary {vocab}; {cut:,} training characters in random windows of "
        f"{args.length}, {len(ex):,} eval windows"
    )

    net = transformer(vocab, args.features, args.heads, args.layers, args.length)
    _, params = net.init(jax.random.PRNGKey(0), (-1, args.length))
    print(fn.summary(net, (-1, args.length)).splitlines()[-1])
    updates = args.epochs * per_epoch  # fit's steps, and what a schedule counts: one per update
    peak, final = args.learning_rate, args.learning_rate / 10
    if args.optimizer == "adamw":
        warmup = max(1, round(args.warmup * updates))
        optimizer = fn.adamw(fn.warmup_cosine_decay(0.0, peak, warmup, updates, final), weight_decay=args.weight_decay)
        schedule = f"warmup_cosine_decay(0, {peak:g}, {warmup}, {updates}, {final:g})"
        recipe = f"adamw({schedule}, weight_decay={args.weight_decay:g})"
    else:
        optimizer = fn.adam(fn.linear_decay(peak, final, updates))
        recipe = f"adam(linear_decay({peak:g}, {final:g}, {updates}))"
    print(f"optimizer: {recipe}, {updates} updates")
    results = {}
    if os.path.dirname(args.log):
        os.makedirs(os.path.dirname(args.log), exist_ok=True)
    if os.path.exists(args.log):  # JsonLinesLogger appends: a fresh log for a fresh run
        os.remove(args.log)
    results["Transformer"] = train(
        net,
        params,
        optimizer,
        windows,
        (ex, ey),
        batch=args.batch,
        progress=not args.quick,
        steps=updates,
        eval_every=max(1, updates // 16),
        log_every=max(1, updates // 200),
        on_log=fn.JsonLinesLogger(args.log),
    )
    with open(args.log, encoding="utf-8") as file:
        print(f"log: {sum(1 for _ in file)} lines in {args.log}")

    if not args.no_lstm:  # char_lm.py's LSTM, as that example trains it
        lstm = char_lm.model(fn.LSTM, vocab)
        lx, ly = char_lm.sequences(ids, char_lm.SEQUENCE)
        split = int(0.9 * len(lx))
        one_hot = np.eye(vocab, dtype=np.float32)[lx]
        _, lstm_params = lstm.init(jax.random.PRNGKey(6), (-1, char_lm.SEQUENCE, vocab))
        results["LSTM"] = train(
            lstm,
            lstm_params,
            fn.adam(3e-3, clip_value=2.0),
            (one_hot[:split], ly[:split]),
            (one_hot[split:], ly[split:]),
            epochs=1 if args.quick else 4,
            batch=char_lm.BATCH,
            progress=not args.quick,
        )

    print(f"\n{'model':<12} {'eval loss / char':>16} {'accuracy':>9} {'train time':>11} {'CPU time':>9}   "
          f"(uniform ln({vocab}) = {math.log(vocab):.3f})")  # fmt: skip
    for name, (result, seconds, cpu) in results.items():
        loss, accuracy = best(result)
        print(f"{name:<12} {loss:>16.3f} {accuracy:>9.1%} {seconds:>10.0f}s {cpu:>8.0f}s")

    seed = jnp.asarray(np.searchsorted(chars, list("The ")), jnp.int32)
    trained = results["Transformer"][0].params
    for temperature in (0.5, 1.0):
        drawn = sample(net, trained, seed, 200, temperature, args.length, jax.random.PRNGKey(7))
        print(
            f"\nTransformer sample at temperature {temperature}:\nThe " + "".join(chars[i] for i in np.asarray(drawn))
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (steps_ax, ax) = plt.subplots(1, 2, figsize=(12, 4))
    h = results["Transformer"][0].history  # the per-step log: every log_every updates
    steps_ax.plot(np.asarray(h.step), np.asarray(h.step_loss), label="training loss (mean of each log entry)")
    steps_ax.plot(np.asarray(h.eval_epoch), np.asarray(h.eval_loss), marker="o", label="eval loss")
    steps_ax.set(xlabel="optimizer update (step)", ylabel="loss per character", title="Transformer, by steps")
    rate_ax = steps_ax.twinx()
    rate_ax.plot(np.asarray(h.step), np.asarray(h.learning_rate), color="gray", linestyle="--", label="learning rate")
    rate_ax.set_ylabel("learning rate")
    steps_ax.legend(loc="upper right")
    for name, (result, seconds, _) in results.items():
        curve, at = np.asarray(result.history.eval_loss), np.asarray(result.history.eval_epoch)
        share = at / len(result.history.train_loss)  # the evaluation's place in the run: epochs or steps
        ax.plot(seconds * share, curve, marker="o", label=name)
    ax.axhline(math.log(vocab), color="gray", linestyle=":", label=f"uniform, ln({vocab})")
    ax.set(xlabel="training time, s (each evaluation's share of fit's time)", ylabel="eval loss per character")
    ax.set_title("character models on pydoc's text: Transformer vs LSTM")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"\ncurves in {args.plot}")


if __name__ == "__main__":
    main()
