"""What compiling costs in memory on XLA's CPU backend: the evidence behind ``bench_gpt.py``'s peak.

Each row is a fresh process that builds its inputs, runs one small op (the backend's own start-up),
then compiles one program with ``jax.jit(f).lower(...).compile(options)``; reported: what the
compile added to the process's peak (``VmHWM`` after, minus the resident set before), and what
stays resident afterwards. The programs:

* a chain of ``n`` elementwise kernels (``tanh(x @ w) * c_i + sin(x)``: the matmul keeps each
  step its own kernel), with ``n`` different constants ``c_i`` (``n`` distinct kernels) or one
  constant (XLA compiles the kernel once and reuses it);
* the GPT of ``bench_gpt.py`` (nanoGPT's CPU configuration): ``jax.jit(fn.train_step(...))`` with
  the example's optimizer, and the same model and training written in plain JAX with optax
  (``bench_gpt.plain_jax``, where optax is installed): each compile, and the median time per step
  over 30 steps;

each with XLA's default kernel emitters and with ``{"xla_cpu_use_fusion_emitters": False}`` (the
older emitters, a per-``jit`` compiler option).

    python benchmarks/bench_compile_memory.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from _memory import status_mb

CHILD = os.environ.get("BENCH_COMPILE_CHILD", "")
LEGACY = {"xla_cpu_use_fusion_emitters": False}


def child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jnp.ones(3).block_until_ready()  # the backend starts before the measurement
    if spec["program"] in ("gpt", "plain"):
        os.environ["BENCH_GPT_CHILD"] = "step"  # bench_gpt without torch
        import bench_gpt

        import funcnet as fn

        config = dict(vocab=103, features=128, heads=4, layers=4, length=64, batch=12, iterations=2000, seed=0)
        net, params, optimizer = bench_gpt.funcnet_parts(config)
        x = jnp.asarray(np.random.default_rng(0).integers(0, 103, (12, 64)), jnp.int32)
        if spec["program"] == "gpt":
            step = jax.jit(fn.train_step(net, fn.softmax_cross_entropy, optimizer))
            args: tuple = (params, optimizer.init(params), x, x, None)
        else:  # the same model and training in plain JAX + optax, from the same weights
            step, plain_params, state = bench_gpt.plain_jax(config, bench_gpt.torch_layout(params))
            args = (plain_params, state, x, x)
        lowered = step.lower(*args)
    else:
        n, distinct = spec["n"], spec["program"] == "distinct"
        w = jnp.ones((64, 64)) / 64

        def chain(x: jax.Array) -> jax.Array:
            for i in range(n):
                x = jnp.tanh(x @ w) * (1.0 + i / n if distinct else 2.0) + jnp.sin(x)
            return x

        lowered = jax.jit(chain).lower(jnp.ones((64, 64)))
    before = status_mb("VmRSS")
    compiled = lowered.compile(LEGACY if spec["legacy"] else None)
    result = {"compile_mb": status_mb("VmHWM") - before, "kept_mb": status_mb("VmRSS") - before}
    if spec["program"] in ("gpt", "plain"):
        times = []
        for _ in range(30):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            args = (out[0], out[1], *args[2:])  # the new params and state (the plain step donates its)
            times.append(time.perf_counter() - start)
        result["ms_per_step"] = 1e3 * float(np.median(times[5:]))
    return result


def measure(spec: dict) -> dict:
    env = {**os.environ, "BENCH_COMPILE_CHILD": json.dumps(spec)}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    from _timing import machine, table

    rows = []
    names = {"gpt": "GPT: funcnet train_step", "plain": "GPT: plain JAX + optax step (optax installed)"}
    programs = [("distinct", (1, 25, 50, 100)), ("identical", (100,)), ("gpt", (None,))]
    if importlib.util.find_spec("optax") is not None:
        programs.append(("plain", (None,)))
    for program, sizes in programs:
        for n in sizes:
            results = [measure({"program": program, "n": n, "legacy": legacy}) for legacy in (False, True)]
            cells = [names.get(program, f"{n} {program} kernels")]
            for r in results:
                cells += [f"{r['compile_mb']:.0f}", f"{r['kept_mb']:.0f}"]
            cells.append(" / ".join(f"{r['ms_per_step']:.1f}" for r in results) if program in names else "")
            rows.append(cells)
    header = [
        "program",
        "compile adds MB (default emitters)",
        "stays MB",
        "compile adds MB (fusion emitters off)",
        "stays MB",
        "ms / step (default / off)",
    ]
    print(f"Machine: {machine()}. One fresh process per cell; VmHWM after the compile minus VmRSS before.\n")
    print(table(header, rows))


if __name__ == "__main__":
    if CHILD:
        print(json.dumps(child(json.loads(CHILD))))
    else:
        main()
