"""Fully sharded data parallelism (FSDP): params, optimizer state and the moving average sharded
over a mesh axis, so a model larger than one device's memory trains on several.

Contract, stated once:

* **The rule.** ``param_axis`` names a mesh axis of ``n`` devices (or is an ``FSDP`` rule with
  that axis). Each leaf of the params, of the optimizer state and of the moving average (every
  leaf alike, decided by its shape alone, so Adam's moments are sharded as their params are) is
  split into ``n`` equal blocks along its **largest dimension whose size divides by** ``n`` (the
  first of equal ones), one block per device of the axis. A leaf stays **replicated** when it
  has fewer than ``FSDP.min_size`` elements (default ``2**14`` = 16,384, 64 KiB of float32:
  biases, norms' scales, step counts, BatchNorm's running statistics of a few channels) or when
  none of its dimensions divides by ``n``. An explicit rule, ``FSDP(axis, dims=...)``, decides
  per leaf instead: ``dims(path, shape)`` returns the dimension to split (negative counts from
  the end) or ``None`` to replicate, and a dimension that does not divide by ``n`` is a
  ``ValueError`` naming the leaf, before anything compiles.
* **Sharding annotations only.** ``fit`` and ``train_step`` place the state by the rule once
  (``shard``; each process places only its own devices' blocks) and constrain it inside the
  compiled program (``constrain``, ``jax.lax.with_sharding_constraint``): the params a step
  starts from, the gradients (so XLA's SPMD partitioner reduce-scatters them instead of
  all-reducing) and the params and optimizer state it returns. XLA gathers each layer's params
  where they are used and frees them after; no value of the carry holds a whole sharded leaf on
  one device. The data stay sharded along the data axis as in data parallelism (the two axes may
  be the same devices, which is FSDP proper, or a 2-D mesh of ``data x fsdp``, whose ``fsdp``
  devices share each block of rows). The result is the data-parallel fit's up to the rounding of
  the gradient's reduction (a reduce-scatter sums in another order than an all-reduce).
* **What cannot work.** ``vmap`` over an FSDP fit is refused (each member would need its own
  placement of the whole state); an axis not in the mesh, a mesh that is missing, and a
  ``param_axis`` of another type are refused before anything compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "FSDP",
    "check",
    "check_not_vmapped",
    "constrain",
    "leaf_spec",
    "param_shardings",
    "resolve",
    "rows_axis",
    "shard",
    "shard_params",
]

MIN_SIZE = 2**14


class FSDP(NamedTuple):
    """How params and optimizer state are sharded over a mesh axis (``fit(..., param_axis=...)``).

    ``param_axis="fsdp"`` is ``FSDP("fsdp")``: the default rule (``funcnet.train.fsdp``'s module
    docstring): every leaf split along its largest dimension that divides by the axis' device
    count, leaves under ``min_size`` elements replicated.

    Fields:
      axis: the mesh axis whose devices share the state.
      min_size: leaves with fewer elements than this are replicated (default ``2**14``: 64 KiB of
        float32). ``0`` shards every leaf that has a dimension that divides.
      dims: an explicit rule instead of the default one: ``dims(path, shape) -> int | None``, the
        dimension of the leaf at ``path`` (its ``jax.tree_util.keystr`` within the params or
        within the optimizer state, e.g. ``"[0].W"`` or ``".mu[0].W"``) to split, or ``None`` to
        replicate it; ``min_size`` does not apply. A dimension that does not divide by the
        axis' device count is a ``ValueError``. A function compares by identity, so pass the
        same function to reuse a compiled program.
    """

    axis: str
    min_size: int = MIN_SIZE
    dims: Callable[[str, tuple[int, ...]], int | None] | None = None


def resolve(fn: str, mesh: Any, param_axis: Any) -> FSDP | None:
    """``param_axis`` as an ``FSDP`` rule (``None``: none), after checking it against ``mesh``."""
    if param_axis is None:
        return None
    if isinstance(param_axis, str):
        rule = FSDP(param_axis)
    elif isinstance(param_axis, FSDP):
        rule = param_axis
    else:
        raise TypeError(
            f"{fn}: param_axis must be a mesh axis name (str) or a funcnet.FSDP rule, got "
            f"{type(param_axis).__name__} {param_axis!r:.60}."
        )
    if not isinstance(rule.axis, str):
        raise TypeError(f"{fn}: FSDP.axis must be a mesh axis name (str), got {type(rule.axis).__name__}.")
    if isinstance(rule.min_size, bool) or not isinstance(rule.min_size, (int, np.integer)) or rule.min_size < 0:
        raise ValueError(f"{fn}: FSDP.min_size must be an int >= 0 (elements), got {rule.min_size!r}.")
    if rule.dims is not None and not callable(rule.dims):
        raise TypeError(
            f"{fn}: FSDP.dims must be a function (path, shape) -> int | None, got {type(rule.dims).__name__}."
        )
    if mesh is None:
        raise ValueError(
            f"{fn}: param_axis={rule.axis!r} shards params over a mesh axis, but no mesh was given; pass "
            f"mesh=jax.sharding.Mesh(np.array(jax.devices()), ({rule.axis!r},))."
        )
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if rule.axis not in mesh.axis_names:
        raise ValueError(
            f"{fn}: param_axis {rule.axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}."
        )
    return rule


def rows_axis(mesh: Any, data_axis: str, rule: FSDP | None) -> str:
    """The mesh axis the batch's rows split along: ``data_axis``, except that under a rule on a mesh
    without the default ``"data"`` axis the rows go along the rule's own axis (FSDP proper: one
    axis carries both rows and state)."""
    if rule is not None and mesh is not None and data_axis == "data" and data_axis not in mesh.axis_names:
        return rule.axis
    return data_axis


def leaf_spec(fn: str, rule: FSDP, devices: int, path: str, shape: tuple[int, ...]) -> PartitionSpec:
    """The ``PartitionSpec`` of one leaf of shape ``shape`` at ``path`` (the module's rule)."""
    if rule.dims is not None:
        dim = rule.dims(path, tuple(shape))
        if dim is None:
            return PartitionSpec()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not -len(shape) <= dim < len(shape):
            raise ValueError(
                f"{fn}: FSDP.dims returned {dim!r} for {path or '(root)'} of shape {tuple(shape)}; expected a "
                f"dimension in [-{len(shape)}, {len(shape)}) or None."
            )
        dim = int(dim) % len(shape)
        if shape[dim] % devices:
            raise ValueError(
                f"{fn}: {path or '(root)'} of shape {tuple(shape)} cannot be sharded along dimension {dim} "
                f"({shape[dim]}) over the {devices} devices of mesh axis {rule.axis!r}: {shape[dim]} does not "
                f"divide by {devices}. Return another dimension or None (replicated) from FSDP.dims for it."
            )
    else:
        if int(np.prod(shape, dtype=np.int64)) < max(rule.min_size, 1) or devices == 1:
            return PartitionSpec()
        fits = [d for d in range(len(shape)) if shape[d] % devices == 0]
        if not fits:
            return PartitionSpec()
        dim = max(fits, key=lambda d: (shape[d], -d))  # the largest; the first of equal ones
    spec: list[str | None] = [None] * len(shape)
    spec[dim] = rule.axis
    return PartitionSpec(*spec)


def _specs(fn: str, tree: Any, mesh: Mesh, rule: FSDP) -> Any:
    devices = mesh.shape[rule.axis]

    def spec(path: Any, leaf: Any) -> Any:
        if leaf is None:
            return None
        return leaf_spec(fn, rule, devices, jax.tree_util.keystr(path), np.shape(leaf))

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: Any, mesh: Mesh, param_axis: str | FSDP) -> Any:
    """The ``NamedSharding`` of every leaf of ``tree`` under FSDP (the rule of ``help(funcnet.FSDP)``).

    Args:
      tree: params, an optimizer state or any pytree of arrays (or ``jax.ShapeDtypeStruct``s:
        ``jax.eval_shape(lambda k: net.init(k, shape), key)[1]`` serves, without computing params).
      mesh: the ``jax.sharding.Mesh``.
      param_axis: the mesh axis to shard over, or an ``FSDP`` rule.

    Returns:
      A pytree of ``tree``'s structure whose leaves are ``NamedSharding``s (for ``jax.jit``'s
      ``in_shardings``/``out_shardings``, ``jax.device_put``, or ``jax.ShapeDtypeStruct(...,
      sharding=...)`` given to ``funcnet.load``).
    """
    rule = resolve("param_shardings", mesh, param_axis)
    assert rule is not None  # param_axis is not None
    specs = _specs("param_shardings", tree, mesh, rule)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )


def check(fn: str, tree: Any, mesh: Mesh, rule: FSDP) -> None:
    """Apply the rule to every leaf once, so an explicit rule's error comes before anything compiles."""
    _specs(fn, tree, mesh, rule)


def shard(tree: Any, mesh: Mesh, rule: FSDP, fn: str = "fit") -> Any:
    """``tree`` placed by the rule: host and single-device values are split, each process placing
    only the blocks of its own devices (nothing is gathered, and no process compares its copy with
    the others': ``distributed.agree`` has compared their digests); arrays already spanning several
    devices in another layout are moved to this one by a compiled copy (every process its part)."""
    specs = _specs(fn, tree, mesh, rule)

    def put(leaf: Any, spec: PartitionSpec) -> Any:
        if leaf is None:
            return None
        sharding = NamedSharding(mesh, spec)
        if isinstance(leaf, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(leaf, sharding)
        if isinstance(leaf, jax.Array):
            if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
                return leaf
            if len(leaf.sharding.device_set) > 1:
                return jax.jit(lambda a: a, out_shardings=sharding)(leaf)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, specs, is_leaf=lambda a: a is None)


def shard_params(tree: Any, mesh: Mesh, param_axis: str | FSDP) -> Any:
    """Place ``tree`` (params, an optimizer state) sharded by the FSDP rule, for a hand-written loop
    around ``funcnet.train_step(..., mesh=mesh, param_axis=...)`` (``fit`` places its own).

    Each process places only its own devices' blocks; arrays already spread over devices in
    another layout are moved by a compiled copy, never gathered on one host.

    Args:
      tree: a pytree of arrays (host, single-device or global).
      mesh: the ``jax.sharding.Mesh``.
      param_axis: the mesh axis to shard over, or an ``FSDP`` rule.

    Returns:
      ``tree`` as global ``jax.Array``s with the shardings ``param_shardings`` gives.
    """
    rule = resolve("shard_params", mesh, param_axis)
    assert rule is not None
    return shard(tree, mesh, rule, "shard_params")


def constrain(tree: Any, mesh: Mesh, rule: FSDP, fn: str = "fit") -> Any:
    """Inside a program: ``with_sharding_constraint`` of every leaf to the rule's sharding."""
    specs = _specs(fn, tree, mesh, rule)
    return jax.tree_util.tree_map(
        lambda leaf, spec: None if leaf is None else jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec)),
        tree,
        specs,
        is_leaf=lambda a: a is None,
    )


def _batched(leaf: Any) -> bool:
    """True for a value ``vmap`` is tracing (JAX's ``BatchTracer``, private in 0.10)."""
    return isinstance(leaf, jax.core.Tracer) and any(kind.__name__ == "BatchTracer" for kind in type(leaf).__mro__)


def check_not_vmapped(fn: str, rule: FSDP | None, **trees: Any) -> None:
    """Refuse ``vmap`` over an FSDP fit, naming the argument it batches."""
    if rule is None:
        return
    for name, tree in trees.items():
        if any(_batched(leaf) for leaf in jax.tree_util.tree_leaves(tree)):
            raise ValueError(
                f"{fn}: param_axis ({rule.axis!r}) cannot run under vmap ({name} is batched): FSDP places one "
                "model's state over the mesh, and the members of a vmap-ed ensemble would each need their own. "
                "Fit each member on its own (a Python loop: the program compiles once), or drop param_axis and "
                "shard the ensemble axis instead (jax.jit(jax.vmap(...), in_shardings=...))."
            )
