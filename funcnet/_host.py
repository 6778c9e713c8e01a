"""Reading array values on the host when an array may span several processes (private).

Contract, stated once: a ``jax.Array`` whose shards live on other processes' devices (a global
array of a multi-host run) cannot be fetched with ``np.asarray``. Whatever a host needs of
such an array (a range, a flag, the index of a bad row) is computed where the data lives, by
a small compiled reduction whose result is replicated on every device, so every process reads
the same small answer and no process ever holds the global array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["is_global", "reduce_to_host"]


def is_global(value: Any) -> bool:
    """True for a concrete ``jax.Array`` with shards on other processes' devices."""
    return (
        isinstance(value, jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and not value.is_fully_addressable
        and not value.is_fully_replicated
    )


@functools.lru_cache(maxsize=64)
def _replicated_program(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def reduce_to_host(fn: Callable[..., Any], *arrays: Any) -> Any:
    """``fn(*arrays)`` as NumPy, for arrays of which at least one is global (``is_global``):
    compiled where the arrays live with a replicated result, so ``fn`` must return something
    small (a scalar, a flag per row)."""
    sharding = next(a.sharding for a in arrays if is_global(a))
    with jax.ensure_compile_time_eval():  # concrete data inside an outer jit/vmap too
        if isinstance(sharding, NamedSharding):
            return jax.tree_util.tree_map(np.asarray, _replicated_program(fn, sharding.mesh)(*arrays))
        # another kind of sharding: gather explicitly (every process receives the whole array)
        from jax.experimental import multihost_utils

        gathered = [multihost_utils.process_allgather(a, tiled=True) if is_global(a) else a for a in arrays]
        return jax.tree_util.tree_map(np.asarray, fn(*gathered))
