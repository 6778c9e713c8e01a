"""Backpropagation through time by hand against autodiff, and the character model's fit.

Workloads:
  BPTT: batch 32, time 25, 62 -> 256 (the book's vocabulary and hidden size), forward +
    backward of <hs, g> for a fixed random g, jitted, float32. Rows per cell (RNN, LSTM, GRU):
    funcnet's custom_vjp (the book's per-step backward in a reverse scan) against jax.grad of
    the very same lax.scan forward without the custom rule and, where PyTorch is installed,
    against torch.nn.RNN / LSTM / GRU (CPU, torch.set_num_threads(2); its GRU is the
    reset-after variant, the same matmuls) doing the same forward and backward (`backward(g)`,
    gradients of the weights and x). torch is timed twice: as it runs by default (its CPU
    LSTM is oneDNN's fused RNN primitive, ``mkldnn_rnn_layer``: the matmuls and the gate
    arithmetic of a step in one vendor kernel) and with oneDNN turned off
    (``torch.backends.mkldnn.flags(enabled=False)``: ATen's own LSTM, a matmul and a fused
    cell kernel per step, the structure funcnet's scan has). Its RNN and GRU run the same code
    either way. Timed in alternation, medians.
  char model: examples/char_lm.py's LSTM model (one-hot 103 characters -> LSTM(256) ->
    TimeDistributed(Dense(103))), batch 32, sequences of 25, Adam with clip_value=2: fit's
    training steps per second over 2 epochs of 3,200 sequences (compile excluded).

    python benchmarks/bench_rnn.py           # the tables
    python benchmarks/bench_rnn.py --quick   # tiny sizes, to check it runs
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, table

import funcnet as fn
from funcnet import recurrent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import char_lm


def _torch_step(
    cell: str, batch: int, time_: int, inputs: int, hidden: int, onednn: bool = True
) -> Callable[[], Any] | None:
    """One forward + backward of torch.nn's cell on the same workload (CPU, 2 threads), with or
    without oneDNN; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # the flags' own notice
    module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](inputs, hidden, batch_first=True)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((batch, time_, inputs)).astype(np.float32), requires_grad=True)
    g = torch.tensor(rng.standard_normal((batch, time_, hidden)).astype(np.float32))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.backends.mkldnn.flags(enabled=onednn):
            out, _ = module(x)
            out.backward(g)

    return step


def bptt(cell: str, batch: int, time_: int, inputs: int, hidden: int, rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward: hand-derived, autodiff of the same scan, torch."""
    layer = {"rnn": fn.RNN, "lstm": fn.LSTM, "gru": fn.GRU}[cell](hidden)
    _, params = layer.init(jax.random.PRNGKey(0), (-1, time_, inputs))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, time_, inputs)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((batch, time_, hidden)).astype(np.float32))
    zeros = jnp.zeros((batch, hidden))
    plain = getattr(recurrent, f"_{cell}")  # the forward scan, no custom rule
    states = (zeros, zeros) if cell == "lstm" else (zeros,)
    first = lambda out: out[0] if cell == "lstm" else out
    hand = jax.jit(jax.grad(lambda p, x: jnp.vdot(getattr(fn, cell)(x, p), g), argnums=(0, 1)))
    auto = jax.jit(jax.grad(lambda p, x: jnp.vdot(first(plain(x, p, *states)), g), argnums=(0, 1)))
    variants: dict[str, Callable[[], Any]] = {
        "hand": lambda: jax.block_until_ready(hand(params, x)),
        "auto": lambda: jax.block_until_ready(auto(params, x)),
    }
    for name, onednn in (("torch", True), ("torch, no oneDNN", False)):
        torch_step = _torch_step(cell, batch, time_, inputs, hidden, onednn)
        if torch_step is not None:
            variants[name] = torch_step
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # compile, warm up
        run()
        run()
    for _ in range(rounds):  # interleaved
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def char_model_steps_per_second(rows: int, epochs: int) -> float:
    text = char_lm.corpus()
    chars = sorted(set(text))
    ids = np.searchsorted(chars, list(text[: rows * char_lm.SEQUENCE + 1])).astype(np.int32)
    inputs, targets = char_lm.sequences(ids, char_lm.SEQUENCE)
    x = jnp.asarray(np.eye(len(chars), dtype=np.float32)[inputs])
    net = char_lm.model(fn.LSTM, len(chars))
    _, params = net.init(jax.random.PRNGKey(0), (-1, char_lm.SEQUENCE, len(chars)))
    run = lambda: (
        fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.adam(3e-3, clip_value=2.0),
            params,
            (x, targets),
            epochs=epochs,
            batch_size=char_lm.BATCH,
            key=jax.random.PRNGKey(1),
        ).params
    )
    jax.block_until_ready(run())  # compile
    start = time.perf_counter()
    jax.block_until_ready(run())
    return epochs * (len(inputs) // char_lm.BATCH) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args()
    shape = (4, 5, 6, 8) if args.quick else (32, 25, 62, 256)
    rounds = 2 if args.quick else 30
    print(f"Machine: {machine()}\n")
    rows = []
    with_torch = True
    for cell in ("rnn", "lstm", "gru"):
        t = bptt(cell, *shape, rounds)
        with_torch = "torch" in t
        row = [cell.upper(), f"{1e3 * t['hand']:.2f}", f"{1e3 * t['auto']:.2f}", f"{t['hand'] / t['auto']:.3f}"]
        if with_torch:
            for name in ("torch", "torch, no oneDNN"):
                row += [f"{1e3 * t[name]:.2f}", f"{t['hand'] / t[name]:.3f}"]
        rows.append(row)
    headers = ["cell", "hand-derived BPTT", "autodiff of the same scan", "hand / autodiff"]
    if with_torch:
        headers += ["torch.nn (CPU, 2 threads)", "hand / torch", "torch.nn, oneDNN off", "hand / torch, oneDNN off"]
    print(f"BPTT, batch {shape[0]}, time {shape[1]}, {shape[2]} -> {shape[3]}, forward + backward (median ms)")
    print(table(headers, rows))
    rate = char_model_steps_per_second(64 if args.quick else 3200, 1 if args.quick else 2)
    print(f"\nCharacter model (LSTM 256, batch 32, time 25, vocabulary 103): fit at {rate:.1f} steps/s")


if __name__ == "__main__":
    main()
