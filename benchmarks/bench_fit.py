"""fit against the baselines it replaces, side by side in one run.

Workloads (steady-state seconds per epoch; compile time reported separately):
  A (book-sized): scikit-learn digits cut to 1,792 x 64 (/16; 56 full batches, no masking),
    64 -> 128 tanh -> 10, softmax CE, momentum 0.9 lr 0.05, batch 32, 20 epochs.
  A, masked: the same on all 1,797 rows (a last batch of 5, padded and masked).
  B (compute-bound): synthetic 8,192 x 512, 512 -> 1024 tanh -> 1024 tanh -> 10, batch 256,
    3 epochs; GFLOP/s and the fraction of this machine's measured f32 matmul peak.
Rows: funcnet fit, with and without shuffling; a hand-written pure-JAX lax.scan loop given its
epoch permutations as an input array (the ceiling: no shuffle cost in the graph), and the same
loop permuting in the graph with jax.random.permutation; funcnet with plain-jnp layers
(autodiff only); a per-step jax.jit Python loop; the book's NumPy classes. Every row of a
workload is timed in alternation with the others, so all see the same machine noise.
Ensemble: vmap of 32 workload-A fits (different keys and learning rates) vs one fit.
Logging (``--logging``): workload A as 1,120 steps (its 20 epochs), with ``log_every=100``, with
and without an ``on_log`` JSON-lines writer, and with ``progress=True`` (the bar drawn to nowhere),
against the same steps without them; interleaved medians (target <= 1.05x).

    python benchmarks/bench_fit.py            # everything
    python benchmarks/bench_fit.py --quick    # tiny sizes, to check it runs
    python benchmarks/bench_fit.py --logging  # the logging and progress overhead only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine, median_seconds, table
from jax import lax

import funcnet as fn
from funcnet import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import book_reference as book


def plain_dense(neurons, activation):
    """Dense with plain jnp ops: the same network, differentiated by autodiff alone."""
    dense = fn.Dense(neurons, w_init=fn.glorot_normal, b_init=fn.zeros)

    def apply(params, x, *, key=None):
        del key
        return activation(x @ params.W + params.B)

    return fn.Layer(dense.init, apply)


def networks(sizes, plain=False):
    acts = [jnp.tanh if plain else fn.tanh] * (len(sizes) - 2) + [(lambda x: x) if plain else fn.linear]
    make = plain_dense if plain else (lambda n, a: fn.Dense(n, a, w_init=fn.glorot_normal, b_init=fn.zeros))
    return fn.serial(*(make(n, a) for n, a in zip(sizes[1:], acts, strict=True)))


def scan_trainer(rows, batch_size, epochs, lr, mom):
    """A hand-written lax.scan training loop in plain JAX: what an expert writes by hand.

    ``run(params, x, y, key, perms)`` permutes in the graph when ``perms`` is None, else takes
    epoch e's order from ``perms[e]``."""
    batches = -(-rows // batch_size)
    padded = batches * batch_size

    def loss(params, x, y, mask):
        for W, B in params[:-1]:
            x = jnp.tanh(x @ W + B)
        W, B = params[-1]
        log_probs = jax.nn.log_softmax(x @ W + B)
        per_row = -jnp.take_along_axis(log_probs, y[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(mask, per_row, 0)) / jnp.sum(mask)

    @jax.jit
    def run(params, x, y, key, perms=None):
        def epoch(carry, e):
            order = jax.random.permutation(jax.random.fold_in(key, e), rows) if perms is None else perms[e]
            order = jnp.concatenate([order, order[: padded - rows]]).reshape(batches, batch_size)
            masks = (jnp.arange(padded) < rows).reshape(batches, batch_size)

            def step(carry, batch):
                params, velocity = carry
                index, mask = batch
                value, grads = jax.value_and_grad(loss)(params, x[index], y[index], mask)
                velocity = jax.tree_util.tree_map(lambda v, g: mom * v + lr * g, velocity, grads)
                params = jax.tree_util.tree_map(lambda p, v: p - v, params, velocity)
                return (params, velocity), value

            carry, values = lax.scan(step, carry, (order, masks))
            return carry, jnp.mean(values)

        velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
        (params, _), losses = lax.scan(epoch, (params, velocity), jnp.arange(epochs))
        return params, losses

    return run


def per_step_loop(net, optimizer, params, x, y, batch_size, epochs, key):
    """A Python loop over a jitted train_step (data sliced on the host)."""
    step = jax.jit(fn.train_step(net, fn.softmax_cross_entropy, optimizer))
    state = optimizer.init(params)
    for e in range(epochs):
        order = np.asarray(train.epoch_order(key, e, x.shape[0])[0])
        for i in range(0, x.shape[0], batch_size):
            index = order[i : i + batch_size]
            params, state, _ = step(params, state, x[index], y[index], None)
    return params


def numpy_book(params, x, y, batch_size, epochs, lr, mom, hidden_layers):
    acts = [book.Tanh] * hidden_layers + [book.Linear]
    net = book.NeuralNetwork(
        [book.Dense(np.asarray(p.W), np.asarray(p.B), a()) for p, a in zip(params, acts, strict=True)],
        book.SoftmaxCrossEntropy(),
    )
    rng = np.random.default_rng(0)
    trainer = book.Trainer(net, book.SGDMomentum(lr, momentum=mom), lambda e: rng.permutation(x.shape[0]))
    trainer.fit(x, np.eye(10, dtype=x.dtype)[y], None, None, epochs=epochs, batch_size=batch_size)


SLOW = ("per-step jax.jit loop", "NumPy book classes")


def interleaved(variants, rounds):
    """First-call time and the median over ``rounds`` of each variant, timed in alternation
    so that every variant sees the same machine noise. The slow baselines (``SLOW``) run in
    every third round only: they take most of the time and are far from the others anyway."""
    first, times = {}, {name: [] for name in variants}
    for name, (run, _) in variants.items():
        start = time.perf_counter()
        jax.block_until_ready(run())
        first[name] = time.perf_counter() - start
    for i in range(rounds):
        for name, (run, _) in variants.items():
            if name in SLOW and i % 3:
                continue
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    per_epoch = {name: float(np.median(times[name])) / epochs for name, (_, epochs) in variants.items()}
    compile_s = {name: first[name] - float(np.median(times[name])) for name in variants}
    return per_epoch, compile_s


def workload(x, y, sizes, batch_size, epochs, lr, mom, rounds, numpy_epochs):
    key = jax.random.PRNGKey(0)
    net, plain = networks(sizes), networks(sizes, plain=True)
    _, params = net.init(key, (-1, sizes[0]))
    xn, yn = x, y
    x, y = jnp.asarray(x), jnp.asarray(y)
    optimizer = fn.momentum(lr, mom)
    fit = lambda n, shuffle=True: (
        lambda: (
            fn.fit(
                n,
                fn.softmax_cross_entropy,
                optimizer,
                params,
                (x, y),
                epochs=epochs,
                batch_size=batch_size,
                key=key,
                shuffle=shuffle,
            ).params
        )
    )
    scan = scan_trainer(x.shape[0], batch_size, epochs, lr, mom)
    perms = jnp.stack([train.epoch_order(key, e, x.shape[0])[0] for e in range(epochs)])
    plain_params = [tuple(p) for p in params]
    variants = {
        "funcnet fit": (fit(net), epochs),
        "funcnet fit, shuffle=False": (fit(net, shuffle=False), epochs),
        "pure-JAX scan, permutations given": (lambda: scan(plain_params, x, y, key, perms)[0], epochs),
        "pure-JAX scan, permuting in graph": (lambda: scan(plain_params, x, y, key)[0], epochs),
        "funcnet, plain-jnp layers": (fit(plain), epochs),
        "per-step jax.jit loop": (lambda: per_step_loop(net, optimizer, params, x, y, batch_size, epochs, key), epochs),
        "NumPy book classes": (
            lambda: numpy_book(params, xn, yn, batch_size, numpy_epochs, lr, mom, len(sizes) - 2),
            numpy_epochs,
        ),
    }
    per_epoch, compile_s = interleaved(variants, rounds)
    compile_s.pop("NumPy book classes")
    return per_epoch, compile_s


def ensemble(x, y, members, epochs, repeats):
    """vmap of ``members`` workload-A fits over keys and learning rates, vs one fit."""
    net = networks([64, 128, 10])
    _, params = net.init(jax.random.PRNGKey(0), (-1, 64))
    x, y = jnp.asarray(x), jnp.asarray(y)

    def one(key, lr):
        return fn.fit(
            net, fn.softmax_cross_entropy, fn.momentum(lr, 0.9), params, (x, y), epochs=epochs, batch_size=32, key=key
        ).params

    keys = jax.random.split(jax.random.PRNGKey(1), members)
    rates = jnp.linspace(0.01, 0.1, members)
    many = jax.jit(jax.vmap(one))
    single = jax.jit(one)
    t_many = median_seconds(lambda: many(keys, rates), repeats=repeats)
    t_one = median_seconds(lambda: single(keys[0], rates[0]), repeats=repeats)
    return t_one, t_many


def shuffle_cost(rows, repeats):
    """Microseconds per epoch order: funcnet's keyed permutation against jax.random.permutation,
    each computed 200 times inside one compiled loop."""
    from funcnet.train.shuffle import permutation

    out = {}
    for name, perm in (("funcnet epoch_order", permutation), ("jax.random.permutation", jax.random.permutation)):
        loop = jax.jit(
            lambda key, perm=perm: lax.fori_loop(
                0, 200, lambda i, acc: acc + perm(jax.random.fold_in(key, i), rows)[0], 0
            )
        )
        out[name] = 1e6 * median_seconds(lambda loop=loop: loop(jax.random.PRNGKey(0)), repeats=repeats) / 200
    return out


def logging_overhead(x, y, epochs, rounds):
    """Workload A by steps: seconds per run of each logging and progress variant (interleaved
    medians), and each one's ratio to the same steps without them."""
    net = networks([64, 128, 10])
    key = jax.random.PRNGKey(0)
    _, params = net.init(key, (-1, 64))
    x, y = jnp.asarray(x), jnp.asarray(y)
    steps = epochs * (x.shape[0] // 32)
    every = min(100, steps)
    log = Path(tempfile.mkdtemp()) / "log.jsonl"

    def fit(quiet=False, **options):
        options = {"steps": steps, **options}

        def run():
            with contextlib.ExitStack() as quieted:
                if quiet:  # the bar and the end line, drawn to nowhere
                    quieted.enter_context(contextlib.redirect_stderr(io.StringIO()))
                    quieted.enter_context(contextlib.redirect_stdout(io.StringIO()))
                optimizer = fn.momentum(0.05, 0.9)
                return fn.fit(
                    net, fn.softmax_cross_entropy, optimizer, params, (x, y), batch_size=32, key=key, **options
                )

        return lambda: run().params, 1

    by_epochs = {"steps": None, "epochs": epochs}
    variants = {
        f"steps={steps}, no logging": fit(),
        f"log_every={every}": fit(log_every=every),
        f"log_every={every}, on_log=JsonLinesLogger": fit(log_every=every, on_log=fn.JsonLinesLogger(log)),
        "progress=True (steps)": fit(quiet=True, progress=True),
        f"epochs={epochs}, no progress": fit(**by_epochs),
        "progress=True (epochs)": fit(quiet=True, progress=True, **by_epochs),
    }
    per_run, _ = interleaved(variants, rounds)
    return steps, per_run


def callback_cost(repeats):
    """Microseconds a host callback adds to one step of a compiled loop (a step of 32 x 128 tanh),
    measured as the difference of 1,000 steps with and without one."""
    w = jnp.eye(128) * 0.5

    def loop(call):
        def body(c, i):
            c = jnp.tanh(c @ w)
            if call:
                jax.debug.callback(lambda i: None, i)
            return c, None

        return jax.jit(lambda: lax.scan(body, jnp.ones((32, 128)), jnp.arange(1000))[0])

    plain, called = loop(False), loop(True)
    times = {False: [], True: []}
    for _ in range(repeats):
        for flag, run in ((False, plain), (True, called)):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[flag].append(time.perf_counter() - start)
    return 1e3 * (float(np.median(times[True])) - float(np.median(times[False])))


def matmul_peak(n=2048, repeats=7):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / median_seconds(lambda: f(a), repeats=repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description="fit vs its baselines")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--skip-b", action="store_true", help="workload A and the ensemble only")
    parser.add_argument("--logging", action="store_true", help="the logging and progress overhead only")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    xa, ya = (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)
    epochs_a, repeats = (2, 1) if args.quick else (20, 21)
    print(f"Machine: {machine()}\n")
    if args.logging or args.quick:
        steps, per_run = logging_overhead(xa[:1792], ya[:1792], epochs_a, 3 if args.quick else 31)
        base, epochs_base = per_run[f"steps={steps}, no logging"], per_run[f"epochs={epochs_a}, no progress"]
        print(f"Logging and progress: workload A as {steps} steps, seconds per run (interleaved medians)")
        print(
            table(
                ["version", "ms / run", "x the same run without"],
                [
                    [k, f"{1e3 * v:.2f}", f"{v / (epochs_base if 'epochs' in k else base):.3f}"]
                    for k, v in per_run.items()
                ],
            )
        )
        print(f"A host callback costs {callback_cost(3 if args.quick else 11):.1f} us (one per step of a loop)\n")
        if args.logging:
            return
    numpy_epochs = 2 if args.quick else 5
    results = {
        "A": workload(xa[:1792], ya[:1792], [64, 128, 10], 32, epochs_a, 0.05, 0.9, repeats, numpy_epochs),
        "A, masked": workload(xa, ya, [64, 128, 10], 32, epochs_a, 0.05, 0.9, repeats, numpy_epochs),
    }
    if not args.skip_b:
        rows_b = 512 if args.quick else 8192
        rng = np.random.default_rng(0)
        xb = rng.standard_normal((rows_b, 512)).astype(np.float32)
        yb = rng.integers(0, 10, rows_b).astype(np.int32)
        results["B"] = workload(
            xb, yb, [512, 1024, 1024, 10], 256, 1 if args.quick else 3, 0.01, 0.9, 1 if args.quick else 7, 1
        )
    for name, (per_epoch, compile_s) in results.items():
        ceiling, fit_time = per_epoch["pure-JAX scan, permutations given"], per_epoch["funcnet fit"]
        print(f"Workload {name}: seconds per epoch (median), ratio to the scan given its permutations")
        print(
            table(
                ["version", "ms / epoch", "x scan, permutations given", "compile s"],
                [
                    [k, f"{1e3 * v:.3f}", f"{v / ceiling:.3f}", f"{compile_s[k]:.2f}" if k in compile_s else "-"]
                    for k, v in per_epoch.items()
                ],
            )
        )
        print(
            f"funcnet fit / scan given permutations = {fit_time / ceiling:.3f}; "
            f"shuffle cost {1e3 * (fit_time - per_epoch['funcnet fit, shuffle=False']):.3f} ms/epoch; "
            f"custom_vjp / plain-jnp layers = {fit_time / per_epoch['funcnet, plain-jnp layers']:.3f}\n"
        )
    if "B" in results:
        steps = 8192 // 256 if not args.quick else 2
        forward = 2 * 256 * (512 * 1024 + 1024 * 1024 + 1024 * 10)
        gflops = 3 * forward * steps / results["B"][0]["funcnet fit"] / 1e9
        peak = matmul_peak(512 if args.quick else 2048)
        print(
            f"Workload B: funcnet fit {gflops:.1f} GFLOP/s (3x forward matmul FLOPs); "
            f"measured f32 matmul peak {peak:.1f} GFLOP/s; fraction {gflops / peak:.2f}\n"
        )
    costs = {rows: shuffle_cost(rows, 1 if args.quick else 7) for rows in (1792, 1797, 8192)}
    print("Shuffle: microseconds per epoch order (median of 200 in one compiled loop)")
    print(
        table(
            ["rows", "funcnet epoch_order", "jax.random.permutation"],
            [
                [rows, f"{c['funcnet epoch_order']:.1f}", f"{c['jax.random.permutation']:.1f}"]
                for rows, c in costs.items()
            ],
        )
        + "\n"
    )
    members = 4 if args.quick else 32
    t_one, t_many = ensemble(xa, ya, members, epochs_a, 1 if args.quick else 3)
    print(
        f"Ensemble: one fit {t_one:.3f} s; vmap of {members} fits {t_many:.3f} s; "
        f"ratio {t_many / t_one:.1f}x (target <= 8x)"
    )


if __name__ == "__main__":
    main()
