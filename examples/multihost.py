"""Data-parallel fit across processes: the multi-host recipe, on one machine or on a cluster.

Every process joins the others with ``jax.distributed.initialize``, loads only its own rows of
the digits data, assembles the global arrays with ``jax.make_array_from_process_local_data``
and calls the same ``fit`` with a mesh over every process's devices. Each device shuffles and
batches its own rows, a step moves only gradients between devices, and every process reads the
(replicated) result. With ``--fsdp`` the params and Adam's moments are sharded over the same
devices as well (``fit(..., param_axis="data")``): each process holds only its blocks of them.

    python examples/multihost.py --processes 2          # 2 local processes of this script (CPU)
    python examples/multihost.py --processes 2 --quick  # 3 epochs, for a smoke test
    python examples/multihost.py --processes 2 --fsdp   # FSDP: params and optimizer state sharded
                                                        # over the processes' devices too
    srun --ntasks 4 python examples/multihost.py        # SLURM: a bare jax.distributed.initialize()
                                                        # reads the job (Open MPI, Kubernetes too)
    JAX_COORDINATOR_ADDRESS=host0:1234 python examples/multihost.py --num-processes 4 --process-id I
                                                        # anywhere else: one command per process
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def launch(processes: int, devices: int, passed: list[str]) -> int:
    """Start ``processes`` local copies of this script joined on a free port; their exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    children = [
        subprocess.Popen(
            [sys.executable, __file__, *passed, "--num-processes", str(processes), "--process-id", str(i)], env=env
        )
        for i in range(processes)
    ]
    try:
        codes = [child.wait(timeout=900) for child in children]
    finally:
        for child in children:  # one failed or hung: stop the others rather than leave them waiting
            if child.poll() is None:
                child.kill()
                child.wait()
    return max(codes, key=abs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, help="start this many local processes of this script")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices per local process (with --processes)")
    parser.add_argument("--num-processes", type=int, help="the process count (without a cluster manager)")
    parser.add_argument("--process-id", type=int, help="this process's id, 0 .. count - 1 (likewise)")
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--fsdp", action="store_true", help="shard params and optimizer state over the devices too")
    args = parser.parse_args()
    if args.processes:
        passed = ["--quick"] * args.quick + ["--fsdp"] * args.fsdp
        sys.exit(launch(args.processes, args.devices, passed))

    import jax

    # Before anything else touches JAX: join the other processes. The coordinator's address comes
    # from JAX_COORDINATOR_ADDRESS, or, like the rest, from the cluster manager when both are None.
    try:
        jax.distributed.initialize(num_processes=args.num_processes, process_id=args.process_id)
    except ValueError as error:  # no launcher: JAX says only "coordinator_address should be defined"
        if "coordinator" not in str(error):
            raise
        parser.error(
            "no processes to join: JAX_COORDINATOR_ADDRESS is not set and no cluster manager (SLURM, Open MPI, "
            "Kubernetes) started this script. For a local run, pass --processes N (e.g. --processes 2): this "
            "script then starts N processes of itself on this machine. On a cluster, start it with the "
            "cluster's launcher (srun ...), or set JAX_COORDINATOR_ADDRESS and pass --num-processes and "
            f"--process-id (JAX: {error})"
        )

    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from sklearn.datasets import load_digits

    import funcnet as fn

    me, count = jax.process_index(), jax.process_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))  # every process's devices
    rows = NamedSharding(mesh, PartitionSpec("data"))

    digits = load_digits()  # stands in for a data set every process reads a part of
    order = np.random.default_rng(0).permutation(len(digits.target))
    x_all, y_all = (digits.data[order] / 16).astype(np.float32), digits.target[order].astype(np.int32)
    train, test = 1536, 256  # global rows: they divide over 1, 2, 4, ... 256 devices

    def load(start: int, total: int, data: np.ndarray) -> jax.Array:
        """This process's rows only, placed on its devices as part of the global array."""
        per = total // count
        return jax.make_array_from_process_local_data(rows, data[start + me * per : start + (me + 1) * per])

    x, y = load(0, train, x_all), load(0, train, y_all)
    eval_x, eval_y = load(train, test, x_all), load(train, test, y_all)

    net = fn.serial(fn.Dense(64, fn.tanh, w_init=fn.glorot_normal), fn.Dense(10, fn.linear, w_init=fn.glorot_normal))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 64))
    result = fn.fit(
        net,
        fn.softmax_cross_entropy,
        fn.momentum(0.1, 0.9),
        params,
        (x, y),
        (eval_x, eval_y),
        epochs=3 if args.quick else 30,
        batch_size=64,
        eval_every=1 if args.quick else 5,
        patience=2,
        metrics={"accuracy": fn.accuracy},
        monitor="accuracy",
        mode="max",
        key=jax.random.PRNGKey(1),
        mesh=mesh,
        # FSDP: leaves of 512 elements or more (the 64 x 64 and 64 x 10 weights and their momenta) split
        # over the devices, the biases replicated; the default threshold is 16,384 (help(fn.FSDP))
        param_axis=fn.FSDP("data", min_size=512) if args.fsdp else None,
        progress=not args.quick,  # shown by process 0 only
    )
    # Every process reads the whole (replicated) result; none of them ever held all the data.
    accuracy = np.asarray(result.history.eval_metrics["accuracy"])
    held = sum(s.data.size for leaf in jax.tree_util.tree_leaves(result.params) for s in leaf.addressable_shards)
    total = sum(leaf.size for leaf in jax.tree_util.tree_leaves(result.params))
    print(
        f"process {me} of {count} ({jax.local_device_count()} of {jax.device_count()} devices): "
        f"best test accuracy {np.nanmax(accuracy):.2%} after {int(result.best_epoch)} epochs"
        + (f"; holds {held} of the {total} params" if args.fsdp else ""),
        flush=True,
    )


if __name__ == "__main__":
    main()
