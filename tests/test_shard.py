"""Data-parallel fit on 1, 2 and 4 forced CPU devices: runs tests/_shard_cases.py in a
subprocess, because the device count is fixed when JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = HERE / "_shard_cases.py"


def _run_cases(marks):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-m",
            marks,
            "-p",
            "no:cacheprovider",
            str(HERE / "_shard_cases.py"),
        ],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_sharded_cases_pass_on_four_cpu_devices():
    _run_cases("not slow")


@pytest.mark.slow
def test_slow_sharded_cases_pass_on_four_cpu_devices():
    _run_cases("slow")
