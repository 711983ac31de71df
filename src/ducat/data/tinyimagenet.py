"""Tiny-ImageNet from ``root/tiny-imagenet-200.zip`` (read in place) or its extracted directory of JPEGs.

Labels are indices into ``sorted(wnids.txt)``; ``train=False`` is the labelled ``val`` split. Decoding
100k JPEGs takes a while, so the decoded arrays are cached as ``tiny-imagenet-200.{train,val}.npz`` next
to the data (written atomically; skipped with a warning if the directory is read-only). The cache is
rebuilt when the zip's (or the extracted ``wnids.txt``'s) path, size or mtime change; delete it to force.
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ducat.data.base import DataError, TensorData, need_root, tensor_data
from ducat.fileio import atomic_write

_TINY_DIR, _TINY_ZIP = "tiny-imagenet-200", "tiny-imagenet-200.zip"
_TINY_HOW = ("download tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip on a "
             "machine with internet and put it (or its extracted directory) under the data root")
_CACHE_VERSION = 1


class _TinySource:
    """Uniform read access to the dataset's files, by path relative to the ``tiny-imagenet-200`` top."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        self.prefix = ""
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"cannot open {path} as a zip file: {exc}") from None
            tops = [n[: -len("wnids.txt")] for n in self.zip.namelist() if n.endswith("wnids.txt")
                    and (n == "wnids.txt" or n.endswith("/wnids.txt"))]
            if not tops:
                raise DataError(f"{path} has no wnids.txt; it is not the Tiny-ImageNet zip; {_TINY_HOW}")
            self.prefix = min(tops, key=len)
            self._names = set(self.zip.namelist())

    def signature(self) -> str:
        stat = (self.path / "wnids.txt" if self.zip is None else self.path).stat()
        return f"v{_CACHE_VERSION}:{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}" if self.zip is not None else str(self.path / rel)

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(self.prefix + rel)
            return (self.path / rel).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {self.describe(rel)}: {exc}") from None

    def list_dir(self, rel: str) -> list[str]:
        """Sorted file names directly inside directory ``rel``."""
        if self.zip is not None:
            start = self.prefix + rel.rstrip("/") + "/"
            return sorted({n[len(start):] for n in self._names
                           if n.startswith(start) and "/" not in n[len(start):] and n != start})
        directory = self.path / rel
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_file())

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    from PIL import Image  # only Tiny-ImageNet needs it

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises assorted types for bad images
        raise DataError(f"cannot decode image {where}: {exc}") from None
    if arr.shape != (64, 64, 3):
        raise DataError(f"{where} is {arr.shape[1]}x{arr.shape[0]}, expected a 64x64 Tiny-ImageNet image")
    return arr.transpose(2, 0, 1)


def _decode_tiny(source: _TinySource, train: bool) -> tuple[np.ndarray, np.ndarray]:
    wnids = sorted({w.strip() for w in source.read("wnids.txt").decode("utf-8").splitlines() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[str, int]] = []
    if train:
        for w in wnids:
            names = [n for n in source.list_dir(f"train/{w}/images") if n.lower().endswith((".jpeg", ".jpg"))]
            if not names:
                raise DataError(f"no training images in {source.describe(f'train/{w}/images')}; {_TINY_HOW}")
            items += [(f"train/{w}/images/{n}", index[w]) for n in names]
    else:
        listing = "val/val_annotations.txt"
        for lineno, line in enumerate(source.read(listing).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{source.describe(listing)} line {lineno}: expected 'filename<TAB>wnid...' "
                                f"with a wnid from wnids.txt, got {line.strip()[:80]!r}")
            items.append((f"val/images/{fields[0]}", index[fields[1]]))
    images = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (rel, label) in enumerate(items):
        images[i] = _decode_jpeg(source.read(rel), source.describe(rel))
        labels[i] = label
    return images, labels


def _read_cache(path: Path, signature: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["signature"]) != signature:
                return None
            images, labels = cached["images"], cached["labels"]
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (3, 64, 64) or labels.shape != (len(images),):
        return None
    return images, labels.astype(np.int64, copy=False)


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray, signature: str) -> None:
    try:
        atomic_write(path, lambda f: np.savez(f, images=images, labels=labels, signature=np.array(signature)))
    except OSError as exc:
        warnings.warn(f"could not cache decoded Tiny-ImageNet at {path}: {exc}", stacklevel=3)


def load_tiny_imagenet(root: Path | None, train: bool) -> TensorData:
    root = need_root("TinyImageNet", root, _TINY_HOW)
    candidates = [root / _TINY_DIR, root / _TINY_ZIP, root]
    found = None
    for candidate in candidates:
        if (candidate.is_dir() and (candidate / "wnids.txt").is_file()) or (
                candidate.suffix == ".zip" and candidate.is_file()):
            found = candidate
            break
    if found is None:
        raise DataError(f"TinyImageNet not found under {root} (looked for {root / _TINY_DIR}/wnids.txt and "
                        f"{root / _TINY_ZIP}); {_TINY_HOW}")
    cache_dir = found if found == root and found.is_dir() else found.parent
    cache = cache_dir / f"{_TINY_DIR}.{'train' if train else 'val'}.npz"
    source = _TinySource(found)
    try:
        signature = source.signature()
        cached = _read_cache(cache, signature)
        if cached is not None:
            return tensor_data(*cached)
        images, labels = _decode_tiny(source, train)
    finally:
        source.close()
    _write_cache(cache, images, labels, signature)
    return tensor_data(images, labels)


