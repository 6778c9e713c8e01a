"""What checkpointing inside fit costs: workload B of bench_fit.py with and without it.

Workload B: synthetic 8,192 x 512, 512 -> 1024 tanh -> 1024 tanh -> 10, softmax CE, momentum
0.9 lr 0.01, batch 256, 3 epochs. Variants, timed in alternation (each checkpointed run
starts in an empty directory, so it trains every epoch):
  no checkpoints:        fit(...)
  checkpoint_every=1:    fit(..., checkpoint_dir=<fresh>, checkpoint_every=1): three durable
                         saves of the whole training state.

    python benchmarks/bench_checkpoint.py           # the table
    python benchmarks/bench_checkpoint.py --quick   # tiny sizes, to check it runs
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, table
from bench_fit import networks

import funcnet as fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args()
    rows, rounds = (512, 2) if args.quick else (8192, 9)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, 512)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, rows).astype(np.int32))
    net = networks([512, 1024, 1024, 10])
    key = jax.random.PRNGKey(0)
    _, params = net.init(key, (-1, 512))
    scratch = Path(tempfile.mkdtemp(prefix="funcnet-bench-"))

    def run(directory=None):
        return fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.momentum(0.01, 0.9),
            params,
            (x, y),
            epochs=3,
            batch_size=256,
            key=key,
            checkpoint_dir=directory,
            checkpoint_every=1,
        ).params

    variants = {"no checkpoints": lambda i: run(), "checkpoint_every=1": lambda i: run(scratch / f"run-{i}")}
    times = {name: [] for name in variants}
    try:
        for i in range(rounds + 1):  # round 0 compiles
            for name, variant in variants.items():
                start = time.perf_counter()
                jax.block_until_ready(variant(i))
                if i:
                    times[name].append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in (scratch / "run-1").iterdir()) / 2  # two files are kept
    finally:
        shutil.rmtree(scratch)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    base = medians["no checkpoints"]
    print(f"Machine: {machine()}\n")
    print(f"Workload B, 3 epochs; a checkpoint file holds {size / 1e6:.1f} MB")
    print(
        table(
            ["variant", "s per fit (median)", "x no checkpoints"],
            [[name, f"{t:.3f}", f"{t / base:.3f}"] for name, t in medians.items()],
        )
    )


if __name__ == "__main__":
    main()
