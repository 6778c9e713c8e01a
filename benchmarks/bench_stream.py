"""Streaming host data to the device (fit(..., stream=True)) against the device-resident fit.

Throughput: synthetic 65,536 x 256 float32, Dense(256, relu) then Dense(10), softmax CE,
momentum 0.9 lr 0.01, batch 256, 3 epochs. Variants, timed in alternation after a compiling
round (both give the same params bit for bit, checked first):
  device-resident:  fit(..., (x, y)) with x, y jax.Arrays already on the device
  streamed:         fit(..., (x, y), stream=True) with x, y NumPy arrays on the host
Target: streamed >= 0.8x the device-resident fit's speed.

Larger than memory: one epoch of a 3 GiB float32 np.memmap (786,432 x 1,024; labels in memory),
Dense(10) softmax CE, sgd, batch 256, in a fresh process, the file first dropped from the page
cache (posix_fadvise DONTNEED), so the rows come from the disk. Reported: wall time (compilation
included, and an estimate of it: the same fit's programs compiled for a 4,096-row array), the
time the training loop waited for rows, the peak RssAnon of the process (sampled every 2 ms;
page cache does not count), the rows' bytes per second, and what the process read from storage
(/proc/self/io). The file is deleted afterwards.

Memory of the model: 3 x Dense(4,096, tanh) + Dense(10) on 4,096 float32 features, momentum: a
384 MiB training state (192 MiB of params, as much again of velocity), 64 rows in batches of 8,
2 epochs, each in a fresh process after a compiling fit. Reported: the peak RssAnon above the
process's before the fit (which holds the caller's params and the data), in MiB and in copies
of the training state, the device-resident fit and the streamed one side by side, without and
with eval data; the streamed fit runs segments of 2 batches, so an epoch spans 4 (every
donation path runs). For the streamed fit, the bytes XLA's ``memory_analysis()`` reports its
segment program aliasing (outputs written into donated inputs). Target: streamed peak <= 1.1x
the device-resident fit's.

    python benchmarks/bench_stream.py           # the tables (needs ~3.1 GiB of free disk)
    python benchmarks/bench_stream.py --quick   # tiny sizes, to check it runs
    python benchmarks/bench_stream.py --skip-memmap            # only the throughput table
    python benchmarks/bench_stream.py --only-state             # only the model-memory table
    python benchmarks/bench_stream.py --memmap-rows 131072     # a 0.5 GiB memmap instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from _memory import status_mb
from _timing import machine, table

import funcnet as fn
from funcnet.train import stream


def anon_bytes() -> int:
    try:
        return round(status_mb("RssAnon") * 2**20)
    except (OSError, KeyError):
        return 0


def storage_read_bytes() -> int:
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return -1


def throughput(quick: bool) -> None:
    rows, rounds, epochs = (4096, 2, 2) if quick else (65_536, 5, 3)
    rng = np.random.default_rng(0)
    host_x = rng.standard_normal((rows, 256)).astype(np.float32)
    host_y = rng.integers(0, 10, rows).astype(np.int32)
    device_x, device_y = jnp.asarray(host_x), jnp.asarray(host_y)
    net = fn.serial(fn.Dense(256, fn.relu), fn.Dense(10, fn.linear))
    key = jax.random.PRNGKey(0)
    _, params = net.init(key, (-1, 256))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)

    def run(data: Any, streamed: bool) -> Any:
        result = fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.momentum(0.01, 0.9),
            params,
            data,
            epochs=epochs,
            batch_size=256,
            key=key,
            stream=streamed,
        )
        return result.params

    variants = {
        "device-resident": lambda: run((device_x, device_y), False),
        "streamed": lambda: run((host_x, host_y), True),
    }
    first = {name: jax.block_until_ready(variant()) for name, variant in variants.items()}  # compiles
    for variant in variants.values():  # a warm round: first-call costs (allocations, threads) left out
        jax.block_until_ready(variant())
    pairs = list(
        zip(
            jax.tree_util.tree_leaves(first["device-resident"]),
            jax.tree_util.tree_leaves(first["streamed"]),
            strict=True,
        )
    )
    same: object = all(np.array_equal(a, b) for a, b in pairs)
    if not same:  # say so in the table (and on stderr) rather than time different computations silently
        worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
        same = f"NO (largest difference {worst:.3g})"
        print("bench_stream: the streamed fit's params differ from the device-resident fit's", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(variant())
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    base = medians["device-resident"]
    print(
        f"Throughput: {rows:,} x 256 float32, Dense(256, relu) + Dense(10), batch 256, {epochs} epochs, "
        f"median of {rounds} alternated rounds; params equal bit for bit: {same}"
    )
    print(
        table(
            ["variant", "s per fit (median)", "rows/s", "speed vs device-resident"],
            [[name, f"{t:.3f}", f"{rows * epochs / t:,.0f}", f"{base / t:.3f}x"] for name, t in medians.items()],
        )
    )


def memmap_child(path: str, rows: int, features: int) -> None:
    """One streamed epoch of the memmap at ``path``, measured in this (fresh) process."""
    x = np.memmap(path, np.float32, "r", shape=(rows, features))
    y = (np.arange(rows, dtype=np.int64) * 7919 % 10).astype(np.int32)
    net = fn.serial(fn.Dense(10, fn.linear))
    _, params = net.init(jax.random.PRNGKey(0), (-1, features))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)

    def fit(data: Any) -> Any:
        return fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.sgd(0.01),
            params,
            data,
            epochs=1,
            batch_size=256,
            key=jax.random.PRNGKey(1),
            stream=True,
        )

    # the same programs for a 4,096-row array in memory: about what compiling costs the epoch below
    start = time.perf_counter()
    jax.block_until_ready(fit((np.zeros((4096, features), np.float32), y[:4096])))
    compiling = time.perf_counter() - start
    waited = [0.0]  # seconds the training loop spent waiting for rows (instrumentation, benchmark only)
    next_job = stream._Feed.next

    def timed_next(feed: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return next_job(feed, *args)
        finally:
            waited[0] += time.perf_counter() - start

    stream._Feed.next = timed_next  # type: ignore[method-assign, assignment]
    base, peak, done = anon_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    read_before = storage_read_bytes()
    watcher.start()
    start = time.perf_counter()
    result = jax.block_until_ready(fit((x, y)))
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    report = {
        "seconds": seconds,
        "waited": waited[0],
        "compiling": compiling,
        "base_anon": base,
        "peak_anon": max(peak[0], anon_bytes()),
        "storage_read": storage_read_bytes() - read_before if read_before >= 0 else -1,
        "bytes": rows * features * 4,
        "train_loss": float(result.history.train_loss[0]),
    }
    print(json.dumps(report))


def larger_than_memory(quick: bool, rows: int | None) -> None:
    features, chunk_rows = 1_024, 4_096
    rows = rows or (16_384 if quick else 786_432)
    rows -= rows % chunk_rows
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((chunk_rows, features)).astype(np.float32)
    directory = Path(tempfile.mkdtemp(prefix="funcnet-bench-stream-", dir=os.environ.get("FUNCNET_BENCH_DIR")))
    path = directory / "x.f32"
    try:
        with open(path, "wb") as file:
            for i in range(rows // chunk_rows):
                (chunk + np.float32(i % 97) * np.float32(1e-3)).tofile(file)
            file.flush()
            os.fsync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read it from the disk
        del chunk
        done = subprocess.run(
            [sys.executable, __file__, "--memmap-child", str(path), str(rows), str(features)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"bench_stream: the memmap epoch failed:\n{done.stderr[-4000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()
    gib = report["bytes"] / 2**30
    print(
        f"\nLarger than memory: one epoch of a {gib:.2f} GiB float32 np.memmap ({rows:,} x {features:,}), "
        "Dense(10), batch 256, streamed from a cold page cache; the file is deleted"
    )
    print(
        table(
            [
                "epoch s (incl. compile)",
                "of which waiting for rows",
                "compiling (est.)",
                "peak RssAnon",
                "RssAnon before fit",
                "rows' bytes/s (less compiling)",
                "read from storage",
            ],
            [
                [
                    f"{report['seconds']:.1f}",
                    f"{report['waited']:.1f}",
                    f"{report['compiling']:.1f}",
                    f"{report['peak_anon'] / 2**20:,.0f} MiB",
                    f"{report['base_anon'] / 2**20:,.0f} MiB",
                    f"{report['bytes'] / report['seconds'] / 2**20:,.0f} "
                    f"({report['bytes'] / max(report['seconds'] - report['compiling'], 1e-9) / 2**20:,.0f}) MiB/s",
                    "n/a" if report["storage_read"] < 0 else f"{report['storage_read'] / 2**30:.2f} GiB",
                ]
            ],
        )
    )
    print(f"(bound: peak RssAnon under 1 GiB; train loss {report['train_loss']:.4f})")


def state_child(variant: str, width: int, with_eval: bool) -> None:
    """One fit of the model-memory table, measured in this (fresh) process."""
    import ctypes
    import gc

    rows, batch = 64, 8
    rng = np.random.default_rng(0)
    host_x = rng.standard_normal((rows, width)).astype(np.float32)
    host_y = rng.integers(0, 10, rows).astype(np.int32)
    net = fn.serial(*[fn.Dense(width, fn.tanh, dtype=np.float32) for _ in range(3)], fn.Dense(10, fn.linear))
    _, params = net.init(jax.random.PRNGKey(0), (-1, width))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    params_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    streamed = variant == "streamed"
    data = (host_x, host_y) if streamed else (jnp.asarray(host_x), jnp.asarray(host_y))
    stream.SEGMENT_BYTES = 2 * batch * (width * 4 + 4)  # 2 batches a segment: 4 segments an epoch
    aliased = [0.0]
    if streamed:  # the segment program's aliasing, as XLA compiled it (captured from the first call)
        steps = stream._steps_jit

        def capture(*args: Any, **kw: Any) -> Any:
            if not aliased[0]:
                shapes = jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a, args
                )
                aliased[0] = steps.lower(*shapes, **kw).compile().memory_analysis().alias_size_in_bytes
            return steps(*args, **kw)

        stream._steps_jit = capture

    def fit() -> Any:
        return fn.fit(
            net,
            fn.softmax_cross_entropy,
            fn.momentum(0.01, 0.9),
            params,
            data,
            data if with_eval else None,
            epochs=2,
            batch_size=batch,
            eval_every=1,
            key=jax.random.PRNGKey(1),
            stream=streamed,
        )

    jax.block_until_ready(fit())  # compiles; what is measured below is the buffers of a warm fit
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: the base is what is held
    base, peak, done = anon_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = jax.block_until_ready(fit())
    done.set()
    watcher.join()
    report = {
        "state": 2 * params_bytes,  # params and momentum's velocity
        "above_base": max(peak[0], anon_bytes()) - base,
        "aliased": aliased[0],
        "loss": float(np.asarray(result.history.train_loss)[-1]),
    }
    print(json.dumps(report))


def state_memory(quick: bool) -> None:
    width = 512 if quick else 4096
    rows, reports = [], {}
    for with_eval in (False, True):
        for variant in ("device-resident", "streamed"):
            done = subprocess.run(
                [sys.executable, __file__, "--state-child", variant, str(width), str(int(with_eval))],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"bench_stream: the {variant} fit failed:\n{done.stderr[-4000:]}")
            reports[variant, with_eval] = report = json.loads(done.stdout.strip().splitlines()[-1])
            base = reports["device-resident", with_eval]["above_base"]
            rows.append(
                [
                    variant,
                    "yes" if with_eval else "no",
                    f"{report['above_base'] / 2**20:,.0f}",
                    f"{report['above_base'] / report['state']:.2f}",
                    f"{report['above_base'] / base:.2f}x",
                    f"{report['aliased'] / 2**20:,.0f}" if variant == "streamed" else "",
                ]
            )
        same = reports["device-resident", with_eval]["loss"] == reports["streamed", with_eval]["loss"]
        if not same:
            print("bench_stream: the streamed fit's training loss differs from the device fit's", file=sys.stderr)
    state = reports["device-resident", False]["state"]
    print(
        f"\nMemory of the model: 3 x Dense({width:,}, tanh) + Dense(10), momentum, a {state / 2**20:,.0f} MiB "
        "training state, 64 rows in batches of 8, 2 epochs (streamed: 4 segments an epoch); peak RssAnon "
        "above the process's before the fit, a warm fit in a fresh process"
    )
    print(
        table(
            [
                "fit",
                "eval data",
                "peak above base MiB",
                "copies of the state",
                "vs device-resident",
                "segment program aliased MiB",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--skip-memmap", action="store_true", help="only the throughput table")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memmap epoch")
    parser.add_argument("--memmap-rows", type=int, help="rows of the memmap (default 786,432: 3 GiB)")
    parser.add_argument("--only-state", action="store_true", help="only the model-memory table")
    parser.add_argument("--memmap-child", nargs=3, metavar=("PATH", "ROWS", "FEATURES"), help=argparse.SUPPRESS)
    parser.add_argument("--state-child", nargs=3, metavar=("VARIANT", "WIDTH", "EVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.state_child:
        variant, width, with_eval = args.state_child
        state_child(variant, int(width), bool(int(with_eval)))
        return
    if args.memmap_child:
        path, rows, features = args.memmap_child
        memmap_child(path, int(rows), int(features))
        return
    print(f"Machine: {machine()}\n")
    if args.only_state:
        state_memory(args.quick)
        return
    if not args.skip_throughput:
        throughput(args.quick)
    if not args.skip_memmap:
        larger_than_memory(args.quick, args.memmap_rows)
    state_memory(args.quick)


if __name__ == "__main__":
    main()
