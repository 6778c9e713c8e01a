"""Training (book: ``Trainer``): ``fit``, ``train_step``, ``FitResult``, ``History``.

A package by concept, each module with its contract:

* ``program.py``      the compiled program: training state, segments of epochs, evaluation, results
* ``shuffle.py``      each epoch's row order, a keyed permutation computed without a sort
* ``fitting.py``      ``fit``: checks, the split of numbers from structure, the run in segments
* ``checks.py``       the argument checks, all before anything compiles
* ``checkpointing.py`` durable checkpoints of the whole state, resume, refusing another run's
* ``progress.py``     the progress bar
* ``distributed.py``  data parallelism across devices and processes: shards, placement, agreement
* ``fsdp.py``         params and optimizer state sharded over a mesh axis (FSDP): the rule, placement
* ``stream.py``       data larger than memory: host data fed a segment at a time, same result
* ``steps.py``        training by steps: ``random_windows``, the applied learning rate, the log writers
"""

from funcnet.train.checkpointing import FitCheckpoint, read_checkpoint
from funcnet.train.fitting import fit
from funcnet.train.fsdp import FSDP, param_shardings, shard_params
from funcnet.train.program import FitResult, History, train_step
from funcnet.train.shuffle import epoch_order
from funcnet.train.steps import JsonLinesLogger, RandomWindows, TensorBoardLogger, random_windows

__all__ = [
    "FSDP",
    "FitCheckpoint",
    "FitResult",
    "History",
    "JsonLinesLogger",
    "RandomWindows",
    "TensorBoardLogger",
    "epoch_order",
    "fit",
    "param_shardings",
    "random_windows",
    "read_checkpoint",
    "shard_params",
    "train_step",
]
