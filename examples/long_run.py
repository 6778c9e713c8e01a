"""A run you can leave alone: checkpoints inside fit, and a second invocation that resumes.

Trains the digits MLP for many epochs, saving the whole training state (early stopping and
history included) every few epochs to a directory. Stop it at any point (Ctrl-C, a kill, a
lost machine) and run the same command again: it resumes from the newest checkpoint and ends
exactly where an uninterrupted run would. Run it once more after it finished and it returns
the finished result without training.

    python examples/long_run.py                      # 200 epochs, a checkpoint every 10
    python examples/long_run.py --quick              # 12 epochs, for a smoke test
    python examples/long_run.py --checkpoint-dir DIR # where the checkpoints live
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import funcnet as fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 epochs")
    parser.add_argument("--checkpoint-dir", default="long_run_checkpoints", help="the checkpoint directory")
    args = parser.parse_args()
    epochs, every = (12, 3) if args.quick else (200, 10)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int32), test_size=0.3, random_state=0
    )
    net = fn.serial(
        fn.Dense(64, fn.tanh, w_init=fn.glorot_normal, b_init=fn.zeros),
        fn.Dropout(0.2),
        fn.Dense(10, fn.linear, w_init=fn.glorot_normal, b_init=fn.zeros),
    )
    _, params = net.init(jax.random.PRNGKey(0), (-1, 64))

    directory = Path(args.checkpoint_dir)
    done = sorted(
        int(m.group(1))
        for p in directory.glob("checkpoint-*.safetensors")
        if (m := re.fullmatch(r"checkpoint-(\d+)\.safetensors", p.name))
    )
    print(f"{directory}: " + (f"a checkpoint after {done[-1]} epochs, resuming" if done else "empty, starting afresh"))
    start = time.perf_counter()
    try:
        result = fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.momentum(0.05, 0.9),
            params,
            (x_train, y_train),
            (x_test, y_test),
            epochs=epochs,
            batch_size=32,
            eval_every=every,
            patience=5,
            key=jax.random.PRNGKey(1),
            metrics={"accuracy": fn.accuracy},
            monitor="accuracy",
            mode="max",
            progress=not args.quick,
            checkpoint_dir=directory,
            checkpoint_every=every,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the newest checkpoint")
        return
    best = int(np.nanargmax(np.asarray(result.history.eval_metrics["accuracy"])))
    print(
        f"finished after {int(result.stopped_epoch)} epochs (this invocation: {time.perf_counter() - start:.1f} s); "
        f"best evaluation after {int(result.best_epoch)} epochs, test accuracy "
        f"{float(result.history.eval_metrics['accuracy'][best]):.2%}"
    )


if __name__ == "__main__":
    main()
