"""Every code block in README.md runs: Python blocks are executed, the bash set-up commands
are the ones .ci/run and the examples use."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
BASH = re.findall(r"```bash\n(.*?)```", README, re.S)


# Sections whose blocks each take over ~10 s on 2 cores and repeat what their own test modules
# check: marked slow, so CI stays within its budget (run them with -m slow).
SLOW_SECTIONS = (
    "Layer state",
    "Attention and the Transformer",
    "Attention for the models people train",
    "A GPT, end to end",
    "Sweeps compile once",
    "Long runs",
    "The optimizer toolbox",
    "Precision",
    "Data larger than memory",
)


def _section(index):
    start = [m.start() for m in re.finditer(r"```python\n", README)][index]
    return re.findall(r"^#+ (.*)$", README[:start], re.M)[-1]


def _slow(index):
    return _section(index).startswith(SLOW_SECTIONS)


@pytest.mark.parametrize(
    "index", [pytest.param(i, marks=[pytest.mark.slow] if _slow(i) else []) for i in range(len(PYTHON))]
)
def test_python_block_runs(index, tmp_path):
    """Run in a fresh interpreter, as a user pasting it would (default JAX settings)."""
    done = subprocess.run(
        [sys.executable, "-c", PYTHON[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, f"README block {index}:\n{PYTHON[index]}\n{done.stderr}"


def test_readme_has_code():
    assert len(PYTHON) >= 4


def test_setup_commands_are_the_ones_ci_and_the_examples_use():
    commands = [line.strip() for block in BASH for line in block.splitlines() if line.strip()]
    assert 'pip install -e ".[test]" && pytest' in commands
    assert (ROOT / ".ci" / "run").read_text().count('pip install -e ".[test]" && pytest') == 1
    run_example = next(c for c in commands if "examples/" in c)
    assert run_example.startswith('pip install -e ".[examples]" && python examples/')
    assert (ROOT / run_example.split("python ")[-1]).is_file()
