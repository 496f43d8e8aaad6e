"""Data-parallel evaluation: the processes of one ``accelerate launch`` share the model calls.

    accelerate launch --num_processes 4 -m excise eval truthfulqa-mc --base MODEL --out r.json

Inside :func:`processes` (entered by ``excise eval`` when launched as several processes) every
model call of a metric goes through :func:`map_shared`: the caller builds its list of batches
exactly as one process would (same order, same composition), process ``r`` of ``W`` runs
batches ``r, r + W, r + 2W, …`` (strided, so length-sorted batches spread evenly) and the
results are gathered back, in order, on every process. Each batch is computed as one process
computes it, so every process ends with the very outputs one process makes, and everything
downstream (aggregates, standard errors, bootstraps) runs on identical lists: the same record
on every process. Only the main one writes files (the result and the caches, :func:`is_main`);
cache look-ups are the main one's, broadcast (:func:`from_main`), so all processes take the same
path through the collective calls.

Outside :func:`processes` (one process; or ``excise run``, whose main process evaluates alone)
nothing is shared and no accelerate state is made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["from_main", "is_main", "launched_processes", "main_first", "map_shared", "processes", "sharing"]

T = TypeVar("T")
R = TypeVar("R")

# accelerate's PartialState while a data-parallel evaluation runs, else None.
_STATE: Any = None


def launched_processes() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def processes() -> Iterator[None]:
    """Share the model calls made inside between the launched processes (nothing when there is one)."""
    global _STATE
    if launched_processes() <= 1 or _STATE is not None:
        yield
        return
    import torch
    from accelerate import PartialState

    # cpu=True joins CPU processes over gloo (as the trainers do); on GPUs it sets each
    # process's own CUDA device, which "cuda" (`--device auto`) then means.
    _STATE = PartialState(cpu=not torch.cuda.is_available())
    try:
        yield
    finally:
        _STATE = None


def sharing() -> int:
    """How many processes share the model calls: 1 outside a data-parallel evaluation."""
    return 1 if _STATE is None else _STATE.num_processes


def is_main() -> bool:
    """Whether this process writes files and prints: always, except the non-first processes of
    a data-parallel evaluation."""
    return _STATE is None or _STATE.is_main_process


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first, the others after it (a model converted into the
    cache on first use, such as a GGUF alias, is then converted once, not by every process)."""
    if _STATE is None:
        yield
        return
    with _STATE.main_process_first():
        yield


def from_main(read: Callable[[], T]) -> T:
    """``read()`` on the main process, the same value on every process (a cache look-up that
    decides whether the collective calls that follow happen at all)."""
    if _STATE is None:
        return read()
    from accelerate.utils import broadcast_object_list

    box = [read() if _STATE.is_main_process else None]
    return broadcast_object_list(box)[0]


def map_shared(
    fn: Callable[[T], R], tasks: Sequence[T], *, desc: str, progress: bool = True, unit: str = "batch"
) -> list[R]:
    """``[fn(t) for t in tasks]``, with a progress bar; in a data-parallel evaluation each process
    runs every ``W``-th task from its rank on and all get the whole list back, in task order.

    ``fn``'s results must be picklable (numbers, strings; no tensors that live on a GPU).
    """
    if _STATE is None:
        return [fn(t) for t in tqdm(tasks, desc=desc, unit=unit, disable=not progress)]
    from accelerate.utils import gather_object

    rank, world = _STATE.process_index, _STATE.num_processes
    mine = range(rank, len(tasks), world)
    bar = tqdm(mine, desc=f"{desc} ({world} processes)", unit=unit, disable=not (progress and rank == 0))
    done = [(i, fn(tasks[i])) for i in bar]
    gathered = gather_object(done)  # every process's (index, result) pairs, flattened
    return [result for _, result in sorted(gathered, key=lambda pair: pair[0])]
