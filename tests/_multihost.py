"""Start N local processes joined by ``jax.distributed`` (the tests' helper; no test here).

``launch(args, processes=2, devices=1)`` runs ``python *args`` N times on this machine, each
with ``devices`` forced CPU devices and the environment the workers read (``MH_COORDINATOR``
on a free port, ``MH_PROCESSES``, ``MH_PROCESS_ID``, and JAX's own ``JAX_COORDINATOR_ADDRESS``),
waits for all of them, and kills the rest if one exceeds ``timeout`` seconds, so no test
leaves processes behind. Returns one ``subprocess.CompletedProcess`` per process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def environment(devices: int, **extra: str) -> dict[str, str]:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def launch(
    args: list[str], processes: int = 2, devices: int = 1, timeout: float = 240, cwd: Path | None = None
) -> list[subprocess.CompletedProcess[str]]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    running = []
    for i in range(processes):
        env = environment(
            devices,
            MH_COORDINATOR=address,
            MH_PROCESSES=str(processes),
            MH_PROCESS_ID=str(i),
            JAX_COORDINATOR_ADDRESS=address,
            NUM_PROCESSES=str(processes),
            PROCESS_ID=str(i),
        )
        running.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=cwd or ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in running:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in running:  # on a timeout or an error: never leave a process behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def single(
    args: list[str], devices: int, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """One process with ``devices`` forced CPU devices and no distributed runtime."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or ROOT,
        env=environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
