"""Safe file writes and the run-directory lock.

:func:`atomic_write_bytes` is the one way ducat writes a file that must survive a crash or a concurrent
writer: the bytes go to a temporary file with a unique name in the target's directory, are fsynced,
renamed over the target, then the directory is fsynced. A crash leaves the old or the new file, never a
torn one; two processes writing the same file leave one complete version, and a reader never sees a
partial one. The temporary name carries the writer's PID (``.<name>.<pid>.<random>.tmp``) so that
:class:`RunLock` can remove the temporaries of writers that died (a SIGKILL leaves them behind).

:class:`RunLock` makes train, resume and reproduce exclusive per run directory: ``flock`` on
``RUN/.lock``, which the kernel releases when the holder dies, so a killed run never blocks the next one.

Test hook: with ``DUCAT_TEST_CRASH_AT=<point>:<file name>[@<n>]`` in the environment the process
SIGKILLs itself the n-th time (default 1st) a write reaches that point, e.g.
``temp-written:last.pt@2`` (the temporary copy of the 2nd ``last.pt`` is complete and fsynced, not
yet renamed) or ``replaced:last.pt.sha256`` (the new checksum is in place, the data not yet). Points:
``temp-written`` and ``replaced`` in every atomic write. Unset (always, outside tests), it costs one
environment lookup per write. Used by ``tests/test_reliability.py`` and ``benchmarks/crash_resume.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable, Self

from ducat.errors import RunDirError, RunLockedError

CRASH_ENV = "DUCAT_TEST_CRASH_AT"
_crash_hits: dict[str, int] = {}
_TEMP_NAME = re.compile(r"\..+\.(\d{1,9})\.[0-9a-f]{8}\.(tmp|link)")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_point(point: str, name: str) -> None:
    """Test hook (see the module docstring): SIGKILL this process here if ``DUCAT_TEST_CRASH_AT`` says so."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    label = f"{point}:{name}"
    wanted, _, nth = spec.partition("@")
    if wanted != label:
        return
    _crash_hits[label] = _crash_hits.get(label, 0) + 1
    if _crash_hits[label] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A fresh name ``.<name>.<pid>.<8 hex>.<kind>`` beside ``path`` for a file to be renamed onto it.

    Not ``tempfile.mkstemp``: that creates the file with mode 0600, and checkpoints must get the usual
    permissions (0666 minus the umask) like any file the user creates."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash or a concurrent writer leaves one complete version."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Like :func:`atomic_write_bytes`, with ``write(file)`` streaming the content (large arrays)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # "x": exclusive creation, never another writer's temporary
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("temp-written", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point("replaced", path.name)
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_orphan_temps(directory: Path) -> list[Path]:
    """Delete the temporaries (``temp_path`` names) left in ``directory`` by writers that are no longer
    running on this host; returns what was removed. Temporaries of live processes are kept. Best effort:
    a file that cannot be removed is left in place."""
    removed = []
    for entry in Path(directory).iterdir():
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink(missing_ok=True)
            except OSError:
                continue
            removed.append(entry)
    return removed


class RunLock:
    """Exclusive lock on a run directory for train, resume and reproduce (``flock`` on ``RUN/.lock``).

    ``with RunLock(run_dir) as lock:`` or ``lock.acquire()`` ... ``lock.release()``. A second process
    gets :class:`RunLockedError` naming the holder's PID, host and start time. The kernel drops the
    lock when its holder dies, so a killed run never blocks the next one; the next acquirer then finds
    the dead holder's record in the file and reports its PID in ``took_over_from`` (``None`` after a
    clean release, which empties the file). The lock file is never deleted: deleting it would let two
    processes lock two different files of the same name.

    ``acquire`` creates ``run_dir`` (and its parents) if needed, since a new run must hold the lock
    before its first write; callers that need an existing directory (resume) check that first. After
    acquiring it also removes the temporaries of dead writers (see :func:`remove_orphan_temps`).
    The lock is per open file: a process that forks while holding it shares it with the child.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.took_over_from: int | None = None
        self._fd: int | None = None

    def acquire(self) -> Self:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunDirError(f"cannot create the lock of run directory '{self.run_dir}' ({exc.strerror})") from None
        holder = self._lock_or_holder(fd)
        if holder is not None:
            os.close(fd)
            raise RunLockedError(f"run directory '{self.run_dir}' is in use by {_describe(holder)}; wait for it "
                                 "to finish (or stop it), or choose another run directory")
        previous = _read_holder(fd)
        self.took_over_from = previous.get("pid") if isinstance(previous.get("pid"), int) else None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        remove_orphan_temps(self.run_dir)
        return self

    def _lock_or_holder(self, fd: int, patience: float = 2.0) -> dict | None:
        """Take the lock on ``fd`` (None), or return the holder's record. A holder records itself just after
        it locks, so an empty record is read again for up to ``patience`` seconds (trying the lock too: the
        holder may be gone by then) before it is reported as such."""
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                holder = _read_holder(fd)
                if holder or time.monotonic() > deadline:
                    return holder
                time.sleep(0.02)
            except OSError as exc:
                os.close(fd)
                raise RunDirError(f"cannot lock run directory '{self.run_dir}' ({exc.strerror}); "
                                  "the file system may not support locks") from None

    def release(self) -> None:
        """Empty the record and drop the lock (a no-op if not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor drops the flock

    @property
    def note(self) -> str | None:
        """One line for the log when this lock was taken over from a process that died holding it."""
        if self.took_over_from is None:
            return None
        return (f"took over the lock of '{self.run_dir}' from process {self.took_over_from}, "
                "which ended without releasing it (killed or crashed)")

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """The holder record in a lock file (``{}`` if empty or unreadable)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "another process (it has not recorded its PID yet)"
    return f"process {pid} on {holder.get('host', '?')} (started {holder.get('started', '?')})"
