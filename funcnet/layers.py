"""Layers as pure ``init``/``apply`` pairs (book: ``Layer``, ``Dense``, ``Dropout``, ``NeuralNetwork``).

The layer contract, stated once:

* ``Layer(init, apply)`` is a ``NamedTuple`` of two pure functions, so ``init, apply = layer``
  unpacks as in stax.
* ``init(key, input_shape) -> (output_shape, params)``. Shapes include the batch dimension
  first, which may be ``-1`` (any). ``params`` is an immutable pytree (a ``NamedTuple`` such
  as ``DenseParams(W, B)``, a tuple, or ``()``); nothing is ever mutated.
* ``apply(params, x, *, key=None, **inputs) -> y`` is inference, for every layer: ``Dropout`` and
  attention dropout never drop there (a key given to one of them is refused, naming the fix),
  BatchNorm uses its running statistics. Training mode is one switch, ``train_apply`` below.
* Inputs beyond ``x``: a layer that needs more than ``x`` per example (attention's padding:
  ``kv_lengths``, ``mask``) takes them as keywords of ``apply`` and names them in its spec's
  ``inputs``. Combinators take the union of their children's and pass each child the ones it
  takes, so ``serial(...).apply(params, x, kv_lengths=lengths)`` reaches every attention layer
  inside; an input no layer takes is a ``TypeError`` (a misspelled name never vanishes). A
  ``Layer`` of closures takes the keywords its ``apply`` declares (all, with ``**kwargs``).
* Layer state (``funcnet.state``): non-trained variables, such as BatchNorm's running
  statistics, live inside ``params`` as typed subtrees. ``apply`` uses them (inference).
  ``train_apply(layer)`` is training mode, ``(params, x, *, key=None, row_mask=None, **inputs)
  -> (y, params)``, the params with their state updated; ``row_mask: (batch,)`` bool marks the
  rows that may enter batch statistics (``fit``'s padded last batch). A layer without state
  returns its params unchanged. funcnet's combinators thread it through their children; a
  spec of one's own with stateful children overrides ``LayerSpec.train_apply`` (calling
  ``train_apply`` on them). A ``Layer`` of closures cannot: ``train_apply`` refuses params of one
  that hold state, rather than run its BatchNorm in inference mode.
* Names: CamelCase for layer constructors (``Dense``, ``Dropout``), snake_case for the rest
  (``serial``, ``summary``), as in stax.
* Layers are values: funcnet's constructors return a ``Layer`` whose ``init``/``apply`` compare
  and hash by the constructor's arguments, so ``Dense(16, tanh) == Dense(16, tanh)`` and a
  network rebuilt from equal calls finds the program ``fit`` compiled for the first one. A
  ``Layer`` a user writes from two closures works everywhere too; it compiles once per object.
* Mistakes (a wrong input shape, params from another network) raise ``ValueError`` or
  ``TypeError`` at trace time; inside ``serial`` the message names the layer's index.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import _checks, _host_split, initializers, ops
from funcnet._values import Method, T, dataclass_transform, number
from funcnet.state import has_state, is_state, split_state, state_count

__all__ = [
    "Activation",
    "Dense",
    "DenseParams",
    "Dropout",
    "Layer",
    "LayerSpec",
    "WeightParams",
    "layer_inputs",
    "layer_name",
    "layer_spec",
    "named",
    "param_count",
    "serial",
    "summary",
    "train_apply",
]

Shape = tuple[int, ...]
Params = Any


class Layer(NamedTuple):
    """A layer: ``init(key, input_shape) -> (output_shape, params)`` and ``apply(params, x, *, key=None)``."""

    init: Callable[[jax.Array, Shape], tuple[Shape, Params]]
    apply: Callable[..., jax.Array]


class DenseParams(NamedTuple):
    """``W: (num_in, neurons)`` and ``B: (1, neurons)``, the book's shapes."""

    W: jax.Array
    B: jax.Array


class WeightParams(NamedTuple):
    """``Dense(..., use_bias=False)``'s params: ``W: (num_in, neurons)`` alone."""

    W: jax.Array


INIT_ONLY = "funcnet.init_only"


def init_only() -> Any:
    """A spec field that only ``init`` reads (an initializer, the params' dtype), declared
    ``w_init: Initializer = init_only()``: two layers that differ only in such fields share their
    ``apply`` and its compiled programs. A field without it is part of ``apply``'s value, which is
    always safe (at worst one more compilation); marking a field ``apply`` reads is a bug: ``fit``
    would run one layer's program for another."""
    return dataclasses.field(metadata={INIT_ONLY: True})


class LayerSpec:
    """Base of a layer written as a value: a frozen dataclass of the constructor's arguments
    (decorate the subclass with ``@layer_spec``) with ``name``, ``init`` and ``apply``. Equal
    specs give equal, equally hashed layers (``spec.layer()``), so a network rebuilt from equal
    calls, in a loop, finds the program ``fit`` compiled for the first one. funcnet's own layers
    are written this way. Keep every field hashable (ints, strings, tuples, functions).

    Example::

        @layer_spec
        class Scale(LayerSpec):
            factor: float

            @property
            def name(self) -> str:
                return f"Scale({self.factor})"

            def init(self, key, input_shape):
                return input_shape, ()

            def apply(self, params, x, *, key=None):
                return x * self.factor

        net = serial(Dense(8, tanh), Scale(0.5).layer())
    """

    @property
    def name(self) -> str:
        """The display name: the constructor call, e.g. ``Dense(16, tanh)``."""
        raise NotImplementedError

    @property
    def children(self) -> tuple[Layer, ...]:
        """The layers inside a combinator (for ``summary`` and error paths); ``()`` for a leaf layer."""
        return ()

    @property
    def inputs(self) -> frozenset[str] | None:
        """The inputs beyond ``x`` that ``apply`` takes as keywords (``kv_lengths``, ``mask``); a
        combinator's are its children's (``None``: any, a child of closures with ``**kwargs``)."""
        return _union(self.children)

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Params]:
        raise NotImplementedError

    def apply(self, params: Params, x: Any, *, key: jax.Array | None = None) -> Any:
        raise NotImplementedError

    def train_apply(
        self, params: Params, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Params]:
        """Training mode, ``(y, params)``. This default serves a layer without state, returning
        its params unchanged; a layer with state, or with stateful children, overrides it."""
        del row_mask  # no batch statistics here
        refuse_hidden_state(self.name, params)
        return self.apply(params, x, key=key, **inputs), params

    def init_cache(self, params: Params, batch: int, max_length: int) -> Any:
        """Decoding (``funcnet.decoding``): this layer's empty cache for ``batch`` sequences of up
        to ``max_length`` positions; ``()`` for a layer that keeps nothing between steps."""
        del params, batch, max_length
        return ()

    def decode(self, params: Params, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        """Decoding: ``x`` holds the positions ``offset[b] ..`` of each sequence ``b`` (``offset:
        (batch,)`` counts those before them); returns ``(y, cache)``. This default serves a layer
        that treats every position on its own (``Dense``, ``LayerNorm``, ``Embedding``): its
        ``apply``. A layer that mixes positions overrides it (attention keeps keys and values in
        its cache, learned positions read ``W[offset + t]``) or refuses."""
        del offset
        return self.apply(params, x, **inputs), cache

    def method_key(self, name: str) -> Any:
        """What ``Method(self, name)`` compares by: the whole spec for ``init``; for ``apply``,
        the spec without its ``init_only()`` fields and with its layers' ``apply``s in their place."""
        if name != "apply":
            return self

        def view(value: Any) -> Any:
            if isinstance(value, Layer):
                return value.apply
            return tuple(map(view, value)) if isinstance(value, tuple) else value

        fields = dataclasses.fields(self)  # type: ignore[arg-type]  # every spec is a dataclass
        return (type(self), tuple(view(getattr(self, f.name)) for f in fields if not f.metadata.get(INIT_ONLY)))

    def layer(self) -> Layer:
        return Layer(_Init(self, "init"), Method(self, "apply"))

    def __repr__(self) -> str:
        return self.name


class _Init(Method):
    """A spec's ``init``, whose call checks its two arguments first: a key, then a shape."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_init_arguments(getattr(self.owner, "name", "init"), args, kwargs)
        return super().__call__(*args, **kwargs)


def check_init_arguments(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``init(key, input_shape)``: a forgotten key, or a seed where a key goes, named plainly."""
    if kwargs or len(args) != 2:
        if len(args) == 1 and not kwargs:
            raise TypeError(
                f"{fn}: init takes (key, input_shape), got one argument {args[0]!r}; pass a key first, "
                "e.g. net.init(jax.random.PRNGKey(0), input_shape)."
            )
        return  # let Python name the misspelled or missing argument
    key = args[0]
    if not (
        isinstance(key, jax.Array)
        and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.ndim >= 1))
    ):
        raise TypeError(
            f"{fn}: init's key must be a jax.random key, e.g. jax.random.PRNGKey(0), got {key!r}; "
            "call init(key, input_shape)."
        )


@dataclass_transform(frozen_default=True)
def layer_spec(cls: type[T]) -> type[T]:
    """Class decorator for a ``LayerSpec`` subclass: a frozen dataclass that keeps the spec's repr,
    whose ``init`` called with a concrete key runs as one compiled program (``_compiled_init``).

    Args:
      cls: the ``LayerSpec`` subclass; its annotated fields are the layer's configuration.

    Returns:
      ``cls`` as a frozen dataclass: equal fields give equal, equally hashed specs.
    """
    if "init" in cls.__dict__:
        cls.init = _compiled_init(cls.__dict__["init"])  # type: ignore[attr-defined]
    return dataclasses.dataclass(frozen=True, repr=False)(cls)


def _compiled_init(init: Callable[..., Any]) -> Callable[..., Any]:
    """``init`` as one compiled program per (layer, input shape, key type), cached like ``fit``'s.

    Run op by op, a network's ``init`` compiled a small program for every split and every
    initializer call of a new shape (about 0.3 s each on a CPU); as one program per leaf
    layer it compiles once per layer, and an equal layer in another network (a sweep, a test
    suite, a notebook rebuilding its model) compiles nothing. A combinator (a spec with
    ``children``) runs its own init as written, splitting the key, so its children take this
    path with concrete keys. Only a call with a concrete key outside any trace compiles: inside
    one (a ``vmap``-ed or jitted init, ``summary``, a concrete key closed over by a user's
    ``jax.jit``) ``init`` runs as written, traced into the caller's program.
    """

    @functools.wraps(init)
    def run(self: LayerSpec, key: Any, input_shape: Any) -> tuple[Any, Params]:
        if self.children or not _compilable(key):
            result: tuple[Any, Params] = init(self, key, input_shape)  # a combinator: its layers compile
            return result
        key_type = (key.shape, key.dtype, key.sharding, jax.config.jax_enable_x64)  # type: ignore[attr-defined]
        try:
            program = _init_program(init, self, _frozen(input_shape), key_type)
        except TypeError:  # an unhashable spec (a number traced when it was built) or shape
            result = init(self, key, input_shape)
            return result
        return program(key)

    return run


def _compilable(key: Any) -> bool:
    """A concrete key outside any trace, with jit on (turned off, init runs op by op): JAX takes
    compiler options on a top-level program only."""
    eager = jax.config.jax_disable_jit  # type: ignore[attr-defined]
    return not eager and isinstance(key, jax.Array) and _checks.is_concrete(key) and not _checks.tracing()


def _on_cpu(sharding: Any) -> bool:
    return all(device.platform == "cpu" for device in sharding.device_set)


# Up to this many numbers, an init program compiles with XLA's CPU fusion emitters off.
_SMALL_INIT = 1 << 22


def _init_options(cpu: bool, size: int) -> dict[str, Any] | None:
    """Compiler options for an init program drawing ``size`` numbers: on a CPU, LLVM level 1 (a
    third less compile time than the default level into code as fast; bit-identical draws,
    where level 0 changes the normals' bits) and, for up to ``_SMALL_INIT`` numbers, the
    classic loop emitter instead of XLA's fusion emitters (a third less compile time again,
    same bits; its code draws about 1.8x slower, so a layer of 4M numbers loses about 40 ms of
    running time to the 0.2-0.3 s of compiling it saves, and a bigger one keeps the emitters).
    Its code is generated in one piece, not split for parallel codegen: an init program is
    small, and a two-layer network's init took 0.91 s instead of 1.03 s (medians of 8
    alternated fresh processes, the same params)."""
    if not cpu:
        return None
    options: dict[str, Any] = {"xla_backend_optimization_level": 1, "xla_cpu_parallel_codegen_split_count": 1}
    if size <= _SMALL_INIT:
        options["xla_cpu_use_fusion_emitters"] = False
    return options


def _frozen(shape: Any) -> Any:
    return tuple(map(_frozen, shape)) if isinstance(shape, (tuple, list)) else shape


@functools.lru_cache(maxsize=256)
def _init_program(
    init: Callable[..., Any], spec: LayerSpec, input_shape: Any, key_type: Any
) -> Callable[[jax.Array], tuple[Any, Params]]:
    """The compiled ``init`` of one spec, input shape and key type: ``key -> (output_shape, params)``."""
    output_shape: list[Any] = []

    def params_of(key: jax.Array) -> Params:
        shape, params = init(spec, key, input_shape)
        output_shape.append(shape)  # static: recorded once, while tracing
        return params

    cpu = _on_cpu(key_type[2])
    program: list[Callable[[jax.Array], Params]] = []

    def run(key: jax.Array) -> tuple[Any, Params]:
        if not program:  # the first call: sizes decide the compiler options
            size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(jax.eval_shape(params_of, key)))
            # Called like any jitted function (not ahead of time), so params from an uncommitted
            # key stay uncommitted, as op-by-op ones were: a mesh's train_step may place them.
            program.append(jax.jit(params_of, compiler_options=_init_options(cpu, size)))
        return output_shape[0], program[0](key)

    return run


@layer_spec
class _Named(LayerSpec):
    label: str
    inner: Layer

    @property
    def name(self) -> str:
        return self.label

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Params]:
        return self.inner.init(key, input_shape)

    @property
    def inputs(self) -> frozenset[str] | None:
        return layer_inputs(self.inner)

    def apply(self, params: Params, x: Any, **kwargs: Any) -> Any:
        return self.inner.apply(params, x, **kwargs)

    def init_cache(self, params: Params, batch: int, max_length: int) -> Any:
        return cache_of(self.inner, params, batch, max_length)

    def decode(self, params: Params, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        return decode_child(self.inner, params, cache, x, offset=offset, inputs=inputs)

    def train_apply(
        self, params: Params, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Params]:
        return train_mode(self.inner.apply)(params, x, key=key, row_mask=row_mask, **inputs)


def named(name: str, layer: Layer) -> Layer:
    """``layer`` shown as ``name`` in ``summary`` and in error messages (a ``Layer(init, apply)``
    of closures otherwise shows as its init function's name). It computes exactly what ``layer``
    does and, like it, compiles once per object; a ``LayerSpec`` compiles once per value.

    Args:
      name: a non-empty str.
      layer: any ``Layer``.

    Returns:
      A ``Layer`` computing what ``layer`` computes, with ``layer``'s params.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"named: name must be a non-empty str, got {name!r}.")
    if not isinstance(layer, Layer):
        raise TypeError(f"named: layer must be a Layer(init, apply), got {type(layer).__name__}.")
    return _Named(name, layer).layer()


def refuse_hidden_state(name: str, params: Params) -> None:
    """A layer that cannot update the state in its params must not run in training mode."""
    if not has_state(params):
        return
    paths, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_state)
    where = [f"params{jax.tree_util.keystr(path)}" for path, node in paths if is_state(node)]
    raise TypeError(
        f"train_apply: {name} holds layer state ({', '.join(where)}) but cannot update it in "
        f"training mode: it does not pass train_apply on to the stateful layer inside, which would "
        f"silently run in inference mode. Build the network from funcnet's combinators, or write a "
        f"LayerSpec whose train_apply calls funcnet.train_apply on its children."
    )


def train_mode(apply: Callable[..., Any]) -> Callable[..., tuple[Any, Params]]:
    """The training mode of a layer's ``apply``: its spec's ``train_apply`` (a value, equal for
    equal layers), or, for a ``Layer`` of closures, ``apply`` itself if its params hold no state."""
    owner = apply.owner if isinstance(apply, Method) else None
    if isinstance(owner, LayerSpec):
        return Method(owner, "train_apply")
    name = getattr(apply, "__name__", type(apply).__name__)

    def closure_train_apply(
        params: Params, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Params]:
        del row_mask
        refuse_hidden_state(f"the Layer of closures {name!r}", params)
        return apply(params, x, key=key, **inputs), params

    return closure_train_apply


def train_apply(layer: Layer) -> Callable[..., tuple[Any, Params]]:
    """Training mode of ``layer``: ``(params, x, *, key=None, row_mask=None, **inputs) -> (y, params)``.

    BatchNorm normalises with the batch's statistics and returns params with its running
    statistics updated; every other layer returns its params unchanged. ``row_mask: (batch,)``
    bool keeps rows (False) out of batch statistics. ``inputs`` (``kv_lengths``, ``mask``)
    reach the layers that take them, as in ``apply``. ``layer.apply(params, x)`` stays inference.

    Args:
      layer: any ``Layer``. A ``Layer(init, apply)`` of closures runs its ``apply`` and returns
        its params unchanged; if those params hold layer state, that is an error.

    Returns:
      The function ``(params, x, *, key=None, row_mask=None, **inputs) -> (y, params)``.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"train_apply: layer must be a Layer(init, apply), got {type(layer).__name__}.")
    return train_mode(layer.apply)


def run_child(
    layer: Layer,
    params: Params,
    x: Any,
    *,
    key: jax.Array | None,
    row_mask: jax.Array | None,
    train: bool,
    inputs: dict[str, Any],
) -> tuple[Any, Params]:
    """A combinator's child in inference (``(apply(...), params)``) or training mode, given the
    inputs beyond ``x`` that it takes."""
    own = own_inputs(layer, inputs)
    if train:
        return train_mode(layer.apply)(params, x, key=key, row_mask=row_mask, **own)
    return layer.apply(params, x, key=key, **own), params


def cache_of(layer: Layer, params: Params, batch: int, max_length: int) -> Any:
    """A child's empty decoding cache (``()`` for a Layer of closures: it keeps nothing)."""
    spec = spec_of(layer)
    return () if spec is None else spec.init_cache(params, batch, max_length)


def decode_child(
    layer: Layer, params: Params, cache: Any, x: Any, *, offset: jax.Array, inputs: dict[str, Any]
) -> tuple[Any, Any]:
    """A combinator's child in decoding mode, given the inputs beyond ``x`` that it takes. A Layer of
    closures is taken to treat every position on its own (its ``apply``)."""
    own = own_inputs(layer, inputs)
    spec = spec_of(layer)
    if spec is None:
        return layer.apply(params, x, **own), cache
    return spec.decode(params, cache, x, offset=offset, **own)


def own_inputs(layer: Layer, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs beyond ``x`` that ``layer`` takes, of those a combinator was given."""
    takes = layer_inputs(layer)
    return inputs if takes is None else {name: value for name, value in inputs.items() if name in takes}


def layer_inputs(layer: Layer) -> frozenset[str] | None:
    """The inputs beyond ``x`` that ``layer.apply`` takes as keywords (``None``: any). A spec says
    so itself (``LayerSpec.inputs``); a Layer of closures by its ``apply``'s signature.

    Args:
      layer: any ``Layer``.

    Returns:
      The keyword names (``frozenset({"kv_lengths", "mask"})`` for attention), or ``None`` when
      ``apply`` takes ``**kwargs`` and so any input.
    """
    spec = spec_of(layer)
    if spec is not None:
        return spec.inputs
    try:
        parameters = list(inspect.signature(layer.apply).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: takes none
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    return frozenset(p.name for p in named[2:] if p.name != "key")


def _union(layers: Sequence[Layer]) -> frozenset[str] | None:
    """The inputs any of ``layers`` takes (``None`` if one takes any)."""
    found: set[str] = set()
    for layer in layers:
        takes = layer_inputs(layer)
        if takes is None:
            return None
        found |= takes
    return frozenset(found)


def given_inputs(name: str, takes: frozenset[str] | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs given (``None`` values dropped: not given), each of which some layer must take."""
    given = {key: value for key, value in inputs.items() if value is not None}
    unknown = sorted(given) if takes is None else sorted(set(given) - takes)
    if takes is not None and unknown:
        taken = ", ".join(sorted(takes)) or "none"
        hint = (
            " (the rows that enter BatchNorm's batch statistics are row_mask=, not mask=)" if "mask" in unknown else ""
        )
        raise TypeError(
            f"{name}: no layer inside takes {', '.join(u + '=' for u in unknown)}; the inputs its layers "
            f"take: {taken}{hint}."
        )
    return given


def spec_of(layer: Layer) -> LayerSpec | None:
    """The spec behind one of funcnet's layers; ``None`` for a Layer a user wrote."""
    init = layer.init
    return init.owner if isinstance(init, Method) and isinstance(init.owner, LayerSpec) else None


def layer_name(layer: Layer) -> str:
    """The display name of a layer (its constructor call, or its init function's name)."""
    spec = spec_of(layer)
    return spec.name if spec is not None else getattr(layer.init, "__name__", type(layer.init).__name__)


def check_input_shape(fn: str, input_shape: Any, ndim: int | None, layout: str) -> Shape:
    """``input_shape`` must be ``ndim`` ints (any number if None), positive or the batch's ``-1``."""
    if isinstance(input_shape, (tuple, list)) and input_shape and input_shape[0] is None:
        raise TypeError(
            f"{fn}: input_shape must be a tuple of ints {layout}, got {input_shape!r}; write an "
            f"unknown batch size as -1, e.g. {(-1, *input_shape[1:])}."
        )
    if (
        not isinstance(input_shape, (tuple, list))
        or not input_shape
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in input_shape)
    ):
        raise TypeError(f"{fn}: input_shape must be a tuple of ints {layout}, got {input_shape!r}.")
    shape = tuple(int(d) for d in input_shape)
    if ndim is not None and len(shape) != ndim:
        hint = f"; {batch_first(shape)}" if len(shape) == ndim - 1 and shape[0] != -1 else ""
        raise ValueError(f"{fn}: input_shape must be {ndim}-D {layout}, got {shape}{hint}.")
    if not (shape[0] == -1 or shape[0] >= 1) or any(d < 1 for d in shape[1:]):
        raise ValueError(f"{fn}: input_shape sizes must be positive (batch may be -1), got {shape}.")
    return shape


def batch_first(shape: Shape) -> str:
    """The fix for an ``input_shape`` given without its batch dimension."""
    return f"the batch comes first: {(-1, *shape)} for any batch size (init's shapes include it)"


def activation_name(activation: Callable[..., Any]) -> str:
    return getattr(activation, "__name__", type(activation).__name__)


def default_dtype(dtype: Any) -> np.dtype:
    """``dtype``, or JAX's default float (float32 unless x64 is on) for ``None``: read from the
    config, not from a made array (``jnp.zeros(())`` compiled a program when building a layer)."""
    return jnp.dtype(dtype or jax.dtypes.canonicalize_dtype(np.float64))


def check_params(name: str, params: Any, kind: type, form: str) -> None:
    """``params`` must be a ``kind`` (params from another network are the usual cause)."""
    if not isinstance(params, kind):
        if is_init_output(params) or (isinstance(params, tuple) and _is_shape(params)):
            raise TypeError(
                f"{name}: params must be {form}, got {params_text(params)}: init returns (output_shape, params); "
                "unpack it: _, params = net.init(key, input_shape)."
            )
        raise TypeError(f"{name}: params must be {form}, got {type(params).__name__} (params from another network?).")


def _is_shape(value: Any) -> bool:
    return bool(value) and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value)


def is_init_output(params: Any) -> bool:
    """``params`` is what ``init`` returned, ``(output_shape, params)``, not yet unpacked (the
    output shape a tuple of ints, or a list or tuple of them for a layer with several outputs)."""
    if not isinstance(params, tuple) or len(params) != 2 or not isinstance(params[0], (tuple, list)):
        return False
    shape = params[0]
    return _is_shape(shape) or (bool(shape) and all(isinstance(s, (tuple, list)) and _is_shape(s) for s in shape))


def params_text(params: Any) -> str:
    """A short description of wrong params: init's output, a shape, or a type."""
    if is_init_output(params):
        return f"init's (output_shape, params) pair, output_shape {params[0]!r}"
    if isinstance(params, tuple) and _is_shape(params):
        return f"the shape {params!r}"
    return type(params).__name__


@layer_spec
class _Dense(LayerSpec):
    neurons: int
    activation: Callable[[jax.Array], jax.Array]
    w_init: initializers.Initializer = init_only()
    b_init: initializers.Initializer = init_only()
    dtype: np.dtype = init_only()
    use_bias: bool = True

    @property
    def name(self) -> str:
        bias = "" if self.use_bias else ", use_bias=False"
        return f"Dense({self.neurons}, {activation_name(self.activation)}{bias})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        shape = check_input_shape(self.name, input_shape, None, "(batch, ..., num_in)")
        if len(shape) < 2:
            fix = "" if shape[0] == -1 else f"; {batch_first(shape)}"
            raise ValueError(f"{self.name}: input_shape must be at least 2-D (batch, ..., num_in), got {shape}{fix}.")
        k_w, k_b = jax.random.split(key)
        W = self.w_init(k_w, (shape[-1], self.neurons), self.dtype)
        params = DenseParams(W, self.b_init(k_b, (1, self.neurons), self.dtype)) if self.use_bias else WeightParams(W)
        return (*shape[:-1], self.neurons), params

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key  # deterministic
        if self.use_bias:
            check_params(self.name, params, DenseParams, "DenseParams(W, B)")
        else:
            check_params(self.name, params, WeightParams, "WeightParams(W) (use_bias=False)")
        if np.shape(params.W)[-1:] != (self.neurons,):
            raise ValueError(
                f"{self.name}: params.W must have {self.neurons} output columns, got shape "
                f"{np.shape(params.W)} (params from another network?)."
            )
        leading = None
        if _checks.is_array(x) and x.ndim > 2:  # (batch, ..., num_in): the ops see rows
            if np.ndim(params.W) == 2 and x.shape[-1] != np.shape(params.W)[0]:
                raise ValueError(
                    f"{self.name}: x has {x.shape[-1]} features but W expects {np.shape(params.W)[0]} "
                    f"(x.shape={tuple(x.shape)}, W.shape={np.shape(params.W)})."
                )
            leading, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = ops.weight_multiply(x, params.W)
        if self.use_bias:
            y = ops.bias_add(y, params.B)
        y = self.activation(y)
        return y if leading is None else y.reshape(*leading, y.shape[-1])


def Dense(
    neurons: int,
    activation: Callable[[jax.Array], jax.Array] = ops.sigmoid,
    *,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.standard_normal,
    b_init: initializers.Initializer = initializers.standard_normal,
    dtype: Any = None,
) -> Layer:
    """``activation(bias_add(weight_multiply(x, W), B))`` over the last axis of x. Book: Dense.

    ``x: (batch, num_in)`` as in the book, or ``(batch, ..., num_in)``: every leading index is a
    row (a sequence's time steps), so ``Dense`` on ``(batch, time, num_in)`` equals
    ``TimeDistributed(Dense)``. The defaults are the book's (chapter 3): a sigmoid, and W and B
    drawn from N(0, 1). They saturate wide layers; the recurrent layers default to glorot
    weights and zero biases instead. For those here:
    ``Dense(n, tanh, w_init=glorot_normal, b_init=zeros)``.

    Args:
      neurons: output units.
      activation: any ``array -> array``; default ``sigmoid`` (the book's).
      use_bias: with False, no ``B``: ``activation(weight_multiply(x, W))`` and params
        ``WeightParams(W)`` (nanoGPT's ``bias=False``); with True, ``DenseParams(W, B)``.
      w_init: W's initializer ``(key, shape, dtype)``; default ``standard_normal`` (the book's
        N(0, 1)); ``glorot_normal`` is the modern choice.
      b_init: B's initializer; default ``standard_normal`` (the book's); ``zeros`` is the modern
        choice.
      dtype: parameter dtype; ``None`` is JAX's default float (float32 unless x64 is on).

    Returns:
      A ``Layer`` from ``(batch, ..., num_in)`` to ``(batch, ..., neurons)``; params
      ``DenseParams(W, B)`` with ``W: (num_in, neurons)``, ``B: (1, neurons)``
      (``WeightParams(W)`` with ``use_bias=False``).
    """
    name = f"Dense({neurons}, {activation_name(activation)})"
    _checks.positive_int(name, "neurons", neurons)
    _checks.callable_(name, "activation", activation)
    if not isinstance(use_bias, bool):
        raise TypeError(f"{name}: use_bias must be a bool, got {type(use_bias).__name__} {use_bias!r}.")
    return _Dense(int(neurons), activation, w_init, b_init, default_dtype(dtype), use_bias).layer()


@layer_spec
class _Activation(LayerSpec):
    fn: Callable[[jax.Array], jax.Array]

    @property
    def name(self) -> str:
        return f"Activation({activation_name(self.fn)})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        return check_input_shape(self.name, input_shape, None, "(batch, ...)"), ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key  # deterministic
        if params != ():
            raise TypeError(
                f"{self.name}: params must be (), got {type(params).__name__} (params from another network?)."
            )
        _checks.floating(self.name, "x", x)
        return self.fn(x)


def Activation(fn: Callable[[jax.Array], jax.Array]) -> Layer:
    """``fn(x)`` elementwise, a layer without params: ``serial(Conv2D(...), BatchNorm(),
    Activation(relu))``. Any ``array -> array`` of the same shape (``relu``, ``sigmoid``, ``tanh``,
    ``gelu``, a function of one's own); equal functions give equal layers, shown as
    ``Activation(relu)``.

    Args:
      fn: the elementwise function.

    Returns:
      A ``Layer`` without params (``()``) whose output shape is its input's.
    """
    _checks.callable_("Activation", "fn", fn)
    return _Activation(fn).layer()


@layer_spec
class _Dropout(LayerSpec):
    rate: float

    @property
    def name(self) -> str:
        return f"Dropout({self.rate})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        return check_input_shape(self.name, input_shape, None, "(batch, ...)"), ()

    def _check(self, params: Any, x: Any) -> None:
        if params != ():
            raise TypeError(
                f"{self.name}: params must be (), got {type(params).__name__} (params from another network?)."
            )
        _checks.floating(self.name, "x", x)

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        """Inference: the identity."""
        self._check(params, x)
        refuse_training_key(self.name, key)
        return x

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """Training: each unit dropped with probability ``rate`` (the key draws which)."""
        del row_mask
        given_inputs(self.name, self.inputs, inputs)
        self._check(params, x)
        if _checks.is_concrete(self.rate) and self.rate == 0:
            return x, params
        keep = jax.random.bernoulli(training_key(self.name, key), 1.0 - self.rate, x.shape)
        return ops.dropout(x, jnp.where(keep, 1.0 / (1.0 - self.rate), 0.0).astype(x.dtype)), params


def refuse_training_key(name: str, key: Any) -> None:
    """``apply`` is inference for every layer: a key there would have meant half a training mode."""
    if key is not None:
        raise TypeError(
            f"{name}: apply is inference, which never drops anything, and takes no key; training mode "
            "(dropout, BatchNorm's batch statistics) is one switch for every layer: "
            "y, params = funcnet.train_apply(net)(params, x, key=key) (fit and train_step use it)."
        )


def training_key(name: str, key: Any) -> jax.Array:
    """Training mode's randomness needs a key; returns it."""
    if key is None:
        raise TypeError(
            f"{name}: training mode drops units at random and needs a key: "
            "funcnet.train_apply(net)(params, x, key=jax.random.PRNGKey(0)) (fit passes one per step; "
            "train_step's step takes it as its last argument)."
        )
    checked: jax.Array = key
    return checked


def Dropout(rate: float) -> Layer:
    """Drop each unit with probability ``rate`` in training mode (inverted dropout). Book: Dropout.

    Training mode, ``funcnet.train_apply(net)(params, x, key=key)`` (what ``fit`` and
    ``train_step`` run), drops with the key's draw and scales kept units by ``1 / (1 - rate)``;
    ``apply`` is inference, the identity, and refuses a key. The backward routes gradients
    through the same mask (``ops.dropout``).

    Args:
      rate: the probability of dropping a unit, in ``[0, 1)`` (torch's ``p``; the book's
        ``keep_prob`` is ``1 - rate``).

    Returns:
      A ``Layer`` without params whose output shape is its input's.
    """
    _checks.real_number("Dropout", "rate", rate, low=0.0, high=1.0, high_open=True)
    return _Dropout(number(rate)).layer()


class _Runs(LayerSpec):
    """A combinator whose inference and training modes are one ``run(..., train=...)``; the
    inputs beyond ``x`` reach each child that takes them (``run_child``)."""

    def run(
        self,
        params: Any,
        x: Any,
        *,
        key: jax.Array | None,
        row_mask: jax.Array | None,
        train: bool,
        inputs: dict[str, Any],
    ) -> tuple[Any, Params]:
        raise NotImplementedError

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None, **inputs: Any) -> Any:
        given = given_inputs(self.name, self.inputs, inputs)
        return self.run(params, x, key=key, row_mask=None, train=False, inputs=given)[0]

    def train_apply(
        self, params: Any, x: Any, *, key: jax.Array | None = None, row_mask: jax.Array | None = None, **inputs: Any
    ) -> tuple[Any, Params]:
        given = given_inputs(self.name, self.inputs, inputs)
        return self.run(params, x, key=key, row_mask=row_mask, train=True, inputs=given)

    def init_cache(self, params: Params, batch: int, max_length: int) -> Any:
        check_entries(self.name, params, len(self.children))
        return tuple(cache_of(c, p, batch, max_length) for c, p in zip(self.children, params, strict=True))


@layer_spec
class _Serial(_Runs):
    layers: tuple[Layer, ...]
    label: ClassVar[str] = "serial"

    @property
    def name(self) -> str:
        return f"{self.label}({len(self.layers)} layers)"

    @property
    def children(self) -> tuple[Layer, ...]:
        return self.layers

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        params = []
        for i, (layer, k) in enumerate(zip(self.layers, child_keys(key, len(self.layers)), strict=True)):
            input_shape, p = init_child(self.label, i, layer, k, input_shape)
            params.append(p)
        return input_shape, tuple(params)

    def run(
        self,
        params: Any,
        x: Any,
        *,
        key: jax.Array | None,
        row_mask: jax.Array | None,
        train: bool,
        inputs: dict[str, Any],
    ) -> tuple[Any, Params]:
        """The layers in order, in inference or training mode: ``(y, params)``."""
        check_entries(self.label, params, len(self.layers))
        new = []
        for i, (layer, p, k) in enumerate(zip(self.layers, params, split_key(key, len(self.layers)), strict=True)):
            with blame(self.label, i, layer):
                x, p = run_child(layer, p, x, key=k, row_mask=row_mask, train=train, inputs=inputs)
            new.append(p)
        return x, tuple(new)

    def decode(self, params: Any, cache: Any, x: Any, *, offset: jax.Array, **inputs: Any) -> tuple[Any, Any]:
        """The layers in order, each with its own cache."""
        check_entries(self.label, params, len(self.layers))
        given = given_inputs(self.name, self.inputs, inputs)
        caches = []
        for i, (layer, p, c) in enumerate(zip(self.layers, params, cache, strict=True)):
            with blame(self.label, i, layer):
                x, c = decode_child(layer, p, c, x, offset=offset, inputs=given)
            caches.append(c)
        return x, tuple(caches)


def check_layers(fn: str, layers: Sequence[Any], minimum: int = 1) -> tuple[Layer, ...]:
    """Every part of a combinator must be a Layer, and there must be at least ``minimum``."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{fn}: layer {i} must be a Layer(init, apply), got {type(layer).__name__}.")
    if len(layers) < minimum:
        wanted = "one layer" if minimum == 1 else f"{minimum} layers"
        raise ValueError(f"{fn}: at least {wanted} is needed, got {len(layers) or 'none'}.")
    return tuple(layers)


def check_entries(fn: str, params: Any, count: int) -> None:
    """A combinator's params are a tuple with one entry per layer."""
    if not isinstance(params, tuple) or len(params) != count:
        if is_init_output(params):  # (two layers: the pair passes, and the first layer is given the shape)
            raise TypeError(
                f"{fn}: params must be a tuple with one entry per layer ({count}), got {params_text(params)}: "
                "init returns (output_shape, params); unpack it: _, params = net.init(key, input_shape)."
            )
        got = (
            f"{type(params).__name__} of {len(params)}" if isinstance(params, (tuple, list)) else type(params).__name__
        )
        raise TypeError(
            f"{fn}: params must be a tuple with one entry per layer ({count}), "
            f"got {got} (params from another network?)."
        )


def child_keys(key: jax.Array, count: int) -> tuple[jax.Array, ...]:
    """A combinator's ``init``: ``jax.random.split(key, count)``, one key per child. A concrete raw
    threefry key (``jax.random.PRNGKey``'s) is split on the host, bit for bit (``_host_split``),
    and its children placed where it lives; another concrete key by a program compiled once per
    count and key type like a layer's init (run op by op, the split and the row-by-row unstacking
    compiled two programs at the default level)."""
    if not _compilable(key):
        return tuple(jax.random.split(key, count))
    if _raw_threefry(key):
        place = (lambda a: jax.device_put(a, key.sharding)) if key.committed else jax.device_put
        return tuple(place(words) for words in _host_split.split(np.asarray(key), count))
    keys: tuple[jax.Array, ...] = _split_program(count, _on_cpu(key.sharding))(key)
    return keys


def _raw_threefry(key: jax.Array) -> bool:
    """A raw uint32 key of the default implementation, threefry2x32."""
    impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]
    return key.dtype == np.uint32 and key.shape == (2,) and impl == "threefry2x32"


@functools.lru_cache(maxsize=64)
def _split_program(count: int, cpu: bool) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    options = _init_options(cpu, count)
    return jax.jit(lambda key: tuple(jax.random.split(key, count)), compiler_options=options)


def split_key(key: jax.Array | None, count: int) -> list[jax.Array | None]:
    """One key per layer, or ``None`` for each (inference)."""
    return [None] * count if key is None else list(jax.random.split(key, count))


def serial(*layers: Layer) -> Layer:
    """Compose layers in order; the result is itself a Layer. Book: NeuralNetwork.

    ``init`` and ``apply`` split their ``key`` into one per layer. Params are a tuple with one
    entry per layer.

    Args:
      *layers: the layers, first applied first; ``apply``'s keyword inputs (``kv_lengths``,
        ``mask``) reach each layer that takes them.

    Returns:
      A ``Layer`` whose output shape is the last layer's.
    """
    return _Serial(check_layers("serial", layers)).layer()


_NESTED = re.compile(r"(\w+): layer ([\d.]+) ")


class blame:
    """Name the path of a combinator's child ``index`` in an error raised inside it.

    ``serial: layer 1 (Dense(4, tanh)): ...``; an error from a nested combinator extends its
    path, ``serial: layer 2.1 (...)``, so the message leads from the outermost network down.
    """

    def __init__(self, combinator: str, index: int, layer: Layer):
        self.combinator, self.index, self.name = combinator, index, layer_name(layer)

    def __enter__(self) -> blame:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if kind not in (ValueError, TypeError):
            return
        message = str(error)
        nested = _NESTED.match(message)
        if nested:  # from a nested combinator: extend its path, 1 -> 2.1
            raise kind(f"{self.combinator}: layer {self.index}.{nested.group(2)} {message[nested.end() :]}") from error
        message = message.removeprefix(f"{self.name}: ")  # the layer's own name, said once
        raise kind(f"{self.combinator}: layer {self.index} ({self.name}): {message}") from error


def init_child(combinator: str, index: int, layer: Layer, key: jax.Array, input_shape: Any) -> tuple[Any, Params]:
    """``layer.init`` for a combinator's child ``index``, with errors naming its path."""
    with blame(combinator, index, layer):
        return layer.init(key, input_shape)


def param_count(params: Params, *, state: bool = False) -> int:
    """The number of trained scalars in a params pytree; with ``state=True``, of its layer state
    (BatchNorm's running statistics) instead.

    Args:
      params: a network's params (arrays or ``jax.ShapeDtypeStruct``s).
      state: count the layer state instead of the trained params; default ``False``.

    Returns:
      The count, a Python int.
    """
    if state:
        return state_count(params)
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(split_state(params)[0])))


def _shapes(layer: Layer, input_shape: Any) -> tuple[Any, Params]:
    """``init``'s output shape and abstract params, without computing anything."""
    result = {}

    def run(key: jax.Array) -> Params:
        result["shape"], params = layer.init(key, input_shape)
        return params

    params = jax.eval_shape(run, jax.random.PRNGKey(0))
    return result["shape"], params


Row = tuple[str, int, str, Any, int, int]


class _Recorded:
    """A leaf layer's ``init`` that adds its row to ``rows`` (summary's own list) when called."""

    def __init__(self, layer: Layer, label: str, depth: int, rows: list[Row]):
        self.layer, self.label, self.depth, self.rows = layer, label, depth, rows
        self.__name__ = layer_name(layer)  # what ``blame`` names it by

    def __call__(self, key: jax.Array, input_shape: Any) -> tuple[Any, Params]:
        output_shape, params = self.layer.init(key, input_shape)
        row = (self.label, self.depth, self.__name__, output_shape, param_count(params), state_count(params))
        self.rows.append(row)
        return output_shape, params


class _RecordedOwn(_Init):
    """A combinator's ``init`` (still its spec's, so ``spec_of`` finds it) that adds a row for the
    parameters it owns beyond its children's rows, when there are any: a block's own scale, a
    tied embedding, a learned position table."""

    __slots__ = ("depth", "label", "rows")

    def __init__(self, spec: LayerSpec, label: str, depth: int, rows: list[Row]):
        super().__init__(spec, "init")
        self.label, self.depth, self.rows = label, depth, rows

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = len(self.rows)
        output_shape, params = super().__call__(*args, **kwargs)
        below = self.rows[start:]
        own = param_count(params) - sum(row[4] for row in below)
        own_state = state_count(params) - sum(row[5] for row in below)
        if own or own_state:
            self.rows.insert(start, (self.label, self.depth, f"{self.owner.name} (own)", None, own, own_state))
        return output_shape, params


def _recording(layer: Layer, path: tuple[int, ...], rows: list[Row]) -> Layer:
    """``layer`` with every leaf layer below it recording its row: the layer tree is walked through
    each spec's ``children`` and rebuilt with recording leaves, so the rows belong to this call."""
    spec = spec_of(layer)
    if spec is None or not spec.children:
        return Layer(_Recorded(layer, ".".join(map(str, path)), max(len(path) - 1, 0), rows), layer.apply)
    children = spec.children
    replacements = iter([_recording(child, (*path, i), rows) for i, child in enumerate(children)])
    found = 0

    def swap(value: Any) -> Any:
        nonlocal found
        if isinstance(value, Layer):
            found += 1
            return next(replacements)
        return tuple(map(swap, value)) if isinstance(value, tuple) else value

    fields = {f.name: swap(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.init}  # type: ignore[arg-type]
    if found != len(children):  # children not held as fields in order: one row for the whole
        return Layer(_Recorded(layer, ".".join(map(str, path)), max(len(path) - 1, 0), rows), layer.apply)
    rebuilt: LayerSpec = dataclasses.replace(spec, **fields)  # type: ignore[type-var]  # every spec is a dataclass
    return Layer(_RecordedOwn(rebuilt, ".".join(map(str, path)), len(path), rows), Method(rebuilt, "apply"))


def summary(net: Layer, input_shape: Any) -> str:
    """A text table of each layer's path, name, output shape and parameter count, with the total.

    Combinators are not rows themselves: their layers are, numbered by path (``2.1`` is layer 1
    of the combinator at position 2), branches included. A combinator that owns parameters
    beyond its layers' (a block's own scale, a tied embedding) gets a row ``Name (own)`` for
    them, first among its layers' rows. The total is ``param_count`` of the network's params,
    always. A network with layer state (BatchNorm) gets a ``state`` column and total too: those
    scalars are not trained, nor counted in params.

    Args:
      net: the network, any ``Layer``.
      input_shape: the input's shape, batch first (``-1`` allowed), as ``init`` takes it.

    Returns:
      The table as one str (print it); nothing is computed, only shapes are traced.
    """
    if not isinstance(net, Layer):
        raise TypeError(f"summary: net must be a Layer(init, apply), got {type(net).__name__}.")
    if not isinstance(input_shape, (tuple, list)):
        raise TypeError(f"summary: input_shape must be a tuple of ints, got {input_shape!r}.")
    rows: list[Row] = []
    _shapes(_recording(net, (), rows), tuple(input_shape))
    table = [
        (label, "  " * depth + name, "-" if shape is None else str(_plain(shape)), count, state)
        for label, depth, name, shape, count, state in rows
    ]
    stateful = any(r[4] for r in table)
    header = ("#", "layer", "output shape", "params", "state")
    columns = 5 if stateful else 4
    widths = [max(len(str(r[c])) for r in [*table, header]) for c in range(columns)]
    fmt = lambda r: "  ".join(f"{r[c]:<{widths[c]}}" if c < 3 else f"{r[c]:>{widths[c]}}" for c in range(columns))
    total = sum(r[3] for r in table)
    lines = [fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in table]
    footer = [f"Total params: {total:,}"]
    if stateful:
        footer.append(f"State (not trained): {sum(r[4] for r in table):,}")
    return "\n".join([*lines, *footer])


def _plain(shape: Any) -> Any:
    """A shape, or the shapes of several inputs, as plain tuples for display."""
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], (tuple, list)):
        return tuple(_plain(s) for s in shape)
    return tuple(shape)
