"""Provenance, as RobustBench records it: which code, versions, command and device produced a result."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ducat import __version__

PACKAGE_ROOT = Path(__file__).resolve().parent


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of every Python source file of the installed ducat package (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout ducat is imported from (``+dirty`` with local changes), or None."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True,  # noqa: E731
                                           text=True, timeout=5)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--", ".").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: str | None = None) -> dict[str, Any]:
    """ducat version, git commit and source digest, torch and pyautoattack versions, the command line, the
    device."""
    return {"ducat": __version__, "git_commit": git_commit(), "source_sha256": source_digest(),
            "torch": _version("torch"), "pyautoattack": _version("pyautoattack"), "python": sys.version.split()[0],
            "command": " ".join(sys.argv), "device": device}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
