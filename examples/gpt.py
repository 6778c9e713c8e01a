"""A GPT as nanoGPT builds it, trained and sampled with funcnet: tied weights, weight decay on the
weights only, warmup + cosine, a global gradient clip, and generation with a KV cache.

nanoGPT's CPU configuration (its README: 4 layers, 4 heads, 128 features, context 64, batch 12,
no biases, no dropout, AdamW with lr 1e-3 decaying to 1e-4 after 100 warmup iterations, beta2
0.99, weight decay 0.1 on 2-D weights, gradient clip 1.0, 2,000 iterations) on the text of
``examples/char_lm.py`` (the standard library's ``pydoc_data/topics.py``, no download), the first
90% for training and the last 10% for validation. GPT-2's initialisation: N(0, 0.02) everywhere,
the projections into the residual stream scaled by ``1 / sqrt(2 * layers)``.

    Embedding (tied with the output head) -> PositionalEmbedding -> 4 blocks of
        residual(LayerNorm, MultiHeadAttention(4, is_causal=True))
        residual(LayerNorm, Dense(4 d, gelu), Dense(d))
    -> LayerNorm -> logits = h @ W_embedding.T

``fit`` trains on windows drawn at random from the training text (a fresh set each "epoch" of
``--eval-interval`` iterations would need training by steps; here the windows are drawn once,
``--eval-interval * batch`` of them, and reshuffled every epoch), evaluating every epoch on 200
windows of the validation text. It prints the losses, plots the curves and samples with
``fn.generate`` (temperature 0.8, top-k 20).

    python examples/gpt.py            # 2,000 iterations, a few minutes on 2 cores
    python examples/gpt.py --quick    # a tiny model and a few iterations, for a smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import time

import char_lm
import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fn


def gpt(vocab: int, features: int, heads: int, layers: int, length: int) -> fn.Layer:
    """nanoGPT's model with ``bias=False``, as funcnet layers."""
    weights = fn.normal(0.02)
    into_residual = fn.normal(0.02 / math.sqrt(2 * layers))  # GPT-2's c_proj scaling
    blocks = []
    for _ in range(layers):
        attention = fn.MultiHeadAttention(heads, is_causal=True, use_bias=False, w_init=weights, o_init=into_residual)
        blocks.append(fn.residual(fn.LayerNorm(use_bias=False), attention))
        blocks.append(
            fn.residual(
                fn.LayerNorm(use_bias=False),
                fn.Dense(4 * features, fn.gelu, use_bias=False, w_init=weights),
                fn.Dense(features, fn.linear, use_bias=False, w_init=into_residual),
            )
        )
    return fn.tied(
        fn.Embedding(vocab, features, w_init=weights),
        fn.PositionalEmbedding(length, w_init=weights),
        *blocks,
        fn.LayerNorm(use_bias=False),
    )


def windows(ids: np.ndarray, count: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """nanoGPT's ``get_batch``: ``count`` windows at random starts, targets shifted by one."""
    starts = rng.integers(0, len(ids) - length - 1, count)
    x = np.stack([ids[s : s + length] for s in starts])
    y = np.stack([ids[s + 1 : s + length + 1] for s in starts])
    return x.astype(np.int32), y.astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few iterations")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=250, help="iterations per epoch (and evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    features, heads, layers, length, batch = 128, 4, 4, 64, 12
    if args.quick:
        features, heads, layers, length, args.iterations, args.eval_interval = 32, 2, 1, 16, 40, 20
    text = char_lm.corpus()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    split = int(0.9 * len(ids))
    rng = np.random.default_rng(args.seed)
    train = windows(ids[:split], args.eval_interval * batch, length, rng)
    held_out = windows(ids[split:], 200, length, rng)
    net = gpt(len(chars), features, heads, layers, length)
    _, params = net.init(jax.random.PRNGKey(args.seed), (-1, length))
    print(fn.summary(net, (-1, length)).splitlines()[-1], f"(vocab {len(chars)})")

    schedule = fn.warmup_cosine_decay(0.0, 1e-3, min(100, args.iterations // 10), args.iterations, 1e-4)
    adamw = lambda decay: fn.adamw(schedule, b2=0.99, weight_decay=decay)
    optimizer = fn.chain(
        fn.clip_by_global_norm(1.0),
        fn.multi_optimizer({"decay": adamw(0.1), "no_decay": adamw(0.0)}, fn.decay_labels(params)),
    )
    epochs = args.iterations // args.eval_interval
    start = time.perf_counter()
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        optimizer,
        params,
        train,
        held_out,
        epochs=epochs,
        batch_size=batch,
        eval_every=1,
        patience=None,
        key=jax.random.PRNGKey(args.seed + 1),
    )
    seconds = time.perf_counter() - start
    train_loss, eval_loss = np.asarray(result.history.train_loss), np.asarray(result.history.eval_loss)
    for epoch in range(epochs):
        iteration, losses = (epoch + 1) * args.eval_interval, (train_loss[epoch], eval_loss[epoch])
        print(f"iteration {iteration:5d}: train {losses[0]:.3f}, val {losses[1]:.3f}")
    print(f"{epochs * args.eval_interval} iterations in {seconds:.1f} s; best val loss {np.nanmin(eval_loss):.3f}")

    # Learned positions end at the context: past it, continue from the last half-window, as
    # nanoGPT crops its input (each call the same shapes: one compiled program).
    sampled = [chars.index(c) for c in "The "]
    total = 80 if args.quick else 400
    key = jax.random.PRNGKey(7)
    while len(sampled) < total:
        window = sampled[-(length // 2) :]
        key, step_key = jax.random.split(key)
        prompt = jnp.asarray([window + [0] * (length // 2 - len(window))], jnp.int32)
        steps = length - length // 2
        out = fn.generate(
            net, result.params, prompt, steps, key=step_key, temperature=0.8, top_k=20,
            prompt_lengths=jnp.asarray([len(window)], jnp.int32),
        )  # fmt: skip
        sampled += [int(i) for i in out[0, len(window) : len(window) + steps]]
    print("".join(chars[i] for i in sampled[:total]))

    if os.environ.get("MPLBACKEND") or not args.quick:
        import matplotlib.pyplot as plt

        iterations = (np.arange(epochs) + 1) * args.eval_interval
        plt.plot(iterations, train_loss, label="train")
        plt.plot(iterations, eval_loss, label="val")
        plt.xlabel("iteration")
        plt.ylabel("loss (nats / character)")
        plt.legend()
        plt.savefig("gpt_loss.png", dpi=100)
        print("wrote gpt_loss.png")


if __name__ == "__main__":
    main()
