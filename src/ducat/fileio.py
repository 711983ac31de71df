"""Temporary: the one atomic write moves here (reliability branch)."""

from ducat.checkpoint import atomic_write_bytes

__all__ = ["atomic_write_bytes"]
