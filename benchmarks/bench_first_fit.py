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

    python benchmarks/bench_first_fit.py           # the table
    python benchmarks/bench_first_fit.py --quick   # one repeat: check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = {"two layers, eval": True, "two layers, no eval": False}
PHASES = ("import funcnet", "build", "net.init", "first fit", "second fit")


def child(with_eval: bool) -> dict[str, Any]:
    """Run the workload in this (fresh) process; return seconds per phase and compile costs."""
    import jax
    import numpy as np
    from jax import monitoring

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


def run(variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat: check that it runs")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(VARIANTS[args.child])))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import machine, table

    repeats = 1 if args.quick else args.repeats
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved: one fresh process per variant per round
        for variant in VARIANTS:
            runs[variant].append(run(variant))
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
