"""Test-wide JAX settings: float64 available, and silent promotion turned into errors.

As in Equinox's test suite, strict dtype promotion and rank promotion="raise" make any
silent broadcast or float32/float64 mix inside funcnet fail loudly here.

The tests compile with XLA's backend optimisations off (``--xla_backend_optimization_level=0``,
which cut the suite's compile time by a third) and, on the CPU, with the classic loop emitter
in place of XLA's fusion emitters (``--xla_cpu_use_fusion_emitters=false``, which cut it by
about another third), each program's code generated in one piece
(``--xla_cpu_parallel_codegen_split_count=1``: the two test workers already keep both cores
busy, and splitting small programs for parallel codegen made three modules 8-15% slower): they
check what the programs compute, which none of these changes beyond rounding. Examples run by
tests inherit all three; the README's blocks run as a user pastes them, and the benchmarks as
users run fits, fully optimised.
``FUNCNET_TEST_OPTIMIZED=1 pytest`` runs every test fully optimised too.

The session's processes (the test workers, and the examples and multi-process tests they
start) share one persistent compilation cache in a fresh temporary directory, removed at the
end: a program compiled by one is loaded by the others (op-by-op primitives, equal fits in
different modules), which cut a sample of four modules from 103 s to 84 s. It starts empty, so
a test never sees a program from an earlier session; ``JAX_COMPILATION_CACHE_DIR`` set
beforehand is used instead.

A test that compares two different programs bit for bit (the streamed fit against the device
one) calls ``with_fusion_emitters(request)`` first: the loop emitter may round a fused
expression differently in two programs where XLA's fusion emitters, as users compile, do not,
so that test reruns itself in a fresh process with the fusion emitters on.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_LOOP_EMITTER = "--xla_cpu_use_fusion_emitters=false"
if not os.environ.get("FUNCNET_TEST_OPTIMIZED"):  # before JAX starts; subprocesses inherit it
    flags = "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1"
    if not os.environ.get("FUNCNET_TEST_FUSION_EMITTERS"):
        flags += f" {_LOOP_EMITTER}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # one cache for the session's processes, then gone
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="funcnet-test-xla-cache-")
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Tests check the math: float32 matmuls in full float32 on GPUs too (their default is TF32, ~1e-3).
jax.config.update("jax_default_matmul_precision", "highest")

# CI keeps hypothesis short; `HYPOTHESIS_PROFILE=long pytest` explores more.
settings.register_profile("ci", max_examples=15, deadline=None)
settings.register_profile("long", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/book_reference.py


def with_fusion_emitters(request) -> bool:
    """Rerun the calling test in a fresh pytest process with XLA's fusion emitters on (as users
    compile) and return True once it passed there; return False in that process (and whenever the
    emitters are on already), where the test body runs."""
    if _LOOP_EMITTER not in os.environ.get("XLA_FLAGS", "").split():
        return False
    import subprocess

    env = dict(os.environ, FUNCNET_TEST_FUSION_EMITTERS="1")
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if f != _LOOP_EMITTER)
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", request.node.nodeid]
    done = subprocess.run(command, env=env, cwd=request.config.rootpath, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return True
