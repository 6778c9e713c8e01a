"""Every example runs, on its tiny --quick configuration, as a user would run it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


# Examples whose quick run takes over ~10 s on 2 cores and whose parts have their own tests: slow,
# so CI stays within its budget (run them with -m slow).
SLOW = ("char_lm.py", "char_transformer.py", "digits_cnn.py", "digits_resnet.py", "gpt.py", "regression.py")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(e, marks=[pytest.mark.slow] if e in SLOW else [])
        for e in EXAMPLES
        if e not in ("long_run.py", "multihost.py")  # own tests below
    ],
)
def test_example_runs_quick(name, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / name)]
    if name != "custom_op.py":
        args.append("--quick")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), "an example must print its result"


def test_long_run_resumes_on_a_second_invocation(tmp_path):
    """The second invocation finds the first one's checkpoints and returns the same result."""
    args = [sys.executable, str(ROOT / "examples" / "long_run.py"), "--quick"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first, second = (
        subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)
    )
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "starting afresh" in first.stdout and "resuming" in second.stdout
    result = lambda out: out.strip().splitlines()[-1].split("; ")[-1]
    assert result(first.stdout) == result(second.stdout)


@pytest.mark.slow
def test_multihost_starts_two_processes_that_agree(tmp_path):
    """``--processes 2``: two local processes joined by jax.distributed; both read the same result."""
    args = [sys.executable, str(ROOT / "examples" / "multihost.py"), "--processes", "2", "--quick"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("process "))
    assert [line.split(":")[0] for line in lines] == [
        "process 0 of 2 (1 of 2 devices)",
        "process 1 of 2 (1 of 2 devices)",
    ]
    assert lines[0].split(":")[1] == lines[1].split(":")[1]


@pytest.mark.slow
def test_multihost_fsdp_shards_the_params_over_the_two_processes(tmp_path):
    """``--fsdp``: the same fit with params and optimizer state sharded; each process holds about half."""
    args = [sys.executable, str(ROOT / "examples" / "multihost.py"), "--processes", "2", "--quick", "--fsdp"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("process "))
    assert len(lines) == 2 and lines[0].split(":")[1] == lines[1].split(":")[1]
    held, total = (int(n) for n in re.search(r"holds (\d+) of the (\d+) params", lines[0]).groups())
    assert total == 4810 and held < total * 0.55


def test_example_list_is_complete():
    assert {
        "digits.py",
        "regression.py",
        "ensemble.py",
        "custom_op.py",
        "long_run.py",
        "char_lm.py",
        "char_transformer.py",
    } <= set(EXAMPLES)
