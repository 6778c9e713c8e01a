"""Where a fresh process's time goes, from ``import funcnet`` to its first fit's return.

Workload: a fresh Python process imports funcnet, builds ``serial(Dense(64, tanh),
Dense(10, linear))``, inits it for 64 features and fits it (softmax cross-entropy, Adam, batch
32) for 4 epochs on 1,200 rows with an evaluation (loss and accuracy) after every epoch on 300
held-out rows; the data are made with NumPy before the clock starts. Phases, each waited for:

  import funcnet   ``import funcnet`` (JAX itself is imported before the clock starts)
  build            constructing the network, loss, optimizer and metrics
  net.init         ``net.init(key, (-1, 64))``
  first fit        ``fit(...)`` to its returned result
  second fit       the same fit again in the same process: the running time without compiling

Within init and fit, JAX's own monitoring events split out what compiling costs: tracing to a
jaxpr, lowering to StableHLO and XLA's backend compile (wall seconds, summed over every program
compiled in the phase), and the number of programs compiled. "CPU s" is the process's CPU time
in the phase (all threads): on a shared machine it varies less than the wall time. Each
variant runs in its own fresh process, ``--repeats`` times; the table shows medians.

Variants:
  two layers, eval:   the workload above.
  two layers, no eval: the same fit without eval_data.
  hand-written JAX, eval: the baseline, the same workload as a careful user writes it without
    funcnet: one ``jax.jit`` init drawing the same N(0, 1) weights and biases, and one
    ``jax.jit`` fit (a ``lax.scan`` over epochs of a ``lax.scan`` over shuffled batches, Adam
    written out, the evaluation's loss and accuracy after every epoch; the last partial batch
    dropped, no early stopping or checks), default compiler options. Its "import funcnet" and
    "build" phases are empty.
  two layers, eval, warm cache: the first variant in a process that finds its programs in JAX's
    persistent compilation cache, filled by an earlier process (not timed) running the same
    script: ``jax.config.update("jax_compilation_cache_dir", path)`` with
    ``jax_persistent_cache_min_compile_time_secs`` 0 (JAX's default keeps only programs that
    took a second or more to compile), as a user re-running a script would set it.

    python benchmarks/bench_first_fit.py           # the table
    python benchmarks/bench_first_fit.py --quick   # one repeat: check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "two layers, eval": True,
    "two layers, no eval": False,
    "hand-written JAX, eval": None,
    "two layers, eval, warm cache": True,
}
PHASES = ("import funcnet", "build", "net.init", "first fit", "second fit")


def child(with_eval: bool | None, cache: str | None = None) -> dict[str, Any]:
    """Run the workload in this (fresh) process; return seconds per phase and compile costs.
    ``cache``: a persistent compilation cache directory to read (and fill)."""
    import jax
    import numpy as np
    from jax import monitoring

    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    events: dict[str, float] = {}
    counts: dict[str, int] = {}

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        events[event] = events.get(event, 0.0) + duration
        counts[event] = counts.get(event, 0) + 1

    monitoring.register_event_duration_secs_listener(listen)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int32)
    train, held_out = (x[:1200], y[:1200]), (x[1200:], y[1200:])
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(key)
    out: dict[str, Any] = {}

    def phase(name: str, run: Any) -> Any:
        before, before_counts = dict(events), dict(counts)
        start, cpu = time.perf_counter(), time.process_time()
        value = jax.block_until_ready(run())
        out[name] = time.perf_counter() - start
        out[f"{name}/cpu"] = time.process_time() - cpu
        spent = lambda suffix: sum(v - before.get(k, 0.0) for k, v in events.items() if k.endswith(suffix))
        out[f"{name}/trace"] = spent("jaxpr_trace_duration")
        out[f"{name}/lower"] = spent("jaxpr_to_mlir_module_duration")
        out[f"{name}/compile"] = spent("backend_compile_duration")
        out[f"{name}/programs"] = sum(
            v - before_counts.get(k, 0) for k, v in counts.items() if k.endswith("backend_compile_duration")
        )
        return value

    if with_eval is None:
        for name in ("import funcnet", "build"):
            phase(name, lambda: None)
        init, fit = _hand_written()
        params = phase("net.init", lambda: init(key))
        phase("first fit", lambda: fit(params, *train, *held_out, key))
        phase("second fit", lambda: fit(params, *train, *held_out, key))
        return out
    fn = phase("import funcnet", lambda: __import__("funcnet"))
    net, loss, optimizer, metrics = phase(
        "build",
        lambda: (
            fn.serial(fn.Dense(64, fn.tanh), fn.Dense(10, fn.linear)),
            fn.softmax_cross_entropy,
            fn.adam(1e-3),
            {"accuracy": fn.accuracy},
        ),
    )
    _, params = phase("net.init", lambda: net.init(key, (-1, 64)))
    fit = lambda: fn.fit(
        net,
        loss,
        optimizer,
        params,
        train,
        held_out if with_eval else None,
        epochs=4,
        eval_every=1,
        batch_size=32,
        key=key,
        metrics=metrics if with_eval else None,
    )
    phase("first fit", fit)
    phase("second fit", fit)
    return out


def _hand_written() -> tuple[Any, Any]:
    """The baseline: init and fit of the same workload in plain JAX, two ``jax.jit`` programs."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.jit
    def init(key: Any) -> Any:
        keys = jax.random.split(key, 4)
        return [
            (jax.random.normal(keys[0], (64, 64)), jax.random.normal(keys[1], (1, 64))),
            (jax.random.normal(keys[2], (64, 10)), jax.random.normal(keys[3], (1, 10))),
        ]

    def logits(p: Any, x: Any) -> Any:
        (w1, b1), (w2, b2) = p
        return jnp.tanh(x @ w1 + b1) @ w2 + b2

    def loss(p: Any, x: Any, y: Any) -> Any:
        z = logits(p, x)
        return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])

    @jax.jit
    def fit(params: Any, x: Any, y: Any, eval_x: Any, eval_y: Any, key: Any) -> Any:
        zeros = jax.tree.map(jnp.zeros_like, params)

        def epoch(carry: Any, key: Any) -> Any:
            batches = x.shape[0] // 32
            order = jax.random.permutation(key, x.shape[0])[: batches * 32].reshape(batches, 32)

            def step(carry: Any, rows: Any) -> Any:
                p, m, v, t = carry
                value, g = jax.value_and_grad(loss)(p, x[rows], y[rows])
                t = t + 1
                m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
                v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
                scale = 1e-3 * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
                p = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-8), p, m, v)
                return (p, m, v, t), value

            carry, losses = lax.scan(step, carry, order)
            p = carry[0]
            accuracy = jnp.mean(jnp.argmax(logits(p, eval_x), axis=-1) == eval_y)
            return carry, (jnp.mean(losses), loss(p, eval_x, eval_y), accuracy)

        (p, *_), history = lax.scan(epoch, (params, zeros, zeros, 0.0), jax.random.split(key, 4))
        return p, history

    return init, fit


def run(variant: str, cache: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant]
    if "warm cache" in variant:
        command += ["--cache", cache]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat: check that it runs")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(VARIANTS[args.child], args.cache)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import machine, table

    repeats = 1 if args.quick else args.repeats
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as cache:
        run("two layers, eval, warm cache", cache)  # fills the cache, not timed
        for _ in range(repeats):  # interleaved: one fresh process per variant per round
            for variant in VARIANTS:
                runs[variant].append(run(variant, cache))
    print(f"Machine: {machine()}\n")
    print(f"A fresh process's first fit, median of {repeats} processes per variant (seconds)\n")
    for variant, samples in runs.items():
        med = lambda k, samples=samples: statistics.median(s[k] for s in samples)
        rows = []
        for name in PHASES:
            rows.append(
                [
                    name,
                    f"{med(name):.3f}",
                    f"{med(name + '/cpu'):.3f}",
                    f"{med(name + '/trace'):.3f}",
                    f"{med(name + '/lower'):.3f}",
                    f"{med(name + '/compile'):.3f}",
                    f"{med(name + '/programs'):.0f}",
                ]
            )
        total = statistics.median(s["net.init"] + s["first fit"] for s in samples)
        cpu = statistics.median(s["net.init/cpu"] + s["first fit/cpu"] for s in samples)
        print(f"{variant}: net.init + first fit = {total:.2f} s ({cpu:.2f} s of CPU time)")
        print(table(["phase", "seconds", "CPU s", "tracing", "lowering", "XLA compile", "programs compiled"], rows))
        print()


if __name__ == "__main__":
    main()
