"""Building blocks as values (private): what lets a rebuilt network or optimizer reuse a program.

Contract, stated once:

* funcnet's layers, optimizers and schedules are frozen dataclasses of their constructor's
  arguments (a *spec*); ``Layer.init``/``Layer.apply`` and ``Optimizer.init``/``update`` are
  ``Method(spec, name)`` objects, which call ``spec.<name>`` and compare and hash by the spec's
  value. So equal constructor calls give equal, equally hashed building blocks. A spec may
  narrow that value per method (``method_key``): a layer's ``apply`` does not depend on its
  initializers, so two layers that differ only in those have equal ``apply``s.
* A spec whose fields are pytree *data* (optimizers, schedules: their numbers) is registered as
  a pytree; ``Method`` is a pytree node over its spec. A layer spec is not registered: it is a
  single leaf, all of it static (its numbers decide shapes).
* ``partition(tree)`` splits any such tree (a network, a loss, an optimizer, a dict of metrics)
  into ``data``, the number leaves, which a compiled program takes as traced arguments, and a
  hashable ``Static`` remainder, which selects the program. ``combine`` inverts it and checks
  that it was given one number per place. Closures a user wrote are static leaves that hash by
  identity: they compile once per object. A callable that is itself a pytree
  (``jax.tree_util.Partial(f, 0.5)``) is split like any tree: its numbers are data, ``f`` static.
* A ``functools.partial`` of hashable parts (``partial(fn.softmax_cross_entropy,
  ignore_index=-1)``) selects programs by its function and arguments, not by identity, so a
  rebuilt partial finds the compiled program; one with an unhashable argument still compiles
  per object.
* A number that is traced when the spec is built (an optimizer made inside ``vmap``) makes the
  spec unhashable; ``Method`` then compares by identity, which is all a trace needs.
"""

from __future__ import annotations

import functools
import numbers
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import jax
import numpy as np

from funcnet import _checks

if TYPE_CHECKING:  # a type checker reads the decorated classes as dataclasses (PEP 681)
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**kwargs: Any) -> Any:
        return lambda decorator: decorator


T = TypeVar("T")

__all__ = ["Method", "Static", "combine", "dataclass_transform", "number", "partition"]


class Method:
    """``owner.<name>`` as a value: equal (and equally hashed) when the owners are equal."""

    __slots__ = ("__weakref__", "name", "owner")

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.owner, self.name)(*args, **kwargs)

    def _key(self) -> Any:
        """What the method depends on: its owner, or the part of it the owner's ``method_key`` names."""
        method_key = getattr(self.owner, "method_key", None)
        return self.owner if method_key is None else method_key(self.name)

    def _hashable(self) -> bool:
        try:
            hash(self._key())
        except TypeError:  # a traced number inside
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Method) or other.name != self.name:
            return NotImplemented
        if self.owner is other.owner:
            return True
        return self._hashable() and other._hashable() and bool(self._key() == other._key())

    def __hash__(self) -> int:
        return hash((self.name, self._key() if self._hashable() else id(self.owner)))

    def __repr__(self) -> str:
        return f"{self.owner!r}.{self.name}"


def _flatten(method: Method) -> tuple[tuple[Any, ...], Any]:
    """An owner that narrows its key (a layer) is all static: the method is its own aux data,
    compared by that key. Any other owner (an optimizer) is a child, its numbers leaves."""
    if getattr(method.owner, "method_key", None) is not None:
        return (), method
    return (method.owner,), method.name


def _unflatten(aux: Any, children: tuple[Any, ...]) -> Method:
    return aux if isinstance(aux, Method) else Method(children[0], aux)


jax.tree_util.register_pytree_node(Method, _flatten, _unflatten)


def number(value: Any) -> Any:
    """A concrete scalar as a Python number (weakly typed once traced, hashable); tracers as they are."""
    if _checks.is_array(value) and _checks.is_concrete(value):
        value = np.asarray(value).item()
    return value


def _is_data(leaf: Any) -> bool:
    return _checks.is_array(leaf) or (isinstance(leaf, numbers.Number) and not isinstance(leaf, bool))


class Static(NamedTuple):
    """The non-number part of a partitioned tree: its structure and its other leaves (``None``
    marks a number's place). Hashable, so it can select a compiled program."""

    treedef: Any
    leaves: tuple[Any, ...]


class _Partial:
    """A ``functools.partial`` in a ``Static``, equal to another of the same function and arguments."""

    __slots__ = ("key", "partial")

    def __init__(self, partial: functools.partial[Any]):
        self.partial = partial
        self.key = (partial.func, partial.args, tuple(sorted(partial.keywords.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Partial) and bool(self.key == other.key)

    def __hash__(self) -> int:
        return hash(self.key)


def _static(leaf: Any) -> Any:
    """A leaf as the static part holds it: a partial of hashable parts by value, the rest as is."""
    if type(leaf) is functools.partial:
        try:
            hash(_Partial(leaf))
        except TypeError:  # an unhashable argument: by identity
            return leaf
        return _Partial(leaf)
    return leaf


def partition(tree: Any) -> tuple[list[Any], Static]:
    """Split ``tree`` into its number leaves and the hashable rest."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    data = [leaf for leaf in leaves if _is_data(leaf)]
    return data, Static(treedef, tuple(None if _is_data(leaf) else _static(leaf) for leaf in leaves))


def combine(data: list[Any], static: Static) -> Any:
    """The tree ``partition`` split, with ``data`` (possibly traced) in the numbers' places."""
    places = sum(leaf is None for leaf in static.leaves)
    if len(data) != places:
        raise ValueError(
            f"combine: data must hold one number per place of the static part ({places}), got {len(data)}."
        )
    numbers_ = iter(data)
    return jax.tree_util.tree_unflatten(
        static.treedef,
        [
            next(numbers_) if leaf is None else leaf.partial if isinstance(leaf, _Partial) else leaf
            for leaf in static.leaves
        ],
    )
