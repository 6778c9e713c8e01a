"""Data larger than memory: ``fit(..., stream=True)`` feeds host data to the device a segment at a time.

Contract, stated once:

* **What streams.** Host data: NumPy arrays, ``np.memmap`` and any object with ``shape``,
  ``dtype`` and indexing by an array of row indices (``x[np.array([3, 1, 2])]``, as h5py
  datasets and zarr arrays allow; rows are read in increasing order, then reordered). It stays
  where it is; only the rows of the next segment are read.
* **Same result.** Epoch ``e``'s batches are ``program.epoch_batches`` computed on the host's
  CPU device (the same keyed permutation of each shard's rows, ``distributed.shard_orders``,
  padded the same way), turned into global rows (``distributed.global_rows``), and every step is
  ``program.train_steps``, the step the device-resident fit runs, over a segment of batches whose
  rows were gathered on the host; each epoch ends with ``program.end_epoch`` (training loss,
  evaluation, early stopping). Evaluation data streams too, batch by batch in the order
  ``program._evaluate`` adds them (``program.eval_layout``). So a streamed fit equals the
  device-resident one bit for bit: params, optimizer state, history, metrics, early stopping,
  a masked last batch, and checkpoints (the checkpoints of one resume the other).
* **Inputs beyond x.** ``(x, y, inputs)`` data streams its inputs (each a host array with the
  rows first) as it streams ``x``: the same rows are read from each, and the segment carries them
  as ``program.WithInputs``, which ``program.train_steps`` and the evaluation pass to the network.
* **Double buffering.** One worker thread gathers segment ``i + 1`` and starts its transfer
  while the device runs segment ``i``; the host waits for segment ``i - 1`` before it asks for
  ``i + 2``, so at most three segments (``SEGMENT_BYTES`` each, 16 MiB) are held at once,
  whatever the data's size. The next epoch's first segment is gathered during the last one's.
* **Memory of the model.** The streamed programs donate the state they carry (``_steps_jit``,
  ``_end_jit``, ``_end_rollback_jit``), as ``program.segment`` donates its state, so a streamed
  fit holds its params and optimizer state as many times as the device-resident fit, not one
  more (``benchmarks/bench_stream.py``). ``run`` consumes the state it is given, as ``segment``
  does; the caller's params are never donated (``program.fresh_state`` copies them).
* **Checks while streaming.** Data larger than memory is not read twice, so what ``fit``
  checks up front on device data (finite values) is checked here on each segment as it is
  read: a NaN or Inf raises a ``ValueError`` naming the row. So do a ``np.memmap`` whose file
  changes size and an object whose row count changes. An error raised mid-run leaves nothing
  returned as if complete (with ``checkpoint_dir``, the last checkpoint is intact).
* **Checkpoints.** With ``checkpoint_dir``, the fingerprint's digest of the data's values
  (``checks._digest``) is computed in one pass before training, a segment of rows at a time
  (``digest``), and equals the device-resident fit's.
* **Progress.** With ``progress=True`` the bar shows the rows per second read; a segment that
  takes more than ``STALL_SECONDS`` to arrive shows as ``stalled`` with the time waited.
* **Meshes and shards.** The host gathers each global batch as every shard's local batch side
  by side, as the device-resident fit forms it, so a streamed fit under a mesh (or with
  ``shards=n``) equals the device-resident one bit for bit. Each segment is placed sharded
  along the mesh's data axis: each device receives its shard's rows. Under ``jax.distributed``
  every process is given the whole host data and reads only the rows of its own devices'
  shards (``distributed.local_shards``, ``_read``); keys are placed replicated by each process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import mmap
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from funcnet._values import Static, combine
from funcnet.train import checks, distributed, progress
from funcnet.train.program import (
    Config,
    TrainState,
    _averaged,
    _eval_average,
    _eval_totals,
    _means,
    end_epoch,
    epoch_batches,
    eval_batch_rows,
    eval_layout,
    no_evaluation,
    rows_map,
    split_inputs,
    train_steps,
    with_inputs,
)

__all__ = ["SEGMENT_BYTES", "STALL_SECONDS", "check_host_data", "chooses_stream", "digest", "runner", "shape_of"]

SEGMENT_BYTES = 16 << 20  # rows gathered and transferred at once (at least one batch)
STALL_SECONDS = 2.0  # a segment later than this shows as stalled
Params = Any


# --- which fits stream -------------------------------------------------------------------------


def default_threshold() -> int:
    """Half the default device's memory (its ``bytes_limit``; a CPU device: the machine's RAM)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # a backend without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _parts(*datas: Any) -> list[Any]:
    """The arrays of data sets ``(x, y)`` or ``(x, y, inputs)``."""
    parts = []
    for data in datas:
        if isinstance(data, (tuple, list)) and len(data) in (2, 3):
            parts += [data[0], data[1]]
            if len(data) == 3 and isinstance(data[2], dict):
                parts += [a for a in data[2].values() if a is not None]
    return parts


def chooses_stream(stream: Any, threshold: Any, train_data: Any, eval_data: Any) -> bool:
    """``fit``'s ``stream`` rule: ``True``/``False`` decide; ``None`` streams host data (not
    ``jax.Array``s) that is not an in-memory array (an object indexable by rows) or whose bytes,
    train and eval together, exceed ``threshold`` (default: ``default_threshold()``)."""
    if stream is not None and not isinstance(stream, (bool, np.bool_)):
        raise TypeError(f"fit: stream must be None, True or False, got {type(stream).__name__}.")
    if threshold is not None and (
        isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, np.integer)) or threshold < 0
    ):
        raise ValueError(f"fit: stream_threshold must be None or a number of bytes >= 0, got {threshold!r}.")
    if stream is not None:
        return bool(stream)
    parts = _parts(train_data, eval_data)
    if not parts or any(isinstance(a, jax.Array) for a in parts):
        return False  # device data (or traced, under jit/vmap): nothing to stream
    if any(not isinstance(a, np.ndarray) and hasattr(a, "shape") and hasattr(a, "__getitem__") for a in parts):
        return True
    host = sum(a.nbytes for a in parts if isinstance(a, np.ndarray))
    return host > (default_threshold() if threshold is None else int(threshold))


# --- checks ------------------------------------------------------------------------------------


def check_host_data(name: str, data: Any) -> tuple[Any, Any, None, dict[str, Any]]:
    """``check_data``'s promises for data that stays on the host, without reading it: a pair
    ``(x, y)`` or a triple ``(x, y, inputs)`` (``checks.split_data``) with shapes, dtypes and
    matching rows, each array indexable by an array of rows. Returns ``(x, y, None, inputs)``."""
    fn = "fit"
    x, y, inputs = checks.split_data(name, data)
    named = {f"{name} inputs[{key!r}]": value for key, value in inputs.items()}
    parts = ((f"{name} x", x), (f"{name} y", y), *named.items())
    for part, array in parts:
        if isinstance(array, jax.Array):
            raise TypeError(
                f"{fn}: stream=True streams host data (NumPy arrays, np.memmap, or objects indexable by "
                f"an array of rows), but {part} is a jax.Array already on a device; pass stream=False."
            )
        shape, dtype = getattr(array, "shape", None), getattr(array, "dtype", None)
        if not isinstance(shape, tuple) or dtype is None or not hasattr(array, "__getitem__"):
            raise TypeError(
                f"{fn}: {part} must be an array, or an object with shape, dtype and indexing by an array "
                f"of row indices to stream, got {type(array).__name__}."
            )
        dtype = np.dtype(dtype)
        if part in named:
            if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
                raise TypeError(f"{fn}: {part} must have a numeric or bool dtype, got {dtype}.")
        elif not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
            raise TypeError(
                f"{fn}: {part} must have a floating or integer dtype (integers: labels or token ids), got {dtype}."
            )
    if len(x.shape) < 2 and not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise ValueError(f"{fn}: {name} x must be at least 2-D (rows, features...), got shape {tuple(x.shape)}.")
    if len(x.shape) < 1 or len(y.shape) < 1:
        raise ValueError(
            f"{fn}: {name} x and y must have a row axis, got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: {name} x has {x.shape[0]} rows but y has {y.shape[0]}; they must match.")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must have at least one row, got 0.")
    checks.check_input_rows(fn, f"{name} inputs", inputs, x.shape[0])
    for part, array in parts:
        rows = np.array([0, array.shape[0] - 1])
        try:
            probe = np.asarray(array[rows])
        except Exception as error:  # whatever the object raises, said plainly
            raise TypeError(
                f"{fn}: {part} ({type(array).__name__}) cannot be indexed by an array of row indices, which "
                f"streaming needs ({part}[np.array([0, {array.shape[0] - 1}])] raised "
                f"{type(error).__name__}: {error})."
            ) from error
        if probe.shape != (2, *array.shape[1:]):
            raise TypeError(
                f"{fn}: {part} ({type(array).__name__}) indexed by an array of 2 row indices must give shape "
                f"{(2, *array.shape[1:])}, got {probe.shape}; streaming needs NumPy-style row indexing."
            )
    return x, y, None, inputs  # the digest of the values (``digest``) is taken only when a checkpoint needs it


def digest(x: Any, y: Any, inputs: dict[str, Any] | None = None) -> str:
    """``checks.check_data``'s digest of ``(x, y, inputs)``'s values, computed a segment of rows at a
    time (bounded memory), so a streamed run's checkpoints and a device-resident run's match."""
    inputs = inputs or {}
    digests: dict[int, str] = {}  # one array given twice (random_windows' x and y): one pass over it
    for a in (x, y, *inputs.values()):
        if id(a) not in digests:
            digests[id(a)] = _array_digest(a)
    return checks.data_digest([digests[id(a)] for a in (x, y, *inputs.values())], inputs)


def _array_digest(array: Any) -> str:
    rows, per_row = array.shape[0], int(np.prod(array.shape[1:], dtype=np.int64))
    itemsize, total = np.dtype(array.dtype).itemsize, rows * per_row
    chunk = max(1, SEGMENT_BYTES // max(1, per_row * itemsize))
    sums = np.zeros(2, np.uint32)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        rows_read = array[start:stop] if isinstance(array, np.ndarray) else array[np.arange(start, stop)]
        block = np.ascontiguousarray(np.asarray(rows_read, np.dtype(array.dtype)))
        words, first = checks._words(np, block), start * per_row
        if itemsize < 8:
            sums += checks._digest(np, words, first)
        else:  # the low words of every value, then the high ones (as ``_words`` lays out the whole array)
            sums += checks._digest(np, words[: block.size], first) + checks._digest(
                np, words[block.size :], total + first
            )
    return "".join(f"{int(d):08x}" for d in sums)


def shape_of(array: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype ``array`` has on the device (the checkpoint fingerprint compares these)."""
    return jax.ShapeDtypeStruct(tuple(array.shape), jax.dtypes.canonicalize_dtype(np.dtype(array.dtype)))


def _sources(name: str, features: Any) -> Any:
    """A ``_Source`` for ``x`` (and, in ``WithInputs``, one for each input beyond it)."""
    x, inputs = split_inputs(features)
    source = _Source(f"{name} x", x)
    return with_inputs(source, {key: _Source(f"{name} inputs[{key!r}]", a) for key, a in inputs.items()})


def _row_bytes(sources: Any) -> int:
    """One row's bytes of ``x`` and its inputs together."""
    return sum(source.row_bytes() for source in jax.tree_util.tree_leaves(sources))


class _Source:
    """One host array: gathers rows in increasing order, checks they are finite and that the
    data has not changed size."""

    def __init__(self, part: str, array: Any):
        self.part, self.array = part, array
        self.rows = array.shape[0]
        self.dtype = jax.dtypes.canonicalize_dtype(np.dtype(array.dtype))
        self.floating = np.issubdtype(np.dtype(array.dtype), np.floating)
        self.file = getattr(array, "filename", None) if isinstance(array, np.memmap) else None
        self.file_size = os.stat(self.file).st_size if self.file else None
        self.layout = _file_layout(array)

    def _unchanged(self) -> None:
        if self.file is not None:
            try:
                size: int | None = os.stat(self.file).st_size
            except OSError:
                size = None
            if size != self.file_size:
                raise ValueError(
                    f"fit: {self.part} is a np.memmap of {self.file!r}, whose file changed size while fitting "
                    f"(was {self.file_size} bytes, now {size}); its rows are no longer the data the fit began "
                    "with. Nothing was returned; restart the fit on the new data."
                )
        rows = self.array.shape[0]
        if rows != self.rows:
            raise ValueError(
                f"fit: {self.part} changed from {self.rows} to {rows} rows while fitting; its rows are no longer "
                "the data the fit began with. Nothing was returned; restart the fit on the new data."
            )

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (in that order), as a fresh array of the device dtype."""
        self._unchanged()
        if type(self.array) is np.ndarray:
            block = _take(self.array, index)
        else:  # read each row once, in increasing order (disk-friendly; h5py requires it), then reorder
            unique, inverse = np.unique(index, return_inverse=True)
            self._advise(unique)
            rows = _take(self.array, unique) if isinstance(self.array, np.memmap) else np.asarray(self.array[unique])
            block = _take(rows, inverse)
        block = np.asarray(block, self.dtype)
        self._finite(block, index)
        return block

    def _finite(self, block: np.ndarray, rows: np.ndarray | int) -> None:
        """A floating ``block`` of rows ``rows`` (their numbers, or the first of consecutive
        ones) must be finite, else the first bad row is named."""
        if self.floating and not np.isfinite(block).all():
            at = int(np.argmin(np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)))
            row = int(rows) + at if np.ndim(rows) == 0 else int(np.asarray(rows)[at])
            raise ValueError(f"fit: {self.part} must be finite, got NaN or Inf values (first at row {row}).")

    def _advise(self, rows: np.ndarray) -> None:
        """Ask the kernel to read a memmap's ``rows`` (sorted) now, all at once: the page faults of
        the gather then wait on reads already in flight instead of issuing one small read each."""
        if self.layout is None or self.file is None or rows.size == 0:
            return
        start, stride, row_bytes = self.layout
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts, lasts = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, rows.size - 1]]
        try:
            descriptor = os.open(self.file, os.O_RDONLY)
        except OSError:
            return  # only advice: the gather reads the rows anyway
        try:
            for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
                os.posix_fadvise(
                    descriptor, start + first * stride, (last - first) * stride + row_bytes, os.POSIX_FADV_WILLNEED
                )
        finally:
            os.close(descriptor)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop - 1``."""
        if isinstance(self.array, np.ndarray):
            self._unchanged()
            block = np.array(self.array[start:stop], self.dtype)
            self._finite(block, start)
            return block
        return self.gather(np.arange(start, stop))

    def row_bytes(self) -> int:
        return int(np.prod(self.array.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


_GATHER_ROWS = 2048  # rows per thread of a gather
_gatherers: list[concurrent.futures.ThreadPoolExecutor] = []


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]``, split across threads when large: NumPy copies without the GIL, so a
    many-core host gathers (and a memmap faults its pages in) in parallel."""
    parts = min(os.cpu_count() or 1, 8, index.shape[0] // _GATHER_ROWS)
    if parts <= 1:
        return np.asarray(array[index])
    if not _gatherers:
        _gatherers.append(concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8), "funcnet-gather"))
    out = np.empty((index.shape[0], *array.shape[1:]), array.dtype)
    bounds = np.linspace(0, index.shape[0], parts + 1).astype(np.int64).tolist()

    def part(i: int) -> None:  # "clip": the indices are valid, and "raise" would buffer the copy
        np.take(array, index[bounds[i] : bounds[i + 1]], axis=0, out=out[bounds[i] : bounds[i + 1]], mode="clip")

    list(_gatherers[0].map(part, range(parts)))
    return out


def _file_layout(array: Any) -> tuple[int, int, int] | None:
    """For a ``np.memmap`` (or a view of one) whose rows are each contiguous in its file: the file
    offset of row 0, the row stride and a row's bytes; else None."""
    if not isinstance(array, np.memmap) or array.ndim < 1 or array.shape[0] == 0 or array.strides[0] <= 0:
        return None
    if not (hasattr(os, "posix_fadvise") and (array.ndim == 1 or array[0].flags.c_contiguous)):
        return None
    root: np.ndarray = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap):
        return None
    start = int(root.offset) + (array.ctypes.data - root.ctypes.data)
    return start, int(array.strides[0]), int(array[0].nbytes) if array.ndim > 1 else array.itemsize


# --- the compiled programs (each selected by the same Static and Config as the fit's) -----------


def _steps(
    carry: tuple[Params, Any, Any],
    hyper: list[Any],
    xs: Any,
    ys: jax.Array,
    first: jax.Array,
    dropout_key: jax.Array,
    *,
    static: Static,
    config: Config,
) -> tuple[tuple[Params, Any, Any], jax.Array]:
    """Batches ``first`` onwards of an epoch, their rows given: ``xs``/``ys`` are ``(batches, batch_size, ...)``
    (``xs`` with the inputs beyond x, ``program.WithInputs``, if any); ``carry`` is ``(params,
    opt_state, loss_scale)``, as ``program.train_steps`` takes it."""
    numbers = jnp.arange(ys.shape[0])  # the device fit's batch numbers are jnp.arange's dtype too
    numbers = numbers + first.astype(numbers.dtype)
    after, sums = train_steps(
        hyper, carry, ((xs, ys), numbers), dropout_key, lambda rows: rows, static=static, config=config
    )
    return after, sums


def _end(
    carry: tuple[Params, Any, Any],
    state: TrainState,
    kept: tuple[Params, Any, Any],
    sums: jax.Array,
    values: dict[str, jax.Array],
    min_delta: Any,
    *,
    config: Config,
) -> TrainState:
    """``end_epoch``, ``state`` given without its params, optimizer state and loss scale: those are
    ``kept``, the epoch's starting ones (the ones a diverged epoch without eval data keeps)."""
    params, opt_state, loss_scale = kept
    whole = state._replace(params=params, opt_state=opt_state, loss_scale=loss_scale)
    return end_epoch(whole, carry, sums, lambda is_eval, p: values, min_delta, config=config)


def _eval_block(
    params: Params,
    total: dict[str, jax.Array],
    hyper: list[Any],
    xs: Any,
    ys: jax.Array,
    *,
    static: Static,
    config: Config,
) -> dict[str, jax.Array]:
    apply, loss, _, metrics, _ = combine(hyper, static)
    return _eval_totals(apply, loss, metrics, params, total, xs, ys, config)


def _eval_batch(
    params: Params, hyper: list[Any], x: Any, y: jax.Array, *, static: Static, config: Config
) -> dict[str, jax.Array]:
    apply, loss, _, metrics, _ = combine(hyper, static)
    return _means(apply, loss, metrics, params, x, y, jnp.dtype(config.dtype))


@functools.partial(jax.jit, static_argnames=("config",))
def _watched(carry: tuple[Params, Any, Any], *, config: Config) -> Params:
    """The params an evaluation sees: the moving average with ``eval_ema``, as ``end_epoch`` picks."""
    params, opt_state, _ = carry
    watched: Params = _averaged(opt_state, params) if config.eval_ema else params
    return watched


# Donation, as the device fit's ``program.segment`` does: the steps write the carry they return
# (params, optimizer state, loss scale) into the buffers of the one they take, and the end of an
# epoch writes the new state into the old one's, so a streamed fit holds the training state as
# many times as the device fit (``benchmarks/bench_stream.py``). What is donated is always the
# fit's own: ``program.fresh_state`` copies the caller's params, and ``run`` keeps a copy
# (``_copy``) of an epoch's start when it must outlive the epoch's first segment. JAX 0.10 returns
# fresh buffers from a jitted function, so no output is ever an input forwarded.
# Which of the epoch end's inputs are donated decides whether XLA needs a temporary state (measured
# with ``memory_analysis()``, JAX 0.10.2 on the CPU; JAX aliases each output to the first unused
# donated input of its shape, in argument order). With eval data: the carry, then the state (the new
# params stay where they are, the best ones are selected into the old best's buffers): no
# temporaries. Without: the state and the epoch's start (a diverged epoch's rollback selects into
# the start's buffers): no temporaries; donating the carry there instead cost a whole state of them.
_steps_jit = jax.jit(_steps, static_argnames=("static", "config"), donate_argnums=(0,))
_end_jit = jax.jit(_end, static_argnames=("config",), donate_argnums=(0, 1))  # with eval data
_end_rollback_jit = jax.jit(_end, static_argnames=("config",), donate_argnums=(1, 2))  # without
_eval_block_jit = jax.jit(_eval_block, static_argnames=("static", "config"))
_eval_batch_jit = jax.jit(_eval_batch, static_argnames=("static", "config"))
_eval_average_jit = jax.jit(_eval_average, static_argnames=("config",))
_epoch_batches_jit = jax.jit(epoch_batches, static_argnames=("config",))
_no_evaluation_jit = jax.jit(no_evaluation, static_argnames=("config",))


@jax.jit
def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.copy, tree)


@jax.jit
def _zeros(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    zeros: dict[str, jax.Array] = jax.tree_util.tree_map(jnp.zeros_like, values)
    return zeros


# --- the host side: what to read, in which order, prefetched -----------------------------------


class _Job(NamedTuple):
    epoch: int
    kind: str  # "train": batches first..; "eval": full eval batches; "eval last": the partial one
    first: int
    arrays: tuple[Any, Any]  # (x, y) on the device once gathered, x with the inputs beyond it if any
    dropout_key: Any
    rows: int  # rows read


def _place(block: Any, config: Config, rows_axis: int | None) -> Any:
    """Start moving a gathered block (or a key) to the device(s) the fit runs on.

    Without a mesh: the default device. With a mesh: training and eval rows (axis
    ``rows_axis``) sharded along its data axis, as the device-resident fit holds them; keys
    (``rows_axis=None``) replicated, each process placing its own copy (``put_replicated``:
    no collective per segment).
    """
    if config.mesh is None:
        return jax.device_put(block, jax.local_devices()[0])
    if rows_axis is None and jax.process_count() > 1:
        return distributed.put_replicated(block, config.mesh)
    spec: list[str | None] = [None] * np.ndim(block)
    if rows_axis is not None:
        spec[rows_axis] = config.data_axis
    return jax.device_put(block, NamedSharding(config.mesh, PartitionSpec(*spec)))


def _read(source: _Source, rows: np.ndarray, config: Config, mine: tuple[int, ...] | None) -> Any:
    """Rows ``rows`` of ``source`` (``(..., shards, k)`` global row numbers: each shard's ``k``
    rows), on their way to the devices as one array ``(..., shards * k, features...)`` whose
    shard ``s`` is rows ``s * k ..``. ``mine``: the shards this process reads and places (its
    devices'), the others' rows are not read here; None: all of them."""
    lead, (shards, k), features = rows.shape[:-2], rows.shape[-2:], source.array.shape[1:]
    if mine is None:
        return _place(source.gather(rows.reshape(-1)).reshape(*lead, shards * k, *features), config, len(lead))
    own = source.gather(rows[..., mine, :].reshape(-1)).reshape(*lead, len(mine), k, *features)
    where = {s: i for i, s in enumerate(mine)}

    def piece(index: Any) -> np.ndarray:  # the rows of one of this process's devices
        shard = where[(index[len(lead)].start or 0) // k]
        at: tuple[Any, ...] = (*index[: len(lead)], shard, slice(None), *index[len(lead) + 1 :])
        part: np.ndarray = own[at]
        return part

    assert config.mesh is not None  # several processes' shards: a mesh
    sharding = NamedSharding(config.mesh, PartitionSpec(*[None] * len(lead), config.data_axis))
    return jax.make_array_from_callback((*lead, shards * k, *features), sharding, piece)


def _host_cpu() -> Any:
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS excludes it): compute the order where it runs
        return jax.local_devices()[0]


class _Plan:
    """The segments to read, in the order the training loop uses them, from ``epoch`` to ``stop``."""

    def __init__(self, x: Any, y: _Source, ex: Any, ey: _Source | None, key: jax.Array, config: Config):
        """``x``, ``ex``: a ``_Source``, or ``WithInputs`` of them (the inputs beyond x read alike)."""
        self.x, self.y, self.ex, self.ey, self.config = x, y, ex, ey, config
        c = config
        self.per_segment = max(
            1, min(c.batches, SEGMENT_BYTES // max(1, c.batch_size * (_row_bytes(x) + y.row_bytes())))
        )
        self.cpu = _host_cpu()
        self.key = jax.device_put(key, self.cpu)
        self.mine = distributed.local_shards(c.mesh, c.data_axis)  # the shards this process reads
        self.host_config = c._replace(mesh=None)  # each shard's order computed on the host: the same numbers
        if ex is not None and ey is not None:
            size, full, rest = eval_layout(c)
            self.eval_size = size
            self.eval_full, self.eval_rest = (full, rest) if c.eval_rows > c.eval_batch_size else (0, c.eval_rows)
            per = SEGMENT_BYTES // max(1, size * (_row_bytes(ex) + ey.row_bytes()))
            self.eval_per_segment = max(1, min(max(self.eval_full, 1), per))

    def warm(self, epoch: int) -> None:
        """Compile the epoch-order program before streaming starts."""
        with jax.default_device(self.cpu):
            jax.block_until_ready(_epoch_batches_jit(self.key, np.int32(epoch), config=self.host_config))

    def segments(self) -> int:
        return -(-self.config.batches // self.per_segment)

    def jobs(self, epoch: int, stop: int) -> Iterator[Callable[[], _Job]]:
        """Each job as a function that reads its rows and starts their transfer (run by the worker)."""
        c = self.config
        for e in range(epoch, stop):
            batches: list[Any] = []

            def order(e: int = e, batches: list[Any] = batches) -> tuple[np.ndarray, jax.Array]:
                if not batches:
                    with jax.default_device(self.cpu):
                        index, dropout_key = _epoch_batches_jit(self.key, np.int32(e), config=self.host_config)
                    batches += [np.asarray(index), _place(dropout_key, c, None)]
                return batches[0], batches[1]

            for first in range(0, c.batches, self.per_segment):
                yield functools.partial(self._train, e, first, order)
            if self.ex is not None and (e + 1) % c.eval_every == 0:
                yield from self._eval_jobs(e)

    def _train(self, e: int, first: int, order: Callable[[], tuple[np.ndarray, Any]]) -> _Job:
        c = self.config
        index, dropout_key = order()
        local = index[first : first + self.per_segment]  # (count, shards, k) each shard's own rows
        rows = distributed.global_rows(local, c.rows).reshape(local.shape)
        arrays = (rows_map(lambda a: _read(a, rows, c, self.mine), self.x), _read(self.y, rows, c, self.mine))
        return _Job(e, "train", first, arrays, dropout_key, rows.size)

    def _eval_jobs(self, e: int) -> Iterator[Callable[[], _Job]]:
        assert self.ex is not None and self.ey is not None  # only called with eval data
        ex, ey, c = self.ex, self.ey, self.config
        size = self.eval_size

        def rows(sources: Any, first: int, count: int) -> Any:
            """Full batches ``first .. first + count - 1``, ``(count, size, ...)``, on their way."""
            return rows_map(lambda a: rows_of(a, first, count), sources)

        def rows_of(a: _Source, first: int, count: int) -> Any:
            if c.shards == 1:  # batches of consecutive rows
                block = a.slice(first * size, (first + count) * size)
                return _place(block.reshape(count, size, *block.shape[1:]), c, 1)
            index = eval_batch_rows(first, count, c).reshape(count, c.shards, size // c.shards)
            return _read(a, index, c, self.mine)  # every shard's rows side by side

        def last_rows(sources: Any) -> Any:
            """The last batch (every eval row, when they fit in one), ``(eval_rest, ...)``."""
            return rows_map(last_rows_of, sources)

        def last_rows_of(a: _Source) -> Any:
            if c.shards == 1:
                return _place(a.slice(self.eval_full * size, c.eval_rows), c, 0)
            per_shard = self.eval_rest // c.shards
            index = eval_batch_rows(self.eval_full, 1, c, per_shard).reshape(c.shards, per_shard)
            return _read(a, index, c, self.mine)

        for first in range(0, self.eval_full, self.eval_per_segment):
            count = min(self.eval_per_segment, self.eval_full - first)

            def read(first: int = first, count: int = count) -> _Job:
                return _Job(e, "eval", first, (rows(ex, first, count), rows(ey, first, count)), None, count * size)

            yield read
        if self.eval_rest:

            def last() -> _Job:
                return _Job(e, "eval last", 0, (last_rows(ex), last_rows(ey)), None, self.eval_rest)

            yield last


class _Feed:
    """Runs the plan's jobs one ahead on a worker thread; reports rows per second, the rows of the
    epoch handed to training (of ``epoch_rows``), and stalls."""

    def __init__(self, jobs: Iterator[Callable[[], _Job]], show: bool, epoch_rows: int = 0):
        self.jobs, self.show = jobs, show
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="funcnet-stream")
        self.pending: concurrent.futures.Future[_Job] | None = None
        self.rows, self.shown = 0, time.perf_counter()  # rows read since the rate was last shown
        self.epoch_rows, self.trained = epoch_rows, (-1, 0)  # (epoch, its rows handed to training)
        self._submit()

    def _submit(self) -> None:
        job = next(self.jobs, None)
        self.pending = None if job is None else self.pool.submit(job)

    def next(self, epoch: int, kind: str) -> _Job:
        """The next job (of ``epoch`` and ``kind``), its rows read and on their way to the device;
        the one after is started."""
        if self.pending is None:
            raise RuntimeError("fit: the streamed plan ended early (a bug in funcnet; please report it).")
        waited = time.perf_counter()
        while True:
            try:
                job = self.pending.result(timeout=STALL_SECONDS)
                break
            except concurrent.futures.TimeoutError:
                if self.show:
                    seconds = time.perf_counter() - waited
                    progress.status(f"stalled {seconds:.0f}s waiting for data", stalled=True)
        if (job.epoch, job.kind) != (epoch, kind):
            raise RuntimeError(
                f"fit: the streamed plan gave epoch {job.epoch}'s {job.kind!r} rows where epoch {epoch}'s "
                f"{kind!r} rows were due (a bug in funcnet; please report it)."
            )
        self._submit()
        self.rows += job.rows
        if kind == "train":
            self.trained = (epoch, job.rows + (self.trained[1] if self.trained[0] == epoch else 0))
        now = time.perf_counter()
        if self.show and now - self.shown > 0.5:
            done = f", {min(self.trained[1], self.epoch_rows):,}/{self.epoch_rows:,} rows" if self.epoch_rows else ""
            progress.status(f"{self.rows / (now - self.shown):,.0f} rows/s{done}")
            self.rows, self.shown = 0, now
        return job

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def runner(
    hyper: list[Any],
    train_data: tuple[Any, Any],
    eval_data: tuple[Any, Any] | None,
    key: jax.Array,
    min_delta: Any,
    *,
    static: Static,
    config: Config,
) -> Callable[[TrainState, int], TrainState]:
    """``run(state, stop)``: ``program.segment``'s contract (train epochs ``state.epoch`` to
    ``stop - 1`` unless stopped; ``state``'s buffers are donated), with the data streamed from the
    host. Each ``x`` is a host array, or ``program.WithInputs`` of host arrays (the inputs beyond
    x, read row by row alike)."""
    c = config
    x, y = _sources("train_data", train_data[0]), _Source("train_data y", train_data[1])
    ex = ey = None
    if eval_data is not None:
        ex, ey = _sources("eval_data", eval_data[0]), _Source("eval_data y", eval_data[1])
    plan = _Plan(x, y, ex, ey, key, c)

    def evaluate(feed: _Feed, e: int, params: Params) -> dict[str, jax.Array]:
        if c.eval_rows <= c.eval_batch_size:
            job = feed.next(e, "eval last")
            return _eval_batch_jit(params, hyper, *job.arrays, static=static, config=c)  # type: ignore[no-any-return]
        total = _zeros(_no_evaluation_jit(config=c))
        last = None
        for _ in range(-(-plan.eval_full // plan.eval_per_segment)):
            job = feed.next(e, "eval")
            total = _eval_block_jit(params, total, hyper, *job.arrays, static=static, config=c)
        if plan.eval_rest:
            job = feed.next(e, "eval last")
            last = _eval_batch_jit(params, hyper, *job.arrays, static=static, config=c)
        return _eval_average_jit(total, last, config=c)  # type: ignore[no-any-return]

    def run(state: TrainState, stop: int) -> TrainState:
        epoch = int(state.epoch)
        if bool(state.stopped) or epoch >= stop:
            return state
        plan.warm(epoch)  # compile the host's order program here, not as a stalled read
        epoch_rows = min(c.rows, c.batches * c.batch_size)  # all of them, or the full batches' (drop_last)
        feed = _Feed(plan.jobs(epoch, stop), c.progress and distributed.is_writer(), epoch_rows)
        try:
            for e in range(epoch, stop):
                # The steps donate the carry, the epoch's start first. Without eval data a diverged
                # epoch falls back to its start, so a copy of it is kept; with, the epoch's end reads
                # nothing of it (the best state is kept apart).
                carry = (state.params, state.opt_state, state.loss_scale)
                kept = (None, None, None) if c.eval_rows > 0 else _copy(carry)
                rest = state._replace(params=None, opt_state=None, loss_scale=None)
                del state
                parts, previous = [], None
                for _ in range(plan.segments()):
                    job = feed.next(e, "train")
                    carry, sums = _steps_jit(
                        carry,
                        hyper,
                        *job.arrays,
                        np.int32(job.first),
                        job.dropout_key,
                        static=static,
                        config=c,
                    )
                    del job
                    if previous is not None:  # at most three segments held: wait for the one before
                        previous.block_until_ready()
                    parts.append(sums)
                    previous = sums
                scheduled = ex is not None and (e + 1) % c.eval_every == 0
                watched = _watched(carry, config=c) if c.eval_ema else carry[0]  # no copy of the params
                values = evaluate(feed, e, watched) if scheduled else _no_evaluation_jit(config=c)
                del watched
                end = _end_jit if c.eval_rows > 0 else _end_rollback_jit
                state = end(carry, rest, kept, jnp.concatenate(parts), values, min_delta, config=c)
                del rest, kept, carry
                if e + 1 < stop and bool(state.stopped):  # after the last epoch, no wait for the device
                    break
        finally:
            feed.close()
        return state

    return run
