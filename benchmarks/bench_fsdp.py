"""FSDP against data parallelism on 2 and 4 forced host devices: memory per device and step time.

Workload: an MLP 1024 -> 2048 -> 2048 -> 2048 -> 1024 (tanh), mean squared error, Adam: 12.6 M
float32 params, 144 MiB of state with Adam's two moments (the issue asks for at least 64 MiB). For each
device count ``n`` (a subprocess each: the count is fixed when JAX starts) the same
``train_step`` is compiled twice over a mesh of ``n`` devices, data parallel (params and Adam's
moments replicated) and FSDP (``param_axis``: every weight split over the devices; the biases,
under the rule's 16,384 elements, replicated), and the script reports:

* the state each device holds: the bytes of the params' and optimizer state's arrays on device 0
  (``addressable_shards``), against the bound ``replicated / n + the replicated small leaves``;
* the compiled program's ``memory_analysis()`` on one device: arguments (the state and the
  batch), outputs, and temporaries (the gathered weights and full gradients XLA schedules);
* the time of a step, median of interleaved rounds of ``STEPS`` steps each, and the ratio
  FSDP / data parallel.

On a 2-core CPU the forced devices share the same cores and "collectives" are memory copies, so
the time ratio is the price of the gathers and of the partitioned program, not a speed-up.

    python benchmarks/bench_fsdp.py            # n = 2 and 4, a markdown table
    python benchmarks/bench_fsdp.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WIDTHS = (1024, 2048, 2048, 2048, 1024)
BATCH, STEPS = 64, 5


def child(devices: int, rounds: int) -> None:
    import time

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import funcnet as fn

    net = fn.serial(*(fn.Dense(w, fn.tanh) for w in WIDTHS[1:-1]), fn.Dense(WIDTHS[-1], fn.linear))
    params = net.init(jax.random.PRNGKey(0), (-1, WIDTHS[0]))[1]
    optimizer = fn.adam(1e-4)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("fsdp",))
    rng = np.random.default_rng(0)
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    x = jax.device_put(rng.standard_normal((BATCH, WIDTHS[0])).astype(np.float32), rows)
    y = jax.device_put(rng.standard_normal((BATCH, WIDTHS[-1])).astype(np.float32), rows)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "data parallel": jax.device_put((params, optimizer.init(params)), replicated),
        "FSDP": (fn.shard_params(params, mesh, "fsdp"), fn.shard_params(optimizer.init(params), mesh, "fsdp")),
    }
    steps = {
        "data parallel": jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer, mesh=mesh, data_axis="fsdp")),
        "FSDP": jax.jit(fn.train_step(net, fn.mean_squared_error, optimizer, mesh=mesh, param_axis="fsdp")),
    }
    device = jax.devices()[0]
    report: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        tree = state[name]
        held = sum(
            s.data.nbytes
            for leaf in jax.tree_util.tree_leaves(tree)
            for s in leaf.addressable_shards
            if s.device == device
        )
        small = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree) if leaf.is_fully_replicated)
        memory = step.lower(*tree, x, y, None).compile().memory_analysis()
        report[name] = {
            "held": held,
            "small": small,
            "total": sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)),
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
        }
        out = step(*tree, x, y, None)  # compile and check the outputs keep the placement
        placed = zip(jax.tree_util.tree_leaves(out[:2]), jax.tree_util.tree_leaves(tree), strict=True)
        assert all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in placed), name
    times: dict[str, list[float]] = {name: [] for name in steps}

    def run(name: str) -> None:
        params, opt_state = state[name]
        for _ in range(STEPS):
            params, opt_state, loss = steps[name](params, opt_state, x, y, None)
        jax.block_until_ready(loss)

    for name in steps:
        run(name)  # warm
    for _ in range(rounds):
        for name in steps:  # interleaved, so a slow moment of the machine hits both
            start = time.perf_counter()
            run(name)
            times[name].append((time.perf_counter() - start) / STEPS)
    for name in steps:
        report[name]["step"] = float(np.median(times[name]))
    print(json.dumps(report))


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from _timing import table

    rows = []
    verdicts = []
    for n in (2, 4):
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        rounds = 3 if args.quick else args.rounds
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--rounds", str(rounds)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(done.stdout.strip().splitlines()[-1])
        dp, sharded = report["data parallel"], report["FSDP"]
        bound = (dp["held"] - sharded["small"]) / n + sharded["small"]
        verdicts.append(
            f"n={n}: FSDP state per device {mib(sharded['held'])} <= bound {mib(bound)}: {sharded['held'] <= bound}"
        )
        for name, r in report.items():
            rows.append(
                [
                    n,
                    name,
                    mib(r["total"]),
                    mib(r["held"]),
                    mib(r["arguments"]),
                    mib(r["outputs"]),
                    mib(r["temporaries"]),
                    f"{r['step'] * 1e3:.1f} ms",
                    f"{r['step'] / dp['step']:.2f}x",
                ]
            )
    headers = [
        "devices",
        "layout",
        "state (all devices' view)",
        "state held per device",
        "program: arguments",
        "outputs",
        "temporaries",
        "step (median)",
        "vs data parallel",
    ]
    from _timing import machine

    print(f"bench_fsdp: {machine()}; MLP {' -> '.join(map(str, WIDTHS))}, Adam, batch {BATCH}")
    print(table(headers, rows))
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
