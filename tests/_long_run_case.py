"""One fit, run as a separate process by tests/test_long_runs.py (so it can be killed).

    python tests/_long_run_case.py OUT.npz [CHECKPOINT_DIR]

Writes the FitResult's arrays to OUT.npz, plus ``trained``: the epochs this process trained.
With FUNCNET_TEST_SLOW set, each epoch sleeps that many seconds in the progress callback, so
a test can kill the process mid-run (every run shows progress, so every run is one program).
"""

import os
import sys
import time

import jax
import numpy as np

import funcnet as fn
from funcnet.train import progress

jax.config.update("jax_enable_x64", True)
EPOCHS = 24
trained = []
original_tick = progress.tick


def tick(epoch, train_loss, values):
    trained.append(int(epoch))
    time.sleep(float(os.environ.get("FUNCNET_TEST_SLOW", "0")))
    original_tick(epoch, train_loss, values)


progress.tick = tick


def run(checkpoint_dir=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 5))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    net = fn.serial(fn.Dense(12, fn.tanh), fn.Dropout(0.2), fn.Dense(2, fn.linear))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 5))
    return fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.adam(0.01),
        params,
        (x[:70], y[:70]),
        (x[70:], y[70:]),
        epochs=EPOCHS,
        batch_size=16,
        eval_every=2,
        patience=50,
        key=jax.random.PRNGKey(1),
        metrics={"accuracy": fn.accuracy},
        progress=True,
        checkpoint_dir=checkpoint_dir,
    )


if __name__ == "__main__":
    result = run(sys.argv[2] if len(sys.argv) > 2 else None)
    leaves = jax.tree_util.tree_leaves_with_path(result)
    np.savez(
        sys.argv[1],
        trained=np.array(len(trained)),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
