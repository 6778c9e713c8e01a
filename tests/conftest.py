"""Test-wide JAX settings: float64 available, and silent promotion turned into errors.

As in Equinox's test suite, strict dtype promotion and rank promotion="raise" make any
silent broadcast or float32/float64 mix inside funcnet fail loudly here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# CI keeps hypothesis short; `HYPOTHESIS_PROFILE=long pytest` explores more.
settings.register_profile("ci", max_examples=15, deadline=None)
settings.register_profile("long", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/book_reference.py
