"""Memory of fit's compiled program, with and without donating the training state it replaces.

``segment`` (``funcnet/train/program.py``) takes the whole training state (params, optimizer
state, the best evaluation's params and optimizer state, history) and returns the next one. It
donates its input: XLA writes the new state into the old one's buffers, so the program needs no
second copy. This script compiles the same segment both ways and prints XLA's
``memory_analysis()`` figures (bytes of arguments, outputs, temporaries, and how many output bytes
alias an argument), for a network of ``--width`` hidden units (Adam, with eval data, so the state
holds params four times over: params, best params, and Adam's two moments for each).

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, table

import funcnet as fn
from funcnet.train import fitting, program

MiB = 2**20


def compiled_segment(width: int, donate: bool) -> jax.stages.Compiled:
    """The segment program fit compiles for a 2-layer net of ``width`` units (captured from fit)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, width)).astype(np.float32)
    y = rng.integers(0, 10, 512).astype(np.int32)
    net = fn.serial(fn.Dense(width, fn.tanh, dtype=np.float32), fn.Dense(10, fn.linear, dtype=np.float32))
    _, params = net.init(jax.random.PRNGKey(0), (-1, width))
    captured = {}
    original = program.segment

    def capture(state, *args, static, config):  # lower the call fit makes, with or without donation
        jitted = jax.jit(
            program._segment, static_argnames=("static", "config"), donate_argnames=("state",) if donate else ()
        )
        captured["compiled"] = jitted.lower(state, *args, static=static, config=config).compile()
        return original(state, *args, static=static, config=config)

    fitting.segment = capture
    try:
        fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.adam(1e-3),
            params,
            (x, y),
            (x, y),
            epochs=1,
            eval_every=1,
            batch_size=64,
            key=jax.random.PRNGKey(1),
        )
    finally:
        fitting.segment = original
    return captured["compiled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small network")
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args()
    width = args.width or (64 if args.quick else 1024)
    rows = []
    for donate in (False, True):
        memory = compiled_segment(width, donate).memory_analysis()
        figures = [
            getattr(memory, name, float("nan")) / MiB
            for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
        ]
        peak = figures[0] + figures[1] + figures[2] - figures[3]
        rows.append(["donated" if donate else "not donated", *(f"{v:.2f}" for v in figures), f"{peak:.2f}"])
    print(f"Machine: {machine()}; fit's segment program, Dense({width}) + Dense(10), Adam, with eval data\n")
    print(
        table(
            [
                "state",
                "arguments MiB",
                "outputs MiB",
                "temporaries MiB",
                "aliased MiB",
                "arguments + outputs + temporaries - aliased MiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
