"""Test-wide JAX settings: float64 available, and silent promotion turned into errors.

As in Equinox's test suite, strict dtype promotion and rank promotion="raise" make any
silent broadcast or float32/float64 mix inside funcnet fail loudly here.

The tests compile with XLA's backend optimisations off (``--xla_backend_optimization_level=0``),
which cuts the suite's compile time by a third: they check what the programs compute, which
XLA's optimisations preserve. Examples run by tests inherit it; the README's blocks run as a
user pastes them, and the benchmarks as users run fits, fully optimised.
``FUNCNET_TEST_OPTIMIZED=1 pytest`` runs every test fully optimised too.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("FUNCNET_TEST_OPTIMIZED"):  # before JAX starts; subprocesses inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax
from hypothesis import settings

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
