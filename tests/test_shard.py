"""Data-parallel fit on 1, 2 and 4 forced CPU devices: runs tests/_shard_cases.py in a
subprocess, because the device count is fixed when JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = HERE / "_shard_cases.py"


def run_on_four_devices(cases: Path, marks: str, timeout: int = 600) -> None:
    """Run the tests marked ``marks`` of the pytest file ``cases`` in a subprocess with 4 forced CPU
    devices (``tests/test_fsdp.py`` runs its cases so too); they must all pass."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    options = ["-q", "-n", "0", "-p", "no:randomly", "-p", "no:cacheprovider", "-m", marks]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, str(cases)],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def _run_cases(marks):
    run_on_four_devices(CASES, marks)


def test_sharded_cases_pass_on_four_cpu_devices():
    _run_cases("not slow")


@pytest.mark.slow
def test_slow_sharded_cases_pass_on_four_cpu_devices():
    _run_cases("slow")
