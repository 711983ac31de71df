"""Atomic writes under concurrent writers, and the run-directory lock, with real processes.

The child processes load ``src/ducat/fileio.py`` by its path (it needs only the standard library), so they
start in a fraction of a second instead of importing torch through the ``ducat`` package.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ducat.fileio import RunDirError, RunLock, RunLockedError, atomic_write_bytes, remove_orphan_temps, temp_path

FILEIO = Path(__file__).resolve().parents[1] / "src" / "ducat" / "fileio.py"
LOAD_FILEIO = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("fileio", {str(FILEIO)!r})
    fileio = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fileio)
""")


def version(writer: int, index: int) -> bytes:
    """The ``index``-th content ``writer`` writes: a header naming it, then 1-97 KiB derived from it."""
    header = f"{writer}:{index}:".encode()
    body = hashlib.sha256(header).digest() * (32 + (index * 7919 + writer * 104729) % 3072)
    return header + body


def is_complete_version(data: bytes) -> bool:
    writer, index, _ = data.split(b":", 2)
    return data == version(int(writer), int(index))


WRITER = LOAD_FILEIO + textwrap.dedent("""
    import hashlib
    from pathlib import Path
    path, writer, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    def version(writer, index):
        header = f"{writer}:{index}:".encode()
        return header + hashlib.sha256(header).digest() * (32 + (index * 7919 + writer * 104729) % 3072)
    for index in range(count):
        fileio.atomic_write_bytes(path, version(writer, index))
""")


def run_writers_and_read(path: Path, writes: int) -> tuple[int, list[str]]:
    """Two writer processes write ``path`` ``writes`` times each while this process reads it in a loop.

    Returns (number of reads, problems): a problem is a writer that failed or a read that is not one
    complete version."""
    atomic_write_bytes(path, version(0, 0))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(writes)],
                                stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    reads, problems = 0, []
    while any(w.poll() is None for w in writers):
        data = path.read_bytes()  # raises (failing the test) if the file is ever missing
        reads += 1
        if not is_complete_version(data):
            problems.append(f"read {reads}: {len(data)} bytes, not one complete version")
    for w in writers:
        if w.wait() != 0:
            problems.append(f"writer exited {w.returncode}: {w.stderr.read().strip().splitlines()[-1:]}")
    return reads, problems


def test_two_writers_and_a_reader_of_one_file(tmp_path):
    reads, problems = run_writers_and_read(tmp_path / "key.bin", writes=150)
    assert not problems, problems[:5]
    assert reads > 10  # the reader really ran alongside the writers
    assert is_complete_version((tmp_path / "key.bin").read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["key.bin"]  # no temporary left behind


@pytest.mark.slow
def test_two_writers_1500_writes_each_and_a_reader_of_one_file(tmp_path):
    """The probe's figures: two writers of one key, 1500 writes each (about 15 s with fsync)."""
    reads, problems = run_writers_and_read(tmp_path / "key.bin", writes=1500)
    assert not problems, (len(problems), problems[:5])
    assert reads > 100
    assert [p.name for p in tmp_path.iterdir()] == ["key.bin"]


def test_atomic_write_gives_the_usual_permissions_and_cleans_up_a_failed_write(tmp_path, monkeypatch):
    import ducat.fileio as fileio

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # created the ordinary way: 0666 minus the umask
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "atomic", b"new")
    monkeypatch.undo()
    assert (tmp_path / "atomic").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]


def finished_pid() -> int:
    """The PID of a process that has already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphan_temporaries_of_dead_writers_are_removed_others_kept(tmp_path):
    target = tmp_path / "last.pt"
    mine = temp_path(target)
    dead = tmp_path / f".last.pt.{finished_pid()}.0123abcd.tmp"
    dead_link = tmp_path / f".prev.pt.{finished_pid()}.89abcdef.link"
    unrelated = tmp_path / ".last.pt.tmp"  # not a temp_path name: not ours to delete
    for p in (mine, dead, dead_link, unrelated, target):
        p.write_bytes(b"x")
    assert sorted(remove_orphan_temps(tmp_path)) == sorted([dead, dead_link])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, unrelated.name, target.name])


HOLDER = LOAD_FILEIO + textwrap.dedent("""
    import time
    lock = fileio.RunLock(sys.argv[1])
    with lock:
        print("locked", flush=True)
        if sys.argv[2] == "hold":
            time.sleep(120)
""")


def start_holder(run_dir: Path, mode: str) -> subprocess.Popen:
    """A child process that takes the lock of ``run_dir`` and then holds it (``hold``) or exits (``exit``)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_held_run_lock_refuses_a_second_process_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    child = start_holder(run_dir, "hold")
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(run_dir).acquire()
        message = str(info.value)
        assert isinstance(info.value, ValueError) and "\n" not in message
        assert f"process {child.pid} " in message and str(run_dir) in message and "wait for it" in message
        # (b) the holder is killed: the kernel drops its lock, the next acquirer takes over and says so
        child.send_signal(signal.SIGKILL)
        child.wait()
        with RunLock(run_dir) as lock:
            assert lock.took_over_from == child.pid
            assert f"process {child.pid}," in lock.note and "without releasing" in lock.note
    finally:
        child.kill()
        child.wait()


def test_a_run_lock_is_released_on_normal_exit(tmp_path):
    run_dir = tmp_path / "run"
    child = start_holder(run_dir, "exit")
    assert child.wait() == 0
    assert (run_dir / ".lock").read_bytes() == b""  # a clean release leaves no holder record
    lock = RunLock(run_dir).acquire()
    assert lock.took_over_from is None and lock.note is None
    assert f'"pid": {os.getpid()}' in (run_dir / ".lock").read_text()
    with pytest.raises(RunLockedError, match=f"process {os.getpid()} "):  # exclusive within a process too
        RunLock(run_dir).acquire()
    lock.release()
    lock.release()  # releasing twice is harmless
    with RunLock(run_dir) as again:
        assert again.took_over_from is None


def test_a_run_lock_creates_its_directory_and_reports_one_that_cannot_be(tmp_path):
    with RunLock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / "run" / ".lock").is_file()
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunDirError) as info:
        RunLock(tmp_path / "file" / "run").acquire()
    assert "\n" not in str(info.value) and str(tmp_path / "file" / "run") in str(info.value)


def test_run_lock_takes_over_from_a_dead_holder_recorded_in_the_file(tmp_path):
    """A record left by a process that died (its flock is gone): the same path as SIGKILL, without timing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = finished_pid()
    (run_dir / ".lock").write_text(f'{{"pid": {pid}, "host": "h", "started": "{time.strftime("%Y")}"}}')
    with RunLock(run_dir) as lock:
        assert lock.took_over_from == pid
