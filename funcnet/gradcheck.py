"""Check a hand-written backward against autodiff and finite differences.

``check_vjp(fn, reference, *args)`` is how funcnet proves the book's gradients, and how a
user proves their own op. It runs three oracles:

1. forward: ``fn(*args)`` equals ``reference(*args)``;
2. backward: for several random cotangents, ``jax.vjp(fn, *args)`` equals
   ``jax.vjp(reference, *args)`` for every floating argument;
3. finite differences: for random directions ``v`` in each floating argument, the central
   difference ``D(h) = (f(x + h v) - f(x - h v)) / 2h`` contracted with the cotangent equals
   ``<vjp(cotangent), v>``. ``D`` is Richardson-extrapolated from two steps,
   ``(4 D(h/2) - D(h)) / 3``, which cancels its ``h**2`` error term (a single step's truncation
   error put float32 checks of an ordinary tanh network 5-100% off a correct backward), with
   ``h = 1e-2 max(1, rms(x))`` (1e-6 in float64): scaled to the argument, and never larger than
   the former ``1e-2 (1 + max|x|)``, so points kept a margin from a kink keep it. They run in
   float64 when ``jax_enable_x64`` is on, else in at least float32 (a float16 ``fn`` is
   evaluated in float32). The perturbed points are evaluated by one ``vmap``-ed call of ``fn``,
   so ``fn`` must be batchable (every ``custom_vjp`` of ``jax.numpy`` code is).

Only reverse mode is used, so ``custom_vjp`` functions can be checked. Integer and boolean
arguments are held fixed. On failure an ``AssertionError`` names the oracle, the argument
index, the largest absolute and relative error and the index where it occurs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks

__all__ = ["check_vjp"]

# (rtol, atol) for comparing two backward passes, and for finite differences, by dtype.
_VJP_TOL: dict[Any, tuple[float, float]] = {
    np.dtype("float16"): (1e-2, 1e-2),
    np.dtype(jnp.bfloat16): (2e-2, 2e-2),
    np.dtype("float32"): (1e-4, 1e-6),
    np.dtype("float64"): (1e-10, 1e-12),
}
_FD_TOL: dict[Any, tuple[float, float]] = {np.dtype("float32"): (2e-2, 2e-3), np.dtype("float64"): (1e-6, 1e-8)}


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _tolerance(
    table: dict[Any, tuple[float, float]], dtype: Any, rtol: float | None, atol: float | None
) -> tuple[float, float]:
    default = table.get(np.dtype(dtype), table[np.dtype("float32")])
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def _compare(what: str, index: int | str, actual: Any, expected: Any, rtol: float, atol: float) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"check_vjp: {what} for argument {index}: shape {actual.shape} != {expected.shape}.")
    error = np.abs(actual - expected)
    atol = atol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))  # relative to the scale
    bad = ~(error <= atol + rtol * np.abs(expected))  # also catches NaN
    if np.any(bad):
        where = np.unravel_index(int(np.argmax(np.where(np.isnan(error), np.inf, error))), error.shape)
        relative = error / np.maximum(np.abs(expected), max(atol, np.finfo(np.float64).tiny))
        raise AssertionError(
            f"check_vjp: {what} for argument {index} disagree: largest absolute error "
            f"{np.nanmax(error) if not np.all(np.isnan(error)) else np.nan:.3e} at index "
            f"{tuple(int(i) for i in where)} (got {actual[where]:.6e}, expected "
            f"{expected[where]:.6e}), largest relative error {np.nanmax(relative):.3e}; "
            f"{int(bad.sum())} of {bad.size} entries outside rtol={rtol:g}, atol={atol:g}."
        )


def _is_tree(value: Any) -> bool:
    """A pytree of arrays that is not itself an array (a layer's params)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return False
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _dot(a: Any, b: Any) -> jax.Array:
    total = jnp.zeros((), jnp.float64 if _x64() else jnp.float32)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        wide = jnp.float64 if _x64() else x.dtype
        total = total + jnp.vdot(x.astype(wide), y.astype(wide)).astype(total.dtype)
    return total


def check_vjp(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    fd_rtol: float | None = None,
    fd_atol: float | None = None,
    num_cotangents: int = 3,
    seed: int = 0,
) -> None:
    """Assert that ``fn``'s backward matches autodiff of ``reference`` and finite differences.

    Args:
      fn: the function under test, typically a ``jax.custom_vjp``; array arguments only.
      reference: the same function in plain differentiable ``jax.numpy``.
      *args: the point to check at: arrays, or pytrees of arrays (a layer's params); messages
        name a leaf by argument and path, e.g. ``argument 1 (.W)``. Floating leaves are
        differentiated; others are fixed.
      rtol: relative tolerance of the forward and vjp comparisons; ``None``: by dtype
        (float32: 1e-4, float64: 1e-10).
      atol: their absolute tolerance, which scales with the largest expected entry; ``None``:
        by dtype (float32: 1e-6, float64: 1e-12).
      fd_rtol: relative tolerance of the finite-difference check; ``None``: by dtype
        (float32: 2e-2, float64: 1e-6).
      fd_atol: its absolute tolerance; ``None``: by dtype (float32: 2e-3, float64: 1e-8).
      num_cotangents: how many random cotangents (and directions) to try.
      seed: seed of the random cotangents and directions.
    Raises:
      AssertionError: naming the oracle, the argument, the largest errors and where.
    """
    if not callable(fn) or not callable(reference):
        raise TypeError(
            f"check_vjp: fn and reference must be callables, got {type(fn).__name__} and {type(reference).__name__}."
        )
    if not args:
        raise ValueError("check_vjp: at least one argument to differentiate is needed, got none.")
    leaves, labels = list(args), [str(i) for i in range(len(args))]
    if any(_is_tree(a) for a in args):
        # Pytree arguments (a layer's params): check every leaf, named by its path.
        paths, treedef = jax.tree_util.tree_flatten_with_path(list(args))
        flat = lambda f: lambda *leaves: f(*jax.tree_util.tree_unflatten(treedef, list(leaves)))
        fn, reference = flat(fn), flat(reference)
        leaves = [leaf for _, leaf in paths]
        labels = [f"{p[0].idx}" + (f" ({jax.tree_util.keystr(p[1:])})" if p[1:] else "") for p, _ in paths]
    return _check_flat(fn, reference, leaves, labels, rtol, atol, fd_rtol, fd_atol, num_cotangents, seed)


def _check_flat(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    args: list[Any],
    labels: list[str],
    rtol: float | None,
    atol: float | None,
    fd_rtol: float | None,
    fd_atol: float | None,
    num_cotangents: int,
    seed: int,
) -> None:
    """``check_vjp`` on array arguments, each named by its label in messages."""
    for i, a in enumerate(args):
        if not isinstance(a, (jax.Array, np.ndarray)):
            raise TypeError(f"check_vjp: argument {labels[i]} must be an array, got {type(a).__name__}.")
        if _is_float(a) and not np.all(np.isfinite(np.asarray(a))):
            raise ValueError(f"check_vjp: argument {labels[i]} must be finite to differentiate at, got NaN or Inf.")
    diff_index = [i for i, a in enumerate(args) if _is_float(a)]
    if not diff_index:
        raise ValueError(
            "check_vjp: no floating argument to differentiate: every argument is "
            f"{[str(jnp.result_type(a)) for a in args]}."
        )
    dtype = jnp.result_type(*(args[i] for i in diff_index))
    rtol, atol = _tolerance(_VJP_TOL, dtype, rtol, atol)
    fd_rtol, fd_atol = _tolerance(_FD_TOL, dtype, fd_rtol, fd_atol)

    def restrict(f: Callable[..., Any]) -> Callable[..., Any]:  # a function of the floating arguments alone
        def g(*floats: Any) -> Any:
            full = list(args)
            for i, x in zip(diff_index, floats, strict=True):
                full[i] = x
            return f(*full)

        return g

    primals = [args[i] for i in diff_index]
    fd_dtype = jnp.float64 if _x64() else _checks.wide(dtype)
    base_step = 1e-6 if fd_dtype == jnp.float64 else 1e-2

    # Random cotangents and directions come from NumPy: threefry inside the program would
    # dominate its compile time.
    rng = np.random.default_rng(seed)
    out_shape = jax.eval_shape(restrict(fn), *primals)
    cotangents = jax.tree_util.tree_map(
        lambda o: rng.standard_normal((num_cotangents, *o.shape)).astype(o.dtype), out_shape
    )
    directions = [rng.standard_normal((num_cotangents, *np.shape(p))).astype(fd_dtype) for p in primals]

    @jax.jit
    def oracles(primals: list[Any], cotangents: Any, directions: list[Any]) -> Any:
        """Everything the three oracles need, in one compiled program (trials under vmap)."""
        out, fn_vjp = jax.vjp(restrict(fn), *primals)
        ref_out, ref_vjp = jax.vjp(restrict(reference), *primals)
        wide = [p.astype(fd_dtype) for p in primals]

        def trial(cotangent: Any, directions: list[Any]) -> Any:
            grads, ref_grads = fn_vjp(cotangent), ref_vjp(cotangent)
            steps = [base_step * jnp.maximum(1.0, jnp.sqrt(jnp.mean(jnp.square(x)))) for x in wide]
            # Central differences at h and h/2: the points x +- h v, x +- h/2 v along each
            # argument's direction, all evaluated by one batched call (one copy of fn in the
            # program, not four per argument).
            offsets = (1.0, -1.0, 0.5, -0.5)
            points = [
                jnp.stack(
                    [
                        x + offset * steps[j] * directions[j] if j == pos else x
                        for pos in range(len(wide))
                        for offset in offsets
                    ]
                )
                for j, x in enumerate(wide)
            ]
            values = jax.vmap(restrict(fn))(*points)
            fd = []
            for pos, direction in enumerate(directions):

                def richardson(v: jax.Array, pos: int = pos) -> jax.Array:
                    """``(4 D(h/2) - D(h)) / 3``: the central difference without its h**2 term."""
                    k, h = len(offsets) * pos, steps[pos]
                    coarse, fine = (v[k] - v[k + 1]) / (2 * h), (v[k + 2] - v[k + 3]) / h
                    return (4 * fine - coarse) / 3

                difference = jax.tree_util.tree_map(richardson, values)
                fd.append(
                    (_dot(grads[pos], direction), _dot(difference, cotangent), jnp.sqrt(_dot(direction, direction)))
                )
            return grads, ref_grads, fd

        return out, ref_out, jax.vmap(trial)(cotangents, directions)

    out, ref_out, (grads, ref_grads, fd) = jax.device_get(oracles(primals, cotangents, directions))
    for leaf, ref_leaf in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref_out), strict=True):
        _compare("forward outputs", -1, leaf, ref_leaf, rtol, atol)
    for t in range(num_cotangents):
        for pos, i in enumerate(diff_index):
            _compare("vjp of fn and of reference", labels[i], grads[pos][t], ref_grads[pos][t], rtol, atol)
        for pos, i in enumerate(diff_index):
            analytic, numeric, norm = (a[t] for a in fd[pos])
            _compare("finite differences and vjp", labels[i], analytic, numeric, fd_rtol, fd_atol * (1.0 + float(norm)))
