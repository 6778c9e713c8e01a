"""Layer state: the non-trained variables of a network (BatchNorm's running statistics).

Contract, stated once:

* State lives inside the params tree, as typed subtrees (``BatchNormStats``), so whatever
  carries params carries state too: ``fit``'s loop, early stopping's best params, divergence
  rollback, checkpoints and resume, ``vmap`` ensembles, mesh replication. A state type is a
  ``NamedTuple`` registered with ``register_state`` (``normalization.py`` registers
  ``BatchNormStats``).
* ``split_state(params) -> (trainable, state)``: two trees of the params' structure, each with
  ``None`` where the other holds something. ``trainable`` has ``None`` in place of every state
  subtree, and is what an optimizer may see (weight decay must never shrink a running
  variance); ``state`` has the state subtrees and ``None`` in place of every other leaf.
  ``merge_state(trainable, state)`` puts them back together, so
  ``merge_state(*split_state(params)) == params``. A network without state splits into
  ``(params, tree of Nones)``: its trainable part *is* its params.
* Training mode (``funcnet.train_apply``, in ``layers.py``) returns new params whose state
  subtrees are updated and whose trainable leaves are the ones it was given.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["has_state", "is_state", "merge_state", "register_state", "split_state", "state_count"]

Params = Any

_STATE_TYPES: set[type] = set()


def register_state(cls: type) -> type:
    """Class decorator: ``cls`` (a ``NamedTuple``) is layer state, never trained."""
    _STATE_TYPES.add(cls)
    return cls


def is_state(node: Any) -> bool:
    """True for a state subtree (an instance of a registered state type)."""
    return type(node) in _STATE_TYPES


def has_state(params: Params) -> bool:
    """True when ``params`` holds a state subtree anywhere."""
    return any(is_state(node) for node in jax.tree_util.tree_leaves(params, is_leaf=is_state))


def state_count(params: Params) -> int:
    """The number of state scalars in ``params`` (running statistics)."""
    state = split_state(params)[1]
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(state)))


def split_state(params: Params) -> tuple[Params, Params]:
    """``(trainable, state)``: complementary trees of ``params``'s structure (see the module).

    Args:
      params: a network's params, layer state (``BatchNormStats``) included.

    Returns:
      ``(trainable, state)``: ``trainable`` has ``None`` in place of each state subtree (what an
      optimizer may see), ``state`` the state subtrees and ``None`` for every other leaf.
    """
    trainable = jax.tree_util.tree_map(lambda n: None if is_state(n) else n, params, is_leaf=is_state)
    state = jax.tree_util.tree_map(lambda n: n if is_state(n) else None, params, is_leaf=is_state)
    return trainable, state


def merge_state(trainable: Params, state: Params) -> Params:
    """The params ``split_state`` split: ``trainable`` with ``state``'s subtrees in its ``None`` places.

    Args:
      trainable: the first tree of ``split_state`` (updated by an optimizer, say).
      state: the second, of the same structure.

    Returns:
      The params, so ``merge_state(*split_state(params)) == params``.
    """
    try:
        return jax.tree_util.tree_map(
            lambda t, s: s if t is None else t, trainable, state, is_leaf=lambda n: n is None or is_state(n)
        )
    except ValueError as error:
        raise TypeError(
            f"merge_state: trainable and state must be the two halves split_state made of one "
            f"params tree, but their structures differ: {error}"
        ) from error
