"""How funcnet compiles its own programs (private).

Contract, stated once: every program funcnet builds (a layer's ``init``, ``fit``'s training,
state and result programs, the streamed fit's) goes through ``jit`` here: ``jax.jit`` with
``OPTIONS`` when called at the top level, XLA's newer CPU fusion emitters turned off, so a CPU
compiles each loop fusion with its classic LLVM emitter. On this project's 2-core machine that
compiles ``fit``'s training program (and a layer's random init) in about 40% less time, runs
as fast, and gives the same numbers bit for bit (``tests/test_train.py`` checks a fit). The
option is a CPU backend's; other backends ignore it. Called inside a trace (``fit`` under
``jax.vmap`` or a user's ``jax.jit``) the program is an ordinary nested ``jax.jit``: JAX takes
compiler options on the outermost program only. A user's own ``jax.jit`` is untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["OPTIONS", "jit"]

OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


class _Program:
    """``fun`` jitted twice: with compiler options at the top level, plainly inside a trace."""

    def __init__(self, fun: Callable[..., Any], options: dict[str, Any], kwargs: dict[str, Any]) -> None:
        self.top = jax.jit(fun, compiler_options=options, **kwargs)
        self.nested = jax.jit(fun, **kwargs)
        functools.update_wrapper(self, fun)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs)))
        return (self.nested if traced else self.top)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lower, trace, _cache_size...: the top-level program's
        return getattr(self.top, name)


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)``, compiled with ``OPTIONS`` (under any given ``compiler_options``)
    when called at the top level."""
    options = {**OPTIONS, **(kwargs.pop("compiler_options", None) or {})}
    return _Program(fun, options, kwargs)
