"""Data-parallel fit on 1, 2 and 4 forced host devices, workload B, vs the unsharded fit.

Workload B: synthetic 8,192 x 512, 512 -> 1024 tanh -> 1024 tanh -> 10, softmax CE,
momentum, batch 256, 1 epoch per run; steps per second, median of interleaved rounds. On
a 2-core machine forced devices share the same cores, so expect no speed-up: the figure is
the overhead of the sharded program (target <= 1.2x at 1 device).

    python benchmarks/bench_shard.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(devices: int, rounds: int, rows: int) -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import funcnet as fn

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, 512)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, rows).astype(np.int32))
    net = fn.serial(
        fn.Dense(1024, fn.tanh, w_init=fn.glorot_normal),
        fn.Dense(1024, fn.tanh, w_init=fn.glorot_normal),
        fn.Dense(10, fn.linear, w_init=fn.glorot_normal),
    )
    key = jax.random.PRNGKey(0)
    _, params = net.init(key, (-1, 512))
    optimizer = fn.momentum(0.01)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    runs = {"unsharded": {}, "sharded": {"mesh": mesh}}
    times = {name: [] for name in runs}
    for kw in runs.values():  # compile
        jax.block_until_ready(
            fn.fit(
                net, fn.softmax_cross_entropy, optimizer, params, (x, y), epochs=1, batch_size=256, key=key, **kw
            ).params
        )
    for _ in range(rounds):
        for name, kw in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(
                fn.fit(
                    net, fn.softmax_cross_entropy, optimizer, params, (x, y), epochs=1, batch_size=256, key=key, **kw
                ).params
            )
            times[name].append(time.perf_counter() - start)
    steps = rows // 256
    print(json.dumps({name: steps / float(np.median(t)) for name, t in times.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rounds, args.rows)
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for devices in (1, 2, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [
                sys.executable,
                os.path.join(here, "bench_shard.py"),
                "--child",
                str(devices),
                "--rounds",
                str(args.rounds),
                "--rows",
                str(args.rows),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rates = json.loads(out.strip().splitlines()[-1])
        rows.append((devices, rates["unsharded"], rates["sharded"]))
    sys.path.insert(0, here)
    from _timing import machine, table

    print(f"Machine: {machine()} (devices forced with XLA_FLAGS)")
    print("Workload B: 8,192 x 512, 512-1024-1024-10, batch 256; steps per second (median)\n")
    print(
        table(
            ["devices", "unsharded fit steps/s", "sharded fit steps/s", "time overhead (x unsharded)"],
            [[d, f"{u:.1f}", f"{s:.1f}", f"{u / s:.2f}"] for d, u, s in rows],
        )
    )


if __name__ == "__main__":
    main()
