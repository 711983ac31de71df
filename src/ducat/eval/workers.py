"""Worker processes for the evaluation: each attacks whole batches with its own torch threads.

Why: on a CPU an evaluation runs many small operators (a few hundred microseconds each on a CPU-scale
model), and a second intra-op thread speeds one attack up much less than a second process attacking its own
batch (``docs/performance.md``, "Evaluation time"). The workers
are forked from the evaluating process once the model, its views and the examples exist, so only batch
indices and per-example results cross between processes. They exist only for a CPU run on Linux: fork
is unsafe once CUDA is initialised, and macOS and Windows start processes otherwise.

Written by hand rather than with ``multiprocessing.Pool`` or ``concurrent.futures``: a ``Pool`` waits
forever when a worker dies (killed for memory, say), and an executor's shutdown waits for running
batches, which can take minutes after a Ctrl-C. Here a dead worker is an error at once, and leaving the
pool, normally or not, terminates the workers. A worker ignores Ctrl-C and ends with its parent.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import traceback
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

import torch

Task = Callable[[Any, Any], Any]  # task(shared, job) -> result; a module-level function
MapFn = Callable[[Task, list], Iterator[tuple[int, Any]]]


class WorkerError(RuntimeError):
    """A worker process died, or its task raised an exception that could not be sent back."""


def can_fork(device: torch.device) -> bool:
    """Whether worker processes may be forked for an evaluation on ``device``."""
    return device.type == "cpu" and sys.platform.startswith("linux")


def default_workers(device: torch.device) -> int:
    """One single-threaded worker per torch thread on a Linux CPU; 1 (no worker process) elsewhere."""
    return torch.get_num_threads() if can_fork(device) else 1


@contextmanager
def worker_pool(workers: int, shared: Any) -> Iterator[MapFn]:
    """``map(task, jobs)`` yields ``(i, task(shared, jobs[i]))`` for every job as it finishes, computed by
    ``workers`` forked processes (each job goes, in order, to the next free one), or in this process and in
    order when ``workers <= 1``.

    Each worker runs with an equal share of this process's torch threads, at least one."""
    if workers <= 1:
        yield lambda task, jobs: ((i, task(shared, job)) for i, job in enumerate(jobs))
        return
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("fork")
    processes, connections = [], []
    try:
        for _ in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_serve, args=(child_end, shared, threads), daemon=True)
            process.start()
            child_end.close()
            processes.append(process)
            connections.append(parent_end)
        yield lambda task, jobs: _map(task, jobs, processes, connections)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()


def _map(task: Task, jobs: list, processes: list, connections: list[Connection]) -> Iterator[tuple[int, Any]]:
    queue = list(enumerate(jobs))[::-1]
    busy: dict[Connection, int] = {}
    process_of = dict(zip(connections, processes))
    while queue or busy:
        for connection in connections:
            if connection not in busy and queue:
                index, job = queue.pop()
                try:
                    connection.send((task, job))
                except OSError:  # the worker died after its last result
                    raise _died(process_of[connection]) from None
                busy[connection] = index
        sentinels = {process_of[c].sentinel: c for c in busy}
        for ready in wait([*busy, *sentinels]):
            connection = sentinels.get(ready, ready)
            if connection not in busy:
                continue  # its result was read already in this round
            try:
                ok, value = connection.recv()
            except EOFError:
                raise _died(process_of[connection]) from None
            if not ok:
                raise value
            yield busy.pop(connection), value


def _died(process: Any) -> WorkerError:
    process.join(5)
    return WorkerError(f"an evaluation worker died (exit code {process.exitcode})")


def _serve(connection: Connection, shared: Any, threads: int) -> None:
    """A worker's loop: receive ``(task, job)``, send back ``(True, result)`` or ``(False, exception)``, the
    exception with the worker's traceback as a note (a :class:`WorkerError` if it cannot be sent)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # end with the parent, even when it is killed (Linux prctl PR_SET_PDEATHSIG = 1)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    while True:
        try:
            task, job = connection.recv()
        except EOFError:
            return
        try:
            connection.send((True, task(shared, job)))
        except BaseException as exc:  # KeyboardInterrupt too: the parent stops as if it had been interrupted
            exc.add_note(f"in an evaluation worker:\n{traceback.format_exc()}")
            try:
                connection.send((False, exc))
            except Exception:
                connection.send((False, WorkerError(traceback.format_exc())))
