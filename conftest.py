"""Tests import this checkout's sources, even when another checkout is pip-installed in editable mode.

Every torch of the session runs on one thread (``OMP_NUM_THREADS=1``, inherited by the subprocesses the tests
start): the tests' tensors are tiny, and the whole suite was faster single-threaded (360 s against 377 s on 2
cores). The second core runs the *background lane*: long subprocess work that tests only read, started with the
session and run one task after another in a thread, beside the in-process tests instead of after them. A test
reads a task with ``background.result(name)``; the tests that use the ``background`` fixture run last. A test
module declares its tasks in a module-level ``BACKGROUND = {name: task}``, where ``task(run, tmp)`` may call
``run(argv, **env)`` (a subprocess with this checkout's sources, killed if the session ends first) and gets a
fresh directory ``tmp``; a task runs only if a collected test is in its module. Tasks that several modules read
are in :data:`SHARED`, run for the modules that name them in ``BACKGROUND_READS``: ``smoke_grid``, the smoke
reproduction (sequential, one seed, one evaluation worker) of tests/test_reproduce.py and tests/test_launch.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported anywhere in the session
SRC = Path(__file__).parent / "src"
sys.path.insert(0, str(SRC))
SMOKE_GRID = ["reproduce", "--scale", "smoke", "--seeds", "1", "--threads", "1", "--workers", "1"]


def smoke_grid(run: Callable[..., subprocess.CompletedProcess], tmp: Path) -> subprocess.CompletedProcess:
    """The finished ``ducat reproduce`` of :data:`SMOKE_GRID` into ``tmp / "grid"`` (its ``out``)."""
    done = run([sys.executable, "-m", "ducat", *SMOKE_GRID, "--out", str(tmp / "grid")])
    done.out = tmp / "grid"
    return done


SHARED = {"smoke_grid": smoke_grid}


class Lane:
    """Tasks run once each, one after another, in a thread started at construction; :meth:`result` waits for a
    task (running it at once if the thread has not reached it) and returns its value or raises its error."""

    def __init__(self, tasks: dict[str, Callable[[Callable, Path], Any]], tmp: Callable[[str], Path]):
        self._tasks, self._tmp = tasks, tmp
        self._locks = {name: threading.Lock() for name in tasks}
        self._done: dict[str, tuple[Any, BaseException | None]] = {}
        self._live: set[subprocess.Popen] = set()
        self._closing = False
        self._thread = threading.Thread(target=lambda: [self._finish(name) for name in tasks], daemon=True)
        self._thread.start()

    def result(self, name: str) -> Any:
        value, error = self._finish(name)
        if error is not None:
            raise error
        return value

    def _finish(self, name: str) -> tuple[Any, BaseException | None]:
        with self._locks[name]:
            if name not in self._done:
                try:
                    self._done[name] = (self._tasks[name](self._run, self._tmp(name)), None)
                except Exception as error:  # noqa: BLE001 (handed to the test that reads the task)
                    self._done[name] = (None, error)
            return self._done[name]

    def _run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        if self._closing:
            return subprocess.CompletedProcess(argv, -9, "", "not run: the test session ended first")
        base = {k: v for k, v in os.environ.items() if k != "DUCAT_TEST_CRASH_AT"}
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**base, "PYTHONPATH": str(SRC), **env})
        self._live.add(process)
        try:
            out, err = process.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            self._live.discard(process)
        return subprocess.CompletedProcess(argv, process.returncode, out, err)

    def close(self) -> None:
        """Kill what still runs and start nothing more (the session ended before a test read it)."""
        self._closing = True
        for _ in range(2):  # again after the join: a process the lane started meanwhile
            for process in list(self._live):
                process.kill()
            self._thread.join(timeout=60)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read the background lane go last (in their order), so the lane has the session to finish."""
    items.sort(key=lambda item: "background" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _lane(request, tmp_path_factory) -> Lane:
    """Starts the lane with the session: the :data:`SHARED` tasks that a collected module names in its
    ``BACKGROUND_READS``, then each collected module's ``BACKGROUND`` tasks."""
    modules = sorted({item.module for item in request.session.items if getattr(item, "module", None)},
                     key=lambda module: module.__name__)
    tasks = {name: SHARED[name] for module in modules for name in getattr(module, "BACKGROUND_READS", ())}
    for module in modules:
        tasks.update(getattr(module, "BACKGROUND", {}))
    lane = Lane(tasks, tmp_path_factory.mktemp)
    yield lane
    lane.close()


@pytest.fixture(scope="session")
def background(_lane) -> Lane:
    """The session's background lane (:class:`Lane`): ``background.result(name)``."""
    return _lane
